"""Tiny random causal LMs built from configs (nothing is downloaded), and the helpers tests run them with."""

import torch
import transformers

HIDDEN, FFN, LAYERS, VOCAB = 40, 104, 3, 97

# model family -> (config class, model class, extra config fields)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 10}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 10}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 10}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 10}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
}


def tiny_model(arch: str = "llama", **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = ARCHS[arch]
    config_cls = getattr(transformers, config_cls)
    if arch == "gpt2":
        fields = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=FFN, n_layer=LAYERS, n_head=4, n_positions=64)
    else:
        fields = dict(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        )
    fields.update(extra)
    fields.update(overrides)
    model = getattr(transformers, model_cls)(config_cls(**fields))
    return model.float().eval()


def random_rows(quota: float = 0.2, layers: int = LAYERS, hidden: int = HIDDEN) -> list[list[int]]:
    k = max(1, int(hidden * quota))
    return [torch.randperm(hidden)[:k].tolist() for _ in range(layers)]


def batch(n: int = 4, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length))


def char_tokenizer():
    """A character-level tokenizer built in memory (printable ASCII + 4 specials), for trainer tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def pattern_batch(n: int = 8, length: int = 16) -> torch.Tensor:
    """Learnable sequences (arithmetic progressions mod VOCAB), so a few steps visibly lower the loss."""
    start = torch.randint(0, VOCAB, (n, 1))
    step = torch.randint(1, 4, (n, 1))
    return (start + step * torch.arange(length)) % VOCAB


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def train(model, ids, steps=3, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_split_checkpoint(tmp, base, rows):
    """A trained model saved the way the original LoKI classes save it (split keys), in ``tmp / "split"``."""
    from safetensors.torch import save_file

    from loki.model_utils import get_loki_classes
    from loki_kernels.reference import apply_reference_loki

    reference = apply_reference_loki(base, rows)
    train(reference, batch(), steps=3)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if "lm_head.weight" in state and base.config.tie_word_embeddings:
        del state["lm_head.weight"]
    (tmp / "split").mkdir()
    save_file(state, tmp / "split" / "model.safetensors", metadata={"format": "pt"})
    config_cls, _ = get_loki_classes(base.config.model_type)
    config_cls.from_pretrained(tmp / "base", target_pos=rows).save_pretrained(tmp / "split")
    return reference


def saved_char_model(root, max_positions: int = 1024):
    """A tiny random Llama and a character tokenizer, saved to ``root / "model"``: ``(path, model, tokenizer)``.

    ``max_positions`` is large enough for the original MMLU prompt (a few hundred characters).
    """
    tok = char_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=max_positions).eval()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model", model, tok
