"""Local data files for the ICA templates, the K-FAC factors and evaluation: readers, FNSFT's formats, batching.

Everything here reads files on disk (nothing is downloaded) and returns plain Python records or token tensors:

* :func:`read_table` / :func:`read_records`: the rows of a ``.json``, ``.jsonl``, ``.parquet`` or ``.csv`` file, or
  of a ``datasets`` dataset saved with ``save_to_disk``. A JSON file may hold a list of records, an object holding
  one list of records (``{"data": [...]}``, ``{"train": [...]}``, as Hugging Face exports and ``load_dataset``'s
  ``field=`` read), an object of equal-length columns (``{"text": [...], ...}``, what ``load_dataset("json")``
  also reads) or any pandas ``to_json`` layout. Text is UTF-8. pandas (CSV; parquet, with pyarrow as the fallback)
  and ``datasets`` are imported only when such a file is read (the ``[data]`` extra). Malformed input is a
  one-line ``ValueError`` naming the file and the record (the line, for JSONL).
* :func:`detect_format`, :func:`standardize`, :func:`format_example`: FunctionalNetworksSFT's
  (``utils/dataset_utils.py``, ``DatasetFormatter`` and ``InstructionDataset``) format detection, conversion to
  instruction/response (or text), and prompt templates, with its exact strings.
* :func:`tokenize_records`, :func:`batches`: records to token ids (a chat template applied exactly once) and to the
  padded ``{"input_ids", "attention_mask"}`` batches that ``ica.build_templates`` and ``kfac.collect_factors`` take.
* :func:`read_texts`, :func:`pack_text`: plain-text corpora packed the way the K-FAC original packs its training
  text: documents tokenized without special tokens, back to back with no separator, cut into full rows.

Where FNSFT differs from what this module does (each also said where it happens):

* Chat templates: FNSFT renders the template to text and tokenizes that text with the tokenizer's special tokens,
  so a template that writes its own BOS (Llama 3, Gemma, Mistral) gets a second one. Here rendered chat text is
  tokenized with ``add_special_tokens=False``, as transformers' own ``apply_chat_template(tokenize=True)`` does.
* ``messages`` records under a chat template go through the template as the whole conversation (system turns and
  every turn in order). FNSFT first joins all user turns and all assistant turns with ``"\\n"`` into one
  instruction and one response; that is still what the non-chat templates (``alpaca``, ``chatml``, ``basic``) get.
* Detection always runs. FNSFT's template builder converts records only under ``--template_format auto``; with
  ``alpaca``/``chatml``/``basic``/``chat`` it feeds the raw records on, which must then already hold
  ``instruction`` + ``response`` or ``text``.
* A ``None``/missing Alpaca ``input`` or Dolly ``context`` counts as empty (FNSFT's ``item.get("input", "").strip()``
  raises on ``None`` and the record then fails).
* ``auto`` picks the chat template when the tokenizer's ``chat_template`` is non-empty (FNSFT: ``is not None``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = [
    "DataFormat", "FORMATS", "MESSAGES", "TEMPLATES", "BASIC_TEMPLATE", "DEFAULT_SYSTEM_PROMPT",
    "read_table", "read_records", "read_texts", "detect_format", "standardize", "format_example", "chat_ids",
    "tokenize_records", "batches", "pack_text",
]


# ------------------------------------------------------------------------------------------------ files
SUFFIXES = (".parquet", ".json", ".jsonl", ".csv")


def read_table(path: os.PathLike | str, *, field: Optional[str] = None) -> list:
    """The rows of a data file as parsed, in file order: possibly empty, each row not checked to be an object.

    ``field`` is a field every record holds; it only decides how a JSON object of objects is read: as pandas'
    ``columns`` layout (``{field: {row: value}}``) when the object has ``field`` as a key, else as the ``index``
    layout (``{row: record}``). Without it, the ``index`` layout is taken when every key is a row number (pandas'
    default index) and ``columns`` otherwise. ``loki analyse`` reads with ``field="question"``.

    ``FileNotFoundError`` for a missing path; ``ValueError`` (one line, naming the file) for a file that cannot be
    read: unknown suffix, not UTF-8, not valid JSON (with the JSONL line), not a table.
    """
    return _rows(Path(path), field)[0]


def read_records(path: os.PathLike | str, *, field: Optional[str] = None) -> list[dict]:
    """The records of a data file (:func:`read_table`), checked: at least one, each an object (a ``dict``).

    Values come back as Python values: parquet/CSV cells that pandas gives as numpy arrays or scalars are turned
    into lists and Python numbers; a missing CSV cell is ``NaN`` (pandas), a missing parquet cell ``None`` or
    ``NaN`` (as pandas reads it). ``ValueError`` naming the file and the record (``line n`` for JSONL) otherwise.
    """
    return _records(Path(path), field)[0]


def _records(path: Path, field: Optional[str]):
    """(records, where) for :func:`read_records`; ``where(i)`` names record ``i`` in messages."""
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file")
    rows, where = _rows(path, field)
    if not rows:
        raise ValueError(f"{path}: holds no records")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path} {where(i)}: expected an object (a record), got {type(row).__name__}")
    return rows, where


def read_texts(path: os.PathLike | str) -> list[str]:
    """The documents of a text corpus, for :func:`pack_text`.

    A ``.txt`` file is one document: its whole text as written (UTF-8), blank lines included, so packing keeps
    every newline. Any other file is read with :func:`read_records` and each record's ``text`` field is one
    document (a JSONL dump of a corpus, as the K-FAC original streams). ``ValueError`` naming the file (and the
    record) for a missing or non-string ``text``, or a corpus with no text at all.
    """
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        text = _utf8(path)
        if not text.strip():
            raise ValueError(f"{path}: empty file")
        return [text]
    records, where = _records(path, None)
    texts = []
    for i, record in enumerate(records):
        if "text" not in record:
            raise ValueError(f"{path} {where(i)}: no 'text' field (fields: {', '.join(map(str, record))})")
        if not isinstance(record["text"], str):
            raise ValueError(f"{path} {where(i)}: 'text' is {type(record['text']).__name__}, not a string")
        texts.append(record["text"])
    if not any(t.strip() for t in texts):
        raise ValueError(f"{path}: every 'text' is empty")
    return texts


def _utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def _rows(path: Path, field: Optional[str]):
    """(rows, where): ``where(i)`` names row ``i`` in messages (``line n`` for JSONL, else ``record i``)."""
    by_index = lambda i: f"record {i}"  # noqa: E731
    suffix = path.suffix.lower()
    if path.is_dir():  # a datasets.Dataset saved with save_to_disk
        try:
            from datasets import load_from_disk
        except ImportError:
            raise ImportError(f"{path}: reading a datasets directory needs datasets (pip install "
                              f"'loki-kernels[data]')") from None
        try:
            return [_plain(r) for r in load_from_disk(str(path))], by_index
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"{path}: not a dataset saved with datasets' save_to_disk ({e})") from None
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported data file (use .parquet, .json, .jsonl, .csv or a datasets directory)")
    if suffix == ".jsonl":
        rows, lines = [], []
        for n, line in enumerate(_utf8(path).split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n}: not valid JSON ({e})") from None
                lines.append(n)
        return rows, lambda i: f"line {lines[i]}"
    if suffix == ".json":
        try:
            data = json.loads(_utf8(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return _json_rows(data, path, field), by_index
    return [_plain(r) for r in _frame_rows(path, suffix)], by_index


def _json_rows(data, path: Path, field: Optional[str]) -> list:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for key in ("data", "rows"):
            if isinstance(data.get(key), list):
                rows = data[key]
                if rows and isinstance(rows[0], list) and isinstance(data.get("columns"), list):  # orient="split"
                    return [dict(zip(data["columns"], row)) for row in rows]
                index = data.get("schema", {}).get("primaryKey") if isinstance(data.get("schema"), dict) else None
                if isinstance(index, list) and all(isinstance(r, dict) for r in rows):  # orient="table"
                    return [{k: v for k, v in r.items() if k not in index} for r in rows]  # row labels, as pandas
                return rows  # {"data": records}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1 and lists[0] and all(isinstance(r, dict) for r in lists[0]):
            return lists[0]  # {"train": records}, {"version": ..., "examples": records}
        values = list(data.values())
        if values and all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1:
            return [dict(zip(data, row)) for row in zip(*values)]  # columns: {field: [value per row]}
        if values and all(isinstance(v, dict) for v in values):
            columns = field in data if field is not None else not all(_row_number(k) for k in data)
            if columns:  # orient="columns": {field: {row: value}}
                index = list(values[0])
                return [{name: column.get(i) for name, column in data.items()} for i in index]
            return values  # orient="index": {row: record}
    what = f"{field} records" if field else "records"
    raise ValueError(f"{path}: expected a JSON list of {what} (or a pandas to_json table), got {type(data).__name__}")


def _row_number(key: str) -> bool:
    return key.lstrip("-").isdigit()


def _frame_rows(path: Path, suffix: str) -> list:
    """CSV through pandas; parquet through pandas, or pyarrow alone where pandas is missing."""
    kind = suffix[1:].upper()
    try:
        import pandas as pd
    except ImportError:
        pd = None
    if pd is None:
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                pq = None
            if pq is not None:
                try:
                    return pq.read_table(path).to_pylist()
                except (ValueError, OSError) as e:  # ArrowInvalid is a ValueError, ArrowIOError an OSError
                    raise ValueError(f"{path}: cannot be read as {kind} ({str(e).splitlines()[0]})") from None
        raise ImportError(f"{path}: reading {kind} files needs pandas (pip install 'loki-kernels[data]')")
    try:
        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    except (ValueError, OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ValueError(f"{path}: cannot be read as {kind} ({str(e).splitlines()[0]})") from None
    return frame.to_dict("records")


def _plain(value):
    """numpy arrays and scalars (pandas' and datasets' cells) as Python lists and numbers, recursively."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if type(value).__module__ == "numpy":
        if hasattr(value, "ndim") and value.ndim > 0:
            return [_plain(v) for v in value.tolist()]
        return value.item()
    return value


