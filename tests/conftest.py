"""Shared test set-up: the repository root on sys.path, and data/runs folders that never touch yours."""

import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# The tests use small tensors, where a second thread costs more in hand-over than it saves (and
# oversubscribes a busy machine badly). One thread keeps the suite fast and its timings steady.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


# ---------------------------------------------------------------------------------------------
# a time limit per test: a test that hangs fails with a clear error instead of stalling the whole run

DEFAULT_TIME_LIMIT_S = 120.0  # generous: the slowest test takes well under a minute on a slow CI host


class TimeLimitExceeded(Exception):
    """A test ran past its time limit (DEFAULT_TIME_LIMIT_S, or its @pytest.mark.time_limit(seconds))."""


@contextmanager
def time_limit(seconds: float, what: str = "the test"):
    """Raise TimeLimitExceeded inside the block once it has run `seconds` (wall clock), via SIGALRM.

    Where there is no SIGALRM (Windows), or off the main thread (signals reach only the main thread),
    the block runs without a limit.
    """
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise TimeLimitExceeded(f"{what} ran past its time limit of {seconds:g} s (a hang?); a test that needs "
                                f"longer says so with @pytest.mark.time_limit(seconds)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def _time_limit(request):
    """Every test under tests/ runs under time_limit: DEFAULT_TIME_LIMIT_S, or @pytest.mark.time_limit(seconds)."""
    marker = request.node.get_closest_marker("time_limit")
    seconds = float(marker.args[0]) if marker else DEFAULT_TIME_LIMIT_S
    with time_limit(seconds, request.node.nodeid):
        yield


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
