"""
The per-test time limit of tests/conftest.py: a test that hangs fails with an error naming its limit,
instead of stalling the run. A test that needs longer says so with @pytest.mark.time_limit(seconds).
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DEFAULT_TIME_LIMIT_S, TimeLimitExceeded, time_limit

needs_sigalrm = pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="no SIGALRM on this platform")


@needs_sigalrm
def test_a_sleeping_block_past_its_limit_fails_naming_the_limit():
    started = time.monotonic()
    with pytest.raises(TimeLimitExceeded, match=r"time limit of 0\.2 s"):
        with time_limit(0.2, "the sleeper"):
            time.sleep(5)
    assert time.monotonic() - started < 2


@needs_sigalrm
def test_a_block_within_its_limit_runs_and_leaves_no_alarm_behind():
    handler = signal.getsignal(signal.SIGALRM)
    with time_limit(5):
        time.sleep(0.01)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # cancelled on the way out
    assert signal.getsignal(signal.SIGALRM) is handler


@needs_sigalrm
def test_every_test_runs_under_the_default_limit():
    remaining, _ = signal.getitimer(signal.ITIMER_REAL)  # the autouse fixture armed it for this test
    assert 0 < remaining <= DEFAULT_TIME_LIMIT_S


@needs_sigalrm
@pytest.mark.time_limit(300)
def test_a_marker_sets_another_limit():
    remaining, _ = signal.getitimer(signal.ITIMER_REAL)
    assert DEFAULT_TIME_LIMIT_S < remaining <= 300


@needs_sigalrm
def test_a_hanging_test_fails_in_a_pytest_run(tmp_path):
    """A test that sleeps past its (tiny) marker limit, run by pytest with our conftest: it fails, in time."""
    import conftest as ours

    (tmp_path / "conftest.py").write_text(Path(ours.__file__).read_text())
    (tmp_path / "test_hang.py").write_text(
        "import time\nimport pytest\n\n\n@pytest.mark.time_limit(0.3)\ndef test_hangs():\n    time.sleep(30)\n")
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestUnknownMarkWarning",
                          "--rootdir", str(tmp_path), str(tmp_path / "test_hang.py")], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 failed" in run.stdout and "TimeLimitExceeded" in run.stdout and "time limit of 0.3 s" in run.stdout
    assert time.monotonic() - started < 25  # not the 30 s of the sleep
