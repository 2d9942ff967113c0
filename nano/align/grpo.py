"""
GRPO, Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath"): reinforcement learning
without a critic. Ask the policy the same question G times; an answer's advantage is how much better
its reward is than the group's average, in units of the group's spread:

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)          the same for every token of answer i

Then the clipped objective of PPO (Schulman et al. 2017; nano/align/logprobs.py: clipped_surrogate) on
every response token t, with the ratio rho = pi(token) / pi_old(token) of the policy now to the
policy that sampled it,

    loss_t = -min(rho A, clip(rho, 1 - eps, 1 + eps) A)  +  beta * k3_t       (k3: KL to the reference)

and an average over tokens. Two ways to average, and they are not the same objective:
  * "token" (default; DAPO, Yu et al. 2025): the mean over every response token of the batch.
  * "sequence" (the DeepSeekMath paper): the mean over answers of each answer's token mean. An
    answer's every token then weighs 1 / its length: a short wrong answer is pushed down harder
    per token than a long one, so the policy learns that long wrong answers are cheaper — the length
    bias that "Dr. GRPO" (Liu et al. 2025) points out. Lesson 10 measures it.

A group whose answers all got the same reward has A = 0 for every answer: it teaches nothing (only
the KL term, if beta > 0, still pulls). With rewards 0/1, that is every group the policy always, or
never, gets right: the questions in between are where learning happens.

Optional `step_credit` (our addition, in the spirit of DeepSeekMath's process supervision): the final
answer is one bit for the whole answer, but a TinyMath solution shows its arithmetic ("19 + 6 = 26"),
which a program can check. The tokens of each written result get + step_credit if it is right and
- step_credit if it is wrong, on top of A_i: the credit lands on the exact tokens that slipped.

Lesson 10 runs it: `make lesson-10`. Tests: `.venv/bin/python -m pytest -q tests/test_10_grpo.py`.
"""

import math
import re
from typing import Any

import torch

from nano.eval.grading import WRITTEN_STEP, arithmetic_value
from nano.align.logprobs import clipped_surrogate, group_std, kl_estimates, masked_mean, response_logprobs
from nano.align.online_rl import BufferContext, OnlineMethod, buffer_logprobs
from nano.align.rollout import Rollout

AGGREGATIONS = ("token", "sequence")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps) for rewards (N,) laid out group by group -> (N,).

    The std is Bessel-corrected (divides by G - 1), as torch.std and the DeepSeekMath code do.

    >>> group_advantages(torch.tensor([1., 0., 0., 1.]), 4)     # std = sqrt(1/3) = 0.57735
    tensor([ 0.8659, -0.8659, -0.8659,  0.8659])
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)  # (P, G)
    mean = groups.mean(dim=1, keepdim=True)
    std = group_std(groups.view(-1), group_size)[:, None]  # (P, 1); 0 for a group of one
    return ((groups - mean) / (std + eps)).view(-1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str = "token") -> torch.Tensor:
    """Average per-token losses (B, T) over the response tokens (mask 1): "token" or "sequence" (see above).

    >>> loss, mask = torch.tensor([[1., 1., 0.], [4., 0., 0.]]), torch.tensor([[1, 1, 0], [1, 0, 0]])
    >>> aggregate(loss, mask, "token"), aggregate(loss, mask, "sequence")   # 6 / 3 and (1 + 4) / 2
    (tensor(2.), tensor(2.5000))
    """
    if how == "token":
        return masked_mean(per_token, mask)
    if how == "sequence":
        per_answer = masked_mean(per_token, mask, dim=-1)
        return per_answer[mask.sum(-1) > 0].mean()
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 0.2, beta: float = 0.0, ref_logp: torch.Tensor | None = None,
              aggregation: str = "token") -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of a batch of answers. logp, old_logp, ref_logp, mask: (B, T) per token;
    advantages: (B,) one per answer, or (B, T) per token. Returns (loss, stats)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)  # the answer's advantage on each of its tokens
    per_token, was_clipped = clipped_surrogate(logp, old_logp, advantages, clip_eps)
    stats = {"clip_frac": float(masked_mean(was_clipped.float(), mask))}
    if ref_logp is not None:
        k3 = kl_estimates(logp, ref_logp)["k3"]
        stats["kl"] = float(masked_mean(k3.detach(), mask))
        if beta:
            per_token = per_token + beta * k3
    return aggregate(per_token, mask, aggregation), stats


