"""
One summary table for `make bench`: each benchmark records its headline numbers here, and
`python bench/results.py` prints them all, with the date and the machine they were measured on.

    from results import record
    record("bench_model", "training tok/s, tiny: gemma vs gpt", "7,645 vs 9,435 (0.81x)")

Records go to runs/bench/results.jsonl (one line each; a benchmark that runs again replaces its own
lines). The table says where each number comes from: the script, and the command to rerun it.
"""

import datetime
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nano.common.fileio import read_jsonl, write_jsonl  # noqa: E402  (the repository root is on sys.path from here)
from nano.common.paths import runs_dir  # noqa: E402


def results_path() -> Path:
    return runs_dir() / "bench" / "results.jsonl"


def machine() -> str:
    """'2 CPU cores, x86_64, torch 2.13.0' (and the GPU's name when there is one)."""
    import torch

    where = f"{os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}"
    if torch.cuda.is_available():
        where += f", {torch.cuda.get_device_name(0)}"
    return where


_started: set[str] = set()  # benchmarks that have recorded in this process (their older lines are dropped)


def record(bench: str, what: str, result: str, command: str = "") -> None:
    """Add one headline number of `bench` (its file name without .py) to the summary."""
    path = results_path()
    rows = read_jsonl(path) if path.exists() else []
    if bench not in _started:  # a new run of this benchmark replaces everything it recorded before
        rows = [r for r in rows if r["bench"] != bench]
        _started.add(bench)
    rows.append({"bench": bench, "what": what, "result": result, "command": command or f"python bench/{bench}.py",
                 "date": datetime.date.today().isoformat(), "machine": machine()})
    write_jsonl(path, rows)


def summary() -> str:
    """The recorded numbers as one markdown table."""
    path = results_path()
    if not path.exists():
        return f"no benchmark results yet ({path}): run `make bench`"
    rows = read_jsonl(path)
    lines = ["| benchmark | what | result | date, machine | command |", "|---|---|---|---|---|"]
    lines += [f"| {r['bench']} | {r['what']} | {r['result']} | {r['date']}, {r['machine']} | `{r['command']}` |"
              for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary())
