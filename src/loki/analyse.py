"""``loki analyse``: KVA attributions of a model over MMLU-format questions, streamed to HDF5.

Reads MMLU-format records (``question``, ``choices``, ``answer``, ``subject``) from a local parquet,
JSON, JSONL or CSV file (or a ``datasets`` dataset already on disk; the reading is
:func:`loki_kernels.data.read_table`'s), builds the original chat prompt
(zero-shot, or 5-shot with ``dev`` examples as user/assistant turns), runs
:func:`loki_kernels.kva.attribute` on batches, and appends one ``[L, H]`` row per sample to the HDF5
dataset ``"dataset"`` in sample order.

* Everything is checked before the model is loaded or a file is created: the arguments, every record of the
  data (a bad one is named, with what is wrong), and every prompt's length against the model's positions.
* Resume: run the same command again; samples already in the file are skipped, none is duplicated. The
  file remembers the settings and the *content* of the data files (SHA-256), so a changed data file or
  other settings are refused, while another spelling of the same path resumes. The rows already there are
  read back first, and the whole file again at the end: a damaged file is reported, never called written.
* One run per output: a lock of our own (``<output>.lock``, ``flock``) refuses a second run on the same file,
  also where HDF5's own file locking is switched off.
* Data parallel: under ``torchrun`` or ``accelerate launch`` every rank takes one contiguous block of
  samples and writes its own part file; rank 0 then concatenates the parts in rank order into the one
  output file (the original wrote only rank 0's samples).
* What is attributed (``--target``): ``predicted`` (default, the original's) the probability of the model's own
  top next token after the prompt; ``answer`` that of the correct choice's letter, as the token which, appended
  to the prompt, appends the bare letter to its text (:func:`answer_token`). The file stores the mode (metadata
  ``target``; a file without it was written as ``predicted``) and resume refuses another.
* Differences from the original script: prompts are left-padded inside the engine, so the attribution
  target is each prompt's own last token (the original right-padded batches and attributed pad
  positions); results are float32 unless ``--dtype float16`` is asked for.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from loki_kernels.data import read_table
from loki_kernels.files import FileLock
from loki_kernels.formats import STORAGE_DTYPES
from loki_kernels.kva import DEFAULT_METHOD, DEFAULT_STEPS, METHODS, SEMANTICS, quadrature

from .constants import TORCH_DTYPES

logger = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"
TARGETS = ("predicted", "answer")  # --target: the model's top next token, or the correct choice's letter


# ----------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices


def _parse_choices(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):  # CSV cells: JSON text, or a Python list literal as pandas writes it
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError, TypeError, RecursionError):
                raise ValueError(f"{where}: choices {value[:60]!r} is not a list") from None
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: choices must be a list of strings, got {type(value).__name__}")
    if not 2 <= len(value) <= len(LETTERS):
        raise ValueError(f"{where}: {len(value)} choices; between 2 and {len(LETTERS)} (A-{LETTERS[-1]}) are supported")
    return tuple(str(c) for c in value)


def _parse_answer(value, choices: tuple[str, ...], where: str) -> int:
    text = str(value).strip() if isinstance(value, str) else None
    if text is not None and len(text) == 1 and text.upper() in LETTERS:
        answer = LETTERS.index(text.upper())
    elif text is not None and text.lstrip("+-").isdigit():
        answer = int(text)
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        answer = int(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
            and float(value).is_integer():
        answer = int(value)  # pandas reads an integer column holding a missing value as float
    else:
        raise ValueError(f"{where}: answer {value!r} is neither a choice index nor a letter A-{LETTERS[-1]}")
    if not 0 <= answer < len(choices):
        raise ValueError(f"{where}: answer {value!r} is not a valid choice for {len(choices)} choices "
                         f"(0-{len(choices) - 1} or A-{LETTERS[len(choices) - 1]})")
    return answer


def _text(value, field: str, where: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip():
        raise ValueError(f"{where}: {field} is empty")
    return str(value)


def _question(record, where: str) -> Question:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with question, choices, answer (and subject), "
                         f"got {type(record).__name__}")
    missing = [k for k in ("question", "choices", "answer") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing field {', '.join(repr(k) for k in missing)} (expected question, "
                         f"choices, answer and subject)")
    choices = _parse_choices(record["choices"], where)
    subject = record.get("subject", "general")
    subject = "general" if subject is None or (isinstance(subject, float) and math.isnan(subject)) else str(subject)
    return Question(subject, _text(record["question"], "question", where), choices,
                    _parse_answer(record["answer"], choices, where))


def load_questions(source: os.PathLike | str, max_samples_per_subset: Optional[int] = None) -> list[Question]:
    """MMLU-format questions in file order; at most ``max_samples_per_subset`` per subject (the first ones).

    Any malformed record raises ``ValueError`` naming the file, the record and what is wrong.
    """
    path = Path(source)
    if not path.exists():
        raise ValueError(f"data file {path} does not exist")
    questions, per_subject = [], {}
    for i, record in enumerate(read_table(path, field="question")):  # each record is checked here
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
        messages += [{"role": "user", "content": user_turn(shot)},
                     {"role": "assistant", "content": LETTERS[shot.answer]}]
    return messages + [{"role": "user", "content": user_turn(q)}]


def prompt_ids(tokenizer, q: Question, shots: Sequence[Question] = ()) -> list[int]:
    messages = conversation(q, shots)
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(_plain_prompt(messages)).input_ids


def _plain_prompt(messages: list[dict]) -> str:
    """The prompt text for a tokenizer without a chat template."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def answer_token(tokenizer, q: Question, shots: Sequence[Question] = (), prompt: Optional[list[int]] = None) -> int:
    """The token id of ``q``'s correct choice letter as the model would produce it right after :func:`prompt_ids`.

    That is the token which, appended to the prompt's ids, appends exactly the bare letter (``"A"``, ``"B"``, ...)
    to the prompt's decoded text: the prompt already ends where the answer goes (after the chat template's
    generation prompt, or after ``"assistant: "`` without a template), and a few-shot example's answer is the bare
    letter too. The first of these that does so is taken:

    1. the token that follows the prompt's ids when the prompt's text followed by the letter is tokenized the way
       :func:`prompt_ids` tokenizes it (a chat template's generation prompt usually ends with a newline or a
       special token, so this is the letter's token in context);
    2. the letter tokenized alone (where 1 fails because the letter merges with the prompt's trailing space, as
       byte-level BPE does with ``"assistant: "`` + ``"B"`` -> ``"ĠB"``);
    3. the vocabulary's token spelled exactly as the letter (SentencePiece, which encodes a lone ``"B"`` as
       ``"▁B"``).

    ``ValueError`` (one line) where none does.
    """
    letter = LETTERS[q.answer]
    prompt = prompt_ids(tokenizer, q, shots) if prompt is None else list(prompt)
    messages = conversation(q, shots)
    candidates = []
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = list(tokenizer(text + letter, add_special_tokens=False).input_ids)
    else:
        ids = list(tokenizer(_plain_prompt(messages) + letter).input_ids)
    if len(ids) == len(prompt) + 1 and ids[:len(prompt)] == prompt:
        candidates.append(ids[-1])
    alone = list(tokenizer(letter, add_special_tokens=False).input_ids)
    if len(alone) == 1:
        candidates.append(alone[0])
    spelled = tokenizer.convert_tokens_to_ids(letter)
    if isinstance(spelled, int) and spelled != tokenizer.unk_token_id:
        candidates.append(spelled)

    def decode(tokens):
        return tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    before = decode(prompt)
    for token in dict.fromkeys(candidates):
        if decode(prompt + [token]) == before + letter:
            return token
    raise ValueError(f"no token of the tokenizer appends the answer {letter!r} to the prompt's text (tried "
                     f"{', '.join(repr(decode([t])) for t in dict.fromkeys(candidates)) or 'none'})")


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
    steps: int = DEFAULT_STEPS
    method: str = DEFAULT_METHOD
    semantics: str = "last_token"
    batch_size: int = 4
    dtype: str = "float32"  # of the stored attributions
    torch_dtype: str = "auto"
    max_batch_rows: Optional[int] = None
    target: str = "predicted"  # what is attributed: the model's top next token, or the correct answer's (TARGETS)

    def check(self) -> None:
        """Every setting, before anything is loaded or written (``ValueError`` naming the flag)."""
        _positive(self.batch_size, "--batch-size")
        if self.max_batch_rows is not None:
            _positive(self.max_batch_rows, "--max-batch-rows")
        if self.max_samples_per_subset is not None:
            _positive(self.max_samples_per_subset, "--max-samples-per-subset")
        if isinstance(self.shots, bool) or not isinstance(self.shots, int) or self.shots < 0:
            raise ValueError(f"--shots must be 0 or a positive integer, got {self.shots!r}")
        if self.shots and self.dev_data is None:
            raise ValueError("--shots needs --dev-data (MMLU's dev split)")
        choices = ((self.method, "--method", METHODS), (self.semantics, "--semantics", SEMANTICS),
                   (self.dtype, "--dtype", STORAGE_DTYPES), (self.torch_dtype, "--torch-dtype", TORCH_DTYPES),
                   (self.target, "--target", TARGETS))
        for value, name, allowed in choices:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        try:
            quadrature(self.method, self.steps)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--steps: {e}") from None
        for path, name in ((self.model_path, "--model-path"), (self.data, "--data"), (self.dev_data, "--dev-data")):
            if path is not None and not Path(path).exists():
                raise ValueError(f"{name} {path} does not exist")


