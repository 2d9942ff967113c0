"""
The paged KV cache: keys and values in fixed-size blocks, handed out from a pool like pages of memory.

Lesson 13's cache (nano/model/gemma.py: KVCache) reserves `max_len` positions for every sequence up front.
A server does not know how long each reply will be, so reserving the maximum wastes most of the
memory (60-80% in the servers before vLLM). PagedAttention (Kwon et al., "Efficient Memory
Management for Large Language Model Serving with PagedAttention", SOSP 2023) borrows the operating
system's answer, virtual memory:

    - the cache of each layer is ONE pool of `num_blocks` blocks of `block_size` token slots,
      keys (num_blocks, block_size, kv_heads, head_dim) and values alike;
    - a sequence owns a *block table*, the list of its blocks: token t lives in block
      table[t // block_size], at offset t % block_size;
    - a free list hands blocks out one at a time as a sequence grows, and takes them back when it ends,
      so only the last, partly filled block of each sequence is waste;
    - blocks carry reference counts, so two sequences may share one: equal prompt prefixes
      (the *prefix cache*) and the n > 1 samples of one request (a *fork*).

Prefix caching (as vLLM does it): every full block gets a hash chained with the hash of the block
before it, hash(parent_hash, its tokens), so a block's hash stands for the WHOLE prefix up to its end.
A new prompt looks its blocks up by hash, one after another, and reuses each hit instead of
computing its keys and values again. A hit is confirmed by comparing the WHOLE prefix, every token
from the first to the block's end, not just the block's own tokens: a block's keys depend on every
token before it (attention mixed them in), and two different prefixes could share a hash. Python's
hash is fast but not collision-resistant (someone could craft a prompt whose hash equals another
user's); keeping a copy of each cached prefix costs memory (8 bytes a token per cached block) and
makes a wrong hit impossible. vLLM makes the other trade: a cryptographic hash (SHA-256), no copy.
A freed block keeps its contents and hash while it waits in the free list, so a later request can
still hit it; it is forgotten only when the block is handed out again.

Attention reads the cache through the block table (`paged_attention_reference`, a torch gather;
nano/serve/paged_attention.py is the same thing as one Triton kernel for the GPU).

    cache = PagedKVCache(model.cfg, num_blocks=64, block_size=16)
    seq = SequenceBlocks()
    cached = cache.allocate(seq, prompt_ids)     # blocks for the prompt; `cached` tokens were a hit

Tests: `.venv/bin/python -m pytest -q tests/test_14_kv_cache.py`.
"""

from __future__ import annotations

import array
import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import torch

from nano.model.attention import soft_cap
from nano.model.gemma import kv_cache_bytes_per_token

# The hash of "no block before this one": the chain of block hashes starts from it.
ROOT_HASH = 0


def block_hash(parent_hash: int, tokens: Sequence[int]) -> int:
    """The prefix-cache key of one full block: its tokens chained with the hash of the block before.

    Python's hash of a tuple of ints is the same in every process (only str/bytes hashes are
    randomised), so the key is reproducible. Equal keys almost surely mean equal prefixes; the
    allocator still compares the whole prefix on a hit.

    >>> block_hash(ROOT_HASH, [1, 2]) == block_hash(ROOT_HASH, [1, 2]), block_hash(7, [1, 2]) == block_hash(8, [1, 2])
    (True, False)
    """
    return hash((parent_hash, tuple(tokens)))


# --------------------------------------------------------------------------------------------------
# 1. The block allocator: which blocks are free, who holds each one, which hold a known prefix


class OutOfBlocks(RuntimeError):
    """No free block left: the scheduler preempts a sequence (or waits) when it sees this."""


