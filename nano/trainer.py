"""
The one training loop that every training lesson shares (pretraining, SFT, LoRA, QLoRA, ...).

A lesson brings only what is its own — how to make a batch and how to turn a batch into a loss —
as a small `Task`; the loop brings the rest, written once:

    for step in steps:
        lr = warmup_then_cosine(step)
        for each micro-batch:                  # gradient accumulation
            loss = task.loss(model, batch) / n_micro
            loss.backward()                     # DDP averages gradients across processes here
        clip the gradient norm; AdamW step
        every eval_every steps: validation loss, samples, checkpoints

Three properties are worth the care they take:
  * Resume is exact. The rows of each step's batch are a pure function of (seed, step, row), and
    the checkpoint holds the model, the optimizer and the step, so a run killed at step k and
    resumed with --resume computes the same numbers as a run that was never stopped.
  * The number of processes does not change the result. The global batch of a step is the same
    rows whatever the process count; with N processes each takes its slice of the rows, and
    gradient accumulation splits a slice into micro-batches. Only float rounding differs.
  * Nothing is lost on a crash: checkpoints are written atomically (nano/checkpoint.py), Ctrl-C
    saves `ckpt_last.pth` before it exits, and a NaN loss stops the run naming the last good one.

Run under torchrun for data parallelism: `torchrun --nproc_per_node 2 lessons/04_pretrain.py`.
"""

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from nano.checkpoint import load_checkpoint, load_state_checked, save_checkpoint
from nano.config import pick_device
from nano.plot import line_chart, write_svg

# peak dense throughput used for MFU (model FLOPs utilisation); see REFERENCE.md section 10
CPU_PEAK_FLOPS = 100e9  # this project's 2-core machine, fp32 matmuls
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}  # bf16 dense


@dataclass
class TrainConfig:
    """Knobs of the shared loop. Each training lesson's config inherits these fields."""

    run_name: str = field(default="default", metadata={"help": "folder name under runs/<stage>/"})
    steps: int = field(default=300, metadata={"help": "optimizer steps in the whole run"})
    batch_size: int = field(default=16, metadata={"help": "rows per optimizer step (global: all processes, all micro-batches)"})
    micro_batch_size: int = field(default=16, metadata={"help": "rows per forward pass; the rest is gradient accumulation"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to lr * this"})
    warmup_steps: int = field(default=30, metadata={"help": "linear warm-up steps"})
    schedule: str = field(default="cosine", metadata={"help": "lr schedule after warm-up", "choices": ["cosine", "constant"]})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay, on matrices only"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this (0 = off)"})
    eval_every: int = field(default=100, metadata={"help": "steps between evaluations and checkpoints"})
    eval_batches: int = field(default=8, metadata={"help": "fixed validation batches per evaluation"})
    samples: int = field(default=3, metadata={"help": "generations written at each evaluation"})
    seed: int = field(default=1337, metadata={"help": "seed of the init, the batches and the sampling"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    dtype: str = field(default="auto", metadata={"help": "autocast dtype (auto: bf16 on a GPU that has it, else fp32)",
                                                 "choices": ["auto", "float32", "bfloat16", "float16"]})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    resume: bool = field(default=False, metadata={"help": "continue from the run's ckpt_last.pth"})
    fast_dev_run: bool = field(default=False, metadata={"help": "a handful of steps end to end (smoke test)"})

    def __post_init__(self):
        if self.fast_dev_run:  # small enough for a smoke test on any preset
            self.steps, self.eval_every, self.eval_batches, self.warmup_steps = 4, 2, 2, 1
            self.samples = min(self.samples, 1)
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})")


@dataclass
class Task:
    """What a lesson brings to the loop: its batches, its loss, its evaluation."""

    make_batch: Callable[[int, list[int], str], Any]  # (step, global row indices, device) -> batch
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]  # (model, batch) -> scalar loss
    evaluate: Callable[[torch.nn.Module], dict[str, float]]  # -> {"val_loss": ..., anything else}
    sample: Callable[[torch.nn.Module], list[str]] | None = None  # -> a few generations to read
    checkpoint_extra: dict = field(default_factory=dict)  # model_config, tokenizer_fingerprint, ...
    count_tokens: Callable[[Any], int] = lambda batch: batch[0].numel()
    flops_per_token: float = 0.0  # for MFU; 0 = not reported


