"""
Benchmark: our pure-Python byte-level BPE (nano/text/tokenizer.py) against Hugging Face `tokenizers`
(Rust), measured side by side in one run on the same text and the same machine.

    python bench/bench_tokenizer.py                  # 100 MB of text, vocab 4096 (a few minutes)
    python bench/bench_tokenizer.py --mb 10          # a quick run
    python bench/bench_tokenizer.py --text stories   # lesson 0's built-in story generator instead

What it measures (each in a fresh process, so memory figures are not polluted by the others):
  1. training at vocab 4096: wall time and peak resident memory of the process AND its workers
     (the sum over the process tree, sampled every 50 ms);
  2. encoding throughput, MB of text per second: our `encode_batch` (worker processes) and
     `encode` (one process) against `tokenizers`' `encode_batch` (Rust threads), on 10 MB of stories;
  3. `encode_iterable` over a 10 MB file: resident memory at the start, the middle and the end
     (flat = memory independent of input size).

The text. `--text zipf` (default) writes stories from a made-up language: 40,000 pseudo-words built
from syllables, drawn with Zipf's law (the k-th most common word has frequency ~ 1/k, like real
English), with capitals, punctuation, quotes, numbers and "<|endoftext|>" between stories. We use
it because the built-in story generator (`--text stories`) has only ~900 distinct words, so BPE
runs out of pairs long before 4096 tokens and the merge phase would barely be measured.
`--text PATH` uses a file of your own (e.g. real TinyStories). Generated text is cached in data/bench/.

`tokenizers` is not a dependency of nano; without it the comparison columns say "not installed".
Timings on a shared 2-core machine are noisy: compare the columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from itertools import accumulate
from pathlib import Path

from nano.common.fileio import atomic_open
from nano.common.paths import data_dir
from nano.text.pretokenize import PATTERNS
from nano.text.tokenizer import SPECIAL_TOKENS, Tokenizer
from results import record  # bench/results.py: the summary table of make bench

MB = 1_000_000
SEPARATOR = "<|endoftext|>"


# -----------------------------------------------------------------------------
# the text


def zipf_text(path: Path, mb: float, seed: int = 0) -> None:
    """Write ~mb MB of Zipf-distributed pseudo-English stories (see the module docstring)."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
              "bl", "br", "ch", "cl", "dr", "fl", "gr", "pl", "sh", "sl", "st", "th", "tr", "wh"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "oo", "ou", "y"]
    codas = ["", "", "", "n", "r", "s", "t", "d", "l", "m", "ng", "ck", "st", "nd"]
    lexicon: list[str] = []
    seen: set[str] = set()
    while len(lexicon) < 40_000:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.choice([1, 1, 2, 2, 2, 3, 3, 4])))
        if word not in seen:
            seen.add(word)
            lexicon.append(word)
    cum_weights = list(accumulate(1.0 / (k + 1) for k in range(len(lexicon))))
    written = 0
    with atomic_open(path) as out:
        while written < mb * MB:
            words = rng.choices(lexicon, cum_weights=cum_weights, k=200_000)
            stories, story, sentence = [], [], []
            for word in words:
                sentence.append(word)
                if len(sentence) >= rng.randint(4, 16):
                    text = " ".join(sentence)
                    text = text[0].upper() + text[1:]
                    r = rng.random()
                    if r < 0.15:
                        text = f'"{text}," {rng.choice(lexicon).capitalize()} said.'
                    elif r < 0.25:
                        text += f" {rng.randint(0, 2025)}" + rng.choice([".", "!"])
                    else:
                        text += rng.choice([".", ".", ".", "!", "?", ";"])
                    story.append(text)
                    sentence = []
                    if len(story) >= rng.randint(5, 12):
                        stories.append(" ".join(story) + ("\n\n" if rng.random() < 0.2 else ""))
                        story = []
            block = "".join(s + f"\n{SEPARATOR}\n" for s in stories)
            out.write(block)
            written += len(block.encode("utf-8"))


def stories_text(path: Path, mb: float, seed: int = 0) -> None:
    """Write ~mb MB of lesson 0's built-in stories (nano/data/stories.py)."""
    from nano.data import stories

    stories.write_stories(path, seed=seed, n=math.ceil(mb * MB / 560), split="train")


def prefix_file(source: Path, path: Path, mb: float) -> None:
    """The first ~mb MB of `source`, cut right before a story separator."""
    with open(source, "rb") as f:
        data = f.read(int(mb * MB))
    cut = data.rfind(SEPARATOR.encode())
    path.write_bytes(data[:cut] if cut > 0 else data)


def bench_text(kind: str, mb: float) -> Path:
    folder = data_dir() / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    if kind in ("zipf", "stories"):
        path = folder / f"{kind}_{mb:g}mb.txt"
        if not path.exists():
            print(f"writing {mb:g} MB of '{kind}' text to {path} (cached for later runs) ...", flush=True)
            (zipf_text if kind == "zipf" else stories_text)(path, mb)
        return path
    source = Path(kind)
    if not source.is_file():
        raise SystemExit(f"--text: no file {source} (use zipf, stories or a path)")
    path = folder / f"{source.stem}_{mb:g}mb.txt"
    if not path.exists():
        prefix_file(source, path, mb)
    return path


