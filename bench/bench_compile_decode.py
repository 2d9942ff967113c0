"""
Compiling the decode step: what torch.compile buys a batch-1 token on a CPU, and what it costs.

A tiny model's decode step is ~300 small PyTorch operations (nano/model/decode_step.py), each paying
a few microseconds of Python and dispatch: that, not arithmetic, is where a batch-1 token goes
(lesson 14, sections 10 and 11). torch.compile's CPU backend (Inductor) traces a function once and
writes it as a few C++ loops, fusing each run of elementwise operations (a norm's seven, RoPE's
three, the soft-cap's three) into one pass. What it needs from the function is that every call looks
the same to it:

    - the same shapes: our decode step attends over keys[:, :, :pos + 1], a shape that grows every
      step, so every step would be a new graph (or a symbolic one with graph breaks). Here the step
      attends over the WHOLE cache, always max_len keys, and an additive bias hides those past the
      position (and outside the window): the same numbers up to float rounding, a fixed shape;
    - no Python number read out of a tensor: InferenceModel.rope checks the table's length with
      int(positions.max()); here the table is made once, for every position of the cache;
    - the position as a tensor, not a Python int (an int is a constant to the tracer: one graph per
      position).

`FixedShapeStep` is that step, on InferenceModel's own weights and formulas. The script times, for
each preset, one request (random weights, --prompt_len tokens, --new_tokens greedy tokens):
our `generate`, the fixed-shape step run eagerly, and the same step compiled (mode "default",
Inductor's C++ wrapper on, which calls its kernels without Python in between); how long the
compiler took, how many tokens it takes to win that time back, and whether the greedy tokens equal
generate's.

    .venv/bin/python bench/bench_compile_decode.py                    # tiny and nano, ~2 minutes here
    .venv/bin/python bench/bench_compile_decode.py --presets tiny --repeats 5

It needs a C++ compiler (Inductor writes C++ and builds it); without one it says so.
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install
from results import record  # noqa: E402  (bench/results.py: the summary table of make bench)
from nano.model.decode_step import InferenceModel, decode_attention, hidden_to_bias  # noqa: E402
from nano.model.gemma import GemmaNano, model_config  # noqa: E402
from nano.model.generate import generate  # noqa: E402


class FixedShapeStep(InferenceModel):
    """InferenceModel's one-token step over a KVCache of max_len positions, in a shape that never changes.

        step = FixedShapeStep(model, max_len)
        logits = step(ids (B,), pos (1,) long, kv_cache.keys, kv_cache.values)     # (B, vocab)

    keys[layer] / values[layer] are (B, Hkv, max_len, D); the new token's key and value are written at
    `pos` (index_copy_: a tensor index, not a Python int), then every layer attends over all max_len
    keys, those after `pos` (and before the window) hidden by decode_attention's additive bias.
    """

    def __init__(self, model: torch.nn.Module, max_len: int):
        super().__init__(model, full_rope_table=True)  # RoPE for every position, made now: no length check
        self.key_positions = torch.arange(max_len)  # (L,)

    def __call__(self, ids, pos, keys, values) -> torch.Tensor:
        j = self.key_positions
        biases = {}  # window -> (L,) bias, shared by the layers with that window
        for w in self.layers:
            hidden = j > pos
            if w["window"] > 0:
                hidden = hidden | (j <= pos - w["window"])
            biases[w["window"]] = hidden_to_bias(hidden)

        def attend(layer: int, q, k, v):
            w = self.layers[layer]
            keys[layer].index_copy_(2, pos, k[:, :, None])  # (B, Hkv, 1, D) into position pos
            values[layer].index_copy_(2, pos, v[:, :, None])
            return decode_attention(q, keys[layer], values[layer], w["scale"], self.cfg.attn_softcap, biases[w["window"]])

        return self.logits(self.forward(ids, pos.expand(ids.shape[0]), attend))


@torch.inference_mode()
def generate_with_step(model, step, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding, batch 1: the model's own prefill into a KVCache, then `step` one token at a time."""
    kv_cache = model.new_kv_cache(1, len(prompt) + new_tokens)
    logits, _ = model(torch.tensor([prompt]), kv_cache=kv_cache)
    tokens = [int(logits[0, -1].argmax())]
    for pos in range(len(prompt), len(prompt) + new_tokens - 1):
        logits = step(torch.tensor([tokens[-1]]), torch.tensor([pos]), kv_cache.keys, kv_cache.values)
        tokens.append(int(logits[0].argmax()))
    return tokens


