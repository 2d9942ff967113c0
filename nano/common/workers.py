"""
Worker processes for the pure-Python parts of the pipeline: map a function over batches, in order.

BPE is pure Python, and one Python process runs one thread of Python at a time (the GIL), so
using more cores means more processes. Everything in nano that does this (counting pre-tokens
in nano/text/pretokenize.py, `Tokenizer.encode_batch`, encoding the datasets in nano/text/bins.py) goes
through the one function here, `map_batches`, which promises three things:

    1. the object every task needs (a tokenizer with its caches, or the pattern to count with)
       reaches each worker ONCE, through the pool's initializer, instead of with every batch;
    2. results come back in the order the batches went in, with at most 2 batches per worker in
       flight, so memory stays flat however many batches there are;
    3. num_workers <= 1 runs everything in this process: no start-up cost for a small input, and
       a plain traceback when something breaks.

`fn` must be a function defined at the top level of a module (a worker finds it by its name).

    >>> import operator
    >>> list(map_batches(operator.mul, [[1, 2], [3]], 2, num_workers=2))   # fn(shared, batch) per batch
    [[1, 2, 1, 2], [3, 3]]
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from multiprocessing.context import BaseContext
from typing import Any, Callable, Iterable, Iterator

BATCHES_IN_FLIGHT_PER_WORKER = 2  # one being worked on, one waiting: no worker idles, memory stays flat


def pool_context() -> BaseContext:
    """fork where the OS has it (Linux): workers start at once and inherit what they need (the
    tokenizer and its caches) instead of unpickling it; elsewhere the platform default (spawn),
    which works too, only slower to start."""
    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()


# the worker-process side: each worker keeps its own copy of the shared object
_shared: Any = None


def _init_worker(shared: Any) -> None:
    """Runs once in each new worker, before its first task."""
    global _shared
    _shared = shared


def _run(fn: Callable[[Any, Any], Any], batch: Any) -> Any:
    return fn(_shared, batch)


def map_batches(fn: Callable[[Any, Any], Any], batches: Iterable[Any], shared: Any, num_workers: int) -> Iterator[Any]:
    """Yield fn(shared, batch) for each batch, in input order, computed by `num_workers` processes.

    `batches` may be a generator: it is read only as fast as the workers keep up.
    """
    if num_workers <= 1:
        for batch in batches:
            yield fn(shared, batch)
        return
    with pool_context().Pool(num_workers, initializer=_init_worker, initargs=(shared,)) as pool:
        in_flight: deque = deque()
        for batch in batches:
            in_flight.append(pool.apply_async(_run, (fn, batch)))
            if len(in_flight) >= BATCHES_IN_FLIGHT_PER_WORKER * num_workers:
                yield in_flight.popleft().get()  # the oldest first: results keep the input order
        while in_flight:
            yield in_flight.popleft().get()
