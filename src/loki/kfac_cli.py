"""``loki kfac collect|edit|select``: the K-FAC curvature edit (Merullo et al. 2025, issue 13) from the command line.

Three commands over :mod:`loki_kernels.kfac`::

    loki kfac collect --model-path base/ --data corpus.jsonl --layers 23 24 25 --output factors.safetensors
    loki kfac edit    --model-path base/ --factors factors.safetensors \\
                      --plan '{"23": {"gate": 0.6, "up": 0.6}}' --save-dir edited/
    loki kfac select  --model-path base/ --data corpus.jsonl --quota 10 --output 10.json

* ``collect``: :func:`~loki_kernels.kfac.collect_factors` over local data, written with
  :func:`~loki_kernels.kfac.save_factors` (atomically).
* ``edit``: :func:`~loki_kernels.kfac.apply_edit` with a plan of ρ per layer and module (the original's
  ``--layers-json`` format) on factors from ours or the original's ``.pt`` files
  (:func:`~loki_kernels.kfac.load_original_factors`); the edited model and its tokenizer are saved as a
  plain Hugging Face directory (with ``kfac_edit.json``, what was done), written whole or not at all
  (:class:`loki.model_utils.OutputDir`, as ``create-model``).
* ``select``: K-FAC row curvature of every ``down_proj`` (:func:`~loki_kernels.kfac.row_scores`) to a
  position JSON (:func:`~loki_kernels.selection.target_pos_from_scores`) for ``patch_model`` and
  ``loki create-model``: K-FAC choosing LoKI's trainable rows (``shared/reference/kfac_ica.md`` §4.2, item 4).

Data (``--data``, collect and select; every file is read and tokenized before the model is loaded):

* a ``.txt`` file is one document of a text corpus; another file (``.jsonl``/``.json``/``.parquet``/``.csv`` or
  a ``datasets`` directory) holds records: records whose :func:`~loki_kernels.data.detect_format` is ``text`` are
  corpus documents too (their ``text`` field), any other format (Alpaca, question/answer, ``messages``, ...) is
  instruction data;
* the corpus documents of all files, in the order given, are tokenized without special tokens and packed back
  to back into ``--seq-len`` rows (:func:`~loki_kernels.data.pack_text`, the original's packing); then each
  instruction record is one sequence (:func:`~loki_kernels.data.tokenize_records`: prompt and response in
  ``--template``, truncated at ``--seq-len``), in file order;
* ``--max-tokens``: at most that many tokens in all: whole corpus rows first, then records until the next one
  would pass it; the sequences are then cut into ``--batch-size`` batches, in order, each padded to its longest
  (:func:`~loki_kernels.data.batches`, right padding; the mask keeps pads out of the factors).

Where this differs from the original (``goodfire-ai/memorization_kfac``): its collection script streams a
Dolma shard listing up to ``--nbytes`` bytes of text and defaults to gold labels and batches of 32; here the
data is local, the budget is in tokens, the default is the MC Fisher (sampled labels, the original's
"typical usage" ``--sample_labels``) with the summed loss (``--normalize original``: its mean loss), batches
of 8. Its ``eval_mem_kfac.py`` edits, evaluates and saves a state dict in one run; here ``edit`` saves a model
directory that ``loki eval`` (and anything else) loads. ``select`` has no original.

A mistake (bad flag value, missing file, bad plan, factors that do not fit the model, an output that exists)
is one line, exit status 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
from pathlib import Path

from .cli import UserError, find_model_dir, load_model, no_progress_bars

__all__ = ["add_kfac_commands", "run_collect", "run_edit", "run_select", "EDIT_RECORD"]

EDIT_RECORD = "kfac_edit.json"  # written into the edited model's directory: plan, method, factor files, kept pairs


def add_kfac_commands(command) -> argparse.ArgumentParser:
    """Register ``loki kfac`` (``collect``, ``edit``, ``select``) through ``command(name, help)``, ``build_parser``'s.

    Returns the ``kfac`` parser. Each subcommand sets ``command`` to ``"kfac <name>"``, so ``loki``'s one-line
    errors read ``loki kfac collect: error: ...``.
    """
    from loki_kernels.data import TEMPLATES
    from loki_kernels.kfac import MODULES
    from loki_kernels.kfac.collect import FISHERS, NORMALIZATIONS
    from loki_kernels.kfac.edit import METHODS, SKIP_RHO

    from .constants import TORCH_DTYPES
    from .real_models import REAL_MODELS

    kfac = command("kfac", "the K-FAC curvature edit: collect factors, edit a model with them, or select LoKI rows")
    sub = kfac.add_subparsers(dest="kfac_command", required=True, metavar="{collect,edit,select}")

    def subcommand(name, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=kfac.formatter_class)
        p.set_defaults(command=f"kfac {name}")
        return p

    model_help = f"local model directory (with its tokenizer), or {', '.join(REAL_MODELS)} (as for analyse)"

    def data_options(p):
        p.add_argument("--data", type=Path, nargs="+", required=True,
                       help="data files, in order: .txt is one corpus document; records (.jsonl/.json/.parquet/"
                            ".csv or a datasets directory) whose format (loki_kernels.data.detect_format) is text "
                            "are corpus documents, any other format (alpaca, question/answer, messages, ...) gives "
                            "one sequence per record (prompt + response in --template, cut at --seq-len); corpus "
                            "text is packed back to back into --seq-len rows and comes first")
        p.add_argument("--seq-len", type=int, default=512, help="tokens per packed corpus row, and at most per record")
        p.add_argument("--batch-size", type=int, default=8, help="sequences per forward and backward pass")
        p.add_argument("--max-tokens", type=int, default=None,
                       help="at most this many tokens in all (whole corpus rows first, then records); none: all")
        p.add_argument("--template", default="auto", choices=TEMPLATES,
                       help="prompt format of instruction records (auto: the tokenizer's chat template, else basic)")
        p.add_argument("--fisher", default="mc", choices=FISHERS,
                       help="mc: labels sampled from the model (the true Fisher, the original's --sample_labels); "
                            "empirical: the data's next tokens")
        p.add_argument("--seed", type=int, default=0, help="of the sampled labels (--fisher mc)")

    def model_options(p):
        p.add_argument("--torch-dtype", default="auto", choices=TORCH_DTYPES, help="of the model")
        p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")

    p = subcommand("collect", "K-FAC factors (A = E[a a^T], G = E[g g^T]) of MLP projections, to a safetensors file")
    p.add_argument("--model-path", required=True, help=model_help)
    p.add_argument("--layers", type=int, nargs="+", required=True, help="decoder layers to collect, e.g. 23 24 25")
    p.add_argument("--output", type=Path, required=True, help="factor file to write (.safetensors)")
    p.add_argument("--modules", nargs="+", default=None, choices=MODULES,
                   help="MLP projections (default: every one of gate, up, down the model has)")
    data_options(p)
    p.add_argument("--normalize", default="sum", choices=NORMALIZATIONS,
                   help="sum: summed loss, factors independent of the batching; original: the original's mean "
                        "loss per batch")
    model_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run_collect)

    p = subcommand("edit", "apply the K-FAC curvature edit to a model and save it (model and tokenizer)")
    p.add_argument("--model-path", required=True, help=model_help)
    p.add_argument("--factors", type=Path, nargs="+", required=True,
                   help="factor files: ours (.safetensors, from kfac collect) and/or the original's "
                        "kfac_factors_blk_*.pt (any other suffix); several are merged")
    p.add_argument("--plan", required=True,
                   help='rho per layer and module, JSON text or a JSON file: {"23": {"gate": 0.6, "up": 0.6}}; '
                        f"rho in [0, 1] is the fraction of curvature mass kept, >= {SKIP_RHO} leaves it untouched")
    p.add_argument("--save-dir", type=Path, required=True, help="output directory (new or empty)")
    p.add_argument("--method", default="product", choices=METHODS,
                   help="product: the paper's (eigenpairs ranked by lambda_i mu_j); per_factor: the original's "
                        "baseline (each factor truncated at its own rho)")
    p.add_argument("--ablate", action="store_true",
                   help="keep W - W' instead of W' (remove the top-curvature components; the fork's ablation)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="store edited weights here (keyed by weight, factors, rho, method) and reuse them")
    model_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save-dir")
    p.set_defaults(func=run_edit)

    p = subcommand("select", "pick trainable down_proj rows by K-FAC row curvature, to a position JSON")
    p.add_argument("--model-path", required=True, help=model_help)
    p.add_argument("--quota", type=float, required=True, help="percentage of rows to train, in (0, 100]")
    p.add_argument("--output", type=Path, required=True, help="position JSON to write: [[row, ...] per layer]")
    p.add_argument("--strategy", default="layer_lowest",
                   choices=("layer_lowest", "layer_highest", "global_lowest", "global_highest"),
                   help="layer_*: floor(H q / 100) rows of each layer; global_*: of all layers together; lowest: "
                        "the flattest rows (least interference with what the data exercises), highest: the sharpest")
    p.add_argument("--score", default="coupled", choices=("coupled", "diag"),
                   help="coupled: (1/n) sum_t g_t,o^2 |a_t|^2, the row's diagonal Fisher; diag: (1/n) sum_t "
                        "g_t,o^2, the K-FAC G diagonal")
    data_options(p)
    model_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run_select)
    return kfac


# ------------------------------------------------------------------------------------------- collect
def run_collect(args: argparse.Namespace) -> int:
    from loki_kernels.arch import find_mlps
    from loki_kernels.kfac import MODULES, collect_factors, save_factors

    _check_data_args(args)
    _check_output(args.output, args.overwrite)
    model_dir = find_model_dir(args.model_path)
    config = _config(model_dir)
    num_layers = _check_seq_len(config, args.seq_len)
    seen = set()
    for layer in args.layers:
        if not 0 <= layer < num_layers:
            raise UserError(f"--layers {layer}: the model has {num_layers} decoder layers (0-{num_layers - 1})")
        if layer in seen:
            raise UserError(f"--layers {layer} is listed twice")
        seen.add(layer)
    if args.modules is not None and len(set(args.modules)) != len(args.modules):
        raise UserError(f"--modules lists a module twice: {' '.join(args.modules)}")
    tokenizer = _tokenizer(model_dir, needed=True)
    data = _batches(args, tokenizer)

    model = load_model(model_dir, args)
    mlps = find_mlps(model)
    modules = args.modules or [m for m in MODULES if all(getattr(mlps[i], m) is not None for i in args.layers)]
    try:
        factors = collect_factors(model, data, layers=args.layers, modules=modules, fisher=args.fisher,
                                  seed=args.seed, normalize=args.normalize, progress=_progress())
    except ValueError as e:
        raise UserError(str(e)) from None
    factors.settings["data"] = [str(p) for p in args.data]
    factors.settings["model"] = str(args.model_path)
    with _parents_made(args.output):
        save_factors(factors, args.output)

    layers = factors.layers()
    tokens = factors.n_tokens[str(layers[0])]
    print(f"K-FAC factors of layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))} "
          f"({', '.join(factors.settings['modules'])}) over {tokens} tokens "
          f"({factors.settings['sequences']} sequences, {factors.settings['batches']} batches; fisher {args.fisher}, "
          f"normalize {args.normalize}) -> {args.output} ({_size(args.output.stat().st_size)})")
    return 0


# ---------------------------------------------------------------------------------------------- edit
def run_edit(args: argparse.Namespace) -> int:
    from loki_kernels.arch import find_mlps, linear_shape, model_dims
    from loki_kernels.kfac import apply_edit
    from loki_kernels.kfac.edit import SKIP_RHO

    from .model_utils import OutputDir

    model_dir = find_model_dir(args.model_path)
    output = OutputDir(args.save_dir, overwrite=args.overwrite, sources=(model_dir,))
    output.check()
    for path in args.factors:
        if not path.exists():
            raise UserError(f"--factors file not found: {path}")
    if args.cache_dir is not None and args.cache_dir.exists() and not args.cache_dir.is_dir():
        raise UserError(f"--cache-dir {args.cache_dir} exists and is not a directory")
    plan = _read_plan(args.plan)
    _, num_layers = model_dims(_config(model_dir))
    factors = _read_factors(args.factors)
    items = _check_plan(plan, factors, num_layers)
    if not any(rho < SKIP_RHO for _, _, rho in items):
        raise UserError(f"--plan edits nothing: every rho is at least {SKIP_RHO} (or the plan is empty)")
    tokenizer = _tokenizer(model_dir, needed=False)

    model = load_model(model_dir, args)
    try:
        done = apply_edit(model, factors, plan, method=args.method, complement=args.ablate,
                          cache_dir=args.cache_dir, progress=_progress())
    except KeyError as e:
        raise UserError(e.args[0] if e.args else str(e)) from None
    except ValueError as e:
        raise UserError(str(e)) from None

    mlps = find_mlps(model)
    rows, record = [], []
    for layer, module, rho in items:
        projection = getattr(mlps[layer], module)
        pairs = None if projection is None else math.prod(linear_shape(projection.module))
        entry = {"layer": layer, "module": module, "rho": rho, "pairs": pairs}
        if (layer, module) in done.kept:
            entry["kept"] = done.kept[layer, module]
            entry["from_cache"] = (layer, module) in done.loaded
            share = entry["kept"] / entry["pairs"]
            note = f"kept {entry['kept']} of {entry['pairs']} pairs ({100 * share:.2f}%)"
            if args.ablate:
                note += ", removed from the weight (--ablate)"
            if entry["from_cache"]:
                note += ", from --cache-dir"
        else:
            note = f"untouched (rho >= {SKIP_RHO})"
        record.append(entry)
        rows.append((f"layer {layer} {module}", f"rho {rho:g}", note))

    with output as tmp, no_progress_bars(args):
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        info = {"model": str(args.model_path), "factors": [str(p) for p in args.factors], "plan": plan,
                "method": args.method, "ablate": args.ablate, "projections": record}
        (tmp / EDIT_RECORD).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    width = max(len(r[0]) for r in rows)
    for name, rho, note in rows:
        print(f"{name:<{width}}  {rho:<9}  {note}")
    print(f"K-FAC edited model ({args.method}{', ablated' if args.ablate else ''}) saved to {args.save_dir}"
          + ("" if tokenizer is not None else f" (no tokenizer in {model_dir}: model only)"))
    return 0


def _read_plan(value: str) -> dict:
    """``--plan``: a JSON file's content, or the text itself; a JSON object without repeated keys."""
    path = Path(value)
    try:
        is_file = path.is_file()
    except OSError:  # JSON text longer than a file name may be
        is_file = False
    source = f"--plan {value}" if is_file else "--plan"
    text = value
    if is_file:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{source}: cannot be read ({e})") from None
    elif value.lstrip()[:1] not in ("{", "["):
        raise UserError(f"--plan {value}: no such file, and not JSON text (a {{layer: {{module: rho}}}} object)")

    def no_repeats(pairs):
        keys = [k for k, _ in pairs]
        repeated = next((k for k in keys if keys.count(k) > 1), None)
        if repeated is not None:
            raise UserError(f"{source}: key {repeated!r} appears twice")
        return dict(pairs)

    try:
        plan = json.loads(text, object_pairs_hook=no_repeats)
    except json.JSONDecodeError as e:
        raise UserError(f"{source} is not valid JSON ({e})") from None
    if not isinstance(plan, dict):
        raise UserError(f"--plan must be a JSON object {{layer: {{module: rho}}}}, got {type(plan).__name__}")
    return plan


