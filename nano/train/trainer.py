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
  * Nothing is lost on a crash: checkpoints are written atomically (nano/checkpoints/checkpoint.py), Ctrl-C
    saves `ckpt_last.pth` before it exits, and a NaN loss stops the run naming the last good one.

`train` comes first and reads top to bottom; the pieces it calls (the schedule, the optimizer,
processes, the run's files) follow it.

Run under torchrun for data parallelism: `torchrun --nproc_per_node 2 lessons/04_pretrain.py`.
"""

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from nano.common.config import DEFAULT_SEED, THREADS_FOR_BATCHES, pick_device, threads_field
from nano.common.fileio import append_jsonl, read_jsonl, save_checkpoint, write_jsonl
from nano.common.paths import RunPaths, run_name_for
from nano.common.plot import line_chart, write_svg
from nano.model.generate import eval_mode
from nano.checkpoints.checkpoint import load_checkpoint, load_state_checked

# Peak dense bf16 throughput of common GPUs, from NVIDIA's data sheets (no sparsity), for MFU.
# On a CPU the peak is measured instead (cpu_peak_flops): the same two cores run 2x apart on
# different processors.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


@dataclass
class TrainConfig:
    """Knobs of the shared loop. Each training lesson's config inherits these fields."""

    run_name: str = field(default="", metadata={"help": "folder name under runs/<stage>/ ('' = default; fast-dev-run for a smoke test)"})
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
    seed: int = field(default=DEFAULT_SEED, metadata={"help": "seed of the init, the batches and the sampling"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    threads: int = threads_field(THREADS_FOR_BATCHES)
    dtype: str = field(default="auto", metadata={"help": "autocast dtype (auto: bf16 on a GPU that has it, else fp32)",
                                                 "choices": ["auto", "float32", "bfloat16", "float16"]})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    resume: bool = field(default=False, metadata={"help": "continue from the run's ckpt_last.pth"})
    fast_dev_run: bool = field(default=False, metadata={"help": "a handful of steps end to end (smoke test)"})

    def __post_init__(self):
        # a smoke test writes runs/<stage>/fast-dev-run/, never over the real run (nano/common/paths.py)
        self.run_name = run_name_for(self.run_name, self.fast_dev_run)
        if self.fast_dev_run:  # small enough for a smoke test on any preset
            self.steps, self.eval_every, self.eval_batches, self.warmup_steps = 4, 2, 2, 1
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})")


@dataclass
class Task:
    """What a lesson brings to the loop: its batches, its loss, its evaluation."""

    make_batch: Callable[[int, list[int], str], Any]  # (step, global row indices, device) -> batch
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]  # (model, batch) -> scalar loss
    evaluate: Callable[[torch.nn.Module], dict[str, float]]  # -> {"val_loss": ..., anything else}
    sample: Callable[[torch.nn.Module], list[str]] | None = None  # -> a few generations to read (samples.txt)
    checkpoint_extra: dict = field(default_factory=dict)  # model_config, tokenizer_fingerprint, ...
    count_tokens: Callable[[Any], int] = lambda batch: batch[0].numel()
    flops_per_token: float = 0.0  # for MFU; 0 = not reported
    # which number of evaluate()'s result picks ckpt_best.pth: the lowest validation loss by default;
    # RL lessons keep the checkpoint with the highest held-out reward instead
    best_metric: str = "val_loss"
    higher_is_better: bool = False


@dataclass
class TrainResult:
    step: int
    best_metric: str  # the name of the number that chose ckpt_best.pth ("val_loss", "reward", ...)
    best_value: float  # its best value over the run
    last_eval: dict
    tokens_seen: int
    seconds: float
    tokens_per_s: float
    mfu: float
    run_dir: Path


# ---------------------------------------------------------------------------------------------
# the loop


