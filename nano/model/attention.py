"""
Attention, written out: the readable definition every faster version must agree with.

Each query scores every key it may see, the scores become weights through a softmax, and the
output is the weighted sum of the values. Gemma-2 adds three twists that this file spells out in
order: a soft-cap `c * tanh(s / c)` on the scores, a sliding window on some layers, and multi-query
attention (MQA), where a group of G query heads shares one key/value head.

    scores  = (q @ k^T) * scale                      scale = query_pre_attn_scalar ** -0.5
    scores  = c * tanh(scores / c)                   soft-cap (skipped when c == 0)
    scores  = scores where allowed else -inf         causal, window, padding
    out     = softmax(scores) @ v

Papers: "Attention Is All You Need" (Vaswani et al., 2017); multi-query attention (Shazeer, 2019);
grouped-query attention (Ainslie et al., 2023); Gemma 2 (Gemma Team, 2024).

`attention(...)` is the dispatcher the model calls. For training it takes the fused Triton kernel of
nano/model/flash_attention.py on a GPU, or `attention_blockwise` (the same computation one block of queries
at a time, with a hand-written backward) on a CPU; decoding and padded batches use the reference.
Run the checks with
`.venv/bin/python -m pytest -q tests/test_03_attention_reference.py`.
"""

import importlib.util

import torch

# the implementations the dispatcher knows; "auto" picks one of the other two for the device
ATTN_IMPLS = ("auto", "eager", "triton")


_SCALARS: dict[float, torch.Tensor] = {}


