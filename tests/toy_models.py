"""
A small model with Gemma-2's module names (q_proj, ..., gate_proj, ..., embed_tokens), shared by the
LoRA and NF4 tests: small enough to check by hand, shaped like the real model so that target
matching, quantize_model and inject_lora have the same names to find.
"""

import torch.nn as nn
import torch.nn.functional as F


class ToyAttention(nn.Module):
    def __init__(self, d: int, head_dim: int):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, head_dim, bias=False)  # one KV head (MQA)
        self.v_proj = nn.Linear(d, head_dim, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        q = self.q_proj(x)  # (B, d)
        kv = (self.k_proj(x) * self.v_proj(x)).repeat(1, q.shape[-1] // self.k_proj.out_features)  # (B, d)
        return self.o_proj(q * kv)


class ToyMLP(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class ToyLayer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.self_attn = ToyAttention(d, head_dim=8)
        self.mlp = ToyMLP(d, 2 * d)

    def forward(self, x):
        x = x + self.self_attn(x)
        return x + self.mlp(x)


class ToyModel(nn.Module):
    """ids (B,) -> logits (B, vocab), LM head tied to the embedding like Gemma-2."""

    def __init__(self, vocab: int = 50, d: int = 32, n_layers: int = 2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(ToyLayer(d) for _ in range(n_layers))

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return F.linear(x, self.embed_tokens.weight)
