"""``loki ica build-templates|positions``: ICA functional networks (issue 12) from the command line.

Two commands over :mod:`loki_kernels.ica`::

    loki ica build-templates --model-path base/ --data alpaca.jsonl dolly.jsonl --output global_templates.json
    loki ica positions --templates global_templates.json --components 0 1 --mode preserve --output 10.json \\
                       [--silenced silenced.json] [--model-path base/]

* ``build-templates``: FunctionalNetworksSFT's ``buildtemplates`` (``build_ica_templates.py``): records are read
  from every ``--data`` file (:func:`~loki_kernels.data.read_records`), ``--samples-per-file`` of each drawn at
  random (``--seed``; FNSFT's ``--ica_template_samples_per_ds``) and tokenized in ``--template``
  (:func:`~loki_kernels.data.tokenize_records`, cut at ``--seq-len``, FNSFT's ``--max_seq_length``); the
  sequences of all files are pooled and shuffled, and the first ``--max-sequences`` (FNSFT's DataLoader stops
  after 100) are batched (right padding; pads are dropped from the signal). Then
  :func:`~loki_kernels.ica.build_templates` (stream mode by default) and :func:`~loki_kernels.ica.save_templates`:
  FNSFT's template JSON, written atomically.
* ``positions``: the rows to train for a choice of components (:func:`~loki_kernels.ica.positions`:
  ``preserve`` trains the union of their channels, ``lesion`` the complement) as a position JSON
  (``[[row, ...] per layer]``, for ``patch_model`` and ``loki create-model``), and optionally the rows FNSFT's
  forward mask zeroes during training (:func:`~loki_kernels.ica.silenced`) in the same format. Layers the
  templates do not capture get no rows. The layer count is the model's (``--model-path``: its config only, no
  weights; the templates are checked against it) or, without one, the last captured layer + 1.

Differences from FNSFT's CLI: each file's record format is detected on its own records (FNSFT detects one
format for the pooled records of all files, from the keys their first five share); the output is the file
named by ``--output`` (FNSFT: ``{output}/{model}/{datasets}/global_templates.json``); data files are local; the
model runs in ``--torch-dtype`` (FNSFT loads it in float32; the activations are float32 either way);
``--max-sequences`` is a flag (FNSFT: a fixed 100). A mistake (bad flag value, missing file, unknown component,
templates that do not fit the model, an output that exists) is one line, exit status 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
from pathlib import Path

from .cli import UserError, find_model_dir, load_model

__all__ = ["add_ica_commands", "run_build_templates", "run_positions"]


def add_ica_commands(command) -> argparse.ArgumentParser:
    """Register ``loki ica`` (``build-templates``, ``positions``) through ``command(name, help)``, ``build_parser``'s.

    Returns the ``ica`` parser. Each subcommand sets ``command`` to ``"ica <name>"``, so ``loki``'s one-line
    errors read ``loki ica positions: error: ...``.
    """
    from loki_kernels.data import TEMPLATES
    from loki_kernels.ica.templates import MODES

    from .constants import TORCH_DTYPES
    from .real_models import REAL_MODELS

    ica = command("ica", "ICA functional networks: build templates from data, turn components into trainable rows")
    sub = ica.add_subparsers(dest="ica_command", required=True, metavar="{build-templates,positions}")

    def subcommand(name, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=ica.formatter_class)
        p.set_defaults(command=f"ica {name}")
        return p

    model_help = f"local model directory (with its tokenizer), or {', '.join(REAL_MODELS)} (as for analyse)"
    p = subcommand("build-templates", "ICA templates of a model's MLP outputs over local data (FNSFT's JSON)")
    p.add_argument("--model-path", required=True, help=model_help)
    p.add_argument("--data", type=Path, nargs="+", required=True,
                   help="record files (.jsonl/.json/.parquet/.csv or a datasets directory) in any format "
                        "loki_kernels.data.detect_format knows (alpaca, dolly, question/answer, messages, text, ...)")
    p.add_argument("--output", type=Path, required=True, help="template JSON to write")
    p.add_argument("--samples-per-file", type=int, default=100, help="records drawn at random from each file")
    p.add_argument("--max-sequences", type=int, default=100,
                   help="sequences the ICA sees, from the pooled and shuffled records (FNSFT: 100)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence at most")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--template", default="auto", choices=TEMPLATES,
                   help="prompt format (auto: the tokenizer's chat template, else basic)")
    p.add_argument("--components", type=int, default=10, help="ICA components (networks)")
    p.add_argument("--percentile", type=float, default=98.0,
                   help="a network is the channels with |spatial map| at or above this percentile (of all layers)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="decoder layers to capture (default: all)")
    p.add_argument("--max-pca-components", type=int, default=1000,
                   help="PCA size before FastICA: min(this, features, tokens - 1)")
    p.add_argument("--mode", default="stream", choices=("stream", "exact"),
                   help="stream: randomized PCA without holding the activations; exact: full SVD (small problems)")
    p.add_argument("--power-iterations", type=int, default=1, help="of the randomized PCA (stream)")
    p.add_argument("--oversample", type=int, default=10, help="extra sketch columns of the randomized PCA (stream)")
    p.add_argument("--seed", type=int, default=0, help="record sampling, PCA test matrix, FastICA initialisation")
    p.add_argument("--cache-activations", action="store_true",
                   help="run the model once and keep its activations for the later PCA passes (memory: tokens x "
                        "layers x hidden floats on the model's device); default: re-run the model each pass")
    p.add_argument("--torch-dtype", default="auto", choices=TORCH_DTYPES, help="of the model")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run_build_templates)

    p = subcommand("positions", "trainable down_proj rows of chosen ICA components, to a position JSON")
    p.add_argument("--templates", type=Path, required=True, help="template JSON (ours or FNSFT's)")
    p.add_argument("--components", type=int, nargs="+", required=True, help="component ids, e.g. 0 1")
    p.add_argument("--mode", required=True, choices=MODES,
                   help="preserve: train the union of the components' channels; lesion: train all the others")
    p.add_argument("--output", type=Path, required=True, help="position JSON to write: [[row, ...] per layer]")
    p.add_argument("--silenced", type=Path, default=None,
                   help="also write the rows FNSFT's forward mask zeroes in training, in the same format")
    p.add_argument("--model-path", default=None,
                   help="check the templates against this model (its config) and take its layer count")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run_positions)
    return ica


# ------------------------------------------------------------------------------------- build-templates
def run_build_templates(args: argparse.Namespace) -> int:
    from loki_kernels.data import batches, read_records, tokenize_records
    from loki_kernels.ica import build_templates, save_templates

    for name in ("samples_per_file", "max_sequences", "seq_len", "batch_size", "components", "max_pca_components"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.power_iterations < 0 or args.oversample < 0:
        raise UserError("--power-iterations and --oversample must be >= 0")
    if not 0 <= args.percentile <= 100:
        raise UserError(f"--percentile must be in [0, 100], got {args.percentile}")
    _check_output(args.output, args.overwrite, "--output")
    model_dir = find_model_dir(args.model_path)
    config = _config(model_dir)
    _check_layers(args.layers, config)

    for path in args.data:
        if not path.exists():
            raise UserError(f"--data file not found: {path}")
    tokenizer = _tokenizer(model_dir)
    rng = random.Random(args.seed)
    sequences = []
    for path in args.data:
        rows = read_records(path)  # ValueError naming the file and record on malformed input
        if not rows:
            raise UserError(f"--data {path} holds no records")
        rows = rng.sample(rows, args.samples_per_file) if len(rows) > args.samples_per_file else rows
        try:  # each file's format detected on its own records
            sequences += tokenize_records(rows, tokenizer, template=args.template, max_length=args.seq_len,
                                          progress=_progress())
        except ValueError as e:
            raise UserError(f"--data {path}: {e}") from None
    rng.shuffle(sequences)
    sequences = sequences[:args.max_sequences]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    data = batches(sequences, args.batch_size, pad)

    model = load_model(model_dir, args)
    try:
        templates = build_templates(model, data, n_components=args.components, percentile=args.percentile,
                                    layers=args.layers, max_pca_components=args.max_pca_components, seed=args.seed,
                                    mode=args.mode, power_iterations=args.power_iterations,
                                    oversample=args.oversample, cache_activations=args.cache_activations,
                                    progress=_progress())
    except ValueError as e:
        raise UserError(str(e)) from None
    templates.meta.update(model=str(args.model_path), data=[str(p) for p in args.data], sequences=len(sequences))
    with _parents_made(args.output):
        save_templates(templates, args.output)

    sizes = [sum(len(chs) for chs in comp.values()) for comp in templates.components.values()]
    converged = "" if templates.meta["ica_converged"] else " (FastICA did not converge)"
    print(f"{len(sizes)} ICA templates over {templates.meta['tokens']} tokens ({len(sequences)} sequences, "
          f"{len(templates.layers)} layers x {templates.hidden_size} channels, {args.mode} PCA to "
          f"{templates.meta['n_pca']}){converged}: {min(sizes)}-{max(sizes)} channels each -> {args.output}")
    return 0


# ---------------------------------------------------------------------------------------------- positions
def run_positions(args: argparse.Namespace) -> int:
    from loki_kernels.ica import load_templates, positions, silenced
    from loki_kernels.target_pos import save_target_pos

    _check_output(args.output, args.overwrite, "--output")
    if args.silenced is not None:
        _check_output(args.silenced, args.overwrite, "--silenced")
        if args.silenced.resolve() == args.output.resolve():
            raise UserError("--silenced and --output name the same file")
    if not args.templates.exists():
        raise UserError(f"--templates file not found: {args.templates}")
    templates = load_templates(args.templates)  # ValueError naming the file on malformed input
    if args.model_path is not None:
        num_layers = _check_against_model(templates, args.model_path)
    else:
        num_layers = max(templates.layers) + 1 if templates.layers else 0
    if len(set(args.components)) != len(args.components):
        raise UserError(f"--components lists a component twice: {' '.join(map(str, args.components))}")
    try:
        train = positions(templates, args.components, args.mode)
        zero = silenced(templates, args.components, args.mode)
    except ValueError as e:
        raise UserError(str(e)) from None

    def per_layer(rows: dict[int, list[int]]) -> list[list[int]]:
        return [rows.get(layer, []) for layer in range(num_layers)]

    written = []
    try:
        for path, rows in ((args.output, train), (args.silenced, zero)):
            if path is None:
                continue
            with _parents_made(path):
                save_target_pos(per_layer(rows), path)
            written.append(path)
    except BaseException:
        for path in written:  # all or nothing
            path.unlink(missing_ok=True)
        raise

    trained = sum(len(r) for r in train.values())
    total = len(templates.layers) * templates.hidden_size
    line = (f"{args.mode} components {' '.join(map(str, args.components))}: {trained} of {total} rows train "
            f"({100 * trained / total:.2f}%) in {sum(1 for r in train.values() if r)} of {num_layers} layers "
            f"-> {args.output}")
    if args.silenced is not None:
        line += f"; {sum(len(r) for r in zero.values())} rows silenced -> {args.silenced}"
    print(line)
    return 0


def _check_against_model(templates, model_path: str) -> int:
    """The model's layer count, after :func:`~loki_kernels.ica.check_templates` on a weightless copy of it."""
    import torch
    from transformers import AutoModelForCausalLM

    from loki_kernels.arch import model_dims
    from loki_kernels.ica import check_templates

    config = _config(find_model_dir(model_path))
    with torch.device("meta"):  # the architecture without weights: layers and widths are all that is read
        model = AutoModelForCausalLM.from_config(config)
    try:
        check_templates(templates, model)
    except ValueError as e:
        raise UserError(f"{e} ({model_path})") from None
    return model_dims(config)[1]


