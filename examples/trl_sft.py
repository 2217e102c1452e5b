"""LoKI inside TRL's SFTTrainer. Runs on a CPU in seconds with a tokenizer built in memory.

With a real model: pass `AutoModelForCausalLM.from_pretrained(path)` and its tokenizer, patched the same way.
"""

import sys
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

import loki_kernels


def char_tokenizer():
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({chr(c): i + 4 for i, c in enumerate(range(32, 127))})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Split("", behavior="isolated"), decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def main(out_dir: str) -> None:
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    loki_kernels.patch_model(model, [torch.randperm(64)[:6].tolist() for _ in range(2)])

    facts = Dataset.from_dict({"text": [f"Planet {i} has {i % 5 + 1} moons." for i in range(64)]})
    args = SFTConfig(output_dir=out_dir, max_steps=20, per_device_train_batch_size=8, learning_rate=1e-2,
                     logging_steps=5, save_strategy="no", report_to=[], max_length=64,
                     use_cpu=not torch.cuda.is_available())
    SFTTrainer(model=model, args=args, train_dataset=facts, processing_class=tokenizer).train()
    model.save_pretrained(f"{out_dir}/final")
    print(loki_kernels.count_parameters(model))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
