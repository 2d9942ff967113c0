"""
Token bins: every dataset encoded once into flat files of token ids, read back without re-tokenizing.

Training reads millions of tokens; tokenizing them on the fly would keep the CPU busy with BPE
instead of the model. So lesson 2 encodes everything once: the stories into one long uint16 array
(`train.bin`, `val.bin`, each story `<bos> story <eos>`), which training reads through `np.memmap`
(the OS pages in only the windows we touch); conversations into ids + loss masks (SFT); preference
pairs into prompt / chosen / rejected ids (DPO, reward model); RL prompts with their answers.
This is nanoGPT's `prepare.py` idea, with a `meta.json` that records the tokenizer's fingerprint so
bins made with one tokenizer are never read with another (token 812 would mean another word).

Files in data/bins/ (uint16 ids, because vocab 4096 < 65536; uint8 masks; int64 offsets):

    train.bin, val.bin                       pretraining: one flat array of ids per split
    sft_{split}.ids.bin / .mask.bin / .idx.npy   conversations; conversation i is ids[idx[i]:idx[i+1]]
    pref_{split}.{prompt,chosen,rejected}.ids.bin / .idx.npy, pref_{split}.flaws.json
    rl_{split}.ids.bin / .idx.npy, rl_{split}.answers.json
    meta.json                                written LAST: token counts, tokenizer, sources

Run it with `make lesson-2`; test it with `make check-2` (tests/test_02_bins.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from nano.common.fileio import atomic_open, read_jsonl, write_json
from nano.common.paths import bins_dir as default_bins_dir
from nano.common.paths import require
from nano.common.workers import map_batches  # fn(tokenizer, batch) for each batch, in worker processes
from nano.data.story_files import iter_story_file
from nano.data.tinymath import arithmetic_drills, tinymath_conversation
from nano.text.chat_format import IGNORE_INDEX, encode_text, render_conversation, render_prompt, render_response, special_id

TOKEN_DTYPE = np.uint16  # 2 bytes a token: half of int32, and enough for any vocab up to 65,536
MAX_VOCAB = int(np.iinfo(TOKEN_DTYPE).max) + 1  # 65536
MASK_DTYPE = np.uint8
META_NAME = "meta.json"
STORIES_PER_BATCH = 512  # stories a worker process encodes at a time
RAW_HINT = "re-run `make lesson-0`"  # what to do about a raw file that cannot be read
FORMAT_VERSION = 2  # bump when the layout of the files, or what goes into them, changes: old bins are then rebuilt

# The raw files lesson 0 writes (see the common contracts), by the part of lesson 2 that reads them.
RAW_INPUTS = {
    "pretrain": ["stories_train.txt", "stories_val.txt"],
    "sft": ["instructions_train.jsonl", "instructions_val.jsonl", "tinymath_train.jsonl"],
    "preferences": ["preferences_train.jsonl", "preferences_val.jsonl"],
    "rl": ["rl_prompts_train.jsonl", "rl_prompts_test.jsonl"],
}
SPLITS = {"pretrain": ("train", "val"), "sft": ("train", "val"), "preferences": ("train", "val"), "rl": ("train", "test")}


class TokenizerMismatchError(ValueError):
    """Bins made with one tokenizer, read with another."""


def check_vocab_fits(tokenizer) -> None:
    """Refuse a vocabulary whose ids do not fit uint16 (ids 0..65535)."""
    if tokenizer.vocab_size > MAX_VOCAB:
        raise ValueError(
            f"vocab_size {tokenizer.vocab_size} does not fit the uint16 token bins (at most {MAX_VOCAB}); "
            "train a smaller tokenizer (make lesson-1 ARGS='--vocab_size 4096')"
        )


# -----------------------------------------------------------------------------
# small helpers: hashing inputs, batching


def _file_digest(path: Path) -> dict:
    """{"bytes": size, "sha256": first 16 hex digits}: identifies an input, to know when to rebuild."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()[:16]}


