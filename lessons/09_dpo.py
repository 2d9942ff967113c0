"""
Lesson 9: DPO. The SFT model learns straight from lesson 0's preference pairs — no reward model, no
sampling during training — by making each chosen answer more likely, relative to a frozen copy of
itself (the reference), than its rejected twin (nano/align/dpo.py).

    make lesson-9                                       # starts from lesson 5's model
    python lessons/09_dpo.py --loss_type ipo            # IPO instead of the sigmoid loss
    python lessons/09_dpo.py --label_smoothing 0.1      # cDPO: trust each label 90%
    python lessons/09_dpo.py --lora_r 0 --lr 1e-4       # every weight trains (default: a LoRA adapter, r 8)
    python lessons/09_dpo.py --quantize                 # the adapter trains beside a 4-bit base (QLoRA)
    python lessons/09_dpo.py --pairs own                # on-policy pairs: the model's own answers, labelled by nano/align/flaws.py
    python lessons/09_dpo.py --fast_dev_run             # a handful of steps (runs/rlhf/offline/dpo-fast-dev-run/)

Before and after, on held-out data: the implicit-reward preference accuracy on the held-out pairs;
the share of the model's OWN sampled answers to the held-out prompts that show each flaw (checked
by the programs in nano/align/flaws.py); and TinyMath test accuracy. Writes runs/rlhf/offline/dpo-default/:
checkpoints/ (ckpt_*.pth for --resume; policy_best.pth, the merged model lessons 12 and 13 load),
adapter.pth, flaws_before/after.jsonl, report.json.
"""

import copy
import time
from dataclasses import dataclass, field

import torch

from nano.common.config import parse_config, save_config
from nano.common.fileio import save_checkpoint
from nano.common.fileio import read_jsonl, write_json, write_jsonl
from nano.common.paths import RunPaths, raw_dir, require
from nano.text.bins import PreferenceDataset, prompt_and_reply
from nano.text.chat_format import pad_token_id
from nano.model.lora import merge_lora, save_adapter
from nano.checkpoints.checkpoint import load_checkpoint
from nano.train.sft import math_accuracy
from nano.train.trainer import EXAMPLE_ORDER, Task, shuffled_index, train
from nano.align.dpo import LOSS_TYPES, chosen_nll, dpo_loss, pair_logprobs, preference_batch
from nano.align.flaws import FLAWS, measure_flaws, own_pairs, prompt_info_of
from nano.align.policy import PolicyConfig, begin_run, load_policy, policy_state_for_saving


