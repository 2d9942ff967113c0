"""
Lesson 6: LoRA. The same fine-tuning as lesson 5, but the pretrained weights stay frozen and only
small low-rank adapters learn: W x becomes W x + (alpha / r) * B (A x), with A (r x in) and
B (out x r), r much smaller than the layer's width.

    make lesson-6                                  # tiny preset, a few CPU minutes
    python lessons/06_sft_lora.py --r 4 --alpha 8  # another rank
    python lessons/06_sft_lora.py --fast_dev_run   # a handful of steps (runs/sft/peft/lora/fast-dev-run/)

Writes runs/sft/peft/lora/default/adapter.pth: only A and B of every adapted layer plus the
settings and the identity of the base — a small file that `--adapter_path` puts on top of the
base checkpoint in lessons 12 and 13.
"""

from dataclasses import dataclass, field

from nano.common.config import parse_config
from nano.model.lora import inject_lora, save_adapter
from nano.model.targets import DEFAULT_TARGETS
from nano.checkpoints.checkpoint import base_identity
from nano.train.sft import SFTConfig, run_sft


@dataclass
class LoRASFTConfig(SFTConfig):
    r: int = field(default=8, metadata={"help": "rank of each adapter (A is r x in, B is out x r)"})
    alpha: float = field(default=16.0, metadata={"help": "adapter output is scaled by alpha / r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input (0.05 costs ~45% of a step here: lesson 6)"})
    rslora: bool = field(default=False, metadata={"help": "scale by alpha / sqrt(r) (rank-stabilised LoRA)"})
    targets: str = field(default=",".join(DEFAULT_TARGETS), metadata={"help": "layer names to adapt (suffixes, or re:<regex>)"})
    lr: float = field(default=1e-2, metadata={"help": "peak learning rate (adapters start at zero: a high rate is fine)"})


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(LoRASFTConfig, argv)

    def prepare(model):  # run_sft prints the trainable share right after this
        inject_lora(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.lora_dropout, targets=cfg.targets, rslora=cfg.rslora)
        return model

    run = run_sft(cfg, stage="sft/peft/lora", prepare=prepare, describe=f"LoRA r={cfg.r} alpha={cfg.alpha:g}")
    path = save_adapter(run.model, run.paths.adapter, base_identity(run.base_checkpoint))
    print(f"adapter: {path} ({path.stat().st_size / 1024:.0f} KiB; the base checkpoint is untouched)")


if __name__ == "__main__":
    main()
