"""The ``loki`` command: one subcommand per phase of the LoKI workflow.

The original project's subcommands and flags are kept (``select-nodes``, ``create-model``,
``restore-model``); ``analyse`` runs the KVA engine and ``demo`` the whole pipeline on a tiny model. A user mistake prints one line
(``loki: error: ...``) and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .constants import DEFAULT_IG_STEPS, DEFAULT_STRATEGY

logger = logging.getLogger("loki.cli")

STRATEGIES = ("layer_balanced", "global_lowest", "global_highest")
DTYPES = ("float32", "float16", "bfloat16", "auto")
METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


class UserError(Exception):
    """A mistake in the command line or its input files: reported in one line, exit status 2."""


def _dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    return path


# ------------------------------------------------------------------------------------------ commands
def run_select_nodes(args: argparse.Namespace) -> int:
    from loki_kernels.positions import save_positions
    from loki_kernels.selection import select_positions

    if not 0 < args.quota <= 100:
        raise UserError(f"--quota must be in (0, 100], got {args.quota}")
    hdf5_path = _existing(args.hdf5_path, "HDF5 file")
    output_dir = args.output_dir or Path("kva_result/pos_json") / hdf5_path.parent.name
    name = args.output_name or (
        f"{int(args.quota)}.json" if args.strategy == "layer_balanced" else f"{args.strategy}_{int(args.quota)}.json"
    )
    positions = select_positions(hdf5_path, args.quota, args.strategy, progress=True)
    output = output_dir / name
    save_positions(positions, output)
    total = sum(map(len, positions))
    print(f"selected {total} rows across {len(positions)} layers ({args.strategy}, q={args.quota:g}%) -> {output}")
    return 0


def run_create_model(args: argparse.Namespace) -> int:
    from .model_utils import create_loki_model, get_loki_classes

    _existing(args.target_pos_path, "target position file")
    config_cls, model_cls = get_loki_classes(args.model_type or args.model_name, args.trust_remote_code)
    create_loki_model(
        loki_model_class=model_cls,
        loki_config_cls=config_cls,
        model_name=args.model_name,
        target_pos_path=args.target_pos_path,
        save_dir=args.save_dir,
        torch_dtype=_dtype(args.torch_dtype),
        trust_remote_code=args.trust_remote_code,
    )
    print(f"LoKI model saved to {args.save_dir}")
    return 0


def run_restore_model(args: argparse.Namespace) -> int:
    from .model_utils import restore_loki_model

    _existing(args.model_path, "LoKI model")
    _existing(args.target_pos_path, "target position file")
    restore_loki_model(
        target_pos_path=args.target_pos_path,
        model_path=args.model_path,
        model_name=args.model_name,
        output_path=args.output_path,
        torch_dtype=_dtype(args.torch_dtype),
    )
    print(f"restored model saved to {args.output_path}")
    return 0


def run_analyse(args: argparse.Namespace) -> int:
    from .analyse import AnalyseArgs, run_analysis

    _existing(args.model_path, "model directory")
    _existing(args.data, "data file")
    output = run_analysis(AnalyseArgs(
        model_path=args.model_path, data=args.data, output=args.output_dir / args.result_file, dev_data=args.dev_data,
        shots=args.shots, max_samples_per_subset=args.max_samples_per_subset, steps=args.steps, method=args.method,
        semantics=args.semantics, batch_size=args.batch_size, dtype=args.dtype, torch_dtype=args.torch_dtype,
        max_batch_rows=args.max_batch_rows,
    ))
    print(f"attributions written to {output}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoArgs, run_demo

    if (args.model is None) != (args.data is None):
        raise UserError("--model and --data go together (a local model directory and a JSONL file)")
    if args.model is not None:
        _existing(args.model, "model directory")
        _existing(args.data, "data file")
    if not 0 < args.quota <= 100:
        raise UserError(f"--quota must be in (0, 100], got {args.quota}")
    run_demo(DemoArgs(seed=args.seed, quota=args.quota, out_dir=args.out_dir, implant_steps=args.steps,
                      model=args.model, data=args.data))
    return 0


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="loki", description="LoKI: low-damage knowledge implanting, on loki_kernels")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyse", help="KVA attributions over MMLU-format questions, streamed to HDF5 (resumable)")
    p.add_argument("--model-path", type=Path, required=True, help="local model directory")
    p.add_argument("--data", type=Path, required=True,
                   help="MMLU-format questions: .parquet/.json/.jsonl/.csv with question, choices, answer, subject")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--result-file", default="kva_mmlu.h5")
    p.add_argument("--dev-data", type=Path, default=None, help="few-shot examples (MMLU dev split), for --shots")
    p.add_argument("--shots", type=int, default=0, help="0 (zero-shot) or e.g. 5")
    p.add_argument("--max-samples-per-subset", type=int, default=None)
    p.add_argument("--steps", type=int, default=DEFAULT_IG_STEPS, help="integration steps")
    p.add_argument("--method", default="riemann_left", choices=METHODS)
    p.add_argument("--semantics", default="last_token", choices=("last_token", "captum"),
                   help="last_token: the paper's estimator; captum: the later Captum-based script's")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="of the stored attributions")
    p.add_argument("--torch-dtype", default="auto", choices=DTYPES, help="of the model")
    p.add_argument("--max-batch-rows", type=int, default=None, help="bound on (layer, step) rows per pass (memory)")
    p.set_defaults(func=run_analyse)

    p = sub.add_parser("select-nodes", help="pick trainable down_proj rows from a KVA attribution HDF5 file")
    p.add_argument("--hdf5-path", type=Path, required=True, help="attribution file (dataset 'dataset', [N, L, H])")
    p.add_argument("--quota", type=float, required=True, help="percentage of rows to train, in (0, 100]")
    p.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=STRATEGIES)
    p.add_argument("--output-dir", type=Path, default=None,
                   help="default: kva_result/pos_json/<name of the HDF5 file's directory>")
    p.add_argument("--output-name", default=None, help="default: {quota}.json, or {strategy}_{quota}.json")
    p.set_defaults(func=run_select_nodes)

    p = sub.add_parser("create-model", help="write a LoKI model directory (loads with trust_remote_code=True)")
    p.add_argument("--model-name", required=True, help="pretrained model name or local path")
    p.add_argument("--target-pos-path", type=Path, required=True, help="position JSON: [[row, ...] per layer]")
    p.add_argument("--save-dir", type=Path, required=True)
    p.add_argument("--model-type", default=None, help="architecture (llama, qwen2, ...); inferred when omitted")
    p.add_argument("--torch-dtype", default="auto", choices=DTYPES)
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=run_create_model)

    p = sub.add_parser("restore-model", help="merge a trained LoKI model back into a plain checkpoint")
    p.add_argument("--model-path", type=Path, required=True, help="trained LoKI model directory")
    p.add_argument("--target-pos-path", type=Path, required=True)
    p.add_argument("--output-path", type=Path, required=True)
    p.add_argument("--model-name", required=True, help="the base model the LoKI model was created from")
    p.add_argument("--torch-dtype", default="auto", choices=DTYPES)
    p.set_defaults(func=run_restore_model)

    p = sub.add_parser("demo", help="the whole pipeline on a built-in tiny model (CPU, a few minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quota", type=float, default=10.0, help="percentage of down_proj rows to train")
    p.add_argument("--steps", type=int, default=600, help="implant steps for every method")
    p.add_argument("--out-dir", type=Path, default=Path("loki_demo"), help="where the table, JSON and PNG go")
    p.add_argument("--model", type=Path, default=None, help="a local causal LM directory instead of the tiny model")
    p.add_argument("--data", type=Path, default=None,
                   help='JSONL of {"prompt", "answer", "split": "old"|"new"} records (with --model)')
    p.set_defaults(func=run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (UserError, ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, PermissionError) as e:
        print(f"loki {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loki {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
