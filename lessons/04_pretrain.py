"""
Lesson 4: pretraining. A randomly initialised Gemma-2 Nano learns to write stories by predicting
the next token, over and over, on the token bins of lesson 2.

    make lesson-4                                   # tiny preset, built-in stories, a few CPU minutes
    python lessons/04_pretrain.py --fast_dev_run    # a handful of steps, end to end (runs/pretrain/fast-dev-run/)
    python lessons/04_pretrain.py --resume          # continue runs/pretrain/default/ where it stopped
    make lesson-4 NPROC=2                           # data parallel: 2 processes (torchrun, gloo on CPU)
    python lessons/04_pretrain.py --config 04_pretrain_nano_gpu   # the nano preset on a GPU

What is this lesson's own, and what is shared: the loop (schedule, accumulation, clipping,
checkpoints, resume, DDP, logs) is nano/train/trainer.py; here we only say what a batch is (random
windows of the token stream), what the loss is (next-token cross-entropy), how to evaluate
(validation loss and bits per byte, and whether the samples keep their characters: character names
per story and pronoun agreement, nano/eval/coherence.py) and what to sample (stories from <bos>).
"""

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from nano.common.config import parse_config, print_config, save_config, set_threads
from nano.common.fileio import read_jsonl
from nano.common.paths import RunPaths
from nano.text.bins import load_pretrain_tokens
from nano.model.gemma import GemmaNano, model_config
from nano.model.generate import generate
from nano.checkpoints.checkpoint import load_tokenizer
from nano.eval.val_loss import token_byte_lengths, validation_loss
from nano.eval.coherence import coherence, data_stories, format_coherence, sample_stories
from nano.common.plot import line_chart, write_svg
from nano.train.trainer import Task, TrainConfig, row_generator, train


