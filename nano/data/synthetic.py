"""
What lesson 0 builds by mixing the story world and TinyMath: instruction conversations and
preference pairs.

Both come from generated stories (nano/data/stories.py), whose `Story` knows its own facts, and, for one
kind of preference pair, from TinyMath problems (nano/data/tinymath.py). That knowledge is what makes the
data checkable: a "use the words picnic, rain and basket" prompt gets a story that really uses them,
a question about a story gets the answer the story holds, and every rejected answer is flawed in
exactly the way its `flaw` says.

    >>> conversation = conversations(0, 1, "demo")[0]
    >>> conversation["task"], [m["role"] for m in conversation["messages"]]
    ('feature', ['user', 'assistant'])
    >>> pair = preference_pairs(0, 1, "demo")[0]     # the first flaw: a wrong number in a TinyMath answer
    >>> pair["flaw"], pair["chosen"].splitlines()[-2:], pair["rejected"].splitlines()[-2:]
    ('wrong_number', ['The difference is 18 - 9 = 9.', '#### 9'], ['The difference is 18 - 9 = 8.', '#### 8'])

The same seed gives the same data; each split has its own stream (nano/data/world.py: rng_for).
Run `python lessons/00_data.py` to write them; tests: tests/test_00_data.py.
"""

from __future__ import annotations

import random
import re
from typing import Iterable

from nano.data.stories import FOODS, TOYS, Story, generate_story, sentence_ends, split_sentences, uses_word
from nano.data.tinymath import answer_line, generate_problem
from nano.data.world import PLACES, pick, rng_for

# ---------------------------------------------------------------------------------------------
# 1. instruction conversations: {"messages": [...], "task": ...}
# ---------------------------------------------------------------------------------------------


def _join_words(words: list[str]) -> str:
    """['a', 'b', 'c'] -> 'a, b and c'."""
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]


def words_prompt(rng: random.Random, words: list[str]) -> str:
    listed = _join_words(words)
    return pick(rng, (f"Write a short story using the words {listed}.",
                       f"Can you write a story that uses the words {listed}?",
                       f"Tell me a short story with the words {listed} in it."))


def feature_prompt(rng: random.Random, story: Story) -> str:
    about = f"{story.hero.described} {story.feature}"
    ask = pick(rng, (f"Write a short story about {about}.", f"Tell me a story about {about}.",
                      f"Can you write a story for kids about {about}?"))
    # only ask for what the story really has, so the answer is a correct one
    if story.has_dialogue and rng.random() < 0.3:
        ask += " The story should have some dialogue."
    elif story.has_moral and rng.random() < 0.3:
        ask += " The story should end with a lesson."
    return ask


def _pick_words(rng: random.Random, story: Story, k: int = 3) -> list[str] | None:
    keywords = story.keywords
    return rng.sample(keywords, k) if len(keywords) >= k else None


_CHAT = (
    (("Hi!", "Hello!", "Hi there!", "Good morning!"),
     ("Hello! I am Nano, a very small language model. I can tell short stories and solve small math problems.",
      "Hi! I am Nano. Would you like a story or a math problem?")),
    (("What is your name?", "Who are you?"),
     ("My name is Nano. I am a tiny language model that learned from children's stories.",)),
    (("What can you do?", "How can you help me?"),
     ("I can write short stories, answer questions about a story, and solve small math word problems.",)),
    (("Thank you!", "Thanks!", "Thank you very much."),
     ("You are welcome!", "You are welcome! Ask me for another story any time.")),
    (("Goodbye!", "Bye!", "Good night!"), ("Goodbye! Have a wonderful day.", "Bye! Sleep well and have sweet dreams.")),
)


