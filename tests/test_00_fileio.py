"""
Writing files safely (nano/common/fileio.py): a crash mid-write leaves the old file whole and no NAME.tmp.

Every lesson's outputs go through `atomic_open` (checkpoints, bins, metrics, configs, plots), so
these few checks stand behind "nothing is lost on a crash".
"""

import pytest

from nano.common import fileio


def test_a_failed_write_keeps_the_old_file_and_leaves_no_tmp(tmp_path):
    path = tmp_path / "out" / "data.txt"
    fileio.write_text(path, "old")
    with pytest.raises(RuntimeError):
        with fileio.atomic_open(path) as f:
            f.write("half of the new")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert not fileio.tmp_path(path).exists()


def test_ctrl_c_mid_write_is_cleaned_up_too(tmp_path):
    path = tmp_path / "data.bin"
    with pytest.raises(KeyboardInterrupt):
        with fileio.atomic_open(path, "wb") as f:
            f.write(b"\x00" * 10)
            raise KeyboardInterrupt
    assert not path.exists() and not fileio.tmp_path(path).exists()


def test_jsonl_round_trip_and_a_bad_line_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    assert fileio.write_jsonl(path, ({"i": i, "text": "é"} for i in range(3))) == 3
    fileio.append_jsonl(path, {"i": 3})
    assert fileio.read_jsonl(path) == [{"i": 0, "text": "é"}, {"i": 1, "text": "é"}, {"i": 2, "text": "é"}, {"i": 3}]
    path.write_text('{"i": 0}\n\n{"i": 1\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:3: not valid JSON .* — run make lesson-0"):
        fileio.read_jsonl(path, hint="run make lesson-0")


def test_only_new_files_are_opened(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with fileio.atomic_open(tmp_path / "x", "a"):
            pass
