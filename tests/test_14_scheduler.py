"""
Exercise (lesson 14): write `nano/serve/scheduler.py`, who runs in each step of the engine.

Implement `Scheduler(cache, max_running, max_prefill_tokens)` over a `PagedKVCache`, with the queues
`waiting` (a deque, oldest first) and `running` (a list, oldest first), `preemptions` (a count), and
  - `add(seq)`: a new sequence waits at the end of the line;
  - `admit()`: waiting sequences get their blocks (`cache.allocate`), oldest first, while they fit
    with one block kept free per running or just-admitted sequence, `max_running` allows, and the
    step's `max_prefill_tokens` are not spent (the first sequence always goes); returns the admitted;
  - `reserve_decode_slots(prefill)`: one more slot (`cache.append_slot`) for every running sequence;
    when the pool is dry, `preempt` the newest (this step's admitted first, then the running from
    the end) until it fits; returns the sequences that decode this step;
  - `preempt(seq)`: free its blocks, num_computed = 0, put it FIRST in the waiting line;
  - `schedule()`: `admit`, then `reserve_decode_slots` -> (prefill, decode), each of prefill with
    `num_scheduled` prompt tokens to feed and `last_chunk` (whether they finish its prompt);
  - chunked prefill (`chunked_prefill=True`): a prompt longer than the step's budget is fed in
    pieces, one per step, and waits in `prefilling` in between; the running decode all along;
  - `fork(parent)`: the parent's request's other choices share its blocks (`cache.fork`) and run;
  - `join_running(prefill)`, `remove(seq)`.

The sequences are nano/serve/sequence.py's `SequenceState`; no model runs here: a "step" below is
what the engine would do after the model call (the K/V are computed, one token is appended).
"""

import pytest

from adapters import impl

scheduler_mod = impl("scheduler")
kv = impl("kv_cache")
model_mod = impl("gemma")
from nano.serve.sequence import Request, SamplingParams, SequenceState  # noqa: E402


@pytest.fixture
def cfg():
    return model_mod.model_config("tiny", vocab_size=64, context_len=64, d_model=32, n_layers=2, n_heads=4,
                                  n_kv_heads=1, head_dim=8, d_ff=64, sliding_window=8, attn_impl="eager")


def make_seq(seq_id: int, length: int, n: int = 1) -> SequenceState:
    prompt = [(seq_id * 7 + i) % 64 for i in range(length)]
    request = Request(f"req-{seq_id}", prompt, SamplingParams(n=n), arrival=0.0)
    for index in range(n):
        request.sequences.append(SequenceState(seq_id * 10 + index, request, index, list(prompt), None, None))
    request.sequences[0].forks_pending = n - 1
    return request.sequences[0]


def finish_step(scheduler, prefill, decode, token: int = 1) -> None:
    """What the engine does after the model call: the K/V are in; a prompt fed only a piece of itself
    (chunked prefill) waits for its next piece, every other sequence gets one more token."""
    for seq in prefill + decode:
        if seq in prefill and not seq.last_chunk:
            seq.num_computed += seq.num_scheduled
        else:
            seq.num_computed = len(seq.tokens)
            seq.tokens.append(token)
    scheduler.join_running(prefill)


def test_admit_oldest_first_keeping_a_block_per_running_sequence(cfg):
    cache = kv.PagedKVCache(cfg, num_blocks=8, block_size=4)
    scheduler = scheduler_mod.Scheduler(cache, max_running=8, max_prefill_tokens=100)
    a, b, c = make_seq(1, 6), make_seq(2, 6), make_seq(3, 9)  # 2, 2 and 3 blocks
    for seq in (a, b, c):
        scheduler.add(seq)
    prefill, decode = scheduler.schedule()
    # a: 2 of 8 blocks; b: 2 more + 1 kept for a; c would need 3 + 2 kept of the 4 left: it waits
    assert prefill == [a, b] and decode == [] and list(scheduler.waiting) == [c]
    assert cache.allocator.num_free == 4
    finish_step(scheduler, prefill, decode)
    assert scheduler.running == [a, b]
    prefill, decode = scheduler.schedule()  # c still does not fit; a and b decode (room in their blocks)
    assert prefill == [] and decode == [a, b] and list(scheduler.waiting) == [c]