# -----------------------------------------------------------------------------
# measurements, each run in a child process (see main)


def rss_mb() -> float:
    """This process's resident memory now, from /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def hf_tokenizer(vocab_size: int):
    """A `tokenizers` byte-level BPE set up like ours: the nano pattern, then bytes -> symbols."""
    # `tokenizers` is optional (not a dependency of nano), so it is imported only where it is used
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERNS["nano"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


def run_child(task: str, args: argparse.Namespace) -> dict:
    text_path = Path(args.text_path)
    if task == "train_ours":
        t0 = time.perf_counter()
        tok = Tokenizer.train(text_path, args.vocab_size, num_workers=args.num_workers, progress=False)
        seconds = time.perf_counter() - t0
        tok.save(args.save_to)
        return {"seconds": seconds, "vocab_size": tok.vocab_size}
    if task == "train_hf":
        tok, trainer = hf_tokenizer(args.vocab_size)
        t0 = time.perf_counter()
        tok.train([str(text_path)], trainer)
        seconds = time.perf_counter() - t0
        tok.save(args.save_to)
        return {"seconds": seconds, "vocab_size": tok.get_vocab_size()}

    stories = [s for s in encode_sample(text_path, args.encode_mb).split(SEPARATOR) if s]
    nbytes = sum(len(s.encode("utf-8")) for s in stories)
    if task == "encode_ours":
        tok = Tokenizer.load(args.ours_json)
        t0 = time.perf_counter()
        ids = tok.encode_batch(stories, num_workers=args.num_workers)
        batch_s = time.perf_counter() - t0
        tok = Tokenizer.load(args.ours_json)  # a fresh cache, so the single-process figure starts cold too
        t0 = time.perf_counter()
        ids_single = [tok.encode(s) for s in stories]
        single_s = time.perf_counter() - t0
        assert ids == ids_single, "encode_batch and encode disagree"
        tokens = sum(len(x) for x in ids)
        return {"batch_mb_s": nbytes / MB / batch_s, "single_mb_s": nbytes / MB / single_s, "bytes_per_token": nbytes / tokens}
    if task == "encode_hf":
        from tokenizers import Tokenizer as HFTokenizer  # optional, see hf_tokenizer

        tok = HFTokenizer.from_file(args.hf_json)
        t0 = time.perf_counter()
        encodings = tok.encode_batch(stories, add_special_tokens=False)
        batch_s = time.perf_counter() - t0
        tokens = sum(len(e.ids) for e in encodings)
        return {"batch_mb_s": nbytes / MB / batch_s, "bytes_per_token": nbytes / tokens}
    if task == "stream_ours":
        tok = Tokenizer.load(args.ours_json)
        sample = Path(args.save_to)
        sample.write_text(encode_sample(text_path, args.encode_mb), encoding="utf-8")
        size = sample.stat().st_size
        readings = {"start": rss_mb()}
        count = 0
        with open(sample, encoding="utf-8") as f:
            for _ in tok.encode_iterable(f):
                count += 1
                if "middle" not in readings and f.buffer.tell() >= size // 2:
                    readings["middle"] = rss_mb()
        readings["end"] = rss_mb()
        sample.unlink()
        return {"rss_mb": readings, "tokens": count}
    raise ValueError(task)


def encode_sample(path: Path, mb: float) -> str:
    """The first ~mb MB of the text, cut before a separator."""
    with open(path, "rb") as f:
        data = f.read(int(mb * MB))
    return data[: data.rfind(SEPARATOR.encode())].decode("utf-8", errors="replace")


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process plus all its descendants (its worker processes), in MB."""
    children: dict[int, list[int]] = {}
    rss: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        children.setdefault(int(fields["PPid"].strip()), []).append(int(entry))
        rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0]) / 1024
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0.0)
        stack += children.get(p, [])
    return total


