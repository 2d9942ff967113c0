"""
Our serving engine against what a user would run instead: Hugging Face transformers, same weights.

bench/bench_serve.py measures the engine against our own `generate`. This script asks the question a
user asks first: "why not load the exported folder in transformers and call it?". The trained model
is exported (nano/checkpoints/export.py), transformers loads the folder as Gemma2ForCausalLM, and
both sides decode the same chat prompts greedily in fp32, exactly --new_tokens new tokens each (no
stop token on either side: a reply that ends early would make the faster side look faster).

    (a) our Engine (nano/serve/engine.py), every request at once, against transformers' own
        continuous batching: `model.init_continuous_batching()`, a paged KV cache and a scheduler
        in a background thread, fed the same requests at once (the machinery behind its
        `generate_batch`; the manager is built and warmed up before the clock starts, as our
        Engine is);
    (b) our Engine against the classic static batch: `model.generate` on the prompts left-padded;
    (c) one request: our Engine, our `nano/model/generate.py: generate`, and `model.generate`;
    (d) greedy tokens: every request's tokens from each transformers path against the engine's;
    (e) with --breakdown: one request decoded by our `generate` and by `model.generate` under
        torch.profiler, its time per token split into matrix products and everything else. The
        products are the same arithmetic on the same weights on both sides, so their time bounds
        what any saving of ours can reach: (their whole step) / (our products alone).

Times are the best of --repeats runs with the cases interleaved, so a busy neighbour slows them
alike; everything runs on --threads torch threads (1: the engine's loop is one thread).

transformers is not a dependency of the project; run this in a separate environment that has it,
with the project installed beside (the CPU build of torch, pinned like the project's):

    python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch==2.13.0 transformers psutil
    /tmp/hfvenv/bin/pip install --no-deps -e . && /tmp/hfvenv/bin/pip install numpy regex tqdm flask
    /tmp/hfvenv/bin/python bench/bench_vs_transformers.py        # the newest chat model under runs/
    /tmp/hfvenv/bin/python bench/bench_vs_transformers.py --compiled   # and our Engine with compile_decode=True

Without transformers it says so and exits 0 (`make bench` runs it with the project's venv).
"""

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install
from nano.checkpoints.export import export, full_precision_model  # noqa: E402
from nano.common.fileio import read_jsonl  # noqa: E402
from nano.common.paths import data_dir, runs_dir, tokenizer_dir  # noqa: E402
from nano.model.generate import generate  # noqa: E402
from nano.serve.engine import Engine  # noqa: E402
from nano.serve.sequence import SamplingParams  # noqa: E402
from nano.text.chat_format import pad_token_id, render_prompt  # noqa: E402
from nano.text.tokenizer import Tokenizer  # noqa: E402
from results import record  # noqa: E402  (bench/results.py: the summary table of make bench)

COMMAND = "/tmp/hfvenv/bin/python bench/bench_vs_transformers.py"  # what the summary table says to rerun


def find_checkpoint() -> Path:
    """The full-SFT model (it answers the chat prompts), else the pretrained one."""
    for rel in ("sft/full/default/checkpoints/ckpt_best.pth", "pretrain/default/checkpoints/ckpt_best.pth"):
        if (runs_dir() / rel).is_file():
            return runs_dir() / rel
    raise SystemExit("no checkpoint under runs/: run `make lesson-5` (or lesson-4) first, or pass --checkpoint")


def chat_prompts(tokenizer: Tokenizer, count: int, longest: int) -> list[list[int]]:
    """`count` real requests: the validation conversations of lesson 0, each rendered up to the model's
    turn as the server renders it (render_prompt), those of at most `longest` tokens (so the reply fits
    the context), in file order, repeated if there are too few."""
    prompts = []
    for row in read_jsonl(data_dir() / "raw" / "instructions_val.jsonl"):
        messages = row["messages"][:-1] if row["messages"][-1]["role"] == "assistant" else row["messages"]
        ids = render_prompt(messages, tokenizer)
        if len(ids) <= longest:
            prompts.append(ids)
    if not prompts:
        raise SystemExit(f"no validation conversation fits in {longest} tokens: lower --new_tokens")
    return [prompts[i % len(prompts)] for i in range(count)]


# --------------------------------------------------------------------------------------------------
# The ways to run the same requests. Each returns (seconds, one list of new token ids per prompt);
# the clock covers the requests only: models, engines and managers are built beforehand.


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int):
    """Ours: every prompt submitted at once, the engine stepped until all are done (Engine.generate).
    No stop token ids in SamplingParams, so each reply is exactly max_tokens long."""
    start = time.perf_counter()
    outputs = engine.generate(prompts, SamplingParams(max_tokens=new_tokens))
    return time.perf_counter() - start, [o["token_ids"] for o in outputs]


