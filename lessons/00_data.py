"""
Lesson 0: data. Write everything the later lessons read into data/raw/, offline by default.

    python lessons/00_data.py                                      # the built-in data, a few seconds
    python lessons/00_data.py --stories 200000                     # more of it (~110 MB)
    python lessons/00_data.py --source tinystories --data_limit_mb 100   # real TinyStories (download)
    python lessons/00_data.py --source path/to/stories.txt         # a local TinyStories-format file
    python lessons/00_data.py --gsm8k download                     # also fetch GSM8K for lesson 12
    python lessons/00_data.py --fast_dev_run                       # tiny counts, a smoke test (data/fast-dev-run/raw/)

Stories come from `--source` (built in: nano/data/stories.py); TinyMath (nano/data/tinymath.py), conversations
and preference pairs (nano/data/synthetic.py) and RL prompts (TinyMath, and "use the words ...") always
come from the built-in generator,
seeded by `--seed`. Each file is written to a temporary name and renamed when complete, and
manifest.json is written last: its presence means lesson 0 finished. Run it again with the same
arguments and it skips the work that is done.
The lesson doc is lessons/00_data.md; the tests are tests/test_00_data.py and tests/test_00_download.py.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from nano.common import paths

from nano.common.config import DEFAULT_SEED, config_to_dict, parse_config, print_config
from nano.common.fileio import read_jsonl, write_json, write_jsonl
from nano.data import stories, story_files, synthetic, tinymath, world
from nano.data.download import DownloadError, download, gsm8k_url, tinystories_url

MB = 1_000_000


@dataclass
class DataConfig:
    # where the stories come from (everything else is always built in)
    source: str = field(default="synthetic", metadata={"help": "'synthetic' (built-in, offline), 'tinystories' (download), "
                                                               "or a path to a TinyStories-format .txt (or a folder with TinyStoriesV2-GPT4-train.txt/-valid.txt)"})
    seed: int = field(default=DEFAULT_SEED, metadata={"help": "seed of the built-in generator: same seed, same bytes"})
    # ~570 bytes a story: 10,000 stories are ~5.7 MB, ~1.4M tokens with a 4096 BPE vocab -- about what
    # the tiny preset sees in a few minutes of CPU training, so lessons 1-2 stay quick too
    stories: int = field(default=10_000, metadata={"help": "train stories (built-in source; ~570 bytes each)"})
    val_stories: int = field(default=500, metadata={"help": "validation stories (tinystories / a path: the first N stories of the valid file)"})
    conversations: int = field(default=4000, metadata={"help": "instruction conversations for SFT (train)"})
    val_conversations: int = field(default=200, metadata={"help": "instruction conversations held out for validation"})
    tinymath_train: int = field(default=20_000, metadata={"help": "TinyMath word problems for training (SFT, and as text in pretraining)"})
    tinymath_test: int = field(default=500, metadata={"help": "TinyMath problems held out for evaluation (no question shared with train)"})
    preferences: int = field(default=2000, metadata={"help": "preference pairs (chosen vs flawed) for the reward model / DPO"})
    val_preferences: int = field(default=200, metadata={"help": "preference pairs held out for validation"})
    rl_prompts: int = field(default=2000, metadata={"help": "RL prompts with a numeric answer (train)"})
    rl_test: int = field(default=200, metadata={"help": "RL test prompts: the first N TinyMath test problems"})
    words_prompts: int = field(default=2000, metadata={"help": "'use the words ...' prompts to practise with RL (train)"})
    words_test: int = field(default=200, metadata={"help": "'use the words ...' prompts held out (word sets no training prompt asks for)"})
    data_limit_mb: float = field(default=0.0, metadata={"help": "tinystories / a path: keep only the first N MB of stories (0 = all; 100 is plenty on a CPU)"})
    gsm8k: str = field(default="", metadata={"help": "'' (none: lesson 12 uses TinyMath only), 'download', or a path to GSM8K jsonl (test.jsonl, or a folder with test/train.jsonl)"})
    fast_dev_run: bool = field(default=False, metadata={"help": "tiny counts for a smoke test (a few hundred stories)"})
    force: bool = field(default=False, metadata={"help": "regenerate even if data/raw already matches these arguments"})
    out_dir: str = field(default="", metadata={"help": "where to write ('' = data/raw/, or data/fast-dev-run/raw/ for a smoke test: never over the real data)"})

    def __post_init__(self):
        for name in ("stories", "val_stories", "conversations", "val_conversations", "tinymath_train", "tinymath_test",
                     "preferences", "val_preferences", "rl_prompts", "rl_test", "words_prompts", "words_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"field '{name}' must be >= 0, got {getattr(self, name)}")
        if self.rl_test > self.tinymath_test:
            raise ValueError(f"field 'rl_test' ({self.rl_test}) cannot exceed 'tinymath_test' ({self.tinymath_test}): "
                             "the RL test prompts are TinyMath test problems")
        if self.data_limit_mb < 0:
            raise ValueError(f"field 'data_limit_mb' must be >= 0 (0 = no limit), got {self.data_limit_mb}")


# --fast_dev_run caps every count at these
FAST_DEV_COUNTS = {"stories": 300, "val_stories": 50, "conversations": 100, "val_conversations": 20, "tinymath_train": 100,
                   "tinymath_test": 40, "preferences": 40, "val_preferences": 12, "rl_prompts": 40, "rl_test": 20,
                   "words_prompts": 40, "words_test": 20}


def counts_of(cfg: DataConfig) -> dict[str, int]:
    """The counts this run makes: the config's, capped by FAST_DEV_COUNTS under --fast_dev_run."""
    counts = {name: getattr(cfg, name) for name in FAST_DEV_COUNTS}
    if cfg.fast_dev_run:
        counts = {name: min(value, FAST_DEV_COUNTS[name]) for name, value in counts.items()}
    return counts


