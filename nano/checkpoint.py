"""
Checkpoints: save a training state so that a crash loses nothing, and load a model in one call.

Two rules make checkpoints safe:
  1. Write to a temporary file in the same folder, flush it to disk, then `os.replace` it over the
     old name. A rename within one filesystem is atomic, so a kill at any moment leaves either the
     old checkpoint or the new one — never half of one.
  2. Store everything needed to rebuild the model (its config) and to check it is used with the
     right tokenizer (the tokenizer's fingerprint), not only the weights.

A checkpoint is a plain dict saved with torch.save:
    {"model": state_dict, "model_config": {...}, "tokenizer_fingerprint": "ab12...",
     "step": 300, "train_config": {...}, "optimizer": ..., "val_loss": 1.9, ...}

    model, ckpt = load_model("runs/pretrain/default/checkpoints/ckpt_best.pth")
"""

import os
from pathlib import Path
from typing import Any

import torch

# which lesson writes the checkpoints under each runs/<stage>/ folder, for "run make lesson-N first"
_STAGE_LESSON = {"pretrain": 4, "sft": 5, "rm": 8, "rlhf": 9}


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write `state` to `path` (tmp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
    os.replace(tmp, path)
    return path


def _lesson_for(path: Path) -> str:
    for stage, lesson in _STAGE_LESSON.items():
        if stage in path.parts:
            return f"run `make lesson-{lesson}` first"
    return "check the path (checkpoints live in runs/<stage>/<run>/checkpoints/)"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint dict, with a clear message when it is missing or not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} — {_lesson_for(path)}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a nano checkpoint (expected a dict with the key 'model')")
    return ckpt


def load_model(path: str | Path, device: str = "cpu", **config_overrides: Any):
    """Rebuild the model a checkpoint was trained with and load its weights.

    Returns (model, ckpt); the model is in eval mode on `device`. `config_overrides` change
    run-time settings such as attn_impl, never the shapes.
    """
    from nano.model import GemmaNano, ModelConfig

    ckpt = load_checkpoint(path)
    if "model_config" not in ckpt:
        raise ValueError(f"{path} has no 'model_config': it cannot rebuild its model")
    cfg = ModelConfig(**{**ckpt["model_config"], **config_overrides})
    model = GemmaNano(cfg)
    load_state_checked(model, ckpt["model"], source=str(path))
    return model.to(device).eval(), ckpt


def load_state_checked(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """load_state_dict, but a shape mismatch says which tensor and both shapes, in one line."""
    own = model.state_dict()
    for name, tensor in state_dict.items():
        if name in own and own[name].shape != tensor.shape:
            raise ValueError(
                f"{source} was trained with another model shape: {name} is {tuple(tensor.shape)} there "
                f"but {tuple(own[name].shape)} in this model (use the same --model preset)"
            )
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
