"""
One small config system for every lesson: a dataclass of defaults, optional JSON files, and
`--field value` overrides on the command line.

Each lesson declares its knobs as a dataclass with a comment (`help`) on every field:

    @dataclass
    class PretrainConfig:
        steps: int = field(default=300, metadata={"help": "optimizer steps"})
        model: str = field(default="tiny", metadata={"help": "model preset", "choices": ["tiny", "nano"]})

and resolves them, in this order (later wins):

    1. the dataclass defaults,
    2. a JSON file given with `--config PATH` (alias `--config_path`); a bare name such as
       `--config 04_pretrain_nano_gpu` is looked up in lessons/configs/,
    3. `--field value` (or `--field=value`) flags; a bool flag alone (`--fast_dev_run`) means true.

Unknown fields and bad values are errors that name the field and what it accepts, so a typo never
silently trains the wrong thing. The resolved config is printed and saved beside the run's outputs.

Run `python lessons/00_data.py --help` to see the result for one lesson.
"""

import dataclasses
import difflib
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

from nano.common.fileio import write_json
from nano.common.paths import CONFIG_FILE, CONFIGS_DIR

C = TypeVar("C")


_BOOL_WORDS = ("1", "true", "yes", "on", "0", "false", "no", "off")


class ConfigError(ValueError):
    """A config file or flag that does not fit the lesson's dataclass."""


def _field_type(f: dataclasses.Field) -> type:
    """The plain type of a field: int, float, str or bool (`Optional[int]` -> int)."""
    t = f.type
    if isinstance(t, str):  # `from __future__ import annotations` stores the name only
        t = {"int": int, "float": float, "str": str, "bool": bool}.get(t.replace("Optional[", "").rstrip("]"), str)
    origin = typing.get_origin(t)
    if origin is typing.Union or origin is types.UnionType:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def _optional(f: dataclasses.Field) -> bool:
    return type(None) in typing.get_args(f.type) or (isinstance(f.type, str) and "Optional" in f.type)


def _convert(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Turn a string (from the command line) or a JSON value into the field's type, or fail clearly."""
    kind = _field_type(f)
    if value is None or (isinstance(value, str) and value.lower() == "none" and _optional(f)):
        if _optional(f):
            return None
        raise ConfigError(f"{where}: field '{f.name}' cannot be empty (expects {kind.__name__})")
    try:
        if kind is bool:
            if isinstance(value, bool):
                out = value
            elif str(value).lower() in ("1", "true", "yes", "on"):
                out = True
            elif str(value).lower() in _BOOL_WORDS[4:]:
                out = False
            else:
                raise ValueError
        elif kind is int:
            # accept 1e6 or 1_000_000 for ints, but refuse 1.5
            as_float = float(str(value).replace("_", ""))
            if as_float != int(as_float):
                raise ValueError
            out = int(as_float)
        elif kind is float:
            out = float(value)
        else:
            out = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: field '{f.name}' expects {kind.__name__}, got {value!r}") from None
    choices = f.metadata.get("choices")
    if choices is not None and out not in choices:
        raise ConfigError(f"{where}: field '{f.name}' must be one of {list(choices)}, got {out!r}")
    return out


def _unknown(name: str, known: Sequence[str], cls: type, where: str) -> ConfigError:
    hint = difflib.get_close_matches(name, known, n=1)
    maybe = f" Did you mean '{hint[0]}'?" if hint else ""
    return ConfigError(
        f"{where}: unknown field '{name}' for {cls.__name__}.{maybe} Known fields: {', '.join(known)}"
    )


def _resolve_config_file(name: str) -> Path:
    """A path as given, or a bare preset name found in lessons/configs/."""
    for candidate in (Path(name), CONFIGS_DIR / name, CONFIGS_DIR / f"{name}.json"):
        if candidate.is_file():
            return candidate
    presets = sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))
    raise ConfigError(f"--config: no file '{name}' (presets in {CONFIGS_DIR}: {', '.join(presets) or 'none'})")


