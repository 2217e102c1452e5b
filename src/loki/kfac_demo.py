"""``loki demo kfac``: the K-FAC curvature edit (Merullo et al. 2025) against verbatim memorisation, on a CPU.

1. **World and model.** A tiny Llama (:func:`kfac_llama`, built from a config; word tokenizer
   :func:`loki.demo.word_tokenizer`) is trained in-process on a mix of three kinds of 40-token rows, a third each
   per step:

   * *memorised*: :attr:`KfacDemoArgs.memorised` fixed random token strings (uniform over the grammar words and
     digits), each seen ~150 times in the default run, to be recited verbatim;
   * *skill*: sorting five digits (``sort 3 1 4 1 5 = 1 1 3 4 5 ;``, three per row), fresh random instances every
     step (never one of the held-out instances), so it must be computed, not recalled;
   * *text*: sentences of a small generated grammar (subject-verb number agreement), fresh every step; held-out
     rows of it give a perplexity that measures neither the memorised strings nor the skill.

   ``steps`` AdamW steps (warm-up, then a cosine to a tenth of the rate); strict memorisation and skill accuracy
   are reported before any edit (a seed below :data:`MEM_TARGET` / :data:`SKILL_TARGET` is flagged).
2. **Factors.** :func:`loki_kernels.kfac.collect_factors` (MC Fisher, sampled labels) on *general* data only,
   fresh skill and text rows, never the memorised strings (the role of the paper's pretraining corpus), for the
   gate and up projections of layers :data:`EDIT_LAYERS` = (1, 2): the middle two of the four layers, neither
   the first nor the last, the tiny model's stand-in for the paper's layers 23-25 of OLMo-2-7B's 32.
3. **Edits.** At each ρ the same projections are edited four ways, each from the unedited weights:

   * ``product`` (the paper's): keep the eigenpairs ``(i, j)`` of ``G ⊗ A`` with the largest ``λ_i μ_j`` up to
     a fraction ρ of the curvature mass (:func:`loki_kernels.kfac.apply_edit`);
   * ``lowest`` (control): keep the *same number* of pairs in each projection, the lowest-curvature ones;
   * ``random`` (control): keep the same number of pairs, uniformly at random;
   * ``per_factor`` (the original's baseline): truncate ``G`` and ``A`` each at their own ρ.

   A last row keeps no pair (gate and up zero: those MLPs switched off), the floor every edit tends to. If the
   paper's reading holds (memorisation lives in the low-curvature mass, shared computation in the high), ``product``
   removes memorisation while keeping the skill better than the controls. The numbers are whatever they come out
   as; nothing is tuned for either outcome.
4. **Metrics** (:mod:`loki_kernels.metrics`): strict / loose memorisation and mean normalised Levenshtein distance
   on prefix → suffix windows of the memorised strings (:data:`PREFIX_LEN` tokens with BOS, then a 24-token
   suffix, greedy), skill accuracy (all five answer digits right, teacher-forced argmax, which is what greedy
   decoding of the answer gives), perplexity on held-out text, nDCG@10 of the next-token rankings on held-out
   text and skill rows against the unedited model. A table (mean ± sd over the seeds) printed and written to
   ``results.txt``, ``results.json`` (every seed's numbers and training log) and ``kfac_demo.png``.

**ρ grid.** The tiny model's curvature is concentrated: ρ = 0.9 already keeps under a tenth of the gate/up
eigenpairs, and the paper's ρ = 0.6 about 1%, so the default grid (:data:`RHOS`) runs from 0.999 down to 0.6.

Where this differs from the paper: the model is tiny and trained here; the memorised data is random strings (the
paper's are Dolma windows OLMo recites); the curvature corpus comes from the general training distribution itself;
the ``lowest`` and ``random`` controls are not in the original code; ρ ≥ :data:`~loki_kernels.kfac.edit.SKIP_RHO`
leaves a projection untouched for every method, as :func:`~loki_kernels.kfac.apply_edit` (and the original) does.
Nothing is downloaded.

**Threads.** The run uses one torch thread by default (:attr:`KfacDemoArgs.threads`, restored afterwards): the
matmuls are too small (hidden 64) for intra-op threads to pay, and on a shared two-core machine two threads made
a training step several times slower than one.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from loki_kernels.arch import find_mlps, row_view
from loki_kernels.files import atomic_write
from loki_kernels.kfac import Edit, Factors, apply_edit, collect_factors, eigen, select_pairs
from loki_kernels.kfac.edit import SKIP_RHO
from loki_kernels.metrics import Window, memorization, ndcg, ndcg_baseline, perplexity

from .demo import mean_sd, word_tokenizer

__all__ = [
    "EDIT_LAYERS",
    "EDIT_MODULES",
    "METHODS",
    "MODEL",
    "PREFIX_LEN",
    "RHOS",
    "SEQ_LEN",
    "KfacDemoArgs",
    "KfacWorld",
    "edit_model",
    "evaluate",
    "format_kfac_table",
    "kept_fraction",
    "kfac_llama",
    "make_kfac_world",
    "plot_kfac",
    "run_kfac_demo",
    "skill_accuracy",
    "train_kfac_model",
]

# ------------------------------------------------------------------------------------------ the world
SEQ_LEN = 40  # every row: BOS + 39 tokens (no padding anywhere)
PREFIX_LEN = 16  # memorisation windows: BOS + 15 tokens of prefix, then the 24-token suffix
SORT_DIGITS = 5  # the skill: sort five digits; 13 tokens per instance, 3 per row
SKILL_PER_ROW = 3
CHECK_EVERY = 200  # training steps between checks of memorisation and skill (logged; no early stop)
WARMUP = 50
MEM_TARGET, SKILL_TARGET = 95.0, 90.0  # a seed below these before editing is flagged in the table (%)
EDIT_LAYERS = (1, 2)
EDIT_MODULES = ("gate", "up")
RHOS = (0.999, 0.995, 0.99, 0.95, 0.9, 0.6)
METHODS = ("product", "lowest", "random", "per_factor")
MODEL = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2}

NOUNS = {"cat": "cats", "dog": "dogs", "bird": "birds", "fox": "foxes", "king": "kings", "girl": "girls",
         "boy": "boys", "horse": "horses"}
VERBS = {"sees": "see", "likes": "like", "finds": "find", "chases": "chase", "helps": "help", "knows": "know",
         "meets": "meet", "follows": "follow"}
ADJECTIVES = ("big", "small", "red", "old", "young", "quiet", "happy", "green")
PREPOSITIONS = ("near", "under", "behind", "with")
SINGULAR_DETS, PLURAL_DETS = ("a", "the", "one"), ("the", "some", "two")
DIGITS = tuple(str(d) for d in range(10))
SKILL_WORDS = ("sort", "=", ";")
TEXT_WORDS = tuple(sorted({*NOUNS, *NOUNS.values(), *VERBS, *VERBS.values(), *ADJECTIVES, *PREPOSITIONS,
                           *SINGULAR_DETS, *PLURAL_DETS, "."}))


def sentence(rng: random.Random) -> list[str]:
    """One sentence of the grammar: ``NP VERB NP [PREP NP] .``, the verb agreeing with the subject in number."""
    def noun_phrase(plural: bool) -> list[str]:
        noun = rng.choice(list(NOUNS))
        adjective = [rng.choice(ADJECTIVES)] if rng.random() < 0.5 else []
        return [rng.choice(PLURAL_DETS if plural else SINGULAR_DETS), *adjective, NOUNS[noun] if plural else noun]

    plural = rng.random() < 0.5
    verb = rng.choice(list(VERBS))
    words = noun_phrase(plural) + [VERBS[verb] if plural else verb] + noun_phrase(rng.random() < 0.5)
    if rng.random() < 0.4:
        words += [rng.choice(PREPOSITIONS)] + noun_phrase(rng.random() < 0.5)
    return words + ["."]


@dataclass
class KfacWorld:
    """One seed's data as token ids ``long[rows, SEQ_LEN]`` (every row starts with BOS), and its row generators."""

    seed: int
    tokenizer: object
    vocab: dict[str, int]
    memorised: Tensor  # the strings to recite
    heldout_text: Tensor  # perplexity
    heldout_skill: Tensor  # skill accuracy: instances training never draws
    ndcg_rows: Tensor  # held-out text and skill rows: nDCG@10 against the unedited model
    rng: random.Random = field(repr=False, default_factory=random.Random)  # fresh rows (training, factors)
    heldout_inputs: set = field(repr=False, default_factory=set)  # the held-out sorting inputs

    @property
    def windows(self) -> list[Window]:
        """Prefix → suffix windows of the memorised strings."""
        return [Window(tuple(r[:PREFIX_LEN]), tuple(r[PREFIX_LEN:])) for r in self.memorised.tolist()]

    @staticmethod
    def answer_positions() -> list[int]:
        """The columns of a skill row that hold answer digits (instance by instance, digit by digit)."""
        block = 2 * SORT_DIGITS + 3  # sort, digits, =, answer, ;
        return [1 + b * block + SORT_DIGITS + 2 + d for b in range(SKILL_PER_ROW) for d in range(SORT_DIGITS)]

    def ids(self, words: list[str]) -> list[int]:
        return [self.vocab[w] for w in words]

    def text_rows(self, n: int, rng: random.Random | None = None) -> Tensor:
        """``n`` rows of grammar sentences packed back to back, cut at :data:`SEQ_LEN`."""
        rng = rng or self.rng
        rows = []
        for _ in range(n):
            words: list[str] = []
            while len(words) < SEQ_LEN - 1:
                words += sentence(rng)
            rows.append([self.vocab["<s>"]] + self.ids(words[:SEQ_LEN - 1]))
        return torch.tensor(rows, dtype=torch.long)

    def skill_rows(self, n: int, rng: random.Random | None = None) -> Tensor:
        """``n`` rows of :data:`SKILL_PER_ROW` fresh sorting instances each, none of them a held-out input."""
        rng = rng or self.rng
        rows = []
        for _ in range(n):
            words: list[str] = []
            for _ in range(SKILL_PER_ROW):
                digits = tuple(rng.randrange(10) for _ in range(SORT_DIGITS))
                while digits in self.heldout_inputs:
                    digits = tuple(rng.randrange(10) for _ in range(SORT_DIGITS))
                words += ["sort", *map(str, digits), "=", *map(str, sorted(digits)), ";"]
            rows.append([self.vocab["<s>"]] + self.ids(words))
        return torch.tensor(rows, dtype=torch.long)


