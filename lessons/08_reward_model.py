"""
Lesson 8: a reward model. The SFT model reads a prompt and an answer and gives one number; trained on
lesson 0's preference pairs (a good answer vs the same answer with one flaw), it learns to score the
good one higher (nano/align/reward_model.py: Bradley-Terry loss on the last token's score).

    make lesson-8                                     # starts from lesson 5's model; ~1-2 CPU minutes
    python lessons/08_reward_model.py --fast_dev_run  # a handful of steps (runs/rm/fast-dev-run/)
    python lessons/08_reward_model.py --resume        # continue runs/rm/default/

Writes runs/rm/default/: checkpoints/ckpt_best.pth (lowest held-out loss; PPO's `--reward rm` reads
it), report.json (held-out pairwise accuracy, overall and per flaw), scores.svg (the score
distributions of chosen and rejected answers), metrics.jsonl and loss.svg.
"""

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from nano.common.config import parse_config, save_config
from nano.common.fileio import write_json
from nano.common.paths import SFT_CHECKPOINT, RunPaths
from nano.common.plot import line_chart, write_svg
from nano.text.bins import PreferenceDataset
from nano.text.chat_format import pad_token_id
from nano.checkpoints.checkpoint import load_checkpoint, load_tokenizer
from nano.eval.grading import accuracy_with_stderr
from nano.train.trainer import EXAMPLE_ORDER, Task, TrainConfig, shuffled_index, train
from nano.align.policy import begin_run
from nano.align.reward_model import RewardModel, bradley_terry_loss, pair_batch, reward_model_extra