def _check_plan(plan: dict, factors, num_layers: int) -> list[tuple[int, str, float]]:
    """``(layer, module, rho)`` of every plan entry, checked against the model's layer count and the factors.

    The same rules as :func:`~loki_kernels.kfac.apply_edit` (which checks again, with the model), here
    before the model is loaded, with the factor files named.
    """
    from loki_kernels.kfac import MODULES
    from loki_kernels.kfac.edit import SKIP_RHO

    have = {f"{layer}.{module}" for layer, module in factors.modules()}
    items, seen = [], set()
    for key, modules in plan.items():
        if not key.strip().lstrip("-").isdigit():
            raise UserError(f"--plan key {key!r} is not a layer number")
        layer = int(key)
        if not 0 <= layer < num_layers:
            raise UserError(f"--plan layer {key}: the model has {num_layers} decoder layers (0-{num_layers - 1})")
        if layer in seen:
            raise UserError(f"--plan names layer {layer} twice")
        seen.add(layer)
        if not isinstance(modules, dict):
            raise UserError(f"--plan layer {key}: expected {{module: rho}}, got {json.dumps(modules)}")
        for module, rho in modules.items():
            if module not in MODULES:
                raise UserError(f"--plan layer {key}: unknown module {module!r}; expected one of {', '.join(MODULES)}")
            if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= rho <= 1:
                raise UserError(f"--plan layer {key} {module}: rho must be a number in [0, 1], got {json.dumps(rho)}")
            if rho < SKIP_RHO and f"{layer}.{module}" not in have:
                raise UserError(f"--plan layer {layer} {module}: no K-FAC factors for it in --factors (they hold: "
                                f"{', '.join(sorted(have, key=_key_order)) or 'none'})")
            items.append((layer, module, float(rho)))
    return sorted(items, key=lambda t: (t[0], MODULES.index(t[1])))


