"""
Lesson 8: a reward model. The SFT model reads a prompt and an answer and gives one number; trained on
lesson 0's preference pairs (a good answer vs the same answer with one flaw), it learns to score the
good one higher (nano/align/reward_model.py: Bradley-Terry loss on the last token's score).

    make lesson-8                                     # starts from lesson 5's model; ~1-2 CPU minutes
    python lessons/08_reward_model.py --fast_dev_run  # a handful of steps (runs/rm/fast-dev-run/)
    python lessons/08_reward_model.py --resume        # continue runs/rm/default/

Two held-out sets with two jobs: the last --select_pairs training pairs choose the checkpoint (the
lowest loss on them), and lesson 0's validation pairs, which chose nothing, report its accuracy. Then
the question PPO asks of it: does it rank the policy's OWN answers (sampled from lesson 5's model,
labelled clean or flawed by lesson 9's checkers, nano/align/flaws.py) as well as lesson 0's pairs?

Writes runs/rm/default/: checkpoints/ckpt_best.pth (PPO's `--reward rm` reads it), report.json
(pairwise accuracy on the validation pairs, overall and per flaw, and on the policy's own answers),
scores.svg (the score distributions of chosen and rejected answers), metrics.jsonl and loss.svg.
"""

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from nano.common.config import parse_config, save_config
from nano.common.fileio import read_jsonl, write_json
from nano.common.paths import SFT_CHECKPOINT, RunPaths, raw_dir, require
from nano.common.plot import line_chart, write_svg
from nano.text.bins import PreferenceDataset, prompt_and_reply
from nano.text.chat_format import pad_token_id
from nano.checkpoints.checkpoint import load_checkpoint, load_model, load_tokenizer
from nano.eval.grading import accuracy_with_stderr
from nano.train.trainer import EXAMPLE_ORDER, Task, TrainConfig, shuffled_index, train
from nano.align.flaws import find_flaws, own_pair_sides, prompt_info_of, sample_and_check
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
    select_pairs: int = field(default=200, metadata={"help": "the last N training pairs, held out to choose the checkpoint"})
    own_samples: int = field(default=4, metadata={"help": "answers lesson 5's model samples per validation prompt, to score its own answers (0 = skip)"})
    own_temperature: float = field(default=1.0, metadata={"help": "temperature of those answers"})


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

    fitting, val_ids = train_set.fitting(max_len), val_set.fitting(max_len)
    if cfg.fast_dev_run:
        val_ids, cfg.select_pairs = val_ids[: cfg.eval_batches * cfg.micro_batch_size], min(cfg.select_pairs, 8)
    train_ids, select_ids = fitting[: -cfg.select_pairs or None], fitting[len(fitting) - cfg.select_pairs:]
    if not train_ids or not select_ids or not val_ids:
        raise ValueError(f"too few preference pairs fit in max_len {max_len} tokens ({len(fitting)} train, {len(val_ids)} val) "
                         f"for {cfg.select_pairs} selection pairs: raise --max_len or lower --select_pairs")
    run = RunPaths.of("rm", cfg.run_name)
    print(f"backbone: {start} (step {ckpt.get('step')}) + a linear head d_model -> 1")
    print(f"pairs: {len(train_ids):,} train, {len(select_ids)} to choose the checkpoint, {len(val_ids):,} to report "
          f"(longer than {max_len} tokens skipped: {len(train_set) - len(fitting)} / {len(val_set) - len(val_ids)})")
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

    def score_pairs(model, items: list[dict]) -> dict:
        """Scores of preference pairs: chosen (N,), rejected (N,), and each pair's flaw."""
        device = next(model.parameters()).device
        chosen, rejected, flaws = [], [], []
        for i in range(0, len(items), cfg.micro_batch_size):
            batch = pair_batch(items[i:i + cfg.micro_batch_size], max_len, pad_id, device)
            chosen.append(model(batch["chosen"], batch["chosen_len"]).float().cpu())
            rejected.append(model(batch["rejected"], batch["rejected_len"]).float().cpu())
            flaws += batch["flaws"]
        return {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected), "flaws": flaws}

    def evaluate(model):  # on the selection pairs: they choose ckpt_best, so they cannot report it
        s = score_pairs(model, [train_set[j] for j in select_ids])
        return {"val_loss": float(bradley_terry_loss(s["chosen"], s["rejected"])),
                "val_accuracy": float((s["chosen"] > s["rejected"]).float().mean())}

    task = Task(make_batch=make_batch, loss=loss, evaluate=evaluate,
                count_tokens=lambda b: int(b["chosen_len"].sum() + b["rejected_len"].sum()),
                checkpoint_extra=reward_model_extra(rm, tokenizer.fingerprint(), str(start)))
    rm.train()
    result = train(rm, cfg, run.dir, task)

    # 3. the best checkpoint on the validation pairs: accuracy overall and per flaw, score distributions
    rm.load_state_dict(load_checkpoint(run.best)["model"])
    rm.eval()
    with torch.no_grad():
        s = score_pairs(rm, [val_set[j] for j in val_ids])
    right = (s["chosen"] > s["rejected"]).numpy()
    per_flaw = {}
    for flaw in sorted(set(s["flaws"])):
        picks = np.array([f == flaw for f in s["flaws"]])
        per_flaw[flaw] = {"accuracy": float(right[picks].mean()), "n": int(picks.sum())}
    accuracy, stderr = accuracy_with_stderr(right.tolist())
    write_svg(run.dir / "scores.svg", histogram({"chosen": s["chosen"].tolist(), "rejected": s["rejected"].tolist()},
                                                 title="reward model scores on held-out pairs"))
    report = {"val_accuracy": accuracy, "val_accuracy_stderr": stderr, "n": len(right), "per_flaw": per_flaw,
              "select_loss": result.best_value, "val_loss": float(bradley_terry_loss(s["chosen"], s["rejected"])),
              "chosen_mean": float(s["chosen"].mean()), "rejected_mean": float(s["rejected"].mean())}
    print(f"\nheld-out pairwise accuracy: {accuracy:.1%} (± {stderr:.1%}) on {len(right)} validation pairs")
    for flaw, r in per_flaw.items():
        print(f"  {flaw:<14} {r['accuracy']:6.1%}  ({r['n']} pairs)")

    # 4. the policy's own answers: what PPO will ask the reward model to score
    if cfg.own_samples:
        report["own"] = own_answer_accuracy(rm, start, tokenizer, val_set, val_ids, cfg, score_pairs)
        own = report["own"]
        if own["n"]:
            print(f"on lesson 5's own answers ({own['prompts']} validation prompts x {cfg.own_samples} at T={cfg.own_temperature}; "
                  f"{own['n']} prompts gave a clean and a flawed answer): {own['accuracy']:.1%} (± {own['stderr']:.1%})")
        for flaw, r in own["per_flaw"].items():
            print(f"  {flaw:<14} {r['accuracy']:6.1%}  ({r['n']} pairs)")
    report["seconds"] = round(time.time() - t0, 1)
    write_json(run.report, report)
    print(f"mean score: chosen {report['chosen_mean']:+.2f}, rejected {report['rejected_mean']:+.2f} "
          f"(histogram: {run.dir / 'scores.svg'})")
    print(f"took {report['seconds']:.0f} s; report in {run.report}")


