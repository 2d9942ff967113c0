"""
The policy a preference or RL run trains, and where it starts (lessons 8-11).

Every method of lessons 9-11 trains a POLICY (the model that writes answers) and measures how far it
has moved from a frozen REFERENCE: where it started. This module sets a run up and loads both:

  * PolicyConfig / begin_run: the starting-point knobs every run shares, and its first steps
    (print the config, seed torch, find lesson 5's model),
  * load_policy: the model to train (full weights, LoRA, or LoRA on a 4-bit base) and its frozen
    reference (frozen_copy), in one `Policy`,
  * policy_state_for_saving: what a checkpoint records besides the weights, so that lessons 12 and
    13 can load the trained policy.

What a policy's answers are worth is nano/align/rollout.py (sampling, rewards) and
nano/align/logprobs.py (their log-probs, KL). Tests: `.venv/bin/python -m pytest -q tests/test_09_dpo.py tests/test_10_grpo.py`.
"""

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nano.common.config import print_config, set_threads
from nano.common.paths import SFT_CHECKPOINT, input_path
from nano.model.lora import inject_lora, load_adapter
from nano.checkpoints.checkpoint import base_identity, load_model, load_tokenizer
from nano.checkpoints.loading import quantize_base
from nano.train.trainer import TrainConfig


@dataclass
class PolicyConfig(TrainConfig):
    """Where a preference or RL run starts and how its policy trains (lessons 9-11: begin_run, load_policy)."""

    checkpoint_path: str = field(default="", metadata={"help": f"policy to start from (default runs/{SFT_CHECKPOINT})"})
    adapter_path: str = field(default="", metadata={"help": "train this LoRA adapter on top of the checkpoint"})
    quantize: bool = field(default=False, metadata={"help": "NF4 base + LoRA adapter (QLoRA); the reference is the frozen 4-bit base"})
    lora_r: int = field(default=8, metadata={"help": "train a fresh LoRA adapter of this rank (0 = full weights)"})
    eval_problems: int = field(default=200, metadata={"help": "held-out TinyMath test problems (and words requests, --reward words) graded before and after (0 = skip)"})


def begin_run(cfg: Any) -> Path:
    """What lessons 8-11 do first: print the config, seed torch, set its CPU threads; returns the
    checkpoint the run starts from (cfg.checkpoint_path, or lesson 5's model under runs/)."""
    print_config(cfg)
    torch.manual_seed(cfg.seed)
    set_threads(cfg.threads)  # TrainConfig's rule: every core by default (whole answers make big batches)
    return input_path(cfg.checkpoint_path, SFT_CHECKPOINT)


# ---------------------------------------------------------------------------------------------
# the policy to train and its reference


@torch.no_grad()
def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The reference model: a copy that never trains (eval mode, no gradients).

    DPO, GRPO and PPO all measure how far the policy has moved from where it started; the
    reference IS where it started, so it must not move with it.
    """
    return copy.deepcopy(model).eval().requires_grad_(False)


@dataclass
class Policy:
    """The model RL trains, its frozen reference, and what was loaded."""

    model: torch.nn.Module
    reference: torch.nn.Module
    tokenizer: Any
    checkpoint: dict  # the checkpoint it started from
    description: str
    lora: bool  # True: only LoRA adapters train (save them with save_adapter)
    identity: dict  # base identity for adapter files


def load_policy(checkpoint_path: str | Path, adapter_path: str | None = None, quantize: bool = False,
                lora_r: int = 0, lora_alpha: float = 16.0) -> Policy:
    """The policy and its frozen reference, in one of three set-ups:

      full weights (default)   every weight trains; reference = a frozen copy of the checkpoint
      --adapter_path / --lora_r  a LoRA adapter trains beside the frozen checkpoint (loaded from
                               the file, or fresh with rank lora_r); reference = the starting policy
      --quantize               the checkpoint's projections go to 4-bit NF4 first (QLoRA); a fresh
                               adapter (rank lora_r, 8 if unset) or the one in --adapter_path trains;
                               reference = the frozen 4-bit base (+ the adapter it started with)

    A missing checkpoint says which lesson makes it (nano/checkpoints/checkpoint.py); the tokenizer must be the
    one the checkpoint was trained with (load_tokenizer refuses another).
    """
    model, ckpt = load_model(checkpoint_path)
    tokenizer = load_tokenizer(ckpt.get("tokenizer_fingerprint"))
    identity = base_identity(ckpt)
    parts = [f"{checkpoint_path} (step {ckpt.get('step', '?')})"]
    if quantize:
        quantize_base(model, identity)
        parts.append("NF4-quantized base")
        lora_r = lora_r or 8
    if adapter_path:
        load_adapter(model, adapter_path, base_identity=identity)
        parts.append(f"+ LoRA adapter {adapter_path}")
    reference = frozen_copy(model)  # the starting policy, frozen (before any fresh adapter: B = 0 adds nothing)
    lora = bool(adapter_path) or lora_r > 0
    if lora and not adapter_path:
        inject_lora(model, r=lora_r, alpha=lora_alpha)
        parts.append(f"+ fresh LoRA r={lora_r}")
    elif adapter_path:  # load_adapter leaves the adapter trainable; freeze everything else
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    return Policy(model.train(), reference, tokenizer, ckpt, " ".join(parts), lora, identity)


def policy_state_for_saving(policy: Policy) -> dict:
    """What an RL checkpoint records besides the weights: enough for load_model and evaluation."""
    return {"model_config": asdict(policy.model.cfg), "tokenizer_fingerprint": policy.tokenizer.fingerprint(),
            "start_identity": policy.identity}
