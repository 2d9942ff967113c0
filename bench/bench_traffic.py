"""
Requests that arrive over time: why a server batches continuously, pages its cache, caches prefixes
and cuts long prompts into pieces.

bench/bench_serve.py hands the engine every request at once. Real traffic arrives one request at a
time, at random moments, asking for replies of very different lengths. This benchmark replays such
a trace and measures what a user feels. Four tables, all from this run, on this machine:

  1. LATENCY AGAINST LOAD (the vLLM paper's Figure 12, at our size). Requests arrive as a Poisson
     process (exponential gaps) at several rates; their prompt and reply lengths are drawn once
     (mostly short replies, some long) and reused for every rate and every way. Three ways to serve:
        one at a time     first come, first served, a single sequence in the model (Engine(max_running=1))
        static batching   whatever has arrived starts together; nothing joins until the whole batch
                          has finished (a finished row leaves at once here, which flatters it: a real
                          static batch feeds its finished rows padding until the longest is done)
        continuous        the engine: a request joins the very next step, and leaves when it is done
     The three run the same engine code, so what differs is the schedule only. Per rate: the
     NORMALIZED latency (seconds from arrival to the last token, divided by the reply's tokens:
     short and long replies become comparable), mean and p95, and the output tokens per second.
     The chart (runs/bench/traffic_latency.svg) draws the mean against the rate, one line per way.
  2. MEMORY: the same trace's sequences in a fixed KV budget, each reserving the model's whole
     context up front (before paging) against blocks handed out as it grows; the share of the
     reserved slots that never hold a token (waste) of each.
  3. THE PREFIX CACHE: requests that share a long system prompt, arriving one after another; time to
     first token with the cache against without, and the blocks it found.
  4. CHUNKED PREFILL: --decoders sequences decoding while long prompts arrive; the p99 gap between
     two tokens of a running sequence, with each long prompt prefilled whole against in pieces of
     --chunk tokens a step (nano/serve/scheduler.py).

The clock: every step of the engine is timed for real (time.perf_counter), and the trace's clock
moves by exactly that; when nothing is in the engine it jumps to the next arrival. So the numbers
are those of a server that spends its time on the model alone, and a run takes its compute time,
not the trace's idle time. One thread (--threads): the other core is the operating system's.

    python bench/bench_traffic.py                      # tiny, ~3 minutes here
    python bench/bench_traffic.py --preset nano --requests 100
"""

import argparse
import collections
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install
from nano.common.paths import runs_dir  # noqa: E402
from nano.common.plot import line_chart, write_svg  # noqa: E402
from nano.model.gemma import GemmaNano, model_config  # noqa: E402
from nano.serve.engine import Engine  # noqa: E402
from nano.serve.kv_cache import waste_fraction  # noqa: E402
from nano.serve.sequence import SamplingParams  # noqa: E402
from bench_serve import percentile  # noqa: E402
from results import record  # noqa: E402  (bench/results.py: the summary table of make bench)


@dataclass
class Arrival:
    """One request of a trace: when it comes, its prompt, how many tokens its reply has."""

    time: float
    prompt: list[int]
    reply_tokens: int
    # filled in by `replay`: the trace clock at each of its tokens
    token_times: list[float] = field(default_factory=list)


def draw_trace(count: int, rate: float, lengths: list[tuple[list[int], int]], seed: int) -> list[Arrival]:
    """A Poisson process of `count` arrivals per second `rate`: exponential gaps of mean 1 / rate.
    `lengths` (the prompts and reply lengths) are the same for every rate; only the gaps change."""
    rng = random.Random(seed)
    clock, trace = 0.0, []
    for prompt, reply_tokens in lengths[:count]:
        clock += rng.expovariate(rate)
        trace.append(Arrival(clock, prompt, reply_tokens))
    return trace


