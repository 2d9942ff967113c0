"""
Exercise (lesson 2): token bins in nano/text/bins.py.

Implement the bins so that:
  - stories become one flat uint16 array, each story `<bos> story <eos>`, that decodes back to the
    original stories (nano/data/story_files.py reads the file in chunks: a story cut by a chunk boundary
    must come out whole), the same with one worker process or several;
  - a vocabulary that does not fit uint16 (more than 65,536 ids) is refused;
  - bins read with another tokenizer than the one that made them are refused (TokenizerMismatchError,
    "re-run `make lesson-2`"); missing inputs name the lesson that makes them;
  - SFT conversations are stored as ids + loss mask, and `sft_batch` gives targets = next token where
    the mask is 1 and -100 elsewhere (prompt tokens and padding), padded or packed;
  - TinyMath's SFT validation slice comes from tinymath_train, never from tinymath_test;
  - preference pairs: the masks cover only the replies; RL prompts end in "<start_of_turn>model\\n";
  - `get_pretrain_batch` returns windows of the stream with y = x shifted by one;
  - a rerun with the same tokenizer and inputs does nothing; a changed input rebuilds;
  - the lesson script runs end to end on tiny files.

Run: `make check-2`. Judge your own: NANO_IMPL_BINS=my_bins.py make check-2.
"""

import collections
import json
import types

import numpy as np
import pytest
import torch

from adapters import impl
from conftest import load_lesson

bins = impl("bins")
chat = impl("chat_format")
tokenizer_module = impl("tokenizer")
tinymath = impl("tinymath")
story_files = impl("story_files")
fileio = impl("fileio")

NAMES = ["Tom", "Lily", "Sam", "Mia", "Ben"]
THINGS = ["ball", "kite", "cake", "dog", "tree"]


