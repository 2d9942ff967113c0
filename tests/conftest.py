"""Shared test set-up: the repository root on sys.path, and data/runs folders that never touch yours."""

import sys
from pathlib import Path

import pytest
import torch

# The tests use small tensors, where a second thread costs more in hand-over than it saves (and
# oversubscribes a busy machine badly). One thread keeps the suite fast and its timings steady.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture
def nano_dirs(tmp_path, monkeypatch):
    """Point nano.paths at empty temporary data/ and runs/ folders for one test."""
    monkeypatch.setenv("NANO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NANO_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path