def _positive(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


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


def content_sha256(path: Optional[os.PathLike]) -> str:
    """SHA-256 of a file's bytes (of every file, by relative name, for a directory); "" for no path."""
    if path is None:
        return ""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# What must match for a file to be continued: a run with other settings would mix incomparable rows.
# Paths are compared resolved and data files by content, so another spelling of the same file resumes.
_RESUME_KEYS = ("model_path", "num_layers", "hidden_size", "ig_steps", "ig_method", "semantics", "dataset_sha256",
                "dev_dataset_sha256", "shots", "max_samples_per_subset", "num_samples", "world_size", "target")
# What a file written before a key existed was written with (a key missing from the file is otherwise not compared).
_RESUME_DEFAULTS = {"target": "predicted"}


def _check_resumable(path: Path, metadata: dict) -> None:
    if not path.exists():
        return
    from loki_kernels.formats import read_metadata

    stored = {**_RESUME_DEFAULTS, **read_metadata(path)}
    for key in _RESUME_KEYS:
        if key in stored and str(stored[key]) != str(metadata[key]):
            if key.endswith("sha256"):
                flag = "--data" if key == "dataset_sha256" else "--dev-data"
                differs = f"the content of {flag} changed since it was written ({key} differs)"
            else:
                differs = f"it was written with {key}={stored[key]!r}, this run has {key}={metadata[key]!r}"
            raise ValueError(f"cannot resume {path}: {differs}; use another --output-dir/--result-file or delete "
                             f"the file")


def verify(path: Path, num_samples: Optional[int] = None, chunk_size: int = 64) -> int:
    """Read every sample back: the file opens, its rows read and are finite. Returns the row count.

    ``ValueError`` ("... is damaged") otherwise, or when it holds other than ``num_samples`` rows.
    """
    import numpy as np

    from loki_kernels.formats import open_attributions

    try:
        with open_attributions(path) as dset:
            rows = int(dset.shape[0])
            for start in range(0, rows, chunk_size):
                block = dset[start:start + chunk_size]
                if not np.isfinite(block).all():
                    bad = start + int(np.argwhere(~np.isfinite(block))[0][0])
                    raise ValueError(f"sample {bad} holds NaN/inf")
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:  # the last three: h5py on damaged metadata
        if "in use" in str(e):
            raise
        raise ValueError(f"{path} is damaged ({e}); delete it and run again") from None
    if num_samples is not None and rows != num_samples:
        raise ValueError(f"{path} is damaged: it holds {rows} samples, {num_samples} were written")
    return rows


def run_analysis(args: AnalyseArgs, model=None, tokenizer=None) -> Path:
    """Attribute every question and write ``args.output``; returns its path. Safe to re-run (resumes)."""
    from loki_kernels import kva
    from loki_kernels.arch import find_down_projs, max_positions, model_dims
    from loki_kernels.formats import AttributionWriter, concat_attribution_files

    args.check()
    questions = load_questions(args.data, args.max_samples_per_subset)
    shots_by_subject: dict[str, list[Question]] = {}
    if args.shots:
        for q in load_questions(args.dev_data):
            shots_by_subject.setdefault(q.subject, []).append(q)

    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    if model is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.model_path)
    else:
        config = model.config
    hidden, num_layers = model_dims(config)
    prompts = _prompts(questions, shots_by_subject, args.shots, tokenizer, max_positions(config))
    answers = _answers(questions, shots_by_subject, args.shots, tokenizer, prompts) if args.target == "answer" else None

    rank, world, own_group = _dist()
    metadata = dict(model_name=str(args.model_path), model_path=os.path.realpath(args.model_path),
                    model_type=getattr(config, "model_type", "unknown"), num_layers=num_layers, hidden_size=hidden,
                    ig_steps=args.steps, ig_method=args.method, semantics=args.semantics, dataset=str(args.data),
                    dataset_sha256=content_sha256(args.data),
                    dev_dataset_sha256=content_sha256(args.dev_data) if args.shots else "", shots=args.shots,
                    max_samples_per_subset=args.max_samples_per_subset, num_samples=len(questions),
                    batch_size=args.batch_size, world_size=world, target=args.target)
    output = Path(args.output)
    target = output if world == 1 else _part(output, rank, world)
    mine = _block(len(questions), rank, world)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(target):
            if world > 1 and output.exists():  # an earlier data-parallel run already concatenated every sample
                _check_resumable(output, metadata)
                if verify(output) == len(questions):
                    return output
            _check_resumable(target, metadata)
            done = verify(target) if target.exists() else 0
            if done > len(mine):
                raise ValueError(f"{target} already holds {done} samples, more than the {len(mine)} this run assigns "
                                 f"to it")
            todo = list(mine)[done:]
            if todo:
                if model is None:
                    model = _load_model(args)
                projs = find_down_projs(model)
                if (projs[0].out_features, len(projs)) != (hidden, num_layers):
                    raise ValueError(f"{args.model_path}: the model's down_proj layers do not match its config")
            device = next(model.parameters()).device if model is not None else torch.device("cpu")
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
            with AttributionWriter(target, num_layers, hidden, dtype=args.dtype, metadata=metadata,
                                   resume=True) as writer:
                bar = tqdm(total=len(mine), initial=done, desc=f"KVA rank {rank}" if world > 1 else "KVA",
                           unit="sample")
                for start in range(0, len(todo), args.batch_size):
                    batch = todo[start:start + args.batch_size]
                    ids, mask = left_pad([prompts[i] for i in batch], pad_id)
                    token = "argmax" if answers is None else torch.tensor([answers[i] for i in batch])
                    attributions = kva.attribute(model, ids.to(device), mask.to(device), steps=args.steps,
                                                 method=args.method, semantics=args.semantics, target=token,
                                                 max_batch_rows=args.max_batch_rows)
                    writer.append(attributions.float().cpu())
                    bar.update(len(batch))
                bar.close()
            if todo:  # what was there before was read back above
                verify(target, len(mine))
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
            if rank == 0:
                parts = [_part(output, r, world) for r in range(world)]
                with FileLock(output):
                    concat_attribution_files(parts, output, overwrite=True)
                    verify(output, len(questions))
                for part in parts:
                    part.unlink()
            dist.barrier()
    finally:
        if world > 1 and own_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    return output