@dataclass
class DPOConfig(PolicyConfig):
    beta: float = field(default=0.1, metadata={"help": "strength of the pull towards the reference (implicit reward scale)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "cDPO: probability that a label is wrong"})
    sft_weight: float = field(default=1.0, metadata={"help": "RPO: + this x the SFT loss of the chosen answer (0 = plain DPO)"})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO) or ipo", "choices": list(LOSS_TYPES)})
    pairs: str = field(default="lesson0", metadata={"help": "lesson0: lesson 0's pairs as written; own: the model's own sampled answers, labelled by the flaw checkers, replace either side where they can", "choices": ["lesson0", "own"]})
    own_samples: int = field(default=2, metadata={"help": "with --pairs own: answers sampled (at --flaw_temperature) per training prompt"})
    max_len: int = field(default=0, metadata={"help": "longest prompt + answer (0 = the model's context); longer pairs skipped"})
    flaw_prompts: int = field(default=200, metadata={"help": "held-out preference prompts whose sampled answers are checked for flaws"})
    flaw_samples: int = field(default=1, metadata={"help": "sampled answers per prompt for the flaw count"})
    flaw_temperature: float = field(default=0.8, metadata={"help": "sampling temperature of those answers (lesson 13's chat default)"})
    # defaults fitted to the tiny preset on 2 CPU cores
    steps: int = field(default=40, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "pairs per optimizer step"})
    micro_batch_size: int = field(default=16, metadata={"help": "pairs per forward pass"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (of the adapter; 1e-4 with --lora_r 0)"})
    warmup_steps: int = field(default=5, metadata={"help": "linear warm-up steps"})
    schedule: str = field(default="constant", metadata={"help": "lr schedule after warm-up", "choices": ["cosine", "constant"]})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decay (matrices only)"})
    eval_every: int = field(default=20, metadata={"help": "steps between evaluations and checkpoints"})

    def __post_init__(self):
        super().__post_init__()
        if self.fast_dev_run:
            self.flaw_prompts, self.flaw_samples, self.eval_problems = 8, 1, 0


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(DPOConfig, argv)
    start = begin_run(cfg)
    t0 = time.time()

    # 1. the policy and its frozen reference (the same model, or the same base + adapter), the pairs
    policy = load_policy(start, cfg.adapter_path or None, cfg.quantize, cfg.lora_r)
    model, reference, tokenizer = policy.model, policy.reference, policy.tokenizer
    pad_id = pad_token_id(tokenizer)
    max_len = cfg.max_len or model.cfg.context_len
    train_set, val_set = PreferenceDataset("train", tokenizer), PreferenceDataset("val", tokenizer)
    train_ids, val_ids = train_set.fitting(max_len), val_set.fitting(max_len)
    if cfg.fast_dev_run:
        val_ids = val_ids[: cfg.eval_batches * cfg.micro_batch_size]
    # the held-out prompts, with what each asked for (lesson 0's jsonl: required words, the right number)
    pairs_path = require(raw_dir() / "preferences_val.jsonl", "held-out preference pairs", 0)
    held_out = read_jsonl(pairs_path)[: cfg.flaw_prompts]
    prompts, infos = [p["prompt"] for p in held_out], [prompt_info_of(p) for p in held_out]
    run = RunPaths.of("rlhf/offline", cfg.run_name, method="dpo")
    print(f"policy: {policy.description}; reference: a frozen copy of it")
    print(f"pairs: {len(train_ids):,} train, {len(val_ids)} held out; {len(prompts)} held-out prompts x "
          f"{cfg.flaw_samples} samples for the flaw count; writing to {run.dir}")
    save_config(cfg, run.dir)

    # 2. the loss on a batch of pairs, and the held-out implicit-reward accuracy
    def pair_stats(model, batch) -> tuple[torch.Tensor, dict]:
        policy_c, policy_r = pair_logprobs(model, batch)
        with torch.no_grad():
            ref_c, ref_r = pair_logprobs(reference, batch)
        value, metrics = dpo_loss(policy_c, policy_r, ref_c, ref_r, cfg.beta, cfg.label_smoothing, cfg.loss_type)
        if cfg.sft_weight:
            chosen_tokens = batch["response_mask"][: batch["pairs"]].sum(-1)
            value = value + cfg.sft_weight * chosen_nll(policy_c, chosen_tokens)
        return value, metrics

    def pair_index(step: int, row: int) -> int:
        return train_ids[shuffled_index(cfg.seed, step * cfg.batch_size + row, len(train_ids), EXAMPLE_ORDER)]

    # on-policy pairs (--pairs own): before training, the starting model answers every prompt the run
    # will read; where it wrote a clean answer, that is the chosen side, where it wrote a flawed one,
    # the rejected side (lesson 0's answer stays where it wrote none). Seeded: a resumed run gets the same.
    own: dict[int, tuple] = {}
    if cfg.pairs == "own":
        used = sorted({pair_index(step, r) for step in range(cfg.steps) for r in range(cfg.batch_size)})
        rows = read_jsonl(require(raw_dir() / "preferences_train.jsonl", "preference pairs", 0))
        sides = own_pairs(model, tokenizer, [rows[i]["prompt"] for i in used], [prompt_info_of(rows[i]) for i in used],
                          cfg.own_samples, cfg.flaw_temperature, seed=cfg.seed + 1)
        own = dict(zip(used, sides))
        write_jsonl(run.dir / "own_pairs.jsonl", [{"prompt": rows[i]["prompt"], "chosen": c and tokenizer.decode(c),
                                                   "rejected": r and tokenizer.decode(r)} for i, (c, r) in own.items()])
        print(f"own pairs: {len(used)} prompts x {cfg.own_samples} answers: a clean answer of its own for "
              f"{sum(c is not None for c, _ in sides)}, a flawed one for {sum(r is not None for _, r in sides)} (own_pairs.jsonl)")

    def with_own_answers(i: int) -> dict:
        item = train_set[i]
        for part, reply in zip(("chosen", "rejected"), own.get(i, (None, None))):
            if reply is not None:
                item[f"{part}_ids"], item[f"{part}_mask"] = prompt_and_reply(item["prompt_ids"], reply)
        return item

    def make_batch(step, rows, device):
        reference.to(device)
        return preference_batch([with_own_answers(pair_index(step, r)) for r in rows], max_len, pad_id, device)

    def loss(model, batch):
        return pair_stats(model, batch)[0]

    def evaluate(model):
        """Held-out pairs: the loss (DPO + the SFT term) and the implicit-reward metrics."""
        device = next(model.parameters()).device
        totals = {"val_loss": 0.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/accuracy": 0.0, "rewards/margin": 0.0}
        for i in range(0, len(val_ids), cfg.micro_batch_size):
            chunk = [val_set[j] for j in val_ids[i:i + cfg.micro_batch_size]]
            value, m = pair_stats(model, preference_batch(chunk, max_len, pad_id, device))
            totals["val_loss"] += float(value) * len(chunk)
            for k in ("rewards/chosen", "rewards/rejected"):
                totals[k] += float(m[k].sum())
            totals["rewards/accuracy"] += float(m["rewards/accuracy"]) * len(chunk)
            totals["rewards/margin"] += float(m["rewards/margin"]) * len(chunk)
        return {k: v / max(len(val_ids), 1) for k, v in totals.items()}

    def flaws_now(tag: str) -> dict:
        result = measure_flaws(model, tokenizer, prompts, infos, cfg.flaw_samples, cfg.flaw_temperature, seed=cfg.seed)
        write_jsonl(run.dir / f"flaws_{tag}.jsonl", result.pop("rows"))
        return result

    # 3. before: preference accuracy (the reference = the policy: exactly 50% ties, loss log 2), flaws, math
    n_test = cfg.eval_problems
    with torch.no_grad():
        before_pairs = evaluate(model)
    before_flaws = flaws_now("before")
    before_math = math_accuracy(model, tokenizer, n_test) if n_test else {}

    extra = {**policy_state_for_saving(policy), "base_checkpoint": str(start), "method": "dpo"}
    task = Task(make_batch=make_batch, loss=loss, evaluate=evaluate, checkpoint_extra=extra,
                count_tokens=lambda b: int(b["response_mask"].sum()))
    result = train(model, cfg, run.dir, task)

    # 4. after, with the best checkpoint (lowest held-out DPO loss)
    best = load_checkpoint(run.best)
    model.load_state_dict(best["model"])
    if policy.lora:  # the adapter alone (small), and below the merged model
        print(f"adapter: {save_adapter(model, run.adapter, policy.identity)}")
    # the policy as plain weights (adapters merged): what load_model, lessons 12 and 13 read
    plain = merge_lora(copy.deepcopy(model)) if policy.lora else model
    save_checkpoint(run.policy, {"model": plain.state_dict(), "step": best["step"], **extra})
    with torch.no_grad():
        after_pairs = evaluate(model)
    after_flaws = flaws_now("after")
    after_math = math_accuracy(model, tokenizer, n_test, run.dir / "tinymath_samples.jsonl") if n_test else {}
    report = {"pairs_before": before_pairs, "pairs_after": after_pairs, "flaws_before": before_flaws,
              "flaws_after": after_flaws, "tinymath_before": before_math.get("accuracy"),
              "tinymath_after": after_math.get("accuracy"), "tinymath_stderr": after_math.get("stderr"),
              "best_val_loss": result.best_value, "seconds": round(time.time() - t0, 1)}
    write_json(run.report, report)

    print(f"\nheld-out pairs ({len(val_ids)}): implicit-reward accuracy {before_pairs['rewards/accuracy']:.1%} -> "
          f"{after_pairs['rewards/accuracy']:.1%}, margin {before_pairs['rewards/margin']:+.3f} -> {after_pairs['rewards/margin']:+.3f}")
    print(f"flaws in the model's own answers ({after_flaws['n']} samples, T={cfg.flaw_temperature}):")
    print(f"  {'flaw':<14} {'before':>8} {'after':>8}")
    for flaw in FLAWS:
        print(f"  {flaw:<14} {before_flaws[flaw]:8.1%} {after_flaws[flaw]:8.1%}")
    print(f"  {'any (total)':<14} {before_flaws['total']:8.1%} {after_flaws['total']:8.1%}   (± {after_flaws['total_stderr']:.1%})")
    if n_test:
        print(f"TinyMath test ({after_math['n']} problems, greedy): {before_math['accuracy']:.1%} -> "
              f"{after_math['accuracy']:.1%} (± {after_math['stderr']:.1%})")
    print(f"took {report['seconds']:.0f} s; report in {run.report}")


if __name__ == "__main__":
    main()
