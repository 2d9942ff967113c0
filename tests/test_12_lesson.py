"""
Exercise (lesson 12): the evaluation driver, lessons/12_evaluate.py.

Make `main(argv)`
  - with no checkpoint: find every stage's files under runs/ (nano/checkpoints/loading.py: STAGES), evaluate the
    ones that exist — chat models zero-shot, the base model few-shot — and list the others as "not
    trained yet (make lesson-N)" in ONE table, written as results.md, results.json, a bar chart per
    task and a graded jsonl per stage and task; each row also has the validation loss and bits per byte,
  - with --checkpoint_path (plus --adapter_path / --quantize): evaluate that one model,
  - refuse bad input with a message that says what to do: an unknown task, GSM8K asked for but not
    on disk (name the command that downloads it), a checkpoint that does not exist (name its lesson).

The models are toys (width 32, 2 layers, random weights): they score ~0, and that is fine — the test
checks that the numbers in the table are the ones the evaluation functions compute.
"""

import json

import numpy as np
import pytest

from adapters import impl
from conftest import load_lesson
from toy_models import BASE, CORPUS, LORA, SFT, save_lora, save_model, toy_model

grading = impl("grading")

from nano.common.paths import bins_dir, raw_dir, runs_dir, tokenizer_dir  # noqa: E402
from nano.text.tokenizer import Tokenizer  # noqa: E402
from nano.checkpoints.checkpoint import load_model  # noqa: E402

lesson = load_lesson("12_evaluate")

