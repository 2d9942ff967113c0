"""
Lesson 1: train a byte-level BPE tokenizer on the stories of lesson 0, then look inside it.

    python lessons/01_tokenizer.py                        # or: make lesson-1 (vocab 4096, first 100 MB)
    python lessons/01_tokenizer.py --vocab_size 1024      # a smaller vocabulary
    python lessons/01_tokenizer.py --pattern nano         # every digit its own token (see the doc)
    python lessons/01_tokenizer.py --with_sft_text false  # learn merges from the stories only
    python lessons/01_tokenizer.py --force                # retrain even if nothing changed

Reads data/raw/stories_train.txt (at most --data_limit_mb of it), stories_val.txt and, with
--with_sft_text, the instruction conversations and TinyMath problems; writes
data/tokenizer/tokenizer.json (the tokenizer, readable JSON), sft_text.txt (that extra text) and
train_meta.json (what it was trained on, so an unchanged rerun is skipped). Then it prints the first merges, the longest
tokens, the bytes per token on the validation stories and a sample sentence cut into tokens.
The doc is lessons/01_tokenizer.md; the tests are tests/test_01_tokenizer.py (make check-1).
"""

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from nano.common.config import config_to_dict, parse_config, print_config
from nano.common.fileio import read_jsonl, write_json, write_text
from nano.common.paths import raw_dir, require, tokenizer_dir
from nano.text.pretokenize import PATTERNS
from nano.text.tokenizer import SPECIAL_TOKENS, Tokenizer

MB = 1_000_000
RERUN_LESSON_0 = "re-run `make lesson-0`"  # what to do about a broken line in lesson 0's files


@dataclass
class TokenizerConfig:
    vocab_size: int = field(default=4096, metadata={"help": "tokens in all: 6 special + 256 bytes + merges (4096 fits the models' embedding)"})
    data_limit_mb: float = field(default=100, metadata={"help": "train on at most the first N MB of stories_train.txt (0 = all)"})
    pattern: str = field(default="gpt2", metadata={"help": "pre-tokenizer regex preset (gpt2: ' 17' can become one token)", "choices": list(PATTERNS)})
    with_sft_text: bool = field(default=True, metadata={"help": "learn merges from the instruction and TinyMath text too, not only the stories"})
    num_workers: int = field(default=0, metadata={"help": "processes counting pre-tokens (0 = one per CPU core; the result is the same)"})
    sample: str = field(
        default="Once upon a time, Lily found 12 shiny stones. She said, \"I'll keep them!\"<|endoftext|>",
        metadata={"help": "a sentence to show cut into tokens"},
    )
    show: int = field(default=12, metadata={"help": "how many merges / longest tokens to print"})
    force: bool = field(default=False, metadata={"help": "retrain even if tokenizer.json was made from the same config and input"})

    def __post_init__(self):
        smallest = len(SPECIAL_TOKENS) + 256
        if self.vocab_size < smallest:
            raise ValueError(f"field 'vocab_size' must be at least {smallest} (the special tokens + 256 bytes), got {self.vocab_size}")
        if self.data_limit_mb < 0:
            raise ValueError(f"field 'data_limit_mb' must be >= 0 (0 = all), got {self.data_limit_mb}")


def input_signature(path: Path, max_bytes: int | None) -> dict:
    """What identifies the training input cheaply: its path, size and modification time."""
    stat = path.stat()
    return {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "max_bytes": max_bytes}


def write_sft_text(raw: Path, out_path: Path) -> Path:
    """The text of the SFT data (instruction messages, TinyMath questions and worked answers) as one file.

    Why: the stories hold no digit and no "How many ... ?", so a tokenizer trained on them alone
    spends no merge on " 17" or " apples": every number in the math lessons would be cut into
    bytes. Later lessons train on this text, so the tokenizer should know it too.
    """
    documents = []
    for row in read_jsonl(require(raw / "instructions_train.jsonl", "instruction conversations", 0), RERUN_LESSON_0):
        documents += [message["content"] for message in row["messages"]]
    for problem in read_jsonl(require(raw / "tinymath_train.jsonl", "TinyMath problems", 0), RERUN_LESSON_0):
        documents.append(f"{problem['question']}\n{problem['answer']}")
    text = "\n\n".join(documents) + "\n"
    if not out_path.exists() or out_path.read_text(encoding="utf-8") != text:  # unchanged: keep its mtime, so a rerun skips
        write_text(out_path, text)
    return out_path


def show_token(token: bytes) -> str:
    """b' the' -> '␣the', b'\\n' -> '\\n', b'\\xe2' -> '\\xe2': visible spaces, escapes for the rest."""
    text = token.decode("utf-8", errors="backslashreplace")
    return text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t")


def bracketed(tok: Tokenizer, text: str) -> str:
    """'the cat' -> '[the][␣cat]': each token in brackets (a broken UTF-8 piece shows as \\xNN)."""
    return "".join(f"[{show_token(tok.decode_bytes([i]))}]" for i in tok.encode(text))


