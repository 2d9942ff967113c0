"""
Lesson 11: PPO, the classic RLHF algorithm: an actor (the policy) and a critic (a value head on the
policy's own backbone), a per-token KL penalty to the reference folded into the reward, the answer's
score at its last token, GAE advantages, and several clipped epochs over each buffer of rollouts
(nano/align/ppo.py).

    make lesson-11                                     # --reward math: the TinyMath grader
    python lessons/11_ppo.py --reward rm --prompts preferences   # lesson 8's reward model on story prompts
    python lessons/11_ppo.py --lora_r 8                # LoRA adapter only (--quantize: on a 4-bit base)
    python lessons/11_ppo.py --fast_dev_run           # a handful of steps (runs/rlhf/online/ppo-fast-dev-run/)

Writes runs/rlhf/online/ppo-default/: checkpoints/ckpt_best.pth (actor + critic, for --resume),
checkpoints/policy_best.pth (the policy alone: what lessons 12 and 13 load), metrics.jsonl, rl*.svg,
report.json.
"""

from dataclasses import dataclass, field

from nano.common.config import parse_config
from nano.align.online_rl import OnlineRLConfig, run_online_rl
from nano.align.ppo import ppo_method


@dataclass
class PPOConfig(OnlineRLConfig):
    kl_coef: float = field(default=0.02, metadata={"help": "per-token KL penalty in the reward"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss (it shares the policy's layers)"})
    value_clip: float = field(default=0.2, metadata={"help": "the value may move this far from its old estimate per buffer"})
    gamma: float = field(default=1.0, metadata={"help": "discount per token (1: the answer's end counts in full)"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda: 0 = one-step TD, 1 = Monte-Carlo returns"})
    # defaults of this lesson alone (those it shares with the other online method are OnlineRLConfig's)
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate (of the adapter and the value head)"})
    epochs: int = field(default=2, metadata={"help": "passes over each rollout buffer"})


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(PPOConfig, argv)
    run_online_rl(cfg, "rlhf/online", ppo_method(cfg.kl_coef, cfg.clip_eps, cfg.value_clip, cfg.vf_coef, cfg.gamma, cfg.lam))


if __name__ == "__main__":
    main()