def _part(output: Path, rank: int, world: int) -> Path:
    """The file one rank of a data-parallel run writes, before rank 0 concatenates them into ``output``."""
    return output.with_name(f"{output.stem}.part{rank}-of-{world}{output.suffix}")


def _prompts(questions, shots_by_subject, shots: int, tokenizer, positions: Optional[int]) -> list[list[int]]:
    """Every question's prompt ids; a prompt longer than the model's positions is an error naming it."""
    prompts = []
    for i, q in enumerate(questions):
        ids = prompt_ids(tokenizer, q, shots_by_subject.get(q.subject, [])[:shots])
        if positions is not None and len(ids) > positions:
            with_shots = f" with its {shots}-shot examples" if shots else ""
            raise ValueError(f"question {i} ({q.subject}) is {len(ids)} tokens long{with_shots}, more than the "
                             f"model's {positions} positions (max_position_embeddings)")
        prompts.append(ids)
    return prompts


def _answers(questions, shots_by_subject, shots: int, tokenizer, prompts) -> list[int]:
    """Every question's correct-answer token (:func:`answer_token`); one that has none is an error naming it."""
    answers = []
    for i, (q, prompt) in enumerate(zip(questions, prompts)):
        try:
            answers.append(answer_token(tokenizer, q, shots_by_subject.get(q.subject, [])[:shots], prompt))
        except ValueError as e:
            raise ValueError(f"--target answer: question {i} ({q.subject}): {e}") from None
    return answers


def _load_model(args: AnalyseArgs):
    from transformers import AutoModelForCausalLM

    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    dtype = "auto" if args.torch_dtype == "auto" else getattr(torch, args.torch_dtype)
    return AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype).to(device).eval()
