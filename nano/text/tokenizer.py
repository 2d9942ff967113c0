"""
Byte-level BPE: the tokenizer that turns text into the integer ids a language model reads.

The idea in three sentences. Start from the 256 possible bytes, so any text at all can be
written down; then, again and again, find the pair of neighbouring tokens that occurs most often
in the training text and glue it into one new token ("t" + "h" -> "th", "th" + "e" -> "the").
Encoding replays those merges in the order they were learned; decoding just concatenates bytes.

It follows byte-level BPE as GPT-2 introduced it (Radford et al. 2019, "Language Models are
Unsupervised Multitask Learners", section 2.2; BPE itself is Sennrich et al. 2016): text is first
cut into "pre-tokens" by a regex (words, numbers, punctuation runs), merges never cross a pre-token
boundary, and special tokens such as `<|endoftext|>` are cut out before anything else. That cutting,
and counting the pre-tokens of a whole corpus in parallel, is nano/text/pretokenize.py; this file is BPE.

How ids are laid out (vocab_size counts all three parts):

    0 .. S-1          the special tokens, in the order given (SPECIAL_TOKENS: <pad> 0, <eos> 1, ...)
    S .. S+255        the 256 single bytes (byte b has id S + b)
    S+256 ..          one token per merge, in the order the merges were learned

Run the tests with `make check-1` (tests/test_01_tokenizer.py); train one with `make lesson-1`.

    >>> tok = Tokenizer.train("the cat the hat the end", vocab_size=6 + 256 + 3, progress=False)
    >>> tok.merges        # t+h and h+e both occur 3 times: a tie, and b"t" > b"h", so t+h goes first
    [(b't', b'h'), (b'th', b'e'), (b'a', b't')]
    >>> tok.encode("the hat<|endoftext|>")
    [263, 38, 110, 264, 5]
    >>> tok.decode([263, 38, 110, 264, 5])
    'the hat<|endoftext|>'
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from array import array
from collections import defaultdict
from heapq import heapify, heappop, heappush
from itertools import chain, repeat
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import regex  # like `re`, plus the Unicode classes \p{L} (letters) and \p{N} (numbers) the patterns need
from tqdm import tqdm

from nano.common.fileio import write_text
from nano.common.workers import map_batches
from nano.text.pretokenize import PATTERNS, Input, count_pretokens, last_safe_cut, resolve_pattern, special_regex, words_regex

# The special tokens of this project, lowest ids first. Gemma's order where Gemma has them
# (<pad> 0, <eos> 1, <bos> 2), then the chat-turn markers, then TinyStories' story separator.
SPECIAL_TOKENS: list[str] = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<|endoftext|>"]

FORMAT_NAME = "nano-bpe"
FORMAT_VERSION = 1  # bump when the layout of tokenizer.json changes
CACHE_LIMIT = 1 << 18  # entries each encode() cache holds (~50 MB at most); a full cache is emptied
_NOT_MERGED = 1 << 62  # the "rank" of a pair that was never merged: larger than any real one


# -----------------------------------------------------------------------------
# 1. the two small functions BPE is made of


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids` by `new_id`, scanning left to right.

    This is BPE's one operation. The trainer (learn_merges) and the encoder (_encode_piece) each
    inline a faster version of it that also does their bookkeeping; this plain one is the definition.

    [5, 6, 5, 6, 7], (5, 6), 99 -> [99, 99, 7]
    [1, 1, 1], (1, 1), 9        -> [9, 1]      (subtle: overlapping pairs merge from the left)
    """
    first, second = pair
    out: list[int] = []
    i = 0
    n = len(ids)
    while i < n:
        if ids[i] == first and i + 1 < n and ids[i + 1] == second:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _descending_key(token: bytes) -> str:
    """A string that sorts in the OPPOSITE order of `token`'s bytes, so a min-heap pops the greatest.

    Each byte b becomes the character chr(255 - b), and the key ends with chr(256), which is
    larger than any of those. Why the end marker: b"ab" < b"abc" (a prefix sorts first), so the
    key of b"abc" must sort first; with the marker, key(b"ab") = "\\x9e\\x9d\\u0100" and
    key(b"abc") = "\\x9e\\x9d\\x9c\\u0100" differ at position 2, where 0x9c < 0x100.

    b"b" -> "\\x9d\\u0100" sorts before b"a" -> "\\x9e\\u0100"   (b"b" > b"a")
    """
    return token.translate(_INVERT_BYTES).decode("latin-1") + "\u0100"


