"""
The prompts of an online RL run (lessons 10 and 11): what it practises on, what chooses its
checkpoint, and what reports the result — three sets that never overlap.

    kind         train (sampled)               validation (chooses ckpt_best)   report (judged before -> after)
    tinymath     lesson 2's RL prompts         their last --val_prompts         the TinyMath test problems
    words        lesson 0's words requests     their last --val_prompts         the held-out words requests
    preferences  lesson 0's preference prompts the first --val_prompts of the   the rest of the val split
                                               val split

A prompt carries what a reply must reach (`answers`: the number, the words to use, or None when a
reward model judges) and what the flaw checkers need to judge a reply (`infos`,
nano/align/flaws.py): a judge that is not the reward, so a run can be checked by something it did
not optimise.

Tests: `.venv/bin/python -m pytest -q tests/test_10_grpo.py tests/test_11_ppo.py`.
"""

from dataclasses import dataclass
from typing import Any, Sequence

from nano.common.fileio import read_jsonl
from nano.common.paths import raw_dir, require
from nano.text.bins import PreferenceDataset, load_rl_prompts
from nano.eval.words_skill import load_words_prompts, words_prompt_ids
from nano.align.flaws import prompt_info_of

KINDS = ("tinymath", "words", "preferences")


@dataclass
class PromptSet:
    """Prompts to sample from: token ids, text, what a reply must reach (the number for TinyMath, the
    words to use for words, None where the reward model judges), and the flaw checkers' info."""

    ids: list[list[int]]
    texts: list[str]
    answers: list[Any]
    infos: list[dict]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Sequence[int]) -> "PromptSet":
        index = list(index)
        return PromptSet(*([part[i] for i in index] for part in (self.ids, self.texts, self.answers, self.infos)))


def _tinymath(split: str, tokenizer: Any) -> PromptSet:
    rows = load_rl_prompts(split, tokenizer)
    return PromptSet([r.prompt_ids for r in rows], [r.prompt for r in rows], [r.answer for r in rows],
                     [{"kind": "math", "answer": r.answer} for r in rows])


def _words(split: str, tokenizer: Any) -> PromptSet:
    rows = load_words_prompts(split)
    return PromptSet(words_prompt_ids(tokenizer, rows), [r.prompt for r in rows], [r.words for r in rows],
                     [{"kind": "story", "required_words": r.words} for r in rows])


def _preferences(split: str, tokenizer: Any) -> PromptSet:
    data = PreferenceDataset(split, tokenizer)
    rows = read_jsonl(require(raw_dir() / f"preferences_{split}.jsonl", "preference pairs", 0))  # same order as the bins
    ids = [data[i]["prompt_ids"].tolist() for i in range(len(data))]
    return PromptSet(ids, [tokenizer.decode(p) for p in ids], [None] * len(ids), [prompt_info_of(r) for r in rows])


def load_prompt_sets(kind: str, tokenizer: Any, val_size: int) -> tuple[PromptSet, PromptSet]:
    """(train, validation) prompts of `kind` (the table above)."""
    if kind == "preferences":
        val = _preferences("val", tokenizer)
        return _preferences("train", tokenizer), val.subset(range(min(val_size, len(val))))
    full = _tinymath("train", tokenizer) if kind == "tinymath" else _words("train", tokenizer)
    if len(full) <= val_size:
        raise ValueError(f"only {len(full)} {kind} prompts: lower --val_prompts (now {val_size})")
    return full.subset(range(len(full) - val_size)), full.subset(range(len(full) - val_size, len(full)))


def report_prompts(kind: str, tokenizer: Any, val_size: int, n: int) -> PromptSet:
    """The first `n` prompts that report a run of `kind`: never trained on, never chose a checkpoint."""
    if kind == "preferences":
        rest = _preferences("val", tokenizer)
        if len(rest) <= val_size:
            raise ValueError(f"the {len(rest)} preference val prompts all choose the checkpoint (--val_prompts "
                             f"{val_size}): lower --val_prompts to leave some to report on")
        return rest.subset(range(val_size, min(len(rest), val_size + n)))
    full = _tinymath("test", tokenizer) if kind == "tinymath" else _words("test", tokenizer)
    return full.subset(range(min(n, len(full))))
