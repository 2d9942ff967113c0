"""
Fused attention in Triton (FlashAttention-2), with the query heads of one KV head packed into one tile.

It computes exactly what `nano.model.attention.attention_reference` computes -- causal attention with
Gemma-2's soft-cap, an optional sliding window and multi-query attention -- but never writes the
T x T score matrix to memory. Papers: FlashAttention (Dao et al., 2022) and FlashAttention-2
(Dao, 2023); the MQA packing is the same trick the reference uses with its reshape.

The idea in three steps:

1. Tiles. Cut the queries into blocks of rows and the keys/values into blocks of BLOCK_N. One
   program (a thread block on the GPU) keeps its query tile in fast on-chip memory and streams the
   K/V tiles past it, so the scores of one tile (BLOCK_M x BLOCK_N numbers) are all that ever exists.

2. Online softmax. softmax needs the maximum and the sum over a whole row, but we see the row one
   tile at a time. Keep per row a running maximum m, a running sum l of exp(s - m) and the running
   output acc = sum of exp(s - m) * v. When a new tile raises the maximum from m_old to m_new,
   everything summed so far was scaled by exp(-m_old) instead of exp(-m_new): multiply l and acc by
   alpha = exp(m_old - m_new) and carry on. At the end out = acc / l; nothing was approximated.

       s (one row, seen in 2 tiles):  [1, 3 | 5, 0]
       after tile 1: m = 3, l = e^-2 + 1                  acc = e^-2 v0 + v1
       after tile 2: m = 5, alpha = e^(3-5)
                     l = alpha (e^-2 + 1) + 1 + e^-5     = e^-4 + e^-2 + 1 + e^-5   (= sum e^(s - 5))

3. Recomputation. The backward needs the probabilities P again. Instead of storing them (T x T),
   the forward stores one number per row, the logsumexp L = m + log(l), and the backward rebuilds
   P = exp(s - L) tile by tile. With Delta = rowsum(O * dO) the softmax backward is
   dS = P * (dP - Delta), where dP = dO @ V^T. One kernel sums dK and dV over the queries (it owns
   a K/V tile and walks over the query tiles); another sums dQ over the keys.

Multi-query attention: the G = Hq / Hkv query heads that share a KV head read the same K and V.
So a tile's rows are G heads x BLOCK_T positions, and each K/V tile a program loads serves all G
heads at once: K/V are never copied out to Hq heads (as `repeat_kv` would), and a tile of 128 rows
covers only 128 / G positions, so less of the diagonal tile is wasted on masked scores. With G = 8
and 128 rows, BLOCK_T = 16:

              keys -> (one K/V tile of BLOCK_N keys, loaded once)
            +-------------------+
     row  0 | head 0, pos t0    |  rows 0 .. BLOCK_T-1:  query head 0 of the group,
        ... |   ...             |                         positions t0 .. t0+BLOCK_T-1
            | head 0, pos t0+15 |
     row 16 | head 1, pos t0    |  rows BLOCK_T .. 2 BLOCK_T-1: query head 1, same positions
        ... |   ...             |
     row112 | head 7, pos t0    |  row r is head  g = r // BLOCK_T
        ... |   ...             |         position t = t0 + r % BLOCK_T
            +-------------------+

The same packing makes the backward natural: a dK/dV program walks over packed query tiles, so
the sum over the G heads that share its keys happens inside one matrix multiply -- no per-head dK
and dV to store and add up afterwards.

Masks, in the order Gemma applies them: scale, soft-cap c * tanh(s / c), then causal and window
(query t sees key k when t - W < k <= t). Tiles that need no mask run a loop without mask
arithmetic; tiles above the diagonal or wholly outside the window are never visited.

Where it runs: on a CUDA GPU (fp32, fp16, bf16; sums in fp32). Without a GPU, Triton's interpreter
(TRITON_INTERPRET=1, numpy, one program at a time, slow) runs the same kernels for learning and
tests -- this module switches it on when it is imported on a machine without CUDA. The interpreter
handles fp32 and fp16 but gives wrong results in bf16, so bf16 is refused there.

Check it: `.venv/bin/python -m pytest -q tests/test_03_flash_attention.py` (interpreter, CPU);
speed on a GPU: `.venv/bin/python bench/bench_attention.py` (`--check` for bf16/fp16 errors).
"""

import os
from dataclasses import dataclass

import torch