def _key_order(key: str):
    from loki_kernels.kfac import MODULES

    layer, module = key.split(".")
    return int(layer), MODULES.index(module)


def _read_factors(paths: list[Path]):
    """Every ``--factors`` file in one :class:`~loki_kernels.kfac.Factors`: ours (``.safetensors``) one by one,
    the original's (any other suffix) together; a factor found in two files is an error."""
    from loki_kernels.kfac import Factors, load_factors, load_original_factors

    ours = [p for p in paths if p.suffix.lower() == ".safetensors"]
    original = [p for p in paths if p.suffix.lower() != ".safetensors"]
    parts = [(str(p), load_factors(p)) for p in ours]
    if original:
        parts.append((", ".join(map(str, original)), load_original_factors(original)))
    if len(parts) == 1:
        return parts[0][1]
    merged = Factors(settings={"files": [str(p) for p in paths]})
    source: dict[str, str] = {}
    for name, part in parts:
        for kind in ("A", "G"):
            for key, tensor in getattr(part, kind).items():
                if f"{kind}.{key}" in source:
                    raise UserError(f"--factors: {kind} of {key} is in {source[f'{kind}.{key}']} and in {name}")
                source[f"{kind}.{key}"] = name
                getattr(merged, kind)[key] = tensor
        for layer, count in part.n_tokens.items():
            merged.n_tokens.setdefault(layer, count)
    return merged