# ---------------------------------------------------------------------------------------------
# writing files: NAME.tmp first, then a rename (nano/common/fileio.py): an interrupted run leaves no half file
# ---------------------------------------------------------------------------------------------


def write_rows(path: Path, rows: Iterable[dict]) -> dict:
    """Write a jsonl file; return what the manifest records of it: {"count", "bytes"}."""
    return {"count": write_jsonl(path, rows), "bytes": path.stat().st_size}


# ---------------------------------------------------------------------------------------------
# the steps; each returns {file name: {"count", "bytes"}} for the files it wrote
# ---------------------------------------------------------------------------------------------


def step_stories(cfg: DataConfig, counts: dict, raw: Path) -> dict:
    train, val = raw / "stories_train.txt", raw / "stories_val.txt"
    if cfg.source == "synthetic":
        # validation first, then train stories skipping any that equals a validation story
        val_info = stories.write_stories(val, cfg.seed, counts["val_stories"], "val", progress=False)
        val_texts = frozenset(story_files.read_stories(val))
        train_info = stories.write_stories(train, cfg.seed, counts["stories"], "train", exclude=val_texts)
        return {val.name: val_info, train.name: train_info}

    limit = int(cfg.data_limit_mb * MB) if cfg.data_limit_mb > 0 else None
    if cfg.fast_dev_run:
        limit = min(limit or 10**12, MB)
    source = Path(cfg.source)
    if cfg.source == "tinystories":
        files = {split: _fetch_tinystories(split, raw / "downloads", limit) for split in ("valid", "train")}
    elif source.is_dir():
        files = {split: source / file_name for split, file_name in
                 (("train", "TinyStoriesV2-GPT4-train.txt"), ("valid", "TinyStoriesV2-GPT4-valid.txt"))}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"--source {source}: a folder must hold {', '.join(missing)}")
    elif source.is_file():
        files = {"train": source}
    else:
        raise FileNotFoundError(f"--source {cfg.source!r}: no such file or folder. Use 'synthetic', 'tinystories', "
                                "or a path to a TinyStories-format .txt file")

    if "valid" in files:
        val_info = story_files.write_story_file(val, _take(story_files.iter_story_file(files["valid"]), counts["val_stories"]))
        train_info = story_files.write_story_file(train, story_files.iter_story_file(files["train"]), limit)
    else:
        # one file: its first val_stories stories are the validation split, the rest is train
        texts = story_files.iter_story_file(files["train"])
        val_info = story_files.write_story_file(val, _take(texts, counts["val_stories"]))
        train_info = story_files.write_story_file(train, texts, limit)
    if train_info["count"] == 0:
        raise ValueError(f"--source {cfg.source}: found no train stories (stories are separated by {story_files.STORY_END})")
    return {val.name: val_info, train.name: train_info}


