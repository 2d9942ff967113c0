"""
Lesson 2: token bins. Encode every dataset once with lesson 1's tokenizer; training then reads ids.

    python lessons/02_bins.py                 # or: make lesson-2
    python lessons/02_bins.py --force         # rebuild even if meta.json says nothing changed
    python lessons/02_bins.py --num_workers 1 # encode in this process only (easier to debug)

Reads data/raw/ (lesson 0) and data/tokenizer/tokenizer.json (lesson 1); writes data/bins/:
pretraining bins (train.bin / val.bin), SFT conversations with loss masks, preference pairs,
RL prompts, and meta.json last. Then it shows what is inside: counts, tokens per story, and a
conversation with the tokens the model trains on in [brackets]. The doc is lessons/02_bins.md.
"""

import os
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nano.common.config import DEFAULT_SEED, parse_config, print_config, save_config
from nano.common.paths import bins_dir, raw_dir, require, tokenizer_dir
from nano.text import bins
from nano.text.chat_format import show_masked


@dataclass
class BinsConfig:
    tokenizer_path: str = field(default="", metadata={"help": "tokenizer to encode with ('' = data/tokenizer/tokenizer.json)"})
    num_workers: int = field(default=0, metadata={"help": "encoding processes (0 = one per CPU core)"})
    tinymath_val_fraction: float = field(
        default=0.05, metadata={"help": "share of tinymath_train held out as SFT validation (tinymath_test stays for evaluation)"}
    )
    math_in_pretraining: bool = field(default=True, metadata={"help": "add the TinyMath training problems to train.bin as text (the stories hold no digits)"})
    arithmetic_repeats: int = field(default=6, metadata={"help": "times each sum/difference/product of TinyMath's range is drilled in train.bin (0 = none)"})
    force: bool = field(default=False, metadata={"help": "rebuild even when meta.json matches the tokenizer and inputs"})
    seed: int = field(default=DEFAULT_SEED, metadata={"help": "seed of the example batch drawn at the end"})


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(BinsConfig, argv)
    print_config(cfg)
    from nano.text.tokenizer import Tokenizer

    tokenizer_path = Path(cfg.tokenizer_path) if cfg.tokenizer_path else tokenizer_dir() / "tokenizer.json"
    tokenizer = Tokenizer.load(require(tokenizer_path, "tokenizer", 1))
    num_workers = cfg.num_workers or os.cpu_count() or 1
    out = bins_dir()
    print(f"reading  {raw_dir()}\n          {tokenizer_path} (vocab {tokenizer.vocab_size}, fingerprint {tokenizer.fingerprint()})")
    print(f"writing  {out}  with {num_workers} worker process(es)\n")

    start = time.time()
    meta, built = bins.build_bins(
        tokenizer, tokenizer_path, raw_dir(), out, num_workers=num_workers,
        tinymath_val_fraction=cfg.tinymath_val_fraction, force=cfg.force,
        math_in_pretraining=cfg.math_in_pretraining, arithmetic_repeats=cfg.arithmetic_repeats,
    )  # fmt: skip
    if not built:
        print("bins are up to date (same tokenizer fingerprint, same inputs, same settings); --force rebuilds them")
    save_config(cfg, out, name="config_02_bins.json")
    show(meta, tokenizer, out, cfg.seed)
    print(f"\ntime: {time.time() - start:.1f} s")