def one_at_a_time(way):
    """`way`, given one request at a time: what a server without batching does."""
    def run(prompts):
        seconds, outputs = 0.0, []
        for prompt in prompts:
            s, out = way([prompt])
            seconds, outputs = seconds + s, outputs + out
        return seconds, outputs
    return run


def run_generate(model, prompts: list[list[int]], new_tokens: int):
    """Ours, one request after another, through nano/model/generate.py (batch 1's baseline)."""
    start = time.perf_counter()
    outputs = [generate(model, p, new_tokens) for p in prompts]
    return time.perf_counter() - start, outputs


def run_hf_static(hf, prompts: list[list[int]], new_tokens: int, pad_id: int):
    """transformers' classic batch: the prompts left-padded into one tensor, `generate` until the
    longest is done. eos_token_id=None: nothing stops a row early (min_new_tokens would instead
    forbid the stop tokens, which changes which token is the argmax)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=pad_id)
    seconds = time.perf_counter() - start
    return seconds, out[:, width:].tolist()


def run_hf_continuous(manager, prompts: list[list[int]], new_tokens: int):
    """transformers' continuous batching: every request queued at once with the running manager, then
    wait for all of them (what its generate_batch does around a manager it builds each call)."""
    start = time.perf_counter()
    request_ids = manager.add_requests(inputs=prompts, max_new_tokens=new_tokens)
    done = {}
    while len(done) < len(request_ids):
        result = manager.get_result(timeout=60)
        if result is None:
            raise RuntimeError("transformers' continuous batching returned nothing for 60 s")
        if result.error is not None:
            raise RuntimeError(f"transformers' continuous batching failed: {result.error}")
        if result.is_finished():
            done[result.request_id] = result
    seconds = time.perf_counter() - start
    return seconds, [list(done[i].generated_tokens) for i in request_ids]


MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")  # the kernels that do the arithmetic


def breakdown(way, prompt: list[int], new_tokens: int) -> dict:
    """ms per token of one request, and how the profiler splits it: matrix products against the rest."""
    from torch.profiler import ProfilerActivity, profile

    seconds = min(way([prompt])[0] for _ in range(3))  # unprofiled: the profiler slows small ops down
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        way([prompt])
    events = prof.key_averages()
    products = [e for e in events if e.key in MATRIX_PRODUCTS]
    rest = [e for e in events if e.key not in MATRIX_PRODUCTS]
    per_token_ms = 1e-3 / new_tokens  # the profiler counts microseconds
    return {"ms": 1e3 * seconds / new_tokens,
            "products_ms": sum(e.self_cpu_time_total for e in products) * per_token_ms,
            "rest_ms": sum(e.self_cpu_time_total for e in rest) * per_token_ms,
            "products_calls": sum(e.count for e in products) / new_tokens,
            "rest_calls": sum(e.count for e in rest) / new_tokens}


def print_breakdown(ours_way, theirs_way, prompt: list[int], new_tokens: int) -> None:
    """(e): where a batch-1 token's time goes on each side, and the ratio no overhead saving can pass."""
    ours, theirs = breakdown(ours_way, prompt, new_tokens), breakdown(theirs_way, prompt, new_tokens)
    print(f"\nbatch 1, one {len(prompt)}-token prompt, {new_tokens} greedy tokens, split by torch.profiler "
          "(its own overhead inflates the small ops; the first column is unprofiled, best of 3):")
    print("\n| way | ms per token | matrix products: ms (calls) | everything else: ms (ops) |")
    print("|---|---:|---:|---:|")
    for name, b in (("our generate", ours), ("transformers generate", theirs)):
        print(f"| {name} | {b['ms']:.2f} | {b['products_ms']:.2f} ({b['products_calls']:.0f}) | "
              f"{b['rest_ms']:.2f} ({b['rest_calls']:.0f}) |")
    print(f"\ntransformers / ours: {theirs['ms'] / ours['ms']:.2f}x. With nothing but its matrix products left, our "
          f"step would still take {ours['products_ms']:.2f} ms: at most {theirs['ms'] / ours['products_ms']:.2f}x.")


# --------------------------------------------------------------------------------------------------


def agreement(reference: list[list[int]], other: list[list[int]]) -> str:
    """'64/64' when every request's tokens are equal; else also where the first ones part, e.g.
    '62/64 (first difference at token 97, 121)'. An early difference is a bug; a late one may be
    rounding that flipped two near-equal logits, or a small difference in the computation: find out
    which (without_attention_softcap) rather than call it noise."""
    firsts = []
    for a, b in zip(reference, other):
        if a != b:
            firsts.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
    text = f"{len(reference) - len(firsts)}/{len(reference)}"
    if firsts:
        text += f" (first difference at token {', '.join(str(i) for i in sorted(firsts))})"
    return text


