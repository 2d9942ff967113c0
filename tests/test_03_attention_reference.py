"""
Lesson 3 exercise, part 1: attention as a definition (nano/model/attention.py).

Implement `attention_reference(q, k, v, scale, softcap, window, key_mask)` so that
  - without a soft-cap it equals PyTorch's own `scaled_dot_product_attention` given the same mask,
  - the soft-cap c * tanh(s / c) is applied after scaling and before the masks,
  - a query at position p sees keys p - window < k <= p (queries are the LAST Tq positions when
    Tq < Tk, as when decoding against a KV cache),
  - key_mask False hides a key (left padding) from every query but the key's own position,
  - MQA/GQA: query head h reads KV head h // (Hq // Hkv).
Then implement `attention_blockwise`, the same numbers computed one block of queries at a time with
a hand-written backward, and `attention(..., impl=...)`, the dispatcher the model calls.
Run: .venv/bin/python -m pytest -q tests/test_03_attention_reference.py
"""

import math

import pytest
import torch
import torch.nn.functional as F
from adapters import impl

attn = impl("attention")


def random_qkv(batch, q_heads, kv_heads, q_len, k_len, head_dim, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_len, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, kv_heads, k_len, head_dim, generator=gen, dtype=dtype)
    return q, k, v


def sdpa_with_mask(q, k, v, scale, window):
    """PyTorch's attention (a trusted reference) with our causal+window mask and K/V copied per head."""
    group = q.shape[1] // k.shape[1]
    k_full, v_full = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    t_q, t_k = q.shape[2], k.shape[2]
    query_pos = torch.arange(t_k - t_q, t_k)[:, None]
    key_pos = torch.arange(t_k)[None, :]
    mask = key_pos <= query_pos
    if window > 0:
        mask &= key_pos > query_pos - window
    return F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 1), (4, 2), (3, 3)])
@pytest.mark.parametrize("window", [0, 3])
def test_reference_equals_pytorch_sdpa_without_softcap(q_heads, kv_heads, window):
    q, k, v = random_qkv(2, q_heads, kv_heads, 10, 10, 8)
    ours = attn.attention_reference(q, k, v, scale=0.3, softcap=0.0, window=window)
    torch.testing.assert_close(ours, sdpa_with_mask(q, k, v, 0.3, window), atol=1e-5, rtol=1e-5)


def test_softcap_comes_after_scale_and_before_mask():
    q, k, v = random_qkv(1, 2, 1, 6, 6, 4)
    q = q * 10  # big scores, so the cap matters
    scale, cap = 0.5, 2.0
    # by hand, one head at a time: scale, cap, mask, softmax
    expected = torch.empty_like(q)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    for h in range(2):
        scores = (q[0, h] @ k[0, 0].T) * scale
        scores = cap * torch.tanh(scores / cap)
        scores = scores.masked_fill(~causal, float("-inf"))
        expected[0, h] = torch.softmax(scores, dim=-1) @ v[0, 0]
    ours = attn.attention_reference(q, k, v, scale=scale, softcap=cap)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)


def test_softcap_bounds_the_attention_scores():
    """With scores capped to (-c, c), no allowed key can get less than exp(-2c) / n of the weight."""
    seq, cap = 8, 2.0
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, seq, 4, generator=gen, dtype=torch.float64) * 100  # raw scores in the thousands
    k = torch.randn(1, 1, seq, 4, generator=gen, dtype=torch.float64) * 100
    v = torch.eye(seq, dtype=torch.float64).view(1, 1, seq, seq)  # identity values: the output IS the weights
    capped = attn.attention_reference(q, k, v, scale=1.0, softcap=cap)[0, 0]  # (T, T) attention weights
    uncapped = attn.attention_reference(q, k, v, scale=1.0, softcap=0.0)[0, 0]
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()
    num_allowed = allowed.sum(-1, keepdim=True).double()
    lower_bound = math.exp(-2 * cap) / num_allowed.expand(seq, seq)
    assert (capped[allowed] >= lower_bound[allowed] * 0.999).all()
    assert (capped[~allowed] == 0).all()
    assert uncapped[allowed].min() < 1e-6  # without the cap, huge scores starve some keys completely


def test_window_boundary():
    """Query p sees exactly the keys p - W < k <= p."""
    allowed = attn.allowed_keys(6, 6, window=3)
    for p in range(6):
        seen = [k for k in range(6) if allowed[p, k]]
        assert seen == list(range(max(0, p - 2), p + 1))


