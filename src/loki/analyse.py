"""``loki analyse``: KVA attributions of a model over MMLU-format questions, streamed to HDF5.

Reads MMLU-format records (``question``, ``choices``, ``answer``, ``subject``) from a local parquet,
JSON, JSONL or CSV file (or a ``datasets`` dataset already on disk), builds the original chat prompt
(zero-shot, or 5-shot with ``dev`` examples as user/assistant turns), runs
:func:`loki_kernels.kva.attribute` on batches, and appends one ``[L, H]`` row per sample to the HDF5
dataset ``"dataset"`` in sample order.

* Resume: run the same command again; samples already in the file are skipped, none is duplicated.
* Data parallel: under ``torchrun`` or ``accelerate launch`` every rank takes one contiguous block of
  samples and writes its own part file; rank 0 then merges the parts in rank order into the one output
  file (the original wrote only rank 0's samples).
* Differences from the original script: prompts are left-padded inside the engine, so the attribution
  target is each prompt's own last token (the original right-padded batches and attributed pad
  positions); results are float32 unless ``--dtype float16`` is asked for.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .constants import DEFAULT_IG_STEPS

logger = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"


# ----------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices


def _read_table(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else data.get("data", data.get("rows", []))
    if suffix in (".csv", ".parquet"):
        import pandas as pd

        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
        return frame.to_dict("records")
    if path.is_dir():  # a datasets.Dataset saved with save_to_disk
        from datasets import load_from_disk

        return list(load_from_disk(str(path)))
    raise ValueError(f"{path}: unsupported data file (use .parquet, .json, .jsonl, .csv or a datasets directory)")


def _question(record: dict, where: str) -> Question:
    try:
        choices = record["choices"]
        if isinstance(choices, str):  # CSV cells hold the list as JSON text
            choices = json.loads(choices)
        answer = record["answer"]
        if isinstance(answer, str):
            answer = LETTERS.index(answer.strip().upper()) if not answer.strip().isdigit() else int(answer)
        q = Question(str(record.get("subject", "general")), str(record["question"]), tuple(map(str, choices)), int(answer))
    except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: expected question, choices, answer (and subject) fields: {e!r}") from None
    if not 0 <= q.answer < len(q.choices):
        raise ValueError(f"{where}: answer {q.answer} is not a valid choice index for {len(q.choices)} choices")
    return q


def load_questions(source: os.PathLike | str, max_samples_per_subset: Optional[int] = None) -> list[Question]:
    """MMLU-format questions in file order; at most ``max_samples_per_subset`` per subject (the first ones)."""
    path = Path(source)
    if not path.exists():
        raise ValueError(f"data file {path} does not exist")
    questions, per_subject = [], {}
    for i, record in enumerate(_read_table(path)):
        q = _question(record, f"{path} record {i}")
        count = per_subject.get(q.subject, 0)
        if max_samples_per_subset is None or count < max_samples_per_subset:
            questions.append(q)
            per_subject[q.subject] = count + 1
    if not questions:
        raise ValueError(f"{path}: no questions found")
    return questions


def user_turn(q: Question) -> str:
    """The original project's user message."""
    subject = q.subject.replace("_", " ").title()
    choices = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices))
    return (f"There is a single choice question about {subject}. Answer the question by replying A, B, C or D.\n"
            f"Question: {q.question}\nChoices:\n{choices}\nAnswer: \n")


def conversation(q: Question, shots: Sequence[Question] = ()) -> list[dict]:
    """Chat messages: optional few-shot examples as user/assistant turns, then the question."""
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": user_turn(shot)}, {"role": "assistant", "content": LETTERS[shot.answer]}]
    return messages + [{"role": "user", "content": user_turn(q)}]


def prompt_ids(tokenizer, q: Question, shots: Sequence[Question] = ()) -> list[int]:
    messages = conversation(q, shots)
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return tokenizer(text).input_ids


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = torch.tensor(r)
        mask[i, length - len(r):] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------- run
@dataclass
class AnalyseArgs:
    model_path: Path
    data: Path
    output: Path
    dev_data: Optional[Path] = None  # 5-shot examples per subject (MMLU's dev split)
    shots: int = 0
    max_samples_per_subset: Optional[int] = None
    steps: int = DEFAULT_IG_STEPS
    method: str = "riemann_left"
    semantics: str = "last_token"
    batch_size: int = 4
    dtype: str = "float32"  # of the stored attributions
    torch_dtype: str = "auto"
    max_batch_rows: Optional[int] = None


