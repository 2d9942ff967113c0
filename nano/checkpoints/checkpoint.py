"""
Checkpoints and model identity: save a training state so that a crash loses nothing, load a model in
one call, and know exactly which weights and which tokenizer a file belongs to.

Two rules make checkpoints safe:
  1. Write to a temporary file in the same folder, flush it to disk, then `os.replace` it over the
     old name (nano/common/fileio.py: save_checkpoint). A rename within one filesystem is atomic, so a kill at
     any moment leaves either the old checkpoint or the new one — never half of one.
  2. Store everything needed to rebuild the model (its config) and to check it is used with the
     right tokenizer (the tokenizer's fingerprint), not only the weights.

Identity: a fingerprint is a short hash of exact bytes. `state_fingerprint(weights)` names a base
model (a LoRA adapter or a reward model records it, and is refused on any other base);
`Tokenizer.fingerprint()` names a tokenizer (the same id means other text under another one, so a
model is refused with the wrong tokenizer: `load_tokenizer`).

A checkpoint is a plain dict saved with torch.save:
    {"model": state_dict, "model_config": {...}, "tokenizer_fingerprint": "ab12...",
     "step": 300, "train_config": {...}, "optimizer": ..., "val_loss": 1.9, ...}

    model, ckpt = load_model("runs/pretrain/default/checkpoints/ckpt_best.pth")
"""

import hashlib
from pathlib import Path
from typing import Any

import torch

from nano.common.paths import RunPaths, require, tokenizer_dir
from nano.text.tokenizer import Tokenizer
from nano.model.gemma import GemmaNano, ModelConfig

# which lesson writes the checkpoints under each runs/<stage>/ folder, for "run make lesson-N first"
_STAGE_LESSON = {"pretrain": 4, "sft": 5, "rm": 8, "rlhf": 9}


def _lesson_for(path: Path) -> str:
    for stage, lesson in _STAGE_LESSON.items():
        if stage in path.parts:
            return f"run `make lesson-{lesson}` first"
    where = RunPaths.relative("runs/<stage>", "<run_name>").checkpoints.as_posix()
    return f"check the path (checkpoints live in {where}/)"


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


# ---------------------------------------------------------------------------------------------
# identity: which weights, which tokenizer


def state_fingerprint(state_dict: dict[str, Any]) -> str:
    """A short hash of a state_dict's names, shapes, dtypes and bytes: the identity of a base model.

    Two checkpoints with the same fingerprint hold the same weights. Computed over sorted names, so
    the order of the dict does not matter; non-tensor entries (extra state) are skipped.

    >>> a = {"w": torch.ones(2), "b": torch.zeros(1)}
    >>> state_fingerprint(a) == state_fingerprint({"b": torch.zeros(1), "w": torch.ones(2)})
    True
    >>> state_fingerprint(a) == state_fingerprint({"w": torch.ones(2) * 2, "b": torch.zeros(1)})
    False
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        # view as raw bytes: works for every dtype, including bf16 which numpy cannot hold
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def base_identity(ckpt: dict[str, Any]) -> dict[str, Any]:
    """What a model built on top of a checkpoint records about it: its shapes and its exact weights.

    A LoRA adapter stores this and is refused on any base whose identity differs (nano/model/lora.py).
    """
    return {"model_config": ckpt["model_config"], "checkpoint": state_fingerprint(ckpt["model"])}


def load_tokenizer(expected_fingerprint: str | None = None) -> Tokenizer:
    """Lesson 1's tokenizer, refused if a checkpoint was trained with another one.

    The same id means different text under another tokenizer: the model would read gibberish and
    the evaluation would grade nonsense, without any error. So the checkpoint's recorded
    fingerprint (ckpt["tokenizer_fingerprint"]) must match the tokenizer on disk.
    """
    if expected_fingerprint is not None and not isinstance(expected_fingerprint, str):
        raise TypeError(f"load_tokenizer takes the fingerprint string ckpt['tokenizer_fingerprint'], "
                        f"not a {type(expected_fingerprint).__name__}")
    path = require(tokenizer_dir() / "tokenizer.json", "tokenizer", 1)
    tokenizer = Tokenizer.load(path)
    if expected_fingerprint is not None and tokenizer.fingerprint() != expected_fingerprint:
        raise ValueError(
            f"the checkpoint was trained with tokenizer {expected_fingerprint}, but {path} is "
            f"{tokenizer.fingerprint()}: retrain the model with this tokenizer (make lesson-4) "
            "or restore the tokenizer it was trained with"
        )
    return tokenizer