def make_kfac_world(seed: int, memorised: int = 40, heldout: int = 96) -> KfacWorld:
    """The seed's memorised strings (distinct prefixes, so each window has one right suffix), held-out text and
    skill rows, and the generator of fresh rows."""
    if isinstance(memorised, bool) or not isinstance(memorised, int) or memorised < 1:
        raise ValueError(f"memorised must be a positive integer, got {memorised!r}")
    if isinstance(heldout, bool) or not isinstance(heldout, int) or heldout < 2:
        raise ValueError(f"heldout must be an integer ≥ 2, got {heldout!r}")
    tokenizer = word_tokenizer([*TEXT_WORDS, *DIGITS, *SKILL_WORDS])
    vocab = dict(tokenizer.get_vocab())
    rng = random.Random(f"kfac-demo world {seed}")
    content = [vocab[w] for w in (*TEXT_WORDS, *DIGITS)]
    strings: list[tuple[int, ...]] = []
    prefixes: set[tuple[int, ...]] = set()
    while len(strings) < memorised:
        s = tuple(rng.choice(content) for _ in range(SEQ_LEN - 1))
        if s[:PREFIX_LEN - 1] not in prefixes:
            prefixes.add(s[:PREFIX_LEN - 1])
            strings.append(s)
    empty = torch.empty(0, SEQ_LEN, dtype=torch.long)
    world = KfacWorld(seed, tokenizer, vocab, torch.tensor([[vocab["<s>"], *s] for s in strings]), empty, empty,
                      empty, random.Random(f"kfac-demo fresh rows {seed}"))
    heldout_rng = random.Random(f"kfac-demo held out {seed}")
    world.heldout_text = world.text_rows(heldout, heldout_rng)
    world.heldout_skill = world.skill_rows(heldout, heldout_rng)
    starts = [1 + b * (2 * SORT_DIGITS + 3) + 1 for b in range(SKILL_PER_ROW)]
    world.heldout_inputs = {tuple(int(world.tokenizer.convert_ids_to_tokens(int(t)))
                                  for t in row[s:s + SORT_DIGITS]) for row in world.heldout_skill for s in starts}
    world.ndcg_rows = torch.cat([world.heldout_text[: heldout // 2], world.heldout_skill[: heldout // 2]])
    return world


def kfac_llama(vocab_size: int):
    """The demo's model: a Llama built from :data:`MODEL`, half the width of :func:`loki.demo.tiny_llama`
    (hidden 64, d_ff 176, 4 layers, ~0.2M parameters), so that three seeds train in minutes on two cores."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=64, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, **MODEL)
    return LlamaForCausalLM(config)


# ------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def skill_accuracy(model: nn.Module, world: KfacWorld, batch_size: int = 64) -> float:
    """Percentage of held-out sorting instances whose five answer digits are all the model's argmax given the
    row so far (teacher-forced; greedy decoding of the answer gives the same instances right)."""
    training = model.training
    model.eval()
    positions = torch.tensor(world.answer_positions())
    right = []
    try:
        for s in range(0, len(world.heldout_skill), batch_size):
            ids = world.heldout_skill[s:s + batch_size]
            pred = model(input_ids=ids).logits[:, positions - 1].argmax(-1)
            right.append((pred == ids[:, positions]).reshape(len(ids), SKILL_PER_ROW, SORT_DIGITS).all(-1).reshape(-1))
    finally:
        model.train(training)
    return 100.0 * torch.cat(right).double().mean().item()


def evaluate(model: nn.Module, world: KfacWorld, baseline) -> dict[str, float]:
    """Every metric of one model state: ``strict``/``loose`` (%), ``levenshtein`` (mean d/L), ``skill`` (%),
    ``perplexity``, ``ndcg`` (against ``baseline``, the unedited model's :func:`~loki_kernels.metrics.ndcg_baseline`
    on ``world.ndcg_rows``)."""
    mem = memorization(model, world.windows, batch_size=64, progress=False)
    return {"strict": 100.0 * mem.strict_acc, "loose": 100.0 * mem.loose_acc,
            "levenshtein": mem.avg_levenshtein_norm, "skill": skill_accuracy(model, world),
            "perplexity": perplexity(model, world.heldout_text, batch_size=64, progress=False),
            "ndcg": ndcg(model, world.ndcg_rows, baseline, k=10, batch_size=64, progress=False)}


# ------------------------------------------------------------------------------------------- training
def train_kfac_model(model: nn.Module, world: KfacWorld, *, steps: int, batch_size: int = 30, lr: float = 3e-3,
                     progress: bool = True, desc: str = "training") -> dict:
    """AdamW (no weight decay) for ``steps`` steps, each on a third memorised rows, a third fresh skill rows and a
    third fresh text rows; the rate warms up over :data:`WARMUP` steps, then falls on a cosine to a tenth.
    Strict memorisation and skill are measured every :data:`CHECK_EVERY` steps and at the end.
    Returns ``{"steps", "strict", "skill", "seconds", "checks"}`` (``strict``, ``skill``: at the end, in %)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / WARMUP
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * (step - WARMUP) / max(1, steps - WARMUP)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    rng = random.Random(f"kfac-demo training {world.seed}")
    n_mem = batch_size // 3
    n_skill = (batch_size - n_mem) // 2
    n_text = batch_size - n_mem - n_skill
    start = time.perf_counter()
    checks = []
    strict = skill = 0.0
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    try:
        for step in bar:
            model.train()
            idx = torch.tensor([rng.randrange(len(world.memorised)) for _ in range(n_mem)], dtype=torch.long)
            ids = torch.cat([world.memorised[idx], world.skill_rows(n_skill, rng), world.text_rows(n_text, rng)])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if (step + 1) % CHECK_EVERY == 0 or step + 1 == steps:
                model.eval()
                strict = 100.0 * memorization(model, world.windows, batch_size=64, progress=False).strict_acc
                skill = skill_accuracy(model, world)
                checks.append({"step": step + 1, "loss": loss.item(), "strict": strict, "skill": skill})
                bar.set_postfix(loss=f"{loss.item():.3f}", strict=f"{strict:.0f}%", skill=f"{skill:.0f}%")
    finally:
        bar.close()
        model.eval()
    return {"steps": steps, "strict": strict, "skill": skill, "seconds": time.perf_counter() - start,
            "checks": checks}


# ---------------------------------------------------------------------------------------------- edits
def edit_model(model: nn.Module, factors: Factors, rho: float, method: str, *, layers=EDIT_LAYERS,
               seed: int = 0) -> Edit:
    """Edit gate and up of ``layers`` in place by ``method`` (:data:`METHODS`) at ``rho``; ``.restore()`` (or
    leaving a ``with`` block) puts the weights back bit-exactly.

    ``product`` / ``per_factor``: :func:`loki_kernels.kfac.apply_edit`. ``lowest`` / ``random``: each projection
    keeps as many eigenpairs of ``G ⊗ A`` as ``product`` keeps there (``Σ k_i`` of
    :func:`~loki_kernels.kfac.select_pairs`), the smallest products ``λ_i μ_j`` (ties in ``(i, j)`` order) or a
    uniformly random set (a permutation seeded by ``seed``, layer and module, so the sets of a smaller ρ are
    subsets of a larger one's), and becomes ``U_G (C ⊙ M) U_Aᵀ`` with ``C = U_Gᵀ W U_A`` in float64. Every
    weight is computed before the first is written; ρ ≥ ``SKIP_RHO`` edits nothing.
    """
    if method not in METHODS:
        raise ValueError(f"unknown edit method {method!r}; expected one of {', '.join(METHODS)}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 <= float(rho) <= 1.0:
        raise ValueError(f"rho must be a number in [0, 1], got {rho!r}")
    mlps = find_mlps(model)
    for layer in layers:
        if not 0 <= int(layer) < len(mlps):
            raise ValueError(f"layer {layer} is not a layer of the model (0-{len(mlps) - 1})")
    if method in ("product", "per_factor"):
        plan = {int(layer): {module: float(rho) for module in EDIT_MODULES} for layer in layers}
        return apply_edit(model, factors, plan, method=method, progress=False)
    modules, originals, kept, new = {}, {}, {}, {}
    if rho < SKIP_RHO:
        for layer in map(int, layers):
            for name in EDIT_MODULES:
                linear = getattr(mlps[layer], name).module
                weight = row_view(linear)
                eA, eG = eigen(factors.a(layer, name)), eigen(factors.g(layer, name))
                n_keep = int(select_pairs(eG.values, eA.values, float(rho)).sum())
                products = torch.outer(eG.values, eA.values).reshape(-1)
                if method == "lowest":
                    chosen = torch.sort(products, stable=True).indices[:n_keep]
                else:
                    gen = torch.Generator().manual_seed(seed * 1000 + layer * 10 + EDIT_MODULES.index(name))
                    chosen = torch.randperm(products.numel(), generator=gen)[:n_keep]
                mask = torch.zeros(products.numel(), dtype=torch.bool)
                mask[chosen] = True
                C = eG.vectors.T @ weight.detach().double() @ eA.vectors
                C.masked_fill_(~mask.reshape(C.shape), 0.0)
                new[layer, name] = (eG.vectors @ C @ eA.vectors.T).to(weight.dtype)
                modules[layer, name], originals[layer, name] = linear, linear.weight.detach().clone()
                kept[layer, name] = n_keep
    with torch.no_grad():
        for key, weight in new.items():
            row_view(modules[key]).copy_(weight)
    return Edit(modules, originals, kept, set())


def kept_fraction(model: nn.Module, edit: Edit, layers=EDIT_LAYERS) -> float:
    """Kept eigenpair coefficients over all coefficients of gate and up in ``layers`` (a projection the edit
    left alone counts as fully kept)."""
    mlps = find_mlps(model)
    total = kept = 0
    for layer in layers:
        for name in EDIT_MODULES:
            size = row_view(getattr(mlps[layer], name).module).numel()
            total += size
            kept += edit.kept.get((layer, name), size)
    return kept / total


# --------------------------------------------------------------------------------------------- report
COLUMNS = (  # (key, header, decimals)
    ("kept", "kept %", 1), ("strict", "strict %", 1), ("loose", "loose %", 1), ("levenshtein", "Lev", 3),
    ("skill", "skill %", 1), ("perplexity", "ppl", 2), ("ndcg", "nDCG@10", 3),
)
NONE_KEPT = "none kept"


def _span(layers) -> str:
    layers = sorted(layers)
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)) \
        else ", ".join(map(str, layers))


def format_kfac_table(rows: list[dict], layers, training: list[dict], memorised: int) -> str:
    """The results table: one line per (ρ, edit), the unedited model first; mean ± sd over the seeds."""
    head = ["rho", "edit"] + [h for _, h, _ in COLUMNS]
    body = [[f"{row['rho']:g}", row["method"]]
            + [mean_sd([r[key] for r in row["runs"]], digits) for key, _, digits in COLUMNS] for row in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]

    def fmt(cells: list) -> str:  # the two label columns left-aligned, the numbers right-aligned
        return "  ".join(str(x).ljust(w) if i < 2 else str(x).rjust(w) for i, (x, w) in enumerate(zip(cells, widths)))

    seeds = len(training)
    title = (f"K-FAC edit of gate+up in layer{'s' if len(layers) > 1 else ''} {_span(layers)} of a 4-layer tiny "
             f"Llama: verbatim recitation of {memorised} random strings ({SEQ_LEN - PREFIX_LEN}-token suffixes: "
             f"strict %, loose %, mean normalised Levenshtein), sorting 5 digits (%), held-out text perplexity, "
             f"nDCG@10 vs the unedited model; mean ± sd over {seeds} seed{'s' if seeds > 1 else ''}")
    flagged = [t for t in training if t["strict"] < MEM_TARGET or t["skill"] < SKILL_TARGET]
    trained = "; ".join(f"seed {t['seed']}: strict {t['strict']:.1f}%, skill {t['skill']:.1f}%" for t in training)
    notes = [f"before editing ({training[0]['steps']} training steps): {trained}",
             ("kept % = kept eigenpair coefficients of the edited projections; lowest/random keep as many pairs as "
              f"product at that rho; '{NONE_KEPT}': gate and up zero (those MLPs off); sd = sample sd over seeds")]
    if flagged:
        notes.append(f"WARNING: seed{'s' if len(flagged) > 1 else ''} {', '.join(str(t['seed']) for t in flagged)} "
                     f"below {MEM_TARGET:g}% strict or {SKILL_TARGET:g}% skill before editing (more --steps)")
    return "\n".join([title, "", fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body] + [""]
                     + notes)


def plot_kfac(rows: list[dict], path: Path) -> None:
    """Four panels (strict memorisation, skill, perplexity, nDCG@10) against ρ, one line per edit method from
    the unedited model; the all-removed floor as a dashed line. Written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def stats(row, key):
        t = torch.tensor([r[key] for r in row["runs"]], dtype=torch.float64)
        return float(t.mean()), float(t.std()) if len(t) > 1 else 0.0

    base, edits = rows[0], [r for r in rows[1:] if r["method"] != NONE_KEPT]
    floor = next((r for r in rows if r["method"] == NONE_KEPT), None)
    rhos = sorted({r["rho"] for r in edits}, reverse=True)
    ticks = ["unedited"] + [f"{rho:g}" for rho in rhos]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    panels = [("strict", "strict memorisation (%)"), ("skill", "sorting skill (%)"),
              ("perplexity", "held-out text perplexity"), ("ndcg", "nDCG@10 vs unedited")]
    for ax, (key, label) in zip(axes, panels):
        for method in dict.fromkeys(r["method"] for r in edits):
            points = [stats(base, key)] + [stats(r, key) for rho in rhos for r in edits
                                           if r["method"] == method and r["rho"] == rho]
            ax.errorbar(range(len(points)), [m for m, _ in points], yerr=[s for _, s in points], marker="o",
                        capsize=3, label=method)
        if floor is not None:
            ax.axhline(stats(floor, key)[0], color="grey", linestyle="--", linewidth=1, label=NONE_KEPT)
        ax.set_xticks(range(len(ticks)), ticks, fontsize=8)
        ax.set_xlabel("rho (fraction of curvature mass kept)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle("K-FAC curvature edit of a tiny Llama: the paper's product edit vs same-size controls "
                 f"(mean ± sd over {len(base['runs'])} seed{'s' if len(base['runs']) > 1 else ''})")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


# -------------------------------------------------------------------------------------------- driver
@dataclass
class KfacDemoArgs:
    seed: int = 0
    seeds: int = 3  # seeds seed, seed + 1, ...: world, model, training, MC labels, random control
    out_dir: Path = Path("kfac_demo")
    steps: int = 800  # training steps of the tiny model
    rhos: tuple[float, ...] = RHOS
    methods: tuple[str, ...] = METHODS
    layers: tuple[int, ...] = EDIT_LAYERS
    memorised: int = 40  # random strings to memorise
    batch_size: int = 30  # rows per training step (a third each: memorised, skill, text)
    lr: float = 3e-3
    factor_rows: int = 256  # fresh skill + text rows for the K-FAC factors (no memorised strings)
    threads: int | None = 1  # torch intra-op threads during the run (restored after); None: torch's setting
    progress: bool = True


def _check(args: KfacDemoArgs) -> None:
    """One-line ``ValueError`` for bad arguments, before anything runs."""
    for name in ("seeds", "steps", "memorised", "factor_rows"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(args.batch_size, bool) or not isinstance(args.batch_size, int) or args.batch_size < 3:
        raise ValueError(f"batch_size must be an integer ≥ 3 (a third memorised, skill, text), got {args.batch_size!r}")
    if args.threads is not None and (isinstance(args.threads, bool) or not isinstance(args.threads, int)
                                     or args.threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {args.threads!r}")
    if not args.rhos or not args.methods or not args.layers:
        raise ValueError("rhos, methods and layers must each name at least one")
    for rho in args.rhos:
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 <= float(rho) <= 1.0:
            raise ValueError(f"rho must be a number in [0, 1], got {rho!r}")
    for method in args.methods:
        if method not in METHODS:
            raise ValueError(f"unknown edit method {method!r}; expected one of {', '.join(METHODS)}")
    for layer in args.layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < MODEL["num_hidden_layers"]:
            raise ValueError(f"layer {layer!r} is not a layer of the tiny model (0-{MODEL['num_hidden_layers'] - 1})")


def run_seed(args: KfacDemoArgs, seed: int) -> tuple[dict, list[dict]]:
    """Train, collect factors, edit and score one seed: ``(training log, [{"rho", "method", "kept", metrics}])``."""
    world = make_kfac_world(seed, args.memorised)
    torch.manual_seed(seed)
    model = kfac_llama(len(world.tokenizer)).eval()
    training = train_kfac_model(model, world, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                progress=args.progress, desc=f"seed {seed}: training")
    training["seed"] = seed
    print(f"[1/3] seed {seed}: trained {training['steps']} steps in {training['seconds']:.0f} s: strict "
          f"memorisation {training['strict']:.1f}%, skill {training['skill']:.1f}%", flush=True)

    half = args.factor_rows // 2
    general = torch.cat([world.skill_rows(half), world.text_rows(args.factor_rows - half)])
    general = general[torch.randperm(len(general), generator=torch.Generator().manual_seed(seed))]
    batches = [{"input_ids": general[s:s + 32]} for s in range(0, len(general), 32)]
    factors = collect_factors(model, batches, layers=args.layers, modules=EDIT_MODULES, fisher="mc", seed=seed,
                              progress=args.progress)
    print(f"[2/3] seed {seed}: K-FAC factors (MC Fisher) of gate+up in layers {_span(args.layers)} from "
          f"{factors.n_tokens[str(args.layers[0])]} positions of fresh skill + text rows (no memorised strings)",
          flush=True)

    baseline = ndcg_baseline(model, world.ndcg_rows, k=10, batch_size=64, progress=False)
    rows = [{"rho": 1.0, "method": "unedited", "kept": 100.0, **evaluate(model, world, baseline)}]
    jobs = [(float(rho), method) for rho in args.rhos for method in args.methods] + [(0.0, NONE_KEPT)]
    for rho, method in tqdm(jobs, desc=f"seed {seed}: edits", disable=not args.progress, leave=False):
        with edit_model(model, factors, rho, "product" if method == NONE_KEPT else method, layers=args.layers,
                        seed=seed) as e:
            rows.append({"rho": rho, "method": method, "kept": 100.0 * kept_fraction(model, e, args.layers),
                         **evaluate(model, world, baseline)})
    return training, rows


def run_kfac_demo(args: KfacDemoArgs) -> dict:
    """Every seed, then the table (printed and ``results.txt``), ``results.json`` and ``kfac_demo.png`` in
    ``args.out_dir``. Returns what ``results.json`` holds: ``rows`` (``rho``, ``method``, ``runs``: one dict of
    numbers per seed), ``training`` (per seed), ``seeds``, ``settings``, ``model``, ``edited``, ``seconds``."""
    _check(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seed, args.seed + args.seeds))
    start = time.perf_counter()
    training, per_seed = [], []
    threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        for seed in seeds:
            log, rows = run_seed(args, seed)
            training.append(log)
            per_seed.append(rows)
    finally:
        torch.set_num_threads(threads)
    rows = [{"rho": row["rho"], "method": row["method"],
             "runs": [{k: v for k, v in seed_rows[i].items() if k not in ("rho", "method")} for seed_rows in per_seed]}
            for i, row in enumerate(per_seed[0])]
    table = format_kfac_table(rows, args.layers, training, args.memorised)
    print("[3/3] results\n" + table)
    settings = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in args.__dict__.items()}
    result = {"seeds": seeds, "settings": settings, "model": dict(MODEL),
              "edited": {"layers": list(args.layers), "modules": list(EDIT_MODULES)}, "training": training,
              "rows": rows, "seconds": time.perf_counter() - start}
    atomic_write(out / "results.txt", lambda tmp: Path(tmp).write_text(table + "\n", encoding="utf-8"))
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n",
                                                                    encoding="utf-8"))
    plot_kfac(rows, out / "kfac_demo.png")
    print(f"table, JSON and plot written to {out}/ ({result['seconds']:.0f} s)")
    return result
