"""
Lesson 1 exercises: byte-level BPE (nano/text/tokenizer.py). Run with `make check-1`.

Rebuild the tokenizer and let these tests judge it (NANO_IMPL_TOKENIZER=my_tokenizer.py make check-1):
  1. `merge(ids, pair, new_id)` replaces each occurrence of a pair, left to right (the module also
     exports SPECIAL_TOKENS; the preset regexes, PATTERNS, come from nano/text/pretokenize.py, which
     cuts text into pre-tokens and counts them -- yours may import it, the reference below does).
  2. `tokenizer.Tokenizer.train(...)` learns merges: the most frequent pair first, and on a TIE the
     lexicographically greatest pair of byte strings -- check the hand-worked examples below, then
     the brute-force reference trainer written in this file, which must agree with yours.
  3. Vocabulary layout: special tokens first (<pad> 0, <eos> 1, ...), then the 256 bytes, then merges.
  4. `encode` / `decode` round-trip any text: ASCII, Unicode, emoji, "", special tokens (two in a row,
     and overlapping ones, longest match first); `decode` never raises.
  5. The same merges for any number of worker processes, and from run to run.
  6. `save` / `load` give identical encodings; `encode_iterable` streams the same ids as `encode`.
  7. Bad input -- a vocab too small, an empty corpus, a missing or corrupt file -- is a clear error.
"""

import json
import random
from collections import Counter

import pytest
import regex
from adapters import impl
from conftest import load_lesson

from nano.common.paths import raw_dir, tokenizer_dir

tokenizer = impl("tokenizer")
pretokenize = impl("pretokenize")
# the special tokens the rest of the project relies on, in id order (your SPECIAL_TOKENS must equal it:
# test_vocab_layout); names of your module are looked up inside each test, when it runs
SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<|endoftext|>"]
N_SPECIAL = len(SPECIALS)
BASE = N_SPECIAL + 256  # the first merged token's id


# -----------------------------------------------------------------------------
# a brute-force reference, written to be obviously right rather than fast


def reference_train(text: str, num_merges: int, pattern: str, specials: list[str]) -> list[tuple[bytes, bytes]]:
    """Count pre-tokens by the regex alone; at every step recount all pairs and take the best by
    (count, bytes of first, bytes of second) -- the greatest wins, which is exactly the tie rule."""
    pieces: Counter = Counter()
    segments = regex.split("|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)), text) if specials else [text]
    for segment in segments:
        pieces.update(regex.findall(pretokenize.PATTERNS.get(pattern, pattern), segment))
    words = {tuple(bytes([b]) for b in p.encode("utf-8")): n for p, n in pieces.items()}
    merges = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair[0], pair[1]))
        merges.append(best)
        new_words: Counter = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += n
        words = new_words
    return merges


def reference_encode(tok, text: str) -> list[int]:
    """Specials longest first; each pre-token: apply the merges in the order they were learned."""
    by_bytes = {}
    for i in sorted(tok.vocab, reverse=True):  # lowest id wins for equal bytes
        by_bytes[tok.vocab[i]] = i
    rank = {pair: r for r, pair in enumerate(tok.merges)}
    ids = []
    specials = sorted(tok.special_tokens, key=len, reverse=True)
    parts = regex.split("(" + "|".join(regex.escape(s) for s in specials) + ")", text) if specials else [text]
    for k, part in enumerate(parts):
        if k % 2 == 1:
            ids.append(tok.special_tokens[part])
            continue
        for piece in regex.findall(tok.pattern, part):
            word = [bytes([b]) for b in piece.encode("utf-8")]
            while len(word) > 1:
                pairs = [(rank.get((a, b), 1 << 60), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
                r, i = min(pairs)
                if r == 1 << 60:
                    break
                word[i : i + 2] = [word[i] + word[i + 1]]
            ids += [by_bytes[w] for w in word]
    return ids


def sample_corpus(seed: int = 0, stories: int = 300) -> str:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "Lily", "Tom's", "big", "dog", "ran", "héllo", "naïve", "café", "🐱", "über", "日本"]
    syllables = ["ba", "ko", "ri", "sun", "tel", "mo", "pa", "zi", "dro", "ve"]
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(150)]
    out = []
    for _ in range(stories):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        extra = rng.choice(["", f" {rng.randint(0, 99999)} apples.", "!", "?\n\n", ",  she said.", "\tok"])
        out.append(sentence + extra + "\n<|endoftext|>\n")
    return "".join(out)