def draw_lengths(count: int, vocab: int, context_len: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """Prompts of 16-48 tokens; replies mostly short (16-48 tokens, 3 in 4), some long (128-192)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        prompt = [rng.randrange(10, vocab) for _ in range(rng.randint(16, 48))]
        reply = rng.randint(16, 48) if rng.random() < 0.75 else rng.randint(128, 192)
        out.append((prompt, min(reply, context_len - len(prompt))))
    return out


def replay(engine: Engine, trace: list[Arrival], way: str = "continuous", max_batch: int = 64) -> float:
    """Serve `trace` on the trace clock; fills each arrival's token_times. Returns the clock at the end.

    way: "continuous" submits each request when it arrives (an Engine(max_running=1) then serves one
    at a time, first come first served); "static" submits what has arrived only when the engine is
    empty, up to max_batch at once.
    """
    pending = collections.deque(sorted(trace, key=lambda a: a.time))
    active: dict[str, Arrival] = {}
    clock = 0.0
    while pending or engine.scheduler.has_work():
        if way == "continuous" or not engine.scheduler.has_work():
            while pending and pending[0].time <= clock and (way == "continuous" or len(active) < max_batch):
                arrival = pending.popleft()
                request_id = engine.submit(arrival.prompt, SamplingParams(max_tokens=arrival.reply_tokens))
                active[request_id] = arrival
        if not engine.scheduler.has_work():
            clock = max(clock, pending[0].time)  # idle: nothing to compute until the next arrival
            continue
        start = time.perf_counter()
        engine.step()
        clock += time.perf_counter() - start
        for request_id, arrival in list(active.items()):
            request = engine.requests[request_id]
            made = request.sequences[0].num_output
            arrival.token_times += [clock] * (made - len(arrival.token_times))
            if request.num_finished == request.params.n:
                engine.release(request_id)
                del active[request_id]
    return clock


def latency_summary(trace: list[Arrival]) -> dict:
    """Normalized latency (s per output token) mean / p95, and output tokens per second of the run."""
    normalized = sorted((a.token_times[-1] - a.time) / len(a.token_times) for a in trace)
    tokens = sum(len(a.token_times) for a in trace)
    span = max(a.token_times[-1] for a in trace) - min(a.time for a in trace)
    return {"mean": statistics.mean(normalized), "p95": percentile(normalized, 95), "tokens_per_s": tokens / span}


def make_engine(model, max_running: int = 64, **kwargs) -> Engine:
    return Engine(model, None, block_size=16, max_running=max_running, max_waiting=100_000, **kwargs)


# --------------------------------------------------------------------------------------------------
# 1. latency against load


def latency_against_load(model, args) -> dict:
    cfg = model.cfg
    lengths = draw_lengths(args.requests, cfg.vocab_size, cfg.context_len)
    rates = [float(r) for r in args.rates.split(",")]
    ways = {"one at a time": ("continuous", 1), "static batching": ("static", 64), "continuous": ("continuous", 64)}
    results = {way: {} for way in ways}
    print(f"\n1. Latency against load: {args.requests} requests, Poisson arrivals; replies "
          f"{sum(n for _, n in lengths) / len(lengths):.0f} tokens on average (3 in 4 short, 16-48; the rest 128-192)")
    print(f"{'rate (req/s)':>12} | " + " | ".join(f"{w:^31}" for w in ways))
    print(f"{'':>12} | " + " | ".join(f"{'mean ms/tok':>11} {'p95':>7} {'tok/s':>9}" for _ in ways))
    # warm-up: the first steps of each batch shape pay for one-off set-up (allocations, the matmul
    # library's plans); without this the first rate measured would look slower than it is
    replay(make_engine(model), draw_trace(40, max(rates), lengths, seed=9))
    exploded = set()
    for rate in rates:
        cells = []
        for way, (policy, max_running) in ways.items():
            if way in exploded:  # its latency already ran away at a lower rate: higher ones only wait longer
                cells.append(f"{'(queue grows without bound)':>29}")
                continue
            trace = draw_trace(args.requests, rate, lengths, seed=1)
            replay(make_engine(model, max_running), trace, policy)
            summary = latency_summary(trace)
            results[way][rate] = summary
            cells.append(f"{summary['mean'] * 1e3:>11.2f} {summary['p95'] * 1e3:>7.2f} {summary['tokens_per_s']:>9,.0f}")
            if summary["mean"] > args.explode * args.bound_ms / 1e3:
                exploded.add(way)
        print(f"{rate:>12g} | " + " | ".join(cells))
    # the highest rate each way serves with p95 normalized latency under the bound
    print(f"\nHighest rate with p95 normalized latency under {args.bound_ms:g} ms/token:")
    for way in ways:
        ok = [rate for rate, s in results[way].items() if s["p95"] * 1e3 <= args.bound_ms]
        best = max(ok) if ok else None
        print(f"  {way:<16} {best if best is not None else 'none'} req/s")
        record("bench_traffic", f"highest rate with p95 normalized latency <= {args.bound_ms:g} ms/token, "
               f"{args.preset}: {way}", f"{best} req/s" if best is not None else "none of the rates")
    cap = args.explode * args.bound_ms
    series = {way: [(rate, min(s["mean"] * 1e3, cap)) for rate, s in sorted(runs.items())]
              for way, runs in results.items()}
    path = write_svg(runs_dir() / "bench" / "traffic_latency.svg", line_chart(
        series, title=f"{args.preset}: normalized latency against load (mean; above {cap:g} ms/token drawn at {cap:g})",
        xlabel="request rate (requests/s, log scale)", ylabel="ms per output token", log_x=True))
    print(f"chart: {path}")
    return results


# --------------------------------------------------------------------------------------------------
# 2. memory: reserving the whole context against paging


def memory_contrast(model, args) -> None:
    cfg, block_size = model.cfg, 16
    lengths = [len(p) + n for p, n in draw_lengths(4 * args.kv_tokens // 16, cfg.vocab_size, cfg.context_len)]
    budget = args.kv_tokens
    contiguous = budget // cfg.context_len  # each sequence reserves the whole context when it starts
    used, paged = 0, 0  # blocks, in order of arrival, at each sequence's final length (its peak)
    for n in lengths:
        used += math.ceil(n / block_size) * block_size
        if used > budget:
            break
        paged += 1
    waste_contiguous = 1 - statistics.mean(lengths) / cfg.context_len
    waste_paged = waste_fraction(lengths[:paged], block_size)
    print(f"\n2. Memory: a KV budget of {budget:,} token slots, the trace's kind of sequences at their full length "
          f"({statistics.mean(lengths):.0f} tokens on average, context {cfg.context_len})")
    print(f"  reserve the whole context per sequence: {contiguous:>3} sequences fit, {waste_contiguous:.0%} of the "
          f"reserved slots never hold a token")
    print(f"  paged, blocks of {block_size}:                {paged:>3} sequences fit, {waste_paged:.1%} waste "
          f"(only each sequence's last block is partly empty)")
    record("bench_traffic", f"sequences in {budget:,} KV slots, {args.preset}: whole context reserved vs paged",
           f"{contiguous} vs {paged} ({waste_contiguous:.0%} vs {waste_paged:.1%} waste)")


# --------------------------------------------------------------------------------------------------
# 3. the prefix cache


def prefix_cache_ttft(model, args) -> None:
    cfg = model.cfg
    rng = random.Random(2)
    system = [rng.randrange(10, cfg.vocab_size) for _ in range(args.system_tokens)]
    prompts = [system + [rng.randrange(10, cfg.vocab_size) for _ in range(16)] for _ in range(32)]
    print(f"\n3. The prefix cache: 32 requests sharing a {args.system_tokens}-token system prompt (+16 tokens "
          f"each), 16-token replies, arriving at 2 requests/s (one at a time)")
    ttfts = {}
    for caching in (False, True):
        trace = [Arrival(0.5 * i, p, 16) for i, p in enumerate(prompts)]
        engine = make_engine(model, prefix_caching=caching)
        replay(engine, trace)
        ttfts[caching] = statistics.median(a.token_times[0] - a.time for a in trace[1:])  # the first fills the cache
        hits = engine.cache.allocator.hits
        print(f"  prefix cache {'on ' if caching else 'off'}: time to first token p50 {ttfts[caching] * 1e3:6.2f} ms; "
              f"{hits} blocks found in the cache")
    record("bench_traffic", f"TTFT p50 with a shared {args.system_tokens}-token system prompt, {args.preset}: "
           "prefix cache off vs on", f"{ttfts[False] * 1e3:.2f} vs {ttfts[True] * 1e3:.2f} ms "
           f"({ttfts[False] / ttfts[True]:.1f}x)")


# --------------------------------------------------------------------------------------------------
# 4. chunked prefill


def chunked_prefill(model, args) -> None:
    cfg = model.cfg
    rng = random.Random(3)
    long_len = cfg.context_len - 40
    print(f"\n4. Chunked prefill: {args.decoders} sequences decoding 160 tokens each; a {long_len}-token prompt "
          f"arrives every 20 ms of the trace clock")
    rows = {}
    ways = [("whole prompts", dict(chunked_prefill=False, max_prefill_tokens=2048))]
    ways += [(f"pieces of {n}", dict(chunked_prefill=True, max_prefill_tokens=n))
                                      for n in map(int, args.chunks.split(","))]
    for label, kwargs in ways:
        decoders = [Arrival(0.0, [rng.randrange(10, cfg.vocab_size) for _ in range(16)], 160)
                    for _ in range(args.decoders)]
        longs = [Arrival(0.02 * (i + 1), [rng.randrange(10, cfg.vocab_size) for _ in range(long_len)], 8)
                 for i in range(args.long_prompts)]
        engine = make_engine(model, max_running=args.decoders + args.long_prompts, **kwargs)
        clock = replay(engine, decoders + longs)
        gaps = sorted(b - a for d in decoders for a, b in zip(d.token_times, d.token_times[1:]))
        ttft = statistics.mean(a.token_times[0] - a.time for a in longs)
        rows[label] = (percentile(gaps, 50), percentile(gaps, 99), max(gaps), ttft, clock)
        print(f"  {label:<15} gap between two tokens of a running sequence: p50 {rows[label][0] * 1e3:5.2f} ms, "
              f"p99 {rows[label][1] * 1e3:6.2f} ms, max {rows[label][2] * 1e3:6.2f} ms; long prompts' first "
              f"token {ttft * 1e3:6.1f} ms; all done at {clock:.2f} s")
    record("bench_traffic", f"inter-token p99 of {args.decoders} running while long prompts arrive, {args.preset}: "
           + " / ".join(rows), " / ".join(f"{row[1] * 1e3:.1f}" for row in rows.values()) + " ms; all done at "
           + " / ".join(f"{row[4]:.2f}" for row in rows.values()) + " s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--requests", type=int, default=200, help="requests per trace")
    parser.add_argument("--rates", default="2,5,10,20,40,80,160", help="arrival rates to try, requests per second")
    parser.add_argument("--bound_ms", type=float, default=10.0,
                        help="the latency bound: the highest rate whose p95 normalized latency stays under it")
    parser.add_argument("--explode", type=float, default=8.0,
                        help="a way whose mean passes this many bounds is not run at higher rates")
    parser.add_argument("--kv_tokens", type=int, default=8192, help="KV budget of the memory table, token slots")
    parser.add_argument("--system_tokens", type=int, default=160)
    parser.add_argument("--decoders", type=int, default=60)
    parser.add_argument("--long_prompts", type=int, default=4)
    parser.add_argument("--chunks", default="32,64,128", help="prompt tokens per step to try with chunked prefill")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", default="1,2,3,4")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GemmaNano(model_config(args.preset)).eval()
    parts = set(args.parts.split(","))
    print(f"bench_traffic: {args.preset}, {args.threads} thread(s), greedy, a trace clock of real step times")
    if "1" in parts:
        latency_against_load(model, args)
    if "2" in parts:
        memory_contrast(model, args)
    if "3" in parts:
        prefix_cache_ttft(model, args)
    if "4" in parts:
        chunked_prefill(model, args)


if __name__ == "__main__":
    main()