def own_answer_accuracy(rm, start, tokenizer, val_set, val_ids: list[int], cfg: RMConfig, score_pairs) -> dict:
    """Pairwise accuracy on pairs of lesson 5's OWN answers to the validation prompts: per prompt, a clean
    answer (no flaw the checkers find) against a flawed one, both sampled from the model PPO starts from."""
    policy, _ = load_model(start)
    rows = read_jsonl(require(raw_dir() / "preferences_val.jsonl", "preference pairs", 0))
    prompts = [rows[i]["prompt"] for i in val_ids]
    infos = [prompt_info_of(rows[i]) for i in val_ids]
    rollout, found = sample_and_check(policy, tokenizer, prompts, infos, cfg.own_samples, cfg.own_temperature, seed=cfg.seed + 2)
    answers = [row[mask.bool()].tolist() for row, mask in zip(rollout.ids, rollout.response_mask)]
    k, items = cfg.own_samples, []
    for g, i in enumerate(val_ids):
        clean, flawed = own_pair_sides(answers[g * k:(g + 1) * k], found[g * k:(g + 1) * k])
        if clean is not None and flawed is not None:
            prompt = val_set[i]["prompt_ids"]
            flaw = find_flaws(tokenizer.decode(flawed), infos[g])[0]
            items.append({"chosen_ids": prompt_and_reply(prompt, clean)[0], "rejected_ids": prompt_and_reply(prompt, flawed)[0],
                          "flaw": flaw})
    if not items:
        return {"n": 0, "prompts": len(prompts), "accuracy": None, "stderr": None, "per_flaw": {}}
    with torch.no_grad():
        s = score_pairs(rm, items)
    right = (s["chosen"] > s["rejected"]).tolist()
    accuracy, stderr = accuracy_with_stderr(right)
    per_flaw = {f: {"accuracy": sum(r for r, g in zip(right, s["flaws"]) if g == f) / s["flaws"].count(f),
                    "n": s["flaws"].count(f)} for f in sorted(set(s["flaws"]))}
    return {"n": len(items), "prompts": len(prompts), "accuracy": accuracy, "stderr": stderr, "per_flaw": per_flaw}


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