def _take(items: Iterator[str], n: int) -> Iterator[str]:
    for _ in range(n):
        item = next(items, None)
        if item is None:
            return
        yield item


def _fetch_tinystories(split: str, folder: Path, limit: int | None) -> Path:
    url = tinystories_url(split)
    name = url.rsplit("/", 1)[1]
    if limit is not None:  # a limited download is its own file: TinyStoriesV2-GPT4-train.first100MB.txt
        name = name.replace(".txt", f".first{limit / MB:g}MB.txt")
    print(f"  {url} -> {folder / name}")
    return download(url, folder / name, limit_bytes=limit, cut_at=story_files.STORY_END)


def step_instructions(cfg: DataConfig, counts: dict, raw: Path) -> dict:
    val = synthetic.conversations(cfg.seed, counts["val_conversations"], "val")
    train = synthetic.conversations(cfg.seed, counts["conversations"], "train",
                                    exclude_prompts={c["messages"][0]["content"] for c in val})
    return {"instructions_val.jsonl": write_rows(raw / "instructions_val.jsonl", val),
            "instructions_train.jsonl": write_rows(raw / "instructions_train.jsonl", train)}


def step_tinymath(cfg: DataConfig, counts: dict, raw: Path) -> dict:
    # the test split first, so it depends only on the seed and its own size, then train without its questions
    test = tinymath.tinymath_problems(cfg.seed, counts["tinymath_test"], "test")
    train = tinymath.tinymath_problems(cfg.seed, counts["tinymath_train"], "train", exclude={p["question"] for p in test})
    return {"tinymath_test.jsonl": write_rows(raw / "tinymath_test.jsonl", test),
            "tinymath_train.jsonl": write_rows(raw / "tinymath_train.jsonl", train)}


def step_preferences(cfg: DataConfig, counts: dict, raw: Path) -> dict:
    test_questions = {p["question"] for p in read_jsonl(raw / "tinymath_test.jsonl")}
    val = synthetic.preference_pairs(cfg.seed, counts["val_preferences"], "val", exclude_questions=test_questions)
    train = synthetic.preference_pairs(cfg.seed, counts["preferences"], "train", exclude_prompts={p["prompt"] for p in val},
                                       exclude_questions=test_questions)
    return {"preferences_val.jsonl": write_rows(raw / "preferences_val.jsonl", val),
            "preferences_train.jsonl": write_rows(raw / "preferences_train.jsonl", train)}


def step_rl_prompts(cfg: DataConfig, counts: dict, raw: Path) -> dict:
    # train: fresh problems, none of them a TinyMath test or train question; test: the first TinyMath test problems
    test_problems = read_jsonl(raw / "tinymath_test.jsonl")
    seen = {p["question"] for p in test_problems} | {p["question"] for p in read_jsonl(raw / "tinymath_train.jsonl")}
    train = tinymath.tinymath_problems(cfg.seed, counts["rl_prompts"], "rl", exclude=seen)
    return {"rl_prompts_test.jsonl": write_rows(raw / "rl_prompts_test.jsonl", tinymath.rl_prompts(test_problems[:counts["rl_test"]])),
            "rl_prompts_train.jsonl": write_rows(raw / "rl_prompts_train.jsonl", tinymath.rl_prompts(train))}


def step_words_prompts(cfg: DataConfig, counts: dict, raw: Path) -> dict:
    # test first, with word sets that neither SFT's "use the words" conversations nor the RL training
    # prompts ask for; then train, without the test's sets
    sft_sets = {frozenset(c["required_words"]) for c in read_jsonl(raw / "instructions_train.jsonl") if c["task"] == "words"}
    test = synthetic.words_prompts(cfg.seed, counts["words_test"], "test", exclude_word_sets=sft_sets)
    train = synthetic.words_prompts(cfg.seed, counts["words_prompts"], "train",
                                    exclude_word_sets={frozenset(p["required_words"]) for p in test})
    return {"words_prompts_test.jsonl": write_rows(raw / "words_prompts_test.jsonl", test),
            "words_prompts_train.jsonl": write_rows(raw / "words_prompts_train.jsonl", train)}


