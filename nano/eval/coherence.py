"""
Does the model remember its characters? Two programs that read a story and answer that, so it can be
measured beside the loss (lesson 4, at every evaluation) and for every stage (lesson 12).

A model that has learned the corpus's sentences, but not to look back at what it wrote, tells
stories like "Once upon a time, there was a gentle boy named Zoe. Every day, Alex liked to play.
Her favorite thing ..." Each sentence is fluent; together they name three children and give the
boy a girl's pronoun. Writing "Zoe" again in the second sentence needs the model to find "Zoe"
earlier in its context and copy it: the induction-head behaviour (Olsson et al. 2022, "In-context
Learning and Induction Heads"). Two measures:

  names per story     distinct names of the world's cast (nano/data/world.py: GIRL_NAMES, BOY_NAMES,
                      PET_NAMES) a story mentions. A held-out story of the corpus has one or two.
  pronoun agreement   the story's hero is introduced with a kind ("a girl named Lily", "Tom was a
                      happy boy who ..."); the first later sentence that begins with a pronoun
                      (He / She / His / Her) should match it. In the corpus it does 99% of the time
                      (the rest: "... a boy sitting alone. His name was Theo.", a pronoun of another
                      child), and the measure is only taken on stories that have both.

Both are compared with held-out stories of the corpus cut to the same number of tokens as the
samples (a longer text has room for more names), so "the data's level" is the target.

    python -m nano.eval.coherence --checkpoint_path runs/pretrain/default/checkpoints/ckpt_best.pth

Tests: `.venv/bin/python -m pytest -q tests/test_12_evaluate.py -k coherence`.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, Sequence

import torch

from nano.checkpoints.checkpoint import load_model, load_tokenizer
from nano.common.paths import raw_dir, require
from nano.data.stories import split_sentences
from nano.data.story_files import read_stories
from nano.data.world import BOY_NAMES, GIRL_NAMES, PET_NAMES
from nano.eval.grading import accuracy_with_stderr
from nano.model.generate import generate_batch
from nano.text.chat_format import render_prompt, stop_token_ids

# The settings of the samples lesson 4 writes, and of this measure everywhere: a story opening,
# 160 new tokens (about 120 words, most of a corpus story), temperature 0.8, top-k 50.
STORY_PROMPT = "Once upon a time"
MAX_NEW_TOKENS = 160
TEMPERATURE, TOP_K = 0.8, 50

_NAME = re.compile(r"\b(" + "|".join(GIRL_NAMES + BOY_NAMES + PET_NAMES) + r")\b")  # case-sensitive: "Tiny", not "tiny"
# "a brave girl named Lily", "a boy called Tom", "Lily was a kind girl who ..." -> the hero's kind
_INTRO = re.compile(r"\b(girl|boy) (?:named|called) [A-Z][a-z]+|\b[A-Z][a-z]+ was an? (?:[a-z]+ )?(girl|boy) who\b")
_PRONOUN_START = re.compile(r'^"?(He|She|His|Her)\b')


def character_names(text: str) -> list[str]:
    """The distinct names of the world's cast that `text` mentions, in order of first mention.

    >>> character_names("Lily had a dog named Spot. Lily and Tom played. Tim's kite flew.")
    ['Lily', 'Spot', 'Tom', 'Tim']
    """
    return list(dict.fromkeys(_NAME.findall(text)))


def hero_pronoun_agrees(text: str) -> bool | None:
    """Does the first sentence after the hero's introduction that starts with a pronoun match the hero's kind?

    None when the story has no "girl/boy named X" introduction or no such sentence after it.

    >>> hero_pronoun_agrees("There was a shy boy named Sam. Every day, Sam ran. His dog ran too.")
    True
    >>> hero_pronoun_agrees("Once upon a time, there was a silly girl named Jim. His favorite thing was to sing.")
    False
    """
    sentences = split_sentences(text)
    for i, sentence in enumerate(sentences):
        intro = _INTRO.search(sentence)
        if intro:
            kind = intro.group(1) or intro.group(2)
            for later in sentences[i + 1:]:
                start = _PRONOUN_START.match(later)
                if start:
                    return (start.group(1) in ("She", "Her")) == (kind == "girl")
            return None
    return None


def coherence(texts: Sequence[str]) -> dict[str, Any]:
    """Both measures over several stories: {"names_per_story", "three_or_more" (share of stories with >= 3
    names), "pronoun_agreement", "pronoun_stderr", "pronoun_n" (stories it could be judged on), "n"}."""
    counts = [len(character_names(t)) for t in texts]
    judged = [a for a in (hero_pronoun_agrees(t) for t in texts) if a is not None]
    agreement, stderr = accuracy_with_stderr(judged) if judged else (float("nan"), float("nan"))
    n = max(len(texts), 1)
    return {"names_per_story": sum(counts) / n, "three_or_more": sum(c >= 3 for c in counts) / n,
            "pronoun_agreement": agreement, "pronoun_stderr": stderr, "pronoun_n": len(judged), "n": len(texts)}


@torch.no_grad()
def sample_stories(model: torch.nn.Module, tokenizer: Any, n: int, seed: int = 0, batch_size: int = 100,
                   chat_prompts: Sequence[str] | None = None) -> list[str]:
    """`n` stories sampled with the settings above, in batches (one KV cache each: generate_batch).

    A base model continues "<bos>Once upon a time" (the text returned starts with it); a chat model
    answers `chat_prompts[i]` (story requests; lesson 12 uses the held-out words requests) in the chat
    format, and the text returned is its reply.
    """
    if chat_prompts is None:
        prompts = [[tokenizer.special_tokens["<bos>"]] + tokenizer.encode(STORY_PROMPT)] * n
        prefix, stops = STORY_PROMPT, [tokenizer.special_tokens["<eos>"]]
    else:
        if len(chat_prompts) < n:
            raise ValueError(f"{n} stories asked for, but only {len(chat_prompts)} chat prompts given")
        prompts = [render_prompt([{"role": "user", "content": p}], tokenizer) for p in chat_prompts[:n]]
        prefix, stops = "", stop_token_ids(tokenizer)
    texts = []
    for start in range(0, n, batch_size):
        outs = generate_batch(model, prompts[start:start + batch_size], MAX_NEW_TOKENS, temperature=TEMPERATURE,
                              top_k=TOP_K, stop_tokens=stops, seed=seed + start)
        texts += [prefix + tokenizer.decode([t for t in out if t not in stops]) for out in outs]
    return texts


def data_stories(tokenizer: Any, n: int) -> list[str]:
    """The first `n` held-out corpus stories (lesson 0's stories_val.txt), each cut to the samples' length
    in tokens: the level a model's samples are compared with."""
    stories = read_stories(require(raw_dir() / "stories_val.txt", "held-out stories", 0))[:n]
    max_tokens = len(tokenizer.encode(STORY_PROMPT)) + MAX_NEW_TOKENS
    return [tokenizer.decode(tokenizer.encode(s)[:max_tokens]) for s in stories]


def format_coherence(c: dict[str, Any]) -> str:
    """One line: '1.48 names per story (0% with three or more), pronouns agree 100.0% (± 0.0%, n = 69)'."""
    return (f"{c['names_per_story']:.2f} names per story ({c['three_or_more']:.0%} with three or more), pronouns "
            f"agree {c['pronoun_agreement']:.1%} (± {c['pronoun_stderr']:.1%}, n = {c['pronoun_n']})")


def main() -> None:
    parser = argparse.ArgumentParser(description="Character names per story and pronoun agreement of a base "
                                                 "model's samples, against held-out stories of the corpus.")
    parser.add_argument("--checkpoint_path", required=True, help="a base model (lesson 4) checkpoint")
    parser.add_argument("--samples", type=int, default=100, help="stories to sample (and held-out stories to read)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tokenizer = load_tokenizer()
    model, _ = load_model(args.checkpoint_path)
    print(f"held-out stories ({args.samples}): {format_coherence(coherence(data_stories(tokenizer, args.samples)))}")
    texts = sample_stories(model.eval(), tokenizer, args.samples, seed=args.seed)
    print(f"the model's samples ({args.samples}): {format_coherence(coherence(texts))}")
    print(f"\n--- a sample ---\n{texts[0]}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # no checkpoint, no held-out stories: say what to run
        raise SystemExit(f"error: {e}")
