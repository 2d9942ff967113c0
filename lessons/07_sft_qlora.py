"""
Lesson 7: QLoRA. LoRA adapters trained on top of a base whose projection weights are stored in
4-bit NormalFloat (NF4), our own implementation in nano/model/nf4.py. The frozen base takes ~4.1 bits per
weight instead of 32; the adapters, the only trainable part, stay in full precision.

    make lesson-7
    python lessons/07_sft_qlora.py --double_quant false    # 4.5 bits per weight instead of ~4.127
    python lessons/07_sft_qlora.py --fast_dev_run           # a handful of steps (runs/sft/peft/qlora/fast-dev-run/)

First it prints what quantization costs and saves: model memory for fp32 / bf16 / NF4 / NF4 with
double quantization, and the error NF4 makes on this model's weights. Then it fine-tunes exactly
like lesson 6 and writes runs/sft/peft/qlora/default/adapter.pth.
"""

import copy
from dataclasses import dataclass, field

import torch

from nano.common.config import parse_config
from nano.common.paths import BASE_CHECKPOINT, input_path
from nano.model.lora import inject_lora, save_adapter
from nano.model.nf4 import bits_per_parameter, model_weight_bytes, quantization_error, quantize_model, quantize_nf4
from nano.model.targets import DEFAULT_TARGETS, name_matches, parse_targets
from nano.checkpoints.checkpoint import base_identity, load_model
from nano.train.sft import SFTConfig, run_sft


@dataclass
class QLoRASFTConfig(SFTConfig):
    r: int = field(default=8, metadata={"help": "rank of each adapter"})
    alpha: float = field(default=16.0, metadata={"help": "adapter output is scaled by alpha / r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input (0.05 costs ~45% of a step here: lesson 6)"})
    targets: str = field(default=",".join(DEFAULT_TARGETS), metadata={"help": "layers to quantize and adapt"})
    blocksize: int = field(default=64, metadata={"help": "weights per absmax scale"})
    double_quant: bool = field(default=True, metadata={"help": "quantize the absmax scales to 8 bits too"})
    lr: float = field(default=1e-2, metadata={"help": "peak learning rate (adapters start at zero: a high rate is fine)"})


def projection_bytes(model: torch.nn.Module, targets: tuple[str, ...]) -> tuple[int, int]:
    """(bytes, weights) of the target layers alone: what quantization shrinks."""
    nbytes = 0
    for name, tensor in model.state_dict().items():
        module_name = name.rpartition(".")[0]
        if name_matches(module_name, targets):
            nbytes += tensor.numel() * tensor.element_size()
    weights = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and name_matches(n, targets))
    return nbytes, weights


def memory_table(model: torch.nn.Module, targets: tuple[str, ...], blocksize: int) -> None:
    """Weight memory of the same model stored four ways, and the bits each projection weight costs."""
    _, n_proj = projection_bytes(model, targets)
    variants = {
        "fp32": model,
        "bf16": copy.deepcopy(model).to(torch.bfloat16),
        "NF4": quantize_model(copy.deepcopy(model), targets, blocksize, double_quant=False),
        "NF4 + double quant": quantize_model(copy.deepcopy(model), targets, blocksize, double_quant=True),
    }
    print(f"\nweight memory ({n_proj:,} projection weights quantized; embedding and norms stay fp32):")
    print(f"  {'storage':<20} {'whole model':>12} {'projections':>12} {'bits/weight':>12}")
    for name, variant in variants.items():
        proj, _ = projection_bytes(variant, targets)
        print(f"  {name:<20} {model_weight_bytes(variant) / 2**20:>9.2f} MiB {proj / 2**20:>8.2f} MiB "
              f"{8 * proj / n_proj:>12.3f}")
    print(f"  formula: 4 + 32/{blocksize} = {bits_per_parameter(blocksize, False):.3f} bits; with double "
          f"quantization 4 + 8/{blocksize} + 32/({blocksize}*256) = {bits_per_parameter(blocksize, True):.3f} bits")


def error_table(model: torch.nn.Module, targets: tuple[str, ...], blocksize: int, double_quant: bool) -> None:
    """How far NF4 moves this model's weights: mean |w - w_hat| and the error relative to |w|."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name_matches(name, targets):
            w = m.weight.detach().float()
            err = quantization_error(w, quantize_nf4(w, blocksize, double_quant=double_quant))
            rows.append((name, err, float(w.abs().mean())))
    mean_abs = sum(e["mean_abs"] for _, e, _ in rows) / len(rows)
    rel = sum(e["relative_rms"] for _, e, _ in rows) / len(rows)
    worst = max(rows, key=lambda r: r[1]["relative_rms"])
    print(f"\nquantization error over {len(rows)} layers: mean |w - w_hat| {mean_abs:.5f} "
          f"(weights average |w| {sum(r[2] for r in rows) / len(rows):.5f}), relative RMS error {rel:.1%}; "
          f"worst layer {worst[0]} at {worst[1]['relative_rms']:.1%}")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(QLoRASFTConfig, argv)
    targets = parse_targets(cfg.targets)

    # 1. what 4 bits cost and save, on the base model itself
    base, _ = load_model(input_path(cfg.checkpoint_path, BASE_CHECKPOINT))
    memory_table(base, targets, cfg.blocksize)
    error_table(base, targets, cfg.blocksize, cfg.double_quant)
    del base

    # 2. QLoRA: quantize the frozen base first, then put full-precision adapters beside it
    def prepare(model):
        quantize_model(model, targets, cfg.blocksize, double_quant=cfg.double_quant)
        inject_lora(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.lora_dropout, targets=targets)
        return model  # run_sft prints the trainable share next

    run = run_sft(cfg, stage="sft/peft/qlora", prepare=prepare, describe=f"QLoRA r={cfg.r} alpha={cfg.alpha:g}")
    identity = {**base_identity(run.base_checkpoint),
                "quantization": f"nf4, block {cfg.blocksize}, double_quant {cfg.double_quant}"}
    path = save_adapter(run.model, run.paths.adapter, identity)
    print(f"adapter: {path} ({path.stat().st_size / 1024:.0f} KiB); use it on the base with --quantize "
          f"(it was trained against the 4-bit weights)")


if __name__ == "__main__":
    main()