# ------------------------------------------------------------------------------------------------ helpers
def _config(model_dir: Path):
    from .model_utils import load_config

    return load_config(model_dir)  # a ValueError naming the model when it has no readable config


def _check_layers(layers, config) -> None:
    from loki_kernels.arch import model_dims

    if layers is None:
        return
    num_layers = model_dims(config)[1]
    seen = set()
    for layer in layers:
        if not 0 <= layer < num_layers:
            raise UserError(f"--layers {layer}: the model has {num_layers} decoder layers (0-{num_layers - 1})")
        if layer in seen:
            raise UserError(f"--layers {layer} is listed twice")
        seen.add(layer)


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError, KeyError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{model_dir}: no tokenizer to read --data with ({message})") from None


def _check_output(path: Path, overwrite: bool, flag: str) -> None:
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory")
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path} exists; pass --overwrite to replace it")


@contextlib.contextmanager
def _parents_made(path: Path):
    """Make ``path``'s missing parent directories; remove them again if the ``with`` block fails."""
    import shutil

    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    for directory in reversed(made):
        directory.mkdir()
    try:
        yield
    except BaseException:
        if made:
            shutil.rmtree(made[-1], ignore_errors=True)
        raise


def _progress() -> bool:
    """Progress bars on a terminal only: anywhere else stderr holds nothing but a possible error line."""
    return sys.stderr.isatty()
