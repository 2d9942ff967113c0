"""
Exercise (lesson 3): write the fused attention kernel `flash_attention(q, k, v, scale, softcap, window)`
in nano/model/flash_attention.py so that it returns exactly what plain attention returns -- and, through
its backward, the same dQ, dK and dV -- for

- any sequence length, also ones that are not a multiple of the tile size (1, 17, 100, 200),
- Gemma's soft-cap c * tanh(s / c) on the scores, on or off,
- causal masking, with or without a sliding window shorter than the sequence,
- G = 1, 2, 3 and 8 query heads per KV head (multi-query attention packs them into one tile),
- the tile shapes the kernel uses on a GPU, not only the ones it uses on the CPU.

Without a GPU the kernels run in Triton's interpreter on the CPU (TRITON_INTERPRET=1, set below
before the kernel module is imported), in fp32, against a float64 reference written out in
`reference_attention` below. Run: `.venv/bin/python -m pytest -q tests/test_03_flash_attention.py`
(about half a minute; the interpreter is slow, so the inputs are small).
"""

import os

import torch

# subtle: Triton picks "compile for the GPU" or "interpret on the CPU" when the kernels are defined,
# i.e. when the module is imported, so this must come before the import below
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from adapters import impl  # noqa: E402

flash = impl("flash_attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(atol=1e-4, rtol=1e-4)  # fp32 kernel (sums in a different order) vs float64 reference


def reference_attention(q, k, v, scale, softcap=0.0, window=0):
    """The definition, step by step: scores, soft-cap, causal + window mask, softmax, weighted values.

    q: (B, Hq, T, D), k/v: (B, Hkv, T, D); query head h reads KV head h // G (G = Hq // Hkv).
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, Hq, T, D): each KV head copied for its G query heads
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, Hq, T, T)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    positions = torch.arange(q.shape[2], device=q.device)
    distance = positions[:, None] - positions[None, :]  # query position - key position
    allowed = distance >= 0  # causal
    if window > 0:
        allowed &= distance < window  # query t sees keys t - W < k <= t
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (B, Hq, T, D)


def random_inputs(batch, num_q_heads, num_kv_heads, seq_len, head_dim, dtype=torch.float32, seed=0):
    """q, k, v and an upstream gradient dO; q and k scaled up so a soft-cap of 5 really bends the scores."""
    gen = torch.Generator().manual_seed(seed)
    q = 1.5 * torch.randn(batch, num_q_heads, seq_len, head_dim, generator=gen)
    k = 1.5 * torch.randn(batch, num_kv_heads, seq_len, head_dim, generator=gen)
    v = torch.randn(batch, num_kv_heads, seq_len, head_dim, generator=gen)
    grad_out = torch.randn(batch, num_q_heads, seq_len, head_dim, generator=gen)
    return [t.to(DEVICE, dtype) for t in (q, k, v, grad_out)]


def kernel_and_reference(q, k, v, grad_out, scale, softcap, window, attention_fn):
    """Run `attention_fn` and the float64 reference forward and backward; return both (out, dq, dk, dv)."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention_fn(*leaves, scale, softcap, window)
    out.backward(grad_out)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    out64 = reference_attention(*leaves64, scale, softcap, window)
    out64.backward(grad_out.double())
    return [out] + [t.grad for t in leaves], [out64] + [t.grad for t in leaves64]


CASES = {
    # name: (batch, query heads, KV heads, seq_len, head_dim, softcap, window)
    "one token": (1, 1, 1, 1, 16, 0.0, 0),
    "17 tokens, G=2, soft-cap": (1, 2, 1, 17, 16, 5.0, 0),
    "100 tokens, MQA G=8, window 24": (2, 8, 1, 100, 16, 0.0, 24),
    "200 tokens, 2 KV heads, soft-cap, window 50": (1, 2, 2, 200, 32, 5.0, 50),
    "200 tokens, MQA G=8, soft-cap": (1, 8, 1, 200, 16, 5.0, 0),
    "200 tokens, wide window 150": (1, 2, 1, 200, 16, 0.0, 150),
    "40 tokens, window 1 (itself only)": (1, 2, 1, 40, 16, 0.0, 1),
    "64 tokens, G=3 (not a power of two)": (1, 6, 2, 64, 16, 5.0, 0),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference_forward_and_backward(case):
    batch, num_q_heads, num_kv_heads, seq_len, head_dim, softcap, window = case
    q, k, v, grad_out = random_inputs(batch, num_q_heads, num_kv_heads, seq_len, head_dim)
    scale = head_dim**-0.5
    ours, expected = kernel_and_reference(q, k, v, grad_out, scale, softcap, window, flash.flash_attention)
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, expected):
        assert got.shape == want.shape and got.dtype == q.dtype, name
        assert torch.isfinite(got).all(), f"{name} has NaN/inf"
        torch.testing.assert_close(got.double(), want, **TOL, msg=lambda m: f"{name}: {m}")

    # the test is only as good as its inputs: the soft-cap and the window must really change the answer
    if softcap > 0:
        uncapped = reference_attention(q.double(), k.double(), v.double(), scale, 0.0, window)
        assert (uncapped - expected[0]).abs().max() > 1e-2, "soft-cap too large to matter for these inputs"
    if 0 < window < seq_len:
        unwindowed = reference_attention(q.double(), k.double(), v.double(), scale, softcap, 0)
        assert (unwindowed - expected[0]).abs().max() > 1e-2, "window does not change the result"


# tile shapes of the GPU (and of D = 256) under the interpreter: small BLOCK_T, tiles wider than the
# sequence, dK/dV programs owning more keys than a query tile has rows
GPU_TILES = {"D<=64 tiles": (64, 150), "D=256 tiles": (256, 70)}  # (head_dim the tiles are for, seq_len)


@pytest.mark.parametrize("tiles_for_head_dim, seq_len", GPU_TILES.values(), ids=GPU_TILES.keys())
def test_gpu_tile_shapes_match_reference(tiles_for_head_dim, seq_len):
    configs = flash.gpu_configs(tiles_for_head_dim)
    q, k, v, grad_out = random_inputs(1, 8, 1, seq_len, 16, seed=1)

    def with_gpu_tiles(q, k, v, scale, softcap, window):
        return flash.FlashAttentionFunction.apply(q, k, v, scale, softcap, window, configs)

    ours, expected = kernel_and_reference(q, k, v, grad_out, 0.25, 5.0, 40, with_gpu_tiles)
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, expected):
        torch.testing.assert_close(got.double(), want, **TOL, msg=lambda m: f"{name}: {m}")