# -------------------------------------------------------------------------------------------- select
def run_select(args: argparse.Namespace) -> int:
    import torch

    from loki_kernels.arch import model_dims
    from loki_kernels.kfac import row_scores
    from loki_kernels.selection import target_pos_from_scores
    from loki_kernels.target_pos import save_target_pos

    if not (math.isfinite(args.quota) and 0 < args.quota <= 100):
        raise UserError(f"--quota must be in (0, 100], got {args.quota:g}")
    _check_data_args(args)
    _check_output(args.output, args.overwrite)
    model_dir = find_model_dir(args.model_path)
    config = _config(model_dir)
    _check_seq_len(config, args.seq_len)
    hidden, num_layers = model_dims(config)
    try:  # the quota and strategy against the model's shape, before the pass (the scores' values do not matter)
        target_pos_from_scores(torch.zeros(num_layers, hidden), args.quota, args.strategy)
    except ValueError as e:
        raise UserError(f"--quota {args.quota:g}: {e}") from None
    tokenizer = _tokenizer(model_dir, needed=True)
    data = _batches(args, tokenizer)

    model = load_model(model_dir, args)
    try:
        scores = row_scores(model, data, fisher=args.fisher, seed=args.seed, progress=_progress())
    except ValueError as e:
        raise UserError(str(e)) from None
    values = scores.coupled if args.score == "coupled" else scores.diag_g
    target_pos = target_pos_from_scores(values, args.quota, args.strategy)
    save_target_pos(target_pos, args.output)
    print(f"selected {sum(map(len, target_pos))} rows across {len(target_pos)} layers ({args.strategy}, "
          f"q={args.quota:g}%, {args.score} K-FAC row curvature over {scores.n_tokens} tokens, fisher {args.fisher})"
          f" -> {args.output}")
    return 0


