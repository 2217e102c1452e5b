"""A patched model inside real trainers: HF Trainer (with checkpoint resume), TRL's SFTTrainer, and DDP."""

import copy
import gc
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from loki_kernels import find_down_projs, patch_model
from tests.tiny_models import HIDDEN, char_tokenizer, logits, pattern_batch, random_rows, snapshot, tiny_model


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, learning_rate=3e-2, lr_scheduler_type="constant",
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def assert_only_rows_changed(before, after, model, rows):
    down = {f"{p.name}.weight": p.layer for p in find_down_projs(model)}
    for key, value in before.items():
        if key in down:
            changed = (value != after[key]).reshape(HIDDEN, -1).any(dim=1).nonzero().flatten().tolist()
            assert changed and set(changed) <= set(rows[down[key]]), key
        else:
            assert torch.equal(value, after[key]), key


def test_hf_trainer_trains_saves_and_resumes(tmp_path):
    model = tiny_model()
    rows = random_rows()
    before = snapshot(model)
    fresh = copy.deepcopy(model)
    patch_model(model, rows)
    data = _Sequences(pattern_batch(64))

    trainer = Trainer(model=model, args=_args(tmp_path / "run", max_steps=12, save_strategy="steps", save_steps=6),
                      train_dataset=data)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0]
    final = snapshot(model)
    assert_only_rows_changed(before, final, model, rows)

    trainer.save_model(tmp_path / "saved")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    ids = pattern_batch(2)
    assert torch.equal(logits(plain, ids), logits(model, ids))

    # Resume a fresh patched model from the step-6 checkpoint: it must end exactly where the first run did.
    patch_model(fresh, rows)
    resumed = Trainer(model=fresh, args=_args(tmp_path / "run", max_steps=12), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    for key, value in snapshot(fresh).items():
        torch.testing.assert_close(value, final[key], rtol=1e-6, atol=1e-7)


def test_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tokenizer = char_tokenizer()
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    rows = random_rows()
    before = snapshot(model)
    patch_model(model, rows)
    facts = [f"The capital of country {i} is city {i * 7 % 13}." for i in range(32)]
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=3e-2,
                           lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                           use_cpu=True, max_length=64, disable_tqdm=True, dataloader_num_workers=0)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": facts}),
                             processing_class=tokenizer)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0]
    assert_only_rows_changed(before, snapshot(model), model, rows)


# --------------------------------------------------------------------------------------------- DDP
def _train_steps(model, batches, lr=1e-2):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _spawn(worker, args, nprocs=2, timeout=300):
    """mp.spawn with a deadline: a hung process group fails the test instead of hanging the run."""
    ctx = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail(f"{worker.__name__} did not finish within {timeout} s")


def _shutdown():
    """Destroy the process group after the caller has dropped its DDP/FSDP modules (``del``). Letting the last
    reference to a gloo process group die inside a DDP Reducer's destructor can deadlock (the destructor joins
    gloo's worker thread while holding the GIL that thread waits for)."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _two_processes_and_one(worker, out, port):
    """Run ``worker`` in 2 processes on halves of 3 global batches (it writes ``out``), then train the same
    patched model in this process on the whole batches; returns this process's final state dict."""
    model = tiny_model()
    state = snapshot(model)
    rows = random_rows()
    batches = [pattern_batch(8) for _ in range(3)]
    _spawn(worker, (2, port, state, rows, batches, out))
    patch_model(model, rows)
    _train_steps(model, batches)
    return snapshot(model)


def _ddp_worker(rank, world, port, state, rows, batches, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = tiny_model()
    model.load_state_dict(state)
    patch_model(model, rows)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    per_rank = [b.chunk(world)[rank] for b in batches]
    _train_steps(ddp, per_rank)
    if rank == 0:
        torch.save(snapshot(model), out)
    del ddp, model
    _shutdown()


def test_ddp_matches_single_process(tmp_path):
    """2 processes (gloo) on halves of each global batch end with the same weights as 1 process on it all."""
    reference = _two_processes_and_one(_ddp_worker, tmp_path / "ddp.pt", port=29500 + os.getpid() % 1000)
    ddp_state = torch.load(tmp_path / "ddp.pt")
    for key, value in reference.items():
        torch.testing.assert_close(ddp_state[key], value, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------- FSDP2
def _fsdp_worker(rank, world, port, state, rows, batches, out):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def sharded(model):
        patch_model(model, rows)  # patch first, then shard (as the README says)
        for layer in model.model.layers:
            fully_shard(layer)
        return fully_shard(model)

    model = tiny_model()
    model.load_state_dict(state)
    sharded(model)
    _train_steps(model, [b.chunk(world)[rank] for b in batches])
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, out)  # before set_model_state_dict, which turns the entries into DTensors
    # A standard full state dict loads into a fresh sharded patched model, trainable rows included.
    fresh = sharded(tiny_model())
    set_model_state_dict(fresh, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        same = torch.equal(model(input_ids=batches[0]).logits, fresh(input_ids=batches[0]).logits)
    if rank == 0:
        torch.save(same, out.with_suffix(".reload"))
    del model, fresh
    _shutdown()


def test_fsdp2_matches_single_process(tmp_path):
    """fully_shard (FSDP2) over 2 processes (gloo, CPU): same weights as 1 process, a full state dict with the
    standard keys, and that state dict loads back into a sharded patched model."""
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("torch.distributed.fsdp.fully_shard needs torch >= 2.6")
    reference = _two_processes_and_one(_fsdp_worker, tmp_path / "fsdp.pt", port=30500 + os.getpid() % 1000)
    state = torch.load(tmp_path / "fsdp.pt")
    assert set(state) == set(reference)  # the standard keys, no weight_active
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)
    assert torch.load(tmp_path / "fsdp.reload")
