"""
The model's forward pass for inference, in fewer and bigger operations: what makes decoding fast on a CPU.

Decoding one token of the tiny model is ~1,000 PyTorch operations on tensors of a few hundred numbers.
Each operation costs a few microseconds of Python and dispatch whatever its size, so a token costs
milliseconds of overhead and almost no arithmetic. `InferenceModel` computes exactly what
nano/model/gemma.py computes, with the same elementwise formulas in the same order, but
    - q, k and v come from ONE matmul (their weights concatenated once), and so do the MLP's gate
      and up projections: each output is still the same dot product, so the same number;
    - q and k are rotated by RoPE together, with cos/sin looked up in a table made once;
    - norms use their gains (1 + w) computed once, with no autograd Function around them;
    - tokens are a flat (N, ...) batch, each with its own position, and attention is a callback:
      `nano/model/generate.py` attends over its contiguous KVCache, nano/serve/engine.py over the paged one.
Plain nn.Linear, NF4's Linear4bit and LoRA's wrapper are fused (FusedLinear); other layers are called as they are.

Build one per generation (it copies the projection weights: ~2x their memory while it lives, and
a model being trained changes its weights between generations):

    fast = InferenceModel(model)
    hidden = fast.forward(ids, positions, attend)        # (N,) ids -> (N, d) final-normed hidden states
    logits = fast.logits(hidden)                          # (N, vocab), fp32, soft-capped

The model does not know about this path (it is built on the model, not the other way round): the
callers that want it call it. `decode_step` is the one-token step over a KVCache that
nano/model/generate.py's `next_logits` takes; nano/serve/model_runner.py runs InferenceModel over
the paged cache. tests/test_14_engine.py checks that the logits are bit-for-bit those of the plain
forward pass.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from nano.model.attention import scalar, soft_cap
from nano.model.gemma import rope_cos_sin, rotate
from nano.model.lora import LoRALinear
from nano.model.nf4 import Linear4bit, dequantize_packed

# attend(layer_idx, q (N, Hq, D), k (N, Hkv, D), v (N, Hkv, D)) -> (N, Hq * D): store k, v, attend
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class FusedLinear:
    """Several linear layers that read the same input, as ONE matmul.

    y = x [W1; W2; W3]^T, then split: each output column is the same dot product as before, so the
    numbers are the same as three separate calls, for a third of the calls. Three kinds of layers:
      - plain nn.Linear: the weights are concatenated once;
      - NF4 Linear4bit (nano/model/nf4.py): their packed bytes and block scales are concatenated once, and
        the fused weight is dequantized once per call, for every token of the batch at once (the
        scales are rebuilt from their 8-bit form once here, not on every step);
      - LoRA wrappers (nano/model/lora.py) without dropout: each one's W + s B A is formed once
        (`merged_weight`, what its forward multiplies by on every call) and concatenated like plain
        weights: the weights do not change while one generation runs;
      - anything else: each layer is called as it is.
    """

    def __init__(self, modules: list[nn.Module]):
        self.sizes = [m.out_features for m in modules]
        self.modules, self.weight, self.packed = modules, None, None
        if all(type(m) is nn.Linear and m.bias is None for m in modules):
            self.weight = torch.cat([m.weight.detach() for m in modules])  # (sum of outs, in)
        elif all(isinstance(m, LoRALinear) and not m.merged and m.base.bias is None
                 and (m.dropout_p == 0 or not m.training) for m in modules):
            self.weight = torch.cat([m.merged_weight() for m in modules])  # (sum of outs, in): detached
        elif all(isinstance(m, Linear4bit) and m.bias is None and m.blocksize == modules[0].blocksize
                 and (m.in_features * m.out_features) % m.blocksize == 0 for m in modules):
            states = [m.quant_state() for m in modules]
            self.blocksize, self.dtype = modules[0].blocksize, modules[0].weight_dtype
            self.packed = torch.cat([st.packed for st in states])  # whole blocks: the rows stay aligned
            self.scales = torch.cat([st.block_scales() for st in states])

    def current_weight(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The fused weight (sum of outs, in) in `dtype`, dequantized now if it is NF4; None: call the modules."""
        weight = self.weight
        if self.packed is not None:
            weight = dequantize_packed(self.packed, self.scales, self.blocksize).view(sum(self.sizes), -1)
        # (a conversion to the dtype it already has is skipped: even a no-op costs its overhead)
        return weight if weight is None or weight.dtype == dtype else weight.to(dtype)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        weight = self.current_weight(x.dtype)
        if weight is None:  # call each as it is
            return [m(x) for m in self.modules]
        y = F.linear(x, weight)
        if len(self.sizes) == 1:
            return [y]
        starts = [0]
        for size in self.sizes:
            starts.append(starts[-1] + size)
        return [y[..., a:b] for a, b in zip(starts, starts[1:])]  # views, one per layer


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * gain in fp32, gain = 1 + w precomputed: RMSNormFunction's formula, to the bit.

    x * x is how PyTorch computes x.pow(2) anyway, and on a CPU `mean` IS a sum followed by an
    in-place division by the count, so sum / count gives the same bits. Written out, it costs a
    third of `mean`, which wraps the count into a new tensor and converts it on every call: ~10 us
    saved per norm, 17 norms in a ~1 ms token at the tiny size.
    """
    x32 = x if x.dtype == torch.float32 else x.float()  # (skipping a no-op conversion saves its overhead)
    mean_square = (x32 * x32).sum(dim=-1, keepdim=True) / scalar(float(x32.shape[-1]))
    rstd = torch.rsqrt(mean_square + scalar(eps))
    out = x32 * rstd * gain
    return out if x.dtype == torch.float32 else out.type_as(x)


class InferenceModel:
    """A GemmaNano's weights arranged for inference (see the module docstring). Read-only: it holds
    detached weights, so nothing it computes is recorded for gradients; its callers (decode_step,
    nano/serve/engine.py's step) run it under torch.inference_mode, which also skips the version counters
    and view tracking that even torch.no_grad keeps: ~15% of a token at this size."""

    def __init__(self, model: nn.Module, full_rope_table: bool = False):
        self.model, self.cfg = model, model.cfg
        cfg = self.cfg
        self.embed = model.embed_tokens.weight.detach()  # (V, d), also the LM head (tied)
        self.sqrt_d = torch.tensor(math.sqrt(cfg.d_model), dtype=self.embed.dtype)
        self.eps = cfg.rms_norm_eps
        self.final_gain = 1.0 + model.norm.weight.detach().float()
        self.layers = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append({
                "qkv": FusedLinear([attn.q_proj, attn.k_proj, attn.v_proj]),
                "o": FusedLinear([attn.o_proj]),
                "gate_up": FusedLinear([mlp.gate_proj, mlp.up_proj]),
                "down": FusedLinear([mlp.down_proj]),
                "gain_in": 1.0 + layer.input_layernorm.weight.detach().float(),
                "gain_post_attn": 1.0 + layer.post_attention_layernorm.weight.detach().float(),
                "gain_pre_ff": 1.0 + layer.pre_feedforward_layernorm.weight.detach().float(),
                "gain_post_ff": 1.0 + layer.post_feedforward_layernorm.weight.detach().float(),
                "window": attn.window,
                "scale": attn.scale,
            })
        self.cos = self.sin = None  # the RoPE table, (positions, D) each, made on first use
        # full_rope_table: the table for the whole context now, and `rope` never checks its length again:
        # for torch.compile, to which reading a number out of a tensor (positions.max()) is a graph break
        self.full_rope_table = full_rope_table
        if full_rope_table:
            self.rope(torch.tensor([cfg.context_len - 1], device=self.embed.device))

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (N, D) of these positions, from a table (each row is the same number rope_cos_sin gives)."""
        needed = 0 if self.full_rope_table and self.cos is not None else int(positions.max()) + 1
        if self.cos is None or self.cos.shape[0] < needed:
            length = max(needed, self.cfg.context_len)
            cos, sin = rope_cos_sin(torch.arange(length, device=positions.device), self.cfg.head_dim, self.cfg.rope_theta)
            self.cos, self.sin = cos.to(self.embed.dtype), sin.to(self.embed.dtype)
        return self.cos[positions], self.sin[positions]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """ids, positions (N,) -> final-normed hidden states (N, d_model). `attend` stores K/V and attends."""
        cfg = self.cfg
        num_tokens = ids.shape[0]
        heads, kv_heads, head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        x = F.embedding(ids, self.embed) * self.sqrt_d  # (N, d)
        cos, sin = self.rope(positions)  # (N, D) each
        cos, sin = cos[:, None], sin[:, None]  # (N, 1, D): the same angle for every head of a token
        for i, w in enumerate(self.layers):
            # 1. attention: one matmul for q, k, v; one rotation for q and k together
            h = rms_norm(x, w["gain_in"], self.eps)
            qkv_weight = w["qkv"].current_weight(h.dtype)
            if qkv_weight is not None:
                # q, k, v are side by side in one (N, (Hq + 2 Hkv) * D) output: rotate q and k as one
                # (N, Hq + Hkv, D) block (RoPE treats every head alike), then split
                qkv = F.linear(h, qkv_weight).view(num_tokens, heads + 2 * kv_heads, head_dim)
                qk = rotate(qkv[:, :heads + kv_heads], cos, sin)
                q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads:]
            else:
                q, k, v = w["qkv"](h)  # (N, Hq*D), (N, Hkv*D), (N, Hkv*D)
                q = rotate(q.reshape(num_tokens, heads, head_dim), cos, sin)
                k = rotate(k.reshape(num_tokens, kv_heads, head_dim), cos, sin)
                v = v.reshape(num_tokens, kv_heads, head_dim)
            out = attend(i, q, k, v)  # (N, Hq*D)
            x = x + rms_norm(w["o"](out)[0], w["gain_post_attn"], self.eps)
            # 2. the GeGLU MLP: one matmul for gate and up
            gate, up = w["gate_up"](rms_norm(x, w["gain_pre_ff"], self.eps))
            x = x + rms_norm(w["down"](F.gelu(gate, approximate="tanh") * up)[0], w["gain_post_ff"], self.eps)
        return rms_norm(x, self.final_gain, self.eps)

    def logits(self, hidden: torch.Tensor, soft_capped: bool = True) -> torch.Tensor:
        """(N, d) -> soft-capped next-token logits (N, vocab) in fp32: the model's own tied LM head
        (soft_capped=False: the raw scores, for a caller that caps only what it needs)."""
        return self.model.lm_head(hidden, soft_capped)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, softcap: float,
                     key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """One query per row against its own keys: q (B, Hq, D), keys/values (B, Hkv, L, D) -> (B, Hq*D).

    The query is at the last position, so causality holds by itself; `key_bias` (L,) or (B, L), -inf
    where a key is outside the sliding window (or padding) and 0 elsewhere (`hidden_to_bias`), is the
    only mask. Adding it gives the scores masked_fill would give (x + 0 = x, x + -inf = -inf) at a
    fraction of the cost (5x fewer microseconds at one row, 9x at 64). The same ops in the same order
    as nano/model/attention.py's reference otherwise, so the same numbers, minus its mask arithmetic.
    """
    batch, heads, head_dim = q.shape
    kv_heads, num_keys = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    dtype = q.dtype
    fp32 = dtype == keys.dtype == torch.float32  # then the .float() calls are skipped (no-ops anyway)
    if not fp32:
        q, keys, values = q.float(), keys.float(), values.float()
    # torch.bmm on (B * Hkv) matrices: what `@` on the 4-d tensors does inside, minus its reshaping ops
    q_grouped = q.reshape(batch * kv_heads, group, head_dim)  # (B*Hkv, G, D)
    scores = torch.bmm(q_grouped, keys.reshape(batch * kv_heads, num_keys, head_dim).transpose(1, 2))
    scores = scores * scalar(scale)  # (B*Hkv, G, L)
    scores = soft_cap(scores, softcap)
    if key_bias is not None:  # the same mask for every head of a sequence
        scores = scores.view(batch, kv_heads * group, num_keys) + key_bias.view(-1, 1, num_keys)
    weights = torch.softmax(scores, dim=-1).view(batch * kv_heads, group, num_keys)
    out = torch.bmm(weights, values.reshape(batch * kv_heads, num_keys, head_dim))  # (B*Hkv, G, D)
    out = out.view(batch, heads * head_dim)
    return out if fp32 else out.to(dtype)


