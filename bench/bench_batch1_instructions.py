"""
One request at a time: what a token costs through the engine against `generate`, counted in CPU
instructions rather than seconds.

On a small shared machine the time of a batch-1 token wanders by a third from minute to minute
(lesson 14, section 8), and two runs of the same code can differ more than the two ways we want to
compare. Valgrind's callgrind counts the instructions a program executes instead: the same count
for the same program and input, whatever else the machine is doing. At this model size a token is
mostly per-operation overhead (Python, PyTorch's dispatcher), which is instructions, so the count
ranks the two ways as their time would on a quiet machine.

Each way runs in its own process under callgrind, once with --short and once with --long new
tokens after the same prompt (random `tiny` weights, greedy, one thread); the difference of the
two counts over the difference of tokens is the cost of one decode step, with start-up, model
loading and the prompt's prefill cancelled out. Two processes run at a time (one per core).

    .venv/bin/python bench/bench_batch1_instructions.py        # ~4 minutes here; needs valgrind
    .venv/bin/python bench/bench_batch1_instructions.py run engine 144   # one run, what callgrind counts

Without valgrind (`apt-get install valgrind`) it says so and stops.
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install
from results import record  # noqa: E402  (bench/results.py: the summary table of make bench)
from nano.checkpoints.export import full_precision_model  # noqa: E402
from nano.model.gemma import GemmaNano, model_config  # noqa: E402
from nano.model.generate import generate  # noqa: E402
from nano.serve.engine import Engine  # noqa: E402
from nano.serve.sequence import SamplingParams  # noqa: E402

WAYS = ("generate", "engine")


def run(way: str, new_tokens: int, prompt_len: int, checkpoint: str) -> None:
    """What callgrind watches: one warm-up request, then one request of `new_tokens` greedy tokens."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = full_precision_model(checkpoint)[0] if checkpoint else GemmaNano(model_config("tiny")).eval()
    prompt = torch.randint(6, model.cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    if way == "generate":
        generate(model, prompt, 8)
        out = generate(model, prompt, new_tokens)
    else:
        engine = Engine(model, max_running=16, prefix_caching=False)
        engine.generate([prompt], SamplingParams(max_tokens=8))
        out = engine.generate([prompt], SamplingParams(max_tokens=new_tokens))[0]["token_ids"]
    assert len(out) == new_tokens, "the request stopped early: the count would not be per token"


def count(way: str, new_tokens: int, args, work: Path) -> int:
    """Instructions callgrind counts for `run(way, new_tokens)` in a process of its own."""
    log = work / f"{way}-{new_tokens}.log"
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={work / 'callgrind.out'}.%p",
                    f"--log-file={log}", sys.executable, __file__, "run", way, str(new_tokens),
                    "--prompt_len", str(args.prompt_len), "--checkpoint", args.checkpoint], check=True)
    return int(re.search(r"Collected : (\d+)", log.read_text()).group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="*", help="(internal) run WAY NEW_TOKENS: the process callgrind watches")
    parser.add_argument("--short", type=int, default=16, help="new tokens of the shorter run")
    parser.add_argument("--long", type=int, default=144, help="new tokens of the longer run")
    parser.add_argument("--prompt_len", type=int, default=58)
    parser.add_argument("--checkpoint", default="", help="a trained model (e.g. lesson 5's ckpt_best.pth); default: random `tiny` weights")
    args = parser.parse_args()
    if args.mode:
        run(args.mode[1], int(args.mode[2]), args.prompt_len, args.checkpoint)
        return 0
    if shutil.which("valgrind") is None:
        print("skipped: needs valgrind on PATH (Debian: apt-get install valgrind)")
        return 0
    weights = args.checkpoint or "random `tiny` weights"
    print(f"batch 1, greedy, {weights}, {args.prompt_len}-token prompt, one thread; instructions counted by "
          f"callgrind for {args.short} and {args.long} new tokens, per token = the difference / {args.long - args.short}")
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as pool:
        jobs = {(way, n): pool.submit(count, way, n, args, Path(tmp)) for way in WAYS for n in (args.short, args.long)}
        per_token = {way: (jobs[way, args.long].result() - jobs[way, args.short].result()) / (args.long - args.short)
                     for way in WAYS}
    print("\n| way | instructions per token | relative to generate |\n|---|---:|---:|")
    for way in WAYS:
        print(f"| {way} | {per_token[way] / 1e6:.2f} M | {per_token[way] / per_token['generate']:.3f} |")
    ratio = per_token["generate"] / per_token["engine"]
    print(f"\nthe engine at batch 1 does {ratio:.3f}x the tokens per instruction of generate "
          f"(lesson 14's target: within 10%, i.e. at least 0.90x)")
    record("bench_batch1_instructions", f"batch-1 decode step, {weights}: instructions per token, engine vs generate",
           f"{per_token['engine'] / 1e6:.2f} M vs {per_token['generate'] / 1e6:.2f} M ({ratio:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
