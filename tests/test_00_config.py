"""
Exercise: the config system (nano/common/config.py).

Implement `parse_config(cls, argv)` so that a lesson's dataclass of defaults can be changed by a
JSON file (`--config`) and by `--field value` flags, in that order, and so that every mistake —
an unknown field, a value of the wrong type, a value outside `choices` — is an error that names
the field. Also: the checkpoint helpers write atomically and refuse what is not theirs.
"""

import json
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

from adapters import impl

config = impl("config")


@dataclass
class Demo:
    steps: int = field(default=10, metadata={"help": "optimizer steps"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    model: str = field(default="tiny", metadata={"help": "preset", "choices": ["tiny", "nano"]})
    fast_dev_run: bool = field(default=False, metadata={"help": "a few steps only"})
    limit: Optional[int] = field(default=None, metadata={"help": "cap on examples"})

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError("steps must be >= 0")


def parse(argv):
    return config.parse_config(Demo, argv, exit_on_error=False)


def test_defaults_and_overrides():
    assert parse([]) == Demo()
    cfg = parse(["--steps", "5", "--lr=3e-4", "--model", "nano", "--fast_dev_run", "--limit", "7"])
    assert (cfg.steps, cfg.lr, cfg.model, cfg.fast_dev_run, cfg.limit) == (5, 3e-4, "nano", True, 7)
    assert parse(["--fast_dev_run", "false"]).fast_dev_run is False
    assert parse(["--limit", "none"]).limit is None
    assert parse(["--steps", "1e3"]).steps == 1000


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"_comment": "notes are allowed", "steps": 99, "model": "nano"}))
    cfg = parse(["--steps", "3", "--config", str(path)])  # flags win wherever the file stands
    assert (cfg.steps, cfg.model) == (3, "nano")
    assert parse(["--config_path", str(path)]).steps == 99


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--stepz", "3"], ["stepz", "steps"]),  # unknown field, with a suggestion
        (["--steps", "three"], ["steps", "int"]),
        (["--steps", "1.5"], ["steps", "int"]),
        (["--model", "huge"], ["model", "tiny", "nano"]),
        (["--fast_dev_run", "--steps"], ["steps", "needs a value"]),
        (["--steps", "-1"], ["steps must be >= 0"]),
        (["steps"], ["unexpected argument"]),
        (["--config", "no_such_preset"], ["no_such_preset"]),
    ],
)
def test_errors_name_the_field(argv, words):
    with pytest.raises(config.ConfigError) as err:
        parse(argv)
    for word in words:
        assert word in str(err.value)


def test_bad_config_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"steps": 3, "colour": "red"}')
    with pytest.raises(config.ConfigError, match="colour"):
        parse(["--config", str(bad)])
    bad.write_text("{not json")
    with pytest.raises(config.ConfigError, match="not valid JSON"):
        parse(["--config", str(bad)])


def test_script_mode_exits_with_status_2(capsys):
    with pytest.raises(SystemExit) as e:
        config.parse_config(Demo, ["--nope", "1"])
    assert e.value.code == 2
    assert "nope" in capsys.readouterr().err


def test_save_config_round_trips(tmp_path):
    cfg = parse(["--steps", "4"])
    path = config.save_config(cfg, tmp_path / "run")
    assert parse(["--config", str(path)]) == cfg


def test_presets_in_lessons_configs_parse():
    """Every preset file shipped in lessons/configs/ is valid JSON with a known lesson prefix."""
    from nano.common.paths import CONFIGS_DIR

    for preset in CONFIGS_DIR.glob("*.json"):
        assert isinstance(json.loads(preset.read_text()), dict), preset


def test_checkpoint_atomic_write_keeps_old_on_failure(tmp_path, monkeypatch):
    checkpoint, fileio = impl("checkpoint"), impl("fileio")
    path = tmp_path / "ckpt.pth"
    fileio.save_checkpoint(path, {"model": {"w": torch.ones(2)}, "model_config": {}, "step": 1})

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError):
        fileio.save_checkpoint(path, {"model": {}, "model_config": {}, "step": 2})
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path)["step"] == 1


def test_checkpoint_errors_say_what_to_run(tmp_path):
    checkpoint = impl("checkpoint")
    with pytest.raises(FileNotFoundError, match="make lesson-4"):
        checkpoint.load_checkpoint(tmp_path / "runs" / "pretrain" / "x" / "ckpt_best.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        checkpoint.load_checkpoint(junk)
