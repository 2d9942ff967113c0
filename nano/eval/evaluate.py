"""
Evaluation: ask the model math word problems, grade the number it ends with, and count how often it
is right. (How a number is read out of free text and graded is nano/eval/grading.py; how well a model
predicts held-out text — loss and bits per byte — is nano/eval/val_loss.py.)

Two ways to prompt (Cobbe et al. 2021 for GSM8K; Wei et al. 2022 for k-shot chain of thought):
  - chat models (SFT, DPO, RL) get the question as one user turn in the Gemma chat format (zero-shot),
  - base models get k worked examples as plain text, "Question: ...\\nAnswer: ...", and continue it.

An evaluation (`evaluate_model`) runs in five steps: choose the problems (and a base model's worked
examples), build the prompts, decide when an answer stops, generate the answers in batches, grade
each one. The result is the accuracy, its standard error, and every graded sample.

Run the tests: `make check-12` (or `.venv/bin/python -m pytest -q tests/test_12_evaluate.py`).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from nano.common.fileio import write_jsonl
from nano.common.paths import raw_dir
from nano.text.chat_format import STOP_TOKENS, pad_token_id, render_prompt
from nano.model.generate import generate_batch
from nano.eval.grading import MISTAKE_KINDS, accuracy_with_stderr, extract_answer, mistake_kind, numbers_equal, reference_answer

# ----------------------------------------------------------------------------------------------
# 1. Tasks: GSM8K and TinyMath, the same jsonl format
# ----------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """One word problem: the question, the worked answer ending in "#### N", and N normalized."""

    id: str
    question: str
    answer: str  # the worked solution, last line "#### N"
    reference: str  # N, normalized ("72")


GSM8K_HINT = (
    'run `make lesson-0 ARGS="--gsm8k download"` once (needs the network), '
    "or pass --gsm8k_path PATH to a copy of the official jsonl"
)
KNOWN_TASKS = ("gsm8k", "tinymath")


def task_path(name: str, split: str = "test") -> Path:
    """Where lesson 0 puts a task's split: data/raw/gsm8k_test.jsonl, data/raw/tinymath_test.jsonl."""
    check_task_name(name)
    return raw_dir() / f"{name}_{split}.jsonl"


def check_task_name(name: str) -> str:
    """`name` if it is a known task, else a ValueError that lists the known ones."""
    if name not in KNOWN_TASKS:
        raise ValueError(f"unknown task '{name}' — known tasks: {', '.join(KNOWN_TASKS)}")
    return name


def parse_tasks(tasks: str) -> list[str]:
    """'gsm8k,tinymath' -> ['gsm8k', 'tinymath'], checking every name (for the --tasks flag)."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--tasks is empty — known tasks: {', '.join(KNOWN_TASKS)}")
    return [check_task_name(t) for t in names]


def load_task(name: str, split: str = "test", path: str | Path | None = None, limit: int | None = None) -> list[Problem]:
    """Read a task's problems (the first `limit` of them), from `path` or from data/raw/.

    Both tasks share GSM8K's format, one json object a line: {"question": ..., "answer": "...\\n#### 72"}.
    """
    check_task_name(name)
    file = Path(path) if path is not None else task_path(name, split)
    if not file.is_file():
        if name == "gsm8k":
            raise FileNotFoundError(f"no GSM8K {split} set at {file} — {GSM8K_HINT}")
        raise FileNotFoundError(f"no {name} {split} set at {file} — run `make lesson-0` first")
    problems = []
    with open(file, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(problems) >= limit:
                break
            try:
                row = json.loads(line)
                question, answer = row["question"], row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{file}:{line_number} is not a problem line (expected json with 'question' and 'answer'): {e}"
                ) from None
            problem_id = str(row.get("id", f"{name}-{split}-{line_number - 1}"))
            problems.append(Problem(problem_id, question, answer, reference_answer(answer)))
    return problems


# ----------------------------------------------------------------------------------------------
# 2. Prompts
# ----------------------------------------------------------------------------------------------

# GSM8K's worked answers carry calculator annotations, "48/2 = <<48/2=24>>24"; they are noise to a
# reader and to a small model, so few-shot examples drop them ("48/2 = 24").
_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")


def clean_worked_answer(answer: str) -> str:
    """Drop GSM8K's <<calc=result>> annotations: "48/2 = <<48/2=24>>24" -> "48/2 = 24"."""
    return _CALCULATOR_RE.sub("", answer).strip()