def train(model: torch.nn.Module, cfg: TrainConfig, run_dir: str | Path, task: Task) -> TrainResult:
    """Train `model` on `task` for cfg.steps optimizer steps, writing everything under run_dir
    (laid out as nano/common/paths.py: RunPaths says):

    checkpoints/ckpt_best.pth   the best evaluation so far (task.best_metric)
    checkpoints/ckpt_last.pth   the latest state, for --resume
    metrics.jsonl               one line per step (and per evaluation)
    loss.svg                    the loss curves
    samples.txt                 generations at each evaluation (if the task samples)
    """
    # 1. processes, device, and how a step's batch splits into micro-batches
    device = pick_device(cfg.device)
    d = init_distributed(device)
    if device.startswith("cuda") and d.world > 1:
        device = f"cuda:{d.local_rank}"
    cfg, n_micro = split_batch(cfg, d)
    amp_dtype = autocast_dtype(cfg, device)
    autocast = partial(torch.autocast, device.split(":")[0], dtype=amp_dtype, enabled=amp_dtype != torch.float32)

    # 2. the model, its optimizer, its files, and where to start from (step 0, or --resume)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    run = RunFiles(Path(run_dir), cfg, task, d.is_main)
    start_step = run.resume(model, optimizer, device) if cfg.resume else run.start_fresh()
    raw_model = model  # the plain module: what we save, evaluate and sample from
    model = wrap_model(model, cfg, d, device)  # torch.compile and/or DistributedDataParallel

    def evaluate_and_save(step: int) -> dict:
        """Validation, samples and checkpoints on rank 0; `step` = steps completed so far."""
        result: dict = {}
        if d.is_main:
            with eval_mode(raw_model), torch.no_grad(), autocast():
                result = task.evaluate(raw_model)
                texts = task.sample(raw_model) if task.sample else []
            run.record_evaluation(step, result, texts, raw_model, optimizer)
        if d.world > 1:
            dist.barrier()
        return result

    # 3. the loop
    model.train()
    tokens_seen, t0, last_eval = 0, time.time(), {}
    completed = start_step  # optimizer steps done so far: what a checkpoint records as "step"
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, disable=not d.is_main,
               desc=run.dir.name, dynamic_ncols=True)
    try:
        for step in bar:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(cfg.seed + step)  # any randomness inside a step (dropout) is reproducible
            step_loss, step_tokens, t_step = torch.zeros((), device=device), 0, time.time()
            for micro in range(n_micro):  # gradient accumulation
                batch = task.make_batch(step, rows_for(step, micro, n_micro, cfg, d), device)
                # only the last micro-batch all-reduces gradients across processes
                sync = micro == n_micro - 1 or d.world == 1
                with (nullcontext() if sync else model.no_sync()), autocast():
                    loss = task.loss(model, batch)
                    if not torch.isfinite(loss):
                        good = run.last_path if run.last_path.exists() else "none yet"
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
                run.log({"step": step, "loss": round(step_loss, 5), "lr": lr, "grad_norm": round(float(grad_norm), 4),
                         "tokens_per_s": round(tok_per_s, 1)})
                bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tok_per_s:,.0f}")
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                last_eval = evaluate_and_save(step + 1)
                if d.is_main:
                    extras = ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items() if isinstance(v, float))
                    bar.write(f"step {step + 1}: {extras}")
    except KeyboardInterrupt:
        if d.is_main:
            run.save(run.last_path, completed, raw_model, optimizer)  # resume re-runs the step cut short
            print(f"\ninterrupted: saved {run.last_path} after {completed} steps; continue with --resume")
        raise
    finally:
        bar.close()

    # 4. what the run achieved
    seconds = time.time() - t0
    tok_s = tokens_seen / max(seconds, 1e-9)
    peak = peak_flops(device)
    mfu = task.flops_per_token * tok_s / peak if peak and task.flops_per_token else 0.0
    if d.world > 1:
        dist.destroy_process_group()
    return TrainResult(step=cfg.steps, best_metric=task.best_metric, best_value=run.best, last_eval=last_eval,
                       tokens_seen=tokens_seen, seconds=seconds, tokens_per_s=tok_s, mfu=mfu, run_dir=run.dir)


# ---------------------------------------------------------------------------------------------
# the run's files: checkpoints, metrics, curves, samples (written by rank 0 only)