def test_decoding_queries_are_the_last_positions():
    """Tq < Tk (one new token against a cache): the same as the last rows of the full attention."""
    q, k, v = random_qkv(2, 4, 1, 9, 9, 8)
    full = attn.attention_reference(q, k, v, scale=0.35, softcap=5.0, window=4)
    last3 = attn.attention_reference(q[:, :, -3:], k, v, scale=0.35, softcap=5.0, window=4)
    torch.testing.assert_close(last3, full[:, :, -3:], atol=1e-6, rtol=1e-6)


def test_key_mask_hides_padding_but_never_a_whole_row():
    seq = 6
    v = torch.eye(seq, dtype=torch.float64).view(1, 1, seq, seq).repeat(2, 1, 1, 1)
    q = torch.zeros(2, 2, seq, seq, dtype=torch.float64)
    k = torch.zeros(2, 1, seq, seq, dtype=torch.float64)
    key_mask = torch.tensor([[False, False, True, True, True, True], [True] * seq])  # row 0: 2 pads on the left
    weights = attn.attention_reference(q, k, v, scale=1.0, key_mask=key_mask)  # (B, H, T, T) = the weights
    assert torch.isfinite(weights).all()
    # a padded query (position 0 or 1 of row 0) attends to itself only
    assert weights[0, :, 0, 0].eq(1).all() and weights[0, :, 1, 1].eq(1).all()
    # real queries of row 0 give the pads no weight, and share it equally among the real keys so far
    assert weights[0, :, 2:, :2].eq(0).all()
    torch.testing.assert_close(weights[0, 0, 5, 2:], torch.full((4,), 0.25, dtype=torch.float64))
    # row 1 has no padding: plain causal averaging
    torch.testing.assert_close(weights[1, 0, 5], torch.full((6,), 1 / 6, dtype=torch.float64))


def test_mqa_heads_read_their_own_group():
    """GQA with 4 query heads over 2 KV heads: heads 0,1 read KV head 0 and heads 2,3 read KV head 1."""
    q, k, v = random_qkv(1, 4, 2, 5, 5, 4)
    out = attn.attention_reference(q, k, v, scale=0.5)
    for h in range(4):
        alone = attn.attention_reference(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], v[:, h // 2:h // 2 + 1], scale=0.5)
        torch.testing.assert_close(out[:, h:h + 1], alone)


@pytest.mark.parametrize("q_heads,kv_heads", [(2, 2), (4, 2), (8, 1)])
@pytest.mark.parametrize("softcap,window", [(0.0, 0), (5.0, 0), (5.0, 13), (50.0, 70)])
def test_blockwise_matches_reference_values_and_gradients(q_heads, kv_heads, softcap, window):
    # 77 tokens: not a multiple of the block of 32, so the last block is a partial one
    q, k, v = random_qkv(2, q_heads, kv_heads, 77, 77, 8, dtype=torch.float32)
    q = (q * 2).requires_grad_()  # scores big enough that the soft-cap bends them
    k, v = k.requires_grad_(), v.requires_grad_()
    grad_out = torch.randn(2, q_heads, 77, 8, generator=torch.Generator().manual_seed(5))
    ref = attn.attention_reference(q, k, v, 0.4, softcap, window)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    fast = attn.attention_blockwise(q, k, v, 0.4, softcap, window, block=32)
    fast_grads = torch.autograd.grad(fast, (q, k, v), grad_out)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    for name, got, want in zip("qkv", fast_grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_dispatcher_routes_cases():
    q, k, v = random_qkv(1, 4, 1, 12, 12, 16, dtype=torch.float32)
    want = attn.attention_reference(q, k, v, 0.3, 50.0, 4)
    # the eager training case (blockwise) and the decoding case (reference) agree with the definition
    torch.testing.assert_close(attn.attention(q, k, v, 0.3, 50.0, 4, impl="eager"), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn.attention(q[:, :, -1:], k, v, 0.3, 50.0, 4, impl="eager"), want[:, :, -1:])
    # "triton" falls back to the reference where the kernel does not apply (decoding, padding) ...
    torch.testing.assert_close(attn.attention(q[:, :, -1:], k, v, 0.3, 50.0, 4, impl="triton"), want[:, :, -1:])
    key_mask = torch.ones(1, 12, dtype=torch.bool)
    torch.testing.assert_close(attn.attention(q, k, v, 0.3, 50.0, 4, key_mask, impl="triton"), want)
    assert attn.resolve_attn_impl("auto", "cpu") == "eager"
    with pytest.raises(ValueError):
        attn.resolve_attn_impl("fast", "cpu")
