"""
Where every lesson reads and writes, in one place.

Each lesson builds on the files of the one before it, so the paths must agree. They are all
relative to the repository root (not the current directory), so a script works from any folder.
Set NANO_DATA_DIR / NANO_RUNS_DIR to move them (the tests do, into temporary folders).
"""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # nano/common/paths.py -> the repository
LESSONS_DIR = REPO_ROOT / "lessons"
CONFIGS_DIR = LESSONS_DIR / "configs"


def data_dir() -> Path:
    """data/: datasets (raw/), the tokenizer (tokenizer/) and token bins (bins/)."""
    return Path(os.environ.get("NANO_DATA_DIR", REPO_ROOT / "data"))


def raw_dir() -> Path:
    """data/raw/: what lesson 0 writes (stories, conversations, TinyMath, preferences, prompts)."""
    return data_dir() / "raw"


def tokenizer_dir() -> Path:
    """data/tokenizer/: what lesson 1 writes."""
    return data_dir() / "tokenizer"


def bins_dir() -> Path:
    """data/bins/: what lesson 2 writes."""
    return data_dir() / "bins"


def runs_dir() -> Path:
    """runs/: checkpoints, metrics and plots of every training stage."""
    return Path(os.environ.get("NANO_RUNS_DIR", REPO_ROOT / "runs"))


# lesson 4's best pretraining checkpoint, under runs/: where SFT (lessons 5-7) starts and what
# evaluation calls the "base" model
BASE_CHECKPOINT = "pretrain/default/checkpoints/ckpt_best.pth"


def require(path: Path, what: str, lesson: int) -> Path:
    """Return `path` if it exists, else stop with a message that says which lesson makes it.

    >>> require(Path("/nope"), "token bins", 2)
    Traceback (most recent call last):
    FileNotFoundError: no token bins at /nope — run `make lesson-2` first
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"no {what} at {path} — run `make lesson-{lesson}` first")
    return Path(path)