# ---------------------------------------------------------------------------------------------- formats
@dataclass(frozen=True)
class DataFormat:
    """A record layout: its name and the keys that identify it (for the fallbacks, the keys found)."""

    name: str
    keys: tuple[str, ...]


# FNSFT's DatasetFormatter.detect_format priority order (commit 49df1f6), first match wins. Because the check is
# "these keys are all present", (context, question, answer) is never reached: (question, answer) matches first.
FORMATS: tuple[DataFormat, ...] = (
    DataFormat("alpaca", ("instruction", "input", "output")),
    DataFormat("input_output", ("input", "output")),
    DataFormat("dolly", ("instruction", "context", "response")),
    DataFormat("camel", ("message_1", "message_2", "sub_topic", "topic")),
    DataFormat("camel_messages", ("message_1", "message_2")),
    DataFormat("system_user_assistant", ("assistant", "system", "user")),
    DataFormat("prompt_completion", ("prompt", "completion")),
    DataFormat("prompt_response", ("prompt", "response")),
    DataFormat("question_answer", ("question", "answer")),
    DataFormat("question_response", ("question", "response")),
    DataFormat("context_response", ("context", "response")),
    DataFormat("Context_Response", ("Context", "Response")),
    DataFormat("instruction_response", ("instruction", "response")),
    DataFormat("instruction_output", ("instruction", "output")),
    DataFormat("context_question_answer", ("context", "question", "answer")),  # unreachable by detection
    DataFormat("text", ("text",)),
)
MESSAGES = DataFormat("messages", ("messages",))  # after the 16: a chat conversation
OTHER = "other"  # the last fallback: DataFormat(OTHER, every common key, sorted)
_BY_NAME = {f.name: f for f in FORMATS}