# ---------------------------------------------------------------------------------------------
# the learning-rate schedule and the optimizer


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine down to cfg.lr * min_lr_ratio at the last step.

    lr_at(0) = lr / warmup (never exactly 0, so step 0 learns something);
    lr_at(warmup - 1) = lr;  lr_at(steps - 1) = lr * min_lr_ratio.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(cfg.steps - 1 - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only.

    Decay pulls weights towards 0. That regularises matrices (projections, embeddings), but on a
    norm weight it would drag the scale towards its init, and biases (we have none) likewise; so
    parameters with fewer than 2 dimensions get no decay. Frozen parameters are left out.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = next(iter(params)).is_cuda if params else False
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


# ---------------------------------------------------------------------------------------------
# processes: one, or several under torchrun


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the process group when started by torchrun (it sets RANK/WORLD_SIZE), else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def rows_for(step: int, micro: int, n_micro: int, cfg: TrainConfig, d: Dist) -> list[int]:
    """The global row indices this process computes in one micro-batch of one step.

    batch_size 8, 2 processes, micro 2:  rank 0 -> rows [0,1] then [2,3];  rank 1 -> [4,5] then [6,7].
    A one-process run with micro 2 computes the same eight rows in four micro-batches.
    """
    per_rank = cfg.batch_size // d.world
    start = d.rank * per_rank + micro * cfg.micro_batch_size
    return list(range(start, start + cfg.micro_batch_size))


def row_generator(seed: int, step: int, row: int) -> torch.Generator:
    """A random generator that depends only on (seed, step, row): batches need no saved state."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 10_007 + row)


def autocast_dtype(cfg: TrainConfig, device: str) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32  # on CPU bf16 autocast is slower than fp32 for models this small


def peak_flops(device: str) -> float:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), 0.0)
    return CPU_PEAK_FLOPS


# ---------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    step: int
    best_val_loss: float
    last_eval: dict
    tokens_seen: int
    seconds: float
    tokens_per_s: float
    mfu: float
    run_dir: Path


def train(model: torch.nn.Module, cfg: TrainConfig, run_dir: str | Path, task: Task) -> TrainResult:
    """Train `model` on `task` for cfg.steps optimizer steps, writing everything under run_dir.

    run_dir/checkpoints/ckpt_best.pth   lowest validation loss so far
    run_dir/checkpoints/ckpt_last.pth   the latest state, for --resume
    run_dir/metrics.jsonl               one line per step (and per evaluation)
    run_dir/loss.svg                    the loss curves
    run_dir/samples.txt                 generations at each evaluation
    """
    device = pick_device(cfg.device)
    d = init_distributed(device)
    if device.startswith("cuda") and d.world > 1:
        device = f"cuda:{d.local_rank}"
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    last_path, best_path = ckpt_dir / "ckpt_last.pth", ckpt_dir / "ckpt_best.pth"
    if cfg.micro_batch_size * d.world > cfg.batch_size:  # more processes: smaller slices, same global batch
        cfg = replace(cfg, micro_batch_size=cfg.batch_size // d.world)
    if cfg.batch_size % (cfg.micro_batch_size * d.world):
        raise ValueError(f"batch_size {cfg.batch_size} must split evenly into {d.world} processes x "
                         f"micro_batch_size {cfg.micro_batch_size}")
    n_micro = cfg.batch_size // (cfg.micro_batch_size * d.world)

    # 1. the model, its optimizer, and where to start from
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    start_step, best_val = 0, float("inf")
    if cfg.resume:
        ckpt = load_checkpoint(last_path, map_location=device)
        load_state_checked(model, ckpt["model"], source=str(last_path))
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step, best_val = ckpt["step"], ckpt.get("best_val_loss", float("inf"))
        if d.is_main:
            print(f"resuming {last_path} at step {start_step} (best val loss so far {best_val:.4f})")
    elif d.is_main and last_path.exists():
        print(f"note: {last_path} exists and will be overwritten (use --resume to continue it)")
    raw_model = model  # the plain module: what we save, evaluate and sample from
    if cfg.compile:
        model = torch.compile(model)
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[d.local_rank] if device.startswith("cuda") else None)
    amp_dtype = autocast_dtype(cfg, device)
    use_amp = amp_dtype != torch.float32

    # 2. logs: keep earlier lines of a resumed run, drop those after the resume point
    metrics_path = run_dir / "metrics.jsonl"
    history: list[dict] = []
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.resume and metrics_path.exists():
            history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            history = [h for h in history if h["step"] < start_step]
        metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))
        if not cfg.resume:
            (run_dir / "samples.txt").write_text("")

    def log(row: dict) -> None:
        history.append(row)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def checkpoint(step: int, path: Path) -> None:
        save_checkpoint(path, {
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "best_val_loss": best_val, "train_config": asdict(cfg), **task.checkpoint_extra})

    def evaluate_and_save(step: int) -> dict:
        """Validation (rank 0), samples, and checkpoints; `step` = steps completed so far."""
        nonlocal best_val
        result: dict = {}
        if d.is_main:
            raw_model.eval()
            with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=amp_dtype, enabled=use_amp):
                result = task.evaluate(raw_model)
                texts = task.sample(raw_model) if task.sample and cfg.samples else []
            raw_model.train()
            log({"step": step, **result})
            if texts:
                with open(run_dir / "samples.txt", "a") as f:
                    f.write(f"=== step {step} ===\n" + "\n---\n".join(texts) + "\n\n")
            if result["val_loss"] < best_val:
                best_val = result["val_loss"]
                checkpoint(step, best_path)
            checkpoint(step, last_path)
            plot_history(history, run_dir / "loss.svg")
        if d.world > 1:
            dist.barrier()
        return result

    # 3. the loop
    model.train()
    tokens_seen, t0, last_eval = 0, time.time(), {}
    completed = start_step  # optimizer steps done so far: what a checkpoint records as "step"
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, disable=not d.is_main,
               desc=run_dir.name, dynamic_ncols=True)
    try:
        for step in bar:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(cfg.seed + step)  # any randomness inside a step (dropout) is reproducible
            step_loss, step_tokens, t_step = torch.zeros((), device=device), 0, time.time()
            for micro in range(n_micro):
                batch = task.make_batch(step, rows_for(step, micro, n_micro, cfg, d), device)
                # only the last micro-batch all-reduces gradients across processes
                sync = micro == n_micro - 1 or d.world == 1
                ctx = model.no_sync() if not sync else nullcontext()
                with ctx, torch.autocast(device.split(":")[0], dtype=amp_dtype, enabled=use_amp):
                    loss = task.loss(model, batch)
                    if not torch.isfinite(loss):
                        good = f"{last_path}" if last_path.exists() else "none yet"
                        raise FloatingPointError(f"loss is {loss.item()} at step {step}; last good checkpoint: {good}")
                    (loss / n_micro).backward()
                step_loss += loss.detach() / n_micro
                step_tokens += task.count_tokens(batch) * d.world
            if d.world > 1:  # log the loss of the whole global batch, not of rank 0's slice
                dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
            step_loss = step_loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            completed = step + 1
            tokens_seen += step_tokens
            tok_per_s = step_tokens / max(time.time() - t_step, 1e-9)
            if d.is_main:
                log({"step": step, "loss": round(step_loss, 5), "lr": lr, "grad_norm": round(float(grad_norm), 4),
                     "tokens_per_s": round(tok_per_s, 1)})
                bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tok_per_s:,.0f}")
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                last_eval = evaluate_and_save(step + 1)
                if d.is_main:
                    extras = ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items() if isinstance(v, float))
                    bar.write(f"step {step + 1}: {extras}")
    except KeyboardInterrupt:
        if d.is_main:
            checkpoint(completed, last_path)  # resume re-runs the step that was cut short
            print(f"\ninterrupted: saved {last_path} after {completed} steps; continue with --resume")
        raise
    finally:
        bar.close()
    seconds = time.time() - t0
    tok_s = tokens_seen / max(seconds, 1e-9)
    peak = peak_flops(device)
    mfu = task.flops_per_token * tok_s / peak if peak and task.flops_per_token else 0.0
    if d.world > 1:
        dist.destroy_process_group()
    return TrainResult(step=cfg.steps, best_val_loss=best_val, last_eval=last_eval, tokens_seen=tokens_seen,
                       seconds=seconds, tokens_per_s=tok_s, mfu=mfu, run_dir=run_dir)


def plot_history(history: list[dict], path: Path) -> None:
    """The loss curves (train per step, validation per evaluation) as an SVG."""
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    write_svg(path, line_chart({"train": train, "val": val}, title=f"loss — {path.parent.name}",
                               xlabel="step", ylabel="cross-entropy (nats/token)"))
