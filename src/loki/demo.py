"""``loki demo``: the whole LoKI pipeline, end to end, on a CPU in a few minutes.

1. A tiny Llama-style model is built from a config and trained in-process on generated "general
   knowledge": made-up facts (``<subject> <relation> = <object>``) and a small skill (adding two digits from 0 to 5).
2. KVA scores every ``down_proj`` row on probes of that knowledge; layer-balanced selection at q = 10%.
3. A new generated task (facts about new subjects) is implanted five ways, each with the same steps and batches:
   LoKI (the KVA-lowest rows, via ``patch_model``), the same number of random rows, the highest-attribution rows
   (the control that should forget most if KVA means anything), full fine-tuning, and LoRA (peft). Each method
   runs a small learning-rate sweep (:data:`LR_SWEEP`) on the first seed and keeps the lowest rate that reaches
   the new-task threshold (else its best); the other seeds rerun every method at its chosen rate.
4. A table (mean ± sd over the seeds) and a PNG (the sweep's learning-forgetting points, and the chosen points
   with their spread): new-task accuracy, the old tasks, the paper's forgetting score
   ``100·(S_o − S_t)/S_o`` averaged over the old tasks, trainable parameters, wall time per step.

``loki demo --model PATH --data FILE`` runs steps 2-4 on a local model and a JSONL file of
``{"prompt", "answer", "split"}`` records (split ``"old"``: knowledge probes; ``"new"``: the task to implant);
``loki demo --model PATH`` (or ``smollm2``) without ``--data`` runs :mod:`loki.real_demo`. Nothing is
downloaded. The numbers are whatever they come out as: the demo is not tuned for LoKI to win.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

import loki_kernels


# ------------------------------------------------------------------------------------------ the world
RELATIONS = {"capital": 14, "color": 10, "animal": 12}  # relation -> number of possible objects
NEW_RELATION, NEW_OBJECTS = "river", 12
SYLLABLES = ["ka", "lo", "mi", "ru", "ze", "po", "ta", "vi", "no", "su", "be", "do", "fa", "gi", "hu", "ja"]


@dataclass
class Task:
    """Prompt/answer pairs; accuracy is exact match of the greedy answer (teacher-forced)."""

    name: str
    pairs: list[tuple[str, str]]


@dataclass
class World:
    old: list[Task]  # what the model knows before implanting
    new: Task  # what we implant
    words: list[str] = field(default_factory=list)


def make_world(seed: int, subjects: int = 40, new_subjects: int = 24) -> World:
    """Generated knowledge: facts about made-up subjects, a skill, and new facts to implant."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < subjects + new_subjects:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(3)))
    names = sorted(names)
    rng.shuffle(names)
    old_names, new_names = names[:subjects], names[subjects:]
    objects = {rel: [f"{rel[:3]}{i}" for i in range(n)] for rel, n in RELATIONS.items()}
    facts = [(f"{s} {rel} =", rng.choice(objects[rel])) for s in old_names for rel in RELATIONS]
    skill = [(f"{a} plus {b} =", str(a + b)) for a in range(6) for b in range(6)]
    new_objects = [f"riv{i}" for i in range(NEW_OBJECTS)]
    new = [(f"{s} {NEW_RELATION} =", rng.choice(new_objects)) for s in new_names]
    words = sorted({w for p, a in facts + skill + new for w in (p + " " + a).split()})
    return World(old=[Task("facts", facts), Task("addition", skill)], new=Task("new facts", new), words=words)


def word_tokenizer(words: list[str]):
    """A whitespace word-level tokenizer over ``words`` (built in memory)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config)


# ------------------------------------------------------------------------------------- data, metrics
@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # -100 except on answer tokens

    def __len__(self):
        return len(self.input_ids)

    def take(self, idx):
        return Batch(self.input_ids[idx], self.attention_mask[idx], self.labels[idx])


def encode(tokenizer, pairs: list[tuple[str, str]]) -> Batch:
    """Right-padded prompt + answer sequences; the loss and the accuracy look at answer tokens only."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = []
    for prompt, answer in pairs:
        p = bos + tokenizer(prompt, add_special_tokens=False).input_ids
        a = tokenizer(" " + answer if not prompt.endswith(" ") else answer, add_special_tokens=False).input_ids
        rows.append((p, a))
    length = max(len(p) + len(a) for p, a in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), length), pad)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, : len(p) + len(a)] = 1
        labels[i, len(p): len(p) + len(a)] = torch.tensor(a)
    return Batch(ids, mask, labels)