@dataclass
class PretrainConfig(TrainConfig):
    model: str = field(default="tiny", metadata={"help": "model preset", "choices": ["tiny", "nano"]})
    context_len: int = field(default=0, metadata={"help": "tokens per training window (0 = the preset's)"})
    attn_impl: str = field(default="auto", metadata={"help": "attention: eager reference, fused Triton kernel, or auto",
                                                     "choices": ["auto", "eager", "triton"]})
    # the shared loop's defaults, fitted to the tiny preset on 2 CPU cores (a few minutes)
    steps: int = field(default=400, metadata={"help": "optimizer steps in the whole run"})
    batch_size: int = field(default=16, metadata={"help": "windows per optimizer step"})
    micro_batch_size: int = field(default=16, metadata={"help": "windows per forward pass"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (small models like it high)"})
    eval_every: int = field(default=100, metadata={"help": "steps between evaluations and checkpoints"})
    samples: int = field(default=3, metadata={"help": "stories written at each evaluation (samples.txt)"})
    coherence_samples: int = field(default=100, metadata={
        "help": "stories sampled at each evaluation to count character names and check pronouns (0: skip)"})

    def __post_init__(self):
        super().__post_init__()
        if self.fast_dev_run:
            self.samples = min(self.samples, 1)
            self.coherence_samples = min(self.coherence_samples, 4)


def flops_per_token(cfg, n_params: int) -> float:
    """Training FLOPs per token (forward + backward), the usual estimate: 6 N + attention.

    Every parameter does one multiply-add (2 FLOPs) per token forward and twice that backward: 6 N.
    Attention adds q @ k^T and p @ v: 2 * 2 * T * head_dim per head and layer forward, halved by the
    causal mask, times 3 for forward + backward: 6 * n_layers * n_heads * head_dim * T.
    """
    return 6 * n_params + 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * cfg.context_len


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(PretrainConfig, argv)
    print_config(cfg)
    torch.manual_seed(cfg.seed)
    set_threads(cfg.threads)

    # 1. the tokenizer and the token streams (np.memmap: the file stays on disk, pages load on use)
    tokenizer = load_tokenizer()
    train_tokens, val_tokens = load_pretrain_tokens("train", tokenizer), load_pretrain_tokens("val", tokenizer)
    byte_lengths = token_byte_lengths(tokenizer)  # bytes of text behind each token id, for bits per byte

    # 2. the model
    overrides = {"vocab_size": tokenizer.vocab_size, "attn_impl": cfg.attn_impl}
    if cfg.context_len:
        overrides["context_len"] = cfg.context_len
    mcfg = model_config(cfg.model, **overrides)
    model = GemmaNano(mcfg)
    T = mcfg.context_len
    n_params = model.num_params()
    run = RunPaths.of("pretrain", cfg.run_name)
    print(f"model: {cfg.model} preset, {n_params / 1e6:.2f}M parameters, context {T}")
    print(f"data: {len(train_tokens):,} train tokens, {len(val_tokens):,} val tokens")
    print(f"tokens per optimizer step: {cfg.batch_size} x {T} = {cfg.batch_size * T:,}")
    print(f"writing to {run.dir}")
    save_config(cfg, run.dir)

    # 3. what this lesson brings to the shared loop
    def make_batch(step: int, rows: list[int], device: str):
        """Row r of step s is the window starting at a random offset drawn from (seed, s, r)."""
        starts = [int(torch.randint(len(train_tokens) - T - 1, (1,), generator=row_generator(cfg.seed, step, r)))
                  for r in rows]
        window = torch.from_numpy(np.stack([train_tokens[s:s + T + 1] for s in starts]).astype(np.int64))
        x, y = window[:, :-1], window[:, 1:]  # (B, T) inputs and (B, T) next tokens
        return x.to(device), y.to(device)

    def loss(model, batch):
        x, y = batch
        _, loss = model(x, targets=y)
        return loss

    # does the model keep its characters? (nano/eval/coherence.py) The held-out stories set the level.
    if cfg.coherence_samples:
        data_level = coherence(data_stories(tokenizer, cfg.coherence_samples))
        print(f"held-out stories: {format_coherence(data_level)}")

    def evaluate(model):
        val_loss, bpb = validation_loss(model, val_tokens, T, cfg.eval_batches, cfg.micro_batch_size,
                                        byte_lengths=byte_lengths)
        result = {"val_loss": val_loss, "val_bpb": bpb}
        if cfg.coherence_samples:  # the same seed at every evaluation: the curve moves with the model only
            c = coherence(sample_stories(model, tokenizer, cfg.coherence_samples, seed=cfg.seed))
            result |= {"names_per_story": c["names_per_story"], "pronoun_agreement": c["pronoun_agreement"]}
        return result

    bos, eos = tokenizer.special_tokens["<bos>"], tokenizer.special_tokens["<eos>"]

    def sample(model):
        """A few stories from <bos> alone, sampled at temperature 0.8 (each with its own seed)."""
        outs = [generate(model, [bos], max_new_tokens=min(160, T - 1), temperature=0.8, top_k=50,
                         stop_tokens=[eos], seed=cfg.seed + i) for i in range(cfg.samples)]
        return [tokenizer.decode(ids).strip() for ids in outs]

    task = Task(make_batch=make_batch, loss=loss, evaluate=evaluate, sample=sample,
                flops_per_token=flops_per_token(mcfg, n_params),
                checkpoint_extra={"model_config": asdict(mcfg), "tokenizer_fingerprint": tokenizer.fingerprint()})

    # 4. train, then say what happened
    result = train(model, cfg, run.dir, task)
    if result.last_eval:  # only rank 0 evaluated
        print(f"\ndone: {result.tokens_seen:,} tokens in {result.seconds:.0f} s "
              f"({result.tokens_per_s:,.0f} tokens/s, MFU {100 * result.mfu:.1f}%)")
        print(f"final val loss {result.last_eval['val_loss']:.4f} nats/token, "
              f"{result.last_eval['val_bpb']:.4f} bits/byte; best val loss {result.best_value:.4f}")
        print(f"checkpoints: {run.checkpoints}; curve: {run.loss_plot}")
        if cfg.coherence_samples:
            plot_coherence(run, data_level)
        for i, text in enumerate(sample(model.eval())):
            print(f"\n--- sample {i + 1} ---\n{text}")


def plot_coherence(run: RunPaths, data_level: dict) -> None:
    """names per story at each evaluation, against the held-out stories' level: coherence.svg."""
    evals = [row for row in read_jsonl(run.metrics) if "names_per_story" in row]
    steps = [row["step"] for row in evals]
    write_svg(run.dir / "coherence.svg", line_chart(
        {"samples": [(row["step"], row["names_per_story"]) for row in evals],
         "held-out stories": [(x, data_level["names_per_story"]) for x in (steps[0], steps[-1])]},
        title=f"character names per story — {run.dir.name}", xlabel="step", ylabel="distinct names"))
    last = evals[-1]
    print(f"the samples at step {last['step']}: {last['names_per_story']:.2f} names per story, pronouns agree "
          f"{last['pronoun_agreement']:.1%} (held-out stories: {data_level['names_per_story']:.2f}, "
          f"{data_level['pronoun_agreement']:.1%}); curve: {run.dir / 'coherence.svg'}")


if __name__ == "__main__":
    main()
