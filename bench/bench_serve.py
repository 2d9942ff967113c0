"""
Serving throughput: continuous batching over the paged KV cache against one request at a time.

Every request arrives at once: a ~32-token random prompt, greedy, exactly --new_tokens new tokens
(no stop token). Tables, all measured in this run, on this machine, with --threads torch threads:

  1. the engine (nano/serve/engine.py) at 1, 16 and 64 concurrent requests, against the same requests one
     after another through nano/model/generate.py (its rate measured on the first --sequential of them,
     whose tokens must also be equal to the engine's), with time to first token p50 / p95
     (from submission, so it includes queueing and the other prompts' prefills);
  2. the KV cache at the peak of the 64-request run: blocks held against tokens cached (the waste
     is the unused tail of each sequence's last block), and bytes per token, MQA against MHA;
  3. batch 1: ms per token of the plain forward pass (nano/model/gemma.py's layer by layer, as generate
     ran before nano/model/decode_step.py), of generate and of the engine;
  4. NF4 (--quantize) against full precision, in the engine;
  5. HTTP: --clients streaming clients (a separate process, the standard library's http.client)
     against the server (nano/serve/server.py) on a loopback port; their text must equal the engine's.

Models are randomly initialised (speed does not depend on what the weights learned). Times are the
best of --repeats runs, the cases interleaved so a busy neighbour slows them alike.

    .venv/bin/python bench/bench_serve.py                       # tiny and nano (~3 minutes on 2 cores)
    .venv/bin/python bench/bench_serve.py --presets tiny --repeats 3
"""

import argparse
import copy
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install
from nano.model.gemma import GemmaNano, model_config  # noqa: E402
from nano.model.generate import generate  # noqa: E402
from nano.model.nf4 import quantize_model  # noqa: E402
from nano.serve.engine import Engine  # noqa: E402
from nano.serve.kv_cache import memory_table  # noqa: E402
from nano.serve.sequence import SamplingParams  # noqa: E402
from results import record  # noqa: E402  (bench/results.py: the summary table of make bench)

PROMPT_LEN = 32


def random_prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (PROMPT_LEN,), generator=g).tolist() for _ in range(count)]


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """All prompts at once through the engine; tokens/s, TTFT percentiles, outputs, peak KV use."""
    engine.peak_blocks_used = engine.peak_tokens_cached = 0
    params = SamplingParams(max_tokens=new_tokens)
    start, cpu_start = time.perf_counter(), time.thread_time()
    ids = [engine.submit(p, params) for p in prompts]
    while engine.scheduler.has_work():
        engine.step()
    seconds, cpu_seconds = time.perf_counter() - start, time.thread_time() - cpu_start
    requests = [engine.release(i) for i in ids]
    ttft = sorted(r.first_token_time - r.arrival for r in requests)
    tokens = sum(r.completion_tokens for r in requests)
    return {"tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu_seconds, "ttft_p50": percentile(ttft, 50), "ttft_p95": percentile(ttft, 95),
            "outputs": [r.sequences[0].output_ids for r in requests], "peak_blocks": engine.peak_blocks_used,
            "peak_tokens": engine.peak_tokens_cached}


def percentile(sorted_values: list[float], p: float) -> float:
    k = (len(sorted_values) - 1) * p / 100
    low, high = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (k - low)


def run_sequential(model, prompts, new_tokens: int) -> dict:
    """One request after another through nano/model/generate.py: tokens per second (wall and CPU), the outputs."""
    start, cpu_start = time.perf_counter(), time.thread_time()
    outputs = [generate(model, p, new_tokens) for p in prompts]
    tokens = sum(map(len, outputs))
    return {"tokens_per_s": tokens / (time.perf_counter() - start),
            "tokens_per_cpu_s": tokens / (time.thread_time() - cpu_start), "outputs": outputs}


