"""
Direct Preference Optimization (DPO, Rafailov et al. 2023): learn from preference pairs without a
reward model and without sampling.

RLHF maximises reward minus a KL penalty to the reference policy. That objective has a closed-form
optimum, pi*(y|x) proportional to pi_ref(y|x) exp(r(x, y) / beta), so a policy DEFINES a reward,

    r(x, y) = beta * log( pi(y|x) / pi_ref(y|x) )          (+ a term that cancels in pairs)

and plugging that implicit reward into the reward model's Bradley-Terry loss trains the policy
directly on the pairs:

    D    = (log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r))     c = chosen, r = rejected
    loss = -log sigmoid(beta * D)

Log-probs are sums over the RESPONSE tokens only (nano/align/logprobs.py). At the start pi = pi_ref, so
D = 0 and the loss is log 2. Two variants, each one line:
  * cDPO (label smoothing eps, Mitchell 2023): the label is wrong with probability eps,
        loss = -(1 - eps) log sigmoid(beta D) - eps log sigmoid(-beta D)
  * IPO (Azar et al. 2023): regress D to 1 / (2 beta) instead of pushing it to infinity,
        loss = (D - 1 / (2 beta))^2

A trap (footgun): the loss only asks that chosen gain on rejected. It is as happy when BOTH lose
likelihood, rejected faster — and on a small model that is what happens: the chosen answers, and the
model's own good answers with them, become less likely. The fix of RPO (Pang et al. 2024, "Iterative
Reasoning Preference Optimization") adds the SFT loss of the chosen answer, per token:
        loss = DPO + sft_weight * (-log pi(c) / |c|)

Lesson 9 runs it: `make lesson-9`. Tests: `.venv/bin/python -m pytest -q tests/test_09_dpo.py`.
"""

from typing import Sequence

import torch
import torch.nn.functional as F

from nano.text.padding import right_pad
from nano.align.logprobs import response_logprobs

LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss of a batch of pairs (each argument: (B,) summed response log-probs) and its metrics.

    metrics: rewards/chosen = beta (lp_c - ref_c), rewards/rejected = beta (lp_r - ref_r) (both (B,)),
    rewards/accuracy = share of pairs where the chosen implicit reward is higher, rewards/margin = mean
    of chosen - rejected.

    >>> loss, m = dpo_loss(torch.tensor([-10., -20.]), torch.tensor([-12., -18.]),
    ...                    torch.tensor([-11., -20.]), torch.tensor([-11., -19.]), beta=0.1)
    >>> round(loss.item(), 6), [round(r, 6) for r in m["rewards/chosen"].tolist()]
    (0.671268, [0.1, 0.0])
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    chosen_logratio = policy_chosen - ref_chosen  # (B,) how much more likely the policy makes c than ref does
    rejected_logratio = policy_rejected - ref_rejected  # (B,)
    d = chosen_logratio - rejected_logratio  # (B,)
    if loss_type == "ipo":
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
    rewards_chosen, rewards_rejected = beta * chosen_logratio.detach(), beta * rejected_logratio.detach()
    metrics = {
        "rewards/chosen": rewards_chosen,
        "rewards/rejected": rewards_rejected,
        "rewards/accuracy": (rewards_chosen > rewards_rejected).float().mean(),
        "rewards/margin": (rewards_chosen - rewards_rejected).mean(),
    }
    return losses.mean(), metrics


def chosen_nll(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The SFT loss of the chosen answers: mean over pairs of -log pi(c) / (tokens of c).

    >>> chosen_nll(torch.tensor([-10., -20.]), torch.tensor([5, 10]))    # (2 + 2) / 2
    tensor(2.)
    """
    return (-policy_chosen / chosen_tokens.clamp(min=1)).mean()


def preference_batch(items: Sequence[dict], max_len: int, pad_id: int = 0, device: str | torch.device = "cpu") -> dict:
    """Pairs -> one right-padded batch of 2B rows, chosen first then rejected, with response masks.

    Putting both halves in one batch runs the model once per step instead of twice.
    items: nano/text/bins.py PreferenceDataset items (chosen_ids / chosen_mask / rejected_ids / rejected_mask).
    """
    seqs = [it["chosen_ids"][:max_len] for it in items] + [it["rejected_ids"][:max_len] for it in items]
    masks = [it["chosen_mask"][:max_len] for it in items] + [it["rejected_mask"][:max_len] for it in items]
    ids, _ = right_pad(seqs, pad_id, device)  # (2B, T)
    response_mask, _ = right_pad(masks, 0, device)  # (2B, T): each mask is as long as its ids
    return {"ids": ids, "response_mask": response_mask, "pairs": len(items), "flaws": [it["flaw"] for it in items]}


def pair_logprobs(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed response log-probs, (B,) each, from one forward pass over the 2B rows."""
    seq_lp = response_logprobs(model, batch["ids"], batch["response_mask"])[0].sum(-1)  # (2B,): response tokens only
    return seq_lp[: batch["pairs"]], seq_lp[batch["pairs"]:]
