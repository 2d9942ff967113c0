"""
What a request asks for, and the sequences that carry it: the things the scheduler moves between queues.

A client's request is one prompt and its settings (`SamplingParams`: temperature, top-p, stop
strings, max_tokens, n ...). The engine writes `n` replies to it, and each reply is a *sequence*
(`SequenceState`): the prompt's tokens followed by the tokens sampled so far, the KV blocks that hold
their keys and values (nano/serve/kv_cache.py: SequenceBlocks), its own random generator, and how far
its text has been streamed. The scheduler (nano/serve/scheduler.py) moves sequences, not requests,
between its queues: the choices of one request may run, be preempted and finish independently.

    request = Request("req-0", prompt_ids, SamplingParams(max_tokens=64, n=2), arrival=time.perf_counter())
    seq = SequenceState(seq_id=0, request=request, index=0, tokens=list(prompt_ids), generator=None, decoder=None)

The engine (nano/serve/engine.py) makes these in `submit`; nothing here runs the model.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field

import torch

from nano.model.generate import StreamDecoder
from nano.serve.kv_cache import SequenceBlocks


@dataclass
class SamplingParams:
    """Per-request generation settings (the OpenAI names where there is one)."""

    max_tokens: int = 128  # new tokens at most; the context length also ends a reply ("length")
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off (not part of the OpenAI API; the chat CLI's knob)
    stop: tuple[str, ...] = ()  # stop strings: the reply ends before the first one (not returned)
    stop_token_ids: tuple[int, ...] = ()  # ids that end the reply (kept as the last id, as in generate)
    seed: int | None = None  # sampled replies repeat with the same seed (choice i uses seed + i)
    n: int = 1  # independent replies to the same prompt (they share the prompt's blocks: a fork)
    repetition_stop: int = 0  # end a reply whose last N tokens loop ("stop"; generate.py's is_looping); 0 = off


@dataclass(eq=False)  # footgun: the default __eq__ compares every field; `seq in queue` must mean "this one"
class SequenceState:
    """One reply being written: its tokens, its blocks, and where its text has got to."""

    seq_id: int
    request: "Request"
    index: int  # which of the request's n choices
    tokens: list[int]  # the prompt, then every token sampled so far (one list: no copies per step)
    generator: torch.Generator | None
    decoder: StreamDecoder | None
    prompt_len: int = 0
    blocks: SequenceBlocks = field(default_factory=SequenceBlocks)
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    num_scheduled: int = 0  # prompt tokens fed in this step (set by the scheduler; chunked prefill: a piece)
    last_chunk: bool = False  # does this step's piece finish the prompt? (then the step samples a token)
    text: str = ""  # decoded reply so far (stop strings cut it)
    num_sent: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None  # "stop", "length", "cancelled"
    forks_pending: int = 0  # choices 1..n-1 still to be forked off this one after its prefill
    preemptions: int = 0

    def __post_init__(self) -> None:
        self.prompt_len = len(self.tokens)

    @property
    def output_ids(self) -> list[int]:
        """The reply's tokens so far (a copy)."""
        return self.tokens[self.prompt_len:]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass(eq=False)
class Request:
    """What `submit` made: the n sequences of one prompt, and the queue their events go to."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    # SimpleQueue: thread-safe like queue.Queue, several times cheaper per put (one per token)
    events: "queue.SimpleQueue[dict]" = field(default_factory=queue.SimpleQueue)
    sequences: list[SequenceState] = field(default_factory=list)
    first_token_time: float | None = None
    finish_time: float | None = None
    num_finished: int = 0

    @property
    def longest_stop(self) -> int:
        return max((len(s) for s in self.params.stop), default=0)

    @property
    def completion_tokens(self) -> int:
        return sum(s.num_output for s in self.sequences)