def show(meta: dict, tokenizer, out: Path, seed: int) -> None:
    """Print what the bins hold, and one example of each kind, decoded."""
    # 1. pretraining: how many tokens, and how well the tokenizer compresses
    print("pretraining bins (uint16, <bos> document <eos>):")
    for split, counts in meta["pretrain"].items():
        text_bytes = meta["sources"][f"stories_{split}.txt"]["bytes"]
        extra = counts.get("extra_documents", 0)
        # per-story figures only mean something when the bin holds nothing but stories
        ratios = (f"{counts['tokens'] / counts['stories']:>7.1f} tokens/story {text_bytes / counts['tokens']:>5.2f} bytes/token"
                  if not extra else f"+ {extra:,} documents of TinyMath problems and arithmetic drills")
        print(
            f"  {split + '.bin':<10} {counts['stories']:>9,} stories {counts['tokens']:>12,} tokens {ratios} "
            f"{(out / f'{split}.bin').stat().st_size / 1e6:>7.1f} MB"
        )
    tokens = bins.load_pretrain_tokens("train", tokenizer, out)
    eos = tokenizer.special_tokens["<eos>"]
    first_end = int(np.argmax(np.asarray(tokens[:4096]) == eos)) + 1
    print(f"  the first story, decoded from train.bin ({first_end} tokens):")
    print(wrap(tokenizer.decode(tokens[:first_end].tolist())))

    # 2. SFT conversations: how much of each one the model is trained on
    print("\nSFT bins (ids + loss mask; [brackets] = trained on):")
    for split, c in meta["sft"].items():
        print(
            f"  sft_{split:<6} {c['conversations']:>7,} conversations ({c['from_instructions']:,} instructions + "
            f"{c['from_tinymath']:,} TinyMath) {c['tokens']:>10,} tokens, {c['trained_tokens'] / max(c['tokens'], 1):.0%} trained on"
        )
    sft = bins.SFTDataset("train", tokenizer, out)
    for name, i in (("an instruction conversation", 0), ("a TinyMath conversation", len(sft) - 1)):
        ids, mask = sft[i]
        print(f"  {name} ({len(ids)} tokens, {int(mask.sum())} trained on):")
        print(wrap(show_masked(ids.tolist(), mask.tolist(), tokenizer).rstrip("\n")))
    x, y = bins.sft_batch([sft[i] for i in range(min(8, len(sft)))])
    print(f"  sft_batch of {len(x)}: x {tuple(x.shape)}, y {tuple(y.shape)}, {(y != bins.IGNORE_INDEX).float().mean():.0%} of targets trained on")

    # 3. preferences and RL prompts
    print("\npreference bins (prompt | chosen reply | rejected reply):")
    for split, c in meta["preferences"].items():
        print(f"  pref_{split:<6} {c['pairs']:>7,} pairs, {c['prompt_tokens']:,} prompt + {c['chosen_tokens']:,} chosen + {c['rejected_tokens']:,} rejected tokens")
    pair = bins.load_preferences("train", tokenizer, out)[0]
    for part in ("chosen", "rejected"):
        print(f"  {part}:")
        print(wrap(show_masked(pair[f"{part}_ids"].tolist(), pair[f"{part}_mask"].tolist(), tokenizer).rstrip("\n")))
    print(f"  flaw of the rejected reply: {pair['flaw']}")
    print("\nRL prompts (prompt ids + the answer a reply must reach):")
    for split, c in meta["rl"].items():
        print(f"  rl_{split:<8} {c['prompts']:>7,} prompts")
    task = bins.load_rl_prompts("train", tokenizer, out)[0]
    print(wrap(tokenizer.decode(task.prompt_ids)))
    print(f"  answer to check a reply against: {task.answer}")

    # 4. what pretraining will draw: random windows, targets shifted by one
    x, y = bins.get_pretrain_batch(tokens, batch_size=4, context_len=16, generator=torch.Generator().manual_seed(seed))
    print(f"\na pretraining batch: x {tuple(x.shape)} {x.dtype}, y = x shifted by one; row 0:")
    print(f"  x: {x[0].tolist()}\n  y: {y[0].tolist()}")
    print(f"  x decoded: {tokenizer.decode(x[0].tolist())!r}")


def wrap(text: str, width: int = 100, indent: str = "    ") -> str:
    """Indent text and wrap its long lines, keeping its own line breaks (the chat format's "\\n")."""
    lines = text.split("\n")
    return "\n".join(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent) or indent for line in lines)


if __name__ == "__main__":
    main()