def scalar(value: float) -> torch.Tensor:
    """`value` as a 0-dim fp32 tensor, made once. footgun: `x * 0.5` with a Python float converts the
    float to a tensor on every call (3 hidden operations); multiplying by this tensor gives the same
    numbers without them. Dozens of such constants per token add up at this size."""
    tensor = _SCALARS.get(value)
    if tensor is None:
        # a normal tensor even when first asked for inside torch.inference_mode (generation): an
        # inference tensor cached here would break every later training step that multiplies by it
        with torch.inference_mode(False):
            tensor = _SCALARS[value] = torch.tensor(value, dtype=torch.float32)
    return tensor


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma-2's soft-cap, cap * tanh(x / cap): x squeezed smoothly into (-cap, cap), near x itself
    where |x| << cap. Used on attention scores (cap 50) and on the final logits (cap 30); cap 0 (or
    less) turns it off.

    >>> soft_cap(torch.tensor([0.0, 1.0, 1000.0]), 30.0)
    tensor([ 0.0000,  0.9996, 30.0000])
    """
    if cap <= 0:
        return x
    c = scalar(cap)  # a cached 0-dim tensor: the same numbers as the float, minus its conversion ops
    return c * torch.tanh(x / c)


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and softmax run in fp32 (fp64 stays fp64, for exact checks in the tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def allowed_keys(
    num_queries: int,
    num_keys: int,
    window: int = 0,
    key_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Which keys each query may attend to, as a bool tensor (True = may attend).

    The queries are the LAST `num_queries` of the `num_keys` positions: during training they are all
    of them (num_queries == num_keys); while decoding with a KV cache one new token (the last
    position) attends over everything cached so far. A query at absolute position p sees key k when

        k <= p                  (causal: no peeking at the future)
        p - window < k          (sliding window of `window` keys including itself; 0 = no window)
        key_mask[b, k]          (False marks left padding) -- unless k == p: a position always sees
                                 itself, so no row is ever all -inf (that would make softmax NaN)

    Returns (Tq, Tk) without a key_mask, (B, Tq, Tk) with one.

    >>> allowed_keys(3, 3).int()                  # causal
    tensor([[1, 0, 0],
            [1, 1, 0],
            [1, 1, 1]], dtype=torch.int32)
    >>> allowed_keys(4, 4, window=2).int()        # each query sees itself and one key back
    tensor([[1, 0, 0, 0],
            [1, 1, 0, 0],
            [0, 1, 1, 0],
            [0, 0, 1, 1]], dtype=torch.int32)
    >>> allowed_keys(1, 4).int()                  # one new token against a cache of 4
    tensor([[1, 1, 1, 1]], dtype=torch.int32)
    """
    if num_queries > num_keys:
        raise ValueError(f"{num_queries} queries but only {num_keys} keys: queries must be the last positions")
    query_pos = torch.arange(num_keys - num_queries, num_keys, device=device)  # (Tq,) absolute positions
    key_pos = torch.arange(num_keys, device=device)  # (Tk,)
    distance = query_pos[:, None] - key_pos[None, :]  # (Tq, Tk): how far back each key lies
    allowed = distance >= 0  # causal
    if window > 0:
        allowed &= distance < window  # p - W < k  <=>  p - k < W
    if key_mask is None:
        return allowed
    if key_mask.shape[-1] != num_keys:
        raise ValueError(f"key_mask covers {key_mask.shape[-1]} positions but there are {num_keys} keys")
    is_self = distance == 0  # (Tq, Tk)
    return allowed[None] & (key_mask.bool()[:, None, :] | is_self[None])  # (B, Tq, Tk)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention with soft-cap, sliding window, padding mask and MQA/GQA, in plain PyTorch.

    q: (B, Hq, Tq, D)    k, v: (B, Hkv, Tk, D) with Hq a multiple of Hkv    key_mask: (B, Tk) bool or None
    returns (B, Hq, Tq, D) in q's dtype. Scores and softmax are computed in fp32.

    MQA/GQA: query head h uses KV head h // G, where G = Hq // Hkv (the same order as Hugging Face's
    `repeat_kv`). Instead of copying each KV head G times we stack the G query heads of a group
    along the row axis, so ONE matmul per KV head scores all of them (the fused kernel packs its
    tiles the same way):

        q (B, Hkv*G, Tq, D) -> (B, Hkv, G*Tq, D)    @ k^T (B, Hkv, D, Tk)   -> scores (B, Hkv, G*Tq, Tk)

    Small example: with all-equal keys every query averages the values it may see.

    >>> q = torch.zeros(1, 2, 3, 4); k = torch.zeros(1, 1, 3, 4)            # 2 query heads, 1 KV head
    >>> v = torch.arange(3.0).view(1, 1, 3, 1).expand(1, 1, 3, 4)          # values 0, 1, 2
    >>> attention_reference(q, k, v, scale=0.5)[0, 0, :, 0]                 # causal running means
    tensor([0.0000, 0.5000, 1.0000])
    """
    batch, num_q_heads, num_queries, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"{num_q_heads} query heads cannot be split into groups over {num_kv_heads} KV heads")
    group = num_q_heads // num_kv_heads  # G query heads share each KV head (G = Hq for MQA, 1 for MHA)
    fp = _score_dtype(q.dtype)

    # inside torch.autocast a matmul would run in bf16 whatever we cast its inputs to: switch it off
    with torch.autocast(q.device.type, enabled=False):
        # 1. scores in fp32, with the G query heads of each group stacked along the rows
        q_grouped = q.to(fp).reshape(batch, num_kv_heads, group * num_queries, head_dim)  # (B, Hkv, G*Tq, D)
        scores = q_grouped @ k.to(fp).transpose(-1, -2)  # (B, Hkv, G*Tq, Tk)
        scores = scores.view(batch, num_kv_heads, group, num_queries, num_keys) * scale  # (B, Hkv, G, Tq, Tk)

        # 2. soft-cap: smoothly squash the scores into (-c, c) so no single logit can run away
        scores = soft_cap(scores, softcap)

        # 3. masks AFTER the cap (capping -inf would turn it into -c, a real weight)
        allowed = allowed_keys(num_queries, num_keys, window, key_mask, device=q.device)  # (Tq,Tk) or (B,Tq,Tk)
        if allowed.dim() == 3:
            allowed = allowed[:, None, None]  # (B, 1, 1, Tq, Tk): the same for every head
        scores = scores.masked_fill(~allowed, float("-inf"))

        # 4. softmax over the keys, then the weighted sum of the values (one matmul per KV head again)
        weights = torch.softmax(scores, dim=-1)  # (B, Hkv, G, Tq, Tk); every row has >= 1 allowed key
        weights = weights.view(batch, num_kv_heads, group * num_queries, num_keys)  # (B, Hkv, G*Tq, Tk)
        out = weights @ v.to(fp)  # (B, Hkv, G*Tq, Dv); values may be wider or narrower than D
        return out.reshape(batch, num_q_heads, num_queries, v.shape[-1]).to(q.dtype)  # (B, Hq, Tq, Dv)


class BlockwiseAttention(torch.autograd.Function):
    """The reference's training case (Tq == Tk, no padding), computed one block of queries at a time.

    Same numbers as `attention_reference`, 2-8x faster on a CPU (more for longer sequences), because
      1. a block of queries only scores the keys it can see: keys after the block (causal) and
         before the window are never computed -- about half of the work for a global layer and
         most of it for a window layer;
      2. a block's scores (B, Hkv, G*block, keys) are small enough to stay in the CPU's cache while
         the soft-cap, mask and softmax pass over them;
      3. the backward pass is written by hand from the saved probabilities, with in-place steps,
         instead of autograd's one saved tensor and one full pass per elementwise op.
    It is the FlashAttention idea (tiles, see nano/model/flash_attention.py) without the online softmax:
    a block's keys all fit in memory at once, so its softmax is an ordinary one.

    The math of the backward pass, with s' = q k^T * scale / c, t = tanh(s'), scores = c t,
    P = softmax(scores masked), O = P V:
        dV = P^T dO            dP = dO V^T           dScores = P * (dP - rowsum(dO * O))
        ds' = dScores * c (1 - t^2)                  dQ = ds' K * scale / c      dK = ds'^T Q * scale / c
    (without a soft-cap: ds = dScores, and scale alone). dK and dV sum over the G query heads of
    each group, because one matmul covers all G*block rows.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float, softcap: float, window: int, block: int):
        batch, num_q_heads, seq_len, head_dim = q.shape
        num_kv_heads = k.shape[1]
        group = num_q_heads // num_kv_heads
        with torch.autocast(q.device.type, enabled=False):  # fp32 scores, as in the reference
            fp = _score_dtype(q.dtype)
            # fold scale (and 1/c) into q, once: a pass over (T, D) instead of one over (T, keys)
            q_scale = scale / softcap if softcap > 0 else scale
            q_grouped = (q.to(fp) * q_scale).reshape(batch, num_kv_heads, group, seq_len, head_dim)  # (B, Hkv, G, T, D)
            out = torch.empty(batch, num_kv_heads, group, seq_len, head_dim, device=q.device, dtype=fp)
            positions = torch.arange(seq_len, device=q.device)
            spans, probs, tanh_grads = [], [], []
            for q_start in range(0, seq_len, block):
                q_end = min(q_start + block, seq_len)
                rows = q_end - q_start
                # the keys this block can see: [k_start, q_end) -- nothing after the block's last query,
                # nothing before its first query's window
                k_start = max(0, q_start - window + 1) if window > 0 else 0
                q_block = q_grouped[:, :, :, q_start:q_end].reshape(batch, num_kv_heads, group * rows, head_dim)
                k_block = k[:, :, k_start:q_end].to(fp)  # (B, Hkv, keys, D)
                scores = q_block @ k_block.transpose(-1, -2)  # (B, Hkv, G*rows, keys): s' = q k^T scale / c
                if softcap > 0:
                    t = scores.tanh_()  # in place: t = tanh(s')
                    # what the backward pass multiplies by: d(c t)/ds' = c (1 - t^2), times ds'/d(q k^T) = q_scale
                    tanh_grads.append(t.square().mul_(-softcap * q_scale).add_(softcap * q_scale))
                    scores = t.mul_(softcap)  # in place again: the capped scores c t
                distance = positions[q_start:q_end, None] - positions[None, k_start:q_end]  # (rows, keys)
                not_visible = distance < 0  # after the query (causal) ...
                if window > 0:
                    not_visible |= distance >= window  # ... or before its window
                scores = scores.view(batch, num_kv_heads, group, rows, q_end - k_start).masked_fill_(not_visible, float("-inf"))
                p = torch.softmax(scores, dim=-1).view(batch, num_kv_heads, group * rows, q_end - k_start)
                out[:, :, :, q_start:q_end] = (p @ v[:, :, k_start:q_end].to(fp)).view(batch, num_kv_heads, group, rows, head_dim)
                spans.append((q_start, q_end, k_start))
                probs.append(p)
        out = out.view(batch, num_q_heads, seq_len, head_dim)
        ctx.save_for_backward(q, k, v, out)
        ctx.spans, ctx.probs, ctx.tanh_grads = spans, probs, tanh_grads
        ctx.q_scale, ctx.softcap = q_scale, softcap
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors
        batch, num_q_heads, seq_len, head_dim = q.shape
        num_kv_heads = k.shape[1]
        group = num_q_heads // num_kv_heads
        fp = out.dtype
        grad_out = grad_out.to(fp)
        # Delta = rowsum(dO * O) = rowsum(dP * P): the softmax backward's subtracted term, per query
        delta = (grad_out * out).sum(-1).view(batch, num_kv_heads, group, seq_len)  # (B, Hkv, G, T)
        grad_out = grad_out.reshape(batch, num_kv_heads, group, seq_len, head_dim)
        q_grouped = q.reshape(batch, num_kv_heads, group, seq_len, head_dim)
        k32, v32 = k.to(fp), v.to(fp)
        dq = torch.empty(batch, num_kv_heads, group, seq_len, head_dim, device=q.device, dtype=fp)
        dk, dv = torch.zeros_like(k32), torch.zeros_like(v32)
        for i, (q_start, q_end, k_start) in enumerate(ctx.spans):
            rows, p = q_end - q_start, ctx.probs[i]
            do_block = grad_out[:, :, :, q_start:q_end].reshape(batch, num_kv_heads, group * rows, head_dim)
            dv[:, :, k_start:q_end] += p.transpose(-1, -2) @ do_block  # (B, Hkv, keys, D)
            dp = do_block @ v32[:, :, k_start:q_end].transpose(-1, -2)  # (B, Hkv, G*rows, keys)
            delta_block = delta[:, :, :, q_start:q_end].reshape(batch, num_kv_heads, group * rows, 1)
            ds = dp.sub_(delta_block).mul_(p)  # dScores, in place
            if ctx.softcap > 0:
                ds.mul_(ctx.tanh_grads[i])  # through c tanh(s') and s' = q k^T q_scale, in one step
            else:
                ds.mul_(ctx.q_scale)  # through s = q k^T scale
            dq[:, :, :, q_start:q_end] = (ds @ k32[:, :, k_start:q_end]).view(batch, num_kv_heads, group, rows, head_dim)
            q_block = q_grouped[:, :, :, q_start:q_end].reshape(batch, num_kv_heads, group * rows, head_dim).to(fp)
            dk[:, :, k_start:q_end] += ds.transpose(-1, -2) @ q_block  # (B, Hkv, keys, D)
        dq = dq.view(batch, num_q_heads, seq_len, head_dim)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def attention_blockwise(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float = 0.0, window: int = 0,
    block: int = 64,
) -> torch.Tensor:
    """`attention_reference` for Tq == Tk and no key_mask, faster (see BlockwiseAttention).

    q: (B, Hq, T, D), k/v: (B, Hkv, T, D) -> (B, Hq, T, D). block: queries per block (64 suits a CPU).
    """
    if q.shape[2] != k.shape[2]:
        raise ValueError("attention_blockwise is for training (as many queries as keys); use attention_reference")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{q.shape[1]} query heads cannot be split into groups over {k.shape[1]} KV heads")
    return BlockwiseAttention.apply(q, k, v, scale, softcap, window, block)


