"""
Gemma-2 Nano: the Gemma-2 architecture at a size that trains on a laptop, in one readable file.

A decoder-only transformer: token embeddings flow through a stack of layers, each of which lets
every position look back at earlier ones (attention) and then transforms each position on its own
(a gated MLP); a final projection onto the vocabulary gives the next-token logits. Gemma-2's choices,
each explained where it appears and in lessons/03_model.md: embeddings scaled by sqrt(d), RMSNorm
with a (1 + w) gain, four "sandwich" norms per layer, GeGLU, rotary positions (RoPE), soft-capped
attention scores (50) and logits (30), a sliding window on every other layer, multi-query attention
(one key/value head shared by all query heads), and an LM head tied to the embedding.

Paper: "Gemma 2: Improving Open Language Models at a Practical Size" (Gemma Team, 2024). The
computation matches Hugging Face's `Gemma2ForCausalLM` (transformers' models/gemma2/modeling_gemma2.py) so that a
trained model exports to it with identical logits: our parameter names are Hugging Face's without
the leading "model." (`layers.0.self_attn.q_proj.weight` <-> `model.layers.0.self_attn.q_proj.weight`).

    from nano.model.gemma import GemmaNano, model_config
    model = GemmaNano(model_config("tiny"))
    logits, loss = model(idx, targets)          # idx, targets: (B, T) token ids

Tour: `make lesson-3`. Tests: `.venv/bin/python -m pytest -q tests/test_03_model.py`.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nano.text.chat_format import IGNORE_INDEX  # targets the loss leaves out (prompt tokens, padding)
from nano.model.attention import ATTN_IMPLS, attention, resolve_attn_impl, soft_cap


# --------------------------------------------------------------------------------------------------
# configuration


@dataclass
class ModelConfig:
    """Every number that fixes the model's shape and computation. Hugging Face's name in [brackets]."""

    vocab_size: int = 4096  # tokens the tokenizer knows (lesson 1 trains 4096) [vocab_size]
    context_len: int = 256  # longest sequence trained on; RoPE itself has no limit [max_position_embeddings]
    d_model: int = 128  # width of the residual stream [hidden_size]
    n_layers: int = 4  # transformer layers [num_hidden_layers]
    n_heads: int = 4  # query heads [num_attention_heads]
    n_kv_heads: int = 1  # key/value heads: 1 = MQA, n_heads = MHA, in between = GQA [num_key_value_heads]
    head_dim: int = 32  # width of one head; Gemma does not tie it to d_model / n_heads [head_dim]
    d_ff: int = 384  # hidden width of the GeGLU MLP [intermediate_size]
    sliding_window: int = 64  # keys a query sees on the window layers (0, 2, 4, ...) [sliding_window]
    query_pre_attn_scalar: float = 32.0  # scores are scaled by this ** -0.5 (Gemma: head_dim) [same]
    attn_softcap: float = 50.0  # attention scores -> 50 tanh(s / 50); 0 turns it off [attn_logit_softcapping]
    final_softcap: float = 30.0  # logits -> 30 tanh(z / 30); 0 turns it off [final_logit_softcapping]
    rope_theta: float = 10000.0  # RoPE base: the slowest pair turns once per ~2 pi theta tokens [rope_theta]
    rms_norm_eps: float = 1e-6  # added to mean(x^2) before the square root [rms_norm_eps]
    initializer_range: float = 0.02  # std of the normal init of every matrix [initializer_range]
    attn_impl: str = "auto"  # "eager" (reference), "triton" (fused kernel), "auto" (triton on CUDA)

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even: RoPE rotates pairs of dimensions")


# Two presets. Both keep Gemma-2's recipe (MQA, window on alternate layers, soft-caps 50/30, GeGLU,
# sandwich norms, tied embeddings, query_pre_attn_scalar = head_dim); only the size differs.
PRESETS: dict[str, dict] = {
    # tiny, ~1.3M parameters (0.5M of them the embedding): small enough that 2 CPU cores train it to
    # readable stories in minutes. d_ff = 3 d (between LLaMA's 8/3 d and Gemma-2-2B's 4 d) gives the
    # GeGLU's three matrices 9 d^2 parameters, close to the 8 d^2 of a classic 4 d MLP. head_dim 32 is a
    # power of two (Triton tiles want one). The window of 64 is a quarter of the context, so the
    # local/global difference shows at this length.
    "tiny": dict(
        vocab_size=4096, context_len=256, d_model=128, n_layers=4, n_heads=4, n_kv_heads=1,
        head_dim=32, d_ff=384, sliding_window=64, query_pre_attn_scalar=32.0,
    ),
    # nano, ~19.8M parameters: the lesson docs' Gemma-2 Nano (GPU recommended, CPU possible).
    # 8 query heads of 64 share one KV head (the shape bench/bench_attention.py measures); d_model = 8 * 64
    # keeps hidden_size % num_heads == 0, which recent transformers versions insist on.
    "nano": dict(
        vocab_size=4096, context_len=512, d_model=512, n_layers=6, n_heads=8, n_kv_heads=1,
        head_dim=64, d_ff=1536, sliding_window=128, query_pre_attn_scalar=64.0,
    ),
}


def model_config(preset: str = "tiny", **overrides) -> ModelConfig:
    """A preset's config with some fields changed: model_config("nano", n_kv_heads=8) is its MHA twin."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}; known: {sorted(known)}")
    return ModelConfig(**{**PRESETS[preset], **overrides})


