"""LoKI inside Hugging Face's Trainer: patch, train, save a plain checkpoint. Runs on a CPU in seconds.

With a real model: replace `tiny_model()` with `AutoModelForCausalLM.from_pretrained(path)` and the
positions with your LoKI position JSON (`loki select-nodes ...`).
"""

import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import loki_kernels


def tiny_model():
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


class Sequences(torch.utils.data.Dataset):
    def __init__(self, n=64, length=16):
        start, step = torch.randint(0, 128, (n, 1)), torch.randint(1, 4, (n, 1))
        self.ids = (start + step * torch.arange(length)) % 128

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(out_dir: str) -> None:
    torch.manual_seed(0)
    model = tiny_model()
    rows = [torch.randperm(64)[:6].tolist() for _ in range(2)]  # or "pos_json/10.json"
    loki_kernels.patch_model(model, rows)
    print(loki_kernels.count_parameters(model))

    args = TrainingArguments(output_dir=out_dir, max_steps=20, per_device_train_batch_size=8, learning_rate=1e-2,
                             logging_steps=5, save_steps=10, report_to=[], use_cpu=not torch.cuda.is_available())
    Trainer(model=model, args=args, train_dataset=Sequences()).train()  # resume_from_checkpoint=... works too

    model.save_pretrained(f"{out_dir}/final")  # standard keys: loads in plain transformers
    plain = AutoModelForCausalLM.from_pretrained(f"{out_dir}/final")
    print("saved checkpoint loads as", type(plain).__name__)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
