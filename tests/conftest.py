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
    """Point nano.common.paths at empty temporary data/ and runs/ folders for one test."""
    monkeypatch.setenv("NANO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NANO_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path


class LessonScriptWarning(UserWarning):
    """A test ran a lesson script while NANO_IMPL_* names your module: the script imports nano's."""


def load_lesson(name: str):
    """Import lessons/<name>.py (file names start with a digit, so `import` cannot) as a module.

    A lesson script imports nano's modules, not yours: a test that runs one checks the lesson, not
    your NANO_IMPL_* module, and says so (a warning in pytest's summary) when you set one.
    """
    import importlib.util
    import os
    import warnings

    yours = sorted(k for k in os.environ if k.startswith("NANO_IMPL_"))
    if yours:
        warnings.warn(f"this test runs lessons/{name}.py, which imports nano's modules: it checks the lesson "
                      f"script, not your {', '.join(yours)}", LessonScriptWarning, stacklevel=2)

    spec = importlib.util.spec_from_file_location(f"lesson_{name}", ROOT / "lessons" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def run_lesson(name: str, *argv: str):
    """Run lessons/<name>.py's main() in this process with `argv` as its command line."""
    module = load_lesson(name)
    old_argv = sys.argv
    sys.argv = [module.__file__, *argv]
    try:
        return module.main()
    finally:
        sys.argv = old_argv


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """Lessons 0, 1, 2 and 4 at smoke-test size in a temporary folder, once per test session.

    Returns the folder; NANO_DATA_DIR / NANO_RUNS_DIR point there while a test that uses it runs.
    Later lessons' tests build on it (a tokenizer of 300 tokens, bins, a base checkpoint). A smoke
    run writes beside the real one (data/fast-dev-run/, runs/<stage>/fast-dev-run/); here the smoke
    runs ARE the pipeline, so they are sent where real runs go (--out_dir, --run_name default).
    """
    import os

    root = tmp_path_factory.mktemp("pipeline")
    old = {k: os.environ.get(k) for k in ("NANO_DATA_DIR", "NANO_RUNS_DIR")}
    os.environ["NANO_DATA_DIR"], os.environ["NANO_RUNS_DIR"] = str(root / "data"), str(root / "runs")
    try:
        run_lesson("00_data", "--fast_dev_run", "--out_dir", str(root / "data" / "raw"))
        run_lesson("01_tokenizer", "--vocab_size", "300", "--num_workers", "1")
        run_lesson("02_bins", "--num_workers", "1")
        run_lesson("04_pretrain", "--fast_dev_run", "--run_name", "default", "--context_len", "64", "--micro_batch_size", "8",
                   "--batch_size", "8")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return root


@pytest.fixture
def pipeline_dirs(tiny_pipeline, monkeypatch):
    """Point nano.common.paths at the tiny pipeline's data/ and runs/ for one test."""
    monkeypatch.setenv("NANO_DATA_DIR", str(tiny_pipeline / "data"))
    monkeypatch.setenv("NANO_RUNS_DIR", str(tiny_pipeline / "runs"))
    return tiny_pipeline
