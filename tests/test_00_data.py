"""
Exercise: lesson 0's built-in data (nano/data/stories.py, nano/data/tinymath.py, nano/data/synthetic.py, with the file
format of nano/data/story_files.py) and the lesson script that writes it.

Implement the generator so that
  - the same seed gives the same bytes and another seed different ones (`write_stories`,
    `tinymath_problems`, `conversations`, `preference_pairs`);
  - stories are in TinyStoriesV2 format ("story\\n<|endoftext|>\\n"), 80-250 words each;
  - held-out splits share nothing with train (`exclude=` really excludes): stories, TinyMath,
    conversations, preference prompts, RL prompts;
  - every TinyMath answer is right: recompute it from the recorded operations and operands, find
    each computation written out ("3 + 4 = 7"), and read the same number on the last line "#### N";
  - every preference pair is flawed in exactly the way its `flaw` says;
and lessons/00_data.py so that it writes every file of the shared contract (manifest.json last),
skips a rerun with the same arguments, keeps the finished steps of an interrupted run, and reads a
local stories file and a local GSM8K copy.

Run: make check-0   (or .venv/bin/python -m pytest -q tests/test_00_data.py)
"""

import json
import sys
from collections import Counter

import pytest

from adapters import impl
from conftest import load_lesson

world = impl("world")
stories_module = impl("stories")
story_files = impl("story_files")
tinymath = impl("tinymath")
synthetic = impl("synthetic")

SEP = "\n<|endoftext|>\n"
SMALL = ["--stories", "60", "--val_stories", "10", "--conversations", "30", "--val_conversations", "10",
         "--tinymath_train", "60", "--tinymath_test", "20", "--preferences", "16", "--val_preferences", "8",
         "--rl_prompts", "20", "--rl_test", "10", "--words_prompts", "30", "--words_test", "12"]
CONTRACT_FILES = ["stories_train.txt", "stories_val.txt", "instructions_train.jsonl", "instructions_val.jsonl",
                  "tinymath_train.jsonl", "tinymath_test.jsonl", "preferences_train.jsonl", "preferences_val.jsonl",
                  "rl_prompts_train.jsonl", "rl_prompts_test.jsonl", "words_prompts_train.jsonl", "words_prompts_test.jsonl",
                  "manifest.json"]




def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- determinism ------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        stories_module.write_stories(tmp_path / f"{name}.txt", seed, 100, "train", progress=False)
    a, b, c = ((tmp_path / f"{n}.txt").read_bytes() for n in "abc")
    assert a == b
    assert a != c
    assert tinymath.tinymath_problems(3, 50, "test") == tinymath.tinymath_problems(3, 50, "test")
    assert tinymath.tinymath_problems(3, 50, "test") != tinymath.tinymath_problems(4, 50, "test")
    assert synthetic.conversations(3, 20, "train") == synthetic.conversations(3, 20, "train")
    assert synthetic.conversations(3, 20, "train") != synthetic.conversations(4, 20, "train")
    assert synthetic.preference_pairs(3, 12, "train") == synthetic.preference_pairs(3, 12, "train")
    assert synthetic.preference_pairs(3, 12, "train") != synthetic.preference_pairs(4, 12, "train")


def test_more_train_stories_do_not_change_the_first_ones(tmp_path):
    stories_module.write_stories(tmp_path / "small.txt", 5, 20, "train", progress=False)
    stories_module.write_stories(tmp_path / "big.txt", 5, 50, "train", progress=False)
    assert story_files.read_stories(tmp_path / "big.txt")[:20] == story_files.read_stories(tmp_path / "small.txt")


# --- stories ------------------------------------------------------------------------------------


def test_story_file_format_and_length(tmp_path):
    path = tmp_path / "stories.txt"
    info = stories_module.write_stories(path, 0, 300, "train", progress=False)
    text = path.read_text(encoding="utf-8")
    assert info["count"] == 300 and info["bytes"] == len(text.encode("utf-8"))
    assert text.endswith(SEP)
    assert text.count("<|endoftext|>") == 300
    stories = text.split(SEP)[:-1]
    assert stories == story_files.read_stories(path)
    assert len(set(stories)) > 290  # variety: hardly any story twice
    for story in stories:
        assert story == story.strip() and story
        assert 80 <= len(story.split()) <= 250, story
    # dialogue sometimes, not always; more than a handful of names and plots
    with_dialogue = sum('"' in s for s in stories)
    assert 0.2 * len(stories) < with_dialogue < 0.9 * len(stories)
    assert len({s.split()[0] for s in stories}) > 20


def test_story_exclude_really_excludes():
    first_two = [s.text for s in stories_module.iter_stories(7, 2, "train")]
    kept = [s.text for s in stories_module.iter_stories(7, 5, "train", exclude={first_two[0]})]
    assert len(kept) == 5 and first_two[0] not in kept and first_two[1] == kept[0]