# FNSFT's system prompt for a system/user/assistant record whose system field is empty.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant which thinks step by step when responding to a user."


def detect_format(records: Sequence[dict]) -> DataFormat:
    """FNSFT's detection: the keys common to the first 5 records, matched against :data:`FORMATS` in order.

    The first format whose keys are all present wins (extra keys do not matter); then ``messages``
    (:data:`MESSAGES`); then ``DataFormat("other", all common keys sorted)``, which :func:`standardize` reads by
    guessing an instruction and a response field by name. ``ValueError`` for no records, a record among the
    first 5 that is not an object, or no key common to them.
    """
    if not records:
        raise ValueError("no records to detect a format from")
    common = None
    for i, record in enumerate(records[:5]):
        if not isinstance(record, dict):
            raise ValueError(f"record {i}: expected an object, got {type(record).__name__}")
        common = set(record) if common is None else common & set(record)
    if not common:
        raise ValueError(f"no key is common to the first {min(5, len(records))} records")
    for fmt in FORMATS:
        if all(k in common for k in fmt.keys):
            return fmt
    if "messages" in common:
        return MESSAGES
    keys = tuple(sorted(common, key=str))
    logger.warning("unknown record format; fields %s", keys)
    return DataFormat(OTHER, keys)


def _blank(value) -> bool:
    """FNSFT's "no input/context/system": a falsy or whitespace-only value (``None`` included)."""
    return not value or not str(value).strip()