def config_help(cls: type) -> str:
    """A `--help` text: each field with its type, default and comment."""
    lines = [f"{cls.__name__} fields (set with --field value, or --config FILE.json):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
        choices = f" one of {f.metadata['choices']}" if "choices" in f.metadata else ""
        lines.append(f"  --{f.name:<22} {_field_type(f).__name__:<5} = {default!r:<14} {f.metadata.get('help', '')}{choices}")
    return "\n".join(lines)


def parse_config(cls: type[C], argv: Sequence[str] | None = None, exit_on_error: bool = True) -> C:
    """Build a `cls` from defaults, an optional --config file and --field overrides.

    parse_config(PretrainConfig, ["--steps", "10", "--fast_dev_run"])
      -> PretrainConfig(steps=10, fast_dev_run=True, ...everything else default)

    With exit_on_error (the scripts), a bad flag prints one line and exits with status 2;
    without it (the tests), ConfigError is raised.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _parse(cls, argv)
    except ConfigError as e:
        if not exit_on_error:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def _parse(cls: type[C], argv: list[str]) -> C:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}

    # 1. split argv into (name, value) pairs; `--name=value`, `--name value`, or a bare bool flag
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(config_help(cls))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: flags look like --field value")
        name, eq, value = arg[2:].partition("=")
        if name not in fields and name not in ("config", "config_path"):
            raise _unknown(name, list(fields), cls, "command line")
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if eq:  # --name=value
            i += 1
        elif name in fields and _field_type(fields[name]) is bool and (nxt is None or nxt.lower() not in _BOOL_WORDS):
            value, i = "true", i + 1  # a bare bool flag: --fast_dev_run
        elif nxt is None or nxt.startswith("--"):
            raise ConfigError(f"command line: --{name} needs a value")
        else:
            value, i = nxt, i + 2
        pairs.append((name, value))

    # 2. a config file first (wherever it stood), then the flags on top of it
    for name, value in pairs:
        if name in ("config", "config_path"):
            path = _resolve_config_file(value)
            try:
                from_file = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(from_file, dict):
                raise ConfigError(f"{path}: expected a JSON object of field: value")
            for key, v in from_file.items():
                if key.startswith("_"):  # "_comment": ... keys are notes for the reader
                    continue
                if key not in fields:
                    raise _unknown(key, list(fields), cls, str(path))
                values[key] = _convert(fields[key], v, str(path))
    for name, value in pairs:
        if name in ("config", "config_path"):
            continue
        values[name] = _convert(fields[name], value, "command line")

    # 3. build it; a dataclass may check combinations in __post_init__ by raising ValueError
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def print_config(cfg: Any) -> None:
    """Print the resolved config, one field a line, so every run says what it actually used."""
    print(f"{type(cfg).__name__}:")
    for k, v in config_to_dict(cfg).items():
        print(f"  {k:<22} {v!r}")


def save_config(cfg: Any, out_dir: str | Path, name: str = CONFIG_FILE) -> Path:
    """Write the resolved config beside a run's outputs (rerun it with --config that file)."""
    return write_json(Path(out_dir) / name, config_to_dict(cfg))


# --seed has one default in every lesson: the same number seeds the data generator (lesson 0), the
# weights and batches of every training run, and what the other lessons draw to show you.
DEFAULT_SEED = 1337


# --threads means the same in every lesson: torch's CPU threads, 0 = torch's default (one per core).
# Its default follows one rule. Where the work is big batches of matrix products (training, lessons
# 4-11), the cores share it well: 0. Where it is generating a token at a time (evaluation, chat,
# serving: lessons 12-14), each operation is small and a second thread mostly waits for the first,
# and much more so next to a busy program (lesson 12's doc measures it): 1.
THREADS_FOR_BATCHES = 0
THREADS_FOR_DECODING = 1


def threads_field(default: int) -> Any:
    """The --threads field of a lesson's config: THREADS_FOR_BATCHES or THREADS_FOR_DECODING."""
    return dataclasses.field(default=default, metadata={
        "help": "torch CPU threads (0 = torch's default, one per core; 1 if another program keeps a core busy)"})


def set_threads(threads: int) -> None:
    """Apply --threads: N > 0 sets torch's CPU threads to N; 0 leaves torch's default."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def pick_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is there, else 'cpu'; anything else is used as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
