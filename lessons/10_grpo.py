"""
Lesson 10: GRPO. The SFT model answers each TinyMath training question G times; the answers that
reach the right number are made more likely and the others less, each judged against its own group
(nano/align/grpo.py). No critic, no reward model: the reward is the grader of lesson 12.

    make lesson-10                                      # starts from lesson 5's model
    python lessons/10_grpo.py --aggregation sequence    # per-answer mean (see the doc: length bias)
    python lessons/10_grpo.py --beta 0.04               # k3 KL penalty to the reference
    python lessons/10_grpo.py --lora_r 8                # LoRA adapter only (--quantize: on a 4-bit base)
    python lessons/10_grpo.py --fast_dev_run            # a handful of steps (runs/rlhf/online/grpo-fast-dev-run/)
    python lessons/10_grpo.py --resume                  # continue runs/rlhf/online/grpo-default/

Settings are chosen on a validation split of the RL prompts (the last --val_prompts of them), never
on the test problems; ckpt_best.pth is the step with the highest held-out reward. Writes
runs/rlhf/online/grpo-default/ (checkpoints, metrics.jsonl, rl*.svg, report.json).
"""

from dataclasses import dataclass, field

from nano.common.config import parse_config
from nano.align.grpo import AGGREGATIONS, grpo_method
from nano.align.online_rl import OnlineRLConfig, run_online_rl


@dataclass
class GRPOConfig(OnlineRLConfig):
    beta: float = field(default=0.0, metadata={"help": "weight of the k3 KL penalty to the reference (0 = none)"})
    aggregation: str = field(default="token", metadata={"help": "token: mean over all response tokens; sequence: mean of per-answer means",
                                                        "choices": list(AGGREGATIONS)})
    step_credit: float = field(default=0.0, metadata={"help": "+/- this on the tokens of each right/wrong written arithmetic result"})
    step_penalty: float = field(default=-1.0, metadata={"help": "- this on wrong results (-1: the same as step_credit)"})
    outcome_weight: float = field(default=1.0, metadata={"help": "scale of the group advantage of the final answer (0: step credit alone)"})
    # defaults of this lesson alone (those it shares with the other online method are OnlineRLConfig's)
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (of the adapter)"})


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(GRPOConfig, argv)
    run_online_rl(cfg, "rlhf/online", grpo_method(cfg.beta, cfg.aggregation, cfg.clip_eps, cfg.step_credit, cfg.outcome_weight,
                                                 None if cfg.step_penalty < 0 else cfg.step_penalty))


if __name__ == "__main__":
    main()
