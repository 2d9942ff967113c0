"""
Pre-tokenization: cutting text into the pieces BPE works inside, and counting them over a corpus.

Before BPE sees any text, a regex cuts it into "pre-tokens" (words, numbers, punctuation runs,
whitespace), and no merge ever crosses a pre-token's edge: " dog" and " dog." then share the token
" dog" instead of learning " dog." separately. Special tokens such as `<|endoftext|>` are cut out
even before that, so they never take part in a merge. This is byte-level BPE's pre-tokenizer as
GPT-2 introduced it (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners",
section 2.2); nano/text/tokenizer.py holds the BPE itself.

Training needs only how often each distinct pre-token occurs: 100 MB of stories is ~20 million
pre-tokens but only thousands of distinct ones. `count_pretokens` finds those counts, with the
corpus cut into chunks (right before special tokens) that worker processes count in parallel.
Cutting anywhere else could change the pre-tokens ("a\n\nb" is not "a\n" + "\nb"), so where text
may be cut is decided here too (`last_safe_cut`, for the tokenizer's streaming encoder).

    >>> regex.findall(PATTERNS["gpt2"], "Lily's 12 cats ran!")
    ['Lily', "'s", ' 12', ' cats', ' ran', '!']
    >>> regex.findall(PATTERNS["nano"], "Lily's 12 cats ran!")   # every digit apart
    ['Lily', "'s", ' ', '1', '2', ' cats', ' ran', '!']
    >>> count_pretokens("the cat<|endoftext|>the cat.", "gpt2", ["<|endoftext|>"], num_workers=1)
    {'the': 2, ' cat': 2, '.': 1}

Tested through the tokenizer: `make check-1` (tests/test_01_tokenizer.py).
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence, Union

import regex  # like `re`, plus the Unicode classes \p{L} (letters) and \p{N} (numbers) the patterns need

from nano.common.workers import map_batches

# Pre-tokenization patterns. A pre-token is the unit BPE works inside: no merge crosses its edges.
PATTERNS: dict[str, str] = {
    # GPT-2, exactly as OpenAI released it: contractions, an optional space + letters / numbers /
    # other symbols, then whitespace (a run of spaces keeps its last space for the next word).
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    # GPT-4 (cl100k_base): case-insensitive contractions, numbers in groups of at most 3 digits,
    # newlines kept apart from other whitespace.
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
    # nano: GPT-4's pattern with every digit a pre-token of its own. "2024" is then always 2 0 2 4,
    # so a model sees each digit in the same place value every time (with groups of 3 it would have
    # to learn "202"+"4" and "20"+"24" as different spellings of one number). That pays off for
    # numbers of any size and a model trained long enough to learn carrying. Lesson 1 defaults to
    # gpt2 instead: TinyMath's numbers stay below 100, so " 17" becomes one token, and a tiny model
    # trained for minutes learns "17 + 5 = 22" as a fact about three tokens sooner than it learns
    # to add digit by digit (lesson 1's doc has the measurement).
    "nano": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
}

# A fast first cut, into "words": cut before every space that follows a non-space character.
# "Once upon a time,\n\nthe end.\n" -> ["Once", " upon", " a", " time,\n\nthe", " end.\n"]
# Why it is allowed: with the three preset patterns, no pre-token that starts before such a space
# can contain it, and the pre-tokens after it depend only on the text from the space on. So
# pre-tokenizing each word alone gives exactly the pre-tokens of the whole text (the tests check
# this on random strings). Why bother: stdlib `re` runs this simple pattern about twice as fast
# as `regex` runs the real one, and words repeat so much that each distinct word is pre-tokenized
# once and then looked up. (`re`'s \s includes everything `regex`'s \s does, so a cut is never
# made after a character the real pattern treats as whitespace.)
WORDS_RE = re.compile(r"\s*\S+(?:[^\S ]\s*(?:\S+|\Z))*|\s+")

TRAIN_CHUNK_BYTES = 1 << 22  # 4 MiB: training text is counted in chunks of about this size, in parallel
WORD_CACHE_LIMIT = 1 << 18  # distinct words whose pre-tokens a counting process remembers (emptied when full)

# what count_pretokens reads: a path, a list of paths, or the text itself
Input = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


# -----------------------------------------------------------------------------
# 1. the patterns, the fast first cut and the special tokens


def resolve_pattern(pattern: str) -> str:
    """A preset name ("gpt2", "gpt4", "nano") -> its regex; anything else is taken as a regex itself."""
    return PATTERNS.get(pattern, pattern)


_PATTERN_CACHE: dict[str, regex.Pattern] = {}


def _compiled(pattern: str) -> regex.Pattern:
    if pattern not in _PATTERN_CACHE:
        _PATTERN_CACHE[pattern] = regex.compile(pattern)
    return _PATTERN_CACHE[pattern]


def words_regex(pattern: str) -> re.Pattern | None:
    """WORDS_RE for the preset patterns; None (no first cut) for a pattern of your own, for which
    nobody has checked that cutting before a space is safe."""
    return WORDS_RE if resolve_pattern(pattern) in PATTERNS.values() else None


def special_regex(special_tokens: Iterable[str]) -> re.Pattern | None:
    """One regex matching any special token, the LONGEST first (None when there are none).

    With "<a>" and "<a><b>" both special, "<a><b>" must be read as one token, and alternation
    takes the first branch that fits. The tokenizer and the chat format both find specials with it.

    >>> special_regex(["<a>", "<a><b>"]).findall("<a><a><b>")
    ['<a>', '<a><b>']
    """
    return _special_regex_cached(tuple(sorted(set(special_tokens), key=len, reverse=True)))


@functools.lru_cache(maxsize=16)
def _special_regex_cached(specials: tuple[str, ...]) -> re.Pattern | None:
    if not specials:
        return None
    return re.compile("|".join(re.escape(s) for s in specials))


# -----------------------------------------------------------------------------
# 2. counting the pre-tokens of one piece of text


_WORD_PIECES: dict[str, dict[str, list[str]]] = {}  # pattern -> word -> its pre-tokens (per process)


def _count_text(text: str, pattern: str, special_tokens: Sequence[str]) -> Counter:
    """Pre-token counts of one piece of text; special tokens cut it and are not counted.

    "the cat<|endoftext|>the cat." -> Counter({"the": 2, " cat": 2, ".": 1})
    """
    pattern_re, special_re, words_re = _compiled(pattern), special_regex(special_tokens), words_regex(pattern)
    segments = special_re.split(text) if special_re is not None else [text]
    if words_re is None:
        counts: Counter = Counter()
        for segment in segments:
            counts.update(pattern_re.findall(segment))  # Counter.update on a list runs in C
        return counts
    # 1. count the words (a fast cut, see WORDS_RE) ...
    word_counts: Counter = Counter()
    for segment in segments:
        word_counts.update(words_re.findall(segment))
    # 2. ... then pre-tokenize each DISTINCT word once, weighting its pre-tokens by the word's count.
    #    A worker counts many chunks, so it remembers the pre-tokens of the words it has seen.
    known = _WORD_PIECES.setdefault(pattern, {})
    if len(known) > WORD_CACHE_LIMIT:
        known.clear()
    counts = Counter()
    for word, count in word_counts.items():
        pieces = known.get(word)
        if pieces is None:
            pieces = known[word] = pattern_re.findall(word)
        for piece in pieces:
            counts[piece] += count
    return counts


def _count_chunk(settings: tuple[str, Sequence[str]], job: tuple) -> Counter:
    """Count one chunk, given as ("text", str) or ("file", path, start_byte, end_byte), with
    settings = (pattern, special tokens). Runs in a worker process (see map_batches)."""
    pattern, specials = settings
    if job[0] == "text":
        text = job[1]
    else:
        _, path, start, end = job
        with open(path, "rb") as f:
            f.seek(start)
            # a file that is not valid UTF-8 is read with U+FFFD in place of the bad bytes
            text = f.read(end - start).decode("utf-8", errors="replace")
    return _count_text(text, pattern, specials)


# -----------------------------------------------------------------------------
# 3. where text may be cut: chunks that are counted apart, and safe cuts for streaming


def _find_special(data: str | bytes, start: int, specials: Sequence) -> int:
    """The position of the first special token at or after `start`, or -1."""
    found = [p for p in (data.find(s, start) for s in specials) if p >= 0]
    return min(found) if found else -1


def _chunk_text(text: str, specials: list[str], chunk_size: int) -> list[tuple]:
    """Cut a string into jobs of about `chunk_size` characters, each cut at a special token.

    Cutting right before a special token changes nothing: special tokens split the text anyway.
    (subtle: we never cut between two arbitrary characters, because "a\\n\\nb" pre-tokenizes
    differently from "a\\n" followed by "\\nb".) Text with no special token stays one job.
    """
    cuts = [0]
    while specials:
        p = _find_special(text, cuts[-1] + chunk_size, specials)
        if p <= cuts[-1]:
            break
        cuts.append(p)
    cuts.append(len(text))
    return [("text", text[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a]


def _chunk_file(path: Path, specials: list[str], chunk_size: int, limit: int | None) -> list[tuple]:
    """Byte ranges of a file, cut right before special tokens (see _chunk_text); the workers read
    their own ranges, so the main process never holds the whole file.

    With `limit`, only about the first `limit` bytes are used, ending right before the last special
    token (or newline) before the limit, so no story or UTF-8 character is cut in half.
    """
    size = path.stat().st_size
    specials_b = [s.encode("utf-8") for s in specials]
    window = 1 << 16
    overlap = max((len(s) for s in specials_b), default=1) - 1
    with open(path, "rb") as f:

        def next_special(pos: int) -> int:  # first special token at or after pos, else the end of the file
            while pos < size:
                f.seek(pos)
                block = f.read(window + overlap)
                p = _find_special(block, 0, specials_b)
                if p >= 0:
                    return pos + p
                pos += window
            return size

        end = size
        if limit is not None and limit < size:
            f.seek(max(0, limit - window))
            tail = f.read(limit - max(0, limit - window))
            best = max([tail.rfind(s) for s in specials_b] + [-1])  # the last special token before the limit,
            if best <= 0:
                best = tail.rfind(b"\n") + 1  # else the last line end
            end = max(0, limit - len(tail)) + best if best > 0 else limit
        cuts = [0]
        while specials_b and cuts[-1] + chunk_size < end:
            p = next_special(cuts[-1] + chunk_size)
            if p >= end:
                break
            cuts.append(p)
        cuts.append(end)
    return [("file", str(path), a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def last_safe_cut(text: str, special_re: re.Pattern | None, words_re: re.Pattern | None, keep_last: int) -> int:
    """The last position where `text` may be cut without changing its pre-tokens, or 0 if none.

    Safe: the start of a special token, or a space right after a non-space character ("cat| dog").
    Why the space is safe for the gpt2 / gpt4 / nano patterns: no pre-token that starts before
    it can contain it (letters, digits and symbol runs stop at a space, and a whitespace run would
    have to start at it), and what follows depends only on the text from the space on (WORDS_RE
    cuts at the same places). For a pattern of your own (words_re None) only special tokens are
    known to be safe. The last `keep_last` characters are never cut: the tokenizer passes the
    length of its longest special token, which may be only half read yet.

    >>> last_safe_cut("the cat sat on it", None, WORDS_RE, keep_last=5)   # "the cat sat" | " on it"
    11
    """
    limit = len(text) - keep_last
    if limit <= 1:
        return 0
    spans = [hit.span() for hit in special_re.finditer(text)] if special_re is not None else []
    best_special = max((s for s, _ in spans if 0 < s <= limit), default=0)
    if words_re is None:  # a pattern of your own: only special tokens are known to be safe
        return best_special
    p = text.rfind(" ", 1, limit)
    while p > best_special:
        inside_special = any(s < p < e for s, e in spans)
        if not text[p - 1].isspace() and not inside_special:
            return p
        p = text.rfind(" ", 1, p)
    return best_special


def _as_paths(input: Input) -> list[Path] | None:
    """The files `input` names, or None when `input` is the training text itself.

    A `Path` (or a list) is always a file (missing -> FileNotFoundError); a `str` is a file when
    one of that name exists, or when it looks like a file name (one line, no spaces, ends in an
    extension such as .txt) so that a typo is reported instead of trained on; else it is text.
    """
    if isinstance(input, (list, tuple)):
        items = list(input)
    elif isinstance(input, os.PathLike):
        items = [input]
    elif isinstance(input, str):
        looks_like_file = len(input) < 4096 and "\n" not in input and " " not in input and re.search(r"\.\w{1,5}$", input)
        if len(input) < 4096 and "\n" not in input and os.path.isfile(input) or looks_like_file:
            items = [input]
        else:
            return None
    else:
        raise TypeError(f"train input must be a path, a list of paths or a string, not {type(input).__name__}")
    paths = [Path(p) for p in items]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"no training text at {p} — run `make lesson-0` first (or pass another file)")
    return paths


# -----------------------------------------------------------------------------
# 4. counting a whole corpus, in parallel


def count_pretokens(
    input: Input,
    pattern: str,
    special_tokens: Sequence[str],
    num_workers: int | None = None,
    max_bytes: int | None = None,
) -> dict[str, int]:
    """How often each pre-token occurs in `input` (a path, a list of paths or the text itself).

    "the cat<|endoftext|>the" -> {"the": 2, " cat": 1}

    The corpus is cut into chunks right before special tokens; `num_workers` processes (default:
    one per CPU core) count the chunks and the counts are added up. Addition does not care about
    order, so the result is the same for any number of workers (the chunks never depend on it).
    max_bytes: use only about the first max_bytes bytes (characters for a string).
    """
    pattern = resolve_pattern(pattern)
    specials = list(special_tokens)
    paths = _as_paths(input)
    jobs: list[tuple] = []
    if paths is None:
        text = str(input)[:max_bytes] if max_bytes is not None else str(input)
        jobs = _chunk_text(text, specials, chunk_size=min(TRAIN_CHUNK_BYTES, max(4096, len(text) // 16)))
    else:
        remaining = max_bytes
        total = sum(p.stat().st_size for p in paths) if max_bytes is None else max_bytes
        chunk_size = min(TRAIN_CHUNK_BYTES, max(4096, total // 16))
        for p in paths:
            if remaining is not None and remaining <= 0:
                break
            jobs += _chunk_file(p, specials, chunk_size, remaining)
            if remaining is not None:
                remaining -= p.stat().st_size

    workers = min(num_workers or os.cpu_count() or 1, len(jobs))
    counts: Counter = Counter()
    for chunk_counts in map_batches(_count_chunk, jobs, (pattern, specials), workers):
        counts.update(chunk_counts)
    _WORD_PIECES.clear()  # the in-process cache has done its job; do not keep its memory
    return dict(counts)
