"""loki_kernels.metrics: memorisation, nDCG@k and perplexity on hand-made cases with known answers, on fake
models whose outputs are known, and on tiny random models (float64) against one-at-a-time references."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from loki_kernels import metrics
from loki_kernels.metrics import Window
from tests.tiny_models import VOCAB, char_tokenizer, tiny_model


# ------------------------------------------------------------------------------------------ fake models
class Counting(nn.Module):
    """Next token = (token + 1) mod vocab at every position, whatever came before; returns no cache."""

    def __init__(self, vocab: int = VOCAB):
        super().__init__()
        self.vocab = vocab
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        hot = nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab).to(self.scale.dtype)
        return SimpleNamespace(logits=hot * self.scale)


class Lookup(nn.Module):
    """Logits at a position = ``table[token]``: the ranking after each token is fixed and known."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])


def counting_suffix(prefix, length, vocab=VOCAB):
    return [(prefix[-1] + 1 + i) % vocab for i in range(length)]


def edit_distance(a, b):
    """Plain dynamic-programming Levenshtein distance: the oracle for rapidfuzz."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def rand_ids(n, low=0):
    return torch.randint(low, VOCAB, (n,)).tolist()


# --------------------------------------------------------------------------------------- memorisation
@pytest.mark.parametrize("a, b, d", [
    ([1, 2, 3], [1, 2, 3], 0), ([1, 2, 3], [1, 3], 1), ([1, 2, 3], [3, 2, 1], 2), ([], [4, 5], 2),
    ([5, 6, 7, 8], [6, 7, 8, 9], 2), ([1, 2, 3, 4], [1, 9, 3, 9], 2), ([7] * 5, [7] * 3 + [8] * 2, 2),
])
def test_levenshtein_hand_cases(a, b, d):
    assert metrics.levenshtein(a, b) == d == edit_distance(a, b)


def test_levenshtein_random_against_dp():
    for _ in range(50):
        a, b = (torch.randint(0, 6, (torch.randint(0, 30, ()).item(),)).tolist() for _ in range(2))
        assert metrics.levenshtein(a, b) == edit_distance(a, b)


def test_greedy_suffixes_known_model_does_not_stop():
    model = Counting()
    prefixes = [rand_ids(n) for n in (3, 1, 8)]
    prefixes[1] = [VOCAB - 3]  # its continuation wraps through ids 0, 1, 2 (pad, BOS, EOS of most tokenizers)
    out = metrics.greedy_suffixes(model, prefixes, 7)
    assert out.tolist() == [counting_suffix(p, 7) for p in prefixes]


def test_memorization_known_answers_and_loose_threshold():
    """48-token suffixes: verbatim, 12 substitutions (similarity exactly 0.75: loose), 13 (not loose), and a
    suffix of another length (grouped), scored against the counting model's known greedy output."""
    model = Counting()
    prefixes = [rand_ids(n) for n in (64, 5, 64, 20, 9)]
    golds = [counting_suffix(p, 48) for p in prefixes[:4]] + [counting_suffix(prefixes[4], 8)]
    for gold, n in ((golds[1], 12), (golds[2], 13), (golds[3], 48)):
        foreign = [t for t in range(VOCAB) if t not in gold]  # tokens the model never generates here
        for pos in torch.randperm(48)[:n].tolist():
            gold[pos] = foreign[torch.randint(len(foreign), ()).item()]
    golds[4][3] = (golds[4][3] + 50) % VOCAB  # 1 substitution of 8: similarity 0.875
    windows = [Window(tuple(p), tuple(g)) for p, g in zip(prefixes, golds)]
    result = metrics.memorization(model, windows, batch_size=2, progress=False)
    assert result.distances[:3] == [0, 12, 13]
    assert result.distances[3] == edit_distance(counting_suffix(prefixes[3], 48), golds[3])
    assert result.distances[4] == 1 and result.suffix_lengths == [48] * 4 + [8]
    assert result.generated == [counting_suffix(p, len(g)) for p, g in zip(prefixes, golds)]
    assert (result.strict, result.loose, result.total) == (1, 3, 5)
    assert result.strict_acc == 1 / 5 and result.loose_acc == 3 / 5
    expected = (0 + 12 / 48 + 13 / 48 + result.distances[3] / 48 + 1 / 8) / 5
    assert result.avg_levenshtein_norm == pytest.approx(expected, rel=1e-12)
    assert metrics.memorization(model, windows, loose=0.74, progress=False).loose == 3  # 1 - 13/48 = 0.729
    assert metrics.memorization(model, windows, loose=0.72, progress=False).loose == 4
    assert metrics.memorization(model, windows, loose=1.0, progress=False).loose == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padding_changes_nothing(arch):
    """Batched, left-padded generation = one window at a time = transformers' own greedy generate."""
    model = tiny_model(arch).double()
    windows = [Window(tuple(rand_ids(n, 3)), tuple(rand_ids(m, 3))) for n, m in ((5, 4), (11, 4), (2, 4), (8, 3),
                                                                                 (1, 3))]
    batched = metrics.memorization(model, windows, batch_size=3, progress=False)
    single = metrics.memorization(model, windows, batch_size=1, progress=False)
    assert batched == single
    for w, g in zip(windows, batched.generated):
        ref = model.generate(torch.tensor([w.prefix]), attention_mask=torch.ones(1, len(w.prefix), dtype=torch.long),
                             max_new_tokens=len(w.suffix), do_sample=False, eos_token_id=None, pad_token_id=0)
        assert g == ref[0, len(w.prefix):].tolist()
    assert batched.distances == [edit_distance(g, w.suffix) for g, w in zip(batched.generated, windows)]
    assert model.training is False