def chat_user_message(question: str, instruction: str = "") -> str:
    """The user turn a chat model sees: the question, then a blank line and the instruction (if any).

    >>> chat_user_message("What is 2+3?"), chat_user_message("What is 2+3?", "Be brief.")
    ('What is 2+3?', 'What is 2+3?\\n\\nBe brief.')
    """
    return f"{question.strip()}\n\n{instruction}" if instruction else question.strip()


def build_fewshot_prompt(question: str, examples: Sequence[Problem | tuple[str, str]], k: int) -> str:
    """A k-shot plain-text prompt for a base model: k worked examples, then the question, open-ended.

    >>> print(build_fewshot_prompt("What is 2+3?", [("What is 1+1?", "1+1 = <<1+1=2>>2\\n#### 2")], k=1))
    Question: What is 1+1?
    Answer: 1+1 = 2
    #### 2
    <BLANKLINE>
    Question: What is 2+3?
    Answer:

    The prompt ends in "Answer:" with no space: byte-level BPE glues the space to the next word
    (" 5"), so the model writes it. k may not exceed the number of examples.
    """
    if k < 0 or k > len(examples):
        raise ValueError(f"asked for {k} examples but {len(examples)} are available")
    parts = []
    for example in examples[:k]:
        q, a = (example.question, example.answer) if isinstance(example, Problem) else example
        parts.append(f"Question: {q.strip()}\nAnswer: {clean_worked_answer(a)}\n\n")
    parts.append(f"Question: {question.strip()}\nAnswer:")
    return "".join(parts)


# evaluation stops a row whose last 64 tokens are one block repeated 3+ times (nano.model.generate.is_looping)
REPETITION_WINDOW = 64

# in few-shot mode a base model, done with its answer, starts the next "Question:" — cut it there
FEWSHOT_CUT = "Question:"


def cut_fewshot_continuation(text: str) -> str:
    """The model's answer alone: everything before the next "Question:" it starts writing."""
    return text.split(FEWSHOT_CUT, 1)[0]


# ----------------------------------------------------------------------------------------------
# 3. The evaluation, step by step
# ----------------------------------------------------------------------------------------------


def _special_id(tokenizer: Any, name: str) -> int | None:
    return getattr(tokenizer, "special_tokens", {}).get(name)


def build_prompts(
    tokenizer: Any,
    problems: Sequence[Problem],
    mode: str = "chat",
    num_fewshot: int = 0,
    fewshot_examples: Sequence[Problem] = (),
    instruction: str = "",
    max_prompt_tokens: int | None = None,
) -> list[list[int]]:
    """Token ids of each problem's prompt.

    chat:    render_prompt([{"role": "user", "content": question (+ instruction)}]) -> ends in
             "<start_of_turn>model\\n", the chat model writes its turn (zero-shot).
    fewshot: <bos> + the k-shot text. If the prompt would exceed `max_prompt_tokens` (the context
             minus the room for the answer), examples are dropped one at a time until it fits.
    """
    if mode == "chat":
        return [
            render_prompt([{"role": "user", "content": chat_user_message(p.question, instruction)}], tokenizer)
            for p in problems
        ]
    if mode != "fewshot":
        raise ValueError(f"unknown mode '{mode}' — use 'chat' (chat models) or 'fewshot' (base models)")
    bos = _special_id(tokenizer, "<bos>")
    prompts = []
    for problem in problems:
        k = num_fewshot
        while True:
            text = build_fewshot_prompt(problem.question, fewshot_examples, k)
            ids = ([bos] if bos is not None else []) + tokenizer.encode(text)
            if max_prompt_tokens is None or len(ids) <= max_prompt_tokens or k == 0:
                break
            k -= 1  # too long for the context: one example fewer
        prompts.append(ids)
    return prompts


