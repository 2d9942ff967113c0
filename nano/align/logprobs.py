"""
The maths every preference and RL method is built on (lessons 9-11): the log-probabilities of a
response, averages over its tokens, KL estimators, and PPO's clipped surrogate.

A "response" is what the model writes after a prompt. Every method here scores a response by the
sum (or mean) of the log-probabilities of ITS tokens only: the prompt was given, not chosen, and
padding is not text at all. We keep one layout for all of them, a right-padded batch

    ids            <bos> <sot> user ... <sot> model \\n  2 + 3 = 5 <eot>  <pad> <pad>     (B, T)
    response_mask    0     0    0  ...  0     0    0   1  1 1 1 1   1      0     0       (B, T)

and `token_logprobs(model, ids)[:, t]` = log p(ids[t + 1] | ids[:t + 1]), so the log-prob of the
token at position t is column t - 1: `response_mask[:, 1:]` picks exactly the response's columns.

Whose probabilities? Those of the distribution the tokens were DRAWN from. RL samples its answers at
a temperature T (lesson 10: 0.7), i.e. from softmax(logits / T), so every log-prob of a rollout — the
policy's, the policy that sampled it, the reference's — is computed at that T
(`response_logprobs(..., temperature=T)`). Computed at T = 1 instead, the importance ratio pi / pi_old
and the KL estimates would be about another distribution than the one the tokens came from, and k3
would no longer be unbiased (TRL's GRPO trainer scales its log-probs by the temperature for the same
reason). DPO scores fixed pairs nobody sampled: T = 1 there.

The pieces, in the order the lessons meet them:
  * token_logprobs / sequence_logprob: the policy's (with gradients) and the reference's (without),
  * masked_mean / group_std: averages over the response tokens, spreads over a group of answers,
  * kl_estimates: k1, k2, k3 of "Approximating KL divergence" (Schulman, 2020),
  * clipped_surrogate: PPO's clipped objective per token, the core of GRPO's and PPO's losses.

Where the responses come from (sampling, rewards) is nano/align/rollout.py; the policy and its
frozen reference, nano/align/policy.py. Tests: `.venv/bin/python -m pytest -q tests/test_09_dpo.py tests/test_10_grpo.py`.
"""

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# 1. log-probabilities of response tokens


def token_logprobs(model: torch.nn.Module, ids: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
    """log p(ids[:, t + 1] | ids[:, :t + 1]) for every t: (B, T) ids -> (B, T - 1) log-probs.

    One forward pass scores every position at once (teacher forcing), exactly what generating the
    same tokens one by one would have assigned them. Pass `logits` if you already ran the model.

        logits (B, T, V) -> log_softmax -> pick the column of the token that actually came next
    """
    if logits is None:
        logits = model(ids)[0]  # (B, T, V), fp32
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V): predictions for positions 1..T-1
    return logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)


def response_logprobs(model: torch.nn.Module, ids: torch.Tensor, response_mask: torch.Tensor,
                      hidden: torch.Tensor | None = None, with_entropy: bool = False,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """token_logprobs, computed ONLY where response_mask[:, 1:] is 1 (0 elsewhere): (B, T - 1), and the
    entropy there if asked, both of softmax(logits / temperature): the distribution the tokens were
    sampled from (see the module docstring; nano/model/generate.py: sampling_logprobs).

    The same numbers as token_logprobs(model, ids) * response_mask[:, 1:], several times cheaper: the
    (B, T, V) logits are the biggest tensor of the whole step, and most of a batch's positions are
    prompt or padding. So we run the layers on every token (attention needs the prompt) but the
    vocabulary projection only on the response's positions. `hidden`: model.forward_hidden(ids), if
    already computed (PPO's value head reads it too).
    """
    if temperature <= 0:
        raise ValueError(f"log-probs need a sampling temperature > 0, got {temperature} (greedy has no distribution)")
    if hidden is None:
        hidden = model.forward_hidden(ids)  # (B, T, d)
    columns = response_mask[:, 1:].bool()  # (B, T-1): position t predicts token t + 1
    logits = model.lm_head(hidden[:, :-1][columns])  # (n, V), n = response tokens
    logp_all = F.log_softmax(logits / temperature, dim=-1)  # (n, V)
    picked = logp_all.gather(-1, ids[:, 1:][columns].unsqueeze(-1)).squeeze(-1)  # (n,)
    logp = torch.zeros(columns.shape, dtype=picked.dtype, device=ids.device).masked_scatter(columns, picked)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            per_token = -(logp_all.exp() * logp_all).sum(-1)
            entropy = torch.zeros(columns.shape, device=ids.device).masked_scatter(columns, per_token)
    return logp, entropy


def sequence_logprob(token_lp: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sum of the response tokens' log-probs: (B, T - 1) log-probs, (B, T) mask -> (B,).

    log p(response | prompt) = sum over response tokens of log p(token | everything before it).
    """
    return (token_lp * response_mask[:, 1:].to(token_lp.dtype)).sum(-1)


# ---------------------------------------------------------------------------------------------
# 2. averages over response tokens, spreads over groups of answers


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is 1 (over everything, or along `dim`); 0 where there is nothing to average."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def group_std(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group standard deviation (Bessel-corrected), (N,) -> (N // group_size,); 0 for a group of one."""
    groups = x.view(-1, group_size)
    return groups.std(dim=1) if group_size > 1 else torch.zeros(groups.shape[0])


# ---------------------------------------------------------------------------------------------
# 3. KL between the policy and the reference, estimated from the sampled tokens


def kl_estimates(logp: torch.Tensor, ref_logp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token estimators of KL(policy || reference) from tokens sampled by the policy.

    With k1 = log p(x) - log q(x) (p the policy, q the reference, x ~ p):
      k1 = log p - log q            unbiased, but often negative, high variance
      k2 = k1^2 / 2                 biased, always >= 0, low variance
      k3 = exp(-k1) - 1 + k1        unbiased AND always >= 0 (r - 1 - log r with r = q / p):
                                    what GRPO puts in its loss (Schulman 2020, DeepSeekMath 2024)

    >>> kl = kl_estimates(torch.tensor([-1., -2., -.5]), torch.tensor([-1.2, -1.5, -.5]))
    >>> kl["k1"], kl["k3"]
    (tensor([ 0.2000, -0.5000,  0.0000]), tensor([0.0187, 0.1487, 0.0000]))
    """
    k1 = logp - ref_logp
    return {"k1": k1, "k2": 0.5 * k1**2, "k3": torch.exp(-k1) - 1 + k1}


# ---------------------------------------------------------------------------------------------
# 4. PPO's clipped surrogate: what GRPO (nano/align/grpo.py) and PPO (nano/align/ppo.py) both minimise


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped loss per token, max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), and where the clip was active.

    rho = exp(logp - old_logp). The max of the two (the min of the objectives) stops the update
    from gaining anything by moving rho beyond the clip range: once a token's probability has moved
    by eps in the direction A wants, its gradient is 0.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    return torch.maximum(unclipped, clipped), (clipped > unclipped)