def bench_preset(preset: str, args) -> dict:
    torch.manual_seed(0)
    model = GemmaNano(model_config(preset)).eval()
    prompt = torch.randint(6, model.cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    max_len = args.prompt_len + args.new_tokens
    step = FixedShapeStep(model, max_len)
    compiled = torch.compile(step, dynamic=False)  # the object's __call__, traced with its weights as constants

    ways = {"generate": lambda: generate(model, prompt, args.new_tokens),
            "fixed-shape step, eager": lambda: generate_with_step(model, step, prompt, args.new_tokens),
            "fixed-shape step, compiled": lambda: generate_with_step(model, compiled, prompt, args.new_tokens)}
    start = time.perf_counter()
    ways["fixed-shape step, compiled"]()  # the first call traces and compiles
    compile_s = time.perf_counter() - start
    for way in ways.values():  # warm-up
        way()
    times = {name: [] for name in ways}
    outputs = {}
    for _ in range(args.repeats):  # interleaved: a slow minute slows every way alike
        for name, way in ways.items():
            start = time.perf_counter()
            outputs[name] = way()
            times[name].append(time.perf_counter() - start)
    # the best run of each (a busy neighbour only ever slows a run down)
    ms = {name: 1e3 * min(t) / args.new_tokens for name, t in times.items()}
    return {"preset": preset, "params": model.num_params(), "ms": ms, "compile_s": compile_s,
            "same": {name: sum(a == b for a, b in zip(out, outputs["generate"])) for name, out in outputs.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,nano")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each way, interleaved; the best counts")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if shutil.which("g++") is None and shutil.which("c++") is None:
        print("skipped: torch.compile's CPU backend builds C++, and no C++ compiler (g++, c++) is on PATH")
        return 0
    torch.set_num_threads(args.threads)
    torch._inductor.config.cpp_wrapper = True  # call the kernels from C++, not from a Python wrapper
    print(f"batch 1, greedy, {args.prompt_len}-token prompt + {args.new_tokens} new tokens, random weights; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); best of {args.repeats}, interleaved")
    rows = [bench_preset(p.strip(), args) for p in args.presets.split(",")]
    print("\n| preset | way | ms per token | vs generate | same tokens as generate |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        for name, ms in r["ms"].items():
            print(f"| {r['preset']} ({r['params'] / 1e6:.1f}M) | {name} | {ms:.3f} | {r['ms']['generate'] / ms:.2f}x | "
                  f"{r['same'][name]}/{args.new_tokens} |")
    print()
    for r in rows:
        saved_ms = r["ms"]["generate"] - r["ms"]["fixed-shape step, compiled"]
        pays = f"pays for itself after {1e3 * r['compile_s'] / saved_ms:,.0f} tokens" if saved_ms > 0 else "never pays"
        print(f"{r['preset']}: compiling took {r['compile_s']:.0f} s (first call: trace, generate C++, build); "
              f"at {saved_ms:.3f} ms saved per token it {pays}")
        record("bench_compile_decode", f"batch-1 greedy decode, {r['preset']}: compiled fixed-shape step vs generate, ms/token",
               f"{r['ms']['fixed-shape step, compiled']:.3f} vs {r['ms']['generate']:.3f} "
               f"({r['ms']['generate'] / r['ms']['fixed-shape step, compiled']:.2f}x); compile {r['compile_s']:.0f} s; "
               f"same tokens {r['same']['fixed-shape step, compiled']}/{args.new_tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