def inspect(tok: Tokenizer, cfg: TokenizerConfig, val_path: Path) -> None:
    """Print what the tokenizer learned."""
    base = len(tok.special_tokens) + 256
    print(f"\nvocabulary: {tok.vocab_size} tokens = {len(tok.special_tokens)} special + 256 bytes + {len(tok.merges)} merges")
    print(f"special tokens: {tok.special_tokens}")

    print(f"\nthe first {cfg.show} merges (the most frequent pairs of the corpus):")
    for k, (a, b) in enumerate(tok.merges[: cfg.show]):
        print(f"  {base + k:>5}: {show_token(a):>10} + {show_token(b):<10} -> {show_token(a + b)}")

    longest = sorted(range(base, tok.vocab_size), key=lambda i: (-len(tok.vocab[i]), i))[: cfg.show]
    print(f"\nthe {cfg.show} longest tokens:")
    for i in longest:
        print(f"  {i:>5}: {show_token(tok.vocab[i])!r} ({len(tok.vocab[i])} bytes)")

    if val_path.exists():
        text = val_path.read_text(encoding="utf-8")
        ids = tok.encode(text)
        nbytes = len(text.encode("utf-8"))
        print(f"\nbytes per token on {val_path.name}: {nbytes:,} bytes / {len(ids):,} tokens = {nbytes / len(ids):.2f}")
        assert tok.decode(ids) == text, "round trip failed"  # cheap insurance: the text comes back exactly

    print(f"\nthe sample, one [token] each ({len(tok.encode(cfg.sample))} tokens for {len(cfg.sample.encode())} bytes):")
    print(f"  {bracketed(tok, cfg.sample)}")
    print(f"  ids: {tok.encode(cfg.sample)}")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(TokenizerConfig, argv)
    print_config(cfg)
    train_path = require(raw_dir() / "stories_train.txt", "training stories", 0)
    val_path = raw_dir() / "stories_val.txt"
    out_dir = tokenizer_dir()
    out_path, meta_path = out_dir / "tokenizer.json", out_dir / "train_meta.json"
    max_bytes = int(cfg.data_limit_mb * MB) if cfg.data_limit_mb > 0 else None
    num_workers = cfg.num_workers or os.cpu_count() or 1
    print(f"reading  {train_path} ({train_path.stat().st_size / MB:.1f} MB; using at most {cfg.data_limit_mb or 'all'} MB)")
    print(f"writing  {out_path}")
    inputs = [train_path]
    if cfg.with_sft_text:  # first, so that --data_limit_mb cuts the stories, never this text
        out_dir.mkdir(parents=True, exist_ok=True)
        sft_path = write_sft_text(raw_dir(), out_dir / "sft_text.txt")
        inputs.insert(0, sft_path)
        print(f"also     {sft_path} ({sft_path.stat().st_size / MB:.1f} MB: instruction and TinyMath text)")

    # 1. skip the work when the same config was already trained on the same input
    wanted = {"config": {k: v for k, v in config_to_dict(cfg).items() if k in ("vocab_size", "data_limit_mb", "pattern", "with_sft_text")},
              "input": [input_signature(path, max_bytes) for path in inputs]}
    start = time.time()
    previous = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if not cfg.force and out_path.exists() and previous and {k: previous.get(k) for k in wanted} == wanted:
        tok = Tokenizer.load(out_path)
        print(f"\ntokenizer is up to date (same config, same input): skipped training (--force retrains). "
              f"It took {previous.get('seconds', float('nan')):.1f} s when it was trained.")
    else:
        # 2. train: count pre-tokens in parallel, then merge (a progress bar shows the merges)
        print(f"\ntraining with {num_workers} worker process(es) ...")
        with warnings.catch_warnings():  # "ran out of pairs" is explained below, in a note of our own
            warnings.filterwarnings("ignore", message="the corpus ran out")
            tok = Tokenizer.train(inputs, cfg.vocab_size, SPECIAL_TOKENS, cfg.pattern, num_workers=num_workers, max_bytes=max_bytes)
        seconds = time.time() - start
        tok.save(out_path)
        meta = dict(wanted, seconds=round(seconds, 2), fingerprint=tok.fingerprint(), vocab_size=tok.vocab_size)
        write_json(meta_path, meta)
        print(f"trained in {seconds:.1f} s; saved {out_path} (fingerprint {tok.fingerprint()})")
        if tok.vocab_size < cfg.vocab_size:
            print(f"note: the corpus ran out of pairs to merge, so the vocabulary has {tok.vocab_size} tokens, not "
                  f"{cfg.vocab_size}: every pre-token of the corpus is already a single token. More varied text "
                  f"(e.g. lesson 0 with --source tinystories) gives the full {cfg.vocab_size}.")

    inspect(tok, cfg, val_path)
    print(f"\ntime: {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