def test_story_facts_are_in_the_story():
    rng = world.rng_for(11, "facts")
    for _ in range(100):
        story = stories_module.generate_story(rng)
        assert story.hero.name in story.text
        assert story.keywords, story.plot
        for word in story.keywords:
            assert stories_module.uses_word(story.text, word)
        for question, answer in story.qa:
            assert question.endswith("?") and answer.endswith(".")


def test_helpers_on_small_examples():
    assert stories_module.uses_word("Lily has two Balls.", "ball")
    assert not stories_module.uses_word("She went to a ballet.", "ball")
    assert stories_module.split_sentences('Hi. "Go!" he said.\n\nThe end.') == ["Hi.", '"Go!" he said.', "The end."]
    assert tinymath.final_answer("so 3 + 4 = 7.\n#### 1,200") == "1200"
    assert tinymath.final_answer("no answer here") is None


# --- TinyMath ---------------------------------------------------------------------------------

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def check_math_problem(p):
    assert set(p) >= {"id", "question", "answer", "difficulty", "operations", "operands", "result"}
    assert p["difficulty"] == len(p["operations"]) == len(p["operands"]) and p["difficulty"] in (1, 2)
    value = None
    for i, (op, (a, b)) in enumerate(zip(p["operations"], p["operands"])):
        if i > 0:
            assert a == value, "a second step starts from the first step's result"
        value = OPS[op](a, b)
        assert value >= 0
        assert f"{a} {op} {b} = {value}" in p["answer"], "each computation is written out"
    assert value == p["result"]
    assert p["answer"].splitlines()[-1] == f"#### {p['result']}"
    assert tinymath.final_answer(p["answer"]) == str(p["result"])
    assert p["question"].endswith("?")


def test_tinymath_answers_are_right_and_varied():
    problems = tinymath.tinymath_problems(2, 400, "train")
    for p in problems:
        check_math_problem(p)
    assert {tuple(p["operations"]) for p in problems} >= {("+",), ("-",), ("*",), ("+", "-"), ("*", "+")}
    assert Counter(p["difficulty"] for p in problems)[2] > 100
    assert max(p["result"] for p in problems) <= 100  # small numbers


def test_tinymath_train_and_test_share_no_question():
    test = tinymath.tinymath_problems(2, 200, "test")
    test_questions = {p["question"] for p in test}
    assert len(test_questions) == 200  # no duplicates inside a split either
    train = tinymath.tinymath_problems(2, 800, "train", exclude=test_questions)
    train_questions = [p["question"] for p in train]
    assert len(set(train_questions)) == 800
    assert not test_questions & set(train_questions)
    # and `exclude` is really used: exclude the train stream's first question and it is gone
    first = tinymath.tinymath_problems(2, 1, "train")[0]["question"]
    assert first not in {p["question"] for p in tinymath.tinymath_problems(2, 5, "train", exclude={first})}


# --- conversations ------------------------------------------------------------------------------


def test_conversations_format_and_required_words():
    tasks = Counter()
    for conv in synthetic.conversations(1, 200, "train"):
        tasks[conv["task"]] += 1
        messages = conv["messages"]
        assert len(messages) % 2 == 0
        for i, message in enumerate(messages):
            assert set(message) == {"role", "content"}
            assert message["role"] == ("user" if i % 2 == 0 else "assistant")
            assert isinstance(message["content"], str) and message["content"].strip()
        if conv["task"] == "words":
            assert len(conv["required_words"]) == 3
            for word in conv["required_words"]:
                assert word in messages[0]["content"]
                assert stories_module.uses_word(messages[1]["content"], word)
        if conv["task"] in ("qa", "story_then_question"):
            assert messages[-2]["content"].rstrip().endswith(("?", "sentence."))
    assert set(tasks) >= {"words", "feature", "qa", "continue", "story_then_question"}


def test_conversation_val_prompts_not_in_train():
    val = synthetic.conversations(1, 40, "val")
    val_prompts = {c["messages"][0]["content"] for c in val}
    train = synthetic.conversations(1, 200, "train", exclude_prompts=val_prompts)
    assert not val_prompts & {c["messages"][0]["content"] for c in train}
    assert all(c["task"] != "chat" for c in val)


# --- preference pairs -------------------------------------------------------------------------


