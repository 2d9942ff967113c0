"""
The scheduler: which sequences run in the next step of the engine, and which wait.

A server cannot run every request it holds at once: the KV cache (nano/serve/kv_cache.py) has a fixed
pool of blocks, and every running sequence needs one more slot per step. The scheduler keeps two
queues (Yu et al., "Orca", OSDI 2022; vLLM, SOSP 2023):

    waiting     sequences that arrived (or were preempted), not in the cache; the oldest first
    prefilling  admitted (their blocks are theirs) but their prompt is not all in the cache yet
    running     sequences with their K/V in the paged cache, one token per step; the oldest first

and makes the decisions of a step (`schedule`), before the model runs:

    1. ADMIT waiting sequences, oldest first, while their blocks fit (keeping one free block per
       running sequence, so that admitting does not force a preemption at once) and the step's
       prefill budget of prompt tokens allows. Without chunking, one sequence always goes however
       long, and every admitted prompt is fed whole in this step. With CHUNKED PREFILL
       (`chunked_prefill=True`; Agrawal et al., "Sarathi-Serve", OSDI 2024, as vLLM does it) a long
       prompt is fed in pieces of what is left of the budget, one piece a step, beside the running
       sequences' tokens: no step is ever longer than the budget allows, so a long prompt cannot
       stall the others for its whole prefill. A partly fed prompt goes first in the next step;
    2. RESERVE one slot for every running sequence's next token. When the pool runs dry it PREEMPTS
       the newest sequence: frees its blocks, puts it back at the FRONT of the waiting queue, and
       later recomputes its K/V from its tokens (prompt + what it wrote so far). Recomputing is one
       prefill; the alternative, copying blocks out to CPU memory and back, is more machinery for
       little gain at our sizes.

and after the model ran: 3. FORK the other n - 1 choices of a request off its first one once its
prompt is prefilled (every block shared, copy-on-write; `fork`), and let the admitted whose prompt
is now all in the cache join the running (`join_running`). A finished or cancelled sequence leaves
every queue and gives its blocks back (`remove`).

The scheduler knows blocks and queues, not the model, sampling or threads: the engine
(nano/serve/engine.py) calls it under its lock, runs the model over what it chose, and samples.

    scheduler = Scheduler(cache, max_running=64, max_prefill_tokens=2048)
    scheduler.add(seq)
    prefill, decode = scheduler.schedule()      # feed each of prefill its next `num_scheduled` prompt
                                                # tokens, each of decode its last token

Tests: `.venv/bin/python -m pytest -q tests/test_14_scheduler.py` (and the engine's, which run it).
"""

from __future__ import annotations

import collections

from nano.serve.kv_cache import OutOfBlocks, PagedKVCache
from nano.serve.sequence import SequenceState


