"""
Continuous batching: many requests share every step of the model, each joining and leaving at will.

`generate_batch` (lesson 13) runs a fixed batch until its LAST row is done, while finished rows are fed
padding and new requests wait for the whole batch. A server instead keeps two queues (Yu et al.,
"Orca", OSDI 2022; vLLM, SOSP 2023):

    waiting   requests that arrived, not yet in the cache
    running   sequences with their K/V in the paged cache (nano/serve/kv_cache.py), one token per step

and every step (`Engine.step`), the scheduler (nano/serve/scheduler.py) first
    1. admits waiting sequences, oldest first, while their blocks fit (and a prefill budget allows),
    2. gives every running sequence room for one more token; when the pool runs dry it PREEMPTS the
       newest sequence (frees its blocks, puts it back at the FRONT of the waiting queue, and later
       recomputes its K/V from its tokens: recomputing is cheaper than copying caches around),
then this module's loop
    3. runs ONE model call over all of it: the new prompts' tokens and one token of each running
       sequence, flattened into a single row of N tokens. Every matmul (the projections, the MLP)
       sees all N tokens at once, which is where batching pays; only attention is per sequence, and it
       reads each one's keys and values through its block table (nano/serve/model_runner.py). One call rather than
       a prefill call and a decode call: at our sizes the cost of a step is mostly per-operation
       overhead, so fewer, bigger operations win,
    4. samples one token per sequence with its own parameters and random generator, checks its stop
       tokens, stop strings and limits (the stop rule `generate` uses: nano/model/generate.py:
       stop_reason), streams the new text, and frees the blocks of the finished.

What a request and its sequences carry is in nano/serve/sequence.py.

A finished sequence leaves at once and a new one takes its place in the next step: the batch stays
full. Greedy outputs are the same tokens as `nano/model/generate.py: generate` one request at a time
(the tests check it; rounding in a bigger matmul could in principle flip an exact tie).

    engine = Engine(model, tokenizer)
    outputs = engine.generate([prompt_a, prompt_b], SamplingParams(max_tokens=64))    # synchronous
    engine.start()                                        # or: a background thread for a web server
    request_id = engine.submit(prompt_ids, SamplingParams(temperature=0.8, seed=1))
    for event in engine.stream(request_id): print(event["text"], end="")

Tests: `.venv/bin/python -m pytest -q tests/test_14_engine.py`. Lesson: lessons/14_serve.md.
"""

from __future__ import annotations

import collections
import itertools
import os
import queue
import threading
import time
from typing import Iterator, Sequence

import torch

from nano.model.gemma import kv_cache_bytes_per_token
from nano.model.attention import soft_cap
from nano.model.generate import StreamDecoder, greedy_capped, sample_next, stop_reason
from nano.serve.compiled_decode import PaddedDecode
from nano.serve.kv_cache import PagedKVCache, SequenceBlocks
from nano.serve.model_runner import ModelRunner
from nano.serve.scheduler import Scheduler
from nano.serve.sequence import Request, SamplingParams, SequenceState


class QueueFull(RuntimeError):
    """Too many requests are waiting: the server answers 429 (try again later)."""


# Why a reply stopped (nano/model/generate.py: stop_reason) -> OpenAI's finish_reason. "stop": the reply
# ended as the request asked (a stop token; a loop, with repetition_stop); "length": a limit cut it.
FINISH_REASON = {"stop_token": "stop", "repetition": "stop", "should_stop": "stop",
                 "max_new_tokens": "length", "max_length": "length"}


# --------------------------------------------------------------------------------------------------
# The engine: the loop around the scheduler, the model runner, sampling and streaming


