"""
Exercise (lesson 14): write `nano/serve/kv_cache.py`, the paged KV cache.

Implement
  - `BlockAllocator(num_blocks, block_size)`: a free list (oldest freed block handed out first),
    reference counts (`allocate` gives a block with count 1, `share` adds a holder, `free` removes
    one and returns the block to the free list at zero), and the prefix cache: `register(block,
    hash, prefix)` remembers a full block (prefix: every token up to its end), `lookup(hash, prefix)`
    finds it again (checking the whole prefix, not only the hash) and shares it; a block handed out
    by `allocate` forgets its prefix;
  - `PagedKVCache(cfg, num_blocks, block_size)`: per layer, pools (num_blocks, block_size, Hkv, D);
    `allocate(seq, tokens)` (returns the leading tokens that were prefix-cache hits),
    `append_slot(seq)` (a new block when the last is full; copy-on-write of a shared block),
    `commit(seq, tokens)` (register full blocks), `fork(seq)`, `free(seq)`, `slot_ids`, `write`;
  - `paged_attention_reference(q, key_pool, value_pool, block_tables, query_positions, key_lens, ...)`:
    attention that reads K/V through the block tables and equals ordinary attention
    (nano/model/attention.py) — causal, soft-capped, with the sliding window.
"""

import pytest
import torch

from adapters import impl

kv = impl("kv_cache")
model_mod = impl("gemma")
attention_mod = impl("attention")


def small_cfg(**overrides):
    fields = dict(vocab_size=64, context_len=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=8,
                  d_ff=64, sliding_window=8, query_pre_attn_scalar=8.0, attn_impl="eager")
    return model_mod.model_config("tiny", **{**fields, **overrides})


# ---- the allocator ------------------------------------------------------------------------------


def test_allocate_free_and_reference_counts():
    a = kv.BlockAllocator(num_blocks=4, block_size=2)
    blocks = [a.allocate() for _ in range(4)]
    assert sorted(blocks) == [0, 1, 2, 3] and a.num_free == 0 and a.num_used == 4
    with pytest.raises(kv.OutOfBlocks):
        a.allocate()
    a.share(blocks[0])  # a second holder
    a.free(blocks[0])
    assert a.ref_counts[blocks[0]] == 1 and a.num_free == 0  # still held once
    a.free(blocks[0])
    assert a.ref_counts[blocks[0]] == 0 and a.num_free == 1
    with pytest.raises(ValueError):
        a.free(blocks[0])  # freed more often than allocated
    # the oldest freed block comes back first (LRU eviction order)
    a.free(blocks[2])
    a.free(blocks[1])
    assert a.allocate() == blocks[0] and a.allocate() == blocks[2]


def test_prefix_cache_hit_needs_equal_tokens_and_dies_on_reuse():
    a = kv.BlockAllocator(num_blocks=2, block_size=2)
    block = a.allocate()
    h = kv.block_hash(kv.ROOT_HASH, [5, 6])
    a.register(block, h, [5, 6])
    a.free(block)
    assert a.num_free == 2 and a.num_cached == 1  # free, but still holding a known prefix
    assert a.lookup(h, [5, 7]) is None  # same hash, other tokens: not a hit
    assert a.lookup(h, [5, 6]) == block and a.ref_counts[block] == 1 and a.num_free == 1
    assert a.hits == 1 and a.lookups == 2
    a.free(block)
    # handing the block out again (both blocks: the cached one is the oldest free) forgets the prefix
    a.allocate(), a.allocate()
    assert a.lookup(h, [5, 6]) is None and a.num_cached == 0


def test_block_hash_chains_the_whole_prefix():
    first = kv.block_hash(kv.ROOT_HASH, [1, 2])
    # the same tokens after another prefix are another block
    assert kv.block_hash(first, [3, 4]) != kv.block_hash(kv.block_hash(kv.ROOT_HASH, [9, 9]), [3, 4])
    assert kv.block_hash(first, [3, 4]) == kv.block_hash(kv.block_hash(kv.ROOT_HASH, [1, 2]), [3, 4])


# ---- sequences in the cache -----------------------------------------------------------------------