def check_pair(pair):
    chosen, rejected, flaw = pair["chosen"], pair["rejected"], pair["flaw"]
    assert pair["prompt"] and chosen and rejected and chosen != rejected
    if flaw == "wrong_number":
        assert tinymath.final_answer(chosen) == pair["correct_answer"]
        assert tinymath.final_answer(rejected) == pair["rejected_answer"] != pair["correct_answer"]
    elif flaw == "missing_word":
        words = pair["required_words"]
        assert pair["missing_word"] in words
        assert all(w in pair["prompt"] for w in words)
        assert all(stories_module.uses_word(chosen, w) for w in words)
        assert not stories_module.uses_word(rejected, pair["missing_word"])
        assert all(stories_module.uses_word(rejected, w) for w in words if w != pair["missing_word"])
    elif flaw == "broken_off":
        assert chosen.startswith(rejected) and len(rejected) < 0.8 * len(chosen)
        assert rejected[-1].isalpha(), "it stops in the middle of a sentence"
    elif flaw == "repetition":
        assert max(Counter(stories_module.split_sentences(chosen)).values()) == 1
        counts = Counter(stories_module.split_sentences(rejected))
        assert counts[pair["repeated_sentence"]] == pair["times"] >= 3
        first = rejected.index(pair["repeated_sentence"]) + len(pair["repeated_sentence"])
        assert chosen.startswith(rejected[:first])
    else:
        raise AssertionError(f"unknown flaw {flaw!r}")


def test_preference_pairs_differ_as_claimed():
    pairs = synthetic.preference_pairs(5, 80, "train")
    assert Counter(p["flaw"] for p in pairs) == {f: 20 for f in ("wrong_number", "missing_word", "broken_off", "repetition")}
    for pair in pairs:
        check_pair(pair)


def test_preference_math_prompts_avoid_the_test_set():
    test_questions = {p["question"] for p in tinymath.tinymath_problems(5, 300, "test")}
    pairs = synthetic.preference_pairs(5, 200, "train", exclude_questions=test_questions)
    assert not test_questions & {p["prompt"] for p in pairs}
    # the wrong_number chosen answers are right: their computations check out
    for pair in pairs:
        if pair["flaw"] == "wrong_number":
            for a, op, b, r in __import__("re").findall(r"(\d+) ([-+*]) (\d+) = (\d+)", pair["chosen"]):
                assert OPS[op](int(a), int(b)) == int(r)


# --- the lesson script end to end -----------------------------------------------------------


def test_lesson_writes_the_contract(nano_dirs, capsys):
    lesson = load_lesson("00_data")
    manifest = lesson.main(SMALL)
    raw = nano_dirs / "data" / "raw"
    for name in CONTRACT_FILES:
        assert (raw / name).is_file(), name
    assert not list(raw.glob("*.tmp")) and not (raw / ".progress.json").exists()
    # the manifest is written last and describes what is there
    assert (raw / "manifest.json").stat().st_mtime_ns >= max((raw / n).stat().st_mtime_ns for n in CONTRACT_FILES)
    on_disk = json.loads((raw / "manifest.json").read_text())
    assert on_disk["seed"] == 1337 and on_disk["source"] == "synthetic" and on_disk == manifest
    for name, info in on_disk["files"].items():
        assert (raw / name).stat().st_size == info["bytes"]

    train_stories = story_files.read_stories(raw / "stories_train.txt")
    val_stories = story_files.read_stories(raw / "stories_val.txt")
    assert (len(train_stories), len(val_stories)) == (60, 10)
    assert (raw / "stories_train.txt").read_text().endswith(SEP)
    assert not set(train_stories) & set(val_stories)

    for split, n in (("train", 30), ("val", 10)):
        rows = read_jsonl(raw / f"instructions_{split}.jsonl")
        assert len(rows) == n and all({"messages", "task"} <= set(r) for r in rows)
    tm_train, tm_test = read_jsonl(raw / "tinymath_train.jsonl"), read_jsonl(raw / "tinymath_test.jsonl")
    assert (len(tm_train), len(tm_test)) == (60, 20)
    for p in tm_train + tm_test:
        check_math_problem(p)
    assert not {p["question"] for p in tm_train} & {p["question"] for p in tm_test}
    prefs = read_jsonl(raw / "preferences_train.jsonl") + read_jsonl(raw / "preferences_val.jsonl")
    for pair in prefs:
        check_pair(pair)
    assert not {p["prompt"] for p in prefs} & {p["question"] for p in tm_test}

    rl_train, rl_test = read_jsonl(raw / "rl_prompts_train.jsonl"), read_jsonl(raw / "rl_prompts_test.jsonl")
    assert (len(rl_train), len(rl_test)) == (20, 10)
    for row in rl_train + rl_test:
        assert {"prompt", "answer", "source"} <= set(row) and row["source"] == "tinymath"
        assert row["answer"].lstrip("-").isdigit()
    assert not {r["prompt"] for r in rl_train} & {r["prompt"] for r in rl_test}
    assert not {r["prompt"] for r in rl_train} & {p["question"] for p in tm_test}
    answers = {p["question"]: str(p["result"]) for p in tm_test}
    assert all(answers[r["prompt"]] == r["answer"] for r in rl_test)

    # the words skill: held-out requests ask for word sets no training request (RL's or SFT's) asks for
    words_train, words_test = read_jsonl(raw / "words_prompts_train.jsonl"), read_jsonl(raw / "words_prompts_test.jsonl")
    assert (len(words_train), len(words_test)) == (30, 12)
    sft_sets = {frozenset(r["required_words"]) for r in read_jsonl(raw / "instructions_train.jsonl") if r["task"] == "words"}
    train_sets, test_sets = ({frozenset(r["required_words"]) for r in rows} for rows in (words_train, words_test))
    assert len(train_sets) == 30 and len(test_sets) == 12  # no set twice
    assert not test_sets & (train_sets | sft_sets)
    for row in words_train + words_test:
        assert len(row["required_words"]) == 3 and all(w in row["prompt"] for w in row["required_words"])

    out = capsys.readouterr().out
    assert "stories_train.txt" in out and "TinyMath only" in out and "#### " in out