def test_fp16_inputs():
    """fp16 in, fp16 out, fp32 sums inside: close to the float64 reference of the same fp16 inputs."""
    q, k, v, grad_out = random_inputs(1, 4, 1, 50, 16, dtype=torch.float16, seed=2)
    ours, expected = kernel_and_reference(q, k, v, grad_out, 0.25, 5.0, 20, flash.flash_attention)
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, expected):
        assert got.dtype == torch.float16, name
        torch.testing.assert_close(got.double(), want, atol=1e-2, rtol=1e-2, msg=lambda m: f"{name}: {m}")


def test_non_contiguous_inputs():
    """q, k, v as the model makes them: (B, T, H, D) projections transposed to (B, H, T, D)."""
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(1, 17, 4 + 1 + 1, 16, generator=gen).to(DEVICE)  # (B, T, Hq + 2 Hkv, D): one projection
    q, k, v = (t.transpose(1, 2) for t in qkv.split([4, 1, 1], dim=2))  # (B, H, T, D) views, not contiguous
    grad_out = torch.randn(1, 17, 4, 16, generator=gen).to(DEVICE).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    ours, expected = kernel_and_reference(q, k, v, grad_out, 0.25, 0.0, 5, flash.flash_attention)
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, expected):
        torch.testing.assert_close(got.double(), want, **TOL, msg=lambda m: f"{name}: {m}")


def test_agrees_with_nano_attention():
    """Our kernel and the project's reference (nano/model/attention.py), also through its dispatcher."""
    attention = impl("attention")
    q, k, v, _ = random_inputs(2, 4, 1, 33, 16, seed=4)
    fused = flash.flash_attention(q, k, v, 0.25, 5.0, 10)
    torch.testing.assert_close(fused, attention.attention_reference(q, k, v, 0.25, 5.0, 10), **TOL)
    torch.testing.assert_close(fused, attention.attention(q, k, v, 0.25, 5.0, 10, impl="triton"), **TOL)


def test_bad_inputs_get_clear_errors():
    q = torch.zeros(1, 2, 8, 24, device=DEVICE)  # head_dim 24: not a power of two
    with pytest.raises(ValueError, match="power of two"):
        flash.flash_attention(q, q[:, :1], q[:, :1], 0.2)
    q = torch.zeros(1, 3, 8, 16, device=DEVICE)  # 3 query heads over 2 KV heads
    k = torch.zeros(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="groups"):
        flash.flash_attention(q, k, k, 0.25)
    if DEVICE == "cpu":  # the interpreter computes bf16 wrongly, so the kernel must refuse it there
        q = torch.zeros(1, 1, 8, 16, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="bf16"):
            flash.flash_attention(q, q, q, 0.25)