def prompts_only(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts (for KVA): the last position predicts the answer's first token."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = [bos + tokenizer(p, add_special_tokens=False).input_ids for p, _ in pairs]
    length = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), length), pad)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = torch.tensor(r)
        mask[i, length - len(r):] = 1
    return ids, mask


@torch.no_grad()
def accuracy(model, batch: Batch, chunk: int = 64) -> float:
    """Percentage of examples whose answer tokens are all the model's argmax (teacher-forced)."""
    model.eval()
    correct = 0
    for start in range(0, len(batch), chunk):
        b = batch.take(slice(start, start + chunk))
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        pred = logits[:, :-1].argmax(-1)
        target = b.labels[:, 1:]
        ok = (pred == target) | (target == -100)
        correct += ok.all(dim=1).sum().item()
    return 100.0 * correct / len(batch)


def train(model, batch: Batch, steps: int, lr: float, batch_size: int, desc: str, seed: int) -> float:
    """AdamW on the trainable parameters; returns the mean wall time per step in ms."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        idx = torch.randint(0, len(batch), (min(batch_size, len(batch)),), generator=gen)
        b = batch.take(idx)
        loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return 1000.0 * (time.perf_counter() - start) / max(steps, 1)


# -------------------------------------------------------------------------------------------- phases
def kva_attributions(model, tokenizer, pairs, batch_size: int = 16, desc: str = "KVA") -> torch.Tensor:
    """[N, L, H] attributions of the model's own top next token on each probe prompt."""
    from loki_kernels import kva

    ids, mask = prompts_only(tokenizer, pairs)
    out = []
    for start in tqdm(range(0, len(ids), batch_size), desc=desc, leave=False):
        sl = slice(start, start + batch_size)
        out.append(kva.attribute(model, ids[sl], mask[sl]))
    return torch.cat(out)


@dataclass
class Result:
    method: str
    new_acc: float
    old_acc: dict
    forgetting: float
    trainable: int
    ms_per_step: float
    lr: float = 0.0
    seed: int = 0


def forgetting_score(before: dict, after: dict) -> float:
    """The paper's Avg = (100/N)·Σ (S_o − S_t)/S_o over the old tasks (lower is better)."""
    terms = [(before[k] - after[k]) / before[k] for k in before if before[k] > 0]
    return 100.0 * sum(terms) / len(terms) if terms else 0.0


def lora_model(model, rank: int = 8):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0))


# Learning-rate sweep per method family (the tiny model learns at high rates; 3e-3 was the old shared one).
LR_SWEEP = {"rows": (1e-3, 3e-3, 1e-2), "full": (3e-4, 1e-3, 3e-3), "lora": (1e-3, 3e-3, 1e-2)}


def methods(model, target_pos, highest_pos, quota: float, seed: int) -> list[tuple[str, str, object]]:
    """``(name, lr family, prepare)`` for each method: LoKI, random rows, highest rows, full FT, LoRA."""
    gen = torch.Generator().manual_seed(seed)
    hidden = loki_kernels.find_down_projs(model)[0].out_features
    random_rows = [torch.randperm(hidden, generator=gen)[: len(rows)].tolist() for rows in target_pos]

    def patched(rows):
        return lambda m: loki_kernels.patch_model(m, rows)

    return [
        (f"LoKI q={quota:g}% (KVA lowest)", "rows", patched(target_pos)),
        (f"random rows q={quota:g}%", "rows", patched(random_rows)),
        (f"highest-attribution rows q={quota:g}%", "rows", patched(highest_pos)),
        ("full fine-tuning", "full", lambda m: m),
        ("LoRA r=8 (all linear)", "lora", lora_model),
    ]


def implant(model, prepare, name: str, old_batches: dict, before: dict, new_batch: Batch, *, steps: int, lr: float,
            batch_size: int, seed: int) -> Result:
    """One method at one learning rate: train a copy of ``model`` on the new task, score new and old."""
    candidate = prepare(copy.deepcopy(model))
    trainable = loki_kernels.count_parameters(candidate).trainable
    ms = train(candidate, new_batch, steps, lr, batch_size, f"implant: {name} lr={lr:g}", seed)
    after = {n: accuracy(candidate, b) for n, b in old_batches.items()}
    return Result(name, accuracy(candidate, new_batch), after, forgetting_score(before, after), trainable, ms,
                  lr, seed)