def default_num_blocks(cfg, block_size: int, max_running: int, budget_bytes: int, bytes_per_token: int) -> int:
    """Enough blocks for `max_running` full contexts, but no more than `budget_bytes` of K/V."""
    wanted = max_running * -(-cfg.context_len // block_size)
    affordable = budget_bytes // (bytes_per_token * block_size)
    return max(-(-cfg.context_len // block_size), min(wanted, affordable))


class Engine:
    """Continuous batching over a paged KV cache, safe to call from many threads.

    max_running: sequences decoded together at most (the batch). max_waiting: requests queued at most
    (more raise QueueFull). max_prefill_tokens: prompt tokens fed per step, which bounds how long one
    step can stall the running sequences; a longer prompt goes whole (alone) or, with chunked_prefill,
    in pieces over several steps (nano/serve/scheduler.py). The defaults, pieces of 128, are measured
    (bench/bench_traffic.py, `tiny`, 60 sequences decoding while 216-token prompts arrive): the p99
    gap between two tokens of a running sequence about half that with whole prompts (1.9x and 2.6x
    shorter in two runs), for a later first token of the long prompts (lessons/14_serve.md, section 9).
    compile_decode: steps that only decode, up to 16 sequences, go through torch.compile, padded to a
    few fixed shapes (nano/serve/compiled_decode.py): seconds of compiling per shape on first use,
    then 1.9-3x the tokens/s at one sequence here (lessons/14_serve.md, section 11).
    """

    def __init__(self, model: torch.nn.Module, tokenizer=None, num_blocks: int | None = None, block_size: int = 16,
                 max_running: int = 64, max_waiting: int = 256, max_prefill_tokens: int = 128,
                 kv_budget_bytes: int = 256 * 2**20, prefix_caching: bool = True, chunked_prefill: bool = True,
                 model_name: str = "nano", compile_decode: bool = False):
        model.eval()
        self.model, self.tokenizer, self.cfg, self.model_name = model, tokenizer, model.cfg, model_name
        device = next(model.parameters()).device
        dtype = model.embed_tokens.weight.dtype
        bytes_per_token = kv_cache_bytes_per_token(self.cfg, dtype)
        if num_blocks is None:
            num_blocks = default_num_blocks(self.cfg, block_size, max_running, kv_budget_bytes, bytes_per_token)
        self.cache = PagedKVCache(self.cfg, num_blocks, block_size, device=device, dtype=dtype,
                                  prefix_caching=prefix_caching)
        self.runner = ModelRunner(model, self.cache)
        if compile_decode:  # decode-only steps padded to a few shapes and compiled, each on first use
            self.runner.padded_decode = PaddedDecode(self.runner, compile=True)
        self.scheduler = Scheduler(self.cache, max_running, max_prefill_tokens, chunked_prefill)
        self.max_waiting = max_waiting
        self.requests: dict[str, Request] = {}
        self.lock = threading.RLock()
        self.work = threading.Condition(self.lock)  # notified when work arrives (the loop sleeps without)
        self.stepping = threading.Lock()  # one step at a time (the loop's, or a caller's of step/generate)
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # statistics for /stats and the benchmark
        self.steps = self.total_generated = 0
        self.recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) of recent steps
        self.peak_blocks_used = 0
        self.peak_tokens_cached = 0

    # the scheduler's queues and counts, read where the engine's were (the tests, /stats, the benchmark)
    @property
    def waiting(self) -> collections.deque[SequenceState]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[SequenceState]:
        return self.scheduler.running

    @property
    def preemptions(self) -> int:
        return self.scheduler.preemptions

    # ---- submitting, streaming, cancelling (any thread) -------------------------------------------

    def check_prompt(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ValueError for what the engine cannot run (the server turns it into a 400 first)."""
        if len(prompt_ids) == 0:
            raise ValueError("the prompt is empty: it needs at least one token (e.g. <bos>)")
        if len(prompt_ids) >= self.cfg.context_len:
            raise ValueError(f"the prompt is {len(prompt_ids)} tokens; the model's context holds "
                             f"{self.cfg.context_len}, and at least one must be left for the reply — shorten it")
        if params.max_tokens < 1 or params.n < 1:
            raise ValueError("max_tokens and n must be at least 1")
        longest = min(self.cfg.context_len, len(prompt_ids) + params.max_tokens)
        if self.cache.blocks_needed(longest) > self.cache.num_blocks:
            raise ValueError(f"one sequence of {longest} tokens needs more KV blocks than the pool's "
                             f"{self.cache.num_blocks}: give the engine more blocks")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: Engine(model, tokenizer)")

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
               request_id: str | None = None) -> str:
        """Queue a request; returns its id. Raises ValueError (bad request) or QueueFull."""
        params = params or SamplingParams()
        prompt_ids = [int(t) for t in prompt_ids]
        self.check_prompt(prompt_ids, params)
        with self.lock:
            if len(self.waiting) + params.n > self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} sequences are already waiting (limit {self.max_waiting})")
            request_id = request_id or f"req-{next(self._ids)}"
            request = Request(request_id, prompt_ids, params, arrival=time.perf_counter())
            for index in range(params.n):
                seed = None if params.seed is None else params.seed + index
                generator = None
                if params.temperature > 0:  # each choice its own stream: no sharing between requests
                    generator = torch.Generator(device=self.runner.device)
                    generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(7), "little"))
                decoder = StreamDecoder(self.tokenizer) if self.tokenizer is not None else None
                request.sequences.append(SequenceState(next(self._ids), request, index, list(prompt_ids), generator,
                                                       decoder))
            # choice 0 is prefilled; the others fork off it (sharing its blocks) once that is done
            request.sequences[0].forks_pending = params.n - 1
            self.scheduler.add(request.sequences[0])
            self.requests[request_id] = request
            self.work.notify_all()
        return request_id

    def stream(self, request_id: str, timeout: float | None = None) -> Iterator[dict]:
        """Yield the request's events until every choice has finished.

        Each event: {"index": choice, "text": new text, "token_ids": new ids, "finish_reason": None or
        "stop" / "length" / "cancelled"}. Needs the engine running (`start()`) or another thread stepping.
        """
        for batch in self.stream_batches(request_id, timeout):
            yield from batch

    def stream_batches(self, request_id: str, timeout: float | None = None) -> Iterator[list[dict]]:
        """`stream`, but every event that is waiting comes at once: a web server then writes one
        network chunk for several tokens when it falls behind, instead of one write per token."""
        request = self.requests[request_id]
        finished = 0
        while finished < request.params.n:
            batch = [request.events.get(timeout=timeout)]  # wait for the next one ...
            while True:  # ... and take whatever else is already there
                try:
                    batch.append(request.events.get_nowait())
                except queue.Empty:
                    break
            finished += sum(event["finish_reason"] is not None for event in batch)
            yield batch

    def cancel(self, request_id: str) -> None:
        """Stop a request now: its sequences leave the queues and their blocks go back to the pool."""
        with self.lock:
            request = self.requests.get(request_id)
            if request is None:
                return
            for seq in request.sequences:
                if seq.finish_reason is None:
                    self._finish(seq, "cancelled")
            self.work.notify_all()

    def release(self, request_id: str) -> Request | None:
        """Forget a finished request (the server calls it once the reply is sent)."""
        with self.lock:
            return self.requests.pop(request_id, None)

    # ---- the background loop -----------------------------------------------------------------------

    def start(self) -> "Engine":
        """Run `step` in a background thread whenever there is work (for the web server)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="nano-engine", daemon=True)
            self._thread.start()
        return self

    def is_alive(self) -> bool:
        """Is the background loop running? (The server answers 503 when it is not.)"""
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self) -> None:
        with self.lock:
            self._stopping = True
            self.work.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not (self.scheduler.has_work() or self._stopping):
                    self.work.wait()
                if self._stopping:
                    return
            self.step()  # (it takes the lock itself, and lets go of it while the model runs)

    # ---- synchronous use -----------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[dict]:
        """Run these prompts to completion in this thread (all submitted at once); one dict each:
        {"token_ids", "text", "finish_reason"} (lists of n for n > 1: "choices")."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        ids = [self.submit(p, sp) for p, sp in zip(prompts, params)]
        while any(self.requests[i].num_finished < self.requests[i].params.n for i in ids):
            self.step()
        results = []
        for i in ids:
            request = self.release(i)
            choices = [{"token_ids": s.output_ids, "text": s.text, "finish_reason": s.finish_reason}
                       for s in request.sequences]
            results.append(choices[0] if len(choices) == 1 else {"choices": choices})
        return results

    # ---- one step ------------------------------------------------------------------------------------

    @torch.inference_mode()  # torch.no_grad, minus the bookkeeping gradients would need: ~15% faster per step
    def step(self) -> int:
        """Schedule (admit, make room, preempting if needed), run the model once, sample; returns tokens made.

        The lock is held while the queues change, not while the model runs: during the forward pass
        other threads can submit, cancel and read /stats (a step of a big model takes long, and a lock
        taken back at once by this thread, step after step, would starve them). A sequence cancelled
        meanwhile is skipped afterwards; its blocks were given back, and only this thread hands blocks
        out, so the K/V written into them harm no one.
        """
        with self.stepping:
            return self._step()

    def _step(self) -> int:
        with self.lock:
            prefill, decode = self.scheduler.schedule()
            if not prefill and not decode:
                return 0
            # prompts feed their next piece (all that is not cached, unless chunked); the running their last token.
            # The block tables are copied: a cancel during the forward pass empties the sequence's own.
            spans = [(SequenceBlocks(list(s.blocks.block_table)), s.tokens[s.num_computed:s.num_computed + s.num_scheduled],
                      s.num_computed) for s in prefill]
            spans += [(SequenceBlocks(list(s.blocks.block_table)), s.tokens[-1:], len(s.tokens) - 1) for s in decode]
        logits = self.runner.forward(spans, soft_capped=False)  # (S, V), raw: capped in _sample_and_update
        with self.lock:
            for seq in prefill:  # a piece that leaves some of its prompt for later steps samples nothing
                if not seq.last_chunk and seq.finish_reason is None:
                    seq.num_computed += seq.num_scheduled
                    self.cache.commit(seq.blocks, seq.tokens[:seq.num_computed])  # its full blocks can be hits
            # a token for every decode row and every prompt fed its last piece, unless cancelled meanwhile
            sampled = [(row, s) for row, s in enumerate(prefill + decode)
                       if s.finish_reason is None and (row >= len(prefill) or s.last_chunk)]
            made = self._sample_and_update(sampled, logits)
            self.scheduler.join_running(prefill)
            self._record(made)
            return made

    def _sample_and_update(self, rows: list[tuple[int, SequenceState]], logits: torch.Tensor) -> int:
        """One new token for each (row of raw logits, sequence); returns how many were made.

        The model's logits are soft-capped (30 tanh(x / 30)). With 8 or more rows all greedy, the cap
        is applied to each row's few largest logits only (`greedy_capped`: the same tokens, a
        fraction of the time); otherwise every logit is capped once, and the greedy rows take the
        argmax of that (max(...).indices: the first of equal maxima, faster than argmax on a CPU).
        """
        made = 0
        cap = self.cfg.final_softcap
        if len(rows) >= 8 and all(s.request.params.temperature <= 0 for _, s in rows):
            greedy = greedy_capped(logits, cap).tolist()
        else:
            logits = soft_cap(logits, cap)
            greedy = logits.max(dim=-1).indices.tolist()
        now = time.perf_counter()
        for row, seq in rows:
            seq.num_computed = len(seq.tokens)
            self.cache.commit(seq.blocks, seq.tokens)  # full blocks join the prefix cache
            # n > 1: the other choices share this prompt's blocks (copy-on-write) and logits
            children = self.scheduler.fork(seq) if seq.forks_pending else []
            for s in [seq] + children:
                p = s.request.params
                if p.temperature > 0:
                    token = int(sample_next(logits[row:row + 1], p.temperature, p.top_k or None,
                                            p.top_p if p.top_p < 1.0 else None, s.generator)[0])
                else:
                    token = greedy[row]
                self._append(s, token, now)
                made += 1
        return made

    def _append(self, seq: SequenceState, token: int, now: float) -> None:
        """Add a sampled token: stream its text, and finish the sequence if it is done."""
        request, p = seq.request, seq.request.params
        if request.first_token_time is None:
            request.first_token_time = now
        seq.tokens.append(token)
        self.total_generated += 1
        # generate's stop rule, measured on this sequence's own tokens (prompt + reply)
        why = stop_reason(seq.tokens, len(seq.tokens), self.cfg.context_len, p.max_tokens, p.stop_token_ids,
                          p.repetition_stop, reply_start=seq.prompt_len)
        reason, stop_string_hit = None, False
        if why == "stop_token":
            reason = "stop"  # kept as the last id (as generate does), never turned into text
        elif seq.decoder is not None:
            new_text = seq.decoder.feed(token)  # "" while a character is still half-received
            # a stop string may straddle tokens: search from just before the new text
            search_from = max(0, len(seq.text) - request.longest_stop)
            seq.text += new_text
            hits = [i for i in (seq.text.find(stop, search_from) for stop in p.stop) if i >= 0]
            if hits:
                seq.text, reason, stop_string_hit = seq.text[:min(hits)], "stop", True
        if reason is None and why is not None:  # a stop string, if any, came first
            reason = FINISH_REASON[why]
        if reason is not None:
            self._finish(seq, reason, flush=not stop_string_hit)
        else:
            # hold back what could still turn out to be the start of a stop string
            holdback = max(request.longest_stop - 1, 0)
            self._emit(seq, len(seq.text) - holdback, [token])

    def _emit(self, seq: SequenceState, upto: int, token_ids: list[int], finish_reason: str | None = None) -> None:
        text = seq.text[seq.num_sent:max(seq.num_sent, upto)]
        seq.num_sent += len(text)
        seq.request.events.put({"index": seq.index, "text": text, "token_ids": token_ids,
                                "finish_reason": finish_reason})

    def _finish(self, seq: SequenceState, reason: str, flush: bool = True) -> None:
        """End a sequence: last text out, blocks back to the pool, out of every queue."""
        if seq.decoder is not None and flush and reason != "cancelled":
            seq.text += seq.decoder.flush()  # bytes of a character cut off by the end
        seq.finish_reason = reason
        self.scheduler.remove(seq)  # out of the queues, blocks back to the pool
        request = seq.request
        if seq.forks_pending:  # cancelled before its prefill: the choices never forked finish too
            for child in request.sequences[1:1 + seq.forks_pending]:
                child.finish_reason = reason
                request.num_finished += 1
                self._emit(child, 0, [], reason)
            seq.forks_pending = 0
        request.num_finished += 1
        if request.num_finished == request.params.n:
            request.finish_time = time.perf_counter()
        last = [seq.tokens[-1]] if seq.num_output and reason != "cancelled" else []
        self._emit(seq, len(seq.text), last, reason)

    # ---- statistics -------------------------------------------------------------------------------------

    def _record(self, made: int) -> None:
        now = time.perf_counter()
        self.steps += 1
        self.recent.append((now, made))
        while self.recent and now - self.recent[0][0] > 5.0:  # a 5-second window
            self.recent.popleft()
        used = self.cache.allocator.num_used
        if used > self.peak_blocks_used:
            self.peak_blocks_used = used
            self.peak_tokens_cached = sum(s.blocks.num_tokens for s in self.running)

    def tokens_per_second(self) -> float:
        with self.lock:
            if len(self.recent) < 2:
                return 0.0
            span = self.recent[-1][0] - self.recent[0][0]
            return sum(n for _, n in list(self.recent)[1:]) / span if span > 0 else 0.0

    def stats(self) -> dict:
        """Queues, the KV pool and speed, as /stats reports them (block_owners drives the chat page)."""
        with self.lock:
            allocator = self.cache.allocator
            owners = ["free"] * self.cache.num_blocks
            for block in allocator.free_list:
                if block in allocator.hash_of_block:
                    owners[block] = "cached"
            in_cache = self.running + self.scheduler.prefilling
            for seq in in_cache:
                for block in seq.blocks.block_table:
                    owners[block] = "shared" if allocator.ref_counts[block] > 1 else seq.seq_id
            if self.runner.padded_decode is not None:  # the padding rows' block (nano/serve/compiled_decode.py)
                owners[self.runner.padded_decode.scratch_block] = "scratch"
            tokens_cached = sum(s.blocks.num_tokens for s in in_cache)
            used = allocator.num_used
            return {
                "running": len(in_cache),
                "waiting": len(self.waiting),
                "kv_blocks_total": self.cache.num_blocks,
                "kv_blocks_used": used,
                "kv_blocks_free": allocator.num_free,
                "kv_blocks_cached": allocator.num_cached,
                "block_size": self.cache.block_size,
                "kv_bytes_per_token": self.cache.bytes_per_token(),
                "tokens_cached": tokens_cached,
                "prefix_cache_hit_rate": allocator.hit_rate(),
                "tokens_per_second": self.tokens_per_second(),
                "total_generated_tokens": self.total_generated,
                "steps": self.steps,
                "preemptions": self.preemptions,
                "block_owners": owners,
            }
