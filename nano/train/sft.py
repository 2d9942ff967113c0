"""
Supervised fine-tuning (SFT): what lessons 5, 6 and 7 share.

Pretraining taught the model to continue stories. SFT teaches it to answer: we show it
conversations (rendered by nano/text/chat_format.py) and train on the assistant's tokens only. The loss
is the same next-token cross-entropy as in pretraining; the difference is the mask:

    tokens   <bos> <sot> user \\n What is 2+3? <eot> \\n <sot> model \\n 2 + 3 = 5 ... #### 5 <eot>
    targets   -100  -100 ...                                          -100  2 + 3 = 5 ... #### 5 <eot>

so the model is never asked to predict the user's words, only its own reply (and where it ends).

The three lessons differ only in which weights learn:
    lesson 5  full SFT:  every weight                      (prepare = nothing)
    lesson 6  LoRA:      small adapters beside frozen W    (prepare = inject_lora)
    lesson 7  QLoRA:     adapters beside a frozen 4-bit W  (prepare = quantize_model + inject_lora)
so `run_sft` takes a `prepare(model)` function and does the rest: batches, loss, the shared loop
(nano/train/trainer.py), validation loss on held-out conversations, and TinyMath accuracy before and after.
"""

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from nano.common.config import print_config, save_config, set_threads
from nano.common.fileio import write_json
from nano.common.paths import BASE_CHECKPOINT, RunPaths, input_path
from nano.text.bins import SFTDataset, sft_batch
from nano.text.chat_format import IGNORE_INDEX
from nano.model.lora import trainable_parameter_summary
from nano.checkpoints.checkpoint import load_model, load_tokenizer
from nano.eval.evaluate import evaluate_model, load_task
from nano.train.trainer import EXAMPLE_ORDER, Task, TrainConfig, TrainResult, shuffled_index, train

