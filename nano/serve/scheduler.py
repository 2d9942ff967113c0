"""
The scheduler: which sequences run in the next step of the engine, and which wait.

A server cannot run every request it holds at once: the KV cache (nano/serve/kv_cache.py) has a fixed
pool of blocks, and every running sequence needs one more slot per step. The scheduler keeps two
queues (Yu et al., "Orca", OSDI 2022; vLLM, SOSP 2023):

    waiting   sequences that arrived (or were preempted), not in the cache; the oldest first
    running   sequences with their K/V in the paged cache, one token per step; the oldest first

and makes the decisions of a step (`schedule`), before the model runs:

    1. ADMIT waiting sequences, oldest first, while their blocks fit (keeping one free block per
       running sequence, so that admitting does not force a preemption at once) and the step's
       prefill budget of prompt tokens allows (one sequence always goes, however long);
    2. RESERVE one slot for every running sequence's next token. When the pool runs dry it PREEMPTS
       the newest sequence: frees its blocks, puts it back at the FRONT of the waiting queue, and
       later recomputes its K/V from its tokens (prompt + what it wrote so far). Recomputing is one
       prefill; the alternative, copying blocks out to CPU memory and back, is more machinery for
       little gain at our sizes.

and after the model ran: 3. FORK the other n - 1 choices of a request off its first one once its
prompt is prefilled (every block shared, copy-on-write; `fork`), and let the admitted join the
running (`join_running`). A finished or cancelled sequence leaves both queues and gives its blocks
back (`remove`).

The scheduler knows blocks and queues, not the model, sampling or threads: the engine
(nano/serve/engine.py) calls it under its lock, runs the model over what it chose, and samples.

    scheduler = Scheduler(cache, max_running=64, max_prefill_tokens=2048)
    scheduler.add(seq)
    prefill, decode = scheduler.schedule()      # feed prefill their prompts, decode their last token

Tests: `.venv/bin/python -m pytest -q tests/test_14_scheduler.py` (and the engine's, which run it).
"""

from __future__ import annotations

import collections

from nano.serve.kv_cache import OutOfBlocks, PagedKVCache
from nano.serve.sequence import SequenceState


class Scheduler:
    """The waiting and running queues over one paged KV cache, and who runs in each step.

    max_running: sequences decoded together at most (the batch). max_prefill_tokens: prompt tokens
    admitted per step (a long prompt still goes alone), which bounds how long one step can stall the
    running sequences. Not thread-safe by itself: the engine holds its lock around every call.
    """

    def __init__(self, cache: PagedKVCache, max_running: int = 64, max_prefill_tokens: int = 2048):
        self.cache, self.max_running, self.max_prefill_tokens = cache, max_running, max_prefill_tokens
        self.waiting: collections.deque[SequenceState] = collections.deque()
        self.running: list[SequenceState] = []  # oldest first: the newest is preempted first
        self.preemptions = 0

    def add(self, seq: SequenceState) -> None:
        """A new sequence joins the END of the waiting queue."""
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- before the model runs: who is in this step -------------------------------------------------

    def schedule(self) -> tuple[list[SequenceState], list[SequenceState]]:
        """Admit, then make room for one more token of every running sequence (preempting if needed).

        Returns (prefill, decode): the newly admitted, who feed every token not yet cached, and the
        running, who feed their last token. Both empty: nothing to do this step.
        """
        prefill = self.admit()
        decode = self.reserve_decode_slots(prefill)
        return prefill, decode

    def admit(self) -> list[SequenceState]:
        """Move waiting sequences into the cache, oldest first, while they fit."""
        admitted, budget = [], self.max_prefill_tokens
        while self.waiting and len(self.running) + len(admitted) < self.max_running:
            seq = self.waiting[0]
            tokens = seq.tokens
            if admitted and len(tokens) > budget:
                break  # the prefill budget of this step is spent (one sequence always goes)
            # keep one free block per running sequence for its next token, so admitting does not
            # immediately force a preemption
            if not self.cache.can_allocate(tokens, reserve=len(self.running) + len(admitted)):
                if self.running or admitted:
                    break
                if not self.cache.can_allocate(tokens):
                    break  # cannot happen: check_prompt made sure one sequence fits an empty pool
            self.waiting.popleft()
            seq.num_computed = self.cache.allocate(seq.blocks, tokens)
            budget -= len(tokens) - seq.num_computed
            admitted.append(seq)
        return admitted

    def reserve_decode_slots(self, prefill: list[SequenceState]) -> list[SequenceState]:
        """One more slot for every running sequence; preempt the newest while the pool is dry.

        `prefill` (this step's admitted) may lose its newest members: they are newer than any running one.
        """
        decode = []
        for seq in list(self.running):
            if seq.finish_reason is not None or seq not in self.running:
                continue  # preempted by an older sequence's need earlier in this loop
            while True:
                try:
                    self.cache.append_slot(seq.blocks)
                    decode.append(seq)
                    break
                except OutOfBlocks:
                    # the newest first: just-admitted prompts, then the running from the end
                    victim = prefill.pop() if prefill else self.running[-1]
                    if victim in decode:
                        decode.remove(victim)
                    self.preempt(victim)
                    if victim is seq:
                        break
        return decode

    def preempt(self, seq: SequenceState) -> None:
        """Free all of seq's blocks and put it first in line; its K/V are recomputed when it returns."""
        self.cache.free(seq.blocks)
        seq.num_computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        if seq in self.running:
            self.running.remove(seq)
        self.waiting.appendleft(seq)

    # ---- after the model ran ---------------------------------------------------------------------------

    def fork(self, parent: SequenceState) -> list[SequenceState]:
        """The parent's prompt is in the cache: its request's other choices share its blocks and run too."""
        children = []
        for seq in parent.request.sequences[1:1 + parent.forks_pending]:
            seq.blocks = self.cache.fork(parent.blocks)
            seq.num_computed = parent.num_computed
            children.append(seq)
        parent.forks_pending = 0
        self.running += children
        return children

    def join_running(self, prefill: list[SequenceState]) -> None:
        """End of a step: the finished are gone, and this step's admitted that go on join the END of the
        running (behind the choices `fork` forked off them during this step)."""
        self.running = [s for s in self.running if s.finish_reason is None]
        self.running += [s for s in prefill if s.finish_reason is None and s not in self.running]

    def remove(self, seq: SequenceState) -> None:
        """A sequence is done (finished or cancelled): out of every queue, its blocks back to the pool."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self.cache.free(seq.blocks)
