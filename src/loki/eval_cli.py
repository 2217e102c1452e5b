"""``loki eval``: memorisation, nDCG@k and perplexity of a model on local files (:mod:`loki_kernels.metrics`).

The K-FAC edit's evaluation (Merullo et al. 2025). nDCG compares the model's next-token rankings with the
**unedited** model's, so its baseline is made once from the base model and then read for every edited one::

    loki eval --model-path base/   --ndcg pile.txt --write-ndcg-baseline base.ndcg.safetensors
    loki eval --model-path edited/ --ndcg pile.txt --ndcg-baseline base.ndcg.safetensors \\
              --memorization windows.jsonl --perplexity pile.txt --output edited.json

A baseline made for other tokens (another corpus, ``--seq-len`` or ``--max-tokens``) or another ``--ndcg-k``
is refused; a model without one is never scored against itself (the original's silent nDCG of 1.0).

Inputs: ``--memorization`` is JSONL of ``prefix_ids``/``suffix_ids`` windows or ``prefix``/``target_suffix`` text
(the original's two sets); ``--ndcg`` and ``--perplexity`` are text corpora (``.txt``, or JSONL/JSON/... records
with a ``text`` field), tokenized without special tokens and packed back to back into ``--seq-len`` rows from
the first ``--max-tokens`` tokens (:func:`loki_kernels.data.pack_text`; the original tokenized its ``.txt``
line by line). Everything is read and checked before the model is loaded; a mistake is one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from loki_kernels.files import write_text_atomic

from .cli import UserError, find_model_dir, load_model

__all__ = ["add_eval_command", "run_eval"]


def add_eval_command(command) -> argparse.ArgumentParser:
    """Register ``loki eval`` through ``command(name, help)`` (``build_parser``'s; returns the subparser)."""
    from loki_kernels.metrics import DEFAULT_LOOSE

    from .constants import TORCH_DTYPES
    from .real_models import REAL_MODELS

    p = command("eval", "memorisation, nDCG@k and perplexity of a model on local files (the K-FAC edit's metrics)")
    p.add_argument("--model-path", required=True,
                   help=f"local model directory (with its tokenizer), or {', '.join(REAL_MODELS)} (as for analyse)")
    p.add_argument("--memorization", type=Path, default=None,
                   help="JSONL windows: prefix_ids + suffix_ids (token ids), or prefix + target_suffix (text)")
    p.add_argument("--loose", type=float, default=DEFAULT_LOOSE,
                   help="loose_acc counts a window whose similarity 1 - d/L is at least this")
    p.add_argument("--ndcg", type=Path, default=None, help="text corpus for nDCG@k (.txt, or records with 'text')")
    p.add_argument("--ndcg-baseline", type=Path, default=None,
                   help="score nDCG against this baseline (made with --write-ndcg-baseline on the unedited model)")
    p.add_argument("--write-ndcg-baseline", type=Path, default=None, metavar="PATH",
                   help="write this model's top-k rankings on --ndcg as the baseline, instead of scoring nDCG; "
                        "run it on the unedited model")
    p.add_argument("--ndcg-k", type=int, default=10, help="k of nDCG@k")
    p.add_argument("--perplexity", type=Path, default=None,
                   help="text corpus for perplexity (.txt, or records with 'text')")
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows (windows) per forward pass; also the batch of the original's mean-of-batches perplexity")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per row of the text corpora")
    p.add_argument("--max-tokens", type=int, default=200_000, help="tokens read from each text corpus")
    p.add_argument("--torch-dtype", default="auto", choices=TORCH_DTYPES, help="of the model")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON here (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --write-ndcg-baseline file")
    p.set_defaults(func=run_eval)
    return p


# ------------------------------------------------------------------------------------------- checks
def _check_args(args: argparse.Namespace) -> None:
    if args.memorization is None and args.ndcg is None and args.perplexity is None:
        raise UserError("nothing to evaluate: pass --memorization, --ndcg and/or --perplexity")
    for name in ("batch_size", "ndcg_k"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.max_tokens < args.seq_len:
        raise UserError(f"--max-tokens ({args.max_tokens}) must be at least --seq-len ({args.seq_len})")
    if not (math.isfinite(args.loose) and 0 <= args.loose <= 1):
        raise UserError(f"--loose must be in [0, 1], got {args.loose:g}")
    if args.ndcg is not None:
        if (args.ndcg_baseline is None) == (args.write_ndcg_baseline is None):
            raise UserError("--ndcg needs exactly one of --ndcg-baseline PATH (score against the unedited model's "
                            "rankings) and --write-ndcg-baseline PATH (make them: run on the unedited model)")
    elif args.ndcg_baseline is not None or args.write_ndcg_baseline is not None:
        flag = "--ndcg-baseline" if args.ndcg_baseline is not None else "--write-ndcg-baseline"
        raise UserError(f"{flag} needs --ndcg (the text corpus the rankings are on)")
    for flag, path in (("--memorization", args.memorization), ("--ndcg", args.ndcg),
                       ("--perplexity", args.perplexity), ("--ndcg-baseline", args.ndcg_baseline)):
        if path is not None and not path.exists():
            raise UserError(f"{flag} file not found: {path}")
    target = args.write_ndcg_baseline
    if target is not None and target.exists() and not args.overwrite:
        raise UserError(f"--write-ndcg-baseline {target} exists; pass --overwrite to replace it")
    for flag, path in (("--write-ndcg-baseline", target), ("--output", args.output)):
        if path is not None and path.is_dir():
            raise UserError(f"{flag} {path} is a directory")


class _Tokenizer:
    """The model directory's tokenizer, loaded on first use (token-id windows alone need none)."""

    def __init__(self, model_dir: Path):
        self.model_dir, self.tokenizer, self.needed_for = model_dir, None, "text"

    def get(self, needed_for: str):
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            except (OSError, ValueError) as e:
                message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"{self.model_dir}: no tokenizer to read {needed_for} with ({message})") from None
        return self.tokenizer

    def __call__(self, text, **kwargs):  # what load_memorization_windows calls on a text window
        return self.get(self.needed_for)(text, **kwargs)


def _corpus(path: Path, tokenizer: _Tokenizer, args: argparse.Namespace, flag: str):
    from loki_kernels.data import pack_text, read_texts

    texts = read_texts(path)
    try:
        return pack_text(texts, tokenizer.get(f"{flag} {path}"), args.seq_len, args.max_tokens, progress=False)
    except ValueError as e:
        raise UserError(f"{flag} {path}: {e}") from None


def _windows(path: Path, tokenizer: _Tokenizer):
    from loki_kernels.metrics import load_memorization_windows

    tokenizer.needed_for = f"--memorization {path}"
    return load_memorization_windows(path, tokenizer)


# ---------------------------------------------------------------------------------------------- run
def run_eval(args: argparse.Namespace) -> int:
    _check_args(args)
    from loki_kernels import metrics

    model_dir = find_model_dir(args.model_path)
    tokenizer = _Tokenizer(model_dir)
    windows = None if args.memorization is None else _windows(args.memorization, tokenizer)
    ndcg_tokens = None if args.ndcg is None else _corpus(args.ndcg, tokenizer, args, "--ndcg")
    ppl_tokens = None if args.perplexity is None else _corpus(args.perplexity, tokenizer, args, "--perplexity")
    baseline = None
    if args.ndcg_baseline is not None:
        baseline = metrics.load_ndcg_baseline(args.ndcg_baseline)
        metrics.check_ndcg_baseline(baseline, ndcg_tokens, args.ndcg_k)

    model = load_model(model_dir, args)
    progress = sys.stderr.isatty()
    results: dict = {"model": str(args.model_path), "model_dir": str(model_dir),
                     "device": str(next(model.parameters()).device),
                     "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    rows = []
    if windows is not None:
        mem = metrics.memorization(model, windows, batch_size=args.batch_size, loose=args.loose, progress=progress)
        results["memorization"] = {"file": str(args.memorization), **mem.as_dict()}
        rows += [("memorisation strict_acc", f"{mem.strict_acc:.4f}", f"{mem.strict}/{mem.total} windows"),
                 ("memorisation loose_acc", f"{mem.loose_acc:.4f}",
                  f"{mem.loose}/{mem.total} with 1 - d/L >= {args.loose:g}"),
                 ("memorisation avg_levenshtein_norm", f"{mem.avg_levenshtein_norm:.4f}", "mean d/L")]
    if args.write_ndcg_baseline is not None:
        made = metrics.ndcg_baseline(model, ndcg_tokens, k=args.ndcg_k, batch_size=args.batch_size, progress=progress)
        metrics.save_ndcg_baseline(made, args.write_ndcg_baseline)
        results["ndcg_baseline_written"] = {"file": str(args.write_ndcg_baseline), "corpus": str(args.ndcg),
                                            "k": made.k, "positions": int(made.top_ids[..., 0].numel()),
                                            "model_hash": made.model_hash}
        rows.append((f"nDCG@{args.ndcg_k} baseline", "written", f"{made.top_ids[..., 0].numel()} positions -> "
                     f"{args.write_ndcg_baseline}"))
    if baseline is not None:
        value = metrics.ndcg(model, ndcg_tokens, baseline, k=args.ndcg_k, batch_size=args.batch_size,
                             progress=progress)
        same = metrics.model_hash(model) == baseline.model_hash
        results["ndcg"] = {"file": str(args.ndcg), "baseline": str(args.ndcg_baseline), "k": args.ndcg_k,
                           f"ndcg@{args.ndcg_k}": value, "positions": int(baseline.top_ids[..., 0].numel()),
                           "same_weights_as_baseline": same, "baseline_dtype": baseline.model_dtype}
        note = "this model is the baseline's (1 by construction)" if same else f"vs {args.ndcg_baseline}"
        if baseline.model_dtype != results["dtype"]:  # rounding alone then moves the ranking
            note += f" (baseline made in {baseline.model_dtype}, this model runs in {results['dtype']})"
        rows.append((f"nDCG@{args.ndcg_k}", f"{value:.4f}", note))
    if ppl_tokens is not None:
        ppl = metrics.perplexity(model, ppl_tokens, batch_size=args.batch_size, progress=progress)
        mean_batch = metrics.mean_batch_perplexity(model, ppl_tokens, batch_size=args.batch_size, progress=progress)
        results["perplexity"] = {"file": str(args.perplexity), "perplexity": ppl,
                                 "mean_batch_perplexity": mean_batch, "batch_size": args.batch_size,
                                 "rows": ppl_tokens.shape[0], "seq_len": ppl_tokens.shape[1]}
        predicted = ppl_tokens.shape[0] * (ppl_tokens.shape[1] - 1)
        rows += [("perplexity", f"{ppl:.4f}", f"exp(mean NLL) over {predicted} tokens"),
                 ("perplexity, original formula", f"{mean_batch:.4f}",
                  f"mean of per-batch exp(CE), batch {args.batch_size}")]
    _print_table(rows)
    if args.output is not None:
        _write_json(results, args.output)
        print(f"results written to {args.output}")
    return 0


def _print_table(rows) -> None:
    width = max(len(name) for name, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>{value_width}}  {note}")


def _write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(results, indent=2) + "\n")
