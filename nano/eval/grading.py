"""
Grading: read the number a model's answer ends with, compare it with the reference, and count how
often it is right. (Asking the model the questions is nano/eval/evaluate.py.)

Grading free text is the hard part. GSM8K's reference answers end in a line "#### 72"; a model may
write that, or "The answer is 72.", or "A: $72.00", or just stop after a calculation. So
`extract_answer` reads the marked answer first, then the usual final-answer phrases, then falls back
to the last number, and `is_correct` compares numbers (72 == 72.00 == "$72"), never strings. A wrong
answer's worked steps say why it is wrong (`mistake_kind`): a false step such as "19 + 6 = 26", or
true steps that computed the wrong thing.

Accuracy over n problems is a mean of 0/1 outcomes; its standard error sqrt(p(1-p)/n) says how far
it would move on another sample of problems (20 problems at p=0.5: +-11 points — small evals are noisy).

The same grader gives RL its reward (nano/align/rollout.py: math_rewards), so lessons 10 and 11
optimise exactly what lesson 12 measures. Run the tests: `make check-12` (or
`.venv/bin/python -m pytest -q tests/test_12_evaluate.py`).
"""

import ast
import math
import re
from decimal import Decimal, InvalidOperation
from typing import Sequence

from nano.data.tinymath import NUMBER, final_answer

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