def make_stories(n, offset=0):
    stories = []
    for i in range(offset, offset + n):
        name, thing = NAMES[i % 5], THINGS[(i * 3) % 5]
        stories.append(f"Once upon a time, {name} found a {thing}.\n{name} was happy. Story {i} ends; día feliz 🙂.")
    return stories


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_raw(raw):
    """Small files in lesson 0's formats (see the common contracts); returns what was written."""
    raw.mkdir(parents=True, exist_ok=True)
    data = {"stories_train": make_stories(40), "stories_val": make_stories(8, offset=100)}
    for split in ("train", "val"):
        text = "".join(s + "\n<|endoftext|>\n" for s in data[f"stories_{split}"])
        (raw / f"stories_{split}.txt").write_text(text, encoding="utf-8")
        data[f"instructions_{split}"] = [
            {
                "messages": [
                    {"role": "user", "content": f"Write a story with the word {THINGS[i % 5]}."},
                    {"role": "assistant", "content": make_stories(1, offset=i)[0]},
                ],
                "task": "story_with_words",
            }
            for i in range(6 if split == "train" else 2)
        ]
        write_jsonl(raw / f"instructions_{split}.jsonl", data[f"instructions_{split}"])
    for split, n, base in (("train", 20, 0), ("test", 5, 50)):
        rows = []
        for i in range(base, base + n):
            a, b = i % 7 + 1, i % 5 + 2
            rows.append({
                "id": f"{split}-{i}", "question": f"{NAMES[i % 5]} has {a} apples and gets {b} more. How many apples now? ({i})",
                "answer": f"{NAMES[i % 5]} has {a} + {b} = {a + b} apples.\n#### {a + b}",
                "difficulty": 1, "operations": ["add"], "operands": [a, b], "result": a + b,
            })  # fmt: skip
        data[f"tinymath_{split}"] = rows
        write_jsonl(raw / f"tinymath_{split}.jsonl", rows)
    for split in ("train", "val"):
        data[f"preferences_{split}"] = [
            {"prompt": f"What does {NAMES[i]} find?", "chosen": f"{NAMES[i]} finds a {THINGS[i]}.", "rejected": f"{NAMES[i]} finds", "flaw": "broken_off"}
            for i in range(4)
        ]
        write_jsonl(raw / f"preferences_{split}.jsonl", data[f"preferences_{split}"])
    for split in ("train", "test"):
        data[f"rl_{split}"] = [{"prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1), "source": "tinymath"} for i in range(3)]
        write_jsonl(raw / f"rl_prompts_{split}.jsonl", data[f"rl_{split}"])
    (raw / "manifest.json").write_text(json.dumps({"source": "test", "seed": 0}))
    return data


@pytest.fixture
def world(nano_dirs):
    """Raw files, a tokenizer trained on them (saved where lesson 1 puts it) and the built bins."""
    from nano.common import paths

    data = make_raw(paths.raw_dir())
    corpus = (paths.raw_dir() / "stories_train.txt").read_text(encoding="utf-8") + "apples How many more"
    tok = tokenizer_module.Tokenizer.train(corpus, vocab_size=300)
    paths.tokenizer_dir().mkdir(parents=True)
    tok.save(paths.tokenizer_dir() / "tokenizer.json")
    tokenizer_path = paths.tokenizer_dir() / "tokenizer.json"
    meta, built = bins.build_bins(tok, tokenizer_path, paths.raw_dir(), paths.bins_dir(), num_workers=1)
    assert built
    return types.SimpleNamespace(data=data, tok=tok, tokenizer_path=tokenizer_path, meta=meta, raw=paths.raw_dir(), out=paths.bins_dir())


def split_documents(tokens, tok):
    """[bos a b eos bos c eos] -> [[a, b], [c]], checking every document is wrapped in <bos> ... <eos>."""
    bos, eos = tok.special_tokens["<bos>"], tok.special_tokens["<eos>"]
    docs, i = [], 0
    tokens = list(map(int, tokens))
    while i < len(tokens):
        assert tokens[i] == bos, f"a document must start with <bos> at position {i}"
        end = tokens.index(eos, i)
        docs.append(tokens[i + 1 : end])
        i = end + 1
    return docs


def test_pretrain_bins_round_trip(world):
    for split in ("train", "val"):
        tokens = bins.load_pretrain_tokens(split, world.tok, world.out)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        stories = [world.tok.decode(doc) for doc in split_documents(tokens, world.tok)]
        assert stories == world.data[f"stories_{split}"]
        assert world.meta["pretrain"][split] == {"stories": len(stories), "tokens": len(tokens)}


def test_math_in_pretraining_adds_the_tinymath_train_problems(world, tmp_path):
    """With math_in_pretraining, train.bin is the stories followed by the TinyMath training problems
    (question, newline, worked answer) — minus the slice held out for SFT validation; val.bin is unchanged."""
    out = tmp_path / "bins"
    meta, _ = bins.build_bins(world.tok, world.tokenizer_path, world.raw, out, num_workers=1, math_in_pretraining=True)
    docs = [world.tok.decode(d) for d in split_documents(bins.load_pretrain_tokens("train", world.tok, out), world.tok)]
    train_problems, _ = bins.split_tinymath(fileio.read_jsonl(world.raw / "tinymath_train.jsonl"), 0.05)
    n_stories = len(world.data["stories_train"])
    assert docs[:n_stories] == world.data["stories_train"]
    assert docs[n_stories:] == [f"{p['question']}\n{p['answer']}" for p in train_problems]
    assert meta["pretrain"]["train"]["extra_documents"] == len(train_problems) > 0
    assert (out / "val.bin").read_bytes() == (world.out / "val.bin").read_bytes()


def test_arithmetic_drills_cover_every_step_of_a_solution(world, tmp_path):
    """Every "a op b = r" that a TinyMath worked answer writes is one of the drill facts, each fact
    appears exactly `repeats` times, and the drills land in train.bin after the stories."""
    drills = tinymath.arithmetic_drills(repeats=2)
    lines = [line for doc in drills for line in doc.split("\n")]
    counts = collections.Counter(lines)
    assert set(counts.values()) == {2} and counts["So 17 + 5 = 22."] == 2 and counts["So 6 * 10 = 60."] == 2
    for problem in tinymath.tinymath_problems(0, 300, "test"):
        for op, (a, b) in zip(problem["operations"], problem["operands"]):
            assert f"So {a} {op} {b} = {tinymath.OPS[op](a, b)}." in counts, problem["answer"]
    out = tmp_path / "bins"
    meta, _ = bins.build_bins(world.tok, world.tokenizer_path, world.raw, out, num_workers=1, arithmetic_repeats=2)
    docs = [world.tok.decode(d) for d in split_documents(bins.load_pretrain_tokens("train", world.tok, out), world.tok)]
    assert docs[len(world.data["stories_train"]):] == drills


def test_story_chunks_and_workers_do_not_change_the_bins(world, tmp_path):
    path = world.raw / "stories_train.txt"
    for chunk_chars in (7, 13, 1000):  # tiny chunks cut stories and separators in the middle
        got = list(story_files.iter_story_file(path, chunk_chars=chunk_chars))
        assert got == world.data["stories_train"]
    serial = tmp_path / "serial.bin"
    parallel = tmp_path / "parallel.bin"
    bins.write_pretrain_bin(path, serial, world.tok, num_workers=1)
    bins.write_pretrain_bin(path, parallel, world.tok, num_workers=2)
    assert serial.read_bytes() == parallel.read_bytes() == (world.out / "train.bin").read_bytes()


def test_vocab_must_fit_uint16():
    bins.check_vocab_fits(types.SimpleNamespace(vocab_size=65536))  # ids 0..65535 fit
    with pytest.raises(ValueError, match="uint16"):
        bins.check_vocab_fits(types.SimpleNamespace(vocab_size=65537))


def test_other_tokenizer_is_refused(world):
    other = tokenizer_module.Tokenizer.train("completely different text, zebra zebra quartz " * 20, vocab_size=280)
    assert other.fingerprint() != world.tok.fingerprint()
    readers = [
        lambda t: bins.load_pretrain_tokens("train", t, world.out),
        lambda t: bins.SFTDataset("train", t, world.out),
        lambda t: bins.load_preferences("train", t, world.out),
        lambda t: bins.load_rl_prompts("train", t, world.out),
        lambda t: bins.check_tokenizer(world.out, t),
    ]
    for read in readers:
        with pytest.raises(bins.TokenizerMismatchError, match="make lesson-2"):
            read(other)
        read(world.tok)  # the right one is accepted


def test_missing_inputs_say_which_lesson(nano_dirs):
    from nano.common import paths

    tok = tokenizer_module.Tokenizer.train("a tiny corpus " * 10, vocab_size=270)
    with pytest.raises(FileNotFoundError, match="lesson-0"):
        bins.build_bins(tok, "tok.json", paths.raw_dir(), paths.bins_dir())
    with pytest.raises(FileNotFoundError, match="lesson-2"):
        bins.load_pretrain_tokens("train")
    make_raw(paths.raw_dir())
    (paths.raw_dir() / "preferences_val.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="preferences_val.jsonl.*lesson-0"):
        bins.build_bins(tok, "tok.json", paths.raw_dir(), paths.bins_dir())


def test_sft_bins_hold_rendered_conversations(world):
    train = bins.SFTDataset("train", world.tok, world.out)
    val = bins.SFTDataset("val", world.tok, world.out)
    held_out = max(1, round(0.05 * len(world.data["tinymath_train"])))
    sources = {
        "train": [r["messages"] for r in world.data["instructions_train"]]
        + [tinymath.tinymath_conversation(p) for p in world.data["tinymath_train"][:-held_out]],
        "val": [r["messages"] for r in world.data["instructions_val"]]
        + [tinymath.tinymath_conversation(p) for p in world.data["tinymath_train"][-held_out:]],
    }
    for dataset, split in ((train, "train"), (val, "val")):
        assert len(dataset) == len(sources[split])
        for i, messages in enumerate(sources[split]):
            ids, mask = dataset[i]
            want_ids, want_mask = chat.render_conversation(messages, world.tok)
            assert ids.tolist() == want_ids and mask.tolist() == want_mask


def test_tinymath_test_is_never_in_sft(world):
    test_questions = [p["question"] for p in world.data["tinymath_test"]]
    for split in ("train", "val"):
        dataset = bins.SFTDataset(split, world.tok, world.out)
        texts = [world.tok.decode(dataset[i][0].tolist()) for i in range(len(dataset))]
        assert not any(q in t for q in test_questions for t in texts)
    val_texts = [world.tok.decode(ids.tolist()) for ids, _ in bins.SFTDataset("val", world.tok, world.out)]
    train_texts = [world.tok.decode(ids.tolist()) for ids, _ in bins.SFTDataset("train", world.tok, world.out)]
    held = [p["question"] for p in world.data["tinymath_train"] if any(p["question"] in t for t in val_texts)]
    assert held and not any(q in t for q in held for t in train_texts)  # held out means: not in train


def test_sft_batch_targets_only_the_assistant(world):
    dataset = bins.SFTDataset("train", world.tok, world.out)
    examples = [dataset[i] for i in (0, len(dataset) - 1, 1)]  # different lengths
    x, y = bins.sft_batch(examples)
    longest = max(len(ids) for ids, _ in examples)
    assert x.shape == y.shape == (3, longest - 1) and x.dtype == y.dtype == torch.int64
    for row, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1].tolist()
        for t in range(n):  # target = next token where it is trained on, -100 elsewhere
            assert y[row, t].item() == (ids[t + 1] if mask[t + 1] == 1 else -100)
        assert (x[row, n:] == 0).all() and (y[row, n:] == -100).all()  # padding
    # packing keeps the same trained targets, in fewer rows
    max_len = longest * 2
    xp, yp = bins.sft_batch(examples, max_len=max_len, pack=True)
    assert xp.shape[1] == max_len and xp.shape[0] < len(examples)
    assert sorted(yp[yp != -100].tolist()) == sorted(y[y != -100].tolist())
    # truncation: at most max_len positions per row
    xt, yt = bins.sft_batch(examples, max_len=5)
    assert xt.shape == (3, 5) and xt[0].tolist() == examples[0][0][:5].tolist()


def test_preference_masks_cover_only_the_replies(world):
    pairs = bins.load_preferences("train", world.tok, world.out)
    assert len(pairs) == len(world.data["preferences_train"])
    eot = world.tok.special_tokens["<end_of_turn>"]
    for i, raw in enumerate(world.data["preferences_train"]):
        item = pairs[i]
        prompt = chat.render_prompt([{"role": "user", "content": raw["prompt"]}], world.tok)
        assert item["prompt_ids"].tolist() == prompt
        for part in ("chosen", "rejected"):
            ids, mask = item[f"{part}_ids"], item[f"{part}_mask"]
            assert len(ids) == len(mask) and ids[: len(prompt)].tolist() == prompt
            assert (mask[: len(prompt)] == 0).all() and (mask[len(prompt) :] == 1).all()
            assert ids[mask == 1].tolist() == world.tok.encode(raw[part]) + [eot]
        assert item["flaw"] == raw["flaw"]


def test_rl_prompts_keep_their_answers(world):
    tasks = bins.load_rl_prompts("train", world.tok, world.out)
    assert [t.answer for t in tasks] == [r["answer"] for r in world.data["rl_train"]]
    for task, raw in zip(tasks, world.data["rl_train"]):
        assert task.prompt_ids == chat.render_prompt([{"role": "user", "content": raw["prompt"]}], world.tok)
        assert world.tok.decode(task.prompt_ids).endswith("<start_of_turn>model\n")
    assert len(bins.load_rl_prompts("test", world.tok, world.out)) == len(world.data["rl_test"])


def test_pretrain_batch_windows(world):
    tokens = bins.load_pretrain_tokens("train", world.tok, world.out)
    stream = np.asarray(tokens, dtype=np.int64)
    x, y = bins.get_pretrain_batch(tokens, batch_size=6, context_len=16, generator=torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (6, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in range(6):  # each row is a real window of the stream
        window = np.concatenate([x[row].numpy(), y[row, -1:].numpy()])
        starts = [s for s in range(len(stream) - 16) if (stream[s : s + 17] == window).all()]
        assert starts
    x2, _ = bins.get_pretrain_batch(tokens, 6, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, x2)  # same seed, same batch
    x3, _ = bins.get_pretrain_batch(tokens, 6, 16, generator=np.random.default_rng(0))
    assert x3.shape == (6, 16)
    with pytest.raises(ValueError):
        bins.get_pretrain_batch(tokens[:10], 2, 16)


def test_rerun_skips_unless_something_changed(world):
    path = world.tokenizer_path
    _, built = bins.build_bins(world.tok, path, world.raw, world.out)
    assert not built
    with open(world.raw / "stories_val.txt", "a", encoding="utf-8") as f:
        f.write("One more story.\n<|endoftext|>\n")
    meta, built = bins.build_bins(world.tok, path, world.raw, world.out)
    assert built and meta["pretrain"]["val"]["stories"] == len(world.data["stories_val"]) + 1
    (world.out / "sft_val.mask.bin").unlink()  # a file gone: rebuild
    _, built = bins.build_bins(world.tok, path, world.raw, world.out)
    assert built and (world.out / "sft_val.mask.bin").exists()


def test_lesson_runs_end_to_end(world, capsys):
    lesson = load_lesson("02_bins")
    lesson.main(["--num_workers", "2", "--force"])
    out = capsys.readouterr().out
    meta = json.loads((world.out / "meta.json").read_text())
    assert meta["tokenizer"]["fingerprint"] == world.tok.fingerprint()
    assert f"{len(world.data['stories_train'])} stories" in out.replace(",", "")
    assert "[" in out and "<end_of_turn>]" in out  # the trained-on tokens in brackets
    lesson.main(["--num_workers", "1"])
    assert "up to date" in capsys.readouterr().out
