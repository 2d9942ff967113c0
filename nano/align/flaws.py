"""
Flaw checkers: small programs that say whether an answer shows one of the four flaws lesson 0 puts
in the rejected side of its preference pairs.

DPO (lesson 9) learns from pairs "good answer vs the same answer with a flaw". Whether it worked is
not whether it ranks the pairs right, but whether the model's OWN answers now show the flaws less
often. A checker per flaw, each a few lines that a reader can verify by eye:

    wrong_number   a math answer whose final number is not the right one (graded like lesson 12)
    missing_word   a "story with the words a, b and c" that leaves one of them out
    broken_off     a story that stops in the middle of a sentence
    repetition     a story that says the same sentence more than once

The same checkers can also LABEL the model's own answers, which turns them into on-policy pairs
(`own_pairs`, lesson 9's `--pairs own`): a clean answer the model wrote against a flawed one it wrote.

    >>> find_flaws("Once upon a time, Sam had a red", {"kind": "story"})
    ['broken_off']

Tests: `.venv/bin/python -m pytest -q tests/test_09_dpo.py -k flaw`.
"""

import re
from typing import Any

from nano.data.synthetic import FLAWS  # the four flaws lesson 0 writes into the rejected answers
from nano.text.chat_format import render_prompt
from nano.eval.grading import accuracy_with_stderr, is_correct
from nano.align.rollout import sample_responses

# a sentence ends at . ! ? (maybe followed by a closing quote), before whitespace and a new sentence
_SENTENCE_END = re.compile(r'(?<=[.!?])["\']?\s+')
# the last characters of a finished text: a full stop, ! or ?, maybe inside a closing quote
_FINISHED = re.compile(r'[.!?]["\']?\s*$')
# a repeated sentence must be a real one, not "Yes!" said twice in a dialogue
MIN_REPEATED_WORDS = 4


def uses_word(text: str, word: str) -> bool:
    """Does `text` use `word` as a whole word (any case, plural -s / -es allowed)?

    >>> uses_word("Lily has two Balls.", "ball"), uses_word("a ballet", "ball")
    (True, False)
    """
    return re.search(rf"\b{re.escape(word)}(?:s|es)?\b", text, flags=re.IGNORECASE) is not None


def sentences(text: str) -> list[str]:
    """'Hi there. Go! "Yes," she said.' -> ['Hi there.', 'Go!', '"Yes," she said.']"""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def has_wrong_number(text: str, answer: str) -> bool:
    """The answer's final number (nano/eval/grading.py: extract_answer) is not `answer`, or there is none."""
    return not is_correct(text, answer)


def missing_words(text: str, required: list[str]) -> list[str]:
    """The required words the text does not use: ("a cat and a hat", [cat, dog]) -> [dog]."""
    return [w for w in required if not uses_word(text, w)]


def is_broken_off(text: str) -> bool:
    """Does the text stop mid-sentence (empty, or its last character is not . ! ? or a closing quote after one)?

    >>> is_broken_off("They went home."), is_broken_off('"Thank you!"'), is_broken_off("One day, Ziggy found an")
    (False, False, True)
    """
    return _FINISHED.search(text.strip()) is None


def repeated_sentence(text: str) -> str | None:
    """The first sentence (of >= MIN_REPEATED_WORDS words) that occurs twice or more, else None.

    >>> repeated_sentence("Tom ran to the park. He was happy. Tom ran to the park.")
    'Tom ran to the park.'
    """
    seen: set[str] = set()
    for s in sentences(text):
        key = s.lower()
        if len(key.split()) < MIN_REPEATED_WORDS:
            continue
        if key in seen:
            return s
        seen.add(key)
    return None


def find_flaws(text: str, prompt_info: dict[str, Any]) -> list[str]:
    """Every flaw `text` shows, judged by what the prompt asked for.

    prompt_info: {"kind": "math", "answer": "16"} for a TinyMath question, or {"kind": "story",
    "required_words": [...]} for a story prompt (required_words may be empty). A math answer can only
    have a wrong number; a story can be broken off, repetitive and miss a required word at once.
    """
    if prompt_info.get("kind") == "math":
        return ["wrong_number"] if has_wrong_number(text, prompt_info["answer"]) else []
    found = []
    if missing_words(text, prompt_info.get("required_words") or []):
        found.append("missing_word")
    if is_broken_off(text):
        found.append("broken_off")
    if repeated_sentence(text) is not None:
        found.append("repetition")
    return found