def hidden_to_bias(hidden: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True = hidden) as the additive bias decode_attention takes: -inf where hidden, else 0."""
    return torch.zeros(hidden.shape, device=hidden.device).masked_fill_(hidden, float("-inf"))


@torch.inference_mode()
def decode_step(model: nn.Module, idx: torch.Tensor, kv_cache) -> torch.Tensor:
    """The fast one-token step: one new token per row (B, 1) into a KVCache -> logits (B, 1, V).

    Every row is at position kv_cache.pos; rows that were left-padded (generate_batch) carry the
    cache's key_mask, whose padding is hidden from this step's query like keys outside the window.
    The InferenceModel is built on the first step and kept on the cache: weights do not change
    while one cache is being filled.
    """
    fast = getattr(kv_cache, "inference_model", None)
    if fast is None or fast.model is not model:
        fast = kv_cache.inference_model = InferenceModel(model)
    batch, pos, device = idx.shape[0], kv_cache.pos, idx.device
    positions = torch.full((batch,), pos, dtype=torch.long, device=device)
    # the masks of this step, shared by every layer with that window: keys more than `window` - 1
    # positions back are hidden (nano/model/attention.py: allowed_keys for one query), and so is
    # each row's left padding (key_mask False; the new token itself is real: write_mask)
    distance = pos - torch.arange(pos + 1, device=device)  # (L,)
    real = kv_cache.write_mask(None, 1)  # (B, L) or None: nothing was padded
    padding = None if real is None else hidden_to_bias(~real)  # (B, L)
    masks = {}
    for w in fast.layers:
        window = hidden_to_bias(distance >= w["window"]) if 0 < w["window"] <= pos else None  # (L,)
        if window is not None and padding is not None:
            masks[w["window"]] = padding + window  # (B, L): -inf where either hides the key
        else:
            masks[w["window"]] = padding if window is None else window

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        w = fast.layers[layer]
        keys, values = kv_cache.keys[layer], kv_cache.values[layer]  # (B, Hkv, max_len, D)
        keys[:, :, pos] = k  # this token's key and value (B, Hkv, D) at its position
        values[:, :, pos] = v
        return decode_attention(q, keys[:, :, :pos + 1], values[:, :, :pos + 1], w["scale"], fast.cfg.attn_softcap,
                                masks[w["window"]])

    hidden = fast.forward(idx[:, 0], positions, attend)  # (B, d)
    kv_cache.advance(1)
    return fast.logits(hidden).view(batch, 1, -1)
