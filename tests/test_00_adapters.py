"""
Exercise: judge your own implementation with our tests.

`impl("tokenizer")` returns nano.text.tokenizer unless NANO_IMPL_TOKENIZER names another module (an
importable name or a path to a .py file). These tests check that the switch really switches.
"""

import subprocess
import sys

import pytest

from adapters import impl
from conftest import ROOT


def test_default_is_nano():
    assert impl("paths").__name__ == "nano.common.paths"


def test_override_by_file_path(tmp_path, monkeypatch):
    mine = tmp_path / "my_paths.py"
    mine.write_text("WHO = 'learner'\n")
    monkeypatch.setenv("NANO_IMPL_PATHS", str(mine))
    assert impl("paths").WHO == "learner"


def test_override_by_module_name(tmp_path, monkeypatch):
    (tmp_path / "learner_config.py").write_text("WHO = 'learner'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("NANO_IMPL_CONFIG", "learner_config")
    assert impl("config").WHO == "learner"


def test_missing_override_file_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("NANO_IMPL_PATHS", "/no/such/file.py")
    with pytest.raises(FileNotFoundError, match="NANO_IMPL_PATHS"):
        impl("paths")


def test_a_wrong_implementation_fails_our_tests(tmp_path):
    """The point of the mechanism: a broken config module must make test_00_config fail."""
    broken = tmp_path / "broken_config.py"
    broken.write_text((ROOT / "nano" / "common" / "config.py").read_text().replace("later wins", "x").replace(
        "values[name] = _convert(fields[name], value, \"command line\")", "pass"))
    env = {"NANO_IMPL_CONFIG": str(broken), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", str(ROOT / "tests" / "test_00_config.py")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode != 0, run.stdout
    assert "failed" in run.stdout