GSM8K_HINT = ("leave out --gsm8k (lesson 12 then evaluates on TinyMath only), "
              "or pass --gsm8k PATH to a local copy of test.jsonl")


def step_gsm8k(cfg: DataConfig, counts: dict, raw: Path) -> dict:
    if cfg.gsm8k == "download":
        sources = {split: download(gsm8k_url(split), raw / "downloads" / "gsm8k" / f"{split}.jsonl", hint=GSM8K_HINT)
                   for split in ("test", "train")}
    else:
        given = Path(cfg.gsm8k)
        if given.is_dir():
            sources = {split: given / f"{split}.jsonl" for split in ("test", "train") if (given / f"{split}.jsonl").is_file()}
            if "test" not in sources:
                raise FileNotFoundError(f"--gsm8k {given}: the folder has no test.jsonl")
        elif given.is_file():
            sources = {"test": given}
        else:
            raise FileNotFoundError(f"--gsm8k {cfg.gsm8k!r}: no such file or folder (use 'download' or a path to test.jsonl)")
    out = {}
    for split, path in sources.items():
        rows = read_jsonl(path)
        for i, row in enumerate(rows):
            if "question" not in row or tinymath.final_answer(row.get("answer", "")) is None:
                raise ValueError(f"{path} line {i + 1}: not GSM8K format (needs 'question' and an 'answer' ending in '#### N')")
        out[f"gsm8k_{split}.jsonl"] = write_rows(raw / f"gsm8k_{split}.jsonl", rows)
    return out


STEPS: list[tuple[str, Callable[[DataConfig, dict, Path], dict]]] = [
    ("stories", step_stories), ("instructions", step_instructions), ("tinymath", step_tinymath),
    ("preferences", step_preferences), ("rl_prompts", step_rl_prompts), ("words_prompts", step_words_prompts),
    ("gsm8k", step_gsm8k),
]


# ---------------------------------------------------------------------------------------------
# skipping finished work: manifest.json (all done) and .progress.json (steps done so far)
# ---------------------------------------------------------------------------------------------


def check_inputs(cfg: DataConfig) -> None:
    """Stop with one clear line if --source or --gsm8k names a path that is not there."""
    for flag, value, words in (("--source", cfg.source, ("synthetic", "tinystories")), ("--gsm8k", cfg.gsm8k, ("", "download"))):
        if value not in words and not Path(value).exists():
            raise SystemExit(f"error: {flag} {value!r}: no such file or folder (use {' or '.join(repr(w) for w in words)}, "
                             "or a path that exists)")


# the modules whose code decides the built-in data's bytes
GENERATOR_MODULES = (world, stories, story_files, tinymath, synthetic)


def run_arguments(cfg: DataConfig) -> dict:
    """What makes two runs the same: every field but `force` and `out_dir`, and the generator's code.

    The generator's fingerprint (a hash of the GENERATOR_MODULES' source) is part of it, so editing
    the generator and rerunning regenerates the data instead of keeping what the old code wrote.
    """
    args = config_to_dict(cfg)
    args.pop("force")
    args.pop("out_dir")  # where the files go does not change what they hold
    source = b"".join(Path(module.__file__).read_bytes() for module in GENERATOR_MODULES)
    args["generator"] = hashlib.sha256(source).hexdigest()[:12]
    return args


