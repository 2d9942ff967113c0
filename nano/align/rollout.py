"""
Rollouts: batches of sampled responses and what they are worth (lessons 9-11).

Online RL learns from the policy's own answers: ask it each prompt G times (sampling is what makes
a group: the same prompt, different answers, so their rewards can be compared), lay prompt + answer
out in the one layout every method scores (nano/align/logprobs.py), and grade each answer.

    ids            <bos> <sot> user ... <sot> model \\n  2 + 3 = 5 <eot>  <pad> <pad>     (B, T)
    response_mask    0     0    0  ...  0     0    0   1  1 1 1 1   1      0     0       (B, T)

The pieces:
  * Rollout: the sampled responses, laid out for scoring, with room for what each method adds,
  * pack_responses: prompt + response per row, right-padded (nano/text/padding.py: right_pad),
  * sample_responses: G sampled answers per prompt with the KV cache (nano/model/generate.py: generate_batch),
  * math_rewards: what an answer is worth when it has a number to reach; words_rewards: when it
    must use given words (lesson 8's reward model is the third reward: nano/align/reward_model.py).

The policy that samples them is loaded by nano/align/policy.py. How GRPO and PPO run these on the
shared training loop (a rollout buffer per group of steps) is nano/align/online_rl.py.
Tests: `.venv/bin/python -m pytest -q tests/test_10_grpo.py tests/test_09_dpo.py`.
"""

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from nano.text.chat_format import pad_token_id, stop_token_ids
from nano.text.padding import right_pad
from nano.model.generate import generate_batch
from nano.eval.grading import is_correct
from nano.eval.words_skill import words_share

# ---------------------------------------------------------------------------------------------
# 1. sampling a batch of responses


@dataclass
class Rollout:
    """Sampled responses, laid out for scoring: prompt + response, right-padded.

    ids (N, T) and response_mask (N, T) as in the module docstring; prompt_index[i] says which
    prompt row i answers (the G answers of one prompt are rows [g*G, (g+1)*G)); texts are the
    decoded responses (stop token removed); finished[i] is False when a response hit the length limit.
    temperature is what they were sampled at (0: greedy), and sampled_logprobs (N, T - 1) the log-prob
    each token was drawn with, in the columns of response_logprobs (None for greedy answers): every
    log-prob an RL loss computes for these tokens must be of that same distribution.
    """

    ids: torch.Tensor
    response_mask: torch.Tensor
    prompt_index: list[int]
    texts: list[str]
    finished: list[bool]
    temperature: float
    sampled_logprobs: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # what each method adds: rewards, advantages, ...

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)


def pack_responses(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt + response per row, right-padded to one length: (ids (N, T), response_mask (N, T)).

    >>> ids, mask = pack_responses([[5, 6], [7]], [[8], [9, 10]], pad_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 8], [7, 9, 10]], [[0, 0, 1], [0, 1, 1]])
    """
    ids, _ = right_pad([list(p) + list(r) for p, r in zip(prompts, responses)], pad_id)  # (N, T)
    mask = torch.zeros_like(ids)  # (N, T): 1 on each row's response tokens only
    for row, (p, r) in enumerate(zip(prompts, responses)):
        mask[row, len(p) : len(p) + len(r)] = 1
    return ids, mask


def sample_responses(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float | None = None,
    seed: int | None = None,
    batch_size: int = 256,
) -> Rollout:
    """`group_size` sampled responses to each prompt, generated together with one KV cache per batch.

    Row g * group_size + j is answer j to prompt g. A response keeps its stop token (<end_of_turn>):
    the policy is trained to stop, as in SFT. Sampling is what makes a group: the same prompt,
    different answers, so their rewards can be compared. temperature 0 gives greedy answers (to grade).
    """
    stops = stop_token_ids(tokenizer)
    pad_id = pad_token_id(tokenizer)
    sampling = temperature > 0
    repeated = [list(p) for p in prompts for _ in range(group_size)]
    responses: list[list[int]] = []
    drawn: list[list[float]] = []  # per response token: its log-prob under the sampler's distribution
    for start in range(0, len(repeated), batch_size):  # generate_batch runs the model in eval mode
        chunk = repeated[start : start + batch_size]
        out = generate_batch(model, chunk, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             stop_tokens=stops, seed=None if seed is None else seed + start, pad_id=pad_id,
                             return_logprobs=sampling)
        responses += out[0] if sampling else out
        drawn += out[1] if sampling else []
    device = next(model.parameters()).device
    ids, mask = pack_responses(repeated, responses, pad_id)
    sampled_logprobs = None
    if sampling:  # the token at position p is column p - 1 (nano/align/logprobs.py)
        sampled_logprobs = torch.zeros(ids.shape[0], ids.shape[1] - 1)
        for row, (p, values) in enumerate(zip(repeated, drawn)):
            sampled_logprobs[row, len(p) - 1 : len(p) - 1 + len(values)] = torch.tensor(values)
        sampled_logprobs = sampled_logprobs.to(device)
    texts = [tokenizer.decode([t for t in r if t not in stops]) for r in responses]
    finished = [bool(r) and r[-1] in stops for r in responses]
    return Rollout(ids.to(device), mask.to(device), [g for g in range(len(prompts)) for _ in range(group_size)],
                   texts, finished, temperature if sampling else 0.0, sampled_logprobs)


# ---------------------------------------------------------------------------------------------
# 2. rewards


def math_rewards(texts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """1.0 for an answer that ends in the right number, else 0.0 — graded by lesson 12's own
    grader (nano/eval/grading.py: is_correct), so RL optimises exactly what lesson 12 measures.

    >>> math_rewards(["2 + 3 = 5.\\n#### 5", "#### 6"], ["5", "5"])
    tensor([1., 0.])
    """
    check_answers(answers)
    return torch.tensor([1.0 if is_correct(t, a) else 0.0 for t, a in zip(texts, answers)])


def words_rewards(texts: Sequence[str], required: Sequence[Sequence[str]]) -> torch.Tensor:
    """The share of its required words each answer uses, 0 to 1 in thirds (nano/eval/words_skill.py,
    the check lesson 12 measures): a verifiable reward for a skill rather than a fact.

    >>> words_rewards(["The dog ate cake.", "A moon."], [["dog", "cake", "moon"]] * 2)
    tensor([0.6667, 0.3333])
    """
    check_words(required)
    return torch.tensor([words_share(t, w) for t, w in zip(texts, required)])


def check_words(required: Sequence[Any]) -> None:
    """Refuse prompts that do not list the words their story must use (TinyMath problems, say)."""
    if any(not isinstance(words, (list, tuple)) or not words for words in required):
        raise ValueError("--reward words needs prompts that list their required words: use --prompts words")


def check_answers(answers: Sequence[str | None]) -> None:
    """Refuse prompts that have no answer to grade against (the preference prompts, say)."""
    if any(a is None or str(a).strip() == "" for a in answers):
        raise ValueError("--reward math needs prompts with a verifiable numeric answer, and these have none: "
                         "use --prompts tinymath, or --reward rm (lesson 8's reward model, `make lesson-8`)")