def test_allocate_append_and_free_a_sequence():
    cache = kv.PagedKVCache(small_cfg(), num_blocks=6, block_size=4)
    seq = kv.SequenceBlocks()
    assert cache.allocate(seq, list(range(6))) == 0  # nothing cached yet
    assert len(seq.block_table) == 2 and seq.num_tokens == 6
    cache.append_slot(seq), cache.append_slot(seq)  # positions 6, 7: still block 2 of 2
    assert len(seq.block_table) == 2
    cache.append_slot(seq)  # position 8 opens a third block
    assert len(seq.block_table) == 3 and seq.num_tokens == 9
    t = seq.block_table
    assert cache.slot_ids(seq, 3, 5) == [t[0] * 4 + 3, t[1] * 4 + 0]
    cache.free(seq)
    assert cache.allocator.num_free == 6 and seq.block_table == []


def test_prefix_cache_shares_full_blocks_of_equal_prompts():
    cache = kv.PagedKVCache(small_cfg(), num_blocks=8, block_size=4)
    prompt = list(range(10))  # blocks [0..3], [4..7], and 2 tokens in a third
    a = kv.SequenceBlocks()
    assert cache.allocate(a, prompt) == 0
    cache.commit(a, prompt)  # registers the two full blocks
    b = kv.SequenceBlocks()
    assert cache.allocate(b, prompt) == 8  # two full blocks reused
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [cache.allocator.ref_counts[x] for x in a.block_table] == [2, 2, 1]
    # a prompt that is exactly 2 full blocks: the block of its LAST token is never a hit (its
    # logits must be computed, and it must not write into a shared block)
    c = kv.SequenceBlocks()
    assert cache.allocate(c, prompt[:8]) == 4
    # after everyone leaves, the blocks stay cached and are hit again
    for s in (a, b, c):
        cache.free(s)
    assert cache.allocator.num_free == 8 and cache.allocator.num_cached == 2
    d = kv.SequenceBlocks()
    assert cache.allocate(d, prompt + [42]) == 8



def test_a_hash_collision_is_not_a_hit(monkeypatch):
    # a deliberately weak hash that forgets the chain: blocks [1,2,3,4] + [5,6,7,8] and [9,9,9,9] +
    # [5,6,7,8] then have the same second key, and the second block's tokens are equal too. Only the
    # prefix tells them apart, and its keys differ (attention mixed the first block into them).
    monkeypatch.setattr(kv, "block_hash", lambda parent, tokens: hash(tuple(tokens)))
    cache = kv.PagedKVCache(small_cfg(), num_blocks=8, block_size=4)
    a = kv.SequenceBlocks()
    cache.allocate(a, [1, 2, 3, 4, 5, 6, 7, 8, 0])
    cache.commit(a, [1, 2, 3, 4, 5, 6, 7, 8, 0])
    cache.allocator.register(7, kv.block_hash(None, [9, 9, 9, 9]), [9, 9, 9, 9])  # block 7 "holds" [9,9,9,9]
    b = kv.SequenceBlocks()
    assert cache.allocate(b, [9, 9, 9, 9, 5, 6, 7, 8, 0]) == 4  # the first block hits; the second must not
    assert b.block_table[0] == 7 and b.block_table[1] != a.block_table[1]

def test_fork_shares_blocks_and_copies_on_write():
    cfg = small_cfg()
    cache = kv.PagedKVCache(cfg, num_blocks=6, block_size=4)
    parent = kv.SequenceBlocks()
    cache.allocate(parent, list(range(6)))
    for layer in range(cfg.n_layers):
        cache.keys[layer].normal_()
    child = cache.fork(parent)
    assert child.block_table == parent.block_table
    assert all(cache.allocator.ref_counts[x] == 2 for x in parent.block_table)
    shared_last = parent.block_table[-1]
    cache.append_slot(child)  # position 6 lands in the shared last block: the child gets a copy
    assert child.block_table[0] == parent.block_table[0] and child.block_table[-1] != shared_last
    assert torch.equal(cache.keys[0][child.block_table[-1]], cache.keys[0][shared_last])
    assert cache.allocator.ref_counts[shared_last] == 1
    cache.free(parent), cache.free(child)
    assert cache.allocator.num_free == 6 and all(r == 0 for r in cache.allocator.ref_counts)


