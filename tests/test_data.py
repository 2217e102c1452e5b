"""loki_kernels.data: file readers, FNSFT's format detection and prompt templates, chat templates applied once,
padded batches, and K-FAC-style text packing.

Expected strings are written out by hand from FunctionalNetworksSFT's ``utils/dataset_utils.py`` (the version whose
priority list is /work/shared/reference/kfac_ica.md §2.3), with random words filled in.
"""

import json
import zlib

import numpy as np
import pandas as pd
import pytest
import torch

from loki_kernels.data import (FORMATS, MESSAGES, DataFormat, batches, chat_ids, detect_format, format_example,
                               pack_text, read_records, read_table, read_texts, standardize, tokenize_records)
from tests.conftest import SEED

WORDS = ["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "zeta", "theta", "lambda", "rho", "tau"]
BOS = 1
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture
def rng(request):
    return np.random.default_rng([SEED, zlib.crc32(request.node.name.encode())])  # new data every run and test


def words(rng, lo=1, hi=5) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi + 1))))


def bos_tokenizer(chat_template=None):
    """Characters (printable ASCII and newline) plus 4 specials; the tokenizer itself prepends ``<s>``, like
    Llama's, so a chat template that also writes ``{{ bos_token }}`` gives two unless tokenized once."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": BOS, "</s>": 2, "<unk>": 3}
    for ch in [chr(c) for c in range(32, 127)] + ["\n"]:
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = chat_template
    return tok


def decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def one_line(info, *needles):
    text = str(info.value)
    assert len(text.splitlines()) == 1, text
    for needle in needles:
        assert needle in text, (needle, text)


# ------------------------------------------------------------------------------------------------ reading
def _records(rng, n):
    return [{"instruction": words(rng), "output": words(rng), "n": int(rng.integers(-50, 50))} for _ in range(n)]


@pytest.mark.parametrize("kind", ["jsonl", "json_list", "json_data", "json_one_list", "json_columns", "to_json",
                                  "index", "split", "table", "records", "csv", "parquet", "datasets"])
def test_every_file_type_reads_the_same_records(tmp_path, rng, kind):
    records = _records(rng, int(rng.integers(11, 15)))  # more than 10 rows: row keys "10", ... keep their order
    frame = pd.DataFrame(records)
    path = tmp_path / ("data." + {"jsonl": "jsonl", "csv": "csv", "parquet": "parquet"}.get(kind, "json"))
    if kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    elif kind == "json_list":
        path.write_text(json.dumps(records))
    elif kind == "json_data":
        path.write_text(json.dumps({"data": records}))
    elif kind == "json_one_list":  # an export holding one list among other fields
        path.write_text(json.dumps({"version": "1.0", "train": records}))
    elif kind == "json_columns":  # what load_dataset("json") reads as columns
        path.write_text(json.dumps({k: [r[k] for r in records] for k in records[0]}))
    elif kind == "to_json":
        frame.to_json(path)  # pandas' default orient ("columns")
    elif kind in ("index", "split", "table", "records"):
        frame.to_json(path, orient=kind)
    elif kind == "csv":
        frame.to_csv(path, index=False)
    elif kind == "parquet":
        frame.to_parquet(path)
    else:
        Dataset = pytest.importorskip("datasets").Dataset
        path = tmp_path / "saved"
        Dataset.from_list(records).save_to_disk(str(path))
    got = read_records(path)
    assert got == records
    assert all(type(r["n"]) is int for r in got)


def test_jsonl_skips_blank_lines_and_keeps_line_separators_inside_strings(tmp_path, rng):
    records = [{"text": words(rng) + "\u2028" + words(rng)} for _ in range(4)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n  \n")
    assert read_records(path) == records


def test_parquet_nested_cells_come_back_as_python_lists(tmp_path, rng):
    records = [{"messages": [{"role": "user", "content": words(rng)}, {"role": "assistant", "content": words(rng)}],
                "tags": [words(rng, 1, 1) for _ in range(int(rng.integers(1, 4)))]} for _ in range(5)]
    path = tmp_path / "chat.parquet"
    pd.DataFrame(records).to_parquet(path)
    got = read_records(path)
    assert got == records
    assert type(got[0]["messages"]) is list and type(got[0]["tags"]) is list


def test_object_of_objects_with_a_string_index_needs_the_field(tmp_path, rng):
    records = _records(rng, 6)
    frame = pd.DataFrame(records, index=[f"row{i}" for i in range(6)])
    columns, index = tmp_path / "columns.json", tmp_path / "index.json"
    frame.to_json(columns, orient="columns")
    frame.to_json(index, orient="index")
    assert read_records(columns, field="instruction") == records
    assert read_records(columns) == records  # field names are not row numbers: columns
    assert read_records(index, field="instruction") == records


def _bad_file(tmp_path, rng, case):
    """A malformed file and the needles its error must hold."""
    lines = [json.dumps(r) for r in _records(rng, 6)]
    k = int(rng.integers(0, len(lines)))
    path = tmp_path / "d.jsonl"
    if case == "bad_jsonl_line":
        lines[k] = lines[k][:-3]
        path.write_text("\n\n".join(lines) + "\n")  # a blank line between records: line numbers count them
        return path, [f"line {2 * k + 1}", "not valid JSON"]
    if case == "jsonl_not_an_object":
        lines[k] = json.dumps([1, 2])
        path.write_text("\n".join(lines) + "\n")
        return path, [f"line {k + 1}", "expected an object", "got list"]
    if case == "json_not_an_object":
        path = tmp_path / "d.json"
        rows = [json.loads(line) for line in lines]
        rows[k] = "text"
        path.write_text(json.dumps(rows))
        return path, [f"record {k}", "expected an object", "got str"]
    if case.startswith("not_utf8"):
        path = tmp_path / f"d.{case.split('_')[-1]}"
        if path.suffix == ".csv":
            path.write_bytes(b"instruction,output\n" + b"ok,fine\n" * k + b"caf\xe9,x\n")
        else:
            path.write_bytes("\n".join(lines[:k]).encode() + b'\n{"text": "\xff"}\n')
        return path, ["not UTF-8"]
    if case.startswith("empty"):
        path = tmp_path / f"d.{case.split('_')[-1]}"
        path.write_bytes(b"")
        return path, ["empty file"]
    if case == "json_empty_list":
        path = tmp_path / "d.json"
        path.write_text("[]")
        return path, ["holds no records"]
    if case == "json_string":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(words(rng)))
        return path, ["expected a JSON list", "got str"]
    if case == "unsupported":
        path = tmp_path / "d.xml"
        path.write_text("<x/>")
        return path, ["unsupported data file"]
    if case == "bad_parquet":
        path = tmp_path / "d.parquet"
        path.write_bytes(b"PAR1" + bytes(rng.integers(0, 256, 64).astype(np.uint8)))
        return path, ["cannot be read as PARQUET"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["bad_jsonl_line", "jsonl_not_an_object", "json_not_an_object", "not_utf8_jsonl",
                                  "not_utf8_json", "not_utf8_csv", "empty_jsonl", "empty_json", "empty_csv",
                                  "json_empty_list", "json_string", "unsupported", "bad_parquet"])
def test_malformed_files_are_one_line_naming_file_and_record(tmp_path, rng, case):
    path, needles = _bad_file(tmp_path, rng, case)
    with pytest.raises(ValueError) as info:
        read_records(path)
    one_line(info, str(path), *needles)


def test_missing_file_and_tables_that_may_be_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    assert read_table(tmp_path / "blank.jsonl") == []  # what loki analyse reads (its own "no questions" error)
    with pytest.raises(ValueError, match="holds no records"):
        read_records(tmp_path / "blank.jsonl")


# ---------------------------------------------------------------------------------------------- detection
FNSFT_ORDER = [  # §2.3, written out by hand
    ("instruction", "input", "output"), ("input", "output"), ("instruction", "context", "response"),
    ("message_1", "message_2", "sub_topic", "topic"), ("message_1", "message_2"), ("assistant", "system", "user"),
    ("prompt", "completion"), ("prompt", "response"), ("question", "answer"), ("question", "response"),
    ("context", "response"), ("Context", "Response"), ("instruction", "response"), ("instruction", "output"),
    ("context", "question", "answer"), ("text",),
]


def test_formats_are_fnsfts_sixteen_in_its_order():
    assert [f.keys for f in FORMATS] == FNSFT_ORDER
    assert len({f.name for f in FORMATS}) == 16


def _with_keys(rng, keys, n=5):
    return [{k: words(rng) for k in rng.permutation(list(keys))} for _ in range(n)]


@pytest.mark.parametrize("index", range(16))
def test_each_format_alone_is_detected(rng, index):
    keys = FNSFT_ORDER[index]
    extra = ("zz_note",) if rng.integers(0, 2) else ()  # fields outside the format do not matter
    fmt = detect_format(_with_keys(rng, keys + extra, n=int(rng.integers(1, 9))))
    if keys == ("context", "question", "answer"):  # never reached: (question, answer) comes first
        assert fmt.name == "question_answer" and fmt.keys == ("question", "answer")
    else:
        assert fmt == FORMATS[index]


@pytest.mark.parametrize("keys, expected", [
    ({"instruction", "input", "output"}, "alpaca"),
    ({"input", "output", "text"}, "input_output"),
    ({"instruction", "context", "response"}, "dolly"),
    ({"context", "response", "instruction"}, "dolly"),  # not context_response nor instruction_response
    ({"message_1", "message_2", "sub_topic", "topic", "instruction", "response"}, "camel"),
    ({"message_1", "message_2", "instruction", "response"}, "camel_messages"),  # ahead of instruction/response
    ({"system", "user", "assistant", "prompt", "completion"}, "system_user_assistant"),
    ({"prompt", "completion", "response"}, "prompt_completion"),
    ({"prompt", "response", "question", "answer"}, "prompt_response"),
    ({"question", "answer", "response"}, "question_answer"),
    ({"context", "question", "answer"}, "question_answer"),
    ({"question", "response", "context"}, "question_response"),
    ({"context", "response", "text"}, "context_response"),
    ({"Context", "Response", "instruction", "output"}, "Context_Response"),
    ({"instruction", "response", "output"}, "instruction_response"),
    ({"instruction", "output", "text"}, "instruction_output"),
    ({"text", "messages"}, "text"),
])
def test_priority_order(rng, keys, expected):
    assert detect_format(_with_keys(rng, keys)).name == expected


def test_fallbacks_messages_then_every_common_key(rng):
    chats = [{"messages": [{"role": "user", "content": words(rng)}], "id": i} for i in range(3)]
    assert detect_format(chats) == MESSAGES
    assert detect_format(_with_keys(rng, ("zeta_b", "alpha_a", "mid"))) == DataFormat("other",
                                                                                      ("alpha_a", "mid", "zeta_b"))


def test_detection_intersects_the_first_five_only(rng):
    records = _with_keys(rng, ("instruction", "output", "text"), n=5) + _with_keys(rng, ("prompt",), n=3)
    assert detect_format(records).name == "instruction_output"  # the last three records do not count
    k = int(rng.integers(0, 5))
    del records[k]["output"]  # one of the first five lacks it: the common keys are instruction and text
    assert detect_format(records).name == "text"


def test_detection_errors():
    with pytest.raises(ValueError, match="no records"):
        detect_format([])
    with pytest.raises(ValueError, match="record 1: expected an object, got list"):
        detect_format([{"text": "a"}, ["text"]])
    with pytest.raises(ValueError, match="no key is common"):
        detect_format([{"a": 1}, {"b": 2}])


# ---------------------------------------------------------------------------------------------- templates
def test_alpaca_input_is_appended_only_when_not_blank(rng):
    ins, inp, out = words(rng), words(rng), words(rng)
    fmt = FORMATS[0]
    assert format_example({"instruction": ins, "input": inp, "output": out}, fmt, "alpaca") == (
        "### Instruction:\n" + ins + "\n\nInput: " + inp + "\n\n### Response:\n" + out)
    for blank in ("", "  \n", None):
        assert format_example({"instruction": ins, "input": blank, "output": out}, fmt, "alpaca") == (
            "### Instruction:\n" + ins + "\n\n### Response:\n" + out)


def test_dolly_context_for_reference(rng):
    ins, ctx, res = words(rng), words(rng), words(rng)
    fmt = FORMATS[2]
    assert format_example({"instruction": ins, "context": ctx, "response": res}, fmt) == (  # auto, no tokenizer
        "### Instruction:\n" + ins + " Context for reference: " + ctx + "\n\n### Response:\n" + res)
    assert format_example({"instruction": ins, "context": " ", "response": res}, fmt, "basic") == (
        "### Instruction:\n" + ins + "\n\n### Response:\n" + res)


def test_chatml_and_basic_strings(rng):
    prompt, completion = words(rng), words(rng)
    record, fmt = {"prompt": prompt, "completion": completion}, FORMATS[6]
    assert format_example(record, fmt, "chatml") == (
        "<|im_start|>user\n" + prompt + "<|im_end|>\n<|im_start|>assistant\n" + completion + "<|im_end|>")
    assert format_example(record, fmt, "basic", instruction_template="Q: {instruction} | A: {response}") == (
        "Q: " + prompt + " | A: " + completion)


def test_system_user_assistant_default_system_prompt(rng):
    user, assistant, system = words(rng), words(rng), words(rng)
    fmt = FORMATS[5]
    for empty in ("", "   ", None):
        assert standardize({"system": empty, "user": user, "assistant": assistant}, fmt) == {
            "instruction": "You are a helpful assistant which thinks step by step when responding to a user.\n\n"
                           + user, "response": assistant}
    assert standardize({"system": f"  {system} ", "user": user, "assistant": assistant}, fmt)["instruction"] == (
        system + "\n\n" + user)


def test_every_plain_pair_format_maps_its_fields(rng):
    for fmt in FORMATS:
        record = {k: words(rng) for k in fmt.keys}
        pair = standardize(record, fmt)
        if fmt.name in ("alpaca", "dolly", "system_user_assistant", "context_question_answer", "text"):
            continue  # their own tests
        first, second = ("message_1", "message_2") if fmt.name.startswith("camel") else fmt.keys[:2]
        assert pair == {"instruction": record[first], "response": record[second]}, fmt.name


def test_unreachable_context_question_answer_still_formats_when_named(rng):
    ctx, q, a = words(rng), words(rng), words(rng)
    record = {"context": ctx, "question": q, "answer": a}
    assert standardize(record, FORMATS[14]) == {"instruction": "Context: " + ctx + "\n\nQuestion: " + q,
                                                "response": a}
    assert standardize(record) == {"instruction": q, "response": a}  # detected: question_answer


def test_input_output_prefers_an_instruction_the_record_has(rng):
    ins, inp, out = words(rng), words(rng), words(rng)
    assert standardize({"input": inp, "output": out}, FORMATS[1]) == {"instruction": inp, "response": out}
    assert standardize({"instruction": ins, "input": inp, "output": out}, FORMATS[1])["instruction"] == ins


def test_text_records_pass_through_every_template(rng):
    text = words(rng) + "\n" + words(rng)
    for template in ("auto", "alpaca", "chatml", "basic"):
        assert format_example({"text": text}, FORMATS[15], template) == text


def test_other_keys_are_inferred_or_joined(rng):
    q, t, a, b = words(rng), words(rng), words(rng), words(rng)
    assert standardize({"user_query": q, "target_text": t}) == {"instruction": q, "response": t}
    assert standardize({"a": a, "b": b, "c": 7}) == {"text": a + " " + b + " 7"}


def test_messages_without_a_chat_template_are_joined_as_fnsft_does(rng):
    u1, u2, a1, a2, s = (words(rng) for _ in range(5))
    record = {"messages": [{"role": "system", "content": s}, {"role": "user", "content": u1},
                           {"role": "assistant", "content": a1}, {"role": "user", "content": u2},
                           {"role": "assistant", "content": a2}]}
    assert format_example(record, MESSAGES, "alpaca") == (
        "### Instruction:\n" + u1 + "\n" + u2 + "\n\n### Response:\n" + a1 + "\n" + a2)


def test_a_record_that_does_not_fit_the_data_format_uses_its_own(rng):
    records = _with_keys(rng, ("instruction", "output"), n=6)
    records.append({"text": words(rng)})
    records.append({"question": words(rng), "answer": words(rng)})
    fmt = detect_format(records)
    assert fmt.name == "instruction_output"
    assert standardize(records[6], fmt) == {"text": records[6]["text"]}
    assert standardize(records[7], fmt) == {"instruction": records[7]["question"], "response": records[7]["answer"]}
    with pytest.raises(ValueError, match="record 8: .*neither 'instruction'\\+'response' nor 'text'"):
        tokenize_records(records + [{}], bos_tokenizer(), progress=False)
    assert standardize({"zzz": []}, fmt) == {"text": "[]"}  # FNSFT's last resort: the fields joined


def test_template_errors(rng):
    record = {"instruction": words(rng), "output": words(rng)}
    with pytest.raises(ValueError, match="template 'chat' needs a tokenizer with a chat_template"):
        format_example(record, None, "chat", bos_tokenizer())
    with pytest.raises(ValueError, match="template must be one of auto, chat, alpaca, chatml, basic"):
        format_example(record, None, "llama")


# ------------------------------------------------------------------------------------ chat template once
def test_the_fixture_tokenizer_would_give_two_bos_tokens():
    tok = bos_tokenizer(CHAT_TEMPLATE)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert tok(text).input_ids[:2] == [BOS, BOS]  # what FNSFT's render-then-tokenize does


def test_chat_template_is_applied_once(rng):
    tok = bos_tokenizer(CHAT_TEMPLATE)
    records = [{"instruction": words(rng), "response": words(rng)} for _ in range(4)]
    for record, ids in zip(records, tokenize_records(records, tok, progress=False)):  # auto -> chat
        turns = [{"role": "user", "content": record["instruction"]},
                 {"role": "assistant", "content": record["response"]}]
        assert ids.count(BOS) == 1 and ids[0] == BOS
        assert decode(tok, ids) == "<s><user>" + record["instruction"] + "<assistant>" + record["response"]
        assert ids == list(tok.apply_chat_template(turns, tokenize=True)["input_ids"])  # transformers' own


def test_messages_go_through_the_chat_template_as_the_conversation(rng):
    tok = bos_tokenizer(CHAT_TEMPLATE)
    s, u1, a1, u2, a2 = (words(rng) for _ in range(5))
    record = {"messages": [{"role": "system", "content": s}, {"role": "user", "content": u1},
                           {"role": "assistant", "content": a1}, {"role": "user", "content": u2},
                           {"role": "assistant", "content": a2}]}
    (ids,) = tokenize_records([record], tok, template="chat", progress=False)
    assert decode(tok, ids) == f"<s><system>{s}<user>{u1}<assistant>{a1}<user>{u2}<assistant>{a2}"
    assert ids.count(BOS) == 1
    prompt = chat_ids(tok, record["messages"][:2], add_generation_prompt=True)
    assert decode(tok, prompt) == f"<s><system>{s}<user>{u1}<assistant>" and prompt.count(BOS) == 1


def test_plain_templates_get_the_tokenizers_special_tokens_once(rng):
    records = [{"instruction": words(rng), "output": words(rng)} for _ in range(3)]
    for tok, template in ((bos_tokenizer(CHAT_TEMPLATE), "alpaca"), (bos_tokenizer(), "auto")):
        for record, ids in zip(records, tokenize_records(records, tok, template=template, progress=False)):
            text = "### Instruction:\n" + record["instruction"] + "\n\n### Response:\n" + record["output"]
            assert ids == [BOS] + tok(text, add_special_tokens=False).input_ids


def test_max_length_truncates(rng):
    tok = bos_tokenizer(CHAT_TEMPLATE)
    records = [{"text": words(rng, 6, 9)} for _ in range(3)]
    full = tokenize_records(records, tok, max_length=None, progress=False)
    n = int(rng.integers(2, 20))
    assert tokenize_records(records, tok, max_length=n, progress=False) == [ids[:n] for ids in full]
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        tokenize_records(records, tok, max_length=0)


# ------------------------------------------------------------------------------------------------ batches
@pytest.mark.parametrize("side", ["right", "left"])
def test_batches_pad_and_mask(rng, side):
    seqs = [rng.integers(0, 97, int(rng.integers(1, 12))).tolist() for _ in range(int(rng.integers(5, 12)))]
    size, pad = int(rng.integers(1, 5)), int(rng.integers(0, 97))
    out = batches(seqs, size, pad, side=side)
    assert len(out) == -(-len(seqs) // size)
    seen = 0
    for batch in out:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        group = seqs[seen:seen + ids.shape[0]]
        seen += len(group)
        width = max(map(len, group))
        assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (len(group), width)
        for row, m, seq in zip(ids, mask, group):
            real = [1] * len(seq)
            pads = [0] * (width - len(seq))
            assert m.tolist() == (real + pads if side == "right" else pads + real)
            assert row[m.bool()].tolist() == seq
            assert (row[~m.bool()] == pad).all()
    assert seen == len(seqs) and out[-1]["input_ids"].shape[0] == len(seqs) - size * (len(out) - 1)


def test_batches_of_packed_rows_have_no_padding(rng):
    rows = torch.randint(0, 97, (int(rng.integers(3, 9)), int(rng.integers(2, 7))))
    out = batches(rows, 2, 0)
    assert torch.equal(torch.cat([b["input_ids"] for b in out]), rows)
    assert all(b["attention_mask"].all() for b in out)


@pytest.mark.parametrize("args, message", [
    (([[1, 2]], 0, 0), "batch_size must be a positive integer"),
    (([[1, 2]], True, 0), "batch_size must be a positive integer"),
    (([[1, 2]], 2, None), "pad_id must be an integer"),
    (([], 2, 0), "no sequences"),
    (([[1], []], 2, 0), "sequence 1 must be a non-empty"),
    (([[1], [0.5, 2.0]], 2, 0), "sequence 1 holds torch.float"),
])
def test_batches_errors(args, message):
    with pytest.raises(ValueError, match=message):
        batches(*args)
    with pytest.raises(ValueError, match="side must be 'right' or 'left'"):
        batches([[1]], 1, 0, side="middle")


# ---------------------------------------------------------------------------------------------- packing
def _docs(rng, n):
    docs = [" " * int(rng.integers(0, 3)) + words(rng, 1, 4) + "\n" * int(rng.integers(0, 2)) for _ in range(n)]
    docs[int(rng.integers(0, n))] = "  \n "  # an empty document is skipped
    return docs


def test_pack_text_rows_are_documents_back_to_back_without_special_tokens(rng):
    tok = bos_tokenizer()
    docs = _docs(rng, int(rng.integers(5, 20)))
    seq_len = int(rng.integers(3, 12))
    stream = [t for d in docs for t in tok(d.strip(), add_special_tokens=False).input_ids]
    rows = len(stream) // seq_len
    out = pack_text(docs, tok, seq_len, progress=False)
    assert out.dtype == torch.long and out.shape == (rows, seq_len)
    assert out.flatten().tolist() == stream[:rows * seq_len]  # the partial last row is dropped
    assert BOS not in out.tolist()[0]


def test_pack_text_max_tokens_keeps_the_first_rows(rng):
    tok = bos_tokenizer()
    docs = _docs(rng, 150)  # more than one tokenizer group of 64 documents: stops early
    seq_len = int(rng.integers(3, 9))
    full = pack_text(docs, tok, seq_len, progress=False)
    max_tokens = int(rng.integers(seq_len, 3 * seq_len * 4))
    capped = pack_text(docs, tok, seq_len, max_tokens, progress=False)
    assert torch.equal(capped, full[:max_tokens // seq_len])


def test_pack_text_errors(rng):
    tok = bos_tokenizer()
    with pytest.raises(ValueError, match="fewer than one row of seq_len 50"):
        pack_text(["ab", " ", "cd"], tok, 50, progress=False)
    with pytest.raises(ValueError, match="max_tokens 3 is less than one row of seq_len 4"):
        pack_text(["abcdefgh"], tok, 4, 3)
    with pytest.raises(ValueError, match="one string"):
        pack_text("abcdefgh", tok, 2)
    with pytest.raises(ValueError, match="document 1 is NoneType"):
        pack_text(["abc", None], tok, 2, progress=False)
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        pack_text(["abc"], tok, 0)


def test_read_texts_txt_is_one_document_and_records_give_their_text(tmp_path, rng):
    text = words(rng) + "\n\n" + words(rng) + "\n"
    (tmp_path / "c.txt").write_text(text)
    assert read_texts(tmp_path / "c.txt") == [text]
    docs = [words(rng) for _ in range(int(rng.integers(2, 6)))]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d, "meta": i}) + "\n" for i, d in enumerate(docs)))
    assert read_texts(path) == docs
    tok = bos_tokenizer()
    assert torch.equal(pack_text(read_texts(path), tok, 3, progress=False), pack_text(docs, tok, 3, progress=False))


@pytest.mark.parametrize("case", ["no_text_field", "text_not_str", "all_empty", "empty_txt", "txt_not_utf8"])
def test_read_texts_errors(tmp_path, rng, case):
    path = tmp_path / "c.jsonl"
    records = [{"text": words(rng)} for _ in range(4)]
    k = int(rng.integers(0, 4))
    needles = []
    if case == "no_text_field":
        records[k] = {"body": words(rng)}
        needles = [f"line {k + 1}", "no 'text' field", "body"]
    elif case == "text_not_str":
        records[k] = {"text": None}
        needles = [f"line {k + 1}", "'text' is NoneType"]
    elif case == "all_empty":
        records = [{"text": " "} for _ in records]
        needles = ["every 'text' is empty"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    if case == "empty_txt":
        path = tmp_path / "c.txt"
        path.write_text(" \n\n ")
        needles = ["empty file"]
    elif case == "txt_not_utf8":
        path = tmp_path / "c.txt"
        path.write_bytes(words(rng).encode() + b"\xff\xfe")
        needles = ["not UTF-8"]
    with pytest.raises(ValueError) as info:
        read_texts(path)
    one_line(info, str(path), *needles)