@torch.no_grad()
def plain_ms_per_token(model, prompt, new_tokens: int) -> float:
    """Greedy decoding through nano/model/gemma.py's plain forward pass, as generate ran before nano/model/decode_step.py.

    Under torch.enable_grad() (with every weight frozen, so nothing is recorded) GemmaNano.forward
    keeps its training-time ops: autograd Functions for the norms and RoPE, the layer modules one by one.
    """
    model.requires_grad_(False)
    cache = model.new_kv_cache(1, len(prompt) + new_tokens)
    start, cpu_start = time.perf_counter(), time.thread_time()  # like generate: prefill, then decode steps
    logits, _ = model(torch.tensor([prompt]), kv_cache=cache)
    with torch.enable_grad():
        for _ in range(new_tokens - 1):
            token = logits[:, -1].argmax(-1, keepdim=True)
            logits, _ = model(token, kv_cache=cache)
    return {"tokens_per_s": new_tokens / (time.perf_counter() - start),
            "tokens_per_cpu_s": new_tokens / (time.thread_time() - cpu_start)}


def step_breakdown(engine: Engine, prompts, new_tokens: int) -> None:
    """Where a decode step's time goes, two ways.

    1. One engine run under torch.profiler, its operators grouped by kind. Matrix products grow with
       the batch; most other operators cost about the same on 1 row as on 16. (The profiler adds its
       own overhead to every op: read shares, not times.)
    2. The step split into engine.runner.forward (the forward pass, with the step's block tables
       and cache slots) and the rest of the engine's work (admission, sampling, stop checks,
       streaming each token), at 1 request and at len(prompts): how much of the growth from one
       row to many is the forward pass's, and how much the scheduler's."""
    from torch.profiler import ProfilerActivity, profile  # imported here: only this table needs it

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_engine(engine, prompts, new_tokens)
    kinds = {"matrix products (mm, bmm)": ("aten::mm", "aten::bmm", "aten::addmm"),
             "K/V writes and gathers (index_copy_, index_select)": ("aten::index_copy_", "aten::index_select"),
             "activations (tanh, gelu, softmax, rsqrt)": ("aten::tanh", "aten::gelu", "aten::_softmax", "aten::rsqrt"),
             "argmax over the vocabulary (max)": ("aten::max",)}
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    calls = sum(e.count for e in events)
    print(f"\nWhere an engine step goes, {len(prompts)} requests ({calls / new_tokens:.0f} PyTorch ops per step; "
          f"shares of their self time):\n")
    print("| kind of op | share | ops per step |")
    print("|---|---:|---:|")
    rest, rest_calls = total, calls
    for name, keys in kinds.items():
        chosen = [e for e in events if e.key in keys]
        share, n = sum(e.self_cpu_time_total for e in chosen), sum(e.count for e in chosen)
        rest, rest_calls = rest - share, rest_calls - n
        print(f"| {name} | {share / total:.0%} | {n / new_tokens:.0f} |")
    print(f"| everything else (elementwise arithmetic, views, copies) | {rest / total:.0%} | {rest_calls / new_tokens:.0f} |")

    # the step split in two: engine.runner.forward and the rest (admission, sampling, stop checks,
    # streaming each token), at 1 request and at len(prompts)
    runner_forward, spent = engine.runner.forward, [0.0]

    def timed_forward(spans, **kwargs):
        start = time.perf_counter()
        try:
            return runner_forward(spans, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    engine.runner.forward = timed_forward  # an instance attribute shadows the method for this table only
    print("\n| requests | ms per step | forward pass (runner.forward) | the rest: admission, sampling, streaming |")
    print("|---:|---:|---:|---:|")
    for count in (1, len(prompts)):
        parts = []
        for _ in range(3):  # best of 3
            spent[0] = 0.0
            start = time.perf_counter()
            run_engine(engine, prompts[:count], new_tokens)
            parts.append((time.perf_counter() - start, spent[0]))
        total_s, model_s = min(parts)
        print(f"| {count} | {total_s / new_tokens * 1000:.2f} | {model_s / new_tokens * 1000:.2f} "
              f"| {(total_s - model_s) / new_tokens * 1000:.2f} |")
    del engine.runner.forward


def best(runs: list[dict]) -> dict:
    """The best of repeated runs: the highest rates (a busy neighbour only ever slows a run down)."""
    out = dict(runs[0])
    for key in ("tokens_per_s", "tokens_per_cpu_s"):
        out[key] = max(r[key] for r in runs)
    return out


# --------------------------------------------------------------------------------------------------


def bench_preset(preset: str, args) -> None:
    torch.manual_seed(0)
    model = GemmaNano(model_config(preset)).eval()
    vocab = model.cfg.vocab_size
    prompts = random_prompts(max(args.concurrency), vocab)
    # no prefix caching: the repeats reuse the same prompts, and this measures batching, not caching
    engine = Engine(model, block_size=args.block_size, max_running=max(args.concurrency), prefix_caching=False)
    print(f"\n## {preset}: {model.num_params() / 1e6:.1f}M parameters, {args.new_tokens} new tokens after "
          f"{PROMPT_LEN}-token prompts, greedy, {torch.get_num_threads()} thread(s)\n")

    # 1. continuous batching against one at a time, interleaved: sequential, then each concurrency
    seq_runs, runs = [], {c: [] for c in args.concurrency}
    for _ in range(args.repeats):
        seq_runs.append(run_sequential(model, prompts[:args.sequential], args.new_tokens))
        for c in args.concurrency:
            runs[c].append(run_engine(engine, prompts[:c], args.new_tokens))
    seq = best(seq_runs)
    runs = {c: best(r) for c, r in runs.items()}
    print("| concurrent requests | engine tokens/s (wall) | vs one at a time | tokens per CPU-second | vs one at a time "
          "| TTFT p50 | TTFT p95 | equal to generate |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| 1 at a time (generate) | {seq['tokens_per_s']:.0f} | 1.0x | {seq['tokens_per_cpu_s']:.0f} | 1.0x | | | |")
    for c, r in runs.items():
        same = sum(a == b for a, b in zip(r["outputs"], seq["outputs"]))
        print(f"| {c} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / seq['tokens_per_s']:.1f}x "
              f"| {r['tokens_per_cpu_s']:.0f} | {r['tokens_per_cpu_s'] / seq['tokens_per_cpu_s']:.1f}x "
              f"| {r['ttft_p50'] * 1000:.0f} ms | {r['ttft_p95'] * 1000:.0f} ms | {same}/{min(c, len(seq['outputs']))} |")
        record("bench_serve", f"engine vs generate one at a time, {preset}, {c} requests (per CPU-s; wall)",
               f"{r['tokens_per_cpu_s'] / seq['tokens_per_cpu_s']:.1f}x; {r['tokens_per_s'] / seq['tokens_per_s']:.1f}x")

    if preset == "tiny" and 16 in args.concurrency:
        step_breakdown(engine, prompts[:16], args.new_tokens)

    # 2. memory at the peak of the largest run
    r = runs[max(args.concurrency)]
    slots = r["peak_blocks"] * args.block_size
    waste = 1 - r["peak_tokens"] / slots if slots else 0.0
    print(f"\nKV cache at the peak of {max(args.concurrency)} requests: {r['peak_blocks']} blocks of {args.block_size} = "
          f"{slots} slots for {r['peak_tokens']} cached tokens: {waste:.1%} unused (bound: < 1 block per sequence "
          f"= {max(args.concurrency) * args.block_size / max(slots, 1):.1%})")
    rows = memory_table(model.cfg, args.block_size, budget_bytes=2**30, dtype=torch.bfloat16)
    mqa, mha = rows["this model"], rows["one KV head per query head"]
    print(f"bytes per token (bf16): MQA {mqa['bytes_per_token']} vs one KV head per query head "
          f"{mha['bytes_per_token']} ({mha['bytes_per_token'] // mqa['bytes_per_token']}x); in 1 GiB: "
          f"{mqa['tokens']:,} vs {mha['tokens']:,} tokens")

    # 3. batch 1 and 4. NF4 (the tiny preset, where per-operation overhead is everything)
    if preset == "tiny":
        plain = best([plain_ms_per_token(model, prompts[0], args.new_tokens) for _ in range(args.repeats)])
        one = runs.get(1)
        print("\n| batch 1, 1 thread | ms per token (wall) | speed-up | ms per token (CPU) | speed-up |")
        print("|---|---:|---:|---:|---:|")
        rows = [("plain forward (layer modules, autograd Functions)", plain),
                ("nano/model/generate.py (nano/model/decode_step.py's fast path)", seq)] + ([("engine, one request", one)] if one else [])
        for name, r in rows:
            wall, cpu = 1000 / r["tokens_per_s"], 1000 / r["tokens_per_cpu_s"]
            print(f"| {name} | {wall:.2f} | {1000 / plain['tokens_per_s'] / wall:.2f}x "
                  f"| {cpu:.2f} | {1000 / plain['tokens_per_cpu_s'] / cpu:.2f}x |")
            if r is not plain:
                record("bench_serve", f"batch-1 speed-up over the plain forward, tiny: {name} (CPU; wall)",
                       f"{1000 / plain['tokens_per_cpu_s'] / cpu:.2f}x; {1000 / plain['tokens_per_s'] / wall:.2f}x")

        quantized = quantize_model(copy.deepcopy(model), double_quant=True).eval()
        qengine = Engine(quantized, block_size=args.block_size, max_running=max(args.concurrency), prefix_caching=False)
        print("\n| engine, NF4 vs fp32 | fp32 tokens/s (wall) | NF4 | NF4 / fp32 | fp32 tokens per CPU-s | NF4 | NF4 / fp32 |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for c in (1, 16):
            fp_runs, q4_runs = [], []
            for _ in range(args.repeats):
                fp_runs.append(run_engine(engine, prompts[:c], args.new_tokens))
                q4_runs.append(run_engine(qengine, prompts[:c], args.new_tokens))
            fp, q4 = best(fp_runs), best(q4_runs)
            print(f"| {c} at once | {fp['tokens_per_s']:.0f} | {q4['tokens_per_s']:.0f} | "
                  f"{q4['tokens_per_s'] / fp['tokens_per_s']:.2f}x | {fp['tokens_per_cpu_s']:.0f} | "
                  f"{q4['tokens_per_cpu_s']:.0f} | {q4['tokens_per_cpu_s'] / fp['tokens_per_cpu_s']:.2f}x |")
            record("bench_serve", f"engine NF4 / fp32 tokens/s, tiny, {c} at once (CPU; wall)",
                   f"{q4['tokens_per_cpu_s'] / fp['tokens_per_cpu_s']:.2f}x; {q4['tokens_per_s'] / fp['tokens_per_s']:.2f}x")
        bench_http(model, engine, args)


# --------------------------------------------------------------------------------------------------
# 5. HTTP: the clients run in another process, so they do not share the server's CPU time and GIL


def client_process(port: int, clients: int, new_tokens: int) -> None:
    """(runs in the child) `clients` threads stream one chat completion each; print results as JSON."""
    import http.client

    def one(i: int, out: list) -> None:
        body = {"messages": [{"role": "user", "content": f"Tell me story number {i}."}], "temperature": 0,
                "max_tokens": new_tokens, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        text, first, tokens = "", None, 0
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content") and first is None:
                    first = time.perf_counter() - start
                text += choice["delta"].get("content", "")
        out[i] = {"text": text, "ttft": first, "tokens": tokens, "end": time.perf_counter()}

    results = [None] * clients
    threads = [threading.Thread(target=one, args=(i, results)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"results": results, "seconds": time.perf_counter() - start}))


def bench_http(model, engine: Engine, args) -> None:
    # imported here: only this table needs the tokenizer and the web server
    from nano.text.chat_format import render_prompt
    from nano.checkpoints.loading import load_tokenizer
    from nano.serve.server import STREAM_INTERVAL, ServedModel, ServerThread, create_app

    try:
        tokenizer = load_tokenizer()
    except FileNotFoundError as e:
        print(f"\n(HTTP table skipped: {e})")
        return
    # a model of this preset with the tokenizer's vocabulary, so every sampled id decodes
    torch.manual_seed(0)
    model = GemmaNano(model_config("tiny", vocab_size=tokenizer.vocab_size)).eval()
    engine = Engine(model, tokenizer, block_size=args.block_size, max_running=64).start()
    try:
        messages = [[{"role": "user", "content": f"Tell me story number {i}."}] for i in range(args.clients)]
        prompts = [render_prompt(m, tokenizer) for m in messages]
        params = SamplingParams(max_tokens=args.new_tokens)
        direct_rate, direct_cpu, direct, best_http = 0.0, float("inf"), None, {}
        intervals = sorted({0.0, 0.05, STREAM_INTERVAL})  # every token at once, or gather them between writes
        servers = {iv: ServerThread(create_app({"nano": ServedModel(engine, tokenizer)}, stream_interval=iv))
                   for iv in intervals}
        for server in servers.values():
            server.__enter__()
        try:
            for _ in range(args.repeats):
                # the engine alone (its own thread running; submitted and streamed in this process)
                start, cpu_start = time.perf_counter(), time.process_time()
                ids = [engine.submit(p, params) for p in prompts]
                texts = ["".join(e["text"] for e in engine.stream(i)) for i in ids]
                direct_rate = max(direct_rate, args.clients * args.new_tokens / (time.perf_counter() - start))
                direct_cpu = min(direct_cpu, time.process_time() - cpu_start)
                for i in ids:
                    engine.release(i)
                direct = texts
                # the same requests through HTTP, from another process
                for iv, server in servers.items():
                    cpu_start = time.process_time()  # this process: the engine thread and the request threads
                    out = subprocess.run([sys.executable, __file__, "--client", str(server.port), str(args.clients),
                                          str(args.new_tokens)], capture_output=True, text=True, check=True)
                    run = json.loads(out.stdout)
                    run["cpu"] = time.process_time() - cpu_start
                    run["rate"] = sum(r["tokens"] for r in run["results"]) / run["seconds"]
                    if iv not in best_http or run["rate"] > best_http[iv]["rate"]:
                        best_http[iv] = {**run, "cpu": min(run["cpu"], best_http.get(iv, run)["cpu"])}
        finally:
            for server in servers.values():
                server.__exit__()
    finally:
        engine.shutdown()
    tokens = args.clients * args.new_tokens
    print(f"\n| HTTP, {args.clients} streaming clients | tokens/s (wall) | vs engine | server CPU-s per 1k tokens "
          "| vs engine | TTFT p50 | TTFT p95 | equal to the engine |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| engine alone (same requests) | {direct_rate:.0f} | 100% | {direct_cpu / tokens * 1000:.3f} | 100% | | | |")
    for iv, run in best_http.items():
        results = run["results"]
        same = sum(r["text"] == d for r, d in zip(results, direct))
        ttft = sorted(r["ttft"] for r in results)
        cpu = run["cpu"] / tokens * 1000
        print(f"| through HTTP, {iv * 1000:.0f} ms between writes | {run['rate']:.0f} | {run['rate'] / direct_rate:.0%} "
              f"| {cpu:.3f} | {direct_cpu / run['cpu']:.0%} | {percentile(ttft, 50) * 1000:.0f} ms "
              f"| {percentile(ttft, 95) * 1000:.0f} ms | {same}/{len(results)} |")
        record("bench_serve", f"HTTP / engine throughput, {args.clients} streams, {iv * 1000:.0f} ms between writes "
               "(wall; CPU)", f"{run['rate'] / direct_rate:.0%}; {direct_cpu / run['cpu']:.0%}; outputs equal {same}/{len(results)}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_process(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,nano")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--sequential", type=int, default=4, help="requests timed one at a time through generate")
    parser.add_argument("--clients", type=int, default=32, help="concurrent HTTP streaming clients")
    parser.add_argument("--block_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the other core serves HTTP)")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    torch.set_num_threads(args.threads)
    print(f"# bench_serve: continuous batching vs one request at a time ({args.repeats} repeats, best kept)")
    for preset in args.presets.split(","):
        bench_preset(preset, args)


if __name__ == "__main__":
    main()