def _batched(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items, the last one shorter: [1, 2, 3, 4, 5], 2 -> [1, 2], [3, 4], [5]."""
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# -----------------------------------------------------------------------------
# 1. pretraining bins: stories -> <bos> story <eos> -> one flat uint16 file


def encode_story(tokenizer, story: str) -> list[int]:
    """<bos> + the story's tokens + <eos>: each story starts fresh and says where it ends."""
    return [special_id(tokenizer, "<bos>")] + encode_text(tokenizer, story) + [special_id(tokenizer, "<eos>")]


def _encode_story_batch(tokenizer, stories: list[str]) -> np.ndarray:
    ids: list[int] = []
    for story in stories:
        ids += encode_story(tokenizer, story)
    return np.asarray(ids, dtype=TOKEN_DTYPE)


def write_pretrain_bin(text_path: Path, out_path: Path, tokenizer, num_workers: int = 1,
                       extra_documents: Sequence[str] = ()) -> dict:
    """Encode every story of `text_path` (then any `extra_documents`, each `<bos> doc <eos>` like a
    story) into the flat uint16 file `out_path`; return the counts."""
    check_vocab_fits(tokenizer)
    counts = {"stories": 0, "tokens": 0}

    def batches():  # streams the file (nano/data/story_files.py) and counts stories as they are read
        for stories in _batched(iter_story_file(text_path, on_read=bar.update), STORIES_PER_BATCH):
            counts["stories"] += len(stories)
            yield stories

    total_bytes = text_path.stat().st_size
    with atomic_open(out_path, "wb") as out, tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"encode {text_path.name}") as bar:
        for ids in map_batches(_encode_story_batch, batches(), tokenizer, num_workers):
            out.write(ids.tobytes())
            counts["tokens"] += len(ids)
        if counts["stories"] == 0:  # (raised inside the block: no empty out_path is left behind)
            raise ValueError(f"{text_path} holds no stories — {RAW_HINT}")
        if extra_documents:
            ids = _encode_story_batch(tokenizer, list(extra_documents))
            out.write(ids.tobytes())
            counts["tokens"] += len(ids)
            counts["extra_documents"] = len(extra_documents)
    return counts


# -----------------------------------------------------------------------------
# ragged arrays: many sequences of different lengths in one flat file plus offsets


class RaggedWriter:
    """Append sequences (and optional masks) to open files; the offsets of each sequence are kept.

    Sequence i is ids[idx[i]:idx[i+1]]: add([5, 6]) then add([7]) -> ids [5, 6, 7], idx [0, 2, 3].
    Made by `ragged_writer`, which names the files and writes the offsets at the end.
    """

    def __init__(self, ids_file: BinaryIO, mask_file: BinaryIO | None = None):
        self.ids_file, self.mask_file = ids_file, mask_file
        self.offsets = [0]

    def add(self, ids: Sequence[int], mask: Sequence[int] | None = None) -> None:
        self.ids_file.write(np.asarray(ids, dtype=TOKEN_DTYPE).tobytes())
        if self.mask_file is not None:
            assert mask is not None and len(mask) == len(ids), "a mask needs one value per id"
            self.mask_file.write(np.asarray(mask, dtype=MASK_DTYPE).tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))

    @property
    def counts(self) -> dict:
        return {"sequences": len(self.offsets) - 1, "tokens": self.offsets[-1]}


@contextmanager
def ragged_writer(out_dir: Path, name: str, with_mask: bool) -> Iterator[RaggedWriter]:
    """`{name}.ids.bin` (+ `{name}.mask.bin`) and `{name}.idx.npy` in `out_dir`, written by a RaggedWriter.

        with ragged_writer(out_dir, "sft_train", with_mask=True) as writer:
            writer.add(ids, mask)

    Every file goes through atomic_open: none appears under its final name unless the block ends
    without an error (then their .tmp files are removed).
    """
    with (atomic_open(out_dir / f"{name}.ids.bin", "wb") as ids_file,
          atomic_open(out_dir / f"{name}.mask.bin", "wb") if with_mask else nullcontext() as mask_file):
        writer = RaggedWriter(ids_file, mask_file)
        yield writer
        with atomic_open(out_dir / f"{name}.idx.npy", "wb") as f:
            np.save(f, np.asarray(writer.offsets, dtype=np.int64))


