"""LoKI in a plain loop driven by Accelerate (`python accelerate_loop.py`, or `accelerate launch` for
several processes: DDP works on the patched model as on any other).
"""

import sys
import tempfile

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

import loki_kernels


def main(out_dir: str) -> None:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    loki_kernels.patch_model(model, [torch.randperm(64)[:6].tolist() for _ in range(2)])  # before prepare()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)

    ids = (torch.randint(0, 128, (8, 1)) + torch.arange(16)) % 128
    for step in range(20):
        loss = model(input_ids=ids.to(accelerator.device), labels=ids.to(accelerator.device)).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0:
            accelerator.print(f"step {step} loss {loss.item():.4f}")
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(out_dir)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