@dataclass
class SFTConfig(TrainConfig):
    checkpoint_path: str = field(default="", metadata={"help": f"checkpoint to start from (default runs/{BASE_CHECKPOINT})"})
    max_len: int = field(default=0, metadata={"help": "longest conversation in tokens (0 = the model's context)"})
    pack: bool = field(default=True, metadata={"help": "lay conversations end to end in each row (no padding wasted)"})
    eval_problems: int = field(default=100, metadata={"help": "held-out TinyMath problems graded before and after"})
    # defaults fitted to the tiny preset on 2 CPU cores (each SFT lesson in under 3 minutes)
    steps: int = field(default=400, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "conversations per optimizer step"})
    micro_batch_size: int = field(default=16, metadata={"help": "conversations per forward pass"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up steps"})
    eval_every: int = field(default=100, metadata={"help": "steps between evaluations and checkpoints"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decay (matrices only)"})


def math_accuracy(model, tokenizer, limit: int, out_jsonl: Path | None = None) -> dict:
    """Greedy zero-shot chat accuracy on the first `limit` held-out TinyMath test problems."""
    problems = load_task("tinymath", "test", limit=limit)
    return evaluate_model(model, tokenizer, problems, mode="chat", batch_size=16, max_new_tokens=96,
                          out_jsonl=out_jsonl)


@dataclass
class SFTRun:
    model: torch.nn.Module  # the fine-tuned model (with its adapters, if any)
    result: TrainResult
    report: dict  # also written to paths.report
    paths: RunPaths  # runs/<stage>/<run_name>/ and its files
    base_checkpoint: dict  # the checkpoint it started from (its identity goes into adapter files)


def run_sft(cfg: SFTConfig, stage: str, prepare: Callable[[torch.nn.Module], torch.nn.Module],
            describe: str) -> SFTRun:
    """Fine-tune the base checkpoint on the SFT bins.

    stage: folder under runs/ ("sft/full", "sft/peft/lora", ...). prepare: turns the loaded base
    model into the model to train (freezing, adapters, quantization) and returns it.
    """
    print_config(cfg)
    torch.manual_seed(cfg.seed)
    set_threads(cfg.threads)
    base_path = input_path(cfg.checkpoint_path, BASE_CHECKPOINT)  # lesson 4's real run, for a smoke test too
    model, base_ckpt = load_model(base_path)
    tokenizer = load_tokenizer(base_ckpt.get("tokenizer_fingerprint"))  # refused if not the base's tokenizer
    max_len = cfg.max_len or model.cfg.context_len
    train_set, val_set = SFTDataset("train", tokenizer), SFTDataset("val", tokenizer)
    # conversations longer than max_len would lose the end of their answer (or all of it): skip them
    train_ids = np.flatnonzero(train_set.lengths <= max_len + 1)
    val_ids = np.flatnonzero(val_set.lengths <= max_len + 1)
    if len(train_ids) == 0 or len(val_ids) == 0:
        raise ValueError(f"no conversation fits max_len {max_len}: raise --max_len")
    run = RunPaths.of(stage, cfg.run_name)
    print(f"base: {base_path} (step {base_ckpt.get('step')})")
    print(f"data: {len(train_ids):,} train conversations, {len(val_ids):,} held out "
          f"({len(train_set) - len(train_ids):,} longer than max_len {max_len} skipped)")
    print(f"writing to {run.dir}")
    save_config(cfg, run.dir)

    # 1. where the base model stands before fine-tuning
    n_eval = 0 if cfg.fast_dev_run else cfg.eval_problems
    t0 = time.time()
    before = math_accuracy(model, tokenizer, n_eval) if n_eval else {}

    # 2. which weights learn: this is what differs between lessons 5, 6 and 7
    model = prepare(model)
    # (a 4-bit layer's weights count as parameters too: the same total for full SFT, LoRA and QLoRA)
    trainable, total = trainable_parameter_summary(model)
    print(f"{describe}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")

    # 3. batches, loss and evaluation for the shared loop
    val_rows = val_ids[: cfg.eval_batches * cfg.micro_batch_size].tolist()

    def make_batch(step, rows, device):
        picks = [train_set[train_ids[shuffled_index(cfg.seed, step * cfg.batch_size + r, len(train_ids), EXAMPLE_ORDER)]]
                 for r in rows]
        return sft_batch(picks, max_len=max_len, pack=cfg.pack, device=device)

    def loss(model, batch):
        x, y = batch
        return model(x, targets=y)[1]  # mean over assistant tokens only (targets IGNORE_INDEX elsewhere)

    def evaluate(model):
        """Mean loss per assistant token over a fixed set of held-out conversations."""
        device = next(model.parameters()).device
        total_loss, total_tokens = 0.0, 0
        for i in range(0, len(val_rows), cfg.micro_batch_size):
            x, y = sft_batch([val_set[j] for j in val_rows[i:i + cfg.micro_batch_size]], max_len=max_len, device=device)
            n = int((y != IGNORE_INDEX).sum())
            total_loss += float(model(x, targets=y)[1]) * n
            total_tokens += n
        return {"val_loss": total_loss / max(total_tokens, 1)}

    task = Task(make_batch=make_batch, loss=loss, evaluate=evaluate,
                count_tokens=lambda batch: int((batch[1] != IGNORE_INDEX).sum()),
                checkpoint_extra={"model_config": asdict(model.cfg), "tokenizer_fingerprint": tokenizer.fingerprint(),
                                  "base_checkpoint": str(base_path)})
    result = train(model, cfg, run.dir, task)

    # 4. where it stands after, graded on the same problems
    after = math_accuracy(model, tokenizer, n_eval, run.dir / "tinymath_samples.jsonl") if n_eval else {}
    report = {
        "stage": stage, "trainable_params": trainable, "total_params": total,
        "val_loss": result.last_eval.get("val_loss"), "best_val_loss": result.best_value,
        "tinymath_before": before.get("accuracy"), "tinymath_after": after.get("accuracy"),
        "tinymath_stderr": after.get("stderr"), "tinymath_n": after.get("n"),
        "seconds": round(time.time() - t0, 1),
    }
    write_json(run.report, report)
    print(f"\nheld-out SFT loss {report['val_loss']:.4f} (best {result.best_value:.4f})")
    if n_eval:
        print(f"TinyMath accuracy on {after['n']} held-out problems: before {before['accuracy']:.1%} -> "
              f"after {after['accuracy']:.1%} (± {after['stderr']:.1%})")
        sample = after["rows"][0]
        print(f"\nexample — {sample['prompt'].strip()[-200:]}\n{sample['output']}\n(graded {sample['correct']})")
    print(f"took {report['seconds']:.0f} s; report in {run.report}")
    return SFTRun(model, result, report, run, base_ckpt)
