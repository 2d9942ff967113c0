"""
The words skill: "Write a short story using the words moon, cake and dog." A program checks the
answer exactly, so it is a reward for RL (lesson 10, `--reward words`) and a test for every stage
(lesson 12), the way Tulu 3's RLVR verifies instruction constraints (Lambert et al. 2024).

Unlike a TinyMath sum, which is a fact of its own, this is a SKILL: the words change from prompt to
prompt, and a model that has learned to copy words from its prompt into its story can do it for
words it was never asked about together. So we train on one set of prompts and measure on others,
both written by lesson 0 (nano/data/synthetic.py: words_prompts):

    data/raw/words_prompts_train.jsonl  2,000 requests RL practises on (the last ones held out to
                                        choose its checkpoint)
    data/raw/words_prompts_test.jsonl   200 requests whose three words no training request, RL's or
                                        SFT's, asks for together

A word counts as used when the story has it as a whole word, any case, plural allowed
(nano/data/stories.py: uses_word, the check lesson 0 built the data with). An answer's score is the
share of its words used (1/3, 2/3, ...); the headline is the share of prompts whose answer uses all.

    python -m nano.eval.words_skill --checkpoint_path runs/sft/full/default/checkpoints/ckpt_best.pth --samples 8

Tests: `.venv/bin/python -m pytest -q tests/test_12_evaluate.py -k words`.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from nano.common.fileio import read_jsonl, write_jsonl
from nano.common.paths import raw_dir
from nano.data.stories import uses_word
from nano.text.chat_format import STOP_TOKENS, pad_token_id, render_prompt, special_id
from nano.checkpoints.checkpoint import load_model, load_tokenizer
from nano.eval.evaluate import generate_answers
from nano.eval.grading import accuracy_with_stderr

# A story is 80-250 words, ~1.3 tokens a word with lesson 1's tokenizer: 256 tokens hold nearly all.
MAX_NEW_TOKENS = 256


@dataclass
class WordsPrompt:
    """One "use the words ..." request: the user's message and the words the story must use."""

    prompt: str
    words: list[str]


def words_share(text: str, words: Sequence[str]) -> float:
    """The share of `words` that `text` uses (whole words, any case, plural allowed).

    >>> words_share("The Dog ate two cakes.", ["dog", "cake", "moon"])
    0.6666666666666666
    """
    return sum(uses_word(text, w) for w in words) / len(words) if words else 0.0


def load_words_prompts(split: str, folder: Path | None = None) -> list[WordsPrompt]:
    """The "use the words" requests of `split` ("train" or "test"), from `folder` (data/raw/)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    file = (folder or raw_dir()) / f"words_prompts_{split}.jsonl"
    if not file.is_file():
        raise FileNotFoundError(f"no words prompts at {file}: run `make lesson-0` (a data/raw/ written before "
                                "lesson 0 made them is rebuilt)")
    return [WordsPrompt(row["prompt"], list(row["required_words"])) for row in read_jsonl(file)]


def words_prompt_ids(tokenizer: Any, prompts: Sequence[WordsPrompt]) -> list[list[int]]:
    """Each request as a chat prompt ending in "<start_of_turn>model\\n": the model writes the story."""
    return [render_prompt([{"role": "user", "content": p.prompt}], tokenizer) for p in prompts]


def evaluate_words(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[WordsPrompt], samples: int = 1,
                   temperature: float = 0.0, max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 16,
                   seed: int = 0, out_jsonl: str | Path | None = None, progress: str = "") -> dict[str, Any]:
    """Answer every prompt `samples` times (greedy by default) and check the words.

    Returns {"n": answers, "accuracy": share of answers using every word, "stderr", "mean_share": the
    mean share of words used, "prompts_any": share of prompts with at least one answer using all
    (pass@samples), "rows"}.
    """
    stops = [special_id(tokenizer, name) for name in STOP_TOKENS]
    ids = [p for p in words_prompt_ids(tokenizer, prompts) for _ in range(samples)]
    outputs = generate_answers(model, ids, batch_size, progress, max_new_tokens=max_new_tokens, temperature=temperature,
                               stop_tokens=stops, seed=seed, pad_id=pad_token_id(tokenizer))
    rows = []
    for k, output in enumerate(outputs):
        request = prompts[k // samples]
        story = tokenizer.decode([t for t in output if t not in stops])
        share = words_share(story, request.words)
        rows.append({"prompt": request.prompt, "words": request.words, "output": story, "share": share,
                     "all_used": share == 1.0})
    accuracy, stderr = accuracy_with_stderr([r["all_used"] for r in rows])
    per_prompt = [any(r["all_used"] for r in rows[i : i + samples]) for i in range(0, len(rows), samples)]
    if out_jsonl is not None:
        write_jsonl(out_jsonl, rows)
    return {"task": "words", "n": len(rows), "prompts": len(prompts), "samples": samples, "temperature": temperature,
            "accuracy": accuracy, "stderr": stderr, "correct": sum(r["all_used"] for r in rows),
            "mean_share": sum(r["share"] for r in rows) / max(len(rows), 1),
            "prompts_any": sum(per_prompt) / max(len(per_prompt), 1), "rows": rows}


def main(argv: list[str] | None = None) -> None:
    """Measure a chat checkpoint's words skill on the held-out prompts, greedily and sampled."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--checkpoint_path", required=True, help="a chat model (lesson 5 or later)")
    parser.add_argument("--samples", type=int, default=8, help="sampled answers per prompt (besides the greedy one)")
    parser.add_argument("--temperature", type=float, default=1.0, help="temperature of the sampled answers")
    parser.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # decoding a tiny model: one thread is as fast and leaves a core free
    model, ckpt = load_model(args.checkpoint_path)
    tokenizer = load_tokenizer(ckpt.get("tokenizer_fingerprint"))
    prompts = load_words_prompts("test")
    for samples, temperature in ((1, 0.0), (args.samples, args.temperature)):
        if samples == 0:
            continue
        r = evaluate_words(model, tokenizer, prompts, samples, temperature, args.max_new_tokens, batch_size=64,
                           seed=1337, progress="words")
        how = "greedy" if temperature == 0 else f"{samples} samples each at temperature {temperature}"
        print(f"{len(prompts)} held-out prompts, {how}: every word used in {r['correct']}/{r['n']} answers = "
              f"{r['accuracy']:.1%} ± {r['stderr']:.1%}; mean share of words used {r['mean_share']:.1%}; "
              f"prompts with at least one such answer {r['prompts_any']:.1%}")


if __name__ == "__main__":
    main()