# --------------------------------------------------------------------------------------------------
# the pieces of a layer


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * (1 + w) in plain PyTorch, computed in fp32: the definition (Hugging Face's order of ops).

    >>> rms_norm_reference(torch.tensor([[3.0, 4.0]]), torch.zeros(2), eps=0.0)   # rms = sqrt(12.5)
    tensor([[0.8485, 1.1314]])
    """
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * (1.0 + weight.float())).type_as(x)


class RMSNormFunction(torch.autograd.Function):
    """`rms_norm_reference` with a hand-written backward: same forward numbers, half the time on a CPU.

    Autograd would save and revisit every intermediate of the five elementwise ops above; a small
    model runs 4 norms per layer, so at the tiny size they cost more than the attention matmuls.
    With r = 1 / sqrt(mean(x^2) + eps), xhat = x r, y = xhat (1 + w) and g = dloss/dy:

        dloss/dw = sum over positions of g * xhat
        dloss/dx = r * (g' - xhat * mean(g' * xhat))        where g' = g (1 + w)

    (the second term removes the part of g' that would only change the length of x, to which
    the output is blind). tests/test_03_model.py checks it against autograd on the reference.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., 1): r
        gain = 1.0 + weight.float()  # (d,)
        ctx.save_for_backward(x, rstd, gain)
        return (x32 * rstd * gain).type_as(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, rstd, gain = ctx.saved_tensors
        grad_out = grad_out.float()
        xhat = x.float() * rstd  # recomputed: cheaper than keeping a second activation-sized tensor
        grad_weight = (grad_out * xhat).reshape(-1, xhat.shape[-1]).sum(0)  # (d,)
        g = grad_out * gain  # g'
        grad_x = (g - xhat * (g * xhat).mean(dim=-1, keepdim=True)).mul_(rstd)
        return grad_x.type_as(x), grad_weight.type_as(gain), None


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + w), computed in fp32.

    Gemma stores the gain as an offset from 1 and starts it at zero, so a fresh norm is a pure
    normalisation and weight decay pulls the gain towards 1, not towards 0. fp32 because mean(x^2)
    over hundreds of bf16 values loses too many digits.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # the offset w; the gain is (1 + w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the compiler fuses the plain ops into one kernel itself
            return rms_norm_reference(x, self.weight, self.eps)
        if not torch.is_grad_enabled():
            # inference (generation, serving): the same ops as RMSNormFunction.forward, so the same
            # numbers, without the cost of an autograd Function (a context, saved tensors) per call
            x32 = x.float()
            rstd = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
            return (x32 * rstd * (1.0 + self.weight.float())).type_as(x)
        return RMSNormFunction.apply(x, self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the RoPE angles, in fp32: (T,) positions -> two (T, head_dim) tensors.

    Pair i (of head_dim / 2) turns at frequency theta^(-2i / head_dim): the first pair once per ~6
    tokens, the last one very slowly. The angles are repeated twice, [f0..f_{D/2-1}, f0..f_{D/2-1}],
    because the "rotate_half" layout pairs dimension i with dimension i + D/2.

    >>> cos, sin = rope_cos_sin(torch.tensor([0, 1]), head_dim=4, theta=10000.0)
    >>> cos[1]                      # angles [1, 0.01, 1, 0.01] at position 1
    tensor([0.5403, 0.9999, 0.5403, 0.9999])
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last axis: a 90-degree turn of every (x_i, x_{i+D/2}) pair.

    >>> rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    tensor([-3., -4.,  1.,  2.])
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x cos + rotate_half(x) sin, written as three passes over x instead of five.

    With x = [x1, x2] and (because the angles are repeated) sin = [s, s]:
        out = [x1 cos1 - x2 s,  x2 cos2 + x1 s]
    """
    out = x * cos  # (B, H, T, D)
    x1, x2 = x.chunk(2, dim=-1)
    out1, out2 = out.chunk(2, dim=-1)  # views into out: updated in place
    half_sin = sin[..., : x.shape[-1] // 2]
    out1.addcmul_(x2, half_sin, value=-1.0)
    out2.addcmul_(x1, half_sin)
    return out


class RotaryEmbedding(torch.autograd.Function):
    """RoPE with the shortest possible backward: the gradient of a rotation is the opposite rotation.

    Each (x_i, x_{i+D/2}) pair is turned by its angle a: a 2x2 rotation matrix R(a). Its transpose is
    R(-a), so dloss/dx = R(-a) dloss/dy: the same `rotate` with sin negated, nothing saved but cos/sin.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return rotate(grad_out, cos, -sin), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+D/2}) pair by its angle: x cos + rotate_half(x) sin.

    x: (B, H, T, D); cos, sin: (T, D). Because q and k are both rotated by their own position, the
    score q_p . k_s depends only on p - s: attention sees relative positions. cos/sin are cast to
    x's dtype first, as Hugging Face does.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if torch.compiler.is_compiling():  # the plain formula, which the compiler fuses by itself
        return x * cos + rotate_half(x) * sin
    if not torch.is_grad_enabled():  # inference: RotaryEmbedding's forward without the Function around it
        return rotate(x, cos, sin)
    return RotaryEmbedding.apply(x, cos, sin)