def test_the_prefill_budget_and_max_running(cfg):
    cache = kv.PagedKVCache(cfg, num_blocks=32, block_size=4)
    scheduler = scheduler_mod.Scheduler(cache, max_running=8, max_prefill_tokens=10)
    seqs = [make_seq(i, 6) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    assert scheduler.admit() == seqs[:1]  # 6 of 10 prompt tokens spent: the next 6 wait for the next step
    assert scheduler.admit() == seqs[1:2]
    long = make_seq(9, 30)
    alone = scheduler_mod.Scheduler(kv.PagedKVCache(cfg, num_blocks=32, block_size=4), max_prefill_tokens=10)
    alone.add(long)
    assert alone.admit() == [long]  # a prompt longer than the budget still goes, alone
    few = scheduler_mod.Scheduler(kv.PagedKVCache(cfg, num_blocks=32, block_size=4), max_running=2)
    for i in range(3):
        few.add(make_seq(i, 3))
    assert len(few.admit()) == 2 and len(few.waiting) == 1


def test_a_dry_pool_preempts_the_newest_to_the_front_of_the_line(cfg):
    cache = kv.PagedKVCache(cfg, num_blocks=4, block_size=4, prefix_caching=False)
    scheduler = scheduler_mod.Scheduler(cache, max_running=8, max_prefill_tokens=100)
    a, b, late = make_seq(1, 7), make_seq(2, 4), make_seq(3, 2)  # 2 blocks and 1
    scheduler.add(a)
    scheduler.add(b)
    prefill, decode = scheduler.schedule()
    assert prefill == [a, b]
    finish_step(scheduler, prefill, decode)  # a: 8 tokens, b: 5
    prefill, decode = scheduler.schedule()  # b's 5th token takes the last free block
    assert decode == [a, b] and cache.allocator.num_free == 0
    finish_step(scheduler, prefill, decode)  # a: 9 tokens, b: 6
    scheduler.add(late)
    prefill, decode = scheduler.schedule()  # a's 9th token needs a block: b, the newest, gives its up
    assert decode == [a] and scheduler.running == [a]
    assert list(scheduler.waiting) == [b, late]  # first in line, before the sequence that came later
    assert scheduler.preemptions == 1 and b.preemptions == 1
    # b keeps its tokens (prompt + the 2 it wrote): they are all recomputed in one prefill when it returns
    assert b.num_computed == 0 and b.blocks.block_table == [] and len(b.tokens) == 6
    assert cache.allocator.num_free == 1


def test_fork_shares_the_prompt_blocks_and_remove_frees_them(cfg):
    cache = kv.PagedKVCache(cfg, num_blocks=16, block_size=4)
    scheduler = scheduler_mod.Scheduler(cache)
    parent = make_seq(1, 6, n=3)
    scheduler.add(parent)
    prefill, decode = scheduler.schedule()
    assert prefill == [parent]
    parent.num_computed = len(parent.tokens)
    children = scheduler.fork(parent)
    assert children == parent.request.sequences[1:] and parent.forks_pending == 0
    assert all(child.blocks.block_table == parent.blocks.block_table for child in children)
    assert all(cache.allocator.ref_counts[b] == 3 for b in parent.blocks.block_table)
    scheduler.join_running(prefill)
    assert scheduler.running == children + [parent]  # the forked choices joined as the step ran
    for seq in list(scheduler.running):
        scheduler.remove(seq)
    assert not scheduler.running and not scheduler.waiting
    assert cache.allocator.num_free == 16 and all(r == 0 for r in cache.allocator.ref_counts)


def test_chunked_prefill_feeds_a_long_prompt_in_pieces_beside_the_running(cfg):
    cache = kv.PagedKVCache(cfg, num_blocks=32, block_size=4)
    scheduler = scheduler_mod.Scheduler(cache, max_running=8, max_prefill_tokens=10, chunked_prefill=True)
    short, long = make_seq(1, 3), make_seq(2, 25)
    scheduler.add(short)
    prefill, decode = scheduler.schedule()
    finish_step(scheduler, prefill, decode)  # short is running
    scheduler.add(long)
    pieces = []
    for _ in range(3):  # 25 prompt tokens at 10 a step: 10, 10, 5; short decodes in every one of those steps
        prefill, decode = scheduler.schedule()
        assert prefill == [long] and decode == [short]
        pieces.append((long.num_scheduled, long.last_chunk))
        finish_step(scheduler, prefill, decode)
        if not long.last_chunk:  # fed a piece: still prefilling, no token written
            assert scheduler.prefilling == [long] and scheduler.running == [short] and len(long.tokens) == 25
    assert pieces == [(10, False), (10, False), (5, True)] and long.num_computed == 25
    assert scheduler.running == [short, long] and scheduler.prefilling == []
    # unchunked, the same prompt goes whole in one step (the budget only holds back a second prompt)
    whole = scheduler_mod.Scheduler(kv.PagedKVCache(cfg, num_blocks=32, block_size=4), max_prefill_tokens=10)
    whole.add(make_seq(3, 25))
    prefill, _ = whole.schedule()
    assert prefill[0].num_scheduled == 25 and prefill[0].last_chunk