class Scheduler:
    """The waiting and running queues over one paged KV cache, and who runs in each step.

    max_running: sequences in the cache at most (the batch). max_prefill_tokens: prompt tokens fed
    per step, which bounds how long one step can stall the running sequences; without
    chunked_prefill a longer prompt still goes whole (alone), with it it is cut into pieces.
    Not thread-safe by itself: the engine holds its lock around every call.
    """

    def __init__(self, cache: PagedKVCache, max_running: int = 64, max_prefill_tokens: int = 2048,
                 chunked_prefill: bool = False):
        self.cache, self.max_running, self.max_prefill_tokens = cache, max_running, max_prefill_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: collections.deque[SequenceState] = collections.deque()
        self.prefilling: list[SequenceState] = []  # admitted, prompt not all computed; oldest first
        self.running: list[SequenceState] = []  # oldest first: the newest is preempted first
        self.preemptions = 0

    def add(self, seq: SequenceState) -> None:
        """A new sequence joins the END of the waiting queue."""
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def num_in_cache(self) -> int:
        """Sequences holding blocks: the running and the partly prefilled."""
        return len(self.running) + len(self.prefilling)

    # ---- before the model runs: who is in this step -------------------------------------------------

    def schedule(self) -> tuple[list[SequenceState], list[SequenceState]]:
        """Admit, then make room for one more token of every running sequence (preempting if needed).

        Returns (prefill, decode): sequences fed `seq.num_scheduled` prompt tokens this step (the
        partly prefilled first, then the newly admitted), and the running, who feed their last
        token. Both empty: nothing to do this step.
        """
        going_on, budget = self.continue_prefills()
        prefill = going_on + self.admit(budget)
        decode = self.reserve_decode_slots(prefill)
        return prefill, decode

    def schedule_chunk(self, seq: SequenceState, budget: int) -> int:
        """Feed `seq` its next prompt tokens this step: all that is left, or (chunked) what the budget
        allows; `seq.last_chunk` says whether that finishes its prompt. Returns the budget left."""
        left = len(seq.tokens) - seq.num_computed
        seq.num_scheduled = min(left, budget) if self.chunked_prefill else left
        seq.last_chunk = seq.num_scheduled == left  # then its last token's logits are sampled this step
        return budget - seq.num_scheduled

    def continue_prefills(self) -> tuple[list[SequenceState], int]:
        """Chunked prefill: the partly fed prompts go on first, oldest first, while the budget lasts.
        Returns them and the budget left for admitting."""
        chosen, budget = [], self.max_prefill_tokens
        for seq in self.prefilling:
            if budget <= 0:
                break
            budget = self.schedule_chunk(seq, budget)
            chosen.append(seq)
        return chosen, budget

    def admit(self, budget: int | None = None) -> list[SequenceState]:
        """Move waiting sequences into the cache, oldest first, while they fit and the budget of prompt
        tokens (default: a whole step's, max_prefill_tokens) lasts."""
        admitted = []
        budget = self.max_prefill_tokens if budget is None else budget
        while self.waiting and self.num_in_cache() < self.max_running:
            seq = self.waiting[0]
            tokens = seq.tokens
            if budget <= 0 or (admitted and not self.chunked_prefill and len(tokens) > budget):
                break  # the prefill budget of this step is spent (unchunked: one sequence always goes)
            # keep one free block per sequence in the cache for its next token, so admitting does not
            # immediately force a preemption
            if not self.cache.can_allocate(tokens, reserve=self.num_in_cache()):
                if self.num_in_cache():
                    break
                if not self.cache.can_allocate(tokens):
                    break  # cannot happen: check_prompt made sure one sequence fits an empty pool
            self.waiting.popleft()
            seq.num_computed = self.cache.allocate(seq.blocks, tokens)  # the prefix cache's hits are computed
            budget = self.schedule_chunk(seq, budget)
            self.prefilling.append(seq)
            admitted.append(seq)
        return admitted

    def reserve_decode_slots(self, prefill: list[SequenceState]) -> list[SequenceState]:
        """One more slot for every running sequence; preempt the newest while the pool is dry.

        `prefill` (this step's prompts) may lose members: the partly prefilled are newer than any running one.
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
                    # the newest first: the partly prefilled (this step's admitted last), then the running from the end
                    victim = self.prefilling[-1] if self.prefilling else self.running[-1]
                    for chosen in (prefill, decode):
                        if victim in chosen:
                            chosen.remove(victim)
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
        for queue in (self.running, self.prefilling):
            if seq in queue:
                queue.remove(seq)
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
        """End of a step: the finished are gone, and this step's prompts that were fed their last
        piece and go on join the END of the running (behind the choices `fork` forked off them during
        this step). A prompt with pieces left stays in `prefilling`."""
        self.running = [s for s in self.running if s.finish_reason is None]
        done = [s for s in prefill if s.last_chunk]
        self.prefilling = [s for s in self.prefilling if s not in done and s.finish_reason is None]
        self.running += [s for s in done if s.finish_reason is None and s not in self.running]

    def remove(self, seq: SequenceState) -> None:
        """A sequence is done (finished or cancelled): out of every queue, its blocks back to the pool."""
        for queue in (self.waiting, self.prefilling, self.running):
            if seq in queue:
                queue.remove(seq)
        self.cache.free(seq.blocks)