# subtle: Triton decides between "compile for the GPU" and "interpret on the CPU" when each
# @triton.jit function is defined, i.e. when this module is imported. Without CUDA only the
# interpreter can run the kernels, so turn it on before anything below is decorated.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# log2(e): exp(x) == exp2(x * LOG2E), and exp2 is the GPU's native instruction, so the kernels keep
# scores in "log2 units" (scores times LOG2E) and the stored logsumexp is in base 2 as well.
# (A constant used inside @triton.jit code must be a tl.constexpr.)
LOG2E = tl.constexpr(1.4426950408889634)

HEAD_DIMS_SUPPORTED = (16, 32, 64, 128, 256)  # powers of two: tl.arange needs them; >= 16 for tl.dot


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ==================================================================================================
# 1. small helpers used by all three kernels


@triton.jit
def _tanh(x):
    """tanh written with exp (tl.tanh does not exist in the interpreter), safe at both ends.

    tanh(x) = 1 - 2 / (exp(2x) + 1): for x -> +inf exp overflows to inf and 2/inf = 0 gives 1;
    for x -> -inf exp underflows to 0 and gives -1. (The textbook (e^x - e^-x) / (e^x + e^-x) gives
    inf/inf = NaN instead.)
    """
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def _scores(qk, scale, softcap, SOFTCAP: tl.constexpr):
    """Raw dot products q.k -> Gemma's scores, in log2 units; also tanh(.) for the soft-cap's backward.

    without cap: s = qk * scale                       -> returned as s * LOG2E
    with cap c:  s = c * tanh(qk * scale / c)          -> returned as s * LOG2E, and the tanh
    (Without a cap the second value is a placeholder that the compiler drops.)
    """
    if SOFTCAP:
        tanh = _tanh(qk * (scale / softcap))
        scores = tanh * (softcap * LOG2E)
    else:
        tanh = qk
        scores = qk * (scale * LOG2E)
    return scores, tanh