def test_lesson_rerun_skips_and_new_arguments_regenerate(nano_dirs, capsys):
    lesson = load_lesson("00_data")
    raw = nano_dirs / "data" / "raw"
    lesson.main(SMALL)
    before = {n: (raw / n).stat().st_mtime_ns for n in CONTRACT_FILES}
    first_train = (raw / "stories_train.txt").read_bytes()
    capsys.readouterr()
    lesson.main(SMALL)
    assert "nothing to do" in capsys.readouterr().out
    assert {n: (raw / n).stat().st_mtime_ns for n in CONTRACT_FILES} == before
    lesson.main(SMALL + ["--seed", "2"])
    assert "nothing to do" not in capsys.readouterr().out
    assert (raw / "stories_train.txt").read_bytes() != first_train
    assert json.loads((raw / "manifest.json").read_text())["seed"] == 2


def test_interrupted_run_has_no_manifest_and_resumes(nano_dirs, capsys):
    lesson = load_lesson("00_data")
    raw = nano_dirs / "data" / "raw"

    def crash(*args):
        raise KeyboardInterrupt

    steps = lesson.STEPS
    lesson.STEPS = [(n, crash if n == "preferences" else s) for n, s in steps]
    with pytest.raises(KeyboardInterrupt):
        lesson.main(SMALL)
    assert not (raw / "manifest.json").exists()
    stories_time = (raw / "stories_train.txt").stat().st_mtime_ns
    lesson.STEPS = steps
    capsys.readouterr()
    lesson.main(SMALL)
    out = capsys.readouterr().out
    assert "[stories] done in an earlier run" in out and "[tinymath] done in an earlier run" in out
    assert "[preferences] ..." in out
    assert (raw / "stories_train.txt").stat().st_mtime_ns == stories_time
    assert (raw / "manifest.json").exists() and (raw / "preferences_train.jsonl").exists()


def test_lesson_reads_a_local_story_file_and_gsm8k(nano_dirs, tmp_path):
    lesson = load_lesson("00_data")
    raw = nano_dirs / "data" / "raw"
    stories = [f"Story {i}. Once upon a time there was a cat number {i}." for i in range(30)]
    source = tmp_path / "mine.txt"
    source.write_text(SEP.join(stories) + SEP)
    gsm = tmp_path / "gsm8k"
    gsm.mkdir()
    rows = [{"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
            {"question": "What is 10 * 10?", "answer": "10 * 10 = 100\n#### 100"}]
    (gsm / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = lesson.main(SMALL + ["--source", str(source), "--val_stories", "5", "--gsm8k", str(gsm)])
    assert story_files.read_stories(raw / "stories_val.txt") == stories[:5]
    assert story_files.read_stories(raw / "stories_train.txt") == stories[5:]
    assert read_jsonl(raw / "gsm8k_test.jsonl") == rows and manifest["gsm8k"] is True
    # asked without GSM8K, the copy goes away so lesson 12 does not use it by mistake
    lesson.main(SMALL + ["--source", str(source), "--val_stories", "5"])
    assert not (raw / "gsm8k_test.jsonl").exists()
    # a file that is not GSM8K is refused with a message naming the line, and so is a missing source
    with pytest.raises(SystemExit, match="no such file"):
        lesson.main(SMALL + ["--source", str(tmp_path / "nope.txt")])
    (gsm / "test.jsonl").write_text(json.dumps({"question": "no answer"}) + "\n")
    with pytest.raises(SystemExit, match="line 1"):
        lesson.main(SMALL + ["--gsm8k", str(gsm)])


def test_lesson_rejects_bad_arguments():
    lesson = load_lesson("00_data")
    from nano.common.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="rl_test"):
        parse_config(lesson.DataConfig, ["--tinymath_test", "5", "--rl_test", "10"], exit_on_error=False)
    with pytest.raises(ConfigError, match="stories"):
        parse_config(lesson.DataConfig, ["--stories", "-1"], exit_on_error=False)