FAST = ["--limit", "3", "--max_new_tokens", "6", "--num_fewshot", "1", "--val_batches", "1", "--val_batch_size", "2",
        "--coherence_samples", "3"]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CORPUS, vocab_size=300, progress=False)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def math_rows(n, prefix="m"):
    return [{"id": f"{prefix}{i}", "question": f"Tom has {i} apples and gets {i + 1} more. How many apples?",
             "answer": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}"} for i in range(n)]


@pytest.fixture
def data(nano_dirs, tokenizer):
    """The tokenizer, TinyMath test/train files, and a val bin (with the meta.json that vouches for it)."""
    tokenizer.save(tokenizer_dir() / "tokenizer.json")
    write_jsonl(raw_dir() / "tinymath_test.jsonl", math_rows(5))
    write_jsonl(raw_dir() / "tinymath_train.jsonl", math_rows(2, prefix="train"))
    write_jsonl(raw_dir() / "words_prompts_test.jsonl",
                [{"prompt": f"Write a story using the words {w}, ball and red.", "required_words": [w, "ball", "red"]}
                 for w in ("cat", "dog", "sun", "hat")])
    bins_dir().mkdir(parents=True)
    (bins_dir() / "meta.json").write_text(json.dumps({"tokenizer": {"fingerprint": tokenizer.fingerprint(), "path": "t"}}))
    tokens = np.array(tokenizer.encode(CORPUS * 3), dtype=np.uint16)
    tokens.tofile(bins_dir() / "val.bin")
    return tokens


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_discovery_evaluates_the_stages_that_exist(data, tokenizer, capsys):
    base = toy_model(tokenizer, 0)
    save_model(base, tokenizer, BASE)
    save_lora(base, LORA)  # base and LoRA trained; full SFT, QLoRA and RL not
    lesson.main(FAST)
    out = capsys.readouterr().out
    eval_dir = runs_dir() / "eval"
    report = json.loads((eval_dir / "results.json").read_text())
    stages = {row["stage"]: row for row in report["stages"]}

    # every stage has a row; the missing ones say which lesson makes them
    assert list(stages) == ["base", "sft-full", "lora", "qlora", "dpo", "grpo", "ppo"]
    assert stages["sft-full"]["status"] == "not trained yet (make lesson-5)"
    assert stages["qlora"]["status"] == "not trained yet (make lesson-7)"
    assert stages["base"]["status"] == stages["lora"]["status"] == "evaluated"
    assert stages["base"]["mode"] == "fewshot" and stages["lora"]["mode"] == "chat"

    # GSM8K is not on disk: skipped by default, and said so
    assert report["tasks"] == ["tinymath", "words"] and report["skipped"] == ["gsm8k"]
    assert 'make lesson-0 ARGS="--gsm8k download"' in out

    # the words skill: chat stages only, each story checked against its words
    assert stages["base"]["results"]["words"] is None
    words = stages["lora"]["results"]["words"]
    rows = read_rows(eval_dir / "samples" / "lora_words.jsonl")
    assert words["n"] == len(rows) == 3  # --limit 3
    assert words["correct"] == sum(r["all_used"] for r in rows)
    assert all(r["share"] == impl("words_skill").words_share(r["output"], r["words"]) for r in rows)

    # keeping the characters: sampled stories of every evaluated stage (the chat stage answers the words requests)
    assert stages["base"]["coherence"]["n"] == stages["lora"]["coherence"]["n"] == 3
    assert stages["sft-full"].get("coherence") is None

    # accuracy = the graded samples on disk
    for name in ("base", "lora"):
        result = stages[name]["results"]["tinymath"]
        rows = read_rows(eval_dir / "samples" / f"{name}_tinymath.jsonl")
        assert result["n"] == len(rows) == 3
        assert result["correct"] == sum(r["correct"] for r in rows)
        assert (result["accuracy"], result["stderr"]) == pytest.approx(grading.accuracy_with_stderr([r["correct"] for r in rows]))
        assert all(r["correct"] == grading.is_correct(r["output"], r["reference"]) for r in rows)
    base_prompts = [r["prompt"] for r in read_rows(eval_dir / "samples" / "base_tinymath.jsonl")]
    assert all("<start_of_turn>" not in p and p.endswith("Answer:") for p in base_prompts)  # plain few-shot text
    lora_prompts = [r["prompt"] for r in read_rows(eval_dir / "samples" / "lora_tinymath.jsonl")]
    assert all("<start_of_turn>user" in p for p in lora_prompts)  # the chat format

    # validation loss: the base model's number is what validation_loss computes on the val bin
    model, _ = load_model(runs_dir() / BASE)
    expected = impl("val_loss").validation_loss(model, data, 96, 1, 2, tokenizer=tokenizer)
    assert (stages["base"]["val_loss"], stages["base"]["val_bpb"]) == pytest.approx(expected)
    assert stages["lora"]["val_loss"] != pytest.approx(stages["base"]["val_loss"])  # the adapter is on

    # one table, in the terminal and in results.md; a chart with a bar per evaluated stage
    table = (eval_dir / "results.md").read_text()
    assert "not trained yet (make lesson-5)" in table and f"{stages['base']['val_loss']:.3f}" in table
    assert lesson.table(report["stages"], ["tinymath", "words"], ["gsm8k"]) in out
    svg = (eval_dir / "tinymath.svg").read_text()
    assert svg.count("<rect") == 1 + 2 and ">base<" in svg and ">lora<" in svg  # background + two bars


def test_stages_in_worker_processes_give_the_same_numbers(data, tokenizer, capsys):
    """--workers 2 (the default: two stages at once, each in a forked process on one core) writes the
    same rows and the same samples as evaluating the stages one by one in this process."""
    base = toy_model(tokenizer, 0)
    save_model(base, tokenizer, BASE)
    save_lora(base, LORA)
    eval_dir = runs_dir() / "eval"
    outputs = {}
    for workers in ("1", "2"):
        lesson.main(FAST + ["--workers", workers])
        stages = json.loads((eval_dir / "results.json").read_text())["stages"]
        for row in stages:
            row.pop("seconds", None)  # the only thing allowed to differ
        samples = {p.name: p.read_text() for p in sorted((eval_dir / "samples").iterdir())}
        outputs[workers] = (stages, samples, capsys.readouterr().out)
    assert outputs["1"][0] == outputs["2"][0]
    assert outputs["1"][1] == outputs["2"][1] and len(outputs["1"][1]) == 3  # tinymath of both, words of lora
    assert "2 at a time" in outputs["2"][2] and "2 at a time" not in outputs["1"][2]
    # each stage's report is printed whole, in the lessons' order
    printed = outputs["2"][2]
    assert printed.index("=== base") < printed.index("(base: ") < printed.index("=== lora") < printed.index("(lora: ")


def test_single_checkpoint_form(data, tokenizer, tmp_path):
    save_model(toy_model(tokenizer, 1), tokenizer, SFT)
    config = tmp_path / "eval.json"
    config.write_text(json.dumps({"tasks": "tinymath", "limit": 3}))  # --config_path, as the seed commands use
    lesson.main(["--config_path", str(config), "--checkpoint_path", str(runs_dir() / SFT), "--max_new_tokens", "6",
                 "--val_batches", "1", "--val_batch_size", "2"])
    report = json.loads((runs_dir() / "eval" / "single" / "results.json").read_text())
    (row,) = report["stages"]
    assert row["stage"] == "sft-full" and row["mode"] == "chat" and row["results"]["tinymath"]["n"] == 3
    assert not (runs_dir() / "eval" / "results.json").exists()  # the all-stages table is left alone


def test_single_checkpoint_with_adapter_and_quantize(data, tokenizer):
    base = toy_model(tokenizer, 0)
    save_model(base, tokenizer, BASE)
    save_lora(base, LORA)
    lesson.main(["--checkpoint_path", str(runs_dir() / BASE), "--adapter_path", str(runs_dir() / LORA), "--quantize",
                 "--tasks", "tinymath"] + FAST)
    (row,) = json.loads((runs_dir() / "eval" / "single" / "results.json").read_text())["stages"]
    assert row["quantized"] and row["mode"] == "chat" and row["adapter"].endswith("adapter.pth")


def test_gsm8k_from_a_local_file(data, tokenizer, tmp_path):
    save_model(toy_model(tokenizer, 1), tokenizer, SFT)
    gsm8k = tmp_path / "gsm8k_test.jsonl"
    write_jsonl(gsm8k, [{"question": r["question"], "answer": r["answer"]} for r in math_rows(4)])
    lesson.main(["--checkpoint_path", str(runs_dir() / SFT), "--tasks", "gsm8k", "--gsm8k_path", str(gsm8k)] + FAST)
    (row,) = json.loads((runs_dir() / "eval" / "single" / "results.json").read_text())["stages"]
    assert list(row["results"]) == ["gsm8k"] and row["results"]["gsm8k"]["n"] == 3


def test_unknown_task(data):
    with pytest.raises(ValueError, match="unknown task 'mmlu'.*gsm8k, tinymath"):
        lesson.main(["--tasks", "tinymath,mmlu"])


def test_gsm8k_asked_for_but_not_on_disk(data, tokenizer):
    save_model(toy_model(tokenizer, 0), tokenizer, BASE)
    with pytest.raises(FileNotFoundError, match='make lesson-0 ARGS="--gsm8k download"'):
        lesson.main(["--tasks", "gsm8k"])
    assert not (runs_dir() / "eval").exists()  # refused before any model was loaded or file written


def test_missing_checkpoint_names_its_lesson(data):
    with pytest.raises(FileNotFoundError, match="make lesson-5"):
        lesson.main(["--checkpoint_path", str(runs_dir() / SFT), "--tasks", "tinymath"] + FAST)
    with pytest.raises(FileNotFoundError, match="make lesson-4"):
        lesson.main(FAST)  # nothing trained at all