def choose_lr(points: list[Result], threshold: float) -> Result:
    """The lowest learning rate whose new-task accuracy reaches ``threshold``, else the best new-task accuracy."""
    reached = [p for p in points if p.new_acc >= threshold]
    return min(reached, key=lambda p: p.lr) if reached else max(points, key=lambda p: (p.new_acc, -p.lr))


# --------------------------------------------------------------------------------------------- report
def mean_sd(values: list[float], digits: int = 1) -> str:
    """``"mean ± sd"`` (sample sd) with ``digits`` decimals; just the mean for one value."""
    t = torch.tensor(values, dtype=torch.float64)
    return f"{t.mean():.{digits}f}" if len(values) == 1 else f"{t.mean():.{digits}f} ± {t.std():.{digits}f}"


def format_table(summary: list[list[Result]], threshold: float) -> str:
    """One row per method: its chosen learning rate, mean ± sd over seeds (sample sd) of each score."""
    old_names = list(summary[0][0].old_acc)
    head = ["method", "lr", "new task %"] + [f"{n} %" for n in old_names] + ["forgetting %", "trainable", "ms/step"]
    rows = []
    for runs in summary:
        r = runs[0]
        new = mean_sd([x.new_acc for x in runs]) + ("" if r.method == "before implanting" or all(
            x.new_acc >= threshold for x in runs) else "*")
        rows.append([r.method, f"{r.lr:g}" if r.lr else "-", new]
                    + [mean_sd([x.old_acc[n] for x in runs]) for n in old_names]
                    + [mean_sd([x.forgetting for x in runs]), f"{r.trainable:,}",
                       f"{sum(x.ms_per_step for x in runs) / len(runs):.1f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths)))  # noqa: E731
    seeds = len(summary[0])
    note = (f"mean ± sd over {seeds} seeds; each method at the lowest learning rate of its sweep (first seed) that "
            f"reaches {threshold:g}% on the new task, else its best; * = below {threshold:g}% on some seed")
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows] + [note])