def _convert(record: dict, fmt: DataFormat) -> dict:
    """FNSFT's ``convert_to_standard_format`` for one format (KeyError/ValueError/TypeError where it does not fit)."""
    name, r = fmt.name, record
    if name == "alpaca":
        ins = r["instruction"] if _blank(r.get("input")) else f"{r['instruction']}\n\nInput: {r['input']}"
        return {"instruction": ins, "response": r["output"]}
    if name == "input_output":  # an "instruction" present in this record (not in all of the first 5) wins
        return {"instruction": r.get("instruction", r["input"]), "response": r["output"]}
    if name == "dolly":
        context = r.get("context")
        ins = r["instruction"] if _blank(context) else f"{r['instruction']} Context for reference: {context}"
        return {"instruction": ins, "response": r["response"]}
    if name in ("camel", "camel_messages"):
        return {"instruction": r["message_1"], "response": r["message_2"]}
    if name == "system_user_assistant":
        system = DEFAULT_SYSTEM_PROMPT if _blank(r.get("system")) else str(r["system"]).strip()
        return {"instruction": f"{system}\n\n{r.get('user', '')}", "response": r.get("assistant", "")}
    if name == "context_question_answer":
        return {"instruction": f"Context: {r['context']}\n\nQuestion: {r['question']}", "response": r["answer"]}
    if name == "text":
        return {"text": r["text"]}
    if name in _BY_NAME:  # the plain two-field formats: (instruction field, response field)
        ins, res = fmt.keys
        return {"instruction": r[ins], "response": r[res]}
    if name == MESSAGES.name:
        return _join_messages(r["messages"])
    return _infer(r, fmt.keys)


