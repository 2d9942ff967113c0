"""
TinyMath: one- and two-step word problems with a worked answer that ends, like GSM8K's, in "#### N".

GSM8K (Cobbe et al., 2021) is far beyond a model of a few million parameters, so the course brings
its own: problems about the children of the story world (nano/data/world.py) with small numbers, every
computation written out ("So he has 12 + 10 = 22."), and the final answer on a last line "#### 22"
that a program can check. Each problem also records its operations, operands and result, so a test
can recompute every answer.

This module owns the three things that must agree about that format:
  - the problems: `generate_problem` renders one entry of the table TEMPLATES; `tinymath_problems`
    makes a split of distinct ones (lesson 0), `rl_prompts` turns them into RL prompts;
  - the answer line: `answer_line` writes "#### N", `final_answer` reads it -- the one parser, used
    by the grader (nano/eval/grading.py) too;
  - the arithmetic drills lesson 2 mixes into pretraining (`arithmetic_drills`): every step a
    solution can write, as plain text.

    >>> problem = tinymath_problems(0, 1, "test")[0]
    >>> print(problem["question"])
    Sophie has 3 apples. Her friend Jenny gives her 13 more. Then she gives 10 to Jenny. How many apples does Sophie have now?
    >>> print(problem["answer"])
    Sophie starts with 3 apples and gets 13 more, so she has 3 + 13 = 16.
    Then she gives away 10, so she has 16 - 10 = 6.
    #### 6
    >>> final_answer(problem["answer"]), problem["operations"], problem["operands"]
    ('6', ['+', '-'], [[3, 13], [16, 10]])

Run `python lessons/00_data.py` to write tinymath_{train,test}.jsonl; tests: tests/test_00_data.py.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from nano.data.world import PLACES, character, pick, rng_for

# ---------------------------------------------------------------------------------------------
# 1. the answer line: "#### N", written by every solution, read by lesson 0 and by the grader
# ---------------------------------------------------------------------------------------------

ANSWER_MARK = "####"  # GSM8K's mark before the final answer

# One number as people write it: "-3", "1,234", "$1,234.50", "−7" (unicode minus).
#   - a minus sign counts only when it does not follow a letter/digit: in "5-3" the 3 is positive;
#   - thousands separators must come in groups of three: "1,234" is one number, "3,4" is two;
#   - a currency sign may sit between the sign and the digits: "-$5";
#   - a sentence's full stop is not a decimal point: "18." reads as 18.
# nano/eval/grading.py reads the other ways a model states a number with the same pattern.
NUMBER = r"""
    (?: (?<![\w.]) [-−] \s? )?                      # optional minus, not the one in "5-3"
    [$€£¥]? \s?                                     # optional currency sign
    (?<![\d.])                                      # never start in the middle of a number
    (?: \d{1,3} (?: ,\d{3} )+ (?!\d) | \d+ )        # 1,234,567  or  1234567
    (?: \.\d+ )?                                    # .50
    """
_MARKED_ANSWER = re.compile(re.escape(ANSWER_MARK) + r"\s* (?P<number>" + NUMBER + ")", re.VERBOSE)


def answer_line(result: int | str) -> str:
    """The last line of a worked answer: answer_line(27) -> '#### 27'."""
    return f"{ANSWER_MARK} {result}"


def final_answer(text: str) -> str | None:
    """The number after the first "####" in `text`, without commas, spaces or currency signs; else None.

    The first mark counts: a model that goes on after a finished answer usually babbles. Lesson 0
    reads GSM8K's reference answers with it, and nano/eval/grading.py a model's output.

    >>> final_answer("So 3 + 4 = 7.\\n#### 7"), final_answer("#### 1,200"), final_answer("#### -$5\\n#### 6")
    ('7', '1200', '-5')
    >>> final_answer("no answer here") is None
    True
    """
    marked = _MARKED_ANSWER.search(text)
    if marked is None:
        return None
    number = marked.group("number").replace("−", "-").replace(",", "").replace(" ", "")
    return re.sub(r"[$€£¥]", "", number)


# ---------------------------------------------------------------------------------------------
# 2. the words and the arithmetic of a problem
# ---------------------------------------------------------------------------------------------

MATH_ITEMS = (
    "apples marbles stickers crayons cookies flowers shells books balloons blocks cars stars "
    "buttons candies rocks leaves beads pencils eggs carrots"
).split()
MATH_ANIMALS = "ducks birds frogs rabbits fish sheep cows ants".split()
_SINGULAR = {"candies": "candy", "leaves": "leaf", "fish": "fish", "sheep": "sheep"}
OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
# the words a template may draw besides the cast: "There are 4 ducks at the pond."
WORDS = {"place": PLACES, "animals": MATH_ANIMALS}


def _count(n: int, plural: str) -> str:
    """'3 apples', but '1 apple' (and '1 leaf', '1 candy')."""
    return f"{n} {plural}" if n != 1 else f"1 {_SINGULAR.get(plural, plural[:-1])}"


def _step(a: int, op: str, b: int) -> tuple[str, int]:
    """'3 + 4 = 7' and 7: every computation in a solution is written out like this."""
    r = OPS[op](a, b)
    return f"{a} {op} {b} = {r}", r


# ---------------------------------------------------------------------------------------------
# 3. the templates: a table of problems, and one function that renders any of them
# ---------------------------------------------------------------------------------------------


NUMBER_NAMES = "abcdef"  # how the templates call the first number, the second, ...


@dataclass(frozen=True)
class Template:
    """One kind of word problem.

    first: the range of the first number `a`. steps: (operation, low, high) for each next number,
    `b` then `c`; each step starts from the result of the one before ("a + b", then "(a + b) - c").
    A negative `high` is counted from that running total: -1 means "at most 1 less than what there
    is", so nothing is taken away that is not there and no answer is negative.

    The texts are str.format templates. Names: {n} {he} {He} {him} (the child), {o} (another child),
    {giver} / {Giver} (who gives things), {items}; numbers: {a} {b} {c} ..., with their items "{a_items}"
    ("3 apples", "1 apple"); each step written out: {step1} {step2} ... ("3 + 4 = 7"); and any WORDS
    drawn by `words` (before the numbers) or `words_after` (after them).
    """

    first: tuple[int, int]
    steps: tuple[tuple[str, int, int], ...]
    question: str
    solution: tuple[str, ...]  # the worked lines; answer_line(result) follows them
    words: tuple[str, ...] = ()
    # subtle: one template draws its place after the numbers. That is the order the first version of
    # this generator drew them in, and changing it would change every problem that follows in the stream.
    words_after: tuple[str, ...] = ()


TEMPLATES = (
    # one step: +, +, -, -, *
    Template((1, 20), (("+", 1, 20),),
             "{n} has {a_items}. {Giver} gives {him} {b} more. How many {items} does {n} have now?",
             ("{n} starts with {a_items} and gets {b} more.", "So {he} has {step1} {items}.")),
    Template((2, 20), (("+", 2, 20),),
             "There are {a} {animals} at the {place}. Then {b} more {animals} come. How many {animals} are at the {place} now?",
             ("There are {a} {animals} and {b} more come.", "So there are {step1} {animals}."),
             words=("place", "animals")),
    Template((3, 20), (("-", 1, -1),),
             "{n} has {a_items}. {He} gives {b} of them to {o}. How many {items} does {n} have left?",
             ("{n} has {a_items} and gives away {b}.", "So {he} has {step1} left.")),
    Template((3, 20), (("-", 1, -1),),
             "{n} has {a_items} and {o} has {b_items}. How many more {items} does {n} have than {o}?",
             ("{n} has {a_items} and {o} has {b}.", "The difference is {step1}.")),
    Template((2, 6), (("*", 2, 10),),
             "{n} has {a} bags. Each bag has {b_items}. How many {items} does {n} have in all?",
             ("There are {a} bags with {b_items} in each bag.", "So {n} has {step1} {items}.")),
    # two steps: (+, -), (-, +), (*, +), (*, -), (-, -)
    Template((1, 20), (("+", 1, 20), ("-", 1, -1)),
             "{n} has {a_items}. {Giver} gives {him} {b} more. Then {he} gives {c} to {o}. How many {items} does {n} have now?",
             ("{n} starts with {a_items} and gets {b} more, so {he} has {step1}.", "Then {he} gives away {c}, so {he} has {step2}.")),
    Template((3, 20), (("-", 1, -1), ("+", 1, 20)),
             "{n} had {a_items}. {He} lost {b} of them at the {place}. Then {giver} gave {him} {c} more. "
             "How many {items} does {n} have now?",
             ("{n} had {a_items} and lost {b}, so {he} had {step1} left.", "Then {he} got {c} more, so {he} has {step2}."),
             words_after=("place",)),
    Template((2, 6), (("*", 2, 10), ("+", 1, 15)),
             "{n} has {a} boxes with {b_items} in each box. {He} also has {c} more {items}. How many {items} does {n} have in all?",
             ("In the boxes there are {step1} {items}.", "With the {c} more, {n} has {step2} {items}.")),
    Template((2, 6), (("*", 2, 10), ("-", 1, -1)),
             "{n} has {a} bags with {b_items} in each bag. {He} gives {c_items} to {o}. How many {items} does {n} have left?",
             ("In the bags there are {step1} {items}.", "After giving {c} away, {n} has {step2} left.")),
    Template((5, 20), (("-", 1, -2), ("-", 1, -1)),  # b leaves at least 2, so c has room
             "{n} had {a_items}. {He} used {b} in the morning and {c} in the afternoon. How many {items} are left?",
             ("After the morning, {n} had {step1} left.", "After the afternoon, {he} had {step2} left.")),
)


def render(template: Template, rng: random.Random, names: dict[str, str]) -> dict:
    """Draw a template's words and numbers from `rng` and write out its problem.

    `names` fills {n}, {he}, {He}, {him}, {o}, {giver}, {Giver} and {items}. The draws, in order: the
    `words`, a, then each step's number, then the `words_after`.
    """
    fill: dict = dict(names)
    for word in template.words:
        fill[word] = pick(rng, WORDS[word])
    total = fill[NUMBER_NAMES[0]] = rng.randint(*template.first)
    operations, operands = [], []
    for number, (op, low, high) in enumerate(template.steps, start=1):
        x = rng.randint(low, high if high > 0 else total + high)
        written, result = _step(total, op, x)
        operations.append(op)
        operands.append([total, x])
        fill[NUMBER_NAMES[number]] = x  # b, then c, ...
        fill[f"step{number}"] = written
        total = result
    for word in template.words_after:
        fill[word] = pick(rng, WORDS[word])
    for name in NUMBER_NAMES[: len(operands) + 1]:
        fill[f"{name}_items"] = _count(fill[name], fill["items"])
    return {
        "question": template.question.format(**fill),
        "answer": "\n".join([line.format(**fill) for line in template.solution] + [answer_line(total)]),
        "difficulty": len(operations),
        "operations": operations,
        "operands": operands,
        "result": total,
    }


def generate_problem(rng: random.Random) -> dict:
    """One TinyMath problem: question, worked answer, difficulty, operations, operands, result.

    The cast first (a child, another child, the items, who gives them), then one template of TEMPLATES.
    """
    kid = character(rng, child_only=True)
    other = character(rng, avoid=kid.name, child_only=True)
    items = pick(rng, MATH_ITEMS)
    giver = pick(rng, (f"{kid.his} mom", f"{kid.his} dad", "Grandma", f"{kid.his} friend {other.name}"))
    names = {"n": kid.name, "he": kid.he, "He": kid.He, "him": kid.him, "o": other.name, "items": items,
             "giver": giver, "Giver": giver[0].upper() + giver[1:]}
    return render(TEMPLATES[rng.randrange(len(TEMPLATES))], rng, names)


# ---------------------------------------------------------------------------------------------
# 4. what lesson 0 writes and lesson 2 reads
# ---------------------------------------------------------------------------------------------


def tinymath_problems(seed: int, n: int, split: str, exclude: Iterable[str] = ()) -> list[dict]:
    """`n` distinct TinyMath problems from the stream (seed, "tinymath_" + split), none whose question is in `exclude`.

    Each: {"id", "question", "answer" (worked solution, last line '#### N'), "difficulty" (1 or 2 steps),
    "operations" (['+', '-']), "operands" ([[5, 3], [8, 2]]), "result" (6)}.
    """
    rng = rng_for(seed, f"tinymath_{split}")
    seen = set(exclude)
    out: list[dict] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise RuntimeError(f"could not find {n} new TinyMath problems for split {split!r}; ask for fewer")
        p = generate_problem(rng)
        if p["question"] in seen:
            continue
        seen.add(p["question"])
        out.append({"id": f"tinymath-{split}-{len(out):05d}", **p})
    return out


def rl_prompts(problems: Iterable[dict]) -> list[dict]:
    """RL prompts from TinyMath problems: {"prompt": the question, "answer": "7", "source": "tinymath"}."""
    return [{"prompt": p["question"], "answer": str(p["result"]), "source": "tinymath", "id": p["id"],
             "difficulty": p["difficulty"]} for p in problems]


def tinymath_conversation(problem: dict) -> list[dict]:
    """A TinyMath problem as a chat: the user asks the question, the assistant gives the worked answer."""
    return [
        {"role": "user", "content": problem["question"]},
        {"role": "assistant", "content": problem["answer"]},
    ]


def arithmetic_drills(repeats: int, seed: int = 0, lines_per_document: int = 20) -> list[str]:
    """Every sum, difference and product a TinyMath solution can write, as drill documents.

    The facts: a + b for a <= 60, b <= 20; a - b for 0 < b < a <= 60; a * b for 2..6 times 2..10
    (about 3,000 lines such as "So 17 + 5 = 22."). Each fact appears `repeats` times, shuffled, cut into
    documents of `lines_per_document` lines. Why: in the word problems each fact shows up a handful
    of times, too rarely for a tiny model to learn it in a few hundred steps; a times table in the
    pretraining mix is the cheapest way to teach it (children drill it too). None of this text is a
    TinyMath question, so the held-out test stays unseen.

    Why "So " in front: with GPT-2's pattern a number keeps its leading space, so " 17" is one token
    but "17" at the start of a line is two ("1", "7"). In a solution every operand follows a space
    ("so he has 17 + 5 = 22"); a bare "17 + 5 = 22" line would drill a different spelling of 17.

    >>> drills = arithmetic_drills(repeats=1, lines_per_document=2)
    >>> len(drills), drills[0]
    (1508, 'So 16 + 4 = 20.\\nSo 31 - 13 = 18.')
    """
    facts = [f"So {a} + {b} = {a + b}." for a in range(1, 61) for b in range(1, 21)]
    facts += [f"So {a} - {b} = {a - b}." for a in range(2, 61) for b in range(1, a)]
    facts += [f"So {a} * {b} = {a * b}." for a in range(2, 7) for b in range(2, 11)]
    rng = np.random.default_rng(seed)
    lines = [facts[i] for _ in range(repeats) for i in rng.permutation(len(facts))]
    return ["\n".join(lines[i : i + lines_per_document]) for i in range(0, len(lines), lines_per_document)]