def _files_intact(raw: Path, files: dict) -> bool:
    return all((raw / name).is_file() and (raw / name).stat().st_size == info["bytes"] for name, info in files.items())


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(DataConfig, argv)
    print_config(cfg)
    raw = Path(cfg.out_dir) if cfg.out_dir else paths.raw_dir(fast_dev_run=cfg.fast_dev_run)
    raw.mkdir(parents=True, exist_ok=True)
    manifest_path, progress_path = raw / "manifest.json", raw / ".progress.json"
    args = run_arguments(cfg)
    print(f"writing to {raw}")

    # 1. all done already?
    if manifest_path.exists() and not cfg.force:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("args") == args and _files_intact(raw, manifest["files"]):
            print(f"{manifest_path.name} matches these arguments: nothing to do (pass --force to regenerate)")
            print_summary(manifest["files"], {}, raw)
            return manifest
    check_inputs(cfg)  # a typo in a path should not cost you the data that is already there
    previous = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    manifest_path.unlink(missing_ok=True)  # from here on data/raw is incomplete until we write it again

    # 2. steps finished by an earlier, interrupted run with the same arguments are kept
    progress = {"args": args, "done": {}}
    if progress_path.exists() and not cfg.force:
        earlier = json.loads(progress_path.read_text())
        if earlier.get("args") == args:
            progress = earlier

    counts = counts_of(cfg)
    files: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    start = time.time()
    for name, step in STEPS:
        if name == "gsm8k" and not cfg.gsm8k:
            for stale in raw.glob("gsm8k_*.jsonl"):  # from an earlier run: lesson 12 must not pick them up
                stale.unlink()
            continue
        done = progress["done"].get(name)
        if done is not None and _files_intact(raw, done):
            print(f"[{name}] done in an earlier run with the same arguments: skipped")
            files.update(done)
            continue
        print(f"[{name}] ...", flush=True)
        t0 = time.time()
        try:
            written = step(cfg, counts, raw)
        except (DownloadError, FileNotFoundError, ValueError) as e:  # bad input or no network: one clear line
            if previous is not None and _files_intact(raw, previous["files"]):
                write_json(manifest_path, previous)  # nothing was overwritten: the earlier data stays usable
                raise SystemExit(f"error: {e}\n(data/raw still holds the earlier, complete data)") from None
            raise SystemExit(f"error: {e}") from None
        seconds.update({file: time.time() - t0 for file in written})
        files.update(written)
        progress["done"][name] = written
        write_json(progress_path, progress)

    # 3. the manifest last: its presence tells later lessons (and `make`) that lesson 0 is complete
    manifest = {
        "lesson": 0, "source": cfg.source, "seed": cfg.seed, "args": args, "counts": counts,
        "gsm8k": bool(cfg.gsm8k), "files": files, "seconds": round(time.time() - start, 2),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json(manifest_path, manifest)
    progress_path.unlink(missing_ok=True)

    print_summary(files, seconds, raw)
    if not cfg.gsm8k:
        print("no GSM8K asked for: lesson 12 will evaluate on TinyMath only (add --gsm8k download, or --gsm8k PATH)")
    print_samples(raw)
    print(f"done in {time.time() - start:.1f}s; wrote {manifest_path}")
    return manifest


# ---------------------------------------------------------------------------------------------
# what the run prints
# ---------------------------------------------------------------------------------------------


def print_summary(files: dict, seconds: dict, raw: Path) -> None:
    print(f"\n{'file':<26} {'items':>9} {'size':>10} {'step (s)':>8}")
    for name, info in files.items():
        took = f"{seconds[name]:.2f}" if name in seconds else "skipped"
        print(f"{name:<26} {info['count']:>9,} {info['bytes'] / MB:>8.2f}MB {took:>8}")
    total = sum(info["bytes"] for info in files.values())
    print(f"{'total':<26} {'':>9} {total / MB:>8.2f}MB\n")


def _short(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[:limit] + " [...]"


def print_samples(raw: Path) -> None:
    print("--- a validation story ---")
    print(next(story_files.iter_story_file(raw / "stories_val.txt"), "(none)"))
    conversations = read_jsonl(raw / "instructions_train.jsonl")
    if conversations:
        conv = conversations[0]
        print(f"\n--- a conversation (task: {conv['task']}) ---")
        for message in conv["messages"]:
            print(f"[{message['role']}] {_short(message['content'])}")
    problems = read_jsonl(raw / "tinymath_train.jsonl")
    if problems:
        p = problems[0]
        print(f"\n--- a TinyMath problem (difficulty {p['difficulty']}, operations {p['operations']}) ---")
        print(p["question"])
        print(p["answer"])
    pairs = read_jsonl(raw / "preferences_train.jsonl")
    if pairs:
        pair = pairs[0]
        print(f"\n--- a preference pair (flaw: {pair['flaw']}) ---")
        print(f"[prompt]   {_short(pair['prompt'])}")
        print(f"[chosen]   {_short(pair['chosen'])}")
        print(f"[rejected] {_short(pair['rejected'])}")
    print()


if __name__ == "__main__":
    main()