def _join_messages(messages) -> dict:
    """FNSFT's conversational conversion: all user turns, then all assistant turns, each joined with newlines."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError("'messages' must be a non-empty list of objects")
    user = [m.get("content", "") for m in messages if m.get("role", "") == "user"]
    assistant = [m.get("content", "") for m in messages if m.get("role", "") == "assistant"]
    if not user:
        raise ValueError("no user message in 'messages'")
    return {"instruction": "\n".join(map(str, user)), "response": "\n".join(map(str, assistant))}


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"'messages' must be a non-empty list of {{role, content}} objects, got "
                         f"{'an empty list' if isinstance(value, list) else type(value).__name__}")
    for k, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {k} is not a {{role, content}} object")
    return value


def _infer(record: dict, keys: tuple[str, ...]) -> dict:
    """FNSFT's ``_infer_and_convert``: the last key naming an instruction and the last naming a response (by
    substring, an instruction name taking precedence); else a lone ``text``; else every field joined by spaces."""
    instruction = response = None
    for key in keys:
        low = str(key).lower()
        if any(c in low for c in ("instruction", "prompt", "question", "input", "query")):
            instruction = key
        elif any(c in low for c in ("response", "output", "answer", "completion", "target", "result")):
            response = key
    if instruction and response:
        return {"instruction": str(record[instruction]), "response": str(record[response])}
    if len(keys) == 1 and "text" in keys:
        return {"text": str(record["text"])}
    return {"text": " ".join(str(record[k]) for k in keys)}


def standardize(record: dict, fmt: Optional[DataFormat] = None) -> dict:
    """One record as ``{"instruction", "response"}`` or ``{"text"}``, the way FNSFT's ``InstructionDataset`` gets it.

    Converted as ``fmt`` (the whole data's :func:`detect_format`; ``None`` detects this record alone); where that
    does not fit this record (a field missing here), as the record's own detected format; where that fails too,
    the record's own ``instruction`` + ``response`` or ``text``. ``ValueError`` when none of these exists.
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    fmt = detect_format([record]) if fmt is None else fmt
    try:
        return _convert(record, fmt)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        first = e
    try:
        return _convert(record, detect_format([record]))
    except (KeyError, ValueError, TypeError, AttributeError):
        pass
    if "instruction" in record and "response" in record:
        return {"instruction": record["instruction"], "response": record["response"]}
    if "text" in record:
        return {"text": record["text"]}
    raise ValueError(f"cannot read the record as {fmt.name} ({type(first).__name__}: {first}) and it holds neither "
                     f"'instruction'+'response' nor 'text' (fields: {', '.join(map(str, record))})")


# -------------------------------------------------------------------------------------------- templates
TEMPLATES = ("auto", "chat", "alpaca", "chatml", "basic")
# FNSFT's InstructionDataset default instruction_template (what "basic" formats with); "alpaca" is the same text.
BASIC_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n{response}"


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _resolve(template: str, tokenizer) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    if template == "auto":
        return "chat" if _has_chat_template(tokenizer) else "basic"
    if template == "chat" and not _has_chat_template(tokenizer):
        raise ValueError("template 'chat' needs a tokenizer with a chat_template")
    return template


def _render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
        raise ValueError(f"the chat template returned {type(text).__name__}, not text")
    return text


def _example(record: dict, fmt: Optional[DataFormat], template: str, tokenizer, instruction_template: str):
    """(text, chat): the training text, and whether a chat template rendered it (its special tokens are in it)."""
    kind = _resolve(template, tokenizer)
    fmt = detect_format([record]) if fmt is None else fmt
    if kind == "chat" and fmt.name == MESSAGES.name and "messages" in record:
        return _render_chat(tokenizer, _messages(record["messages"])), True
    pair = standardize(record, fmt)
    if "text" in pair:
        if not isinstance(pair["text"], str):
            raise ValueError(f"'text' is {type(pair['text']).__name__}, not a string")
        return pair["text"], False
    ins, res = pair["instruction"], pair["response"]
    if kind == "chat":
        turns = [{"role": "user", "content": ins}, {"role": "assistant", "content": res}]
        return _render_chat(tokenizer, turns), True
    if kind == "alpaca":
        return f"### Instruction:\n{ins}\n\n### Response:\n{res}", False
    if kind == "chatml":
        return f"<|im_start|>user\n{ins}<|im_end|>\n<|im_start|>assistant\n{res}<|im_end|>", False
    return instruction_template.format(instruction=ins, response=res), False


def format_example(record: dict, fmt: Optional[DataFormat] = None, template: str = "auto", tokenizer=None, *,
                   instruction_template: str = BASIC_TEMPLATE) -> str:
    """One record's full training text (prompt and response together, as FNSFT trains on), FNSFT's strings exactly.

    ``fmt``: the data's :func:`detect_format` (``None``: this record's own). ``template`` (:data:`TEMPLATES`):

    * ``auto``: ``chat`` if the tokenizer has a chat template, else ``basic``;
    * ``chat``: the tokenizer's chat template over one user turn (the instruction) and one assistant turn (the
      response), no generation prompt; a ``messages`` record goes through it as its whole conversation;
    * ``alpaca``: ``"### Instruction:\\n{instruction}\\n\\n### Response:\\n{response}"``;
    * ``chatml``: ``"<|im_start|>user\\n{instruction}<|im_end|>\\n<|im_start|>assistant\\n{response}<|im_end|>"``;
    * ``basic``: ``instruction_template.format(instruction=..., response=...)`` (default the Alpaca text above).

    A ``text`` record is its text under every template. The instruction already holds FNSFT's additions: an
    Alpaca ``input`` as ``"\\n\\nInput: {input}"``, a Dolly ``context`` as ``" Context for reference: {context}"``,
    a system prompt as ``"{system}\\n\\n{user}"``.
    """
    return _example(record, fmt, template, tokenizer, instruction_template)[0]


def chat_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False,
             max_length: Optional[int] = None) -> list[int]:
    """``messages`` through the tokenizer's chat template, tokenized exactly once.

    The rendered text already holds every special token the template writes (its BOS included), so it is
    tokenized with ``add_special_tokens=False``: no second BOS (``loki.knowledge.chat_prompt_ids`` asks its
    questions through it).
    """
    if not _has_chat_template(tokenizer):
        raise ValueError("the tokenizer has no chat_template")
    return _encode(tokenizer, _render_chat(tokenizer, _messages(messages), add_generation_prompt), True, max_length)