def _dist():
    """(rank, world size, whether this call created the process group), initialising torch.distributed when
    launched by torchrun/accelerate."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, False
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), created


def _block(n: int, rank: int, world: int) -> range:
    per = -(-n // world)
    return range(min(rank * per, n), min((rank + 1) * per, n))


# What must match for a file to be continued: a run with other settings would mix incomparable rows.
_RESUME_KEYS = ("model_name", "num_layers", "hidden_size", "ig_steps", "ig_method", "semantics", "dataset", "shots",
                "num_samples", "world_size")


def _check_resumable(path: Path, metadata: dict) -> None:
    if not path.exists():
        return
    from loki_kernels.formats import read_metadata

    stored = read_metadata(path)
    for key in _RESUME_KEYS:
        if key in stored and str(stored[key]) != str(metadata[key]):
            raise ValueError(f"cannot resume {path}: it was written with {key}={stored[key]!r}, this run has "
                             f"{key}={metadata[key]!r}; use another --output-dir/--result-file or delete the file")


def _complete(path: Path, num_samples: int) -> bool:
    if not path.exists():
        return False
    from loki_kernels.formats import open_attributions

    with open_attributions(path) as dset:
        return dset.shape[0] == num_samples


def run_analysis(args: AnalyseArgs, model=None, tokenizer=None) -> Path:
    """Attribute every question and write ``args.output``; returns its path. Safe to re-run (resumes)."""
    from loki_kernels import kva
    from loki_kernels.formats import AttributionWriter, merge_attribution_files

    questions = load_questions(args.data, args.max_samples_per_subset)
    shots_by_subject: dict[str, list[Question]] = {}
    if args.shots:
        if args.dev_data is None:
            raise ValueError("--shots needs --dev-data (MMLU's dev split)")
        for q in load_questions(args.dev_data):
            shots_by_subject.setdefault(q.subject, []).append(q)

    rank, world, own_group = _dist()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if model is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = "auto" if args.torch_dtype == "auto" else getattr(torch, args.torch_dtype)
        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    from loki_kernels import find_down_projs
    from loki_kernels.patching import _shape

    projs = find_down_projs(model)
    num_layers, hidden = len(projs), _shape(projs[0].module)[1]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    metadata = dict(model_name=str(args.model_path), model_type=getattr(model.config, "model_type", "unknown"),
                    num_layers=num_layers, hidden_size=hidden, ig_steps=args.steps, ig_method=args.method,
                    semantics=args.semantics, dataset=str(args.data), shots=args.shots,
                    num_samples=len(questions), batch_size=args.batch_size, world_size=world)

    output = Path(args.output)
    if world > 1 and _complete(output, len(questions)):
        _check_resumable(output, metadata)
        return output  # an earlier data-parallel run already merged every sample
    target = output if world == 1 else output.with_name(f"{output.stem}.part{rank}-of-{world}{output.suffix}")
    mine = _block(len(questions), rank, world)
    output.parent.mkdir(parents=True, exist_ok=True)
    _check_resumable(target, metadata)
    with AttributionWriter(target, num_layers, hidden, dtype=args.dtype, metadata=metadata, resume=True) as writer:
        done = writer.num_samples
        if done > len(mine):
            raise ValueError(f"{target} already holds {done} samples, more than the {len(mine)} this run assigns to it")
        todo = list(mine)[done:]
        bar = tqdm(total=len(mine), initial=done, desc=f"KVA rank {rank}" if world > 1 else "KVA", unit="sample")
        for start in range(0, len(todo), args.batch_size):
            batch = [questions[i] for i in todo[start:start + args.batch_size]]
            rows = [prompt_ids(tokenizer, q, shots_by_subject.get(q.subject, [])[: args.shots]) for q in batch]
            ids, mask = left_pad(rows, pad_id)
            scores = kva.attribute(model, ids.to(device), mask.to(device), steps=args.steps, method=args.method,
                                   semantics=args.semantics, max_batch_rows=args.max_batch_rows)
            writer.append(scores.float().cpu())
            bar.update(len(batch))
        bar.close()

    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if rank == 0:
            parts = [output.with_name(f"{output.stem}.part{r}-of-{world}{output.suffix}") for r in range(world)]
            merge_attribution_files(parts, output, overwrite=True)
            for part in parts:
                part.unlink()
        dist.barrier()
        if own_group:
            dist.destroy_process_group()
    return output