_INVERT_BYTES = bytes(255 - b for b in range(256))


# -----------------------------------------------------------------------------
# 2. training: the merges, over the table of distinct words (counted by nano/text/pretokenize.py)


def learn_merges(
    word_counts: dict[tuple[int, ...], int],
    vocab: dict[int, bytes],
    num_merges: int,
    progress: bool = True,
) -> list[tuple[int, int]]:
    """Learn up to `num_merges` merges from words (tuples of token ids) and their counts.

    Each step merges the pair with the highest count, summed over all words (a word that occurs
    5 times counts 5 times); a TIE goes to the lexicographically greatest pair of byte strings,
    comparing (bytes of first, bytes of second). New tokens get ids len(vocab), len(vocab)+1, ...
    and are added to `vocab` in place.

    {(a, b, c): 3, (b, c): 2} with single-letter tokens -> first merge (b, c) (count 5)

    Why it is fast: the corpus is not re-scanned at each step. We keep
      pair_counts[pair] -> its total count,
      words_with[pair]  -> the indices of the words that contain it,
      a heap of (-count, descending key of the bytes, pair)   -> the best pair on top.
    A merge only touches the words that contain the merged pair, updates the counts of their pairs,
    and pushes the pairs whose counts grew. Heap entries whose count is out of date are not
    removed when the count changes (a heap cannot find them); they are fixed when they reach the
    top ("lazy invalidation").
    """
    words = [list(word) for word in word_counts]
    counts = list(word_counts.values())

    # 1. count every pair once, and remember which words contain it
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    words_with: dict[tuple[int, int], set[int]] = defaultdict(set)
    for index, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += count
            words_with[pair].add(index)

    key = {token_id: _descending_key(token) for token_id, token in vocab.items()}

    def entry(pair: tuple[int, int]) -> tuple:
        # min-heap: the biggest count first, then the greatest (bytes_a, bytes_b), then ids (never
        # needed unless two tokens have the same bytes, which two merge orders can produce)
        return (-pair_counts[pair], key[pair[0]], key[pair[1]], pair)

    heap = [entry(pair) for pair in pair_counts]
    heapify(heap)

    merges: list[tuple[int, int]] = []
    bar = tqdm(total=num_merges, desc="merges", unit="merge", disable=not progress)
    while len(merges) < num_merges and heap:
        # 2. the best pair: pop entries until one has an up-to-date count
        neg_count, _, _, pair = heappop(heap)
        current = pair_counts.get(pair, 0)
        if current <= 0:
            continue  # the pair is gone from every word
        if -neg_count != current:
            heappush(heap, entry(pair))  # counts only shrink silently: re-file it under its true count
            continue

        # 3. the new token
        new_id = len(vocab)
        vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
        key[new_id] = _descending_key(vocab[new_id])
        merges.append(pair)

        # 4. rewrite only the words that contain the pair. Where "x a b y" becomes "x N y", the pairs
        #    (x, a) and (b, y) lose the word's count and (x, N), (N, y) gain it; no other pair changes.
        first, second = pair
        made: dict[tuple[int, int], set[int]] = defaultdict(set)  # new pairs (with new_id) -> their words
        for index in words_with.pop(pair):
            word = words[index]
            count = counts[index]
            last = len(word) - 1
            new_word: list[int] = []
            lost: list[tuple[int, int]] = []  # pairs this word has fewer of after the merge
            start = 0  # word[start:] is not copied into new_word yet
            for i in [k for k, token in enumerate(word) if token == first]:
                if i < start or i == last or word[i + 1] != second:
                    continue  # not the pair here (or this `first` was just merged as a `second`: "a a a")
                new_word += word[start:i]
                if new_word:  # a left neighbour x; subtle: it is N itself in "a b a b" -> "N N"
                    left = new_word[-1]
                    pair_counts[left, first] -= count
                    pair_counts[left, new_id] += count
                    lost.append((left, first))
                    made[left, new_id].add(index)
                if i + 2 <= last:  # a right neighbour y
                    right = word[i + 2]
                    pair_counts[second, right] -= count
                    pair_counts[new_id, right] += count
                    lost.append((second, right))
                    made[new_id, right].add(index)
                new_word.append(new_id)
                start = i + 2
            new_word += word[start:]
            words[index] = new_word
            # keep the index exact: a word that lost its last copy of a pair leaves that pair's set
            if lost:
                present = set(zip(new_word, new_word[1:]))
                for gone in lost:
                    if gone not in present and gone in words_with:
                        words_with[gone].discard(index)
        del pair_counts[pair]

        # 5. pairs with the new token are new, and only grew during this step: file them in the heap
        words_with.update(made)
        for new in made:
            if pair_counts[new] > 0:  # (N, a) in "a b a b" was added, then taken away again
                heappush(heap, entry(new))
        bar.update(1)
    bar.close()
    return merges