def _encode(tokenizer, text: str, chat: bool, max_length: Optional[int]) -> list[int]:
    """Chat-rendered text without the tokenizer's special tokens (the template wrote them), other text with them
    (as FNSFT tokenizes it); truncated to ``max_length`` the tokenizer's way (its ``truncation_side``)."""
    limit = dict(truncation=True, max_length=max_length) if max_length is not None else {}
    return list(tokenizer(text, add_special_tokens=not chat, **limit)["input_ids"])


def _positive(value, name: str, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}")


def tokenize_records(records: Sequence[dict], tokenizer, *, template: str = "auto", max_length: Optional[int] = 512,
                     fmt: Optional[DataFormat] = None, instruction_template: str = BASIC_TEMPLATE,
                     progress: bool = True) -> list[list[int]]:
    """Every record's :func:`format_example` text as token ids (FNSFT's ``InstructionDataset`` without padding).

    The format is detected once from the first 5 records (``fmt`` overrides), each record falling back to its own
    as :func:`standardize` says. Text rendered by a chat template is tokenized without the tokenizer's special
    tokens (the template holds them: one BOS, not FNSFT's two); other text with them, as FNSFT does. Sequences
    are truncated to ``max_length`` tokens (FNSFT's ``--max_seq_length`` 512; ``None``: no limit).
    ``ValueError`` naming the record for one that cannot be formatted or gives no tokens.
    """
    _positive(max_length, "max_length", optional=True)
    _resolve(template, tokenizer)
    if not records:
        raise ValueError("no records to tokenize")
    fmt = detect_format(records) if fmt is None else fmt
    sequences = []
    for i, record in enumerate(tqdm(records, desc="tokenize", unit="record", disable=not progress)):
        if not isinstance(record, dict):
            raise ValueError(f"record {i}: expected an object, got {type(record).__name__}")
        try:
            text, chat = _example(record, fmt, template, tokenizer, instruction_template)
        except ValueError as e:
            raise ValueError(f"record {i}: {e}") from None
        ids = _encode(tokenizer, text, chat, max_length)
        if not ids:
            raise ValueError(f"record {i}: its text gives no tokens")
        sequences.append(ids)
    return sequences