def resolve_attn_impl(impl: str, device: torch.device | str) -> str:
    """Turn "auto" into the implementation that fits `device`; check a forced choice.

    "auto" -> "triton" on a CUDA device when the triton package is installed, else "eager".
    >>> resolve_attn_impl("auto", "cpu")
    'eager'
    """
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTN_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    on_cuda = torch.device(device).type == "cuda"
    return "triton" if on_cuda and importlib.util.find_spec("triton") is not None else "eager"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
    key_mask: torch.Tensor | None = None,
    impl: str = "eager",
) -> torch.Tensor:
    """The attention the model calls: same arguments and result as `attention_reference`.

    The training case -- as many queries as keys, no padding mask -- goes to a fast implementation:
    impl "triton" runs the fused kernel of nano/model/flash_attention.py, impl "eager" the blockwise
    PyTorch version above. Everything else (decoding against a KV cache, Tq < Tk, and left-padded
    batches) uses the reference, which handles every case. "auto" resolves by q's device
    (see `resolve_attn_impl`).

    Under torch.compile the blockwise version stays: on this CPU, compiling the reference's full
    score matrix instead made a tiny training step slower (bench/bench_model.py --compile).
    """
    impl = resolve_attn_impl(impl, q.device)
    fused_case = q.shape[2] == k.shape[2] and key_mask is None
    if impl == "triton" and fused_case:
        # imported here, not at the top: triton is optional, and on a machine without CUDA the module
        # switches on Triton's interpreter (TRITON_INTERPRET=1: numpy, slow, for learning) as it loads
        from nano.model.flash_attention import flash_attention

        return flash_attention(q, k, v, scale, softcap, window)
    if fused_case:
        return attention_blockwise(q, k, v, scale, softcap, window)
    return attention_reference(q, k, v, scale, softcap, window, key_mask)
