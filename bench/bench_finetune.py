"""
What one fine-tuning step costs on this CPU: full SFT (lesson 5) against LoRA (lesson 6) and QLoRA
(lesson 7), with and without the adapters' dropout.

LoRA trains 7% of the weights, so one would expect a cheaper step: no weight gradient for the frozen
projections and a far smaller AdamW update. At the `tiny` preset it is cheaper only a little, and
with dropout on the adapters' input much dearer; lesson 6's doc reads the table. Each variant is the
`tiny` model (random weights: speed does not depend on them) on lesson 5's batch shape, 16 rows of
256 tokens, one forward + backward + AdamW step; the variants alternate step by step so a busy
neighbour slows them all alike (bench/bench_model.py: time_pair).

    .venv/bin/python bench/bench_finetune.py                 # ~1 minute
    .venv/bin/python bench/bench_finetune.py --breakdown     # + the operators that take the time (torch profiler)
"""

import argparse
import copy
import statistics

import torch

from bench_model import make_step, time_pair  # noqa: E402  (bench/ is on sys.path when this runs as a script)
from results import record  # noqa: E402
from nano.model.gemma import GemmaNano, model_config  # noqa: E402
from nano.model.lora import inject_lora  # noqa: E402
from nano.model.nf4 import quantize_model  # noqa: E402
from nano.model.targets import DEFAULT_TARGETS  # noqa: E402

BATCH, RANK, ALPHA = 16, 8, 16.0  # lesson 5's rows per step; lessons 6 and 7's adapter


def variants(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Full SFT, and LoRA / QLoRA (NF4 base, double quant) on every projection, dropout 0.05 and 0 (the
    lessons' default)."""
    out = {"full SFT": copy.deepcopy(model)}
    for dropout in (0.05, 0.0):
        for name, base in ((f"LoRA, dropout {dropout:g}", copy.deepcopy(model)),
                           (f"QLoRA, dropout {dropout:g}", quantize_model(copy.deepcopy(model), DEFAULT_TARGETS, 64,
                                                                          double_quant=True))):
            inject_lora(base, r=RANK, alpha=ALPHA, dropout=dropout, targets=",".join(DEFAULT_TARGETS))  # in place
            out[name] = base
    return out


def top_operators(step, rows: int = 6) -> str:
    """The operators that take a step's time, by self CPU time (one profiled step)."""
    with torch.profiler.profile() as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return ", ".join(f"{e.key.removeprefix('aten::')} {100 * e.self_cpu_time_total / total:.0f}% ({e.count}x)"
                     for e in events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--breakdown", action="store_true", help="also profile one step of each variant")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = model_config("tiny", attn_impl="eager")
    models = variants(GemmaNano(cfg).train())
    steps = {name: make_step(m, BATCH, cfg.context_len, cfg.vocab_size, compile_model=False) for name, m in models.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; tiny, {BATCH} x {cfg.context_len} "
          f"tokens per step, LoRA r={RANK} on {', '.join(DEFAULT_TARGETS)}")
    times = time_pair(steps, args.steps, warmup=1)
    full = statistics.median(times["full SFT"])
    print(f"\n{'variant':<22} {'trainable':>10} {'ms / step':>10} {'vs full SFT':>12}")
    for name, model in models.items():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ms = 1e3 * statistics.median(times[name])
        print(f"{name:<22} {trainable:>10,} {ms:>10.0f} {ms / 1e3 / full:>11.2f}x")
    if args.breakdown:
        print("\nwhere a step's time goes (self CPU time, one profiled step):")
        for name, step in steps.items():
            print(f"  {name:<20} {top_operators(step)}")
    lora = {name: statistics.median(t) / full for name, t in times.items() if name != "full SFT"}
    record("bench_finetune", "tiny step vs full SFT: LoRA / QLoRA, dropout 0.05 -> 0",
           f"{lora['LoRA, dropout 0.05']:.2f}x / {lora['QLoRA, dropout 0.05']:.2f}x -> "
           f"{lora['LoRA, dropout 0']:.2f}x / {lora['QLoRA, dropout 0']:.2f}x",
           "python bench/bench_finetune.py")


if __name__ == "__main__":
    main()
