"""Train only 10% of the down_proj rows of a tiny random Llama for a few steps (CPU, seconds).

Until `loki demo` exists this is the README's first command. It builds the model from a config, so
nothing is downloaded.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import loki_kernels

torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)
model = LlamaForCausalLM(config)
before = {k: v.clone() for k, v in model.state_dict().items()}

# One list of trainable down_proj rows per layer (LoKI's position-JSON format): 10% of hidden.
quota = config.hidden_size // 10
target_pos = [torch.randperm(config.hidden_size)[:quota].tolist() for _ in range(config.num_hidden_layers)]
loki_kernels.patch_model(model, target_pos)
print(model.model.layers[0].mlp.down_proj)
print(loki_kernels.count_parameters(model))

optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
data = torch.randint(0, config.vocab_size, (8, 32))
for step in range(20):
    loss = model(input_ids=data, labels=data).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step % 5 == 0 or step == 19:
        print(f"step {step:2d}  loss {loss.item():.4f}")

after = model.state_dict()  # standard keys: down_proj.weight holds the merged, trained weight
changed = {k for k in before if not torch.equal(before[k], after[k])}
print("changed tensors:", sorted(changed))
for layer, rows in enumerate(target_pos):
    key = f"model.layers.{layer}.mlp.down_proj.weight"
    diff_rows = (before[key] != after[key]).any(dim=1).nonzero().flatten().tolist()
    assert set(diff_rows) <= set(rows), f"layer {layer}: rows outside target_pos changed"
print("only the selected rows changed")