@pytest.fixture(scope="module")
def tok():
    return tokenizer.Tokenizer.train(sample_corpus(), vocab_size=BASE + 120, num_workers=1, progress=False)


# -----------------------------------------------------------------------------
# 1-2. merge and training, checked by hand


def test_merge_replaces_pairs_left_to_right():
    """merge([5, 6, 5, 6, 7], (5, 6), 99) -> [99, 99, 7]; overlapping pairs go from the left."""
    assert tokenizer.merge([5, 6, 5, 6, 7], (5, 6), 99) == [99, 99, 7]
    assert tokenizer.merge([1, 1, 1], (1, 1), 9) == [9, 1]
    assert tokenizer.merge([1, 1, 1, 1], (1, 1), 9) == [9, 9]
    assert tokenizer.merge([], (1, 2), 9) == []


def test_hand_checked_merges_with_ties():
    """Sennrich's corpus, words cut apart by special tokens so no spaces get in the way:
    low x5, lower x2, newest x6, widest x3. Work it out on paper:
      (e,s) and (s,t) both occur 9 times -> TIE -> (s,t), since b"s" > b"e";  then (e,st) 9;
      (l,o) and (o,w) both 7 -> (o,w), b"o" > b"l";  (l,ow) 7;  three pairs at 6 -> (w,est) ...
    """
    words = ["low"] * 5 + ["lower"] * 2 + ["newest"] * 6 + ["widest"] * 3
    text = "<|endoftext|>".join(words)
    tok = tokenizer.Tokenizer.train(text, vocab_size=BASE + 12, num_workers=1, progress=False)
    expected = [(b"s", b"t"), (b"e", b"st"), (b"o", b"w"), (b"l", b"ow"), (b"w", b"est"), (b"n", b"e"),
                (b"ne", b"west"), (b"w", b"i"), (b"wi", b"d"), (b"wid", b"est"), (b"low", b"e"), (b"lowe", b"r")]
    assert tok.merges == expected
    assert tok.vocab[BASE] == b"st" and tok.vocab[BASE + 11] == b"lower"


def test_tie_between_a_string_and_its_prefix():
    """abc x2, ab x1, ax x2: first (a,b) (3 times); then (ab,c) and (a,x) tie at 2.
    b"ab" > b"a" (a prefix sorts first), so (ab,c) wins. A tie-break key that forgets the prefix
    rule (comparing inverted bytes without an end marker, say) picks (a,x) here."""
    text = "<|endoftext|>".join(["abc", "abc", "ab", "ax", "ax"])
    tok = tokenizer.Tokenizer.train(text, vocab_size=BASE + 3, num_workers=1, progress=False)
    assert tok.merges == [(b"a", b"b"), (b"ab", b"c"), (b"a", b"x")]


@pytest.mark.filterwarnings("ignore:the corpus ran out")  # tiny corpora may run out of pairs: fine here
@pytest.mark.parametrize("pattern", ["gpt2", "nano"])
def test_agrees_with_brute_force_reference(pattern):
    """On random small-alphabet corpora (full of ties), the fast trainer equals reference_train."""
    rng = random.Random(pattern)
    for trial in range(12):
        alphabet = rng.choice(["ab ", "abc \n", "aab ba.", "xy z1"])
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(20, 300)))
        if trial % 3 == 0:
            text = text.replace("  ", "<|endoftext|>")
        num_merges = rng.randint(1, 40)
        expected = reference_train(text, num_merges, pattern, SPECIALS)
        if not regex.sub("<\\|endoftext\\|>", "", text):
            continue
        tok = tokenizer.Tokenizer.train(text, vocab_size=BASE + num_merges, pattern=pattern, num_workers=1, progress=False)
        assert tok.merges == expected, (text, pattern)