# ---------------------------------------------------------------------------------------------
# step credit: check every written "a op b = c" of an answer, at the tokens of c

# the grader's pattern of a written step (nano/eval/grading.py), on bytes: positions in the text's UTF-8
# bytes map to tokens
_WRITTEN_STEP = re.compile(WRITTEN_STEP.pattern.encode())


def step_results(token_bytes: list[bytes]) -> list[tuple[list[int], bool]]:
    """For each written step "a op b = c" in an answer given as its tokens' bytes: (indices of the
    tokens that spell c, is the step right).

    >>> step_results([b"So", b" 19", b" +", b" 6", b" =", b" 26", b"."])
    [([5], False)]
    """
    text = b"".join(token_bytes)
    ends = [0]
    for piece in token_bytes:
        ends.append(ends[-1] + len(piece))  # token k covers bytes [ends[k], ends[k + 1])
    out = []
    for match in _WRITTEN_STEP.finditer(text):
        start, stop = match.span(2)
        tokens = [k for k in range(len(token_bytes)) if ends[k] < stop and ends[k + 1] > start]
        right = math.isclose(arithmetic_value(match.group(1).decode()), int(match.group(2)))
        out.append((tokens, right))
    return out


def step_credit_tensor(buffer: Rollout, tokenizer: Any, credit: float, penalty: float | None = None) -> torch.Tensor:
    """(N, T - 1) per-token bonus, aligned with token_logprobs: +credit on right results, -penalty on wrong ones
    (penalty None: the same as credit)."""
    penalty = credit if penalty is None else penalty
    bonus = torch.zeros(buffer.ids.shape[0], buffer.ids.shape[1] - 1)
    for row in range(len(buffer)):
        positions = buffer.response_mask[row].nonzero().squeeze(-1).tolist()
        pieces = [tokenizer.decode_bytes([int(buffer.ids[row, p])]) for p in positions]
        for tokens, right in step_results(pieces):
            for k in tokens:
                bonus[row, positions[k] - 1] = credit if right else -penalty  # token at p <- column p - 1
    return bonus


# ---------------------------------------------------------------------------------------------
# GRPO as an online method for the shared runner (nano/align/online_rl.py: run_online_rl)


def grpo_method(beta: float, aggregation: str = "token", clip_eps: float = 0.2, step_credit: float = 0.0,
                outcome_weight: float = 1.0, step_penalty: float | None = None) -> OnlineMethod:
    """Prepare: group advantages (x outcome_weight, + step credit), old and reference log-probs. Loss: grpo_loss."""

    def prepare(buffer: Rollout, ctx: BufferContext) -> None:
        cfg, device = ctx.cfg, buffer.ids.device
        advantages = outcome_weight * group_advantages(buffer.extra["rewards"].cpu(), cfg.group_size)  # (N,)
        if step_credit:
            advantages = advantages[:, None] + step_credit_tensor(buffer, ctx.tokenizer, step_credit, step_penalty)  # (N, T-1)
        buffer.extra["advantages"] = advantages.to(device)
        if cfg.steps_per_rollout > 1:  # later steps need the log-probs of the policy that sampled
            buffer.extra["old_logprobs"] = buffer_logprobs(ctx.model, buffer)
        buffer.extra["ref_logprobs"] = buffer_logprobs(ctx.reference, buffer)

    def loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        logp, entropy = response_logprobs(model, batch["ids"], batch["response_mask"], with_entropy=True,
                                          temperature=batch["temperature"])  # (B, T-1), at the sampling temperature
        mask = batch["response_mask"][:, 1:]
        # one update per buffer: the sampling policy IS the current one, so old = logp (ratio 1, no clip)
        old = batch.get("old_logprobs", logp.detach())
        value, stats = grpo_loss(logp, old, batch["advantages"], mask, clip_eps=clip_eps, beta=beta, ref_logp=batch.get("ref_logprobs"), aggregation=aggregation)
        stats["entropy"] = float(masked_mean(entropy, mask))
        return value, stats

    return OnlineMethod("grpo", prepare, loss)
