"""
Loading a model for inference: a checkpoint, optionally quantized to NF4, optionally with a LoRA adapter.

Every tool that talks to a model (evaluation in lesson 12, the chat CLI in lesson 13, the server in
lesson 14) needs the same three steps in the same order, so they live here once:

    1. rebuild the model from its checkpoint (nano/checkpoints/checkpoint.py: load_model),
    2. quantize its projections to 4-bit NF4 if asked (nano/model/nf4.py: quantize_model) — BEFORE the
       adapter, because a QLoRA adapter was trained beside the 4-bit weights, not the fp32 ones,
    3. put the adapter on top (nano/model/lora.py: load_adapter), after checking it was made for exactly
       these base weights (its file records a fingerprint of them; another base is refused).

    model, info = load_for_inference("runs/pretrain/default/checkpoints/ckpt_best.pth",
                                     adapter_path="runs/sft/peft/lora/default/adapter.pth")
    tokenizer = load_tokenizer(info["tokenizer_fingerprint"])

`STAGES` says where each training stage leaves its model under runs/, so that evaluation can find
every one of them and the chat CLI can pick the newest.

Tested through the lessons that use it: tests/test_12_lesson.py and tests/test_13_chat.py.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nano.common.paths import BASE_CHECKPOINT, SFT_CHECKPOINT, RunPaths, runs_dir
from nano.model.lora import load_adapter, merge_lora
from nano.model.nf4 import quantize_model
from nano.checkpoints.checkpoint import base_identity, load_model, load_tokenizer

# What lesson 7 trains against and writes into its adapter's identity (nano/model/nf4.py's defaults with
# double quantization): the same quantization here reproduces the weights the adapter saw.
NF4_BLOCKSIZE = 64
NF4_DOUBLE_QUANT = True


def quantize_base(model: torch.nn.Module, identity: dict[str, Any]) -> None:
    """Lesson 7's NF4 on `model`'s projections, in place (embedding and norms stay fp32, as in QLoRA),
    and the same words lesson 7 writes into `identity`, so a QLoRA adapter made with other settings
    is refused."""
    quantize_model(model, blocksize=NF4_BLOCKSIZE, double_quant=NF4_DOUBLE_QUANT)
    identity["quantization"] = f"nf4, block {NF4_BLOCKSIZE}, double_quant {NF4_DOUBLE_QUANT}"


def load_for_inference(
    checkpoint_path: str | Path,
    adapter_path: str | Path | None = None,
    quantize: bool = False,
    device: str | torch.device = "cpu",
    merge_4bit: bool = False,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A ready model in eval mode, and `info` about what was loaded.

    info keys: "checkpoint_path", "adapter_path" (or None), "quantized" (bool), "step",
    "tokenizer_fingerprint" (the tokenizer it was trained with, or None), "model_config" (dict),
    "adapter" (what load_adapter returned, or None), "description" (one line for printing).

    An adapter on a full-precision base is merged into the weights (W + (alpha/r) B A, one matmul
    per layer instead of three, same outputs); on a 4-bit base it stays beside it (merging would
    mean dequantizing, and the memory saving is the point of --quantize) unless `merge_4bit`: then
    the base is dequantized and merged once (nano/model/lora.py: merge_lora), which gives the same
    outputs bit for bit (an unmerged layer forms the same W_hat + (alpha/r) B A in every forward)
    in less time and more memory: what an evaluation (lesson 12) wants.
    """
    checkpoint_path = Path(checkpoint_path)
    # 1. the base model (load_model says which lesson makes a missing checkpoint)
    model, ckpt = load_model(checkpoint_path, device="cpu")
    identity = base_identity(ckpt)  # (nano/checkpoints/checkpoint.py) shapes + a fingerprint of the exact weights

    # 2. 4-bit projections
    if quantize:
        quantize_base(model, identity)

    # 3. the adapter, refused (by load_adapter, with the reason) when made for other base weights
    adapter = None
    if adapter_path:
        adapter = load_adapter(model, adapter_path, base_identity=identity)
        if not quantize or merge_4bit:
            merge_lora(model)
    model = model.to(device).eval().requires_grad_(False)  # inference only: no gradients anywhere

    parts = [f"{checkpoint_path} (step {ckpt.get('step', '?')})"]
    if quantize:
        parts.append(f"NF4-quantized projections (block {NF4_BLOCKSIZE}, double quant)")
    if adapter_path:
        merged = ", merged" if not quantize else ", dequantized and merged: the same outputs" if merge_4bit else ""
        parts.append(f"+ LoRA adapter {adapter_path} (r={adapter['config']['r']}{merged})")
        if "quantization" in adapter["base_identity"] and not quantize:
            parts.append("— note: this adapter was trained on a 4-bit base; add --quantize to match it")
    info = {
        "checkpoint_path": checkpoint_path,
        "adapter_path": Path(adapter_path) if adapter_path else None,
        "quantized": quantize,
        "step": ckpt.get("step"),
        "tokenizer_fingerprint": ckpt.get("tokenizer_fingerprint"),
        "model_config": ckpt["model_config"],
        "adapter": adapter,
        "description": " ".join(parts),
    }
    return model, info


