"""`loki kfac collect|edit|select` end to end on tiny saved models (character tokenizer): each command writes what
the library computes on the same inputs, and every mistake is one line, exit 2, nothing written."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loki.cli import main
from loki.kfac_cli import EDIT_RECORD
from loki_kernels.data import batches, pack_text, read_texts, tokenize_records
from loki_kernels.kfac import Factors, apply_edit, collect_factors, load_factors, load_original_factors, row_scores
from loki_kernels.kfac import save_factors
from loki_kernels.reference import collect_factors_original
from loki_kernels.selection import target_pos_from_scores
from loki_kernels.target_pos import check_target_pos
from tests.conftest import SEED
from tests.tiny_models import HIDDEN, LAYERS, char_tokenizer, saved_char_model, tiny_model

SEQ = ["--seq-len", "16", "--max-tokens", "160", "--batch-size", "3"]


def text(n):
    return "".join(chr(c) for c in torch.randint(33, 127, (n,)).tolist())


@pytest.fixture
def setup(tmp_path):
    path, model, tok = saved_char_model(tmp_path, max_positions=64)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text(400) + "\n")
    return tmp_path, path, model, tok, corpus


def run(argv, capsys):
    capsys.readouterr()  # what the test itself printed is not the command's
    rc = main(["kfac"] + [str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def corpus_batches(tok, corpus):
    """What SEQ makes of the corpus: 10 rows of 16 tokens, batches of 3."""
    return batches(pack_text(read_texts(corpus), tok, 16, 160, progress=False), 3, tok.pad_token_id)


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def assert_same_factors(got: Factors, want: Factors):
    assert got.A.keys() == want.A.keys() and got.G.keys() == want.G.keys()
    for table in ("A", "G"):
        for key, tensor in getattr(want, table).items():
            assert torch.equal(getattr(got, table)[key], tensor), (table, key)
    assert got.n_tokens == want.n_tokens


# ------------------------------------------------------------------------------------------------ collect
def test_collect_equals_the_library(setup, capsys):
    tmp, path, model, tok, corpus = setup
    seed = int(torch.randint(0, 10**6, ()))
    out = tmp / "factors" / "f.safetensors"  # its folder is made
    rc, stdout, err = run(["collect", "--model-path", path, "--data", corpus, "--layers", 2, 0, "--output", out,
                           "--seed", seed] + SEQ, capsys)
    assert rc == 0 and err == ""
    want = collect_factors(model, corpus_batches(tok, corpus), layers=[0, 2], fisher="mc", seed=seed, progress=False)
    got = load_factors(out)
    assert_same_factors(got, want)
    assert got.n_tokens == {"0": 150, "2": 150} and got.settings["modules"] == ["gate", "up", "down"]
    assert got.settings["data"] == [str(corpus)] and got.settings["normalize"] == "sum"
    assert "layers 0, 2 (gate, up, down) over 150 tokens (10 sequences, 4 batches" in stdout
    assert f"-> {out} (" in stdout and "KiB)" in stdout
    assert listing(tmp / "factors") == ["f.safetensors"]

    rc, _, err = run(["collect", "--model-path", path, "--data", corpus, "--layers", 1, "--output", out,
                      "--overwrite"] + SEQ, capsys)
    assert rc == 0 and load_factors(out).layers() == [1]


def test_collect_records_and_text(setup, capsys):
    """Corpus documents (a text-format JSONL) are packed and come first, whatever the order of --data; each
    instruction record is one sequence (cut at --seq-len) until --max-tokens would be passed."""
    tmp, path, model, tok, _ = setup
    records = [{"instruction": text(int(torch.randint(1, 7, ()))), "output": text(int(torch.randint(1, 7, ())))}
               for _ in range(8)]
    records[0]["instruction"] = text(30)  # longer than --seq-len: cut
    instructions = tmp / "instructions.jsonl"
    instructions.write_text("".join(json.dumps(r) + "\n" for r in records))
    docs = tmp / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": text(40), "id": i}) + "\n" for i in range(3)))
    rc, _, err = run(["collect", "--model-path", path, "--data", instructions, docs, "--layers", 1, "--modules",
                      "down", "up", "--fisher", "empirical", "--normalize", "original", "--seq-len", 48,
                      "--max-tokens", 300, "--batch-size", 4, "--output", tmp / "f.safetensors"], capsys)
    assert rc == 0 and err == ""

    rows = pack_text(read_texts(docs), tok, 48, 300, progress=False)
    assert rows.shape == (2, 48)  # 120 characters: two whole rows
    sequences, budget = list(rows), 300 - rows.numel()
    for ids in tokenize_records(records, tok, max_length=48, progress=False):
        if len(ids) > budget:
            break
        sequences.append(ids)
        budget -= len(ids)
    assert 2 < len(sequences) < 2 + len(records)  # the budget cut the records
    assert len(sequences[2]) == 48 and min(map(len, sequences)) < 48  # a record cut at --seq-len, and padding
    want = collect_factors(model, batches(sequences, 4, tok.pad_token_id), layers=[1], modules=("up", "down"),
                           fisher="empirical", normalize="original", progress=False)
    assert_same_factors(load_factors(tmp / "f.safetensors"), want)


def test_collect_default_modules_are_the_models(tmp_path, capsys):
    tok = char_tokenizer()
    tiny_model("gpt2", vocab_size=len(tok)).save_pretrained(tmp_path / "gpt2")  # no gate: c_fc is up
    tok.save_pretrained(tmp_path / "gpt2")
    (tmp_path / "c.txt").write_text(text(100))
    rc, out, err = run(["collect", "--model-path", tmp_path / "gpt2", "--data", tmp_path / "c.txt", "--layers", 0,
                        "--seq-len", 16, "--output", tmp_path / "f.safetensors"], capsys)
    assert rc == 0 and err == "" and "(up, down) over 90 tokens" in out
    assert load_factors(tmp_path / "f.safetensors").modules() == [(0, "up"), (0, "down")]


# --------------------------------------------------------------------------------------------------- edit
def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_edited(saved_dir, original, want, changed):
    """The saved model equals ``want`` (apply_edit's) everywhere; it differs from ``original`` on ``changed`` only."""
    got = state(AutoModelForCausalLM.from_pretrained(saved_dir))
    assert got.keys() == want.keys() == original.keys()
    for key in got:
        assert torch.equal(got[key], want[key]), key
        assert torch.equal(got[key], original[key]) == (key not in changed), key


def mlp_key(layer, module):
    return f"model.layers.{layer}.mlp.{module}_proj.weight"


def test_edit_saves_what_apply_edit_computes(setup, capsys):
    tmp, path, model, tok, corpus = setup
    factors = collect_factors(model, corpus_batches(tok, corpus), layers=[0, 1], progress=False)
    save_factors(factors, tmp / "f.safetensors")
    plan = {"0": {"gate": 0.6, "up": 0.6}, "1": {"down": 0.3, "up": 1.0}}
    rc, out, err = run(["edit", "--model-path", path, "--factors", tmp / "f.safetensors", "--plan", json.dumps(plan),
                        "--save-dir", tmp / "edited"], capsys)
    assert rc == 0 and err == ""

    reference = AutoModelForCausalLM.from_pretrained(path)
    done = apply_edit(reference, load_factors(tmp / "f.safetensors"), plan, progress=False)
    check_edited(tmp / "edited", state(model), state(reference),
                 {mlp_key(0, "gate"), mlp_key(0, "up"), mlp_key(1, "down")})
    saved_tok = AutoTokenizer.from_pretrained(tmp / "edited")
    sample = text(20)
    assert saved_tok(sample)["input_ids"] == tok(sample)["input_ids"]

    record = json.loads((tmp / "edited" / EDIT_RECORD).read_text())
    assert record["plan"] == plan and record["method"] == "product" and record["ablate"] is False
    kept = {(p["layer"], p["module"]): p.get("kept") for p in record["projections"]}
    assert kept == {**done.kept, (1, "up"): None}
    for (layer, module), n in done.kept.items():
        pairs = 104 * HIDDEN
        assert 0 < n < pairs
        assert f"layer {layer} {module}" in out and f"kept {n} of {pairs} pairs" in out
    assert "layer 1 up" in out and "untouched (rho >= 0.9999)" in out and f"saved to {tmp / 'edited'}" in out
    assert not [p for p in listing(tmp) if ".loki-" in p]


def test_edit_with_original_pt_files_merged(setup, capsys):
    """The original's ``.pt`` files (two passes) and one of ours, merged; per_factor, ablated, cached, plan file."""
    tmp, path, model, tok, corpus = setup
    data = corpus_batches(tok, corpus)
    pt_files = []
    for layer in (0, 2):
        content = collect_factors_original(model, data, layers=[layer], sample_labels=True, seed=3)
        pt_files.append(tmp / f"kfac_factors_blk_{layer}.pt")
        torch.save({k: {"A": v["A"].cpu(), "G": v["G"].cpu(), "n_tokens": v["n_tokens"]} for k, v in content.items()},
                   pt_files[-1])
    save_factors(collect_factors(model, data, layers=[1], modules=("gate",), progress=False), tmp / "ours.safetensors")
    plan = {"0": {"up": 0.5}, "1": {"gate": 0.7}, "2": {"gate": 0.4, "down": 0.8}}
    (tmp / "plan.json").write_text(json.dumps(plan))
    argv = ["edit", "--model-path", path, "--factors", pt_files[0], tmp / "ours.safetensors", pt_files[1],
            "--plan", tmp / "plan.json", "--method", "per_factor", "--ablate", "--cache-dir", tmp / "cache",
            "--save-dir", tmp / "edited"]
    rc, out, err = run(argv, capsys)
    assert rc == 0 and err == ""

    original, ours = load_original_factors(pt_files), load_factors(tmp / "ours.safetensors")
    merged = Factors(A={**original.A, **ours.A}, G={**original.G, **ours.G})
    reference = AutoModelForCausalLM.from_pretrained(path)
    done = apply_edit(reference, merged, plan, method="per_factor", complement=True, progress=False)
    changed = {mlp_key(0, "up"), mlp_key(1, "gate"), mlp_key(2, "gate"), mlp_key(2, "down")}
    check_edited(tmp / "edited", state(model), state(reference), changed)
    assert len(listing(tmp / "cache")) == 4 and "from --cache-dir" not in out and "removed from the weight" in out
    record = json.loads((tmp / "edited" / EDIT_RECORD).read_text())
    assert {(p["layer"], p["module"]): p["kept"] for p in record["projections"]} == done.kept
    assert record["method"] == "per_factor" and record["ablate"] is True

    rc, out, err = run(argv + ["--overwrite"], capsys)  # the edited weights now come from the cache
    assert rc == 0 and err == "" and out.count("from --cache-dir") == 4
    check_edited(tmp / "edited", state(model), state(reference), changed)


# ------------------------------------------------------------------------------------------------- select
@pytest.mark.parametrize("score, strategy, quota, fisher", [("coupled", "layer_lowest", 10, "mc"),
                                                            ("diag", "global_highest", 7.5, "empirical")])
def test_select_equals_the_library(setup, capsys, score, strategy, quota, fisher):
    tmp, path, model, tok, corpus = setup
    seed = int(torch.randint(0, 10**6, ()))
    out = tmp / "pos" / "rows.json"
    rc, stdout, err = run(["select", "--model-path", path, "--data", corpus, "--quota", quota, "--score", score,
                           "--strategy", strategy, "--fisher", fisher, "--seed", seed, "--output", out] + SEQ, capsys)
    assert rc == 0 and err == ""
    scores = row_scores(model, corpus_batches(tok, corpus), fisher=fisher, seed=seed, progress=False)
    values = scores.coupled if score == "coupled" else scores.diag_g
    got = json.loads(out.read_text())
    assert got == target_pos_from_scores(values, quota, strategy)
    rows = check_target_pos(got, LAYERS, HIDDEN)  # what patch_model and create-model read
    chosen = torch.zeros(LAYERS, HIDDEN, dtype=torch.bool)
    for layer, picked in enumerate(rows):
        chosen[layer, picked] = True
    if strategy == "layer_lowest":  # each layer's 4 flattest rows
        assert chosen.sum(1).tolist() == [4] * LAYERS
        for layer in range(LAYERS):
            assert values[layer][chosen[layer]].max() <= values[layer][~chosen[layer]].min()
    else:  # the 9 sharpest rows of the model
        assert int(chosen.sum()) == 9 and values[chosen].min() >= values[~chosen].max()
    assert f"selected {int(chosen.sum())} rows across {LAYERS} layers ({strategy}" in stdout
    assert f"over {scores.n_tokens} tokens" in stdout


# ------------------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def error_setup(tmp_path_factory):
    """Made once for all the error cases (they write nothing, which each case checks)."""
    torch.manual_seed(SEED)  # module scope: before the per-test seeding
    tmp = tmp_path_factory.mktemp("errors")
    path, model, tok = saved_char_model(tmp, max_positions=64)
    corpus = tmp / "corpus.txt"
    corpus.write_text(text(400) + "\n")
    data = corpus_batches(tok, corpus)
    save_factors(collect_factors(model, data, layers=[0, 1], progress=False), tmp / "f.safetensors")
    other = tiny_model("llama", vocab_size=len(tok), intermediate_size=50)  # another d_ff
    save_factors(collect_factors(other, data, layers=[0], progress=False), tmp / "other.safetensors")
    (tmp / "full").mkdir()
    (tmp / "full" / "x").write_text("x")
    (tmp / "short.txt").write_text("abcde")
    (tmp / "plan.json").write_text('{"0": {"up": "0.5"}}')
    (tmp / "bad.jsonl").write_text('{"text": "abc"}\n{oops\n')
    return tmp, path, model, tok, corpus


EDIT = ["edit", "--model-path", "{path}", "--factors", "{tmp}/f.safetensors", "--plan", '{"0": {"gate": 0.5}}',
        "--save-dir", "{tmp}/out"]
COLLECT = ["collect", "--model-path", "{path}", "--data", "{corpus}", "--layers", "0", "--output", "{tmp}/f.st"] + SEQ
SELECT = ["select", "--model-path", "{path}", "--data", "{corpus}", "--quota", "10", "--output", "{tmp}/p.json"] + SEQ


@pytest.mark.parametrize("argv, message", [
    (EDIT + ["--plan", '{"2": {"gate": 0.5}}'], "--plan layer 2 gate: no K-FAC factors for it in --factors "
                                                "(they hold: 0.gate, 0.up, 0.down, 1.gate, 1.up, 1.down)"),
    (EDIT + ["--plan", '{"0": {"gate": 1.5}}'], "--plan layer 0 gate: rho must be a number in [0, 1], got 1.5"),
    (EDIT + ["--plan", '{"0": {"up": -0.1}}'], "--plan layer 0 up: rho must be a number in [0, 1], got -0.1"),
    (EDIT + ["--plan", "{tmp}/plan.json"], "--plan layer 0 up: rho must be a number in [0, 1], got \"0.5\""),
    (EDIT + ["--plan", '{"0": {"gat": 0.5}}'], "--plan layer 0: unknown module 'gat'; expected one of gate, up, down"),
    (EDIT + ["--plan", '{"0": {"gate": 0.5}'], "--plan is not valid JSON (Expecting ',' delimiter"),
    (EDIT + ["--plan", '{"0": {"gate": 0.5}, "0": {"up": 0.5}}'], "--plan: key '0' appears twice"),
    (EDIT + ["--plan", '{"3": {"gate": 0.5}}'], "--plan layer 3: the model has 3 decoder layers (0-2)"),
    (EDIT + ["--plan", '{"x": {"gate": 0.5}}'], "--plan key 'x' is not a layer number"),
    (EDIT + ["--plan", "[0.5]"], "--plan must be a JSON object {layer: {module: rho}}, got list"),
    (EDIT + ["--plan", '{"0": {"gate": 1.0}}' + " " * 300], "--plan edits nothing: every rho is at least 0.9999"),
    (EDIT + ["--plan", "{tmp}/nope.json"], "--plan {tmp}/nope.json: no such file, and not JSON text"),
    (EDIT + ["--factors", "{tmp}/nope.safetensors"], "--factors file not found: {tmp}/nope.safetensors"),
    (EDIT + ["--factors", "{tmp}/other.safetensors"], "layer 0 gate: G has shape (50, 50) but weight [d_out, d_in] "
                                                      "has shape (104, 40): G must be (104, 104)"),
    (EDIT + ["--factors", "{tmp}/f.safetensors", "{tmp}/f.safetensors"],
     "--factors: A of 0.down is in {tmp}/f.safetensors and in {tmp}/f.safetensors"),
    (EDIT + ["--factors", "{corpus}"], "{corpus} is not a readable torch file"),
    (EDIT + ["--factors", "{tmp}/short.txt"], "{tmp}/short.txt is not a readable torch file"),
    (EDIT + ["--save-dir", "{tmp}/full"], "output {tmp}/full already exists and is not empty"),
    (EDIT + ["--save-dir", "{corpus}"], "output {corpus} exists and is not a directory"),
    (EDIT + ["--cache-dir", "{corpus}"], "--cache-dir {corpus} exists and is not a directory"),
    (EDIT + ["--model-path", "{tmp}/nope"], "model not found: {tmp}/nope"),
    (COLLECT + ["--layers", "3"], "--layers 3: the model has 3 decoder layers (0-2)"),
    (COLLECT + ["--layers", "1", "1"], "--layers 1 is listed twice"),
    (COLLECT + ["--modules", "up", "up"], "--modules lists a module twice: up up"),
    (COLLECT + ["--output", "{corpus}"], "--output {corpus} exists; pass --overwrite to replace it"),
    (COLLECT + ["--output", "{tmp}/full"], "--output {tmp}/full is a directory"),
    (COLLECT + ["--data", "{tmp}/nope.jsonl"], "--data file not found: {tmp}/nope.jsonl"),
    (COLLECT + ["--data", "{tmp}/short.txt"], "--data {tmp}/short.txt: the texts hold 5 tokens, fewer than one row"),
    (COLLECT + ["--data", "{tmp}/bad.jsonl"], "{tmp}/bad.jsonl line 2: not valid JSON"),
    (COLLECT + ["--seq-len", "65"], "--seq-len 65 is longer than the model's 64 positions"),
    (COLLECT + ["--seq-len", "1"], "--seq-len must be at least 2"),
    (COLLECT + ["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (COLLECT + ["--max-tokens", "8"], "--data {corpus}: max_tokens 8 is less than one row of seq_len 16"),
    (COLLECT + ["--seed", "-1"], "--seed must be a non-negative integer, got -1"),
    (SELECT + ["--quota", "0"], "--quota must be in (0, 100], got 0"),
    (SELECT + ["--quota", "1"], "--quota 1: quota 1% selects no row"),
    (SELECT + ["--output", "{corpus}"], "--output {corpus} exists; pass --overwrite to replace it"),
])
def test_user_errors_are_one_line(error_setup, capsys, argv, message):
    tmp, path, _, _, corpus = error_setup
    before = listing(tmp)
    def fill(s):  # not str.format: the plans hold braces
        return s.replace("{tmp}", str(tmp)).replace("{path}", str(path)).replace("{corpus}", str(corpus))

    rc, out, err = run([fill(a) for a in argv], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"loki kfac {argv[0]}: error: ") and fill(message) in err, err
    assert listing(tmp) == before  # no file, directory or temporary left


def test_help(capsys):
    for name in ("collect", "edit", "select"):
        with pytest.raises(SystemExit) as done:
            main(["kfac", name, "--help"])
        assert done.value.code == 0 and f"usage: loki kfac {name}" in capsys.readouterr().out