def fewshot_pool(
    task: str, problems: list[Problem], num_fewshot: int, path: str | Path | None = None
) -> tuple[list[Problem], list[Problem]]:
    """(examples to show, problems to grade): examples from the task's train split when it exists,
    else the first `num_fewshot` test problems are shown and left out of grading (never both)."""
    if num_fewshot == 0:
        return [], problems
    train_file = task_path(task, "train")
    if path is None and train_file.is_file():
        return load_task(task, "train", limit=num_fewshot), problems
    return problems[:num_fewshot], problems[num_fewshot:]


def choose_problems(
    task: str | Sequence[Problem],
    limit: int | None,
    mode: str,
    num_fewshot: int,
    task_file: str | Path | None = None,
    fewshot_examples: Sequence[Problem] | None = None,
) -> tuple[str, list[Problem], list[Problem]]:
    """Step 1: (the task's name, the problems to grade, the worked examples a base model is shown first).

    `task` is a task name (read with load_task, from `task_file` if given) or a list of Problems ("custom").
    In few-shot mode without `fewshot_examples`, the examples come from `fewshot_pool`.
    """
    name = task if isinstance(task, str) else "custom"
    if isinstance(task, str):  # (+ num_fewshot: the first ones may become the examples, see fewshot_pool)
        problems = load_task(task, path=task_file, limit=None if limit is None else limit + num_fewshot)
    else:
        problems = list(task)
    if mode == "fewshot" and fewshot_examples is None and isinstance(task, str):
        fewshot_examples, problems = fewshot_pool(task, problems, num_fewshot, task_file)
    if limit is not None:
        problems = problems[:limit]
    return name, problems, list(fewshot_examples or [])


def prompt_budget(model: torch.nn.Module, max_new_tokens: int) -> int | None:
    """Step 2: the longest prompt that leaves room in the context window for the answer (None: no limit).

    The room is at most half the window: max_new_tokens is a cap, most answers are far shorter, and
    the examples matter more.
    """
    context_len = getattr(getattr(model, "cfg", None), "context_len", None)
    return None if context_len is None else context_len - min(max_new_tokens, context_len // 2)


def stop_rule(tokenizer: Any, mode: str) -> tuple[list[int], Callable[[list[int]], bool] | None]:
    """Step 3: (stop tokens, should_stop) — stop at the end of the model's turn (chat), or when a base
    model starts the next question (few-shot)."""
    stop_names = STOP_TOKENS if mode == "chat" else ("<eos>", "<|endoftext|>")
    stop_tokens = [i for i in (_special_id(tokenizer, n) for n in stop_names) if i is not None]
    should_stop: Callable[[list[int]], bool] | None = None
    if mode == "fewshot":
        should_stop = lambda new_ids: FEWSHOT_CUT in tokenizer.decode(new_ids[-16:])  # noqa: E731
    return stop_tokens, should_stop


def generate_answers(model: torch.nn.Module, prompts: list[list[int]], batch_size: int, progress: str = "",
                     **sampling: Any) -> list[list[int]]:
    """Step 4: each prompt's new token ids, in the prompts' order. `sampling`: generate_batch's keywords.

    Prompts are sorted by length and generated `batch_size` at a time, left-padded (generate_batch),
    so the padding wasted per batch stays small; longest first, so an out-of-memory error shows at
    once. `progress`: the label of a progress bar ("" = none).
    """
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=progress, unit="batch")
    for batch in batches:  # (generate_batch runs the model in eval mode)
        new_tokens = generate_batch(model, [prompts[i] for i in batch], **sampling)
        for i, ids in zip(batch, new_tokens):
            outputs[i] = ids
    return outputs