def prompt_info_of(pair: dict) -> dict[str, Any]:
    """What a checker needs to know about a preference pair's prompt (lesson 0's jsonl row)."""
    if pair.get("flaw") == "wrong_number":
        return {"kind": "math", "answer": str(pair["correct_answer"])}
    return {"kind": "story", "required_words": list(pair.get("required_words") or [])}


def own_pair_sides(answers: list[list[int]], flaws: list[list[str]]) -> tuple[list[int] | None, list[int] | None]:
    """From several sampled answers to one prompt: (the first clean one, the first flawed one), None where there is none.

    >>> own_pair_sides([[1, 2], [3], [4]], [["broken_off"], [], ["repetition"]])
    ([3], [1, 2])
    """
    clean = next((a for a, f in zip(answers, flaws) if not f), None)
    flawed = next((a for a, f in zip(answers, flaws) if f), None)
    return clean, flawed


def sample_and_check(model, tokenizer, prompts: list[str], infos: list[dict], samples: int, temperature: float,
                     max_new_tokens: int = 200, seed: int = 0) -> tuple[Any, list[list[str]]]:
    """`samples` sampled answers to each prompt (a Rollout, nano/align/rollout.py) and the flaws of each answer."""
    ids = [render_prompt([{"role": "user", "content": p}], tokenizer) for p in prompts]
    rollout = sample_responses(model, tokenizer, ids, samples, max_new_tokens, temperature, seed=seed, batch_size=128)
    return rollout, [find_flaws(text, infos[g]) for text, g in zip(rollout.texts, rollout.prompt_index)]


def own_pairs(model, tokenizer, prompts: list[str], infos: list[dict], samples: int, temperature: float,
              max_new_tokens: int = 200, seed: int = 0) -> list[tuple[list[int] | None, list[int] | None]]:
    """On-policy preference pairs: the model's own answers to `prompts`, labelled by the checkers.

    For each prompt, `samples` answers are sampled and checked; the result is (chosen, rejected)
    response ids (the stop token kept when the answer finished): a clean answer and a flawed one of
    the model's own, None where the samples had none. The caller keeps lesson 0's side for a None.
    """
    rollout, found = sample_and_check(model, tokenizer, prompts, infos, samples, temperature, max_new_tokens, seed)
    responses = [row[mask.bool()].tolist() for row, mask in zip(rollout.ids, rollout.response_mask)]
    return [own_pair_sides(responses[g * samples:(g + 1) * samples], found[g * samples:(g + 1) * samples])
            for g in range(len(prompts))]


def measure_flaws(model, tokenizer, prompts: list[str], infos: list[dict], samples_per_prompt: int = 1,
                  temperature: float = 1.0, max_new_tokens: int = 200, seed: int = 0) -> dict[str, Any]:
    """Sample the model's own answers to held-out prompts and count the flaws the checkers find.

    Returns {"total": share of answers with any flaw, "total_stderr", "n", per flaw f: share of the
    answers that COULD show f (math answers for wrong_number, stories for the rest) that do,
    "rows": [{prompt, answer, flaws}]}.
    """
    rollout, found = sample_and_check(model, tokenizer, prompts, infos, samples_per_prompt, temperature, max_new_tokens, seed)
    rows = [{"prompt": prompts[g], "answer": text, "kind": infos[g]["kind"], "flaws": flaws}
            for text, g, flaws in zip(rollout.texts, rollout.prompt_index, found)]
    out: dict[str, Any] = {"n": len(rows), "rows": rows}
    out["total"], out["total_stderr"] = accuracy_with_stderr([bool(r["flaws"]) for r in rows])
    for flaw in FLAWS:
        eligible = [r for r in rows if (r["kind"] == "math") == (flaw == "wrong_number")]
        if flaw == "missing_word":
            eligible = [r for r, i in zip(rows, rollout.prompt_index) if infos[i].get("required_words")]
        out[flaw] = sum(flaw in r["flaws"] for r in eligible) / max(len(eligible), 1)
    return out