def without_attention_softcap(hf, prompts, outputs, reference, new_tokens: int, pad_id: int) -> str:
    """Where transformers' continuous batching differs from our Engine, is it the attention soft-cap?

    Gemma-2 squashes every attention score with 50 * tanh(score / 50) (nano/model/attention.py). The
    eager attention of transformers' Gemma2 does it; the paged eager attention its continuous batching
    switches to takes the same `softcap` argument and leaves it out. Rerun the differing requests
    through `generate` with the soft-cap turned off in the eager model: if they now match continuous
    batching token for token, the difference is that missing line, not rounding.
    """
    differing = [i for i, (a, b) in enumerate(zip(reference, outputs)) if a != b]
    if not differing:
        return ""
    caps = {m: m.attn_logit_softcapping for m in hf.modules() if hasattr(m, "attn_logit_softcapping")}
    try:
        for m in caps:
            m.attn_logit_softcapping = None
        _, uncapped = run_hf_static(hf, [prompts[i] for i in differing], new_tokens, pad_id)
    finally:
        for m, cap in caps.items():
            m.attn_logit_softcapping = cap
    same = sum(outputs[i] == u for i, u in zip(differing, uncapped))
    return f"{same}/{len(differing)} of the differing requests equal eager `generate` without the attention soft-cap"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="default: runs/'s full-SFT model, else the pretrained one")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one_at_a_time", type=int, default=4, help="requests of the batch-1 rows, one after another")
    parser.add_argument("--max_batch_tokens", type=int, default=2048, help="prompt tokens per step, both engines")
    parser.add_argument("--breakdown", action="store_true", help="also split a batch-1 token's time (profiler)")
    parser.add_argument("--compiled", action="store_true", help="also our Engine with compile_decode=True (compiles first: ~1 min)")
    args = parser.parse_args()
    try:
        import transformers
        from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig
        from transformers.generation.continuous_batching.utils import WorkloadHints
    except ImportError as e:
        print(f"skipped: {e.name} is not installed here. This comparison needs transformers, which the project "
              "itself never uses; install it in a separate venv (see this file's docstring).")
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # 1. the same weights twice: ours in fp32 (the merged model the export writes), and the exported folder
    checkpoint = Path(args.checkpoint) if args.checkpoint else find_checkpoint()
    folder = export(checkpoint, Path(tempfile.mkdtemp()) / "export", force=True)
    ours, _ = full_precision_model(checkpoint)
    # two copies of the folder: the continuous-batching manager switches its model's attention to the
    # paged kind for good, and `generate` must keep the plain eager attention (the one that soft-caps)
    hf, hf_paged = (AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
                    for _ in range(2))
    tokenizer = Tokenizer.load(tokenizer_dir() / "tokenizer.json")  # the one the export checked against the model
    pad_id = pad_token_id(tokenizer)
    most = max(args.concurrency)
    prompts = chat_prompts(tokenizer, most, ours.cfg.context_len - args.new_tokens)
    lengths = sorted(map(len, prompts))
    print(f"{checkpoint} ({ours.num_params() / 1e6:.1f}M parameters), exported and loaded by transformers "
          f"{transformers.__version__} as {type(hf).__name__}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s)\n{most} chat prompts of {lengths[0]}-{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}), "
          f"greedy, fp32, exactly {args.new_tokens} new tokens each")

    # 2. the engines, built once. Ours: no prefix caching, because the repeats send the same prompts
    # again, and this measures batching, not caching; its default cache holds `most` full contexts.
    engine = Engine(ours, max_running=most, max_prefill_tokens=args.max_batch_tokens, prefix_caching=False)
    # Theirs, set up alike: block sharing (its prefix cache) off; as many prompt tokens per step as
    # ours; a cache of `most` full contexts in pages of 256 tokens (its default page). Left to guess,
    # it sizes the cache from the machine's free memory and fills an attention mask of
    # max_batch_tokens rows by the cache's whole capacity before the first step (a minute here; its
    # steps ran no faster for it). The end-of-sequence id -1 means "none": every reply runs to
    # max_new_tokens.
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)  # its notes about CPUs and flash kernels
    page = 256
    manager = hf_paged.init_continuous_batching(
        generation_config=GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=pad_id,
                                           max_new_tokens=args.new_tokens),
        continuous_batching_config=ContinuousBatchingConfig(allow_block_sharing=False,
                                                            max_batch_tokens=args.max_batch_tokens,
                                                            num_blocks=-(-most * ours.cfg.context_len // page),
                                                            page_size=page),
        workload_hints=WorkloadHints(max_prompt_length=lengths[-1], max_generated_length=args.new_tokens,
                                     num_requests=most))
    start = time.perf_counter()
    manager.warmup()
    with torch.inference_mode():  # the manager's thread inherits it
        manager.start()
    print(f"transformers' continuous batching: attention '{hf_paged.config._attn_implementation}', built and warmed "
          f"up in {time.perf_counter() - start:.1f} s (not timed below)")

    ways = {
        "our Engine": lambda ps: run_engine(engine, ps, args.new_tokens),
        "transformers continuous batching": lambda ps: run_hf_continuous(manager, ps, args.new_tokens),
        "transformers generate (static batch)": lambda ps: run_hf_static(hf, ps, args.new_tokens, pad_id),
    }
    if args.compiled:  # the engine with its decode steps compiled (nano/serve/compiled_decode.py), a row of its own
        compiled = Engine(ours, max_running=most, max_prefill_tokens=args.max_batch_tokens, prefix_caching=False,
                          compile_decode=True)
        ways["our Engine, compile_decode"] = lambda ps: run_engine(compiled, ps, args.new_tokens)
        start = time.perf_counter()
        for c in [1] + args.concurrency:  # each batch size the timed runs will meet, compiled now
            run_engine(compiled, prompts[:c], args.new_tokens)
        print(f"our Engine with compile_decode: its decode steps compiled for batch sizes "
              f"{sorted(compiled.runner.padded_decode.buckets_seen)} in {time.perf_counter() - start:.0f} s (not timed below)")
    # batch 1: each request alone, --one_at_a_time of them one after another (one 128-token reply
    # takes ~0.2 s, too short a time to measure on a machine whose speed wanders)
    one = {"our Engine": one_at_a_time(ways["our Engine"]),
           "our generate": lambda ps: run_generate(ours, ps, args.new_tokens),
           "transformers generate": one_at_a_time(ways["transformers generate (static batch)"])}
    if args.compiled:
        one["our Engine, compile_decode"] = one_at_a_time(ways["our Engine, compile_decode"])
    # one short untimed round of everything first: allocators, caches and lazy imports warm up
    for way in list(ways.values()) + [one["our generate"]]:
        way(prompts[:4])

    # 3. the timed runs, interleaved: each repeat runs every way at every concurrency once
    cases = [(c, name) for c in args.concurrency for name in ways] + [(1, name) for name in one]
    requests = {c: prompts[:c] for c in args.concurrency} | {1: prompts[:args.one_at_a_time]}
    seconds, outputs = {case: [] for case in cases}, {}
    for _ in range(args.repeats):
        for c, name in cases:
            s, out = (ways if c > 1 else one)[name](requests[c])
            if any(len(o) != args.new_tokens for o in out):
                raise RuntimeError(f"{name} wrote {sorted(set(map(len, out)))} tokens, not {args.new_tokens}")
            seconds[(c, name)].append(s)
            outputs[(c, name)] = out
    manager.stop(block=True)
    why = without_attention_softcap(hf, prompts, outputs[(most, "transformers continuous batching")],
                                    outputs[(most, "our Engine")], args.new_tokens, pad_id)

    def rate(case) -> float:
        """tokens per second of the best repeat (a busy neighbour only ever slows a run down)"""
        return len(requests[case[0]]) * args.new_tokens / min(seconds[case])

    # 4. the table: each row against our Engine at the same concurrency
    print(f"\n| requests at once | way | tokens/s (best of {args.repeats}) | our Engine / this | same tokens as our Engine |")
    print("|---:|---|---:|---:|---|")
    for c, name in cases:
        ours_rate = rate((c, "our Engine"))
        same = agreement(outputs[(c, "our Engine")], outputs[(c, name)])
        print(f"| {c if c > 1 else f'1 ({len(requests[1])} in turn)'} | {name} | {rate((c, name)):.0f} | {ours_rate / rate((c, name)):.2f}x | "
              f"{'(itself)' if name == 'our Engine' else same} |")
        if name != "our Engine":
            version = f" {transformers.__version__}" if name.startswith("transformers") else ""
            record("bench_vs_transformers", f"our Engine / {name.replace('transformers', 'transformers' + version)}, "
                   f"{c} request{'s' if c > 1 else ''} at once, {args.new_tokens} greedy tokens, "
                   f"{args.threads} thread(s), tokens/s",
                   f"{ours_rate / rate((c, name)):.2f}x ({ours_rate:.0f} vs {rate((c, name)):.0f}); same tokens {same}",
                   COMMAND)
    if why:
        print(f"\ntransformers continuous batching at {most} requests: {why}")
    if args.breakdown:
        print_breakdown(one["our generate"], one["transformers generate"], prompts[0], args.new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
