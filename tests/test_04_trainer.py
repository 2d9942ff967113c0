"""
Exercise: the shared training loop (nano/train/trainer.py).

Implement `lr_at` (linear warm-up, then cosine to lr * min_lr_ratio), `rows_for` (which rows of the
global batch each process computes) and `train` so that:
  * a run killed part-way and resumed with --resume computes exactly what an uninterrupted run does,
  * two data-parallel processes compute what one process computes with the same global batch,
  * only rank 0 writes files, and a NaN loss stops the run with a message naming the step.
These tests use a toy regression task so they run in seconds; lesson 4 plugs in the real model.
"""

import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from adapters import impl

trainer = impl("trainer")

# the toy task: learn y = x @ W_true with a linear layer; row r of step s is a pure function of (s, r)
W_TRUE = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 10


def toy_batch(step, rows, device):
    xs = [torch.randn(4, generator=trainer.row_generator(0, step, r)) for r in rows]
    x = torch.stack(xs).to(device)
    return x, x @ W_TRUE.to(device)


def toy_task():
    def loss(model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean()

    def evaluate(model):
        x, y = toy_batch(10_000, list(range(32)), "cpu")
        with torch.no_grad():
            return {"val_loss": float(((model(x) - y) ** 2).mean())}

    return trainer.Task(make_batch=toy_batch, loss=loss, evaluate=evaluate)


def toy_model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3, bias=False)


def cfg(**kw):
    base = dict(steps=8, batch_size=8, micro_batch_size=4, lr=0.05, warmup_steps=2, eval_every=3,
                eval_batches=1, device="cpu")
    return trainer.TrainConfig(**{**base, **kw})


def train_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_schedule_values():
    c = cfg(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert trainer.lr_at(0, c) == pytest.approx(0.1)  # warm-up starts above zero
    assert trainer.lr_at(9, c) == pytest.approx(1.0)  # the peak at the end of warm-up
    assert trainer.lr_at(99, c) == pytest.approx(0.1)  # cosine ends at lr * min_lr_ratio
    mid = 10 + (99 - 10) / 2
    assert trainer.lr_at(int(mid), c) == pytest.approx(0.55, abs=0.02)  # half-way: the mean
    assert trainer.lr_at(50, trainer.TrainConfig(schedule="constant", warmup_steps=10, lr=1.0)) == 1.0


def test_rows_cover_the_global_batch_once():
    c = cfg(batch_size=8, micro_batch_size=2)
    two = [r for rank in range(2) for m in range(2)
           for r in trainer.rows_for(5, m, 2, c, trainer.Dist(rank=rank, world=2))]
    one = [r for m in range(4) for r in trainer.rows_for(5, m, 4, c, trainer.Dist())]
    assert sorted(two) == sorted(one) == list(range(8))


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = trainer.make_optimizer(model, cfg(weight_decay=0.1)).param_groups
    decayed = {p.dim() for p in groups[0]["params"]}
    assert decayed == {2} and all(p.dim() == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0


def test_training_lowers_the_loss_and_writes_outputs(tmp_path):
    task = toy_task()
    before = task.evaluate(toy_model())["val_loss"]
    result = trainer.train(toy_model(), cfg(lr=0.1), tmp_path / "run", task)
    assert result.best_value < before / 2
    for name in ["checkpoints/ckpt_best.pth", "checkpoints/ckpt_last.pth", "loss.svg", "metrics.jsonl"]:
        assert (tmp_path / "run" / name).exists(), name
    assert result.best_value < float("inf")
    assert "<polyline" in (tmp_path / "run" / "loss.svg").read_text()


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    trainer.train(toy_model(), cfg(), tmp_path / "straight", toy_task())

    # the same run, "killed" during step 5 (after the checkpoint at step 3)...
    task = toy_task()
    real_loss, calls = task.loss, {"n": 0}

    def dying_loss(model, batch):
        calls["n"] += 1
        if calls["n"] > 5 * 2:  # two micro-batches per step: this is step 5
            raise RuntimeError("killed")
        return real_loss(model, batch)

    task.loss = dying_loss
    with pytest.raises(RuntimeError, match="killed"):
        trainer.train(toy_model(), cfg(), tmp_path / "resumed", task)
    # ...then resumed from ckpt_last.pth (written after step 3) with a freshly initialised model
    trainer.train(toy_model(), cfg(resume=True), tmp_path / "resumed", toy_task())

    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(8))  # the log has each step once
    for step in range(8):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-7), step


def test_ctrl_c_saves_before_exiting(tmp_path):
    task = toy_task()
    real_loss, calls = task.loss, {"n": 0}

    def interrupted(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # first micro-batch of step 2, before any evaluation
            raise KeyboardInterrupt
        return real_loss(model, batch)

    task.loss = interrupted
    with pytest.raises(KeyboardInterrupt):
        trainer.train(toy_model(), cfg(), tmp_path / "run", task)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "ckpt_last.pth", weights_only=False)
    assert saved["step"] == 2  # steps 0 and 1 completed


def test_nan_loss_stops_with_a_message(tmp_path):
    task = toy_task()
    real_loss, calls = task.loss, {"n": 0}

    def nan_later(model, batch):
        calls["n"] += 1
        out = real_loss(model, batch)
        return out * float("nan") if calls["n"] > 8 else out

    task.loss = nan_later
    with pytest.raises(FloatingPointError, match=r"at step 4; last good checkpoint: .*ckpt_last.pth"):
        trainer.train(toy_model(), cfg(), tmp_path / "run", task)


def test_batch_must_split_evenly():
    with pytest.raises(ValueError, match="micro_batch_size"):
        cfg(batch_size=6, micro_batch_size=4)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, run_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # micro_batch_size 8 does not fit 2 processes x 8 rows: the loop shrinks it to 4 per process
    trainer.train(toy_model(), cfg(micro_batch_size=8), run_dir, toy_task())


def test_two_processes_equal_one(tmp_path):
    """DDP over gloo: 2 processes x 4 rows == 1 process x 2 micro-batches x 4 rows."""
    trainer.train(toy_model(), cfg(micro_batch_size=4), tmp_path / "one", toy_task())
    mp.spawn(_ddp_worker, args=(2, _free_port(), tmp_path / "two"), nprocs=2, join=True)
    one = torch.load(tmp_path / "one" / "checkpoints" / "ckpt_last.pth", weights_only=False)["model"]
    two = torch.load(tmp_path / "two" / "checkpoints" / "ckpt_last.pth", weights_only=False)["model"]
    assert torch.allclose(one["weight"], two["weight"], atol=1e-5)
    # rank 0 alone wrote the logs: one line per step, not two
    assert sorted(train_losses(tmp_path / "two")) == list(range(8))
    assert math.isclose(train_losses(tmp_path / "one")[7], train_losses(tmp_path / "two")[7], rel_tol=1e-3)


def test_best_checkpoint_follows_the_chosen_metric(tmp_path):
    """RL lessons keep the checkpoint with the highest held-out reward, not the lowest loss."""
    task = toy_task()
    scores = iter([0.5, 0.9, 0.2])  # evaluations at steps 3, 6 and 8: the second is the best

    def evaluate(model):
        return {**toy_task().evaluate(model), "reward": next(scores)}

    task.evaluate, task.best_metric, task.higher_is_better = evaluate, "reward", True
    result = trainer.train(toy_model(), cfg(), tmp_path / "run", task)
    best = torch.load(tmp_path / "run" / "checkpoints" / "ckpt_best.pth", weights_only=False)
    assert (best["step"], result.best_value, result.best_metric) == (6, 0.9, "reward")