# -----------------------------------------------------------------------------------------------
# where each stage's model lives


@dataclass(frozen=True)
class Stage:
    """One trained model: a checkpoint under runs/, maybe NF4-quantized, maybe with an adapter on top."""

    name: str  # "base", "sft-full", "lora", ...
    lesson: int  # the lesson that makes it, for "not trained yet (make lesson-N)"
    checkpoint: str  # under runs/ (an absolute path also works)
    adapter: str = ""  # under runs/, "" = none
    quantize: bool = False
    chat: bool = True  # trained on the chat format (every stage after pretraining)

    def paths(self) -> tuple[Path, Path | None]:
        """(checkpoint, adapter or None) as paths; runs_dir() / an absolute path is that path."""
        return runs_dir() / self.checkpoint, (runs_dir() / self.adapter) if self.adapter else None

    def exists(self) -> bool:
        return all(p is None or p.is_file() for p in self.paths())

    def load(self, device: str | torch.device = "cpu", merge_4bit: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
        checkpoint, adapter = self.paths()
        return load_for_inference(checkpoint, adapter, quantize=self.quantize, device=device, merge_4bit=merge_4bit)


# In the order of the lessons; each one's real run (run_name "default", nano/common/paths.py: RunPaths).
STAGES: tuple[Stage, ...] = (
    Stage("base", 4, BASE_CHECKPOINT, chat=False),
    Stage("sft-full", 5, SFT_CHECKPOINT),
    Stage("lora", 6, BASE_CHECKPOINT, adapter=RunPaths.relative("sft/peft/lora").adapter.as_posix()),
    Stage("qlora", 7, BASE_CHECKPOINT, adapter=RunPaths.relative("sft/peft/qlora").adapter.as_posix(), quantize=True),
    # lessons 9-11 keep their training state (adapters, PPO's value head) in ckpt_*.pth for --resume
    # and the policy alone, as plain weights, in policy_best.pth
    Stage("dpo", 9, RunPaths.relative("rlhf/offline", method="dpo").policy.as_posix()),
    Stage("grpo", 10, RunPaths.relative("rlhf/online", method="grpo").policy.as_posix()),
    Stage("ppo", 11, RunPaths.relative("rlhf/online", method="ppo").policy.as_posix()),
)

# The chat model to talk to when none is named: the last stage of training first (RL polishes the
# SFT model), full SFT before the adapters (it changed every weight, so it learned the most).
CHAT_PREFERENCE = ("ppo", "grpo", "dpo", "sft-full", "lora", "qlora")


def default_chat_stage() -> Stage:
    """The preferred chat model that exists under runs/, or a clear error saying what to train."""
    by_name = {stage.name: stage for stage in STAGES}
    for name in CHAT_PREFERENCE:
        if by_name[name].exists():
            return by_name[name]
    raise FileNotFoundError(
        f"no chat model under {runs_dir()} (looked for {', '.join(CHAT_PREFERENCE)}) — run `make lesson-5` "
        "(supervised fine-tuning) first, or pass --checkpoint_path"
    )
