"""``loki demo ica``: ICA functional networks (Liu et al., ICML 2025; FunctionalNetworksSFT) on a CPU in minutes.

1. **World and model.** The LoKI demo's tiny Llama (:func:`loki.demo.tiny_llama`: hidden 128, 4 layers, so
   512 MLP-output channels) and word tokenizer, trained in-process (:func:`loki.demo.pretrain`) on four generated
   tasks of different kinds, so that functional networks have something to separate: made-up *facts* and
   *addition* (the LoKI demo's), *reverse* (copy three syllables in reverse order: a 3-token answer) and *max*
   (the larger of two digits). Accuracy is exact match of every answer token (teacher-forced argmax).
2. **Templates** from the model's own data: up to :data:`TEMPLATE_SAMPLES` sequences of each task (Liu et al.
   take 100 per dataset), one ICA over the MLP outputs of all layers (:mod:`loki_kernels.ica`: FNSFT's pipeline,
   10 components, ``exact`` PCA since 512 features are below FNSFT's PCA limit of 1000). The same spatial maps are
   thresholded twice (:func:`~loki_kernels.ica.templates_from_maps`, the last step of
   :func:`~loki_kernels.ica.build_templates`): at FNSFT's 98th percentile (each network the top 2% of its map:
   ~11 of 512 channels; the union of the 10 is about a fifth of all channels) and at :data:`SMALL_PERCENTILE` =
   99.9 (each network its peak channel: 1 of 512, 0.2%, the paper's 15-72 of GPT-2's 9,216 neurons scaled to this
   model), whose union over the 10 components is the paper's "< 2%" (at most 10 of 512 = 1.95%; the run reports
   the actual fraction: overlapping components make it smaller).
3. **Lesion** (the paper's inference-time experiment, :func:`loki_kernels.lesion`): zero the union of the 10
   networks vs random channel sets with the same number of channels *in each layer* (a stricter control than
   the paper's, which draws over all neurons) and a random 15% of all ``(layer, channel)`` pairs (the paper's),
   :attr:`IcaDemoArgs.draws` draws each; also *keep only* the networks (zero every other channel of each layer
   the networks touch: the mask the preserve fine-tune trains under) vs keep only random rows of the same counts.
4. **Preserve + anti-drift fine-tune** on a new task (the LoKI demo's new facts): ``patch_model(model,
   positions(templates, all, "preserve"), silence=silenced(templates, all, "preserve"))`` with the 98th-percentile
   networks: only their ``down_proj`` rows train, every other row of those layers outputs 0 during training, all
   else is frozen (kfac_ica.md §4.1). Controls: random rows of the same per-layer counts with the same silencing
   rule (do the *networks* matter?), the network rows without silencing (does the *silencing* matter?), and full
   fine-tuning. Each method sweeps its family's learning rates (:data:`LR_SWEEP`) on the first seed and keeps the
   lowest that reaches :attr:`IcaDemoArgs.threshold` % on the new task, else its best (:func:`loki.demo.choose_lr`,
   the LoKI demo's fairness rule); the other seeds rerun it at that rate. Scored on the model as saved
   (silencing off, as FNSFT saves it): new-task accuracy, every old task, the forgetting score, trainable
   parameters and the bytes of AdamW's state tensors after training; the new-task accuracy with the silencing
   still on is reported too.

Per seed (``seed, seed + 1, ...``) everything varies: the world (subjects, facts, reverse and max instances, new
facts), the model's initialisation and pretraining batches, the FastICA initialisation, the random channel sets
and the fine-tuning batches. A table (mean ± sd over the seeds; random sets over seeds × draws), ``results.txt``,
``results.json`` and ``ica_demo.png`` are written. Nothing is downloaded and nothing is tuned for the networks
to win.

Differences from the paper and FNSFT: the model is tiny and trained here; the paper runs CanICA on pretrained
models and evaluates downstream benchmarks; its random control draws over all neurons, ours (same size) matches
the networks' per-layer counts; FNSFT's preserve fine-tune trains the whole model (or LoRA) besides the
anti-drift rows, ours only the network rows (the split-linear equivalent, kfac_ica.md §4.1, at weight decay 0).

**Threads.** One torch thread by default (:attr:`IcaDemoArgs.threads`, restored afterwards): the matmuls are too
small for intra-op threads to pay, and on a shared two-core machine two threads ran many times slower.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from loki_kernels import count_parameters, find_down_projs, lesion, patch_model, unpatch_model
from loki_kernels.files import atomic_write
from loki_kernels.ica import (
    Templates,
    activation_source,
    decompose,
    positions,
    select_layers,
    silenced,
    templates_from_maps,
)

from .demo import LR_SWEEP as DEMO_LR_SWEEP
from .demo import (
    SYLLABLES,
    Batch,
    DemoArgs,
    Task,
    World,
    accuracy,
    choose_lr,
    encode,
    forgetting_score,
    make_world,
    mean_sd,
    pretrain,
    tiny_llama,
    word_tokenizer,
)

__all__ = [
    "IcaDemoArgs", "make_ica_world", "template_batches", "ica_templates", "network_rows", "count_rows", "random_like",
    "random_fraction", "complement", "lesion_sets", "lesion_experiment", "finetune", "finetune_methods", "run_method",
    "FinetuneResult", "format_lesion_table", "format_finetune_table", "run_ica_demo",
    "PERCENTILE", "SMALL_PERCENTILE", "LR_SWEEP", "N_COMPONENTS", "TEMPLATE_SAMPLES",
]

N_COMPONENTS = 10  # FNSFT's build_ica_templates default
PERCENTILE = 98.0  # FNSFT's --ica_percentile: each network the top 2% of its map
SMALL_PERCENTILE = 99.9  # each network its top 0.1% (1 of 512 channels): the union of 10 is < 2%
TEMPLATE_SAMPLES = 100  # sequences per task for the templates (Liu et al.: 100 per dataset)
REVERSE_SYLLABLES, REVERSE_PAIRS, MAX_PAIRS = 10, 96, 60
# Learning rates per method family: the LoKI demo's, and 3e-2 more for the rows (few rows, silenced neighbours).
LR_SWEEP = {"full": DEMO_LR_SWEEP["full"], "rows": DEMO_LR_SWEEP["rows"] + (3e-2,)}


# ------------------------------------------------------------------------------------------ the world
def make_ica_world(seed: int) -> World:
    """The LoKI demo's world (facts, addition; new facts to learn) plus two tasks of other kinds: reverse three
    syllables, and the larger of two digits."""
    world = make_world(seed)
    rng = random.Random(f"ica-demo world {seed}")
    alphabet = SYLLABLES[:REVERSE_SYLLABLES]
    triples: list[tuple[str, ...]] = []
    while len(triples) < REVERSE_PAIRS:
        t = tuple(rng.choice(alphabet) for _ in range(3))
        if t not in triples:
            triples.append(t)
    reverse = [(f"reverse {' '.join(t)} =", " ".join(reversed(t))) for t in triples]
    pairs = [(a, b) for a in range(10) for b in range(10) if a != b]
    maxes = [(f"max {a} {b} =", str(max(a, b))) for a, b in rng.sample(pairs, MAX_PAIRS)]
    old = world.old + [Task("reverse", reverse), Task("max", maxes)]
    words = sorted({w for t in old + [world.new] for p, a in t.pairs for w in (p + " " + a).split()})
    return World(old=old, new=world.new, words=words)


# ------------------------------------------------------------------------------------------ templates
def template_batches(tokenizer, world: World, samples: int, seed: int, batch_size: int = 32) -> list[dict]:
    """Up to ``samples`` prompt + answer sequences of each old task (a seeded sample), as batch dicts."""
    rng = random.Random(f"ica-demo templates {seed}")
    pairs = [p for t in world.old for p in rng.sample(t.pairs, min(samples, len(t.pairs)))]
    b = encode(tokenizer, pairs)
    return [{"input_ids": b.input_ids[s:s + batch_size], "attention_mask": b.attention_mask[s:s + batch_size]}
            for s in range(0, len(b), batch_size)]


def ica_templates(model: nn.Module, batches: list[dict], percentiles: tuple[float, ...], *,
                  n_components: int = N_COMPONENTS, seed: int = 0, progress: bool = True) -> dict[float, Templates]:
    """One ICA (FNSFT's pipeline, ``exact`` PCA) over all layers' MLP outputs; its maps thresholded at each of
    ``percentiles``. Equal to :func:`~loki_kernels.ica.build_templates` at each percentile, computed once."""
    downs = select_layers(model)
    result = decompose(activation_source(model, batches, downs), n_components=n_components, seed=seed,
                       mode="exact", progress=progress)
    meta = {"method": "fastica-logcosh-parallel", "n_components": n_components, "mode": "exact", "seed": seed,
            "tokens": result.pca.moments.n, "n_pca": int(result.pca.components.shape[0]),
            "ica_n_iter": result.ica.n_iter, "ica_converged": result.ica.converged}
    layers, hidden = [d.layer for d in downs], downs[0].out_features
    return {p: templates_from_maps(result.maps, layers, hidden, p, meta={**meta, "percentile": p})
            for p in percentiles}


# -------------------------------------------------------------------------------------- channel sets
Rows = dict[int, list[int]]  # {layer: rows}, every layer present


def network_rows(templates: Templates) -> Rows:
    """The union of every component's channels, per captured layer."""
    return positions(templates, sorted(templates.components), "preserve")


def count_rows(rows: Rows) -> int:
    """How many channels ``rows`` holds over all layers."""
    return sum(len(r) for r in rows.values())


def random_like(rows: Rows, hidden: int, gen: torch.Generator) -> Rows:
    """Random channels with the same count in each layer as ``rows``."""
    return {layer: sorted(torch.randperm(hidden, generator=gen)[:len(r)].tolist()) for layer, r in rows.items()}


def random_fraction(layers: list[int], hidden: int, percent: float, gen: torch.Generator) -> Rows:
    """``round(percent% of layers × hidden)`` ``(layer, channel)`` pairs drawn uniformly over all of them."""
    n = round(len(layers) * hidden * percent / 100)
    picked = torch.randperm(len(layers) * hidden, generator=gen)[:n].tolist()
    rows: Rows = {layer: [] for layer in layers}
    for j in picked:
        rows[layers[j // hidden]].append(j % hidden)
    return {layer: sorted(r) for layer, r in rows.items()}


def complement(rows: Rows, hidden: int) -> Rows:
    """Per layer, every other channel where ``rows`` has some, nothing where it has none (FNSFT's preserve mask:
    :func:`~loki_kernels.ica.silenced`)."""
    out: Rows = {}
    for layer, r in rows.items():
        chosen = set(r)
        out[layer] = [c for c in range(hidden) if c not in chosen] if chosen else []
    return out


# ------------------------------------------------------------------------------------------- lesions
def lesion_sets(small: Templates, large: Templates, *, draws: int, random_percent: float,
                seed: int) -> list[tuple[str, list[Rows]]]:
    """``(name, [channel sets])`` of the lesion experiment: one set for the networks, ``draws`` for each
    random control, an empty set first (the intact model)."""
    hidden = small.hidden_size
    gen = torch.Generator().manual_seed(seed)
    u_small, u_large = network_rows(small), network_rows(large)
    return [
        ("intact", [{layer: [] for layer in small.layers}]),
        (f"ICA networks p={small.meta['percentile']:g}", [u_small]),
        (f"random, same per-layer counts as p={small.meta['percentile']:g}",
         [random_like(u_small, hidden, gen) for _ in range(draws)]),
        (f"ICA networks p={large.meta['percentile']:g}", [u_large]),
        (f"random, same per-layer counts as p={large.meta['percentile']:g}",
         [random_like(u_large, hidden, gen) for _ in range(draws)]),
        (f"random {random_percent:g}% of all channels",
         [random_fraction(small.layers, hidden, random_percent, gen) for _ in range(draws)]),
        (f"keep only ICA networks p={large.meta['percentile']:g}", [complement(u_large, hidden)]),
        ("keep only random, same counts",
         [complement(random_like(u_large, hidden, gen), hidden) for _ in range(draws)]),
    ]


def lesion_experiment(model: nn.Module, tasks: dict[str, Batch], sets: list[tuple[str, list[Rows]]],
                      progress: bool = True, desc: str = "lesions") -> dict[str, list[dict]]:
    """Every task's accuracy with each channel set zeroed (:func:`loki_kernels.lesion`, restored bit for bit
    after each): ``{name: [{"channels", "accuracy": {task: %}} per set]}``."""
    out: dict[str, list[dict]] = {}
    jobs = [(name, rows) for name, group in sets for rows in group]
    for name, rows in tqdm(jobs, desc=desc, disable=not progress, leave=False):
        with lesion(model, rows):
            accs = {t: accuracy(model, b) for t, b in tasks.items()}
        out.setdefault(name, []).append({"channels": count_rows(rows), "accuracy": accs})
    return out


# ------------------------------------------------------------------------------------------ fine-tune
def finetune(model: nn.Module, batch: Batch, *, steps: int, lr: float, batch_size: int, seed: int,
             desc: str = "fine-tuning", progress: bool = True) -> dict:
    """AdamW (weight decay 0) on the trainable parameters: ``{"ms_per_step", "optimizer_bytes"}`` (the bytes of
    every tensor in AdamW's state after training: both moments and the step count of each parameter)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    try:
        for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            idx = torch.randint(0, len(batch), (min(batch_size, len(batch)),), generator=gen)
            b = batch.take(idx)
            loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        model.eval()
    ms = 1000.0 * (time.perf_counter() - start) / max(steps, 1)
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                      if isinstance(t, torch.Tensor))
    return {"ms_per_step": ms, "optimizer_bytes": int(state_bytes)}


@dataclass
class FinetuneResult:
    method: str
    new_acc: float  # the model as saved (silencing off)
    new_acc_silenced: Optional[float]  # with the training-time silencing on (None: nothing silenced)
    old_acc: dict
    forgetting: float
    trainable: int
    optimizer_bytes: int
    ms_per_step: float
    lr: float = 0.0
    seed: int = 0
    changed_outside: int = 0  # parameter elements that changed outside the trainable rows (should be 0)


def finetune_methods(large: Templates, seed: int) -> list[tuple[str, str, Optional[Rows], Optional[Rows]]]:
    """``(name, lr family, rows to train or None for all, rows to silence)``: full fine-tuning; ICA preserve +
    anti-drift on the union of every network; random rows of the same per-layer counts, same silencing rule (the
    control for *which* rows); the network rows without silencing (the control for the silencing)."""
    comps = sorted(large.components)
    rows, mask = positions(large, comps, "preserve"), silenced(large, comps, "preserve")
    rand = random_like(rows, large.hidden_size, torch.Generator().manual_seed(10_000 + seed))
    return [
        ("full fine-tuning", "full", None, None),
        ("ICA preserve + anti-drift", "rows", rows, mask),
        ("random rows, same counts + silencing", "rows", rand, complement(rand, large.hidden_size)),
        ("ICA rows, no silencing", "rows", rows, None),
    ]


def _changed_outside(before: dict, after: dict, rows: Rows, names: dict[int, str]) -> int:
    """Elements of ``after`` that differ from ``before`` outside the trained ``down_proj`` rows."""
    changed = 0
    for key, old in before.items():
        diff = after[key] != old
        for layer, name in names.items():
            if key == name + ".weight" and rows.get(layer):
                diff[rows[layer]] = False
        changed += int(diff.sum())
    return changed


def run_method(model: nn.Module, name: str, rows: Optional[Rows], mask: Optional[Rows], tasks: dict[str, Batch],
               before: dict, new: Batch, *, steps: int, lr: float, batch_size: int, seed: int,
               progress: bool) -> FinetuneResult:
    """Fine-tune a copy of ``model`` one way at one learning rate and score it."""
    candidate = copy.deepcopy(model)
    state = {k: v.clone() for k, v in candidate.state_dict().items()}
    if rows is not None:
        patch_model(candidate, rows, silence=mask)
    trainable = count_parameters(candidate).trainable
    stats = finetune(candidate, new, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                     desc=f"{name} lr={lr:g}", progress=progress)
    new_silenced = None
    changed = 0
    if rows is not None:
        if mask and any(mask.values()):
            new_silenced = accuracy(candidate, new)
        unpatch_model(candidate)
        names = {d.layer: d.name for d in find_down_projs(candidate)}
        changed = _changed_outside(state, candidate.state_dict(), rows, names)
    after = {t: accuracy(candidate, b) for t, b in tasks.items()}
    return FinetuneResult(name, accuracy(candidate, new), new_silenced, after, forgetting_score(before, after),
                          trainable, stats["optimizer_bytes"], stats["ms_per_step"], lr, seed, changed)


# --------------------------------------------------------------------------------------------- report
def _fmt(head: list[str], body: list[list[str]]) -> list[str]:
    """Aligned text rows: the first column left-aligned, the others right-aligned, a rule under the head."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]

    def line(row: list[str]) -> str:
        return "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths)))

    return [line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in body]


def format_lesion_table(lesions: list[dict], tasks: list[str], channels: int) -> str:
    """``lesions``: per seed, :func:`lesion_experiment`'s dict. One line per set: channels zeroed (mean), each
    task's accuracy and their mean, mean ± sd over seeds (random sets: over seeds × draws)."""
    head = ["channels zeroed", "ch", "ch %"] + [f"{t} %" for t in tasks] + ["mean %"]
    body = []
    for name in lesions[0]:
        runs = [r for seed in lesions for r in seed[name]]
        ch = sum(r["channels"] for r in runs) / len(runs)
        body.append([name, f"{ch:.0f}", f"{100 * ch / channels:.2f}"]
                    + [mean_sd([r["accuracy"][t] for r in runs]) for t in tasks]
                    + [mean_sd([sum(r["accuracy"].values()) / len(tasks) for r in runs])])
    return "\n".join(_fmt(head, body))


def format_finetune_table(summary: list[list[FinetuneResult]], threshold: float, tasks: list[str]) -> str:
    """One line per method (``before fine-tuning`` first), mean ± sd over the seeds."""
    head = (["method", "lr", "new %", "new, silenced %"] + [f"{t} %" for t in tasks]
            + ["forgetting %", "trainable", "AdamW state", "ms/step"])
    body = []
    for runs in summary:
        r = runs[0]
        star = "" if r.lr == 0 or all(x.new_acc >= threshold for x in runs) else "*"
        sil = [x.new_acc_silenced for x in runs if x.new_acc_silenced is not None]
        body.append([r.method, f"{r.lr:g}" if r.lr else "-", mean_sd([x.new_acc for x in runs]) + star,
                     mean_sd(sil) if sil else "-"]
                    + [mean_sd([x.old_acc[t] for x in runs]) for t in tasks]
                    + [mean_sd([x.forgetting for x in runs]), f"{round(sum(x.trainable for x in runs) / len(runs)):,}",
                       _bytes(sum(x.optimizer_bytes for x in runs) / len(runs)),
                       f"{sum(x.ms_per_step for x in runs) / len(runs):.1f}"])
    return "\n".join(_fmt(head, body))


def _bytes(n: float) -> str:
    return f"{n / 2 ** 20:.2f} MiB" if n >= 2 ** 20 else f"{n / 2 ** 10:.1f} KiB"


def plot(lesions: list[dict], tasks: list[str], summary: list[list[FinetuneResult]], sweep: list[FinetuneResult],
         path: Path) -> None:
    """Left: each task's accuracy per lesion set (mean ± sd). Right: new-task accuracy against forgetting, the
    sweep's points (small, labelled by lr) and the chosen rates (mean ± sd over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [3, 2]})
    names = list(lesions[0])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        runs = [r for seed in lesions for r in seed[name]]
        acc = [torch.tensor([r["accuracy"][t] for r in runs], dtype=torch.float64) for t in tasks]
        axes[0].bar([k + (i - (len(names) - 1) / 2) * width for k in range(len(tasks))], [float(a.mean()) for a in acc],
                    width, yerr=[float(a.std()) if len(a) > 1 else 0.0 for a in acc], capsize=2, label=name)
    axes[0].set_xticks(range(len(tasks)), tasks)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_title("inference-time lesions (mean ± sd)")
    axes[0].set_ylim(0, 105)
    axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3)
    for runs in summary[1:]:
        name = runs[0].method
        pts = sorted((p for p in sweep if p.method == name), key=lambda p: p.lr)
        line = axes[1].plot([p.forgetting for p in pts], [p.new_acc for p in pts], marker=".", alpha=0.5)[0]
        for p in pts:
            axes[1].annotate(f"{p.lr:g}", (p.forgetting, p.new_acc), fontsize=7, xytext=(3, 3),
                             textcoords="offset points")
        f = torch.tensor([r.forgetting for r in runs], dtype=torch.float64)
        a = torch.tensor([r.new_acc for r in runs], dtype=torch.float64)
        sd = (lambda t: float(t.std()) if len(t) > 1 else 0.0)
        axes[1].errorbar([float(f.mean())], [float(a.mean())], xerr=[sd(f)], yerr=[sd(a)], marker="o", capsize=3,
                         color=line.get_color(), label=name)
    axes[1].set_xlabel("forgetting score (%)  ↓")
    axes[1].set_ylabel("new-task accuracy, as saved (%)  ↑")
    axes[1].set_title("fine-tuning on new facts (sweep: labels = lr)")
    axes[1].legend(fontsize=7)
    fig.suptitle("ICA functional networks on a tiny Llama: lesions and preserve + anti-drift fine-tuning")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


# -------------------------------------------------------------------------------------------- driver
@dataclass
class IcaDemoArgs:
    seed: int = 0
    seeds: int = 3  # seeds seed, seed + 1, ...: world, model, ICA initialisation, random sets, batches
    out_dir: Path = Path("ica_demo")
    steps: int = 200  # fine-tuning steps of every method (--steps)
    pretrain_steps: int = 2000  # at most (stops once every old task reaches 95%, checked every 250 steps)
    n_components: int = N_COMPONENTS
    percentile: float = PERCENTILE  # the networks of the preserve fine-tune and the larger lesion
    small_percentile: float = SMALL_PERCENTILE  # the networks of the "< 2%" lesion
    template_samples: int = TEMPLATE_SAMPLES
    draws: int = 5  # random channel sets per control and seed
    random_percent: float = 15.0
    threshold: float = 90.0  # new-task accuracy the learning-rate rule aims for
    batch_size: int = 32
    lrs: Optional[dict] = None  # {"full": (...), "rows": (...)} instead of LR_SWEEP
    threads: Optional[int] = 1  # torch intra-op threads during the run (restored after); None: torch's setting
    progress: bool = True


def _check(args: IcaDemoArgs) -> None:
    def positive_int(name):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    for name in ("seeds", "steps", "pretrain_steps", "n_components", "template_samples", "draws", "batch_size"):
        positive_int(name)
    if args.threads is not None:
        positive_int("threads")
    for name in ("percentile", "small_percentile", "random_percent", "threshold"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
            raise ValueError(f"{name} must be in [0, 100], got {value!r}")
    if not args.small_percentile > args.percentile:
        raise ValueError(f"small_percentile ({args.small_percentile:g}) must be above percentile "
                         f"({args.percentile:g}): the small networks are the tops of the large ones")
    if args.lrs is not None:
        for family in ("full", "rows"):
            rates = args.lrs.get(family) if isinstance(args.lrs, dict) else None
            if not rates or any(isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0 for r in rates):
                raise ValueError(f"lrs[{family!r}] must be a non-empty list of positive learning rates, got {rates!r}")


def run_seed(args: IcaDemoArgs, seed: int, chosen: dict, sweep: list) -> dict:
    """Pretrain, build templates, lesion and fine-tune for one seed. On the first seed each method's sweep runs
    (its points appended to ``sweep``) and its rate is stored in ``chosen`` (method index -> lr); the other seeds
    reuse it."""
    world = make_ica_world(seed)
    tokenizer = word_tokenizer(world.words)
    torch.manual_seed(seed)
    model = tiny_llama(len(tokenizer)).eval()
    start = time.perf_counter()
    accs = pretrain(model, tokenizer, world, DemoArgs(seed=seed, pretrain_steps=args.pretrain_steps))
    pretrain_s = time.perf_counter() - start
    print(f"[1/4] seed {seed}: tiny model trained ({pretrain_s:.0f} s): "
          + ", ".join(f"{k} {v:.1f}%" for k, v in accs.items()), flush=True)

    batches = template_batches(tokenizer, world, args.template_samples, seed)
    sets = ica_templates(model, batches, (args.small_percentile, args.percentile), n_components=args.n_components,
                         seed=seed, progress=args.progress)
    small, large = sets[args.small_percentile], sets[args.percentile]
    channels = len(large.layers) * large.hidden_size
    info = {
        "tokens": large.meta["tokens"], "ica_converged": large.meta["ica_converged"],
        "ica_n_iter": large.meta["ica_n_iter"],
        "network_sizes": {f"{t.meta['percentile']:g}": [len(t.support(c)) for c in sorted(t.components)]
                          for t in (small, large)},
        "union": {f"{t.meta['percentile']:g}": count_rows(network_rows(t)) for t in (small, large)},
        "union_per_layer": {f"{t.meta['percentile']:g}": [len(r) for r in network_rows(t).values()]
                            for t in (small, large)},
        "templates": {f"{t.meta['percentile']:g}": t.to_dict() for t in (small, large)},
    }
    print(f"[2/4] seed {seed}: ICA ({args.n_components} components) on {info['tokens']} tokens of the 4 tasks: "
          + "; ".join(f"p={p}: networks of {min(s)}-{max(s)} ch, union {info['union'][p]} of {channels} ch "
                      f"({100 * info['union'][p] / channels:.2f}%)" for p, s in info["network_sizes"].items()),
          flush=True)

    tasks = {t.name: encode(tokenizer, t.pairs) for t in world.old}
    new = encode(tokenizer, world.new.pairs)
    lesions = lesion_experiment(model, tasks, lesion_sets(small, large, draws=args.draws,
                                                          random_percent=args.random_percent, seed=seed),
                                progress=args.progress, desc=f"[3/4] seed {seed}: lesions")
    print(f"[3/4] seed {seed}: lesions: " + "; ".join(
        f"{name}: {sum(sum(r['accuracy'].values()) / len(tasks) for r in runs) / len(runs):.1f}%"
        for name, runs in lesions.items()), flush=True)

    before = {t: accuracy(model, b) for t, b in tasks.items()}
    results = [FinetuneResult("before fine-tuning", accuracy(model, new), None, before, 0.0, 0, 0, 0.0, 0.0, seed)]
    lr_sweep = args.lrs or LR_SWEEP
    for key, (name, family, rows, mask) in enumerate(finetune_methods(large, seed)):
        run = {"tasks": tasks, "before": before, "new": new, "steps": args.steps, "batch_size": args.batch_size,
               "seed": seed, "progress": args.progress}
        if key not in chosen:
            points = [run_method(model, name, rows, mask, lr=lr, **run) for lr in lr_sweep[family]]
            sweep.extend(points)
            best = choose_lr(points, args.threshold)
            chosen[key] = best.lr
            print(f"[4/4] {name}: " + ", ".join(f"lr {p.lr:g} -> new {p.new_acc:.1f}% forgetting {p.forgetting:.1f}%"
                                                for p in points) + f"; chosen {best.lr:g}", flush=True)
        else:
            best = run_method(model, name, rows, mask, lr=chosen[key], **run)
        results.append(best)
    return {"seed": seed, "pretraining": {"accuracy": accs, "seconds": pretrain_s}, "templates": info,
            "lesions": lesions, "finetune": results}


def run_ica_demo(args: IcaDemoArgs) -> dict:
    """Run every seed; print and write the tables (``results.txt``), ``results.json`` and ``ica_demo.png`` in
    ``args.out_dir``. Returns what ``results.json`` holds."""
    _check(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seed, args.seed + args.seeds))
    threads = torch.get_num_threads()
    start = time.perf_counter()
    sweep: list[FinetuneResult] = []
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        chosen: dict = {}
        per_seed = [run_seed(args, seed, chosen, sweep) for seed in seeds]
    finally:
        torch.set_num_threads(threads)
    config = tiny_llama(8).config
    channels = config.num_hidden_layers * config.hidden_size
    task_names = list(per_seed[0]["pretraining"]["accuracy"])
    lesions = [s["lesions"] for s in per_seed]
    summary = [[s["finetune"][i] for s in per_seed] for i in range(len(per_seed[0]["finetune"]))]
    small, large = f"{args.small_percentile:g}", f"{args.percentile:g}"
    union = {p: [s["templates"]["union"][p] for s in per_seed] for p in (small, large)}
    n = len(seeds)
    plural = "s" if n > 1 else ""
    trained = "; ".join(f"seed {s['seed']}: " + ", ".join(f"{k} {v:.0f}%" for k, v in s["pretraining"]["accuracy"]
                                                          .items()) for s in per_seed)
    text = "\n".join([
        (f"ICA functional networks on a tiny Llama ({config.num_hidden_layers} layers x hidden {config.hidden_size} "
         f"= {channels} MLP-output channels), {args.n_components} components per seed"),
        f"networks: union of all {args.n_components} at percentile {small}: "
        + mean_sd(union[small]) + f" ch ({mean_sd([100 * u / channels for u in union[small]], 2)}% of channels); at "
        f"{large}: " + mean_sd(union[large]) + f" ch ({mean_sd([100 * u / channels for u in union[large]], 1)}%)",
        f"before: {trained}",
        "",
        "Lesion: accuracy with the channels' down_proj rows zeroed (inference time)",
        format_lesion_table(lesions, task_names, channels),
        (f"mean ± sd over {n} seed{plural} (random sets: over {n} seed{plural} x {args.draws} draws); 'same "
         "per-layer counts' matches the networks in every layer; 'keep only' zeroes every other channel of the "
         "layers the networks touch"),
        "",
        (f"Fine-tuning on new facts ({args.steps} steps, batch {args.batch_size}, AdamW, weight decay 0); old "
         "tasks and 'new %' on the model as saved (silencing off)"),
        format_finetune_table(summary, args.threshold, task_names),
        (f"mean ± sd over {n} seed{plural}; each method at the lowest learning rate of its sweep (first seed) "
         f"that reaches {args.threshold:g}% on the new task, else its best; * = below {args.threshold:g}% on some "
         "seed; AdamW state = bytes of its state tensors after training"),
    ])
    print("results\n" + text)
    result = {
        "seeds": seeds,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()},
        "model": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "num_attention_heads")},
        "channels": channels,
        "chosen_lr": {summary[i + 1][0].method: lr for i, lr in sorted(chosen.items())},
        "sweep": [asdict(r) for r in sweep],
        "per_seed": [{**s, "finetune": [asdict(r) for r in s["finetune"]]} for s in per_seed],
        "seconds": time.perf_counter() - start,
    }
    atomic_write(out / "results.txt", lambda tmp: Path(tmp).write_text(text + "\n"))
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    plot(lesions, task_names, summary, sweep, out / "ica_demo.png")
    print(f"tables, JSON and plot written to {out}/ ({result['seconds']:.0f} s)")
    return result
