"""
Lesson 14 end to end (this tests the lesson script, not your module): `--self_check`, what `make all`
runs, starts the server on a free port, streams concurrent greedy requests over HTTP, checks them
against the engine, prints the numbers and stops. On the tiny pipeline of tests/conftest.py.
"""

from conftest import run_lesson


def test_self_check_serves_and_stops(pipeline_dirs, capsys):
    base = pipeline_dirs / "runs" / "pretrain" / "default" / "checkpoints" / "ckpt_best.pth"
    run_lesson("14_serve", "--self_check", "--checkpoint_path", str(base), "--check_clients", "3",
               "--check_tokens", "6")
    out = capsys.readouterr().out
    assert "bytes per token" in out and "one KV head per query head" in out  # the memory arithmetic
    assert "replies equal to the engine's own (greedy): 3/3" in out
    assert "tokens/s in total" in out


def test_missing_chat_model_says_which_lesson(nano_dirs, capsys):
    import pytest

    with pytest.raises(FileNotFoundError, match="make lesson-5"):
        run_lesson("14_serve", "--self_check")
