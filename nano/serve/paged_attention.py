"""
Paged decode attention as one Triton kernel: each new token reads its sequence's keys and values
straight out of the block pool, block by block, without first copying them into a contiguous tensor.

nano/serve/kv_cache.py's `paged_attention_reference` gathers every sequence's blocks into a padded
(S, Hkv, L, D) tensor and then runs ordinary attention: simple, but it writes and reads a copy of
the whole cache every layer of every step. On a GPU, decoding is bound by memory traffic, so the
kernel here (the idea of vLLM's PagedAttention kernel) reads each block once, where it lies:

    one program per (sequence, KV head); it holds that KV head's G query heads (MQA: all of them)
    for b in the sequence's blocks (only those inside the sliding window, on window layers):
        block_id = block_table[seq, b]                     # the indirection: logical -> physical
        k, v = pool[block_id]                              # (block_size, D) each
        scores = q k^T * scale, soft-capped, masked (past the length, outside the window)
        online softmax (FlashAttention's running max m and sum l), acc += p v
    out = acc / l

Used by nano/serve/engine.py on CUDA; on a CPU it runs in Triton's interpreter (TRITON_INTERPRET=1,
numpy, slow) only to be checked: tests/test_14_paged_attention.py compares it with the gather path.
"""

import os

import torch

# subtle: Triton decides between "compile for the GPU" and "interpret on the CPU" when a kernel is
# defined, i.e. when this module is imported, so the interpreter must be switched on first
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _paged_decode_kernel(
    Q, K, V, Out, BlockTables, KeyLens,
    stride_qs, stride_qh,  # q (S, Hq, D), last axis contiguous
    stride_kb, stride_kt, stride_kh,  # pools (num_blocks, block_size, Hkv, D), last axis contiguous
    stride_os, stride_oh,  # out (S, Hq, D)
    stride_bt,  # block tables (S, max_blocks)
    scale, softcap, window,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    key_len = tl.load(KeyLens + seq)  # keys [0, key_len); the query sits at position key_len - 1
    query_pos = key_len - 1
    g = tl.arange(0, GROUP_PAD)  # the query heads of this KV head (padded to a power of two)
    d = tl.arange(0, HEAD_DIM)
    t = tl.arange(0, BLOCK_SIZE)
    head = kv_head * GROUP + g
    q = tl.load(Q + seq * stride_qs + head[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
    q = q.to(tl.float32)  # (G, D)

    m = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)  # running max of the scores
    l = tl.zeros((GROUP_PAD,), dtype=tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)  # running sum of exp(score - m) * v

    # blocks wholly before the window are skipped; the first block read always holds a visible key
    first_block = tl.where(window > 0, tl.maximum(query_pos - window + 1, 0) // BLOCK_SIZE, 0)
    num_blocks = tl.cdiv(key_len, BLOCK_SIZE)
    for b in range(first_block, num_blocks):
        block_id = tl.load(BlockTables + seq * stride_bt + b).to(tl.int64)  # logical block b -> physical
        offsets = block_id * stride_kb + t[:, None] * stride_kt + kv_head * stride_kh + d[None, :]
        k = tl.load(K + offsets).to(tl.float32)  # (block_size, D)
        v = tl.load(V + offsets).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (G, block_size)
        if USE_SOFTCAP:
            # c * tanh(s / c), with tanh(x) = 2 sigmoid(2x) - 1 (tl has sigmoid on every version)
            scores = softcap * (2.0 * tl.sigmoid(2.0 * scores / softcap) - 1.0)
        key_pos = b * BLOCK_SIZE + t
        visible = (key_pos < key_len) & ((window <= 0) | (query_pos - key_pos < window))
        scores = tl.where(visible[None, :], scores, float("-inf"))
        # online softmax: rescale what was summed so far to the new maximum
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])  # (G, block_size)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / l[:, None]
    tl.store(Out + seq * stride_os + head[:, None] * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
             mask=(g < GROUP)[:, None])


def paged_decode_attention(
    q: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    block_tables: torch.Tensor,
    key_lens: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
) -> torch.Tensor:
    """One new token per sequence against its paged keys and values.

    q (S, Hq, D); pools (num_blocks, block_size, Hkv, D); block_tables (S, max_blocks) long;
    key_lens (S,): the query is at position key_len - 1 and sees keys [0, key_len) (and only the
    last `window` of them if window > 0). Returns (S, Hq, D) in q's dtype.
    head_dim and block_size must be powers of two (Triton's tiles are).
    """
    num_seqs, num_q_heads, head_dim = q.shape
    block_size, kv_heads = key_pool.shape[1], key_pool.shape[2]
    if head_dim & (head_dim - 1) or block_size & (block_size - 1):
        raise ValueError(f"head_dim ({head_dim}) and block_size ({block_size}) must be powers of two")
    group = num_q_heads // kv_heads
    q = q.contiguous()
    out = torch.empty_like(q)
    block_tables = block_tables.to(torch.int32).contiguous()
    key_lens = key_lens.to(torch.int32).contiguous()
    _paged_decode_kernel[(num_seqs, kv_heads)](
        q, key_pool, value_pool, out, block_tables, key_lens,
        q.stride(0), q.stride(1),
        key_pool.stride(0), key_pool.stride(1), key_pool.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        scale, softcap if softcap > 0 else 1.0, window,
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        USE_SOFTCAP=softcap > 0,
    )
    return out