def plot(sweep: list[Result], summary: list[list[Result]], path: Path) -> None:
    """Left: every (method, lr) point of the sweep, new-task accuracy against forgetting. Right: the chosen
    points, mean ± sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for runs in summary[1:]:
        name = runs[0].method
        pts = sorted((p for p in sweep if p.method == name), key=lambda p: p.lr)
        line = axes[0].plot([p.forgetting for p in pts], [p.new_acc for p in pts], marker="o", label=name)[0]
        for p in pts:
            axes[0].annotate(f"{p.lr:g}", (p.forgetting, p.new_acc), fontsize=7, xytext=(3, 3),
                             textcoords="offset points")
        f = torch.tensor([r.forgetting for r in runs], dtype=torch.float64)
        a = torch.tensor([r.new_acc for r in runs], dtype=torch.float64)
        sd = (lambda t: float(t.std()) if len(t) > 1 else 0.0)
        axes[1].errorbar([float(f.mean())], [float(a.mean())], xerr=[sd(f)], yerr=[sd(a)], marker="o",
                         color=line.get_color(), label=name, capsize=3)
    for ax, title in zip(axes, ["learning-rate sweep (labels: lr)", f"chosen lr, mean ± sd over {len(summary[0])} "
                                                                     "seeds"]):
        ax.set_xlabel("forgetting score (%)  ↓")
        ax.set_ylabel("new-task accuracy (%)  ↑")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.suptitle("LoKI demo: implant new facts, keep old knowledge")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- drivers
@dataclass
class DemoArgs:
    seed: int = 0
    seeds: int = 3  # seeds seed, seed + 1, ...: world, model, rows and training (the sweep runs on the first)
    quota: float = 10.0
    out_dir: Path = Path("loki_demo")
    pretrain_steps: int = 4000
    implant_steps: int = 400
    lr: Optional[float] = None  # one learning rate for every method instead of the sweep
    threshold: float = 90.0
    batch_size: int = 32
    model: Optional[Path] = None
    data: Optional[Path] = None


def load_jsonl_world(path: Path) -> World:
    old, new = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                pair, split = (rec["prompt"], rec["answer"]), rec.get("split", "new")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with prompt, answer, split ({e})") from None
            if split not in ("old", "new"):
                raise ValueError(f"{path}:{n}: split must be 'old' or 'new', got {split!r}")
            (old if split == "old" else new).append(pair)
    if not old or not new:
        raise ValueError(f"{path}: needs records with split 'old' (probes) and 'new' (task), "
                         f"got {len(old)} and {len(new)}")
    return World(old=[Task("old", old)], new=Task("new", new))


def pretrain(model, tokenizer, world: World, args: DemoArgs, target: float = 95.0, chunk: int = 250) -> dict:
    """Train on the old knowledge until every old task reaches ``target`` % (or the step budget ends)."""
    data = encode(tokenizer, [p for t in world.old for p in t.pairs])
    tasks = {t.name: encode(tokenizer, t.pairs) for t in world.old}
    for done in range(0, args.pretrain_steps, chunk):
        steps = min(chunk, args.pretrain_steps - done)
        train(model, data, steps, 3e-3, 64, f"[1/4] pretraining (steps {done}-{done + steps})", args.seed + done)
        accs = {name: accuracy(model, b) for name, b in tasks.items()}
        if min(accs.values()) >= target:
            break
    return accs


def _setup(args: DemoArgs, seed: int):
    """``(model, tokenizer, world)`` for one seed: the tiny world and model trained here, or the local ones."""
    torch.manual_seed(seed)
    if args.model is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        world = load_jsonl_world(args.data)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        print(f"[1/4] seed {seed}: loaded {args.model}")
        return model, tokenizer, world
    world = make_world(seed)
    tokenizer = word_tokenizer(world.words)
    model = tiny_llama(len(tokenizer))
    accs = pretrain(model, tokenizer, world, DemoArgs(**{**args.__dict__, "seed": seed}))
    print(f"[1/4] seed {seed}: tiny model trained: " + ", ".join(f"{k} {v:.1f}%" for k, v in accs.items()))
    return model, tokenizer, world


def run_demo(args: DemoArgs) -> list[list[Result]]:
    """Returns one list per method (``"before implanting"`` first): its chosen learning rate on every seed."""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seed, args.seed + max(args.seeds, 1)))
    sweep: list[Result] = []
    chosen: dict = {}  # method -> lr
    per_seed: dict = {}  # method -> [Result per seed]
    for seed in seeds:
        model, tokenizer, world = _setup(args, seed)
        probes = [p for t in world.old for p in t.pairs]
        attributions = kva_attributions(model, tokenizer, probes, desc=f"[2/4] seed {seed}: KVA on knowledge probes")
        target_pos = loki_kernels.select_target_pos(attributions, args.quota, "layer_balanced")
        highest_pos = loki_kernels.select_target_pos(-attributions, args.quota, "layer_balanced")
        if seed == seeds[0]:
            print(f"[2/4] KVA on {len(probes)} probes -> layer-balanced selection: {len(target_pos[0])} rows per layer")
            loki_kernels.save_target_pos(target_pos, out / f"{args.quota:g}.json")
        old_batches = {t.name: encode(tokenizer, t.pairs) for t in world.old}
        new_batch = encode(tokenizer, world.new.pairs)
        before = {name: accuracy(model, b) for name, b in old_batches.items()}
        per_seed.setdefault("before implanting", []).append(
            Result("before implanting", accuracy(model, new_batch), before, 0.0, 0, 0.0, 0.0, seed))
        for name, family, prepare in methods(model, target_pos, highest_pos, args.quota, seed):
            run = dict(old_batches=old_batches, before=before, new_batch=new_batch, steps=args.implant_steps,
                       batch_size=args.batch_size, seed=seed)
            if name not in chosen:  # the first seed: the sweep
                lrs = (args.lr,) if args.lr is not None else LR_SWEEP[family]
                points = [implant(model, prepare, name, lr=lr, **run) for lr in lrs]
                sweep += points
                best = choose_lr(points, args.threshold)
                chosen[name] = best.lr
                print(f"[3/4] {name}: " + ", ".join(f"lr {p.lr:g} -> new {p.new_acc:.1f}% forgetting "
                                                     f"{p.forgetting:.1f}%" for p in points) + f"; chosen {best.lr:g}")
            else:
                best = implant(model, prepare, name, lr=chosen[name], **run)
            per_seed.setdefault(name, []).append(best)
    summary = list(per_seed.values())
    table = format_table(summary, args.threshold)
    print("[4/4] results\n" + table)
    (out / "results.txt").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({
        "seeds": seeds, "threshold": args.threshold, "sweep": [r.__dict__ for r in sweep],
        "chosen_lr": chosen, "runs": {name: [r.__dict__ for r in runs] for name, runs in per_seed.items()},
    }, indent=2) + "\n")
    plot(sweep, summary, out / "demo.png")
    print(f"table, JSON and plot written to {out}/")
    return summary
