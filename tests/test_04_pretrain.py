"""
Exercise: lesson 4 end to end (lessons/04_pretrain.py on top of nano/train/trainer.py and nano/model/gemma.py).

Make pretraining work on the real model: one optimizer step on a fixed batch must lower the loss,
a smoke run (--fast_dev_run) must leave checkpoints, metrics, a loss curve and samples, and every
mistake a learner is likely to make — running lesson 4 before lesson 2, resuming with another model
size, a typo in a flag — must stop with a message that says what to do.
"""

import json

import pytest
import torch

from adapters import impl
from conftest import run_lesson

model_lib = impl("gemma")
trainer = impl("trainer")


def test_one_step_on_a_fixed_batch_lowers_the_loss():
    torch.manual_seed(0)
    model = model_lib.GemmaNano(model_lib.model_config("tiny", vocab_size=64, context_len=32))
    x = torch.randint(0, 64, (4, 32))
    y = torch.roll(x, -1, dims=1)
    optimizer = trainer.make_optimizer(model, trainer.TrainConfig(lr=1e-2))
    before = model(x, targets=y)[1]
    before.backward()
    optimizer.step()
    after = model(x, targets=y)[1]
    assert after.item() < before.item() - 0.01


def test_fast_dev_run_writes_everything(pipeline_dirs):
    run = pipeline_dirs / "runs" / "pretrain" / "default"
    for name in ["checkpoints/ckpt_best.pth", "checkpoints/ckpt_last.pth", "metrics.jsonl", "loss.svg",
                 "samples.txt", "config.json"]:
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [0, 1, 2, 3]
    evals = [r for r in rows if "val_loss" in r]
    assert evals and all(0 < r["val_bpb"] < 16 for r in evals)
    # the coherence measures of each evaluation's samples (nano/eval/coherence.py), and their curve
    assert all(r["names_per_story"] >= 0 for r in evals) and "pronoun_agreement" in evals[-1]
    assert (run / "coherence.svg").read_text().startswith("<svg")
    assert "=== step" in (run / "samples.txt").read_text()
    ckpt = torch.load(run / "checkpoints" / "ckpt_last.pth", weights_only=False)
    assert ckpt["step"] == 4 and ckpt["model_config"]["context_len"] == 64 and ckpt["tokenizer_fingerprint"]


def test_resume_continues_where_it_stopped(pipeline_dirs):
    args = ["--fast_dev_run", "--context_len", "64", "--micro_batch_size", "8", "--batch_size", "8",
            "--run_name", "resumed"]
    run_lesson("04_pretrain", *args)
    first = torch.load(pipeline_dirs / "runs/pretrain/resumed/checkpoints/ckpt_last.pth", weights_only=False)
    # resuming a finished run trains no further step and keeps the weights
    run_lesson("04_pretrain", *args, "--resume")
    again = torch.load(pipeline_dirs / "runs/pretrain/resumed/checkpoints/ckpt_last.pth", weights_only=False)
    assert again["step"] == first["step"] == 4
    for name, tensor in first["model"].items():
        assert torch.equal(tensor, again["model"][name]), name


def test_missing_bins_says_run_lesson_2(pipeline_dirs, monkeypatch, tmp_path):
    # a data folder with the tokenizer but no bins
    data = tmp_path / "data"
    (data / "tokenizer").mkdir(parents=True)
    (data / "tokenizer" / "tokenizer.json").write_bytes((pipeline_dirs / "data/tokenizer/tokenizer.json").read_bytes())
    monkeypatch.setenv("NANO_DATA_DIR", str(data))
    with pytest.raises(FileNotFoundError, match="make lesson-2"):
        run_lesson("04_pretrain", "--fast_dev_run")


def test_missing_tokenizer_says_run_lesson_1(nano_dirs):
    with pytest.raises(FileNotFoundError, match="make lesson-1"):
        run_lesson("04_pretrain", "--fast_dev_run")


def test_load_tokenizer_wants_the_fingerprint_not_the_checkpoint(pipeline_dirs):
    load_tokenizer = impl("checkpoint").load_tokenizer
    with pytest.raises(TypeError, match="tokenizer_fingerprint"):  # a short message, not the whole state dict
        load_tokenizer({"model": {}, "tokenizer_fingerprint": "abc"})


def test_resuming_with_another_model_shape_is_refused(pipeline_dirs):
    with pytest.raises(ValueError, match="another model shape"):
        run_lesson("04_pretrain", "--fast_dev_run", "--model", "nano", "--resume", "--run_name", "default")


def test_unknown_flag_names_the_field(pipeline_dirs, capsys):
    with pytest.raises(SystemExit) as e:
        run_lesson("04_pretrain", "--learning_rate", "1e-3")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "lr" in err


def test_resumed_lesson_run_equals_an_unbroken_one(pipeline_dirs):
    """Lesson 4's own batches (make_batch in lessons/04_pretrain.py) must be a function of
    (seed, step, row): a run stopped after 2 steps and resumed computes what an unbroken run does."""
    common = ["--context_len", "64", "--micro_batch_size", "8", "--batch_size", "8", "--schedule", "constant",
              "--warmup_steps", "1", "--eval_every", "2", "--eval_batches", "1", "--samples", "0",
              "--coherence_samples", "0"]
    run_lesson("04_pretrain", *common, "--steps", "4", "--run_name", "unbroken")
    run_lesson("04_pretrain", *common, "--steps", "2", "--run_name", "broken")
    run_lesson("04_pretrain", *common, "--steps", "4", "--run_name", "broken", "--resume")

    def losses(name):
        rows = [json.loads(line) for line in (pipeline_dirs / "runs/pretrain" / name / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    unbroken, broken = losses("unbroken"), losses("broken")
    assert sorted(broken) == [0, 1, 2, 3]
    for step in range(4):
        assert broken[step] == pytest.approx(unbroken[step], rel=1e-5), step
