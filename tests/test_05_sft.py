"""
Exercise: supervised fine-tuning (nano/train/sft.py, lessons 5-7).

Make SFT train on the assistant's tokens only: the targets of prompt positions must be ignored, so
changing them cannot change the loss, while changing an answer token's target must. Then the three
fine-tuning lessons must run end to end on the smoke-test pipeline: full SFT leaves a checkpoint,
LoRA and QLoRA leave small adapter files that load back onto their base and nowhere else.
"""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from adapters import impl
from conftest import run_lesson

bins = impl("bins")
model_lib = impl("gemma")


def test_loss_ignores_prompt_targets():
    torch.manual_seed(0)
    model = model_lib.GemmaNano(model_lib.model_config("tiny", vocab_size=50, context_len=16))
    ids = np.array([2, 3, 10, 11, 12, 4, 3, 20, 21, 22, 4])  # <bos> user turn | model turn
    mask = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1])  # the assistant's tokens (and <end_of_turn>)
    x, y = bins.sft_batch([(ids, mask)])
    assert (y[0, :6] == -100).all() and y[0, -1] == 4  # prompt targets ignored, <end_of_turn> trained

    def loss_with(changed_ids):
        _, y_changed = bins.sft_batch([(changed_ids, mask)])
        return model(x, targets=y_changed)[1].item()  # same inputs, only the targets differ

    base = loss_with(ids)
    prompt_changed, answer_changed = ids.copy(), ids.copy()
    prompt_changed[3] = 40  # a user token: its target position is masked
    answer_changed[8] = 40  # an assistant token
    assert loss_with(prompt_changed) == base
    assert loss_with(answer_changed) != base


def test_full_sft_smoke_run(pipeline_dirs):
    run_lesson("05_sft_full", "--fast_dev_run", "--micro_batch_size", "4", "--batch_size", "4", "--max_len", "160")
    run = pipeline_dirs / "runs" / "sft" / "full" / "fast-dev-run"  # a smoke run's own folder
    assert (run / "checkpoints" / "ckpt_best.pth").is_file()
    report = json.loads((run / "report.json").read_text())
    assert report["trainable_params"] == report["total_params"] > 0
    assert report["val_loss"] > 0


@pytest.mark.parametrize("lesson, stage", [("06_sft_lora", "lora"), ("07_sft_qlora", "qlora")])
def test_adapter_lessons_save_small_adapters(pipeline_dirs, lesson, stage):
    lora = impl("lora")
    run_lesson(lesson, "--fast_dev_run", "--micro_batch_size", "4", "--batch_size", "4", "--r", "4", "--max_len", "160")
    run = pipeline_dirs / "runs" / "sft" / "peft" / stage / "fast-dev-run"
    report = json.loads((run / "report.json").read_text())
    assert 0 < report["trainable_params"] < report["total_params"] / 5
    adapter = run / "adapter.pth"
    base_path = pipeline_dirs / "runs" / "pretrain" / "default" / "checkpoints" / "ckpt_best.pth"
    assert adapter.stat().st_size < base_path.stat().st_size / 3

    # it loads onto its own base...
    checkpoint = impl("checkpoint")
    model, ckpt = checkpoint.load_model(base_path)
    lora.load_adapter(model, adapter, base_identity=checkpoint.base_identity(ckpt))
    # ...and a base with other weights is refused
    other, other_ckpt = checkpoint.load_model(base_path)
    other_ckpt["model"] = {k: v + 1 for k, v in other_ckpt["model"].items()}
    with pytest.raises(ValueError, match="base"):
        lora.load_adapter(other, adapter, base_identity=checkpoint.base_identity(other_ckpt))


def file_hashes(root) -> dict[str, str]:
    """{path under root: sha256 of its bytes} for every file."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_smoke_run_never_replaces_a_real_run(tiny_pipeline, tmp_path, monkeypatch):
    """After `make all`, `--fast_dev_run` of lessons 0, 4 and 5 leaves every file of the real data and
    the real runs byte for byte, writes only into fast-dev-run folders, and lesson 5's smoke run starts
    from lesson 4's REAL model (what the lesson reads is the real run, what it writes is its own)."""
    # a private copy of the pipeline's real data and lesson 4's real run, then a real (short) lesson 5
    shutil.copytree(tiny_pipeline / "data", tmp_path / "data")
    shutil.copytree(tiny_pipeline / "runs" / "pretrain" / "default", tmp_path / "runs" / "pretrain" / "default")
    monkeypatch.setenv("NANO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NANO_RUNS_DIR", str(tmp_path / "runs"))
    small = ["--micro_batch_size", "4", "--batch_size", "4", "--max_len", "160"]
    run_lesson("05_sft_full", "--steps", "2", "--eval_every", "2", "--eval_batches", "1", "--warmup_steps", "1",
               "--eval_problems", "0", *small)
    real = file_hashes(tmp_path)
    assert "runs/sft/full/default/checkpoints/ckpt_best.pth" in real and "data/raw/manifest.json" in real

    run_lesson("00_data", "--fast_dev_run")
    run_lesson("04_pretrain", "--fast_dev_run", "--context_len", "64", "--micro_batch_size", "8", "--batch_size", "8")
    run_lesson("05_sft_full", "--fast_dev_run", *small)

    after = file_hashes(tmp_path)
    assert {path: after.get(path) for path in real} == real  # not one byte of a real run changed
    new = sorted(set(after) - set(real))
    assert new and all("/fast-dev-run/" in f"/{path}" or "-fast-dev-run/" in path for path in new), new
    smoke = torch.load(tmp_path / "runs/sft/full/fast-dev-run/checkpoints/ckpt_best.pth", weights_only=False)
    assert smoke["base_checkpoint"] == str(tmp_path / "runs/pretrain/default/checkpoints/ckpt_best.pth")
    assert (tmp_path / "runs/pretrain/fast-dev-run/checkpoints/ckpt_best.pth").is_file()
    assert (tmp_path / "data/fast-dev-run/raw/manifest.json").is_file()


def test_quantized_base_cannot_be_fully_fine_tuned():
    nf4 = impl("nf4")
    model = model_lib.GemmaNano(model_lib.model_config("tiny", vocab_size=50, context_len=16))
    nf4.quantize_model(model)
    with pytest.raises(ValueError, match="4-bit"):
        nf4.require_full_precision(model)