# --------------------------------------------------------------------------------------------- batching
def batches(sequences: Sequence[Sequence[int]] | torch.Tensor, batch_size: int, pad_id: int, *,
            side: str = "right") -> list[dict]:
    """Consecutive groups of ``batch_size`` sequences (the last may be smaller), each padded to its longest.

    Returns ``[{"input_ids": long[B, T], "attention_mask": long[B, T]}, ...]`` with mask 1 on the real tokens and 0
    on the pads (``pad_id``); ``side="right"`` pads after the tokens (training), ``"left"`` before them
    (generation). A 2-D tensor (:func:`pack_text`'s rows) is taken row by row. ``pad_id`` is the caller's choice,
    e.g. ``tokenizer.pad_token_id`` or its EOS: the mask, not the id, marks the pads.
    """
    _positive(batch_size, "batch_size")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise ValueError(f"pad_id must be an integer token id, got {pad_id!r}")
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    rows = []
    for i, seq in enumerate(sequences):
        row = torch.as_tensor(seq)
        if row.ndim != 1 or not row.numel():
            raise ValueError(f"sequence {i} must be a non-empty 1-D list of token ids, got shape {tuple(row.shape)}")
        if row.dtype.is_floating_point or row.dtype == torch.bool or row.dtype.is_complex:
            raise ValueError(f"sequence {i} holds {row.dtype} values, not token ids")
        rows.append(row.long())
    if not rows:
        raise ValueError("no sequences to batch")
    out = []
    for start in range(0, len(rows), batch_size):
        group = rows[start:start + batch_size]
        length = max(len(r) for r in group)
        ids = torch.full((len(group), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), length), dtype=torch.long)
        for b, r in enumerate(group):
            span = slice(0, len(r)) if side == "right" else slice(length - len(r), length)
            ids[b, span] = r
            mask[b, span] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def pack_text(texts: Iterable[str], tokenizer, seq_len: int, max_tokens: Optional[int] = None, *,
              progress: bool = True) -> torch.Tensor:
    """Documents packed into ``long[rows, seq_len]``, as the K-FAC original packs its training text.

    Each document is stripped (empty ones skipped) and tokenized with no special tokens (no BOS, no EOS); the
    documents' tokens follow one another with no separator and are cut into full rows of ``seq_len``; the partial
    last row is dropped. ``max_tokens`` keeps the first ``floor(max_tokens / seq_len)`` rows (the original stops
    after ``--nbytes`` bytes of text instead, finishing the document that crosses the budget). The rows hold no
    padding: their attention mask is all ones (the original's ``x != eos`` mask also hid real EOS tokens).
    ``ValueError`` when the texts do not fill one row.
    """
    _positive(seq_len, "seq_len")
    _positive(max_tokens, "max_tokens", optional=True)
    if isinstance(texts, str):
        raise ValueError("texts must be a list of documents, got one string")
    cap = None if max_tokens is None else max_tokens // seq_len * seq_len
    if cap == 0:
        raise ValueError(f"max_tokens {max_tokens} is less than one row of seq_len {seq_len}")
    parts, total, chunk = [], 0, []

    def flush():
        nonlocal total
        if chunk:
            for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
                parts.append(torch.tensor(ids, dtype=torch.long))
                total += len(ids)
            chunk.clear()

    for i, text in enumerate(tqdm(texts, desc="pack", unit="doc", disable=not progress)):
        if not isinstance(text, str):
            raise ValueError(f"document {i} is {type(text).__name__}, not a string")
        text = text.strip()
        if text:
            chunk.append(text)
        if len(chunk) == 64:  # tokenize in small groups (fast tokenizers batch them), stop once the rows are full
            flush()
            if cap is not None and total >= cap:
                break
    flush()
    rows = total // seq_len if cap is None else min(total, cap) // seq_len
    if rows == 0:
        raise ValueError(f"the texts hold {total} tokens, fewer than one row of seq_len {seq_len}")
    stream = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return stream[:rows * seq_len].view(rows, seq_len)
