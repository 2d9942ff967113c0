"""
Writing files so that a crash never leaves half of one, and reading the JSON-lines files lessons share.

Every lesson writes files that a later lesson trusts: data, tokenizer, bins, checkpoints, metrics.
A run killed mid-write (Ctrl-C, out of memory, a power cut) must not leave a file that *looks*
finished. The one rule, used everywhere in the project through `atomic_open`:

    1. write to NAME.tmp in the same folder,
    2. flush and fsync it, so the bytes are on disk,
    3. os.replace(NAME.tmp, NAME): a rename within one filesystem is atomic, so a reader sees the
       old file or the new one, never a mix. If anything fails before step 3, NAME.tmp is removed.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "rows.jsonl"
    >>> write_jsonl(path, [{"a": 1}, {"b": "é"}])
    2
    >>> read_jsonl(path)
    [{'a': 1}, {'b': 'é'}]
"""

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator


def tmp_path(path: str | Path) -> Path:
    """Where `path` is written before the rename that makes it appear whole: NAME.tmp beside it."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open NAME.tmp for writing; on a clean exit fsync it and rename it to NAME, else delete it.

    with atomic_open("data/raw/stories.txt") as f:     # text ("w") or bytes ("wb")
        f.write(...)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a new file: mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    # newline="\n": the same bytes on every platform (hashes of written files must not depend on it)
    text_args = {"encoding": encoding, "newline": "\n"} if mode == "w" else {}
    f = open(tmp, mode, **text_args)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
        f.close()
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: no half-written file is left behind
        f.close()
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write a string (UTF-8)."""
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Atomically write bytes."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically torch.save a dict of tensors and plain values (a checkpoint, an adapter)."""
    import torch  # here, not at the top: the data and tokenizer lessons use this module and never need torch

    with atomic_open(path, "wb") as f:
        torch.save(state, f)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write one JSON document, indented for reading, with a final newline."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Atomically write one JSON object per line; returns the number of rows."""
    count = 0
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def append_jsonl(path: str | Path, row: dict) -> None:
    """Add one line to a log (metrics.jsonl): appending cannot corrupt the lines already there."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path, hint: str = "") -> list[dict]:
    """One dict per non-empty line; a bad line is an error naming the file, the line and `hint`."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({e}){' — ' + hint if hint else ''}") from None
    return rows