# -----------------------------------------------------------------------------
# 3. the tokenizer: vocabulary + merges + special tokens + pattern


class _PieceCache(dict):
    """string -> its ids; a miss computes them once with `encode_piece` (dict's __missing__ hook).

    Looking pieces up with `map(cache.__getitem__, pieces)` keeps the loop in C; only new
    pre-tokens cost Python time. When full it is emptied, so memory stays bounded.
    """

    def __init__(self, encode_piece, limit: int = CACHE_LIMIT):
        super().__init__()
        self.encode_piece = encode_piece
        self.limit = limit

    def __missing__(self, piece: str) -> tuple[int, ...]:
        ids = self.encode_piece(piece)
        if len(self) >= self.limit:
            self.clear()
        self[piece] = ids
        return ids


class Tokenizer:
    """A byte-level BPE tokenizer: `encode` text -> ids, `decode` ids -> text.

    Build one with `Tokenizer.train(...)`, `Tokenizer.load(path)`, or from its parts:
    `Tokenizer(vocab, merges, special_tokens, pattern)` where vocab is {id: bytes} laid out as the
    module docstring says and merges are (bytes, bytes) pairs (or (id, id) pairs) in merge order.
    """

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: Sequence[tuple[bytes, bytes]] | Sequence[tuple[int, int]],
        special_tokens: Sequence[str] | dict[str, int] = SPECIAL_TOKENS,
        pattern: str = "nano",
    ):
        self.vocab: dict[int, bytes] = {int(i): bytes(b) for i, b in vocab.items()}
        if isinstance(special_tokens, dict):
            self.special_tokens: dict[str, int] = {s: int(i) for s, i in special_tokens.items()}
        else:
            self.special_tokens = {s: i for i, s in enumerate(special_tokens)}
        self.pattern: str = resolve_pattern(pattern)
        for name, token_id in self.special_tokens.items():
            if self.vocab.get(token_id) != name.encode("utf-8"):
                raise ValueError(f"special token {name!r} has id {token_id}, but vocab[{token_id}] is {self.vocab.get(token_id)!r}")

        # 1. the 256 byte tokens: id of each single byte
        special_ids = set(self.special_tokens.values())
        byte_ids: dict[int, int] = {}
        for token_id in sorted(self.vocab):
            token = self.vocab[token_id]
            if token_id not in special_ids and len(token) == 1 and token[0] not in byte_ids:
                byte_ids[token[0]] = token_id
        if len(byte_ids) != 256:
            raise ValueError(f"the vocab must hold all 256 single bytes; it has {len(byte_ids)}")
        self._byte_ids: list[int] = [byte_ids[b] for b in range(256)]

        # 2. the merges, as id pairs; merge i makes the i-th remaining id (ascending)
        merge_ids = sorted(set(self.vocab) - special_ids - set(self._byte_ids))
        if len(merge_ids) != len(merges):
            raise ValueError(f"the vocab has {len(merge_ids)} merged tokens but there are {len(merges)} merges")
        bytes_to_id = {bytes([b]): i for b, i in byte_ids.items()}
        self._merge_pairs: list[tuple[int, int]] = []
        for (first, second), new_id in zip(merges, merge_ids):
            if isinstance(first, (bytes, bytearray)):  # subtle: if two merges made the same bytes, the first id wins
                first, second = bytes_to_id[bytes(first)], bytes_to_id[bytes(second)]
            first, second = int(first), int(second)
            if self.vocab.get(first, b"") + self.vocab.get(second, b"\0") != self.vocab[new_id]:
                raise ValueError(f"merge #{len(self._merge_pairs)} does not make vocab[{new_id}] = {self.vocab[new_id]!r}")
            self._merge_pairs.append((first, second))
            bytes_to_id.setdefault(self.vocab[new_id], new_id)
        # rank of a pair = the id it makes: earlier merges have lower ids, and encode applies them first
        self._merge_rank: dict[tuple[int, int], int] = {pair: new_id for pair, new_id in zip(self._merge_pairs, merge_ids)}
        self._setup_runtime()

    def _setup_runtime(self) -> None:
        """The compiled regexes and the cache (rebuilt after unpickling, never saved)."""
        self._pattern_re = regex.compile(self.pattern)
        self._special_re = special_regex(self.special_tokens)
        self._max_special_len = max((len(s) for s in self.special_tokens), default=0)
        self._words_re = words_regex(self.pattern)
        self._piece_cache = _PieceCache(self._encode_piece)  # pre-token -> ids
        self._word_cache = _PieceCache(self._encode_word)  # word (see pretokenize.WORDS_RE) -> ids

    def __getstate__(self) -> dict:  # to worker processes: the data, without compiled regexes or cache
        return {k: v for k, v in self.__dict__.items() if k not in ("_pattern_re", "_special_re", "_words_re", "_piece_cache", "_word_cache")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._setup_runtime()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self._merge_pairs)}, specials={len(self.special_tokens)})"

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def merges(self) -> list[tuple[bytes, bytes]]:
        """The merges as byte strings, in the order they were learned: [(b' ', b't'), (b'h', b'e'), ...]."""
        return [(self.vocab[a], self.vocab[b]) for a, b in self._merge_pairs]

    # --- training ---------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        input: Input,
        vocab_size: int,
        special_tokens: Sequence[str] = SPECIAL_TOKENS,
        pattern: str = "nano",
        num_workers: int | None = None,
        max_bytes: int | None = None,
        progress: bool = True,
    ) -> "Tokenizer":
        """Learn a tokenizer of `vocab_size` tokens (specials + 256 bytes + merges) from `input`.

        input: a path, a list of paths, or the training text itself (see pretokenize.count_pretokens);
        max_bytes: use only about the first max_bytes bytes (cut before a special token; characters for a string);
        num_workers: processes that count pre-tokens (default: one per CPU core; same result for any).
        """
        specials = list(special_tokens)
        if len(set(specials)) != len(specials) or not all(specials):
            raise ValueError(f"special tokens must be distinct, non-empty strings: {specials}")
        smallest = len(specials) + 256
        if vocab_size < smallest:
            raise ValueError(
                f"vocab_size {vocab_size} is too small: it must hold the {len(specials)} special tokens "
                f"and the 256 bytes, so at least {smallest}"
            )
        # 1. count pre-tokens ("the", " cat", ...) over the whole corpus (nano/text/pretokenize.py, in parallel)
        pretoken_counts = count_pretokens(input, pattern, specials, num_workers, max_bytes)
        if not pretoken_counts:
            raise ValueError("the training corpus is empty (no text outside special tokens): give it some text to learn from")

        # 2. each distinct pre-token becomes a word of byte ids, with its count as weight
        vocab = {i: s.encode("utf-8") for i, s in enumerate(specials)}
        vocab.update({len(specials) + b: bytes([b]) for b in range(256)})
        offset = len(specials)
        word_counts: dict[tuple[int, ...], int] = {}
        for piece, count in pretoken_counts.items():
            word = tuple(offset + b for b in piece.encode("utf-8"))
            word_counts[word] = word_counts.get(word, 0) + count
        del pretoken_counts

        # 3. merges over the word table
        num_merges = vocab_size - smallest
        merges = learn_merges(word_counts, vocab, num_merges, progress=progress)
        if len(merges) < num_merges:
            warnings.warn(f"the corpus ran out of pairs to merge: vocab_size is {len(vocab)}, not {vocab_size}")
        return cls(vocab, merges, specials, pattern)

    # --- encoding ---------------------------------------------------------------------------

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        """BPE on one pre-token: start from its bytes; merge the neighbouring pair that was learned
        EARLIEST (leftmost if it occurs twice); repeat until no neighbouring pair was ever merged.

        With merges (h, e) -> 262 and (t, 262) -> 263:  "the" -> [t, h, e] -> [t, 262] -> [263]

        `ranks[k]` is the rank of the pair (ids[k], ids[k+1]), and a merge's rank is simply the id it
        makes (merges made later get larger ids). Merging one pair changes only the ranks of its two
        neighbours, so each step is a `min` and an `index` (both in C) plus two look-ups.
        Merging one occurrence at a time gives the same result as merging all of them at once: the
        pairs a merge creates contain the new token, so they were learned later and rank higher.
        """
        ids = [self._byte_ids[b] for b in piece.encode("utf-8")]
        rank_of = self._merge_rank.get
        ranks = list(map(rank_of, zip(ids, ids[1:]), repeat(_NOT_MERGED)))
        while ranks:
            best = min(ranks)
            if best == _NOT_MERGED:
                break  # no neighbouring pair was ever merged: done
            i = ranks.index(best)
            ids[i : i + 2] = [best]  # the pair becomes the token it makes (its id == its rank)
            del ranks[i]
            if i > 0:
                ranks[i - 1] = rank_of((ids[i - 1], ids[i]), _NOT_MERGED)
            if i < len(ranks):
                ranks[i] = rank_of((ids[i], ids[i + 1]), _NOT_MERGED)
        return tuple(ids)

    def _encode_word(self, word: str) -> tuple[int, ...]:
        """A word (see pretokenize.WORDS_RE) -> its pre-tokens -> their ids: " time,\n\nthe" -> " time" "," "\n\n" "the"."""
        return tuple(chain.from_iterable(map(self._piece_cache.__getitem__, self._pattern_re.findall(word))))

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text, treating special-token strings as plain text ("<eos>" -> '<', 'eos', '>').

        Two levels of cache: text -> words (WORDS_RE, fast) -> cached ids of each word; a word
        never seen before is cut into pre-tokens (the real pattern) -> cached ids of each pre-token;
        a pre-token never seen before goes through BPE (_encode_piece).
        """
        if self._words_re is None:  # a pattern of your own: pre-tokens straight away
            return list(chain.from_iterable(map(self._piece_cache.__getitem__, self._pattern_re.findall(text))))
        # all in C: findall, the dict look-ups (a miss calls _encode_word), the concatenation
        return list(chain.from_iterable(map(self._word_cache.__getitem__, self._words_re.findall(text))))

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Special tokens written in the text become their ids, the longest match first.

        "hi<eos>" -> encode_ordinary("hi") + [1]
        """
        if self._special_re is None:
            return self.encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for hit in self._special_re.finditer(text):
            if hit.start() > start:
                ids += self.encode_ordinary(text[start : hit.start()])
            ids.append(self.special_tokens[hit.group()])
            start = hit.end()
        if start < len(text):
            ids += self.encode_ordinary(text[start:])
        return ids

    def encode_batch(self, texts: Sequence[str], num_workers: int | None = None) -> list[list[int]]:
        """encode() of each text; a big batch is split over `num_workers` processes (default: all cores)."""
        texts = list(texts)
        workers = num_workers or os.cpu_count() or 1
        total_chars = sum(len(t) for t in texts)
        if workers <= 1 or total_chars < (1 << 20):  # under ~1 MB, starting processes costs more than it saves
            return [self.encode(t) for t in texts]
        # groups of about 256 KB or more, so each task is worth sending and the workers stay evenly busy
        group_chars = max(1 << 18, total_chars // (workers * 8))
        groups: list[list[str]] = [[]]
        size = 0
        for t in texts:
            groups[-1].append(t)
            size += len(t)
            if size >= group_chars:
                groups.append([])
                size = 0
        out: list[list[int]] = []
        for flat, lengths in map_batches(_encode_group, groups, self, min(workers, len(groups))):
            # one flat array per group travels back (cheap to send); cut it into one list per text
            ids = flat.tolist()
            start = 0
            for n in lengths:
                out.append(ids[start : start + n])
                start += n
        return out

    def encode_iterable(self, lines: Iterable[str], chunk_chars: int = 1 << 16) -> Iterator[int]:
        """Stream ids for an iterable of strings (e.g. an open file), with memory independent of its size.

        list(tok.encode_iterable(open(path))) == tok.encode(open(path).read())

        Lines are gathered into a buffer of about `chunk_chars` characters, and the buffer is
        encoded up to a "safe cut": a place where encoding the two sides apart gives the same
        ids as encoding them together. Cutting at every line would not be safe: "a\\n\\nb" is
        pre-tokenized as "a", "\\n\\n", "b", but "a\\n" + "\\nb" as "a", "\\n", "\\n", "b".
        """
        buffer: list[str] = []
        size = 0
        for line in lines:
            buffer.append(line)
            size += len(line)
            if size >= chunk_chars:
                text = "".join(buffer)
                cut = last_safe_cut(text, self._special_re, self._words_re, self._max_special_len)
                if cut > 0:
                    yield from self.encode(text[:cut])
                    text = text[cut:]
                buffer, size = [text], len(text)
        if buffer:
            yield from self.encode("".join(buffer))

    # --- decoding ---------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids -> the raw bytes they stand for. A token may be part of a UTF-8 character, so a
        streaming decoder gathers bytes until they form whole characters. [262] -> b' t'"""
        vocab = self.vocab
        try:
            return b"".join([vocab[int(i)] for i in ids])
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary (size {self.vocab_size})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Never fails: bytes that are not valid UTF-8 (half a character, say) become
        U+FFFD, and so does an id outside the vocabulary (a model with a padded output layer can sample one)."""
        vocab = self.vocab
        return b"".join([vocab.get(int(i), b"\xef\xbf\xbd") for i in ids]).decode("utf-8", errors="replace")

    # --- saving and loading -----------------------------------------------------------------

    def fingerprint(self) -> str:
        """A short hash of vocab + merges + special tokens + pattern: equal fingerprints, equal ids."""
        canonical = json.dumps(
            {
                "vocab": [[i, self.vocab[i].hex()] for i in sorted(self.vocab)],
                "merges": self._merge_pairs,
                "special_tokens": sorted(self.special_tokens.items()),
                "pattern": self.pattern,
            },
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> Path:
        """Write a readable JSON file, atomically (nano/common/fileio.py: a temporary file, then a rename).

        vocab lines are [id, hex of the bytes, the bytes as text]: the hex is exact, the text is
        for your eyes (bytes that are not UTF-8 show as \\xNN). merges are [id, id] in order.
        """
        header = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "pattern_name": next((name for name, p in PATTERNS.items() if p == self.pattern), None),
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "vocab_size": self.vocab_size,
            "fingerprint": self.fingerprint(),
        }
        lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in header.items()]
        vocab_lines = [
            json.dumps([i, self.vocab[i].hex(), self.vocab[i].decode("utf-8", errors="backslashreplace")], ensure_ascii=False)
            for i in sorted(self.vocab)
        ]
        lines.append('  "vocab": [\n    ' + ",\n    ".join(vocab_lines) + "\n  ],")
        lines.append('  "merges": [\n    ' + ",\n    ".join(json.dumps(list(p)) for p in self._merge_pairs) + "\n  ]")
        lines.append("}")
        return write_text(path, "\n".join(lines) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read a file written by `save`; a missing, corrupt or truncated file is a clear error."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path} — run `make lesson-1` first")
        advice = f"tokenizer file {path} is corrupt or truncated"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{advice} ({e}); delete it and run `make lesson-1` again") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not a nano tokenizer file (no \"format\": \"{FORMAT_NAME}\")")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} has format version {data.get('version')}, this code reads {FORMAT_VERSION}: run `make lesson-1` again")
        try:
            vocab = {int(i): bytes.fromhex(h) for i, h, *_ in data["vocab"]}
            merges = [(int(a), int(b)) for a, b in data["merges"]]
            tok = cls(vocab, merges, dict(data["special_tokens"]), data["pattern"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{advice} ({type(e).__name__}: {e}); delete it and run `make lesson-1` again") from None
        if "fingerprint" in data and data["fingerprint"] != tok.fingerprint():
            raise ValueError(f"{advice}: its fingerprint does not match its contents; run `make lesson-1` again")
        return tok


def _encode_group(tokenizer: Tokenizer, texts: list[str]) -> tuple[array, array]:
    """encode_batch's work in a worker process (nano/common/workers.py: map_batches): encode a group of
    texts; return all their ids in one flat array plus each text's length. Arrays of 32-bit ints
    cross between processes as raw bytes, far cheaper than lists of ints."""
    flat, lengths = array("I"), array("I")
    for text in texts:
        ids = tokenizer.encode(text)
        flat.extend(ids)
        lengths.append(len(ids))
    return flat, lengths