class RunFiles:
    """Everything `train` writes under run_dir, and how a resumed run picks up where it stopped."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, task: Task, is_main: bool):
        self.dir, self.cfg, self.task, self.is_main = run_dir, cfg, task, is_main
        self.paths = RunPaths(run_dir)
        self.last_path, self.best_path, self.metrics_path = self.paths.last, self.paths.best, self.paths.metrics
        self.history: list[dict] = []
        self.best = -math.inf if task.higher_is_better else math.inf

    def start_fresh(self) -> int:
        """A new run: empty logs (an old ckpt_last.pth is only overwritten at the first evaluation)."""
        if self.is_main:
            if self.last_path.exists():
                print(f"note: {self.last_path} exists and will be overwritten (use --resume to continue it)")
            write_jsonl(self.metrics_path, [])
            self.paths.samples.write_text("")
        return 0

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: str) -> int:
        """Load ckpt_last.pth into model and optimizer; keep the log lines before its step. Returns the step."""
        ckpt = load_checkpoint(self.last_path, map_location=device)
        load_state_checked(model, ckpt["model"], source=str(self.last_path))
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step, self.best = ckpt["step"], ckpt.get("best_value", self.best)
        if self.is_main:
            if self.metrics_path.exists():
                self.history = [h for h in read_jsonl(self.metrics_path) if h["step"] < start_step]
            write_jsonl(self.metrics_path, self.history)  # drop lines of steps that will be redone
            print(f"resuming {self.last_path} at step {start_step} (best {self.task.best_metric} so far {self.best:.4f})")
        return start_step

    def log(self, row: dict) -> None:
        self.history.append(row)
        append_jsonl(self.metrics_path, row)

    def save(self, path: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        save_checkpoint(path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "best_metric": self.task.best_metric, "best_value": self.best, "train_config": asdict(self.cfg),
            **self.task.checkpoint_extra})

    def record_evaluation(self, step: int, result: dict, texts: list[str], model: torch.nn.Module,
                          optimizer: torch.optim.Optimizer) -> None:
        """Log an evaluation, append its samples, save ckpt_best (if it is the best) and ckpt_last, plot."""
        self.log({"step": step, **result})
        if texts:
            with open(self.paths.samples, "a") as f:
                f.write(f"=== step {step} ===\n" + "\n---\n".join(texts) + "\n\n")
        value = result[self.task.best_metric]
        if (value > self.best) if self.task.higher_is_better else (value < self.best):
            self.best = value
            self.save(self.best_path, step, model, optimizer)
        self.save(self.last_path, step, model, optimizer)
        plot_history(self.history, self.paths.loss_plot)


def plot_history(history: list[dict], path: Path) -> None:
    """The loss curves (train per step, validation per evaluation) as an SVG."""
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    write_svg(path, line_chart({"train": train, "val": val}, title=f"loss — {path.parent.name}",
                               xlabel="step", ylabel="cross-entropy (nats/token)"))


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


# The shuffled orders that shuffled_index draws, each from its own stream of random numbers (the
# `row` of row_generator: negative, so never a batch row's generator)
EXAMPLE_ORDER = -1  # SFT conversations (lessons 5-7), preference pairs (lessons 8-9)
PROMPT_ORDER = -2  # the RL prompts of each rollout buffer (lessons 10-11)


def shuffled_index(seed: int, position: int, n: int, order: int) -> int:
    """Which of n examples position `position` of an endless stream reads: epochs of shuffled order, no state needed.

    Epoch position // n uses its own permutation of the n examples, drawn from row_generator(seed,
    epoch, order); so a resumed run reads exactly what the uninterrupted one would have. The position
    is step * batch_size + row for a batch, buffer * prompts_per_buffer + i for RL prompts.
    """
    epoch, offset = divmod(position, n)
    perm = torch.randperm(n, generator=row_generator(seed, epoch, order))
    return int(perm[offset])


def autocast_dtype(cfg: TrainConfig, device: str) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32  # on CPU bf16 autocast is slower than fp32 for models this small


def split_batch(cfg: TrainConfig, d: Dist) -> tuple[TrainConfig, int]:
    """(cfg, micro-batches per step per process). With more processes than the micro-batch allows,
    each process takes a smaller slice of the same global batch."""
    if cfg.micro_batch_size * d.world > cfg.batch_size:
        cfg = replace(cfg, micro_batch_size=cfg.batch_size // d.world)
    if cfg.batch_size % (cfg.micro_batch_size * d.world):
        raise ValueError(f"batch_size {cfg.batch_size} must split evenly into {d.world} processes x "
                         f"micro_batch_size {cfg.micro_batch_size}")
    return cfg, cfg.batch_size // (cfg.micro_batch_size * d.world)


def wrap_model(model: torch.nn.Module, cfg: TrainConfig, d: Dist, device: str) -> torch.nn.Module:
    """The module the loop calls: compiled if asked, wrapped in DDP under torchrun."""
    if cfg.compile:
        model = torch.compile(model)
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel  # (only under torchrun)

        model = DistributedDataParallel(model, device_ids=[d.local_rank] if device.startswith("cuda") else None)
    return model


def peak_flops(device: str) -> float:
    """The FLOP/s that MFU divides by: a GPU's data-sheet peak, or this CPU's measured matmul speed."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), 0.0)
    return cpu_peak_flops()


_CPU_PEAK: list[float] = []  # measured once per process


def cpu_peak_flops(size: int = 1024, seconds: float = 0.5) -> float:
    """fp32 FLOP/s of large matrix products on this CPU with the current torch threads.

    A (size x size) @ (size x size) product costs 2 * size^3 FLOPs; we time as many as fit in
    `seconds` after one warm-up. That is the best this CPU does on the densest work a model has,
    so MFU = the model's useful FLOP/s divided by it.
    """
    if not _CPU_PEAK:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # warm-up: thread pool, caches
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            n += 1
        _CPU_PEAK.append(2 * size**3 * n / (time.perf_counter() - start))
    return _CPU_PEAK[0]
