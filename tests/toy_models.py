"""
Small models and files the tests share.

ToyModel: a small model with Gemma-2's module names (q_proj, ..., gate_proj, ..., embed_tokens), shared by the
LoRA and NF4 tests: small enough to check by hand, shaped like the real model so that target
matching, quantize_model and inject_lora have the same names to find.
"""

import copy
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters import impl
from nano.common.fileio import save_checkpoint
from nano.common.paths import runs_dir, tokenizer_dir
from nano.model.lora import inject_lora, save_adapter
from nano.checkpoints.checkpoint import state_fingerprint

model_mod = impl("gemma")


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


# ---------------------------------------------------------------------------------------------
# tiny GemmaNano checkpoints and adapters on disk, for the lessons that load them (12, 13)

CORPUS = ("Once upon a time there was a little cat. The cat liked to play with a red ball.\n"
          "Question: Tom has 3 apples and gets 4 more. How many apples?\nAnswer: 3 + 4 = 7\n#### 7\n") * 5
BASE = "pretrain/default/checkpoints/ckpt_best.pth"
SFT = "sft/full/default/checkpoints/ckpt_best.pth"
LORA = "sft/peft/lora/default/adapter.pth"
QLORA = "sft/peft/qlora/default/adapter.pth"


def small_gemma(vocab_size: int, seed: int = 0, context_len: int = 96, sliding_window: int = 16):
    """A GemmaNano of 2 layers, 32 wide (2 query heads of 16, one KV head), random weights, eval mode."""
    torch.manual_seed(seed)
    cfg = model_mod.model_config("tiny", vocab_size=vocab_size, context_len=context_len, d_model=32,
                                 n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                                 sliding_window=sliding_window, query_pre_attn_scalar=16.0, attn_impl="eager")
    return model_mod.GemmaNano(cfg).eval()


def toy_model(tokenizer, seed: int, context_len: int = 96):
    return small_gemma(tokenizer.vocab_size, seed, context_len)


def save_toy_runs(tokenizer, qlora: bool = False) -> dict:
    """What lessons 1-7 leave behind, in miniature: data/tokenizer/tokenizer.json, a base and a full-SFT
    checkpoint, a LoRA adapter for the base (and a QLoRA one). Returns the models."""
    tokenizer.save(tokenizer_dir() / "tokenizer.json")
    base, sft = toy_model(tokenizer, 0), toy_model(tokenizer, 1)
    save_model(base, tokenizer, BASE)
    save_model(sft, tokenizer, SFT)
    runs = {"base": base, "sft": sft, "lora": save_lora(base, LORA)}
    if qlora:
        runs["qlora"] = save_lora(base, QLORA, quantize=True)
    return runs


def save_model(model, tokenizer, path: str) -> dict:
    """A checkpoint with the keys load_model reads; returns it."""
    ckpt = {"model": model.state_dict(), "model_config": asdict(model.cfg),
            "tokenizer_fingerprint": tokenizer.fingerprint(), "step": 7, "train_config": {}}
    save_checkpoint(runs_dir() / path, ckpt)
    return ckpt


def save_lora(base, path: str, quantize: bool = False, seed: int = 2) -> torch.nn.Module:
    """An adapter (B randomised, so it changes the outputs) made for `base`, saved with base's identity."""
    from nano.model.nf4 import quantize_model

    identity = {"model_config": asdict(base.cfg), "checkpoint": state_fingerprint(base.state_dict())}
    adapted = copy.deepcopy(base)
    if quantize:
        quantize_model(adapted, double_quant=True)
        identity["quantization"] = "nf4, block 64, double_quant True"
    inject_lora(adapted, r=2, alpha=4.0)
    torch.manual_seed(seed)
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    save_adapter(adapted, runs_dir() / path, identity)
    return adapted.eval()


# text that exercises a tokenizer's corners (contractions, digits, unicode, whitespace runs, special
# tokens glued to text): what an export must tokenize exactly as we do (tests/test_13_export.py, _gguf.py)
EDGE_TEXTS = [
    "Once upon a time there was a little cat. The cat's ball was red!",
    "Tom has 3 apples and gets 14 more. 3 + 14 = 17\n#### 17",
    "naïve café 中文 😀 — ünïcödé and digits ٣٤ ½",
    "  spaces   and\n\n\nnewlines\t\ttabs  \n",
    "<bos>story<eos><|endoftext|><start_of_turn>user\nHi<end_of_turn>\n<eos><eos",
    "they'll we've I'd it's DON'T",
    "",
]