def test_exhaustion_gives_everything_back():
    cache = kv.PagedKVCache(small_cfg(), num_blocks=3, block_size=4)
    assert not cache.can_allocate(list(range(13)))
    with pytest.raises(kv.OutOfBlocks):
        cache.allocate(kv.SequenceBlocks(), list(range(13)))
    assert cache.allocator.num_free == 3  # the blocks taken before running out were returned
    seq = kv.SequenceBlocks()
    cache.allocate(seq, list(range(12)))
    with pytest.raises(kv.OutOfBlocks):
        cache.append_slot(seq)


def test_memory_arithmetic():
    cfg = model_mod.model_config("tiny")
    rows = kv.memory_table(cfg, block_size=16, budget_bytes=2**20, dtype=torch.bfloat16)
    mqa, mha = rows["this model"], rows["one KV head per query head"]
    assert mqa["bytes_per_token"] == 2 * 4 * 1 * 32 * 2 == model_mod.kv_cache_bytes_per_token(cfg, torch.bfloat16)
    assert mha["bytes_per_token"] == cfg.n_heads * mqa["bytes_per_token"]
    assert mqa["tokens"] == 2**20 // 512 and mha["tokens"] == mqa["tokens"] // cfg.n_heads
    assert kv.waste_fraction([16, 32], 16) == 0.0 and 0 < kv.waste_fraction([17], 16) < 1


# ---- attention through the block table -------------------------------------------------------------


@pytest.mark.parametrize("window, softcap", [(0, 0.0), (0, 5.0), (6, 5.0), (16, 0.0)])
def test_paged_attention_equals_contiguous_attention(window, softcap):
    """Scatter K/V of three sequences over a shuffled pool; attention through the block tables must
    equal attention_reference on the contiguous tensors, for decode queries and prompt queries."""
    torch.manual_seed(0)
    block_size, kv_heads, q_heads, head_dim = 4, 1, 4, 8
    lengths = [3, 21, 40]  # 40 spans ten blocks
    pool_blocks = 24
    key_pool = torch.zeros(pool_blocks, block_size, kv_heads, head_dim)
    value_pool = torch.zeros_like(key_pool)
    free = torch.randperm(pool_blocks).tolist()  # blocks handed out in random order
    tables, ks, vs = [], [], []
    for n in lengths:
        k, v = torch.randn(n, kv_heads, head_dim), torch.randn(n, kv_heads, head_dim)
        table = [free.pop() for _ in range(-(-n // block_size))]
        for t in range(n):
            key_pool[table[t // block_size], t % block_size] = k[t]
            value_pool[table[t // block_size], t % block_size] = v[t]
        tables.append(table), ks.append(k), vs.append(v)
    block_tables = kv.block_table_tensor(tables)
    key_lens = torch.tensor(lengths)
    scale = head_dim**-0.5
    # 1. decode: one query per sequence, at its last position
    q = torch.randn(len(lengths), q_heads, 1, head_dim)
    out = kv.paged_attention_reference(q, key_pool, value_pool, block_tables, key_lens[:, None] - 1, key_lens,
                                       scale, softcap, window)
    for i, n in enumerate(lengths):
        k, v = ks[i].transpose(0, 1)[None], vs[i].transpose(0, 1)[None]  # (1, Hkv, n, D)
        want = attention_mod.attention_reference(q[i:i + 1], k, v, scale, softcap, window)
        torch.testing.assert_close(out[i:i + 1], want, atol=1e-5, rtol=1e-5)
    # 2. prefill: the last 3 positions of each sequence as queries (the first sequence has exactly 3)
    q = torch.randn(len(lengths), q_heads, 3, head_dim)
    positions = torch.stack([torch.arange(n - 3, n) for n in lengths])
    out = kv.paged_attention_reference(q, key_pool, value_pool, block_tables, positions, key_lens, scale, softcap, window)
    for i, n in enumerate(lengths):
        k, v = ks[i].transpose(0, 1)[None], vs[i].transpose(0, 1)[None]
        want = attention_mod.attention_reference(q[i:i + 1], k, v, scale, softcap, window)
        torch.testing.assert_close(out[i:i + 1], want, atol=1e-5, rtol=1e-5)