def test_vocab_layout(tok):
    """Specials get the lowest ids in SPECIAL_TOKENS order, then byte b is id len(specials) + b,
    then one id per merge; vocab_size counts them all."""
    assert tokenizer.SPECIAL_TOKENS == SPECIALS and SPECIALS[:3] == ["<pad>", "<eos>", "<bos>"]
    assert tok.special_tokens == {s: i for i, s in enumerate(SPECIALS)}
    assert all(tok.vocab[i] == s.encode() for i, s in enumerate(SPECIALS))
    assert all(tok.vocab[N_SPECIAL + b] == bytes([b]) for b in range(256))
    assert tok.vocab_size == len(tok.vocab) == BASE + len(tok.merges) == BASE + 120
    for k, (a, b) in enumerate(tok.merges):
        assert tok.vocab[BASE + k] == a + b


# -----------------------------------------------------------------------------
# 4. encode / decode


ROUND_TRIP = [
    "",
    "hello world",
    "The cat sat on the mat.  Twice!\n\n\tTabs and  double  spaces   ",
    "héllo naïve café über 日本語 Ελληνικά",
    "emoji 🐱🐶 👩‍👩‍👧 flags 🇫🇷",
    "<bos>a story<eos>",
    "<eos><bos>",  # two specials in a row
    "<|endoftext|><|endoftext|>x",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "almost special <eos <|endoftext| <>",
    "numbers 1234567 and 3.14159",
    "\r\n\r\n trailing whitespace \n",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    """decode(encode(s)) == s for any s, and encode matches the reference encoder."""
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == reference_encode(tok, text)


def test_special_tokens_become_single_ids(tok):
    """'<eos><bos>' -> [1, 2]: special tokens in the text are matched, never split into bytes."""
    assert tok.encode("<eos><bos>") == [1, 2]
    ids = tok.encode("the cat<|endoftext|>")
    assert ids[-1] == SPECIALS.index("<|endoftext|>") and ids.count(5) == 1


def test_overlapping_special_tokens_longest_first():
    """With specials "<a>" and "<a><b>", "<a><b>" is one token and "<a><a><b>" is "<a>" + "<a><b>"."""
    tok = tokenizer.Tokenizer.train("x<a>y<a><b>z xyz", vocab_size=2 + 256 + 3, special_tokens=["<a>", "<a><b>"], num_workers=1, progress=False)
    a, ab = tok.special_tokens["<a>"], tok.special_tokens["<a><b>"]
    assert tok.encode("<a><b>") == [ab]
    assert tok.encode("<a><a><b>") == [a, ab]
    assert tok.encode("<a><b><a>") == [ab, a]
    for text in ["<a><b>", "q<a><a><b><b>", "<a<a><b"]:
        assert tok.decode(tok.encode(text)) == text


def test_encode_matches_reference_on_random_text(tok):
    """Random strings of tricky characters (spaces, newlines, tabs, NBSP, digits, apostrophes)."""
    rng = random.Random(1)
    alphabet = [" ", " ", "  ", "\n", "\r\n", "\t", "a", "th", "e ", "1", "42", ".", "'s", "'", "é", "🐱", "\u00a0", "\u3000", "\x1c", "<eos>", "<eo"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        assert tok.encode(text) == reference_encode(tok, text), repr(text)


@pytest.mark.filterwarnings("ignore:the corpus ran out")  # nano on digits alone has no pair to merge
def test_digits_are_split_one_by_one():
    """The nano pattern cuts every digit apart, so even on a corpus full of numbers "2024" stays
    the tokens 2, 0, 2, 4; GPT-4's pattern (groups of up to 3 digits) learns multi-digit tokens."""
    rng = random.Random(2)
    numbers = " ".join(str(rng.choice([7, 42, 100, 2024, rng.randint(0, 999)])) for _ in range(3000))
    nano = tokenizer.Tokenizer.train(numbers, vocab_size=BASE + 30, pattern="nano", num_workers=1, progress=False)
    gpt4 = tokenizer.Tokenizer.train(numbers, vocab_size=BASE + 30, pattern="gpt4", num_workers=1, progress=False)
    assert [nano.vocab[i] for i in nano.encode("2024")] == [b"2", b"0", b"2", b"4"]
    assert not any(sum(c.isdigit() for c in token.decode("utf-8", "replace")) > 1 for token in nano.vocab.values())
    assert [gpt4.vocab[i] for i in gpt4.encode("2024")] == [b"202", b"4"]


def test_decode_never_raises(tok):
    """Half a UTF-8 character or an unknown id decodes to U+FFFD instead of raising;
    decode_bytes gives the raw bytes a streaming decoder needs."""
    cat = "🐱".encode("utf-8")
    ids = tok.encode("🐱")
    assert tok.decode_bytes(ids) == cat
    first_byte = [N_SPECIAL + cat[0]]
    assert tok.decode(first_byte) == "\ufffd"
    assert tok.decode([tok.vocab_size + 5]) == "\ufffd"
    assert tok.decode([]) == ""


def test_encode_batch_equals_encode(tok):
    texts = ROUND_TRIP * 3
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_encode_batch_in_worker_processes(tok):
    """Over ~1 MB the batch is split into groups that 2 worker processes encode (nano/common/workers.py);
    the ids come back whole and in the order of the texts."""
    stories = sample_corpus(seed=4, stories=20000).split("<|endoftext|>")
    assert sum(map(len, stories)) >= 1 << 20  # big enough to take the worker path
    assert tok.encode_batch(stories, num_workers=2) == [tok.encode(s) for s in stories]


def test_encode_iterable_equals_encode(tok):
    """Streaming gives the ids of the whole text, even where a line boundary alone would not be a
    safe cut ("a\\n" + "\\nb" is not "a\\n\\nb") and when special tokens span two pieces."""
    text = sample_corpus(seed=3, stories=60) + "x  \n\n y<|endoftext|><eos>z"
    expected = tok.encode(text)
    assert list(tok.encode_iterable(text.splitlines(keepends=True))) == expected
    rng = random.Random(0)
    cuts = sorted(rng.sample(range(len(text)), 200))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    assert list(tok.encode_iterable(pieces, chunk_chars=16)) == expected
    assert list(tok.encode_iterable([])) == []


def test_a_pattern_of_your_own():
    """`pattern` may be any regex, not only a preset name: it is saved and used as given."""
    text = sample_corpus(seed=9, stories=80)
    mine = r"\S+|\s+"
    tok = tokenizer.Tokenizer.train(text, vocab_size=BASE + 40, pattern=mine, num_workers=1, progress=False)
    assert tok.pattern == mine
    assert tok.merges == reference_train(text, 40, mine, SPECIALS)
    assert tok.encode(text) == reference_encode(tok, text)
    assert list(tok.encode_iterable(text.splitlines(keepends=True), chunk_chars=64)) == tok.encode(text)


# -----------------------------------------------------------------------------
# 5. determinism and parallel counting


def test_gpt2_pattern_deterministic_across_runs_and_workers(tmp_path):
    """GPT-2-style training on a small corpus: identical merges for 1 or 2 worker processes, twice."""
    path = tmp_path / "corpus.txt"
    path.write_text(sample_corpus(seed=5, stories=400), encoding="utf-8")
    runs = [tokenizer.Tokenizer.train(path, vocab_size=BASE + 80, pattern="gpt2", num_workers=w, progress=False) for w in (1, 2, 2)]
    assert runs[0].merges == runs[1].merges == runs[2].merges
    assert runs[0].fingerprint() == runs[1].fingerprint()
    from_text = tokenizer.Tokenizer.train(path.read_text(encoding="utf-8"), vocab_size=BASE + 80, pattern="gpt2", num_workers=2, progress=False)
    assert from_text.merges == runs[0].merges


# -----------------------------------------------------------------------------
# 6. save / load


def test_save_load_identical(tok, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json")
    text = path.read_text(encoding="utf-8")
    assert '"merges"' in text and '"pattern"' in text and '"version"' in text  # readable JSON
    loaded = tokenizer.Tokenizer.load(path)
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.merges == tok.merges and loaded.vocab == tok.vocab and loaded.pattern == tok.pattern
    for s in ROUND_TRIP:
        assert loaded.encode(s) == tok.encode(s)
    rebuilt = tokenizer.Tokenizer(tok.vocab, tok.merges, special_tokens=SPECIALS, pattern=tok.pattern)
    assert rebuilt.encode(ROUND_TRIP[3]) == tok.encode(ROUND_TRIP[3])


def test_fingerprint_tells_tokenizers_apart(tok):
    other = tokenizer.Tokenizer.train(sample_corpus(), vocab_size=BASE + 119, num_workers=1, progress=False)
    assert other.fingerprint() != tok.fingerprint()
    assert isinstance(tok.fingerprint(), str) and 8 <= len(tok.fingerprint()) <= 64


# -----------------------------------------------------------------------------
# 7. bad input


def test_vocab_too_small_is_an_error():
    with pytest.raises(ValueError, match="too small"):
        tokenizer.Tokenizer.train("some text", vocab_size=BASE - 1, progress=False)


def test_empty_corpus_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        tokenizer.Tokenizer.train("", vocab_size=BASE + 10, progress=False)
    with pytest.raises(ValueError, match="empty"):
        tokenizer.Tokenizer.train("<|endoftext|><eos>", vocab_size=BASE + 10, progress=False)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="lesson-0"):
        tokenizer.Tokenizer.train(tmp_path / "nope.txt", vocab_size=BASE + 10, progress=False)
    with pytest.raises(FileNotFoundError, match="lesson-1"):
        tokenizer.Tokenizer.load(tmp_path / "nope.json")


def test_corrupt_file_is_an_error(tok, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="corrupt"):
        tokenizer.Tokenizer.load(path)
    path.write_text(data.decode().replace('"merges": [\n    [', '"merges": [\n    [999999, '), encoding="utf-8")  # edited
    with pytest.raises(ValueError, match="corrupt"):
        tokenizer.Tokenizer.load(path)


# -----------------------------------------------------------------------------
# the lesson script, end to end on a tiny corpus


def test_lesson_script_trains_saves_and_skips(nano_dirs, capsys):
    """lessons/01_tokenizer.py: clear error without data; trains and saves; a rerun skips training."""
    lesson = load_lesson("01_tokenizer")
    with pytest.raises(FileNotFoundError, match="lesson-0"):
        lesson.main(["--vocab_size", "300"])
    raw_dir().mkdir(parents=True)
    (raw_dir() / "stories_train.txt").write_text(sample_corpus(seed=7, stories=200), encoding="utf-8")
    (raw_dir() / "stories_val.txt").write_text(sample_corpus(seed=8, stories=20), encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="lesson-0"):  # the SFT text is missing too
        lesson.main(["--vocab_size", "300", "--num_workers", "1"])
    lesson.main(["--vocab_size", "300", "--num_workers", "1", "--with_sft_text", "false"])  # stories only
    capsys.readouterr()
    conversation = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]}
    problem = {"question": "Tom has 17 apples. How many?", "answer": "So he has 17 apples.\n#### 17"}
    (raw_dir() / "instructions_train.jsonl").write_text(json.dumps(conversation) + "\n", encoding="utf-8")
    (raw_dir() / "tinymath_train.jsonl").write_text(json.dumps(problem) + "\n", encoding="utf-8")
    lesson.main(["--vocab_size", "300", "--num_workers", "1"])
    out = capsys.readouterr().out
    assert "bytes per token" in out and "[" in out and "skipped" not in out  # the new text means a new tokenizer
    tok = tokenizer.Tokenizer.load(tokenizer_dir() / "tokenizer.json")
    assert tok.vocab_size == 300 and tok.pattern == pretokenize.PATTERNS["gpt2"]
    assert (tokenizer_dir() / "sft_text.txt").read_text(encoding="utf-8") == "Say hi.\n\nHi!\n\n" + problem["question"] + "\n" + problem["answer"] + "\n"
    lesson.main(["--vocab_size", "300", "--num_workers", "1"])
    assert "skipped training" in capsys.readouterr().out