def measure(task: str, args: argparse.Namespace, extra: list[str]) -> dict:
    """Run one task in a child process; return its JSON result plus the peak RSS of its process tree."""
    cmd = [sys.executable, __file__, "--_task", task, "--text_path", str(args.text_path), "--vocab_size", str(args.vocab_size),
           "--num_workers", str(args.num_workers), "--encode_mb", str(args.encode_mb)] + extra
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{task} failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_tree_rss_mb"] = peak[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=100, help="MB of text to train on (default 100)")
    parser.add_argument("--text", default="zipf", help="zipf (default), stories, or a path to a text file")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--num_workers", type=int, default=2, help="our worker processes (tokenizers uses all cores)")
    parser.add_argument("--encode_mb", type=float, default=10, help="MB of text for the encoding measurements")
    parser.add_argument("--repeats", type=int, default=3, help="encoding rounds (best of each side is reported)")
    parser.add_argument("--_task", help=argparse.SUPPRESS)
    for hidden in ("--text_path", "--save_to", "--ours_json", "--hf_json"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._task:  # a child: do one measurement and print it as JSON
        print(json.dumps(run_child(args._task, args)))
        return

    try:
        import tokenizers

        hf_version = tokenizers.__version__
    except ImportError:
        hf_version = None
    args.text_path = bench_text(args.text, args.mb)
    size_mb = args.text_path.stat().st_size / MB
    out_dir = data_dir() / "bench"
    ours_json, hf_json = out_dir / "ours_tokenizer.json", out_dir / "hf_tokenizer.json"
    print(f"text: {args.text_path} ({size_mb:.1f} MB), vocab {args.vocab_size}, our workers {args.num_workers}, "
          f"cpus {os.cpu_count()}, tokenizers {hf_version or 'not installed'}", flush=True)

    # training: ours, then theirs (once each: minutes at 100 MB)
    print("training ours ...", flush=True)
    ours_train = measure("train_ours", args, ["--save_to", str(ours_json)])
    hf_train = hf_enc = None
    if hf_version:
        print("training tokenizers ...", flush=True)
        hf_train = measure("train_hf", args, ["--save_to", str(hf_json)])
    # encoding: alternate ours and theirs `--repeats` times and keep each one's best run, so a burst
    # of load from something else on the machine does not decide the comparison
    ours_runs, hf_runs = [], []
    for r in range(args.repeats):
        print(f"encoding, round {r + 1}/{args.repeats} ...", flush=True)
        ours_runs.append(measure("encode_ours", args, ["--ours_json", str(ours_json)]))
        if hf_version:
            hf_runs.append(measure("encode_hf", args, ["--hf_json", str(hf_json)]))
    ours_enc = {k: max(run[k] for run in ours_runs) for k in ("batch_mb_s", "single_mb_s")}
    ours_enc["bytes_per_token"] = ours_runs[0]["bytes_per_token"]
    if hf_runs:
        hf_enc = {"batch_mb_s": max(run["batch_mb_s"] for run in hf_runs), "bytes_per_token": hf_runs[0]["bytes_per_token"]}
    print("streaming ours ...", flush=True)
    stream = measure("stream_ours", args, ["--ours_json", str(ours_json), "--save_to", str(out_dir / "stream_sample.txt")])

    def col(result: dict | None, key: str, fmt: str) -> str:
        return "not installed" if result is None else format(result[key], fmt)

    def ratio(a: float, b: float | None) -> str:
        return "-" if b is None else f"{a / b:.2f}x"

    rows = [
        ("train: seconds", f"{ours_train['seconds']:.1f}", col(hf_train, "seconds", ".1f"),
         ratio(ours_train["seconds"], hf_train and hf_train["seconds"]), "<= 1.5x"),
        ("train: peak RSS, MB (all processes)", f"{ours_train['peak_tree_rss_mb']:.0f}", col(hf_train, "peak_tree_rss_mb", ".0f"),
         ratio(ours_train["peak_tree_rss_mb"], hf_train and hf_train["peak_tree_rss_mb"]), "ours <= 1500"),
        ("train: vocab size reached", str(ours_train["vocab_size"]), col(hf_train, "vocab_size", "d"), "", ""),
        (f"encode_batch: MB/s ({args.encode_mb:g} MB, best of {args.repeats})", f"{ours_enc['batch_mb_s']:.2f}", col(hf_enc, "batch_mb_s", ".2f"),
         ratio(ours_enc["batch_mb_s"], hf_enc and hf_enc["batch_mb_s"]), ">= 1x"),
        ("encode (one process): MB/s", f"{ours_enc['single_mb_s']:.2f}", "", "", ""),
        ("bytes per token", f"{ours_enc['bytes_per_token']:.2f}", col(hf_enc, "bytes_per_token", ".2f"), "", ""),
    ]
    r = stream["rss_mb"]
    print()
    print(f"| {'measure':<44} | {'nano':>8} | {'tokenizers':>13} | {'ratio':>6} | {'target':<12} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 15}|{'-' * 8}|{'-' * 14}|")
    for name, ours, theirs, rat, target in rows:
        print(f"| {name:<44} | {ours:>8} | {theirs:>13} | {rat:>6} | {target:<12} |")
    for name, ours, theirs, rat, target in rows[:4]:  # training time, memory, vocab, batch encoding
        record("bench_tokenizer", f"BPE {name} ({size_mb:.0f} MB, vocab {args.vocab_size}): ours vs tokenizers",
               f"{ours} vs {theirs}" + (f" ({rat})" if rat and rat != "-" else ""))
    print()
    print(f"encode_iterable over {args.encode_mb:g} MB ({stream['tokens']:,} tokens): RSS start {r['start']:.0f} MB, "
          f"middle {r['middle']:.0f} MB, end {r['end']:.0f} MB (growth {r['end'] - r['start']:+.0f} MB)")


if __name__ == "__main__":
    main()