# ---------------------------------------------------------------------------------------------- data
def _check_data_args(args: argparse.Namespace) -> None:
    for flag, value in (("--batch-size", args.batch_size), ("--max-tokens", args.max_tokens)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    if args.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 (a token and the next one), got {args.seq_len}")
    if args.seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {args.seed}")
    for path in args.data:
        if not path.exists():
            raise UserError(f"--data file not found: {path}")


def _batches(args: argparse.Namespace, tokenizer) -> list[dict]:
    """The ``--data`` files as padded batches (module docstring: corpus rows first, then records)."""
    from loki_kernels.data import batches, detect_format, pack_text, read_records, read_texts, tokenize_records

    progress = _progress()
    texts, text_files, record_files = [], [], []
    for path in args.data:
        if path.suffix.lower() == ".txt":
            texts += read_texts(path)
            text_files.append(path)
            continue
        records = read_records(path)
        try:
            fmt = detect_format(records)
        except ValueError as e:
            raise UserError(f"--data {path}: {e}") from None
        if fmt.name == "text":
            texts += read_texts(path)
            text_files.append(path)
        else:
            record_files.append((path, records, fmt))

    sequences: list = []
    budget = args.max_tokens
    if texts:
        try:
            rows = pack_text(texts, tokenizer, args.seq_len, args.max_tokens, progress=progress)
        except ValueError as e:
            raise UserError(f"--data {', '.join(map(str, text_files))}: {e}") from None
        sequences += list(rows)
        if budget is not None:
            budget -= rows.numel()
    for path, records, fmt in record_files:
        try:
            ids = tokenize_records(records, tokenizer, template=args.template, max_length=args.seq_len, fmt=fmt,
                                   progress=progress)
        except ValueError as e:
            raise UserError(f"--data {path}: {e}") from None
        for seq in ids:
            if budget is not None and len(seq) > budget:
                budget = 0
                break
            sequences.append(seq)
            if budget is not None:
                budget -= len(seq)
        if budget == 0:
            break
    if not sequences:
        raise UserError(f"--max-tokens {args.max_tokens} holds no whole sequence of --data")
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    return batches(sequences, args.batch_size, pad)


# --------------------------------------------------------------------------------------------- model
def _config(model_dir: Path):
    from .model_utils import load_config

    return load_config(model_dir)  # a ValueError naming the model when it has no readable config


def _check_seq_len(config, seq_len: int) -> int:
    """The model's layer count, after checking that ``seq_len`` fits its positions."""
    from loki_kernels.arch import max_positions, model_dims

    longest = max_positions(config)
    if longest is not None and seq_len > longest:
        raise UserError(f"--seq-len {seq_len} is longer than the model's {longest} positions")
    return model_dims(config)[1]


def _tokenizer(model_dir: Path, needed: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError, KeyError) as e:
        if not needed:
            return None
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{model_dir}: no tokenizer to read --data with ({message})") from None


# --------------------------------------------------------------------------------------------- files
def _check_output(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise UserError(f"--output {path} is a directory")
    if path.exists() and not overwrite:
        raise UserError(f"--output {path} exists; pass --overwrite to replace it")


@contextlib.contextmanager
def _parents_made(path: Path):
    """Make ``path``'s missing parent directories; remove them again if the ``with`` block fails."""
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    for directory in reversed(made):
        directory.mkdir()
    try:
        yield
    except BaseException:
        if made:
            shutil.rmtree(made[-1], ignore_errors=True)  # the highest one made holds the others
        raise


def _progress() -> bool:
    """Progress bars on a terminal only: anywhere else stderr holds nothing but a possible error line."""
    return sys.stderr.isatty()


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
