"""
Decode speed: tokens per second with the KV cache and without it, fp32 and NF4, for both presets.

Without a cache, step t runs the model over all t tokens so far (O(T^2) work for T tokens); with it,
one prefill pass over the prompt and then ONE token per step (nano/model/generate.py: generate). Both give
the same greedy tokens, which the table checks. NF4 (nano/model/nf4.py) stores the projections in 4 bits
and dequantizes them inside every forward pass: less memory, extra work per step.

Models are randomly initialised (speed does not depend on what the weights learned); every run
writes exactly --new_tokens tokens (no stop token, no repetition stop) after a short random prompt.
The tiny preset's context is 256, too short for 256 new tokens after the prompt, so both presets
run with context_len 512 (the nano preset's own). Times are medians of --repeats runs, cases
interleaved so a busy neighbour slows them alike; the slow cases (no cache, NF4) run fewer times
(--slow_repeats), and NF4 without a cache only for the tiny preset unless --nf4_no_cache says more.

    .venv/bin/python bench/bench_generate.py                  # both presets (~2 minutes on 2 cores)
    .venv/bin/python bench/bench_generate.py --presets tiny --repeats 5
    .venv/bin/python bench/bench_generate.py --threads 2      # decoding one token rarely gains from more
"""

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install
from results import record  # noqa: E402  (bench/results.py: the summary table of make bench)
from nano.model.gemma import GemmaNano, model_config  # noqa: E402
from nano.model.generate import generate  # noqa: E402
from nano.model.nf4 import quantize_model  # noqa: E402

CONTEXT_LEN = 512  # both presets (the tiny preset's own 256 cannot hold prompt + 256 new tokens)


def time_generation(model: torch.nn.Module, prompt: list[int], new_tokens: int, use_cache: bool) -> tuple[float, list[int]]:
    """Seconds to generate exactly `new_tokens` greedy tokens after `prompt`, and the tokens."""
    start = time.perf_counter()
    tokens = generate(model, prompt, max_new_tokens=new_tokens, temperature=0.0, use_cache=use_cache)
    seconds = time.perf_counter() - start
    if len(tokens) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} tokens, got {len(tokens)}")
    return seconds, tokens


def bench_preset(preset: str, args: argparse.Namespace) -> list[dict]:
    """Time fp32 / NF4 x cache / no cache for one preset; one row per weight format."""
    torch.manual_seed(0)
    cfg = model_config(preset, context_len=CONTEXT_LEN, attn_impl="eager")
    fp32 = GemmaNano(cfg).eval()
    models = {"fp32": fp32, "NF4": quantize_model(copy.deepcopy(fp32), double_quant=True).eval()}
    prompt = torch.randint(6, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()

    # how many timed runs each case gets: the cheap one (fp32 with the cache) --repeats, the slow
    # ones --slow_repeats; NF4 without a cache only where asked (it pays the dequantization of every
    # weight at every step either way, so it mostly repeats what the NF4 row with the cache shows)
    runs = {("fp32", True): args.repeats, ("fp32", False): args.slow_repeats, ("NF4", True): args.slow_repeats,
            ("NF4", False): args.slow_repeats if preset in args.nf4_no_cache.split(",") else 0}
    for model in models.values():  # warm-up: the first calls pay for allocations
        generate(model, prompt, max_new_tokens=8, use_cache=True)
        generate(model, prompt, max_new_tokens=4, use_cache=False)
    times: dict[tuple[str, bool], list[float]] = {case: [] for case in runs}
    outputs: dict[tuple[str, bool], list[int]] = {}
    for repeat in range(max(runs.values())):  # cases interleaved, so a busy neighbour slows them alike
        for (weights, use_cache), count in runs.items():
            if repeat < count:
                seconds, outputs[(weights, use_cache)] = time_generation(models[weights], prompt, args.new_tokens, use_cache)
                times[(weights, use_cache)].append(seconds)

    def rate(case: tuple[str, bool]) -> float:
        return args.new_tokens / statistics.median(times[case]) if times[case] else float("nan")

    rows = []
    for weights in models:
        cached, uncached = (weights, True), (weights, False)
        rows.append({
            "preset": preset, "weights": weights, "params": fp32.num_params(), "cache": rate(cached),
            "no_cache": rate(uncached), "vs_fp32": rate(cached) / rate(("fp32", True)),
            # greedy decoding: the cache must not change a single token
            "same": outputs[cached] == outputs[uncached] if uncached in outputs else None,
            "runs": f"{len(times[cached])}/{len(times[uncached])}",
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,nano", help="comma-separated model presets")
    parser.add_argument("--new_tokens", type=int, default=256, help="tokens generated per run")
    parser.add_argument("--prompt_len", type=int, default=16, help="random prompt tokens before them")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of fp32 with the cache (the median is shown)")
    parser.add_argument("--slow_repeats", type=int, default=1, help="timed runs of the slow cases (no cache, NF4)")
    parser.add_argument("--nf4_no_cache", default="tiny", help="presets that also time NF4 without a cache (nano: minutes)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"decode speed, greedy, {args.prompt_len}-token prompt + {args.new_tokens} new tokens, context_len "
          f"{CONTEXT_LEN} for both presets; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{os.cpu_count()} CPU cores, load average {load:.1f} at start")
    rows = []
    for preset in args.presets.split(","):
        start = time.perf_counter()
        rows += bench_preset(preset.strip(), args)
        print(f"  {preset}: measured in {time.perf_counter() - start:.0f} s")

    header = ("| preset | params | weights | KV cache tok/s | no cache tok/s | cache / no cache | vs fp32 (cached) "
              "| same tokens | runs (cache/no cache) |")
    print("\n" + header)
    print("|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|")
    for r in rows:
        measured = r["same"] is not None  # was the no-cache case timed?
        no_cache = f"{r['no_cache']:,.1f}" if measured else "—"
        ratio = f"{r['cache'] / r['no_cache']:.1f}x" if measured else "—"
        same = ("yes" if r["same"] else "NO") if measured else "—"
        print(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['weights']} | {r['cache']:,.1f} | {no_cache} | {ratio} "
              f"| {r['vs_fp32']:.2f}x | {same} | {r['runs']} |")
    print("\ntokens/s = new tokens / wall time of the whole call (prefill of the short prompt included); "
          "— = not timed (see --nf4_no_cache)")
    for r in rows:
        cached = f"{r['cache']:,.1f} tok/s"
        if r["same"] is not None:
            cached += f" with the KV cache vs {r['no_cache']:,.1f} without ({r['cache'] / r['no_cache']:.1f}x)"
        record("bench_generate", f"greedy decode, batch 1, {r['preset']} {r['weights']}", cached)


if __name__ == "__main__":
    main()
