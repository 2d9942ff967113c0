"""
Exercise (lesson 14): write the Triton decode kernel `paged_decode_attention(q, key_pool, value_pool,
block_tables, key_lens, scale, softcap, window)` in nano/serve/paged_attention.py, so that it returns
what the gather path (nano/serve/kv_cache.py: paged_attention_reference) returns for one new token per
sequence: keys read block by block through the block table, soft-cap, sliding window, MQA and GQA,
sequences that span many blocks and ones shorter than a block.

Without a GPU the kernel runs in Triton's interpreter on the CPU (TRITON_INTERPRET=1, set before the
kernel module is imported). Run: `.venv/bin/python -m pytest -q tests/test_14_paged_attention.py`.
"""

import os

import torch

# subtle: Triton picks "compile for the GPU" or "interpret on the CPU" when the kernel is defined,
# i.e. when the module is imported, so this must come before the import below
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from adapters import impl  # noqa: E402

paged = impl("paged_attention")
kv = impl("kv_cache")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def scattered_cache(lengths, block_size, kv_heads, head_dim, seed=0):
    """A pool with the sequences' blocks in random places, their block tables and lengths."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = sum(-(-n // block_size) for n in lengths)
    pool_blocks = blocks_needed + 3  # a few blocks belong to nobody
    key_pool = torch.randn(pool_blocks, block_size, kv_heads, head_dim, generator=gen)
    value_pool = torch.randn(pool_blocks, block_size, kv_heads, head_dim, generator=gen)
    order = torch.randperm(pool_blocks, generator=gen).tolist()
    tables = []
    for n in lengths:
        tables.append([order.pop() for _ in range(-(-n // block_size))])
    return key_pool, value_pool, kv.block_table_tensor(tables), torch.tensor(lengths)


@pytest.mark.parametrize("q_heads, kv_heads", [(4, 1), (4, 2), (3, 3)])
@pytest.mark.parametrize("window, softcap", [(0, 0.0), (0, 5.0), (5, 5.0), (20, 0.0)])
def test_kernel_equals_gather_path(q_heads, kv_heads, window, softcap):
    block_size, head_dim = 4, 16
    lengths = [1, 3, 4, 17, 45]  # shorter than a block, exactly one, and many blocks
    key_pool, value_pool, tables, key_lens = scattered_cache(lengths, block_size, kv_heads, head_dim)
    q = 2.0 * torch.randn(len(lengths), q_heads, head_dim, generator=torch.Generator().manual_seed(1))
    scale = head_dim**-0.5
    want = kv.paged_attention_reference(q[:, :, None], key_pool, value_pool, tables, (key_lens - 1)[:, None],
                                        key_lens, scale, softcap, window)[:, :, 0]
    got = paged.paged_decode_attention(q.to(DEVICE), key_pool.to(DEVICE), value_pool.to(DEVICE), tables.to(DEVICE),
                                       key_lens.to(DEVICE), scale, softcap, window)
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


def test_kernel_rejects_tiles_that_are_not_powers_of_two():
    key_pool, value_pool, tables, key_lens = scattered_cache([5], block_size=3, kv_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="powers of two"):
        paged.paged_decode_attention(torch.randn(1, 2, 16), key_pool, value_pool, tables, key_lens, 0.25)
