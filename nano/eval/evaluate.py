"""
Evaluation: ask the model math word problems, read the number it ends with, and count how often it
is right. (How well a model predicts held-out text — loss and bits per byte — is nano/eval/val_loss.py.)

Grading free text is the hard part. GSM8K's reference answers end in a line "#### 72"; a model may
write that, or "The answer is 72.", or "A: $72.00", or just stop after a calculation. So
`extract_answer` reads the marked answer first, then the usual final-answer phrases, then falls back
to the last number, and `is_correct` compares numbers (72 == 72.00 == "$72"), never strings.

Two ways to prompt (Cobbe et al. 2021 for GSM8K; Wei et al. 2022 for k-shot chain of thought):
  - chat models (SFT, DPO, RL) get the question as one user turn in the Gemma chat format (zero-shot),
  - base models get k worked examples as plain text, "Question: ...\\nAnswer: ...", and continue it.

Accuracy over n problems is a mean of 0/1 outcomes; its standard error sqrt(p(1-p)/n) says how far
it would move on another sample of problems (20 problems at p=0.5: +-11 points — small evals are noisy).

Run the tests: `make check-12` (or `.venv/bin/python -m pytest -q tests/test_12_evaluate.py`).
"""

import ast
import json
import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from nano.common.fileio import write_jsonl
from nano.common.paths import raw_dir
from nano.data.tinymath import NUMBER, final_answer
from nano.text.chat_format import STOP_TOKENS, render_prompt
from nano.model.generate import generate_batch

# ----------------------------------------------------------------------------------------------
# 1. Reading numbers out of text
# ----------------------------------------------------------------------------------------------

# One number as people write it ("-3", "1,234", "$1,234.50", "−7"): the pattern nano/data/tinymath.py
# reads the "#### N" line with (see the rules there), so every number here is read the same way.
NUMBER_RE = re.compile(NUMBER, re.VERBOSE)

# The usual ways a model states its final answer, weaker than "####" but stronger than "some number".
FINAL_ANSWER_RE = re.compile(
    r"""
    (?:
        answer \s* (?: is | was | = | : ) \s* :? \s*     # "The answer is 18", "Final answer: 18"
      | (?: ^ | \n ) \s* A \s* : \s*                     # "A: 18" at the start of a line
      | \\boxed\{ \s*                                    # "\boxed{18}"
      | \*\* \s* (?= [-−$€£¥]? \s? \d [\d,.]* \s* \*\*)  # "**18**" (bold number, nothing else)
    )
    (?P<number>""" + NUMBER + ")",
    re.VERBOSE | re.IGNORECASE,
)


