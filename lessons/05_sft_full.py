"""
Lesson 5: full supervised fine-tuning. The story-writer of lesson 4 learns to follow instructions
and to solve TinyMath word problems step by step, every one of its weights free to change.

    make lesson-5                                  # tiny preset, a few CPU minutes
    python lessons/05_sft_full.py --fast_dev_run   # a handful of steps, end to end (runs/sft/full/fast-dev-run/)
    python lessons/05_sft_full.py --resume         # continue runs/sft/full/default/

The batches, the masked loss and the before/after TinyMath grading are shared with lessons 6 and 7
(nano/train/sft.py); the loop is nano/train/trainer.py. What is this lesson's own: nothing is frozen.
"""

from nano.common.config import parse_config
from nano.train.sft import SFTConfig, run_sft


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(SFTConfig, argv)
    run_sft(cfg, stage="sft/full", prepare=lambda model: model, describe="full fine-tuning")


if __name__ == "__main__":
    main()