@dataclass
class RMConfig(TrainConfig):
    checkpoint_path: str = field(default="", metadata={"help": f"backbone to start from (default runs/{SFT_CHECKPOINT})"})
    max_len: int = field(default=0, metadata={"help": "longest prompt + answer in tokens (0 = the model's context); longer pairs are skipped"})
    # defaults fitted to the tiny preset on 2 CPU cores (under 2 minutes)
    steps: int = field(default=120, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "pairs per optimizer step"})
    micro_batch_size: int = field(default=16, metadata={"help": "pairs per forward pass"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decay (matrices only)"})
    eval_every: int = field(default=40, metadata={"help": "steps between evaluations and checkpoints"})


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(RMConfig, argv)
    start = begin_run(cfg)
    t0 = time.time()

    # 1. the backbone (lesson 5's model) with a fresh scalar head, and the pairs it learns from
    rm, ckpt = RewardModel.from_checkpoint(start)
    tokenizer = load_tokenizer(ckpt.get("tokenizer_fingerprint"))
    pad_id = pad_token_id(tokenizer)
    max_len = cfg.max_len or rm.cfg.context_len
    train_set, val_set = PreferenceDataset("train", tokenizer), PreferenceDataset("val", tokenizer)

    train_ids, val_ids = train_set.fitting(max_len), val_set.fitting(max_len)
    if not train_ids or not val_ids:
        raise ValueError(f"no preference pair fits in max_len {max_len} tokens: raise --max_len")
    if cfg.fast_dev_run:
        val_ids = val_ids[: cfg.eval_batches * cfg.micro_batch_size]
    run = RunPaths.of("rm", cfg.run_name)
    print(f"backbone: {start} (step {ckpt.get('step')}) + a linear head d_model -> 1")
    print(f"pairs: {len(train_ids):,} train, {len(val_ids):,} held out (longer than {max_len} tokens skipped: "
          f"{len(train_set) - len(train_ids)} / {len(val_set) - len(val_ids)})")
    print(f"writing to {run.dir}")
    save_config(cfg, run.dir)

    # 2. batches, loss and held-out evaluation for the shared loop
    def make_batch(step, rows, device):
        picks = [train_set[train_ids[shuffled_index(cfg.seed, step * cfg.batch_size + r, len(train_ids), EXAMPLE_ORDER)]] for r in rows]
        return pair_batch(picks, max_len, pad_id, device)

    def loss(model, batch):
        chosen = model(batch["chosen"], batch["chosen_len"])  # (B,)
        rejected = model(batch["rejected"], batch["rejected_len"])  # (B,)
        return bradley_terry_loss(chosen, rejected)

    def score_val(model) -> dict:
        """Scores of every held-out pair: chosen (N,), rejected (N,), and each pair's flaw."""
        device = next(model.parameters()).device
        chosen, rejected, flaws = [], [], []
        for i in range(0, len(val_ids), cfg.micro_batch_size):
            batch = pair_batch([val_set[j] for j in val_ids[i:i + cfg.micro_batch_size]], max_len, pad_id, device)
            chosen.append(model(batch["chosen"], batch["chosen_len"]).float().cpu())
            rejected.append(model(batch["rejected"], batch["rejected_len"]).float().cpu())
            flaws += batch["flaws"]
        return {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected), "flaws": flaws}

    def evaluate(model):
        s = score_val(model)
        return {"val_loss": float(bradley_terry_loss(s["chosen"], s["rejected"])),
                "val_accuracy": float((s["chosen"] > s["rejected"]).float().mean())}

    task = Task(make_batch=make_batch, loss=loss, evaluate=evaluate,
                count_tokens=lambda b: int(b["chosen_len"].sum() + b["rejected_len"].sum()),
                checkpoint_extra=reward_model_extra(rm, tokenizer.fingerprint(), str(start)))
    rm.train()
    result = train(rm, cfg, run.dir, task)

    # 3. the best checkpoint on the held-out pairs: accuracy overall and per flaw, score distributions
    rm.load_state_dict(load_checkpoint(run.best)["model"])
    rm.eval()
    with torch.no_grad():
        s = score_val(rm)
    right = (s["chosen"] > s["rejected"]).numpy()
    per_flaw = {}
    for flaw in sorted(set(s["flaws"])):
        picks = np.array([f == flaw for f in s["flaws"]])
        per_flaw[flaw] = {"accuracy": float(right[picks].mean()), "n": int(picks.sum())}
    accuracy, stderr = accuracy_with_stderr(right.tolist())
    write_svg(run.dir / "scores.svg", histogram({"chosen": s["chosen"].tolist(), "rejected": s["rejected"].tolist()},
                                                 title="reward model scores on held-out pairs"))
    report = {"val_accuracy": accuracy, "val_accuracy_stderr": stderr, "n": len(right), "per_flaw": per_flaw,
              "val_loss": result.best_value, "chosen_mean": float(s["chosen"].mean()),
              "rejected_mean": float(s["rejected"].mean()), "seconds": round(time.time() - t0, 1)}
    write_json(run.report, report)
    print(f"\nheld-out pairwise accuracy: {accuracy:.1%} (± {stderr:.1%}) on {len(right)} pairs")
    for flaw, r in per_flaw.items():
        print(f"  {flaw:<14} {r['accuracy']:6.1%}  ({r['n']} pairs)")
    print(f"mean score: chosen {report['chosen_mean']:+.2f}, rejected {report['rejected_mean']:+.2f} "
          f"(histogram: {run.dir / 'scores.svg'})")
    print(f"took {report['seconds']:.0f} s; report in {run.report}")


def histogram(samples: dict[str, list[float]], title: str, bins: int = 24) -> str:
    """Counts per score bin for each named list of scores, as line chart series over the same bins."""
    values = [v for vs in samples.values() for v in vs]
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    series = {}
    for name, vs in samples.items():
        counts = np.histogram(vs, bins=bins, range=(lo, lo + width * bins))[0]
        series[name] = [(lo + (i + 0.5) * width, float(c)) for i, c in enumerate(counts)]
    return line_chart(series, title=title, xlabel="score", ylabel="pairs")


if __name__ == "__main__":
    main()