def _conversation(rng: random.Random, story_rng: random.Random, allow_chat: bool) -> dict:
    roll = rng.random()
    story = generate_story(story_rng)
    if roll < 0.30:
        words = _pick_words(rng, story)
        if words:
            return {"messages": [{"role": "user", "content": words_prompt(rng, words)},
                                 {"role": "assistant", "content": story.text}], "task": "words", "required_words": words}
    if roll < 0.55:
        return {"messages": [{"role": "user", "content": feature_prompt(rng, story)},
                             {"role": "assistant", "content": story.text}], "task": "feature"}
    if roll < 0.80:
        question, answer = pick(rng, story.qa)
        user = pick(rng, (f"Read the story and answer the question.\n\n{story.text}\n\nQuestion: {question}",
                           f"{story.text}\n\n{question}",
                           f"Here is a story:\n\n{story.text}\n\n{question} Answer in one sentence."))
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], "task": "qa"}
    if roll < 0.90:
        ends = sentence_ends(story.text)
        cut = ends[max(1, len(ends) * 2 // 5) - 1]
        start, rest = story.text[:cut].rstrip(), story.text[cut:].strip()
        ask = pick(rng, ("Finish this story:", "Continue the story:", "Please write the rest of this story:"))
        return {"messages": [{"role": "user", "content": f"{ask}\n\n{start}"},
                             {"role": "assistant", "content": rest}], "task": "continue"}
    if roll < 0.96 or not allow_chat:
        question, answer = pick(rng, story.qa)
        return {"messages": [{"role": "user", "content": feature_prompt(rng, story)},
                             {"role": "assistant", "content": story.text},
                             {"role": "user", "content": question},
                             {"role": "assistant", "content": answer}], "task": "story_then_question"}
    asks, replies = pick(rng, _CHAT)
    return {"messages": [{"role": "user", "content": pick(rng, asks)},
                         {"role": "assistant", "content": pick(rng, replies)}], "task": "chat"}


def conversations(seed: int, n: int, split: str, exclude_prompts: Iterable[str] = ()) -> list[dict]:
    """`n` instruction conversations; the first user message of each is new (not in `exclude_prompts`).

    Tasks: "words" (write a story using given words), "feature" (a story about someone who ...),
    "qa" (a story and a question about it), "continue" (finish a story), "story_then_question"
    (two turns), and, in the train split only, "chat" (hello / thank you). TinyMath conversations
    are not here: lesson 2 makes them from tinymath_train.jsonl.
    """
    rng, story_rng = rng_for(seed, f"conversations_{split}"), rng_for(seed, f"conversation_stories_{split}")
    seen = set(exclude_prompts)
    out: list[dict] = []
    while len(out) < n:
        conv = _conversation(rng, story_rng, allow_chat=(split == "train"))
        prompt = conv["messages"][0]["content"]
        if conv["task"] != "chat":  # chat prompts are a fixed handful; they repeat on purpose
            if prompt in seen:
                continue
            seen.add(prompt)
        out.append(conv)
    return out


def words_prompts(seed: int, n: int, split: str, exclude_word_sets: Iterable[frozenset] = ()) -> list[dict]:
    """`n` "use the words ..." requests, {"prompt", "required_words"}, each with a set of three words no
    other row (and nothing in `exclude_word_sets`) asks for: the prompts RL practises the words skill on,
    and the held-out ones lesson 12 measures it with (nano/eval/words_skill.py). The words come from a
    generated story's own keywords, so every set is one a story can use; the story itself is not kept.

    >>> words_prompts(0, 1, "demo")[0]["required_words"]
    ['soft', 'fair', 'sky']
    """
    rng, story_rng = rng_for(seed, f"words_prompts_{split}"), rng_for(seed, f"words_prompt_stories_{split}")
    seen = set(exclude_word_sets)
    out: list[dict] = []
    while len(out) < n:
        words = _pick_words(rng, generate_story(story_rng))
        if words and frozenset(words) not in seen:
            seen.add(frozenset(words))
            out.append({"prompt": words_prompt(rng, words), "required_words": words})
    return out


# ---------------------------------------------------------------------------------------------
# 2. preference pairs: the same prompt, a good answer and a flawed one
# ---------------------------------------------------------------------------------------------

FLAWS = ("wrong_number", "missing_word", "broken_off", "repetition")


def _wrong_number(rng: random.Random, problem: dict) -> dict:
    """Chosen: the right solution. Rejected: the same, with the last result off by 1-3."""
    right = problem["result"]
    wrong = right + pick(rng, [d for d in (-3, -2, -1, 1, 2, 3) if right + d >= 0])
    lines = problem["answer"].splitlines()
    # the last computation line ends in "= right ..."; change that result and the #### line
    lines[-2] = re.sub(rf"= {right}\b", f"= {wrong}", lines[-2])
    lines[-1] = answer_line(wrong)
    return {"prompt": problem["question"], "chosen": problem["answer"], "rejected": "\n".join(lines),
            "flaw": "wrong_number", "correct_answer": str(right), "rejected_answer": str(wrong)}


def _missing_word(rng: random.Random, story: Story) -> dict | None:
    """Chosen: a story with all three words. Rejected: the same story with one word swapped for another."""
    words = _pick_words(rng, story)
    if not words:
        return None
    missing = pick(rng, words)
    pool = [w for w in TOYS + FOODS + PLACES if w not in words and not uses_word(story.text, w)]
    swap = pick(rng, pool)
    rejected = re.sub(rf"\b{re.escape(missing)}(?=(?:s|es)?\b)", swap, story.text)
    rejected = re.sub(rf"\b{re.escape(missing.capitalize())}(?=(?:s|es)?\b)", swap.capitalize(), rejected)
    if uses_word(rejected, missing):
        return None
    return {"prompt": words_prompt(rng, words), "chosen": story.text, "rejected": rejected, "flaw": "missing_word",
            "required_words": words, "missing_word": missing}


def _broken_off(rng: random.Random, story: Story) -> dict | None:
    """Chosen: the whole story. Rejected: the same story cut off in the middle of a sentence."""
    text = story.text
    spaces = [i for i in range(int(len(text) * 0.3), int(len(text) * 0.7)) if text[i] == " " and text[i - 1].isalpha()]
    if not spaces:
        return None
    cut = pick(rng, spaces)
    return {"prompt": feature_prompt(rng, story), "chosen": text, "rejected": text[:cut], "flaw": "broken_off"}


def _repetition(rng: random.Random, story: Story) -> dict | None:
    """Chosen: the whole story. Rejected: the story stuck in a loop, saying one sentence over and over."""
    text = story.text
    sentences = split_sentences(text)
    if len(set(sentences)) != len(sentences):  # the chosen side must not repeat itself
        return None
    ends = sentence_ends(text)
    candidates = [i for i in range(2, len(sentences) - 1) if len(sentences[i]) > 25 and '"' not in sentences[i]]
    if not candidates:
        return None
    i = pick(rng, candidates)
    times = rng.randint(3, 5)
    rejected = text[:ends[i]] + (" " + sentences[i]) * (times - 1)
    return {"prompt": feature_prompt(rng, story), "chosen": text, "rejected": rejected, "flaw": "repetition",
            "repeated_sentence": sentences[i], "times": times}


def preference_pairs(seed: int, n: int, split: str, exclude_prompts: Iterable[str] = (),
                     exclude_questions: Iterable[str] = ()) -> list[dict]:
    """`n` pairs {"prompt", "chosen", "rejected", "flaw", ...}, the four flaws in turn.

    Prompts in `exclude_prompts` are skipped (keep val and train apart), and so are math questions in
    `exclude_questions` (never train on the TinyMath test set).
    """
    rng, story_rng = rng_for(seed, f"preferences_{split}"), rng_for(seed, f"preference_stories_{split}")
    math_rng = rng_for(seed, f"preference_math_{split}")
    seen = set(exclude_prompts) | set(exclude_questions)
    out: list[dict] = []
    while len(out) < n:
        flaw = FLAWS[len(out) % len(FLAWS)]
        if flaw == "wrong_number":
            pair = _wrong_number(rng, generate_problem(math_rng))
        else:
            builder = {"missing_word": _missing_word, "broken_off": _broken_off, "repetition": _repetition}[flaw]
            pair = builder(rng, generate_story(story_rng))
        if pair is None or pair["prompt"] in seen:
            continue
        seen.add(pair["prompt"])
        out.append(pair)
    return out