class RaggedBin:
    """Read what RaggedWriter wrote: len(), ids(i), mask(i), lengths; memory-mapped, so opening is instant."""

    def __init__(self, bins_dir: Path, name: str):
        idx_path = require(bins_dir / f"{name}.idx.npy", f"bins '{name}'", 2)
        self.offsets = np.load(idx_path)
        self._ids = _memmap(bins_dir / f"{name}.ids.bin", TOKEN_DTYPE)
        mask_path = bins_dir / f"{name}.mask.bin"
        self._mask = _memmap(mask_path, MASK_DTYPE) if mask_path.exists() else None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _span(self, i: int) -> slice:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} sequences")
        i = i % len(self)
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def ids(self, i: int) -> np.ndarray:
        return np.asarray(self._ids[self._span(i)], dtype=np.int64)

    def mask(self, i: int) -> np.ndarray:
        if self._mask is None:
            raise ValueError("these bins were written without masks")
        return np.asarray(self._mask[self._span(i)], dtype=np.int64)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _memmap(path: Path, dtype) -> np.ndarray:
    require(path, "token bins", 2)
    if path.stat().st_size == 0:  # footgun: np.memmap refuses an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


# -----------------------------------------------------------------------------
# 2. SFT bins: conversations -> ids + loss mask


def split_tinymath(problems: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, val): the last `val_fraction` of tinymath_train.jsonl is held out for SFT validation.

    tinymath_test.jsonl is NOT used here: it is reserved for evaluation (lesson 12), so the model
    never trains, nor early-stops, on the questions it is graded on.
    """
    n_val = int(round(len(problems) * val_fraction))
    if val_fraction > 0 and len(problems) > 1:
        n_val = max(1, n_val)
    return problems[: len(problems) - n_val], problems[len(problems) - n_val :]


def _render_conversation_batch(tokenizer, conversations: list[tuple[str, list[dict]]]) -> list[tuple[list[int], list[int]]]:
    out = []
    for where, messages in conversations:
        try:
            out.append(render_conversation(messages, tokenizer))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return out


def write_sft_bins(conversations: list[tuple[str, list[dict]]], out_dir: Path, name: str, tokenizer, num_workers: int = 1) -> dict:
    """Render (source, messages) pairs with the chat format and store ids + masks under `name`."""
    trained = 0
    batches = [conversations[i : i + 256] for i in range(0, len(conversations), 256)]
    with (ragged_writer(out_dir, name, with_mask=True) as writer,
          tqdm(total=len(conversations), unit="conv", desc=f"render {name}") as bar):
        for rendered in map_batches(_render_conversation_batch, batches, tokenizer, num_workers):
            for ids, mask in rendered:
                writer.add(ids, mask)
                trained += sum(mask)
            bar.update(len(rendered))
    return {"conversations": writer.counts["sequences"], "tokens": writer.counts["tokens"], "trained_tokens": trained}


# -----------------------------------------------------------------------------
# 3. preference bins and 4. RL prompts


def write_preference_bins(pairs: list[dict], out_dir: Path, name: str, tokenizer) -> dict:
    """Prompt ids (render_prompt of the user message) and the chosen / rejected replies (+ <end_of_turn>)."""
    flaws = []
    with (ragged_writer(out_dir, f"{name}.prompt", with_mask=False) as prompt,
          ragged_writer(out_dir, f"{name}.chosen", with_mask=False) as chosen,
          ragged_writer(out_dir, f"{name}.rejected", with_mask=False) as rejected):
        for pair in tqdm(pairs, unit="pair", desc=f"render {name}"):
            prompt.add(render_prompt([{"role": "user", "content": pair["prompt"]}], tokenizer))
            chosen.add(render_response(pair["chosen"], tokenizer))
            rejected.add(render_response(pair["rejected"], tokenizer))
            flaws.append(pair.get("flaw", ""))
    write_json(out_dir / f"{name}.flaws.json", flaws)
    writers = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {"pairs": len(pairs), **{f"{part}_tokens": w.counts["tokens"] for part, w in writers.items()}}


def write_rl_bins(prompts: list[dict], out_dir: Path, name: str, tokenizer) -> dict:
    """Prompt ids ready for generation, and beside them the answer a reply is checked against."""
    answers = []
    with ragged_writer(out_dir, name, with_mask=False) as writer:
        for row in prompts:
            writer.add(render_prompt([{"role": "user", "content": row["prompt"]}], tokenizer))
            answers.append({"answer": str(row["answer"]), "prompt": row["prompt"], "source": row.get("source", "")})
    write_json(out_dir / f"{name}.answers.json", answers)
    return {"prompts": len(prompts), "tokens": writer.counts["tokens"]}


# -----------------------------------------------------------------------------
# building everything, and skipping when nothing changed


def source_manifest(raw: Path) -> dict:
    """Size and hash of every raw input (and lesson 0's manifest), missing ones named with the fix."""
    require(raw / "manifest.json", "raw data (lesson 0's manifest.json)", 0)
    sources = {"manifest.json": _file_digest(raw / "manifest.json")}
    for names in RAW_INPUTS.values():
        for name in names:
            sources[name] = _file_digest(require(raw / name, f"raw file {name}", 0))
    return sources


def build_bins(
    tokenizer,
    tokenizer_path: Path | str,
    raw: Path,
    out: Path | None = None,
    num_workers: int = 1,
    tinymath_val_fraction: float = 0.05,
    force: bool = False,
    math_in_pretraining: bool = False,
    arithmetic_repeats: int = 0,
) -> tuple[dict, bool]:
    """Write every bin of lesson 2 into `out` (data/bins/); return (meta, built). built is False
    when meta.json already matches this tokenizer, these inputs and these settings (nothing to do)."""
    out = Path(out) if out is not None else default_bins_dir()
    check_vocab_fits(tokenizer)
    settings = {"format_version": FORMAT_VERSION, "tinymath_val_fraction": tinymath_val_fraction,
                "math_in_pretraining": math_in_pretraining, "arithmetic_repeats": arithmetic_repeats}
    sources = source_manifest(raw)
    fingerprint = tokenizer.fingerprint()

    # 0. up to date? (same tokenizer, same inputs, same settings, every file still there)
    meta_path = out / META_NAME
    if meta_path.exists() and not force:
        old = json.loads(meta_path.read_text())
        same = old.get("tokenizer", {}).get("fingerprint") == fingerprint and old.get("sources") == sources and old.get("settings") == settings
        if same and all((out / f).exists() for f in old.get("files", [])):
            return old, False
    out.mkdir(parents=True, exist_ok=True)
    if meta_path.exists():
        meta_path.unlink()  # from here until the end the bins are incomplete: readers must refuse them
    start = time.time()
    files: list[str] = []

    # 1. pretraining: the stories; optionally the TinyMath training problems too, as plain text, and
    # arithmetic drills. The built-in stories hold no digit at all, so without them the number
    # embeddings reach SFT untrained and the model cannot even copy a number from the question.
    # Real pretraining corpora mix such text in for the same reason. val.bin stays stories only.
    tinymath_train, tinymath_val = split_tinymath(read_jsonl(raw / "tinymath_train.jsonl", RAW_HINT), tinymath_val_fraction)
    pretrain = {}
    for split in SPLITS["pretrain"]:
        extra = []
        if split == "train":
            extra += [f"{p['question']}\n{p['answer']}" for p in tinymath_train] if math_in_pretraining else []
            extra += arithmetic_drills(arithmetic_repeats)
        pretrain[split] = write_pretrain_bin(raw / f"stories_{split}.txt", out / f"{split}.bin", tokenizer, num_workers, extra)
        files.append(f"{split}.bin")

    # 2. SFT: instructions + TinyMath worked answers (train) / a held-out TinyMath slice (val)
    sft = {}
    for split, tinymath in (("train", tinymath_train), ("val", tinymath_val)):
        instructions_path = raw / f"instructions_{split}.jsonl"
        conversations = [(f"{instructions_path.name}:{i + 1}", row["messages"]) for i, row in enumerate(read_jsonl(instructions_path, RAW_HINT))]
        n_instructions = len(conversations)
        conversations += [(f"tinymath_train.jsonl id {p.get('id')}", tinymath_conversation(p)) for p in tinymath]
        sft[split] = write_sft_bins(conversations, out, f"sft_{split}", tokenizer, num_workers)
        sft[split].update(from_instructions=n_instructions, from_tinymath=len(tinymath))
        files += [f"sft_{split}.{s}" for s in ("ids.bin", "mask.bin", "idx.npy")]

    # 3. preferences and 4. RL prompts
    preferences = {}
    for split in SPLITS["preferences"]:
        preferences[split] = write_preference_bins(read_jsonl(raw / f"preferences_{split}.jsonl", RAW_HINT), out, f"pref_{split}", tokenizer)
        files += [f"pref_{split}.{p}.{s}" for p in ("prompt", "chosen", "rejected") for s in ("ids.bin", "idx.npy")]
        files.append(f"pref_{split}.flaws.json")
    rl = {}
    for split in SPLITS["rl"]:
        rl[split] = write_rl_bins(read_jsonl(raw / f"rl_prompts_{split}.jsonl", RAW_HINT), out, f"rl_{split}", tokenizer)
        files += [f"rl_{split}.ids.bin", f"rl_{split}.idx.npy", f"rl_{split}.answers.json"]

    # 5. meta.json last: its presence says every file above is complete
    meta = {
        "tokenizer": {"fingerprint": fingerprint, "path": str(tokenizer_path), "vocab_size": tokenizer.vocab_size},
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "special_tokens": dict(tokenizer.special_tokens),
        "settings": settings,
        "pretrain": pretrain,
        "sft": sft,
        "preferences": preferences,
        "rl": rl,
        "sources": sources,
        "files": files,
        "seconds": round(time.time() - start, 1),
    }
    write_json(meta_path, meta)
    return meta, True


# -----------------------------------------------------------------------------
# reading: what the later lessons call


def load_meta(bins_dir: Path | None = None) -> dict:
    """meta.json of finished bins, or "run `make lesson-2` first"."""
    bins_dir = Path(bins_dir) if bins_dir is not None else default_bins_dir()
    return json.loads(require(bins_dir / META_NAME, "token bins (meta.json)", 2).read_text())


def check_tokenizer(bins_dir: Path | None, tokenizer) -> dict:
    """Refuse bins made with another tokenizer; `tokenizer` is a Tokenizer or its fingerprint string."""
    bins_dir = Path(bins_dir) if bins_dir is not None else default_bins_dir()
    meta = load_meta(bins_dir)
    mine = tokenizer if isinstance(tokenizer, str) else tokenizer.fingerprint()
    theirs = meta["tokenizer"]["fingerprint"]
    if mine != theirs:
        raise TokenizerMismatchError(
            f"the bins in {bins_dir} were made with tokenizer {theirs} ({meta['tokenizer']['path']}), "
            f"but this tokenizer is {mine}: the same id would mean different text. "
            "Re-run `make lesson-2` to re-encode the data with the current tokenizer."
        )
    return meta


def _open(bins_dir: Path | None, tokenizer) -> Path:
    bins_dir = Path(bins_dir) if bins_dir is not None else default_bins_dir()
    if tokenizer is not None:
        check_tokenizer(bins_dir, tokenizer)
    else:
        load_meta(bins_dir)  # at least: the bins are complete
    return bins_dir


def _check_split(kind: str, split: str) -> None:
    if split not in SPLITS[kind]:
        raise ValueError(f"{kind} bins have splits {SPLITS[kind]}, not {split!r}")


def load_pretrain_tokens(split: str = "train", tokenizer=None, bins_dir: Path | None = None) -> np.memmap:
    """The flat uint16 token array of `split` ("train" / "val"), memory-mapped (nothing read yet)."""
    _check_split("pretrain", split)
    return _memmap(_open(bins_dir, tokenizer) / f"{split}.bin", TOKEN_DTYPE)


def get_pretrain_batch(
    tokens: np.ndarray,
    batch_size: int,
    context_len: int,
    generator: torch.Generator | np.random.Generator | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the token stream: x (B, T) int64 and y = x shifted one to the left.

    tokens [10, 11, 12, 13, 14], context_len 3, a window starting at 1 -> x [11, 12, 13], y [12, 13, 14]:
    at each position the target is the next token. Windows cross story boundaries on purpose;
    the model learns that after <eos> comes <bos> and a new story.
    """
    if len(tokens) < context_len + 1:
        raise ValueError(f"the bin holds {len(tokens)} tokens, fewer than context_len + 1 = {context_len + 1}")
    high = len(tokens) - context_len  # starts in [0, high): the last window ends at the last token
    if isinstance(generator, np.random.Generator):
        starts = generator.integers(0, high, size=batch_size)
    else:
        starts = torch.randint(high, (batch_size,), generator=generator).numpy()
    windows = np.stack([np.asarray(tokens[s : s + context_len + 1], dtype=np.int64) for s in starts])  # (B, T+1)
    x = torch.from_numpy(windows[:, :-1])  # (B, T)
    y = torch.from_numpy(windows[:, 1:])  # (B, T)
    if torch.device(device).type == "cuda":  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class SFTDataset:
    """Rendered conversations: dataset[i] -> (ids, mask), both int64 numpy arrays of one length."""

    def __init__(self, split: str = "train", tokenizer=None, bins_dir: Path | None = None):
        _check_split("sft", split)
        self.bins = RaggedBin(_open(bins_dir, tokenizer), f"sft_{split}")

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.bins.ids(i), self.bins.mask(i)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens in each conversation (for length-grouped batches)."""
        return self.bins.lengths


def _inputs_and_targets(ids: np.ndarray, mask: np.ndarray, max_len: int | None) -> tuple[np.ndarray, np.ndarray]:
    """x = ids[:-1]; y = ids[1:] where the mask says "train on it", else IGNORE_INDEX.

    ids [bos, Q, A, eot], mask [0, 0, 1, 1] -> x [bos, Q, A], y [-100, A, eot]
    """
    ids = np.asarray(ids, dtype=np.int64)
    mask = np.asarray(mask)
    if max_len is not None:  # keep max_len input positions: max_len + 1 tokens
        ids, mask = ids[: max_len + 1], mask[: max_len + 1]
    x = ids[:-1]
    y = np.where(mask[1:] == 1, ids[1:], IGNORE_INDEX)
    return x, y


def sft_batch(
    examples: Sequence[tuple[np.ndarray, np.ndarray]],
    max_len: int | None = None,
    pack: bool = False,
    pad_id: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate (ids, mask) examples into x (B, T) and y (B, T) int64 tensors for a causal LM loss.

    Targets are the next token where the mask is 1 and IGNORE_INDEX (-100) elsewhere, so the loss
    counts only what the assistant wrote. Padding: x gets pad_id (0, <pad>), y gets -100 — padded
    on the right, where causal attention means real tokens never look at pads.

    pack=True (needs max_len) lays examples end to end in rows of max_len instead of one per row,
    so few positions are wasted on padding. Simple packing: an example may attend to the examples
    before it in its row; their targets do not leak, but the context does (cheap and common in SFT).
    """
    pairs = [_inputs_and_targets(ids, mask, max_len) for ids, mask in examples]
    if pack:
        if max_len is None:
            raise ValueError("pack=True needs max_len (the length of each packed row)")
        rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
        used = 0
        for x, y in pairs:  # greedy: start a new row when the next example does not fit
            if used + len(x) > max_len and rows[-1]:
                rows.append([])
                used = 0
            rows[-1].append((x, y))
            used += len(x)
        pairs = [(np.concatenate([x for x, _ in row]), np.concatenate([y for _, y in row])) for row in rows]
    width = max_len if pack else max((len(x) for x, _ in pairs), default=0)
    x_batch = torch.full((len(pairs), width), pad_id, dtype=torch.long)  # (B, T)
    y_batch = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, (x, y) in enumerate(pairs):
        x_batch[row, : len(x)] = torch.from_numpy(x)
        y_batch[row, : len(y)] = torch.from_numpy(y)
    return x_batch.to(device), y_batch.to(device)


class PreferenceDataset:
    """Preference pairs: dataset[i] -> dict of int64 arrays, ready for DPO or a reward model.

      prompt_ids                  the rendered prompt, ending in "<start_of_turn>model\\n"
      chosen_ids, chosen_mask     prompt + chosen reply (+ <end_of_turn>); mask 1 on the reply only
      rejected_ids, rejected_mask the same for the rejected reply
      flaw                        what is wrong with the rejected reply (lesson 0's label)

    (chosen_ids, chosen_mask) is an SFT-style example: sft_batch() makes targets for the reply only.
    """

    def __init__(self, split: str = "train", tokenizer=None, bins_dir: Path | None = None):
        _check_split("preferences", split)
        bins_dir = _open(bins_dir, tokenizer)
        self.parts = {part: RaggedBin(bins_dir, f"pref_{split}.{part}") for part in ("prompt", "chosen", "rejected")}
        self.flaws = json.loads((bins_dir / f"pref_{split}.flaws.json").read_text())

    def __len__(self) -> int:
        return len(self.parts["prompt"])

    def __getitem__(self, i: int) -> dict:
        prompt = self.parts["prompt"].ids(i)
        item: dict[str, Any] = {"prompt_ids": prompt, "flaw": self.flaws[i]}
        for part in ("chosen", "rejected"):
            item[f"{part}_ids"], item[f"{part}_mask"] = prompt_and_reply(prompt, self.parts[part].ids(i))
        return item

    def fitting(self, max_len: int) -> list[int]:
        """Indices of the pairs whose chosen and rejected sides (prompt included) both fit in max_len tokens."""
        items = (self[i] for i in range(len(self)))
        return [i for i, it in enumerate(items) if max(len(it["chosen_ids"]), len(it["rejected_ids"])) <= max_len]


def prompt_and_reply(prompt: np.ndarray, reply: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(prompt + reply ids, mask that is 1 on the reply only): one side of a preference pair."""
    reply = np.asarray(reply, dtype=np.int64)
    return np.concatenate([prompt, reply]), np.concatenate([np.zeros(len(prompt), np.int64), np.ones(len(reply), np.int64)])


def load_preferences(split: str = "train", tokenizer=None, bins_dir: Path | None = None) -> PreferenceDataset:
    return PreferenceDataset(split, tokenizer, bins_dir)


@dataclass
class RLPrompt:
    """One RL task: the ids to generate from, the prompt text, and the answer a reply must reach."""

    prompt_ids: list[int]
    prompt: str
    answer: str
    source: str = ""


def load_rl_prompts(split: str = "train", tokenizer=None, bins_dir: Path | None = None) -> list[RLPrompt]:
    """The RL prompt set of `split` ("train" / "test") as a list of RLPrompt."""
    _check_split("rl", split)
    bins_dir = _open(bins_dir, tokenizer)
    ids = RaggedBin(bins_dir, f"rl_{split}")
    rows = json.loads((bins_dir / f"rl_{split}.answers.json").read_text())
    return [RLPrompt(ids.ids(i).tolist(), row["prompt"], row["answer"], row.get("source", "")) for i, row in enumerate(rows)]