def test_memorization_restores_training_mode_and_checks_inputs():
    model = Counting().train()
    w = Window((1, 2), (3, 4))
    metrics.memorization(model, [w], progress=False)
    assert model.training
    with pytest.raises(ValueError, match="loose must be in"):
        metrics.memorization(model, [w], loose=1.5, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        metrics.memorization(model, [w], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="no windows"):
        metrics.memorization(model, [], progress=False)
    with pytest.raises(ValueError, match="window 1 has an empty suffix"):
        metrics.memorization(model, [w, Window((1,), ())], progress=False)
    with pytest.raises(ValueError, match=f"window 0 has token id {VOCAB}, outside"):
        metrics.memorization(tiny_model(), [Window((1, VOCAB), (2,))], progress=False)


def test_load_windows_id_and_text_formats(tmp_path):
    prefix, suffix = rand_ids(64), rand_ids(48)
    ids = tmp_path / "dolma.jsonl"
    ids.write_text(json.dumps({"doc_index": 3, "start": 10, "prefix_ids": prefix, "suffix_ids": suffix}) + "\n\n")
    assert metrics.load_memorization_windows(ids) == [Window(tuple(prefix), tuple(suffix))]

    from tokenizers import processors

    tok = char_tokenizer()  # with a BOS post-processor: the loader must not add it
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok("ab")["input_ids"][0] == 1
    text = tmp_path / "quotes.jsonl"
    text.write_text("\n".join(json.dumps(r) for r in [{"prefix": "To be or ", "target_suffix": "not to be"},
                                                      {"prefix_text": "Veni, ", "suffix": "vidi"}]))
    windows = metrics.load_memorization_windows(text, tok)
    plain = lambda s: tuple(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert windows == [Window(plain("To be or "), plain("not to be")), Window(plain("Veni, "), plain("vidi"))]
    assert 1 not in windows[0].prefix


@pytest.mark.parametrize("content, message", [
    ('{"prefix_ids": [1, 2]}', "dolma.jsonl:1: prefix_ids and suffix_ids must be lists"),
    ('{"prefix_ids": [1], "suffix_ids": [2]}\n{"prefix_ids": [1], "suffix_ids": []}', "dolma.jsonl:2: empty suffix"),
    ('{"prefix_ids": [1, -2], "suffix_ids": [2]}', "must be lists of token ids"),
    ('{"text": "x"}', "dolma.jsonl:1: expected prefix_ids/suffix_ids, or prefix/target_suffix"),
    ('{"prefix": "a", "target_suffix": "b"}', "text windows need a tokenizer"),
    ("[1, 2]", "expected an object"),
    ("{nope", "dolma.jsonl:1: not JSON"),
    ("\n\n", "no memorisation windows"),
])
def test_load_windows_errors(tmp_path, content, message):
    path = tmp_path / "dolma.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        metrics.load_memorization_windows(path)


def test_load_windows_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="memorisation file not found: .*nope.jsonl"):
        metrics.load_memorization_windows(tmp_path / "nope.jsonl")


# ------------------------------------------------------------------------------------------------ nDCG
def ndcg_by_hand(predicted, baseline):
    k = len(baseline)
    rel = [k - baseline.index(t) if t in baseline else 0 for t in predicted]
    return sum(r / math.log2(i + 2) for i, r in enumerate(rel)) / sum((k - i) / math.log2(i + 2) for i in range(k))


def test_ndcg_at_k_hand_cases():
    base = torch.randperm(VOCAB)[:10]
    assert metrics.ndcg_at_k(base, base).item() == pytest.approx(1.0, abs=1e-15)
    swapped = base.clone()
    swapped[[0, 1]] = base[[1, 0]]
    idcg = sum((10 - r) / math.log2(r + 2) for r in range(10))
    by_hand = (9 / 1 + 10 / math.log2(3) + sum((10 - r) / math.log2(r + 2) for r in range(2, 10))) / idcg
    assert metrics.ndcg_at_k(swapped, base).item() == pytest.approx(by_hand, rel=1e-14)
    missing = base.clone()
    missing[3] = next(t for t in range(VOCAB) if t not in base.tolist())  # relevance 0 at rank 3
    assert metrics.ndcg_at_k(missing, base).item() == pytest.approx(1 - (10 - 3) / math.log2(5) / idcg, rel=1e-14)
    reversed_ = base.flip(0)
    assert metrics.ndcg_at_k(reversed_, base).item() == pytest.approx(ndcg_by_hand(reversed_.tolist(), base.tolist()))


def test_ndcg_at_k_random_against_hand():
    base = torch.stack([torch.randperm(15)[:10] for _ in range(40)]).reshape(4, 10, 10)
    pred = torch.stack([torch.randperm(15)[:10] for _ in range(40)]).reshape(4, 10, 10)
    got = metrics.ndcg_at_k(pred, base)
    want = torch.tensor([ndcg_by_hand(p, b) for p, b in zip(pred.reshape(-1, 10).tolist(),
                                                            base.reshape(-1, 10).tolist())], dtype=torch.float64)
    assert torch.allclose(got.reshape(-1), want, rtol=1e-13, atol=0)


def swap_top_two(table):
    """The same logits with each row's best and second-best values swapped."""
    out = table.clone()
    top = table.topk(2, dim=-1).indices
    rows = torch.arange(len(table))
    out[rows, top[:, 0]], out[rows, top[:, 1]] = table[rows, top[:, 1]], table[rows, top[:, 0]]
    return out


def test_ndcg_end_to_end_on_known_rankings(tmp_path):
    table = torch.randn(VOCAB, VOCAB, dtype=torch.float64)
    base_model, edited = Lookup(table), Lookup(swap_top_two(table))
    tokens = torch.randint(0, VOCAB, (5, 13))
    baseline = metrics.ndcg_baseline(base_model, tokens, k=10, batch_size=2, progress=False)
    assert baseline.top_ids.shape == (5, 12, 10) and baseline.top_ids.dtype == torch.int32
    assert torch.equal(baseline.top_ids, table[tokens[:, :-1]].topk(10, dim=-1).indices.int())
    path = metrics.save_ndcg_baseline(baseline, tmp_path / "sub" / "base.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["base.safetensors"]  # no temporary file left
    loaded = metrics.load_ndcg_baseline(path)
    assert torch.equal(loaded.top_ids, baseline.top_ids) and loaded.path == path
    assert (loaded.k, loaded.seq_len, loaded.tokens_hash, loaded.model_hash, loaded.model_dtype) == \
        (10, 13, metrics.tokens_hash(tokens), metrics.model_hash(base_model), "float64")

    assert metrics.ndcg(base_model, tokens, loaded, progress=False) == pytest.approx(1.0, abs=1e-15)
    idcg = sum((10 - r) / math.log2(r + 2) for r in range(10))
    by_hand = (9 + 10 / math.log2(3) + sum((10 - r) / math.log2(r + 2) for r in range(2, 10))) / idcg
    assert metrics.ndcg(edited, tokens, loaded, batch_size=3, progress=False) == pytest.approx(by_hand, rel=1e-13)
    assert metrics.model_hash(edited) != loaded.model_hash


def test_ndcg_batched_on_a_tiny_model():
    model = tiny_model("llama")
    tokens = torch.randint(0, VOCAB, (5, 9))
    baseline = metrics.ndcg_baseline(model, tokens, k=4, batch_size=5, progress=False)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(0.2)
    scores = [metrics.ndcg(model, tokens, baseline, k=4, batch_size=b, progress=False) for b in (1, 2, 5)]
    with torch.no_grad():
        want = metrics.ndcg_at_k(model(tokens).logits[:, :-1].topk(4, dim=-1).indices, baseline.top_ids).mean()
    assert scores == pytest.approx([want.item()] * 3, rel=1e-12) and scores[0] < 1


def test_ndcg_refuses_missing_or_mismatched_baselines(tmp_path):
    model = Lookup(torch.randn(VOCAB, VOCAB))
    tokens = torch.randint(0, VOCAB, (3, 8))
    path = metrics.save_ndcg_baseline(metrics.ndcg_baseline(model, tokens, k=5, progress=False), tmp_path / "b.st")
    baseline = metrics.load_ndcg_baseline(path)
    with pytest.raises(ValueError, match="needs a baseline made from the unedited model"):
        metrics.ndcg(model, tokens, None, k=5)
    other = tokens.clone()
    other[1, 4] = (other[1, 4] + 1) % VOCAB
    with pytest.raises(ValueError, match=f"nDCG baseline {path} was made for other tokens"):
        metrics.ndcg(model, other, baseline, k=5)
    with pytest.raises(ValueError, match=f"nDCG baseline {path} was made for k = 5, not 10"):
        metrics.ndcg(model, tokens, baseline, k=10)
    with pytest.raises(ValueError, match="was made for seq_len = 8, not 6"):
        metrics.ndcg(model, tokens[:, :6], baseline, k=5)
    with pytest.raises(ValueError, match="was made for rows = 3, not 2"):
        metrics.ndcg(model, tokens[:2], baseline, k=5)
    with pytest.raises(FileNotFoundError, match=f"nDCG baseline not found: {tmp_path / 'nope'}"):
        metrics.load_ndcg_baseline(tmp_path / "nope")
    (tmp_path / "junk").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk: not an nDCG baseline file"):
        metrics.load_ndcg_baseline(tmp_path / "junk")
    with pytest.raises(ValueError, match="tokens must be integer ids"):
        metrics.ndcg_baseline(model, tokens.float(), progress=False)


def test_hashes_see_every_change():
    model = tiny_model()
    h = metrics.model_hash(model)
    assert h == metrics.model_hash(model)
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[3, 7] += 1e-3
    assert metrics.model_hash(model) != h
    assert metrics.model_hash(model.to(torch.bfloat16)) != metrics.model_hash(model.float())
    tokens = torch.randint(0, VOCAB, (2, 6))
    assert metrics.tokens_hash(tokens) == metrics.tokens_hash(tokens.int())
    assert metrics.tokens_hash(tokens) != metrics.tokens_hash(tokens.reshape(3, 4))


# ------------------------------------------------------------------------------------------ perplexity
class Fixed(nn.Module):
    """The same next-token distribution ``p`` everywhere: a token t costs exactly −log p[t]."""

    def __init__(self, p: torch.Tensor):
        super().__init__()
        self.logp = nn.Parameter(p.log())

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.logp.expand(*input_ids.shape, -1))


def test_perplexity_known_probabilities():
    p = torch.rand(VOCAB, dtype=torch.float64) + 0.05
    p /= p.sum()
    tokens = torch.randint(0, VOCAB, (7, 11))
    want = math.exp(-p.log()[tokens[:, 1:]].mean().item())
    for b in (1, 3, 7):
        assert metrics.perplexity(Fixed(p), tokens, batch_size=b, progress=False) == pytest.approx(want, rel=1e-12)
    uniform = torch.full((VOCAB,), 1 / VOCAB, dtype=torch.float64)
    assert metrics.perplexity(Fixed(uniform), tokens, progress=False) == pytest.approx(VOCAB, rel=1e-12)
    assert metrics.perplexity(Fixed(uniform.float()), tokens, progress=False) == pytest.approx(VOCAB, rel=1e-5)


def test_mean_batch_perplexity_is_the_originals_formula():
    """Batches with different mean NLL: the mean of per-batch perplexities is not the corpus perplexity."""
    p = torch.rand(VOCAB, dtype=torch.float64) + 0.01
    p /= p.sum()
    likely, unlikely = p.argmax().item(), p.argmin().item()
    tokens = torch.tensor([[likely] * 9] * 2 + [[unlikely] * 9] * 2 + [[likely, unlikely] * 4 + [likely]])
    nll = -p.log()[tokens[:, 1:]]
    batches = [nll[0:2], nll[2:4], nll[4:5]]
    want = sum(math.exp(b.mean().item()) for b in batches) / 3
    got = metrics.mean_batch_perplexity(Fixed(p), tokens, batch_size=2, progress=False)
    assert got == pytest.approx(want, rel=1e-12)
    corpus = metrics.perplexity(Fixed(p), tokens, progress=False)
    assert corpus == pytest.approx(math.exp(nll.mean().item()), rel=1e-12) and abs(got - corpus) > 0.1 * corpus
    assert metrics.mean_batch_perplexity(Fixed(p), tokens, batch_size=5, progress=False) == pytest.approx(corpus)


@pytest.mark.parametrize("side", ["left", "right"])
def test_perplexity_padding_changes_nothing(side):
    model = tiny_model("llama").double()
    rows = [torch.randint(0, VOCAB, (n,)) for n in (7, 11, 4)]
    total = count = 0.0
    with torch.no_grad():
        for r in rows:
            logp = model(r[None]).logits[0, :-1].log_softmax(-1)
            total, count = total - logp[torch.arange(len(r) - 1), r[1:]].sum().item(), count + len(r) - 1
    tokens = torch.zeros((3, 11), dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, r in enumerate(rows):
        span = slice(0, len(r)) if side == "right" else slice(11 - len(r), 11)
        tokens[i, span], mask[i, span] = r, 1
    got = metrics.perplexity(model, tokens, attention_mask=mask, batch_size=2, progress=False)
    assert got == pytest.approx(math.exp(total / count), rel=1e-12)


def test_perplexity_checks_inputs():
    model = Fixed(torch.full((VOCAB,), 1 / VOCAB))
    tokens = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="does not match tokens"):
        metrics.perplexity(model, tokens, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="no predicted tokens"):
        metrics.perplexity(model, tokens, attention_mask=torch.zeros(2, 5), progress=False)
    with pytest.raises(ValueError, match="seq_len ≥ 2"):
        metrics.perplexity(model, tokens[:, :1])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        metrics.mean_batch_perplexity(model, tokens, batch_size=0)