def normalize_number(text: str) -> str | None:
    """The canonical string of one written number, or None if `text` is not a number.

    Commas, currency signs, spaces, a percent sign and trailing zeros after the point go away:

    >>> normalize_number("$1,234.50"), normalize_number("18.00"), normalize_number("-7"), normalize_number("12%")
    ('1234.5', '18', '-7', '12')
    """
    cleaned = text.strip().replace("−", "-").replace(",", "").replace(" ", "").rstrip("%").rstrip(".")
    cleaned = re.sub(r"[$€£¥]", "", cleaned)
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))  # "18.00" -> "18", "-0" -> "0"
    # subtle: Decimal("1234.50").normalize() is "1234.5", but normalize() of big integers gives
    # "1E+3"; the integer case is handled above, and format "f" never uses an exponent
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final numeric answer in a model's output, normalized; None when there is no number at all.

    Three tries, strongest first:
      1. the first "#### N" (GSM8K's mark; anything after a finished answer is usually babble),
      2. the last final-answer phrase: "The answer is N", "answer: N", "A: N", "\\boxed{N}", "**N**"
         (the last one, because models restate and correct themselves),
      3. the last number anywhere in the text.

    >>> extract_answer("16 - 3 - 4 = 9 eggs.\\n9 * 2 = $18\\n#### 18")
    '18'
    >>> extract_answer("So she makes $1,234.50 a day. The answer is $1,234.50.")
    '1234.5'
    >>> extract_answer("She has 3 apples and buys 4 more, so 7 in all.")
    '7'
    >>> extract_answer("I don't know") is None
    True
    """
    marked = final_answer(text)  # "#### 18": GSM8K's (and TinyMath's) own answer mark, the strongest signal
    if marked is not None:
        return normalize_number(marked)
    phrases = list(FINAL_ANSWER_RE.finditer(text))
    if phrases:
        return normalize_number(phrases[-1].group("number"))
    numbers = NUMBER_RE.findall(text)
    if numbers:
        return normalize_number(numbers[-1])
    return None


def reference_answer(reference: str | int | float) -> str:
    """The normalized number a reference stands for: a GSM8K answer field ("...\\n#### 72"), or a number.

    >>> reference_answer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\\n#### 72"), reference_answer(72.0)
    ('72', '72')
    """
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        number = normalize_number(repr(reference))
    elif "####" in reference:
        marked = final_answer(reference)
        number = normalize_number(marked) if marked is not None else None
    else:
        number = normalize_number(reference)
    if number is None:
        raise ValueError(f"the reference {reference!r} holds no number to grade against")
    return number


# numbers this close count as equal: exact for integers, forgiving for 0.1 + 0.2 style float noise
REL_TOLERANCE = 1e-6
ABS_TOLERANCE = 1e-9


def numbers_equal(a: str, b: str) -> bool:
    """Compare two normalized numbers with a small tolerance: "0.30000000000000004" equals "0.3"."""
    return math.isclose(float(a), float(b), rel_tol=REL_TOLERANCE, abs_tol=ABS_TOLERANCE)


def is_correct(completion: str, reference: str | int | float) -> bool:
    """Does the model's `completion` end in the reference's number?

    >>> is_correct("9 * 2 = 18 dollars.\\n#### 18", "...\\n#### 18"), is_correct("The answer is $18.00", 18)
    (True, True)
    >>> is_correct("#### 17", "18"), is_correct("no idea", "18")
    (False, False)
    """
    predicted = extract_answer(completion)
    if predicted is None:
        return False
    return numbers_equal(predicted, reference_answer(reference))


# A worked step as the solutions write it: "3 * 4 = 12", "12 - 2 + 5 = 15" (whole numbers, + - * /)
WRITTEN_STEP = re.compile(r"(\d+(?:\s*[-+*/]\s*\d+)+)\s*=\s*(\d+)")
_STEP_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
             ast.Div: lambda a, b: a / b if b else math.nan}


def arithmetic_value(expression: str) -> float:
    """'12 - 2 + 5' -> 15, with the usual precedence; only numbers and + - * / (no eval())."""
    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant):
            return node.value
        return _STEP_OPS[type(node.op)](value(node.left), value(node.right))
    return value(ast.parse(expression, mode="eval").body)


MISTAKE_KINDS = ("arithmetic slip", "wrong numbers or steps", "no answer")


def mistake_kind(completion: str, reference: str | int | float) -> str:
    """Why an answer is wrong, read off its worked steps; "right" when it is not wrong.

    "no answer": no number to grade; "arithmetic slip": some written step such as "19 + 6 = 26" is
    false; "wrong numbers or steps": every written step is true, so the model computed the wrong
    thing (misread a number, chose the wrong operation, stopped a step early).

    >>> mistake_kind("So he has 19 + 6 = 26.\\n#### 26", 25), mistake_kind("So he has 19 + 5 = 24.\\n#### 24", 25)
    ('arithmetic slip', 'wrong numbers or steps')
    """
    if is_correct(completion, reference):
        return "right"
    if extract_answer(completion) is None:
        return "no answer"
    for expression, result in WRITTEN_STEP.findall(completion):
        if not math.isclose(arithmetic_value(expression), int(result)):
            return "arithmetic slip"
    return "wrong numbers or steps"


# ----------------------------------------------------------------------------------------------
# 2. Accuracy and its standard error
# ----------------------------------------------------------------------------------------------


def accuracy_with_stderr(correct: Sequence[bool]) -> tuple[float, float]:
    """Accuracy p and its standard error sqrt(p(1-p)/n) (the binomial one, divided by n, not n-1).

    Each problem is a coin flip that lands "right" with probability p; the mean of n flips varies
    by sqrt(p(1-p)/n) from one sample of problems to the next. With no problems both are undefined: nan.

    >>> accuracy_with_stderr([True, False, True, True])   # p = 0.75, sqrt(0.75 * 0.25 / 4)
    (0.75, 0.21650635094610965)
    """
    n = len(correct)
    if n == 0:
        return float("nan"), float("nan")
    p = sum(bool(c) for c in correct) / n
    return p, math.sqrt(p * (1.0 - p) / n)


# ----------------------------------------------------------------------------------------------
# 3. Tasks: GSM8K and TinyMath, the same jsonl format
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
# 4. Prompts
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
# 5. The evaluation loop
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
    Prompts are sorted by length and generated `batch_size` at a time, left-padded (generate_batch),
    so the padding wasted per batch stays small. "rows" holds each sample's prompt, output, extracted
    answer, reference and verdict (a dict each); they also go to `out_jsonl` (a json object a line)
    when given, to read afterwards.

    mode "chat": zero-shot, the question as the user turn (+ `instruction`), stop at <end_of_turn>/<eos>.
    mode "fewshot": `num_fewshot` worked examples first (see `fewshot_pool`), stop at <eos> or when
    the model starts the next "Question:". A row that loops (`repetition_stop`, see
    nano.model.generate.is_looping) stops early: a loop never reaches a better answer.
    """
    # 1. the problems, and the worked examples a base model is shown first
    name = task if isinstance(task, str) else "custom"
    if isinstance(task, str):  # (+ num_fewshot: the first ones may become the examples, see fewshot_pool)
        problems = load_task(task, path=task_file, limit=None if limit is None else limit + num_fewshot)
    else:
        problems = list(task)
    if mode == "fewshot" and fewshot_examples is None and isinstance(task, str):
        fewshot_examples, problems = fewshot_pool(task, problems, num_fewshot, task_file)
    if limit is not None:
        problems = problems[:limit]
    examples = list(fewshot_examples or [])

    # 2. prompts, leaving room in the context window for the answer (at most half the window:
    #    max_new_tokens is a cap, most answers are far shorter, and the examples matter more)
    context_len = getattr(getattr(model, "cfg", None), "context_len", None)
    max_prompt = None if context_len is None else context_len - min(max_new_tokens, context_len // 2)
    prompts = build_prompts(
        tokenizer, problems, mode, num_fewshot if mode == "fewshot" else 0, examples, instruction, max_prompt_tokens=max_prompt
    )

    # 3. stop at the end of the model's turn (chat), or when a base model starts the next question
    stop_names = STOP_TOKENS if mode == "chat" else ("<eos>", "<|endoftext|>")
    stop_tokens = [i for i in (_special_id(tokenizer, n) for n in stop_names) if i is not None]
    should_stop: Callable[[list[int]], bool] | None = None
    if mode == "fewshot":
        should_stop = lambda new_ids: FEWSHOT_CUT in tokenizer.decode(new_ids[-16:])  # noqa: E731

    # 4. generate in batches of similar length (longest first: an out-of-memory error shows at once)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"{name} ({mode})", unit="batch")
    for batch in batches:  # (generate_batch runs the model in eval mode)
        new_tokens = generate_batch(
            model,
            [prompts[i] for i in batch],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            stop_tokens=stop_tokens,
            seed=seed,
            repetition_stop=repetition_stop,
            should_stop=should_stop,
            pad_id=_special_id(tokenizer, "<pad>") or 0,
        )
        for i, ids in zip(batch, new_tokens):
            outputs[i] = ids

    # 5. grade
    rows = []
    for problem, prompt_ids, output_ids in zip(problems, prompts, outputs):
        text = tokenizer.decode([t for t in output_ids if t not in stop_tokens])
        if mode == "fewshot":
            text = cut_fewshot_continuation(text)
        extracted = extract_answer(text)
        correct = extracted is not None and numbers_equal(extracted, problem.reference)
        rows.append(
            {
                "task": name,
                "id": problem.id,
                "prompt": tokenizer.decode(prompt_ids),
                "output": text,
                "extracted": extracted,
                "reference": problem.reference,
                "correct": correct,
                "mistake": mistake_kind(text, problem.reference),
            }
        )
    accuracy, stderr = accuracy_with_stderr([r["correct"] for r in rows])
    if out_jsonl is not None:
        write_jsonl(out_jsonl, rows)
    return {
        "task": name,
        "mode": mode,
        "num_fewshot": num_fewshot if mode == "fewshot" else 0,
        "n": len(rows),
        "correct": sum(r["correct"] for r in rows),
        "accuracy": accuracy,
        "stderr": stderr,
        "mistakes": {kind: sum(r["mistake"] == kind for r in rows) for kind in MISTAKE_KINDS},
        "rows": rows,
    }