@triton.jit
def _key_tile_ranges(first_query, seq_len, window, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Which K/V tiles the query positions [first_query, first_query + BLOCK_T) need, in three runs.

    Returns key_lo <= full_lo <= full_hi <= key_hi, all tile starts (multiples of BLOCK_N) except key_hi:
      [key_lo, full_lo)   tiles cut by the window's lower edge       -> masked
      [full_lo, full_hi)  tiles every row of the block sees whole    -> no mask at all
      [full_hi, key_hi)   tiles on the diagonal (and the tail)       -> masked
    Tiles above the diagonal (keys > last query) and wholly below the window are not visited.
    Example (BLOCK_T 16, BLOCK_N 32, window 40, queries 96..111): key_lo 32 (query 96 sees keys
    from 57 on), full_lo 96 (query 111 sees keys only from 72 on, so no tile before 96 is whole for
    every row), full_hi 96 (the tile 96..127 crosses the diagonal), key_hi 112: the tiles at 32 and
    64 run masked, none unmasked, the tile at 96 masked. With window 0 (global, passed as T = 1000)
    the same queries get key_lo 0, full_lo 0, full_hi 96, key_hi 112: three whole tiles, one masked.
    Integer division only on non-negative numbers: Triton's // truncates, Python's floors.
    """
    last_query = first_query + BLOCK_T - 1  # may lie past seq_len in the tail block; that only tightens
    key_lo = tl.maximum(first_query - window + 1, 0) // BLOCK_N * BLOCK_N  # first key query 0 of the block sees
    key_hi = tl.minimum(last_query + 1, seq_len)  # causal: no key after the last query
    # a tile is whole for every row when its first key is inside the LAST query's window ...
    full_lo = (tl.maximum(last_query - window + 1, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    # ... and its last key is at or before the FIRST query
    full_hi = (first_query + 1) // BLOCK_N * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, key_lo), key_hi)  # keep the three runs in order
    full_hi = tl.maximum(full_lo, tl.minimum(full_hi, key_hi))
    return key_lo, full_lo, full_hi, key_hi


@triton.jit
def _query_tile_ranges(first_key, seq_len, window, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """The mirror image for the dK/dV kernel: which query blocks see the keys [first_key, first_key + BLOCK_N).

    Query t sees key k when t - window < k <= t, so these keys are seen by t in
    [first_key, last_key + window). Same three runs as `_key_tile_ranges`, in steps of BLOCK_T:
      [q_lo, full_lo)  blocks crossing the diagonal               -> masked
      [full_lo, full_hi) blocks that see all these keys            -> no mask
      [full_hi, q_hi)  blocks crossing the window's far edge       -> masked
    """
    last_key = first_key + BLOCK_N - 1
    q_lo = first_key // BLOCK_T * BLOCK_T
    q_hi = tl.minimum(last_key + window, seq_len)
    full_lo = (last_key + BLOCK_T - 1) // BLOCK_T * BLOCK_T  # first row of the block >= last key
    full_hi = (first_key + window) // BLOCK_T * BLOCK_T  # last row of the block < first key + window
    full_lo = tl.minimum(tl.maximum(full_lo, q_lo), q_hi)
    full_hi = tl.maximum(full_lo, tl.minimum(full_hi, q_hi))
    return q_lo, full_lo, full_hi, q_hi


@triton.jit
def _packed_rows(first_query, seq_len, GROUP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr):
    """The MQA packing: row r of a tile -> (query head g, position t), as in the module docstring's picture.

    The G query heads of KV head j are the flat q heads j*G .. j*G + G-1 (q is (B, Hq, T, D) with
    Hq = Hkv * G, so flat head b*Hq + h_kv*G + g = (b*Hkv + h_kv)*G + g). Kernels move their base
    pointers to the first of these heads once; here we return, for every row of the tile, its row
    within that group of G heads (g * T + t), its position t, and whether it is a real row (padding
    heads, when G is not a power of two, and tail positions t >= T are not).
    """
    rows = tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    head_in_group = rows // BLOCK_T  # g
    query_pos = first_query + rows % BLOCK_T  # t
    row_valid = (head_in_group < GROUP) & (query_pos < seq_len)
    return head_in_group * seq_len + query_pos, query_pos, row_valid


# ==================================================================================================
# 2. forward: O and the logsumexp per row


@triton.jit
def _forward_tiles(acc, m_i, l_i, q, K, V, query_pos, seq_len, window, scale, softcap, key_start, key_end,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Stream the K/V tiles [key_start, key_end) past one query tile, updating the online softmax."""
    dims = tl.arange(0, HEAD_DIM)
    for start in range(key_start, key_end, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)  # a hint: aligned loads
        key_pos = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        kv_offsets = key_pos[:, None] * HEAD_DIM + dims[None, :]  # (BLOCK_N, D)
        if MASKED:  # the tail tile may reach past seq_len
            k = tl.load(K + kv_offsets, mask=(key_pos < seq_len)[:, None], other=0.0)
            v = tl.load(V + kv_offsets, mask=(key_pos < seq_len)[:, None], other=0.0)
        else:
            k = tl.load(K + kv_offsets)
            v = tl.load(V + kv_offsets)

        # 1. scores of this tile: (BLOCK_M, D) @ (D, BLOCK_N), summed in fp32
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        s, _ = _scores(qk, scale, softcap, SOFTCAP)
        if MASKED:  # after the cap: capping -inf would make it a finite -c
            distance = query_pos[:, None] - key_pos[None, :]  # (BLOCK_M, BLOCK_N)
            s = tl.where((distance >= 0) & (distance < window), s, float("-inf"))

        # 2. online softmax: new running max, rescale what was summed so far by alpha
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
        # guard: a row with no allowed key yet has m = -inf, and -inf - -inf = NaN; use 0 instead
        # (exp2(-inf - 0) = 0, so such a row simply adds nothing)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])  # (BLOCK_M, BLOCK_N) unnormalised probabilities
        alpha = tl.exp2(m_i - m_safe)  # (BLOCK_M,) = exp(m_old - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # 3. acc += P @ V, with P in V's dtype (the tensor cores want both operands alike)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)  # (BLOCK_M, D)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _forward_kernel(Q, K, V, O, LSE, scale, softcap, seq_len, window,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: BLOCK_T query positions x the G query heads of one KV head (BLOCK_M = G_pad * BLOCK_T rows).

    Q, O: (B, Hq, T, D) contiguous   K, V: (B, Hkv, T, D) contiguous   LSE: (B, Hq, T) fp32, base 2
    grid: (cdiv(T, BLOCK_T), B * Hkv)
    """
    first_query = tl.program_id(0) * BLOCK_T
    kv_head = tl.program_id(1)  # flat b * Hkv + h_kv
    dims = tl.arange(0, HEAD_DIM)
    # 0. base pointers: this KV head's (T, D) slab, and the first of its G query heads' (G*T, D) rows
    #    (int64: B*H*T*D can pass 2^31 on big inputs; offsets within one group stay small)
    kv_base = kv_head.to(tl.int64) * seq_len * HEAD_DIM
    K += kv_base
    V += kv_base
    group_first_row = kv_head.to(tl.int64) * GROUP * seq_len
    Q += group_first_row * HEAD_DIM
    O += group_first_row * HEAD_DIM
    LSE += group_first_row

    # 1. the packed query tile, loaded once and kept on chip for the whole loop
    row_index, query_pos, row_valid = _packed_rows(first_query, seq_len, GROUP, BLOCK_T, BLOCK_M)
    q = tl.load(Q + row_index[:, None] * HEAD_DIM + dims[None, :], mask=row_valid[:, None], other=0.0)

    # 2. running statistics of the online softmax, all in fp32
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # running sum of exp2(s - m) * v

    # 3. window edge (masked), bulk (no mask), diagonal (masked); nothing above the diagonal
    key_lo, full_lo, full_hi, key_hi = _key_tile_ranges(first_query, seq_len, window, BLOCK_T, BLOCK_N)
    acc, m_i, l_i = _forward_tiles(acc, m_i, l_i, q, K, V, query_pos, seq_len, window, scale, softcap,
                                   key_lo, full_lo, HEAD_DIM, BLOCK_N, True, SOFTCAP, DOT_PRECISION)
    acc, m_i, l_i = _forward_tiles(acc, m_i, l_i, q, K, V, query_pos, seq_len, window, scale, softcap,
                                   full_lo, full_hi, HEAD_DIM, BLOCK_N, False, SOFTCAP, DOT_PRECISION)
    acc, m_i, l_i = _forward_tiles(acc, m_i, l_i, q, K, V, query_pos, seq_len, window, scale, softcap,
                                   full_hi, key_hi, HEAD_DIM, BLOCK_N, True, SOFTCAP, DOT_PRECISION)

    # 4. normalise and store; a row that saw no key (only tail/padding rows can) divides by 1, not 0
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + row_index[:, None] * HEAD_DIM + dims[None, :], out.to(O.dtype.element_ty), mask=row_valid[:, None])
    tl.store(LSE + row_index, m_i + tl.log2(l_safe), mask=row_valid)  # logsumexp, base 2


# ==================================================================================================
# 3. backward: dK and dV (a program owns a K/V tile, walks over query tiles), then dQ


@triton.jit
def _backward_kv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, key_pos, seq_len, window, scale, softcap,
                       q_start, q_end, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_M: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Add the contributions of the packed query tiles [q_start, q_end) to dK and dV of one K/V tile.

    Everything here is transposed (keys along the rows): s_T = K @ Q^T is (BLOCK_N, BLOCK_M), so
    P^T and dS^T come out in the layout the next matrix multiplies want:
        dV += P^T @ dO          dK += dS^T @ Q      (the sum over the G packed heads is inside the @)
    """
    dims = tl.arange(0, HEAD_DIM)
    for start in range(q_start, q_end, BLOCK_T):
        start = tl.multiple_of(start, BLOCK_T)
        row_index, query_pos, row_valid = _packed_rows(start, seq_len, GROUP, BLOCK_T, BLOCK_M)
        # invalid rows load zeros (q = dO = 0, L = Delta = 0): their P is finite and dO = 0, so they add nothing
        # (D, BLOCK_M): Q read straight into its transposed layout by swapping the pointer axes
        q_T = tl.load(Q + row_index[None, :] * HEAD_DIM + dims[:, None], mask=row_valid[None, :], other=0.0)
        do = tl.load(DO + row_index[:, None] * HEAD_DIM + dims[None, :], mask=row_valid[:, None], other=0.0)  # (BLOCK_M, D)
        lse = tl.load(LSE + row_index, mask=row_valid, other=0.0)  # (BLOCK_M,)
        delta = tl.load(DELTA + row_index, mask=row_valid, other=0.0)  # (BLOCK_M,)

        # 1. recompute P^T from the stored logsumexp: no running max needed this time
        qk_T = tl.dot(k, q_T, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        s_T, tanh_T = _scores(qk_T, scale, softcap, SOFTCAP)
        p_T = tl.exp2(s_T - lse[None, :])
        if MASKED:
            distance = query_pos[None, :] - key_pos[:, None]  # (BLOCK_N, BLOCK_M)
            p_T = tl.where((distance >= 0) & (distance < window), p_T, 0.0)

        # 2. dV += P^T @ dO
        dv = tl.dot(p_T.to(do.dtype), do, dv, input_precision=DOT_PRECISION)  # (BLOCK_N, D)
        # 3. dS = P * (dP - Delta) with dP = dO @ V^T, then through the soft-cap: d(c tanh(x/c)) = 1 - tanh^2
        dp_T = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_T = p_T * (dp_T - delta[None, :])
        if SOFTCAP:
            ds_T = ds_T * (1.0 - tanh_T * tanh_T)
        # 4. dK += dS^T @ Q   (the factor `scale` is applied once, at the end)
        dk = tl.dot(ds_T.to(q_T.dtype), tl.trans(q_T), dk, input_precision=DOT_PRECISION)  # (BLOCK_N, D)
    return dk, dv


@triton.jit
def _backward_kv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, scale, softcap, seq_len, window,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: BLOCK_N keys of one KV head; dK, dV summed over every query row (all G heads) that sees them.

    grid: (cdiv(T, BLOCK_N), B * Hkv)   DK, DV: (B, Hkv, T, D)   DELTA: (B, Hq, T) fp32
    """
    first_key = tl.program_id(0) * BLOCK_N
    kv_head = tl.program_id(1)
    dims = tl.arange(0, HEAD_DIM)
    key_pos = first_key + tl.arange(0, BLOCK_N)
    key_valid = key_pos < seq_len
    kv_base = kv_head.to(tl.int64) * seq_len * HEAD_DIM  # base pointers as in the forward
    K += kv_base
    V += kv_base
    DK += kv_base
    DV += kv_base
    group_first_row = kv_head.to(tl.int64) * GROUP * seq_len
    Q += group_first_row * HEAD_DIM
    DO += group_first_row * HEAD_DIM
    LSE += group_first_row
    DELTA += group_first_row

    kv_offsets = key_pos[:, None] * HEAD_DIM + dims[None, :]  # (BLOCK_N, D)
    k = tl.load(K + kv_offsets, mask=key_valid[:, None], other=0.0)  # (BLOCK_N, D), kept on chip
    v = tl.load(V + kv_offsets, mask=key_valid[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    q_lo, full_lo, full_hi, q_hi = _query_tile_ranges(first_key, seq_len, window, BLOCK_N, BLOCK_T)
    dk, dv = _backward_kv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, key_pos, seq_len, window, scale, softcap,
                                q_lo, full_lo, GROUP, HEAD_DIM, BLOCK_T, BLOCK_M, True, SOFTCAP, DOT_PRECISION)
    dk, dv = _backward_kv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, key_pos, seq_len, window, scale, softcap,
                                full_lo, full_hi, GROUP, HEAD_DIM, BLOCK_T, BLOCK_M, False, SOFTCAP, DOT_PRECISION)
    dk, dv = _backward_kv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, key_pos, seq_len, window, scale, softcap,
                                full_hi, q_hi, GROUP, HEAD_DIM, BLOCK_T, BLOCK_M, True, SOFTCAP, DOT_PRECISION)

    # s = scale * qk (inside the cap), so every dS carries one factor `scale`
    tl.store(DK + kv_offsets, (dk * scale).to(DK.dtype.element_ty), mask=key_valid[:, None])
    tl.store(DV + kv_offsets, dv.to(DV.dtype.element_ty), mask=key_valid[:, None])


@triton.jit
def _backward_q_tiles(dq, q, do, lse, delta, K, V, query_pos, seq_len, window, scale, softcap, key_start, key_end,
                      HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """Add the contributions of the K/V tiles [key_start, key_end) to dQ of one packed query tile."""
    dims = tl.arange(0, HEAD_DIM)
    for start in range(key_start, key_end, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        key_pos = start + tl.arange(0, BLOCK_N)
        kv_offsets = key_pos[:, None] * HEAD_DIM + dims[None, :]
        if MASKED:
            k = tl.load(K + kv_offsets, mask=(key_pos < seq_len)[:, None], other=0.0)
            v = tl.load(V + kv_offsets, mask=(key_pos < seq_len)[:, None], other=0.0)
        else:
            k = tl.load(K + kv_offsets)
            v = tl.load(V + kv_offsets)

        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        s, tanh_s = _scores(qk, scale, softcap, SOFTCAP)
        p = tl.exp2(s - lse[:, None])  # P recomputed from the logsumexp
        if MASKED:
            distance = query_pos[:, None] - key_pos[None, :]
            p = tl.where((distance >= 0) & (distance < window), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - tanh_s * tanh_s)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)  # (BLOCK_M, D)
    return dq


@triton.jit
def _backward_q_kernel(Q, K, V, DO, LSE, DELTA, DQ, scale, softcap, seq_len, window,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: dQ of one packed query tile (same grid and packing as the forward)."""
    first_query = tl.program_id(0) * BLOCK_T
    kv_head = tl.program_id(1)
    dims = tl.arange(0, HEAD_DIM)
    kv_base = kv_head.to(tl.int64) * seq_len * HEAD_DIM  # base pointers as in the forward
    K += kv_base
    V += kv_base
    group_first_row = kv_head.to(tl.int64) * GROUP * seq_len
    Q += group_first_row * HEAD_DIM
    DO += group_first_row * HEAD_DIM
    DQ += group_first_row * HEAD_DIM
    LSE += group_first_row
    DELTA += group_first_row

    row_index, query_pos, row_valid = _packed_rows(first_query, seq_len, GROUP, BLOCK_T, BLOCK_M)
    row_offsets = row_index[:, None] * HEAD_DIM + dims[None, :]  # (BLOCK_M, D)
    q = tl.load(Q + row_offsets, mask=row_valid[:, None], other=0.0)
    do = tl.load(DO + row_offsets, mask=row_valid[:, None], other=0.0)
    lse = tl.load(LSE + row_index, mask=row_valid, other=0.0)
    delta = tl.load(DELTA + row_index, mask=row_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    key_lo, full_lo, full_hi, key_hi = _key_tile_ranges(first_query, seq_len, window, BLOCK_T, BLOCK_N)
    dq = _backward_q_tiles(dq, q, do, lse, delta, K, V, query_pos, seq_len, window, scale, softcap,
                           key_lo, full_lo, HEAD_DIM, BLOCK_N, True, SOFTCAP, DOT_PRECISION)
    dq = _backward_q_tiles(dq, q, do, lse, delta, K, V, query_pos, seq_len, window, scale, softcap,
                           full_lo, full_hi, HEAD_DIM, BLOCK_N, False, SOFTCAP, DOT_PRECISION)
    dq = _backward_q_tiles(dq, q, do, lse, delta, K, V, query_pos, seq_len, window, scale, softcap,
                           full_hi, key_hi, HEAD_DIM, BLOCK_N, True, SOFTCAP, DOT_PRECISION)
    tl.store(DQ + row_offsets, (dq * scale).to(DQ.dtype.element_ty), mask=row_valid[:, None])


# ==================================================================================================
# 4. tile sizes and launch settings


@dataclass(frozen=True)
class TileConfig:
    """Tile shape and launch settings of one kernel.

    rows: query rows per tile (G heads x BLOCK_T positions; raised to G when G is larger)
    keys: keys per K/V tile (for the dK/dV kernel: the keys one program owns)
    num_warps: 32-thread warps per program; num_stages: tiles in flight in the software pipeline
    (more stages hide more memory latency and use more shared memory). Ignored by the interpreter.
    """

    rows: int
    keys: int
    num_warps: int = 4
    num_stages: int = 1


@dataclass(frozen=True)
class KernelConfigs:
    forward: TileConfig
    backward_kv: TileConfig
    backward_q: TileConfig


def pick_configs(head_dim: int, device: torch.device, dtype: torch.dtype) -> KernelConfigs:
    """Tile sizes for this head_dim, device and dtype: one fixed set per case, no autotuning.

    Interpreter (CPU): one config. Its cost is mostly a fixed price per numpy operation, so big
    tiles mean fewer operations; and autotuning over several configs does not work without a GPU.
    """
    if device.type != "cuda":
        tile = TileConfig(rows=128, keys=64)
        return KernelConfigs(forward=tile, backward_kv=tile, backward_q=tile)
    shared_memory = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)
    return gpu_configs(head_dim, shared_memory, element_bytes=torch.empty(0, dtype=dtype).element_size())


def gpu_configs(head_dim: int, shared_memory: int = 0, element_bytes: int = 2) -> KernelConfigs:
    """The usual FlashAttention-2-in-Triton choices for A100/H100 (the ranges of Triton's tutorial).

    - forward, 128 rows x 64 keys: more rows amortise each K/V load over more queries; 64 keys keep
      the (128, 64) fp32 score tile and the (128, D) fp32 accumulator in registers. 4 warps at
      D <= 64, 8 at D = 128 (the accumulator doubles). 3 stages: two K/V tiles load while one computes.
      Shared memory at D = 128, bf16: Q 32 KB + 3 x (K + V) 32 KB = 128 KB of an H100's 228 KB.
    - dK/dV: a program owns 128 keys (dK and dV accumulate in registers) and takes 32 query rows
      per step; dQ: 128 rows and 32 keys per step. The narrow step keeps the four matrix multiplies
      of the backward within the register budget.
    - D = 256 (Gemma-2-2B's head size) halves the tiles to fit.
    - fp32 inputs (element_bytes 4) take twice the memory per tile: rows and keys are halved (not
      below 16, tl.dot's minimum) and 2 stages. fp32 is for checking, not for speed: its products
      run on the ordinary cores ("ieee"), not the tensor cores.
    - GPUs with about 100 KB of shared memory (consumer cards; `shared_memory` in bytes, 0 = unknown)
      get 2 stages and, at D >= 128, 32-key forward tiles and 64-key dK/dV programs.
    """
    if head_dim <= 64:
        configs = KernelConfigs(TileConfig(128, 64, 4, 3), TileConfig(32, 128, 4, 3), TileConfig(128, 32, 4, 3))
    elif head_dim == 128:
        configs = KernelConfigs(TileConfig(128, 64, 8, 3), TileConfig(32, 128, 8, 3), TileConfig(128, 32, 8, 3))
    else:
        configs = KernelConfigs(TileConfig(64, 32, 4, 2), TileConfig(16, 64, 8, 2), TileConfig(64, 16, 8, 2))
    if element_bytes >= 4:
        configs = KernelConfigs(*(
            TileConfig(max(16, tile.rows // 2), max(16, tile.keys // 2), tile.num_warps, 2)
            for tile in (configs.forward, configs.backward_kv, configs.backward_q)
        ))
    if shared_memory and shared_memory < 160 * 1024:
        fwd, kv, dq = configs.forward, configs.backward_kv, configs.backward_q
        configs = KernelConfigs(
            TileConfig(fwd.rows, 32 if head_dim >= 128 else fwd.keys, fwd.num_warps, 2),
            TileConfig(kv.rows, 64 if head_dim >= 128 else kv.keys, kv.num_warps, 2),
            TileConfig(dq.rows, dq.keys, dq.num_warps, 2),
        )
    return configs


def _packing(group: int, rows: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_M) for G query heads per KV head in tiles of about `rows` rows.

    G is padded to a power of two (tl.arange needs one); padding heads are masked rows.
    >>> _packing(8, 128), _packing(1, 128), _packing(3, 64), _packing(32, 16)
    ((16, 128), (128, 128), (16, 64), (1, 32))
    """
    group_pad = triton.next_power_of_2(group)
    block_t = max(1, rows // group_pad)
    return block_t, block_t * group_pad


# ==================================================================================================
# 5. the autograd Function and the public call


class FlashAttentionFunction(torch.autograd.Function):
    """forward: O and the logsumexp (kept for backward); backward: dQ, dK, dV from the recomputed P."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, softcap: float, window: int, configs: KernelConfigs):
        batch, num_q_heads, seq_len, head_dim = q.shape
        num_kv_heads = k.shape[1]
        group = num_q_heads // num_kv_heads
        # the kernels index contiguous (B, H, T, D) tensors: row (flat head h, position t) starts at (h*T + t)*D
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        # window 0 (global) becomes a window as long as the sequence, which masks nothing
        kernel_window = seq_len if window <= 0 or window > seq_len else window
        # fp32 on a GPU: insist on true fp32 products (tl.dot would otherwise round inputs to tf32)
        precision = "ieee" if q.dtype == torch.float32 else "tf32"

        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (B, Hq, T, D)
        lse = torch.empty((batch, num_q_heads, seq_len), dtype=torch.float32, device=q.device)  # base-2 logsumexp
        fwd = configs.forward
        block_t, block_m = _packing(group, fwd.rows)
        grid = (triton.cdiv(seq_len, block_t), batch * num_kv_heads)
        _forward_kernel[grid](
            q, k, v, out, lse, scale, softcap, seq_len, kernel_window,
            GROUP=group, HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_N=fwd.keys,
            SOFTCAP=softcap > 0, DOT_PRECISION=precision, num_warps=fwd.num_warps, num_stages=fwd.num_stages,
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (scale, softcap, kernel_window, configs, precision)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        scale, softcap, kernel_window, configs, precision = ctx.args
        batch, num_q_heads, seq_len, head_dim = q.shape
        num_kv_heads = k.shape[1]
        group = num_q_heads // num_kv_heads
        grad_out = grad_out.contiguous()

        # Delta = rowsum(O * dO) = rowsum(P * dP): the softmax backward's "average" term, one number per row
        delta = (out.float() * grad_out.float()).sum(-1)  # (B, Hq, T) fp32
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        shared = dict(GROUP=group, HEAD_DIM=head_dim, SOFTCAP=softcap > 0, DOT_PRECISION=precision)

        kv_cfg = configs.backward_kv
        block_t, block_m = _packing(group, kv_cfg.rows)
        grid = (triton.cdiv(seq_len, kv_cfg.keys), batch * num_kv_heads)
        _backward_kv_kernel[grid](
            q, k, v, grad_out, lse, delta, dk, dv, scale, softcap, seq_len, kernel_window,
            BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_N=kv_cfg.keys,
            num_warps=kv_cfg.num_warps, num_stages=kv_cfg.num_stages, **shared,
        )
        q_cfg = configs.backward_q
        block_t, block_m = _packing(group, q_cfg.rows)
        grid = (triton.cdiv(seq_len, block_t), batch * num_kv_heads)
        _backward_q_kernel[grid](
            q, k, v, grad_out, lse, delta, dq, scale, softcap, seq_len, kernel_window,
            BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_N=q_cfg.keys,
            num_warps=q_cfg.num_warps, num_stages=q_cfg.num_stages, **shared,
        )
        return dq, dk, dv, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
) -> torch.Tensor:
    """Causal attention with soft-cap, sliding window and MQA/GQA, fused in Triton; differentiable.

    q: (B, Hq, T, D)    k, v: (B, Hkv, T, D) with Hq a multiple of Hkv    returns (B, Hq, T, D), q's dtype
    scale: multiplies q.k (Gemma: query_pre_attn_scalar ** -0.5); softcap: c in c*tanh(s/c), 0 = off;
    window: W keys including itself (query t sees t-W < k <= t), 0 = global.
    The same result as `nano.model.attention.attention_reference(q, k, v, scale, softcap, window)`.
    D must be a power of two from 16 to 256. On a GPU: fp32, fp16, bf16. Under the interpreter: fp32, fp16.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, num_q_heads, seq_len, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2] != seq_len or k.shape[3] != head_dim:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, length and head_dim: the fused "
            "kernel covers training (queries = keys); decoding against a KV cache uses nano.model.attention's reference"
        )
    if num_q_heads % k.shape[1] != 0:
        raise ValueError(f"{num_q_heads} query heads cannot be split into groups over {k.shape[1]} KV heads")
    if head_dim not in HEAD_DIMS_SUPPORTED:
        raise ValueError(
            f"head_dim {head_dim} is not supported by the Triton kernel: it must be a power of two in "
            f"{HEAD_DIMS_SUPPORTED} (tl.arange needs powers of two, tl.dot at least 16); use the eager reference"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must share one dtype of fp32/fp16/bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if softcap < 0 or window < 0:
        raise ValueError(f"softcap and window must be >= 0 (0 = off); got softcap={softcap}, window={window}")
    if q.device.type != "cuda":
        if not interpreting():
            raise RuntimeError(
                "the Triton kernel needs a CUDA tensor, or the interpreter for CPU tensors: set "
                "TRITON_INTERPRET=1 before nano.model.flash_attention is first imported"
            )
        if q.dtype == torch.bfloat16:
            raise ValueError("Triton's CPU interpreter computes bf16 wrongly: use fp32 or fp16 on the CPU "
                             "(bf16 works on a GPU)")
    configs = pick_configs(head_dim, q.device, q.dtype)
    return FlashAttentionFunction.apply(q, k, v, float(scale), float(softcap), int(window), configs)