def graded_row(task: str, problem: Problem, prompt: str, answer: str) -> dict[str, Any]:
    """Step 5: one answer, graded (nano/eval/grading.py): what the model wrote, the number read out of
    it, the reference, the verdict and, when wrong, the kind of mistake."""
    extracted = extract_answer(answer)
    correct = extracted is not None and numbers_equal(extracted, problem.reference)
    return {
        "task": task,
        "id": problem.id,
        "prompt": prompt,
        "output": answer,
        "extracted": extracted,
        "reference": problem.reference,
        "correct": correct,
        "mistake": mistake_kind(answer, problem.reference),
    }


def summary(task: str, mode: str, num_fewshot: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The graded rows -> {"accuracy", "stderr", "n", "correct", "mistakes", "rows", ...}."""
    accuracy, stderr = accuracy_with_stderr([r["correct"] for r in rows])
    return {
        "task": task,
        "mode": mode,
        "num_fewshot": num_fewshot if mode == "fewshot" else 0,
        "n": len(rows),
        "correct": sum(r["correct"] for r in rows),
        "accuracy": accuracy,
        "stderr": stderr,
        "mistakes": {kind: sum(r["mistake"] == kind for r in rows) for kind in MISTAKE_KINDS},
        "rows": rows,
    }


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    task: str | Sequence[Problem],
    limit: int | None = None,
    mode: str = "chat",
    num_fewshot: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    out_jsonl: str | Path | None = None,
    task_file: str | Path | None = None,
    fewshot_examples: Sequence[Problem] | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    instruction: str = "",
    repetition_stop: int = REPETITION_WINDOW,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate an answer to each problem, grade it, and return {"accuracy", "stderr", "n", "rows", ...}.

    `task` is a task name ("gsm8k", "tinymath"; `task_file` overrides its file) or a list of Problems.
    Greedy by default (temperature 0): the score is then a property of the checkpoint, not of a seed.
    "rows" holds each sample's prompt, output, extracted answer, reference and verdict (a dict each);
    they also go to `out_jsonl` (a json object a line) when given, to read afterwards.

    mode "chat": zero-shot, the question as the user turn (+ `instruction`), stop at <end_of_turn>/<eos>.
    mode "fewshot": `num_fewshot` worked examples first (see `fewshot_pool`), stop at <eos> or when
    the model starts the next "Question:". A row that loops (`repetition_stop`, see
    nano.model.generate.is_looping) stops early: a loop never reaches a better answer.
    """
    # 1. the problems, and the worked examples a base model is shown first
    name, problems, examples = choose_problems(task, limit, mode, num_fewshot, task_file, fewshot_examples)
    # 2. prompts, leaving room in the context window for the answer
    prompts = build_prompts(tokenizer, problems, mode, num_fewshot if mode == "fewshot" else 0, examples, instruction,
                            max_prompt_tokens=prompt_budget(model, max_new_tokens))
    # 3. when an answer stops
    stop_tokens, should_stop = stop_rule(tokenizer, mode)
    # 4. generate in batches of similar length
    outputs = generate_answers(model, prompts, batch_size, f"{name} ({mode})" if progress else "",
                               max_new_tokens=max_new_tokens, temperature=temperature, stop_tokens=stop_tokens, seed=seed,
                               repetition_stop=repetition_stop, should_stop=should_stop, pad_id=pad_token_id(tokenizer))
    # 5. grade: the answer alone (no stop token; in few-shot mode, not the next question it began)
    rows = []
    for problem, prompt_ids, output_ids in zip(problems, prompts, outputs):
        text = tokenizer.decode([t for t in output_ids if t not in stop_tokens])
        if mode == "fewshot":
            text = cut_fewshot_continuation(text)
        rows.append(graded_row(name, problem, tokenizer.decode(prompt_ids), text))
    result = summary(name, mode, num_fewshot, rows)
    if out_jsonl is not None:
        write_jsonl(out_jsonl, rows)
    return result