class BlockAllocator:
    """A free list, a reference count per block, and the prefix cache (hash -> block).

    A block is in exactly one of three states:
        used     ref_count > 0: held by one or more sequences
        cached   ref_count == 0, but it still holds a known prefix (it has a hash): free to hand out,
                 yet a prompt with that prefix can take it back first (a prefix-cache hit)
        free     ref_count == 0 and no hash
    Both cached and free blocks sit in the free list, oldest first; `allocate` takes from the front,
    so the blocks freed longest ago are evicted first (LRU order).

    >>> a = BlockAllocator(num_blocks=4, block_size=2)
    >>> b = a.allocate(); a.ref_counts[b], a.num_free
    (1, 3)
    >>> a.free(b); a.num_free
    4
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        # the free list as an ordered set: O(1) to take the oldest, O(1) to pull out a cached block on a hit
        self.free_list: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hash_of_block: dict[int, int] = {}  # block -> the prefix hash it holds
        self.block_of_hash: dict[int, int] = {}  # prefix hash -> block (the inverse)
        self.prefix_of_block: dict[int, tuple[int, ...]] = {}  # block -> every token up to its end, to confirm a hit
        self.hits = self.lookups = 0  # prefix-cache statistics (blocks)

    # ---- counts ---------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks that `allocate` can hand out now (free + cached)."""
        return len(self.free_list)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_list)

    @property
    def num_cached(self) -> int:
        """Free blocks that still hold a reusable prefix."""
        return sum(1 for b in self.free_list if b in self.hash_of_block)

    # ---- handing blocks out and taking them back ------------------------------------------------

    def allocate(self) -> int:
        """Take the oldest block off the free list (forgetting any prefix it held); ref count 1."""
        if not self.free_list:
            raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use")
        block, _ = self.free_list.popitem(last=False)
        self._forget(block)  # its old contents are about to be overwritten
        self.ref_counts[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more sequence holds `block` (a fork, or a prefix-cache hit on a used block)."""
        if self.ref_counts[block] == 0:
            self.free_list.pop(block)  # a cached block comes back to life
        self.ref_counts[block] += 1

    def free(self, block: int) -> None:
        """One holder lets go; at zero the block joins the END of the free list (kept as a cache entry)."""
        if self.ref_counts[block] <= 0:
            raise ValueError(f"block {block} freed more often than it was allocated")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_list[block] = None

    # ---- the prefix cache ------------------------------------------------------------------------

    def lookup(self, prefix_hash: int, prefix: Sequence[int]) -> int | None:
        """The block whose K/V are those of `prefix`'s last full block, or None.

        prefix: every token from the sequence's start to the end of the block looked up. The hash
        finds a candidate; only an equal prefix is a hit. On a hit the block is shared (its ref count
        goes up): the caller now holds it.
        """
        self.lookups += 1
        block = self.block_of_hash.get(prefix_hash)
        if block is None or self.prefix_of_block[block] != tuple(prefix):  # footgun: a hash is not proof
            return None
        self.hits += 1
        self.share(block)
        return block

    def register(self, block: int, prefix_hash: int, prefix: Sequence[int]) -> None:
        """Record that `block` (full, its K/V written) holds the last block of `prefix` (every token from
        the start to its end), whose chained hash is `prefix_hash`."""
        if prefix_hash in self.block_of_hash or block in self.hash_of_block:
            return  # another block already holds this prefix (two sequences wrote it at once), keep the first
        self.hash_of_block[block] = prefix_hash
        self.block_of_hash[prefix_hash] = block
        self.prefix_of_block[block] = tuple(prefix)

    def _forget(self, block: int) -> None:
        prefix_hash = self.hash_of_block.pop(block, None)
        if prefix_hash is not None:
            del self.block_of_hash[prefix_hash]
            del self.prefix_of_block[block]

    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


# --------------------------------------------------------------------------------------------------
# 2. One sequence's view of the cache


@dataclass
class SequenceBlocks:
    """The blocks of one sequence and how many of its tokens are written into them.

    block_table[i] holds tokens [i * block_size, (i + 1) * block_size). block_hashes[i] is the chained
    hash of full block i (so the next block's hash can be computed, and full blocks registered).
    """

    block_table: list[int] = field(default_factory=list)
    num_tokens: int = 0  # tokens whose K/V are (or are being) written
    block_hashes: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# 3. The cache: one pool of blocks per layer, and the operations a sequence needs


class PagedKVCache:
    """Per layer, a key pool and a value pool of shape (num_blocks, block_size, kv_heads, head_dim).

    The allocator decides which blocks a sequence owns; this class writes and reads their contents.
    Flat slot s = block * block_size + offset addresses one token's K (or V) in a pool viewed as
    (num_blocks * block_size, kv_heads, head_dim).
    """

    def __init__(self, cfg, num_blocks: int, block_size: int = 16, device=None, dtype=torch.float32,
                 prefix_caching: bool = True):
        self.cfg, self.num_blocks, self.block_size = cfg, num_blocks, block_size
        self.prefix_caching = prefix_caching
        shape = (num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim)
        # keys and values of a layer side by side in one tensor (2, *shape), so that one gather reads
        # both (`gather_kv`); `keys[layer]` and `values[layer]` are its two halves (views)
        self.pools = [torch.zeros((2, *shape), device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.keys = [pool[0] for pool in self.pools]
        self.values = [pool[1] for pool in self.pools]
        # the same pools by flat slot, (2, num_blocks * block_size, kv_heads, head_dim): what `write` indexes
        self.slot_pools = [pool.view(2, -1, *shape[2:]) for pool in self.pools]
        self.allocator = BlockAllocator(num_blocks, block_size)

    # ---- memory arithmetic ------------------------------------------------------------------------

    def bytes_per_token(self) -> int:
        """2 (K and V) * layers * kv_heads * head_dim * bytes per number (nano/model/gemma.py's arithmetic)."""
        return kv_cache_bytes_per_token(self.cfg, self.keys[0].dtype)

    def nbytes(self) -> int:
        return self.bytes_per_token() * self.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)  # ceil division

    # ---- a sequence's blocks -----------------------------------------------------------------------

    def allocate(self, seq: SequenceBlocks, token_ids: Sequence[int]) -> int:
        """Give an empty `seq` the blocks for `token_ids`, reusing cached prefix blocks; return how many
        leading tokens are already in the cache (their K/V need not be computed).

        Only full blocks BEFORE the block of the last token can be hits: the last token's logits are
        needed to pick the next token, so it is always computed, and it must never be written into a
        block another sequence shares. Raises OutOfBlocks (after giving back what it took) if the
        pool is too small; check `can_allocate` first.
        """
        if seq.block_table:
            raise ValueError("allocate() is for a sequence without blocks; use append_slot() to grow one")
        token_ids = list(token_ids)
        num_hit = 0
        parent = ROOT_HASH
        if self.prefix_caching:
            # 1. walk the full blocks that end before the last token, stopping at the first miss
            for i in range((len(token_ids) - 1) // self.block_size):
                block_tokens = token_ids[i * self.block_size:(i + 1) * self.block_size]
                h = block_hash(parent, block_tokens)
                block = self.allocator.lookup(h, token_ids[:(i + 1) * self.block_size])
                if block is None:
                    break
                seq.block_table.append(block)
                seq.block_hashes.append(h)
                parent, num_hit = h, num_hit + self.block_size
        # 2. fresh blocks for the rest
        try:
            while len(seq.block_table) < self.blocks_needed(len(token_ids)):
                seq.block_table.append(self.allocator.allocate())
        except OutOfBlocks:
            self.free(seq)
            raise
        seq.num_tokens = len(token_ids)
        return num_hit

    def can_allocate(self, token_ids: Sequence[int], reserve: int = 0) -> bool:
        """Would `allocate` succeed with `reserve` blocks still free afterwards? (Hits are not counted
        as savings here: cheap and safe, a hit only makes it fit more easily.)"""
        return self.blocks_needed(len(token_ids)) + reserve <= self.allocator.num_free

    def append_slot(self, seq: SequenceBlocks) -> None:
        """Make room for one more token at position seq.num_tokens (a new block when the last is full).

        Copy-on-write: if the block the token lands in is shared (after a fork), this sequence first
        gets its own copy of it, so writing never changes what another sequence reads.
        Raises OutOfBlocks when no block is left (the scheduler then preempts someone).
        """
        position = seq.num_tokens
        if position == len(seq.block_table) * self.block_size:
            seq.block_table.append(self.allocator.allocate())  # the last block is full: a new one
        else:
            last = seq.block_table[-1]
            if self.allocator.ref_counts[last] > 1:
                copy = self.allocator.allocate()
                self.copy_block(last, copy)
                self.allocator.free(last)
                seq.block_table[-1] = copy
        seq.num_tokens += 1

    def commit(self, seq: SequenceBlocks, token_ids: Sequence[int]) -> None:
        """After the K/V of `token_ids` (the whole sequence so far) are written: enter every newly full
        block into the prefix cache, so later prompts that start the same way reuse it."""
        num_full = min(len(token_ids), seq.num_tokens) // self.block_size
        while len(seq.block_hashes) < num_full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
            block_tokens = token_ids[i * self.block_size:(i + 1) * self.block_size]
            h = block_hash(parent, block_tokens)
            seq.block_hashes.append(h)
            if self.prefix_caching:
                self.allocator.register(seq.block_table[i], h, token_ids[:(i + 1) * self.block_size])

    def fork(self, seq: SequenceBlocks) -> SequenceBlocks:
        """A second sequence with the same contents: every block shared (ref count + 1), nothing copied.
        The first write into the shared last block copies it (see append_slot)."""
        for block in seq.block_table:
            self.allocator.share(block)
        return SequenceBlocks(list(seq.block_table), seq.num_tokens, list(seq.block_hashes))

    def free(self, seq: SequenceBlocks) -> None:
        """Give back every block of `seq` (shared ones only lose one holder); `seq` is empty afterwards."""
        for block in reversed(seq.block_table):  # the last block is the least likely to be reused: evict it first
            self.allocator.free(block)
        seq.block_table, seq.num_tokens, seq.block_hashes = [], 0, []

    # ---- reading and writing K/V -----------------------------------------------------------------

    def slot_ids(self, seq: SequenceBlocks, start: int, end: int) -> list[int]:
        """Flat slots of positions [start, end) of `seq`: table[t // block_size] * block_size + t % block_size.

        >>> from types import SimpleNamespace
        >>> cache = PagedKVCache(SimpleNamespace(n_layers=1, n_kv_heads=1, head_dim=2), num_blocks=8, block_size=4)
        >>> cache.slot_ids(SequenceBlocks(block_table=[7, 2]), 3, 6)   # positions 3, 4, 5: 7*4 + 3, 2*4 + 0, 2*4 + 1
        [31, 8, 9]
        """
        bs, table = self.block_size, seq.block_table
        return [table[t // bs] * bs + t % bs for t in range(start, end)]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (N, kv_heads, head_dim) of N tokens at flat `slots` (N,) of layer `layer`."""
        write_kv(self.slot_pools[layer], slots, k, v)

    def copy_block(self, source: int, target: int) -> None:
        for layer in range(len(self.keys)):
            self.keys[layer][target].copy_(self.keys[layer][source])
            self.values[layer][target].copy_(self.values[layer][source])


def write_kv(slot_pool: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """k, v (N, Hkv, D) into a layer's pool seen by flat slot, (2, num_blocks * block_size, Hkv, D), at `slots` (N,).

    Keys and values go in together, ONE index_copy_: stacking them costs less than a second call
    (~7 against ~12 us a layer here), and it is the form torch.compile turns into an update in place
    (nano/serve/compiled_decode.py); written through two views of the pool, one for keys and one for
    values, the compiled step copied the whole pool.
    """
    kv = torch.stack((k, v))  # (2, N, Hkv, D)
    if kv.dtype != slot_pool.dtype:  # (skipped when equal: even a no-op conversion costs time on the decode path)
        kv = kv.to(slot_pool.dtype)
    slot_pool.index_copy_(1, slots, kv)


def long_tensor(values: Iterable[int], device=None) -> torch.Tensor:
    """Python ints -> a 1-d int64 tensor, through an array.array buffer.

    torch.tensor(list) converts element by element (~0.1 ms for a thousand ints); reading a typed
    buffer is several times faster, and the engine builds a few such tensors every step.
    >>> long_tensor([3, 1, 2])
    tensor([3, 1, 2])
    """
    buffer = array.array("q", values)
    if not buffer:
        return torch.empty(0, dtype=torch.long, device=device)
    tensor = torch.frombuffer(buffer, dtype=torch.long)  # the tensor keeps the buffer alive
    # (on the CPU no .to(): even a conversion that does nothing is an operator call, and the engine's step makes several)
    return tensor if device is None or torch.device(device).type == "cpu" else tensor.to(device)


def block_table_tensor(tables: Sequence[Sequence[int]], device=None) -> torch.Tensor:
    """Block tables of different lengths as one (S, max_blocks) long tensor, padded with block 0.

    The padding is never read for real: positions past a sequence's length are masked out.
    """
    width = max(map(len, tables), default=0) or 1
    flat: list[int] = []
    for table in tables:  # list += list: twice as fast as chaining iterators, and this runs every step
        flat += table
        if len(table) < width:
            flat += [0] * (width - len(table))
    return long_tensor(flat, device).view(len(tables), width)


# --------------------------------------------------------------------------------------------------
# 4. Attention through the block table: the gather path


def gather_kv(pool: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Copy each sequence's blocks out of `pool` into one contiguous run of keys (or values).

    pool (..., num_blocks, block_size, Hkv, D), block_tables (S, max_blocks) -> (..., S, Hkv, max_blocks * block_size, D)
    Position t of sequence s ends up at index t, because block i of the table holds positions
    [i * block_size, (i + 1) * block_size). A layer's keys and values side by side (PagedKVCache.pools,
    (2, num_blocks, ...)) come out as one (2, S, ...) tensor: one index_select instead of two, which
    matters on a CPU, where each call costs microseconds whatever its size and the decode step makes
    one per layer.
    """
    num_seqs, max_blocks = block_tables.shape
    *lead, _, block_size, kv_heads, head_dim = pool.shape
    # index_select: the same as pool[..., block_tables, :, :, :], on a flat index, faster
    gathered = pool.index_select(len(lead), block_tables.view(-1))  # (..., S * max_blocks, block_size, Hkv, D)
    if kv_heads == 1:  # MQA: (L, 1, D) and (1, L, D) are the same numbers in the same order: a view, no transpose
        return gathered.view(*lead, num_seqs, 1, max_blocks * block_size, head_dim)
    return gathered.view(*lead, num_seqs, max_blocks * block_size, kv_heads, head_dim).transpose(-3, -2)


def paged_attention_reference(
    q: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    block_tables: torch.Tensor,
    query_positions: torch.Tensor,
    key_lens: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
) -> torch.Tensor:
    """Attention for S sequences whose keys and values live in the paged pools.

    q (S, Hq, Tq, D): Tq queries per sequence (1 when decoding; a prompt's tokens when prefilling,
    rows past a shorter prompt are padding). query_positions (S, Tq): the absolute position of each
    query. key_lens (S,): keys [0, key_len) of each sequence are valid. A query at position p sees
    key k when k <= p (causal), p - k < window (if window > 0), and k < key_len.
    Returns (S, Hq, Tq, D). The same arithmetic as nano/model/attention.py's reference: fp32 scores,
    soft-cap before the mask, one matmul per KV head for its G query heads.
    """
    num_seqs, num_q_heads, num_queries, head_dim = q.shape
    kv_heads = key_pool.shape[2]
    group = num_q_heads // kv_heads
    # 1. gather: the paged keys and values of every sequence, side by side
    k = gather_kv(key_pool, block_tables).float()  # (S, Hkv, L, D), L = max_blocks * block_size
    v = gather_kv(value_pool, block_tables).float()
    num_keys = k.shape[2]
    # 2. scores with the G query heads of each KV head stacked along the rows
    q_grouped = q.float().reshape(num_seqs, kv_heads, group * num_queries, head_dim)  # (S, Hkv, G*Tq, D)
    scores = (q_grouped @ k.transpose(-1, -2)).view(num_seqs, kv_heads, group, num_queries, num_keys) * scale
    scores = soft_cap(scores, softcap)
    # 3. which keys each query may see
    key_pos = torch.arange(num_keys, device=q.device)  # (L,)
    distance = query_positions[:, :, None] - key_pos[None, None, :]  # (S, Tq, L)
    allowed = (distance >= 0) & (key_pos[None, None, :] < key_lens[:, None, None])
    if window > 0:
        allowed &= distance < window
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))  # (S, Hkv, G, Tq, L)
    # 4. softmax and the weighted values
    weights = torch.softmax(scores, dim=-1).view(num_seqs, kv_heads, group * num_queries, num_keys)
    out = weights @ v  # (S, Hkv, G*Tq, D)
    return out.view(num_seqs, num_q_heads, num_queries, head_dim).to(q.dtype)


# --------------------------------------------------------------------------------------------------
# 5. Memory arithmetic for the lesson


def memory_table(cfg, block_size: int = 16, budget_bytes: int = 64 * 2**20, dtype=torch.float32) -> dict:
    """Bytes per token, blocks and tokens that fit in `budget_bytes`, for this model and its MHA twin.

    MQA (n_kv_heads = 1) stores one K and one V head per layer; the same model with one KV head per
    query head stores n_heads of each: n_heads times the bytes per token, n_heads times fewer tokens.
    """
    rows = {}
    for name, kv_heads in (("this model", cfg.n_kv_heads), ("one KV head per query head", cfg.n_heads)):
        per_token = kv_cache_bytes_per_token(replace(cfg, n_kv_heads=kv_heads), dtype)  # this model, kv_heads KV heads
        per_block = per_token * block_size
        blocks = budget_bytes // per_block
        rows[name] = {"kv_heads": kv_heads, "bytes_per_token": per_token, "bytes_per_block": per_block,
                      "blocks": blocks, "tokens": blocks * block_size,
                      "full_contexts": blocks * block_size // cfg.context_len}
    return rows


def waste_fraction(num_tokens: Sequence[int], block_size: int) -> float:
    """Of the slots held by sequences of these lengths, the fraction not holding a token.

    Only each sequence's last block can be partly empty, so waste < one block per sequence.
    >>> round(waste_fraction([17, 32], block_size=16), 3)     # 4 blocks (64 slots) hold 49 tokens
    0.234
    """
    held = sum(math.ceil(n / block_size) * block_size for n in num_tokens)
    return 1.0 - sum(num_tokens) / held if held else 0.0