class GeGLU(nn.Module):
    """The MLP: down(gelu_tanh(gate(x)) * up(x)). The GELU of one projection gates the other."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class KVCache:
    """Keys and values of every token seen so far, per layer, so decoding a new token costs one step.

    Each layer holds preallocated K and V tensors of shape (B, Hkv, max_len, D); `pos` is how many
    positions are filled. A forward pass over T new tokens writes their K/V at [pos, pos + T), lets
    them attend over [0, pos + T), and then advances `pos` by T. With MQA, Hkv = 1: the cache is
    n_heads times smaller than a multi-head one (see `GemmaNano.kv_cache_bytes_per_token`).

    key_mask (B, max_len) remembers which cached positions are real tokens (False = left padding),
    so a batch of prompts of different lengths can be prefilled together, padded on the left.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.key_mask: torch.Tensor | None = None  # (B, max_len) bool, made on the first padded batch
        self.batch_size, self.max_len, self.pos = batch_size, max_len, 0

    def write_mask(self, key_mask: torch.Tensor | None, num_new: int) -> torch.Tensor | None:
        """Record which of the next `num_new` positions are real; return the mask over [0, pos + num_new)."""
        end = self.pos + num_new
        if key_mask is not None and self.key_mask is None:
            self.key_mask = torch.ones(self.batch_size, self.max_len, dtype=torch.bool, device=key_mask.device)
        if self.key_mask is None:
            return None  # nothing was ever padded: no mask needed
        self.key_mask[:, self.pos:end] = True if key_mask is None else key_mask.bool()
        return self.key_mask[:, :end]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) at [pos, pos + T); return all keys and values so far (B, Hkv, pos + T, D)."""
        end = self.pos + k.shape[2]
        self.keys[layer][:, :, self.pos:end] = k
        self.values[layer][:, :, self.pos:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_new: int) -> None:
        self.pos += num_new


class Attention(nn.Module):
    """Multi-query (or grouped / multi-head) self-attention with RoPE, soft-cap and optional window."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        # MQA: ONE key head and ONE value head (n_kv_heads = 1), shared by all query heads: these two
        # projections, and the KV cache, are n_heads times smaller than in multi-head attention
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        # Gemma-2 alternates: layers 0, 2, 4, ... see only the last `sliding_window` keys, the others all
        self.window = cfg.sliding_window if layer_idx % 2 == 0 else 0
        self.scale = cfg.query_pre_attn_scalar**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
        impl: str = "eager",
    ) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        cfg = self.cfg
        # 1. project and split into heads
        q = self.q_proj(x).view(batch, seq_len, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_proj(x).view(batch, seq_len, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(batch, seq_len, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        # 2. rotate q and k by their positions (v carries content, not position)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # 3. with a cache: append this step's k, v and attend over everything so far
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, Hkv, pos + T, D)
        # 4. scores -> soft-cap -> masks -> softmax -> weighted values (nano/model/attention.py)
        out = attention(q, k, v, self.scale, cfg.attn_softcap, self.window, key_mask, impl)  # (B, Hq, T, D)
        # 5. put the heads side by side again and mix them
        out = out.transpose(1, 2).reshape(batch, seq_len, cfg.n_heads * cfg.head_dim)  # (B, T, Hq*D)
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    """One layer with Gemma-2's "sandwich" norms: every sublayer is normalised on the way in AND out.

        h = x + post_attention_layernorm(attn(input_layernorm(x)))
        y = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))

    The post-norms bound what each sublayer adds to the residual stream (RMS ~1 at init whatever the
    weights), which keeps deep stacks stable without a depth-dependent init.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = GeGLU(cfg)
        self.post_feedforward_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, kv_cache=None, key_mask=None, impl="eager") -> torch.Tensor:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, key_mask, impl))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


# --------------------------------------------------------------------------------------------------
# the model


class GemmaNano(nn.Module):
    """Embedding -> n_layers DecoderLayers -> final RMSNorm -> tied LM head -> soft-capped logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        # no lm_head module: the output projection IS the embedding matrix (tied), see `forward`
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """Hugging Face's Gemma-2 init: every matrix N(0, 0.02^2), every norm offset w = 0.

        Why these: small random weights break the symmetry between units while keeping the logits of
        a fresh model near zero, so its first predictions are near-uniform (loss ~ ln(vocab)); the
        norm offsets start at 0 so every norm starts as a plain normalisation (gain 1). No GPT-2
        style 1/sqrt(layers) shrinking of the output projections is needed: the post-sublayer norms
        fix the size of what each sublayer adds. (HF also zeroes the <pad> row of the embedding; we
        do not: pad positions are masked out of both attention and the loss.)
        """
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.initializer_range)
        elif isinstance(module, RMSNorm):
            nn.init.zeros_(module.weight)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        """An empty cache for `batch_size` sequences of up to `max_len` tokens (default: context_len)."""
        weight = self.embed_tokens.weight
        return KVCache(
            self.cfg, batch_size, max_len or self.cfg.context_len,
            device=device or weight.device, dtype=dtype or weight.dtype,
        )

    def forward_hidden(
        self, idx: torch.Tensor, kv_cache: KVCache | None = None, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token ids (B, T) -> final-normed hidden states (B, T, d_model), the input of the LM head.

        With `kv_cache`, idx holds only the NEW tokens; they sit at positions [cache.pos, cache.pos + T)
        and the cache advances by T. key_mask (B, T) marks real tokens of idx (False = left padding).
        """
        batch, seq_len = idx.shape
        start = 0 if kv_cache is None else kv_cache.pos
        if kv_cache is not None:
            if start + seq_len > kv_cache.max_len:
                raise ValueError(f"KV cache holds {kv_cache.max_len} positions; {start} used + {seq_len} new do not fit")
            key_mask = kv_cache.write_mask(key_mask, seq_len)  # (B, start + T): padding seen so far
        # 1. embed, scaled by sqrt(d) in the activation dtype (bf16 turns sqrt(3072) into 55.5, as in HF)
        x = self.embed_tokens(idx)  # (B, T, d)
        x = x * torch.tensor(math.sqrt(self.cfg.d_model), dtype=x.dtype)
        # 2. RoPE angles for the absolute positions of these tokens, in fp32 (once for all layers)
        positions = torch.arange(start, start + seq_len, device=idx.device)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)  # (T, D) each
        # 3. the layers
        impl = resolve_attn_impl(self.cfg.attn_impl, idx.device)
        for layer in self.layers:
            x = layer(x, cos, sin, kv_cache, key_mask, impl)
        if kv_cache is not None:
            kv_cache.advance(seq_len)
        return self.norm(x)  # (B, T, d)

    def lm_head(self, hidden: torch.Tensor, soft_capped: bool = True) -> torch.Tensor:
        """Final hidden states (..., d) -> next-token logits (..., vocab) in fp32, soft-capped into (-30, 30).

        The head is tied: each vocabulary entry is scored by its own embedding vector, so the
        embedding matrix serves twice. soft_capped=False gives the raw scores (the loss caps them itself).
        """
        logits = (hidden @ self.embed_tokens.weight.T).float()  # fp32 from here
        return soft_cap(logits, self.cfg.final_softcap) if soft_capped else logits

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) ids -> (logits (B, T, vocab) in fp32, mean cross-entropy over targets != IGNORE_INDEX).

        Decoding one token at a time has a faster path with the same numbers (nano/model/decode_step.py);
        the model does not take it by itself: generation calls it (nano/model/generate.py: next_logits).
        """
        hidden = self.forward_hidden(idx, kv_cache, key_mask)  # (B, T, d)
        batch, seq_len, _ = hidden.shape
        if targets is not None and not torch.compiler.is_compiling():
            # the soft-cap and the loss of the plain lines below in one function: the same numbers
            # without several (B*T, V)-sized temporaries (see `softcapped_cross_entropy`; a test
            # checks the two against each other). torch.compile fuses the plain lines by itself.
            raw = self.lm_head(hidden.reshape(batch * seq_len, -1), soft_capped=False)  # (B*T, V)
            logits, loss = softcapped_cross_entropy(raw, targets.reshape(-1), self.cfg.final_softcap)
            return logits.view(batch, seq_len, -1), loss
        logits = self.lm_head(hidden.reshape(batch * seq_len, -1))  # (B*T, V), every logit in (-30, 30)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return logits.view(batch, seq_len, -1), loss

    # ---- arithmetic for the lesson -----------------------------------------------------------------

    def num_params(self) -> int:
        """Parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of K and V one token adds to the cache: 2 * layers * kv_heads * head_dim * dtype size."""
        return kv_cache_bytes_per_token(self.cfg, dtype)


class SoftcappedCrossEntropy(torch.autograd.Function):
    """logits = c tanh(z / c) and loss = mean CE(logits, targets), with a hand-written backward.

    Why not `c * torch.tanh(z / c)` and F.cross_entropy? Same numbers, but autograd then keeps four
    or five temporaries as big as the logits ((B*T) x V floats, 34 MB for 2048 tokens x 4096) and
    walks over each again in the backward pass. On a CPU, fresh buffers that big cost more than
    the arithmetic (the OS hands out zeroed pages every time): with those plain ops a tiny-preset
    training step was 44% slower than without the cap, with this function 12% (1 CPU thread).
    Here the cap is applied in place on z (nothing else needs z: the LM head's backward uses its
    input and weight), the logsumexp and the backward run over blocks of rows that fit in the
    cache, and the only big new buffer is the gradient itself.

    The gradient, per row with target y and c = 0 meaning "no cap":
        dloss/dlogits = (softmax(logits) - onehot(y)) / n_kept       (0 on rows whose target is ignored)
        dlogits/dz    = 1 - tanh(z / c)^2 = 1 - (logits / c)^2
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, targets: torch.Tensor, cap: float, rows_per_block: int):
        ctx.set_materialize_grads(False)  # an unused logits output gets no zero-filled gradient
        logits = z
        if cap > 0:
            logits.div_(cap).tanh_().mul_(cap)  # in place: z becomes the capped logits
            ctx.mark_dirty(z)
        keep = targets != IGNORE_INDEX  # (N,)
        lse = torch.empty(logits.shape[0], device=logits.device, dtype=logits.dtype)  # (N,) logsumexp per row
        for start in range(0, logits.shape[0], rows_per_block):
            lse[start:start + rows_per_block] = torch.logsumexp(logits[start:start + rows_per_block], dim=-1)
        safe_targets = targets.clamp(min=0)  # ignored rows point at token 0; `keep` zeroes them out
        target_logit = logits.gather(1, safe_targets[:, None]).squeeze(1)  # (N,)
        num_kept = keep.sum()
        loss = ((lse - target_logit) * keep).sum() / num_kept
        ctx.save_for_backward(logits, lse, safe_targets, keep, num_kept)
        ctx.cap, ctx.rows_per_block = cap, rows_per_block
        return logits, loss

    @staticmethod
    def backward(ctx, grad_logits, grad_loss):
        logits, lse, safe_targets, keep, num_kept = ctx.saved_tensors
        cap, rows = ctx.cap, ctx.rows_per_block
        grad_z = torch.empty_like(logits)
        # each kept row's share of d(loss): grad_loss / n_kept
        row_weight = keep.to(logits.dtype) * (grad_loss / num_kept if grad_loss is not None else 0.0)  # (N,)
        for start in range(0, logits.shape[0], rows):
            end = min(start + rows, logits.shape[0])
            block = grad_z[start:end]  # a view: we fill grad_z block by block
            torch.sub(logits[start:end], lse[start:end, None], out=block).exp_()  # softmax
            block.mul_(row_weight[start:end, None])
            block.scatter_add_(1, safe_targets[start:end, None], -row_weight[start:end, None])  # - onehot
            if grad_logits is not None:
                block.add_(grad_logits[start:end])
            if cap > 0:
                block.mul_(logits[start:end].square().mul_(-1.0 / cap**2).add_(1.0))  # * (1 - (logits/c)^2)
        return grad_z, None, None, None


def softcapped_cross_entropy(
    z: torch.Tensor, targets: torch.Tensor, cap: float, rows_per_block: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """z (N, V) raw fp32 logits (overwritten), targets (N,) -> (c tanh(z / c) (N, V), mean CE over kept rows)."""
    if rows_per_block <= 0:
        # 2^20 numbers (4 MB in fp32) per block: fits the CPU's cache, and few enough blocks that
        # the per-operation overhead stays small (256 blocks of 8 rows would cost more than they save)
        rows_per_block = max(1, 2**20 // z.shape[1])
    return SoftcappedCrossEntropy.apply(z, targets, cap, rows_per_block)


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """2 (K and V) * n_layers * n_kv_heads * head_dim * bytes per element.

    >>> kv_cache_bytes_per_token(model_config("tiny"), torch.bfloat16)   # 2 * 4 * 1 * 32 * 2
    512
    """
    bytes_per_element = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * bytes_per_element
