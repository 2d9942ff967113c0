"""
PPO for language models (Schulman et al. 2017; as used for RLHF by Ziegler et al. 2019 and
InstructGPT, Ouyang et al. 2022): an actor (the policy) and a critic (a value estimate per token).

Writing an answer is a sequence of actions, one token each. The reward arrives once, at the end —
the score of the whole answer — plus a small penalty at every token for drifting from the reference:

    r_t = -kl_coef * (log pi_old(token_t) - log pi_ref(token_t))      for every response token
    r_T += score(answer)                                             at the last response token

(every log-prob here, pi, pi_old and pi_ref, is of the distribution the tokens were sampled from,
softmax(logits / temperature): nano/align/logprobs.py says why)

The critic V_t guesses the return to come from each position. Generalised Advantage Estimation
(GAE, Schulman et al. 2016) turns rewards and values into per-token advantages, going backwards:

    delta_t = r_t + gamma V_{t+1} - V_t           A_t = delta_t + gamma lambda A_{t+1}
    returns R_t = A_t + V_t  (the critic's target);  A is whitened (mean 0, std 1) over the buffer

and the actor and critic learn from the same buffer for several epochs, each clipped so that no
step moves far from the policy that sampled the buffer:

    policy loss = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))      rho = pi / pi_old
    value loss  = 0.5 mean_t max((V_t - R_t)^2, (clip(V_t, V_old - eps_v, V_old + eps_v) - R_t)^2)

The critic here is a value head on the policy's own backbone: one linear layer reading the hidden
state that also feeds the LM head (`ActorCritic`). One forward pass gives both logits and values,
which halves the cost of a separate critic model on our two CPU cores; the price is that the value
loss also moves the policy's shared layers, so it is scaled down (vf_coef). A separate critic
(InstructGPT's choice: a copy of the reward model) keeps the two apart at twice the compute.

Lesson 11 runs it: `make lesson-11`. Tests: `.venv/bin/python -m pytest -q tests/test_11_ppo.py`.
"""

import torch
import torch.nn as nn

from nano.model.generate import eval_mode
from nano.align.logprobs import clipped_surrogate, kl_estimates, masked_mean, response_logprobs
from nano.align.online_rl import BufferContext, OnlineMethod, buffer_logprobs
from nano.align.rollout import Rollout


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns. rewards, values, mask: (B, T) -> (advantages, returns).

    Positions where mask is 0 (prompt, padding) are outside the episode: they get 0 and pass nothing
    back. After an answer's last token the episode is over, so V_{t+1} = 0 there.

    >>> adv, ret = gae(torch.tensor([[0., 0., 1.]]), torch.tensor([[.5, .6, .7]]), torch.ones(1, 3), 1.0, 0.95)
    >>> adv    # delta = [0.1, 0.1, 0.3]; A_2 = 0.3, A_1 = 0.1 + 0.95 * 0.3, A_0 = 0.1 + 0.95 * 0.385
    tensor([[0.4657, 0.3850, 0.3000]])
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # V_{t+1}: 0 after the last token
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        # outside the episode (mask 0) nothing flows back: the next step back sees V = 0, A = 0
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantages[:, t]
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (0 elsewhere): advantages on one scale whatever the reward's."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the response tokens: how much of the returns the critic predicts.

    1: it knows each return before the answer is written; 0: no better than a constant; below 0: worse
    than one. GRPO has no critic and needs none; PPO's advantages are only as good as this number.

    >>> explained_variance(torch.tensor([1., 2., 3.]), torch.tensor([1., 2., 4.]), torch.ones(3))
    0.8571428571428571
    """
    picked = mask.bool()
    r, v = returns[picked].double(), values[picked].double()
    spread = r.var(unbiased=False)
    return float(1 - (r - v).var(unbiased=False) / spread) if spread > 0 else 0.0


def token_trace(buffer: Rollout, tokenizer, rewards: torch.Tensor, values: torch.Tensor, advantages: torch.Tensor,
                returns: torch.Tensor) -> dict:
    """One answer of the buffer token by token (the best-scored one): what PPO sees at each step."""
    row = int(buffer.extra["rewards"].argmax())
    columns = buffer.response_mask[row, 1:].nonzero().squeeze(-1).tolist()  # column c scores token c + 1
    out = {"score": float(buffer.extra["rewards"][row]), "prompt": tokenizer.decode(buffer.ids[row, :columns[0] + 1].tolist()),
           "tokens": [tokenizer.decode([int(buffer.ids[row, c + 1])]) for c in columns]}
    for name, x in (("reward", rewards), ("value", values), ("advantage", advantages), ("return", returns)):
        out[name] = [round(float(x[row, c]), 4) for c in columns]
    return out


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over response tokens of the clipped surrogate (nano/align/logprobs.py: clipped_surrogate); and the clip fraction.

    >>> loss, _ = ppo_policy_loss(torch.tensor([-.5, -1., -.2]), torch.tensor([-.7, -.9, -.2]),
    ...                           torch.tensor([1., -1., .5]), torch.ones(3), 0.2)
    >>> round(loss.item(), 6)
    -0.265054
    """
    per_token, was_clipped = clipped_surrogate(logp, old_logp, advantages, clip_eps)
    return masked_mean(per_token, mask), masked_mean(was_clipped.float(), mask)


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_eps: float = 0.2) -> torch.Tensor:
    """0.5 * mean over response tokens of max((V - R)^2, (V_old + clip(V - V_old, +-eps) - R)^2).

    >>> ppo_value_loss(torch.tensor([1., 0.]), torch.tensor([.5, .1]), torch.tensor([1.2, -.5]), torch.ones(2), 0.2)
    tensor(0.1250)
    """
    clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


class ActorCritic(nn.Module):
    """The policy (a GemmaNano) and a value head reading the same final hidden states.

    forward(ids) -> (logits (B, T, V), values (B, T)): V[:, t] estimates the return of the answer
    from the state "ids up to t", i.e. before choosing token t + 1 — the same columns as
    token_logprobs[:, t].
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.cfg.d_model, 1)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: the first advantages are the rewards
        nn.init.zeros_(self.value_head.bias)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.policy.forward_hidden(ids)  # (B, T, d)
        return self.policy.lm_head(hidden), self.values(hidden)

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, d) hidden states -> (B, T) value estimates."""
        return self.value_head(hidden).squeeze(-1).float()


def ppo_method(kl_coef: float, clip_eps: float = 0.2, value_clip: float = 0.2, vf_coef: float = 0.1,
               gamma: float = 1.0, lam: float = 0.95) -> OnlineMethod:
    """Prepare: old log-probs, reference log-probs, old values, per-token rewards, GAE. Loss: actor + critic."""

    def prepare(buffer: Rollout, ctx: BufferContext) -> None:
        model, device = ctx.model, buffer.ids.device
        mask = buffer.response_mask[:, 1:].float()  # (N, T-1): columns of response tokens
        old_logp = buffer_logprobs(model.policy, buffer)
        ref_logp = buffer_logprobs(ctx.reference, buffer)
        with torch.no_grad(), eval_mode(model):
            old_values = torch.cat([model.values(model.policy.forward_hidden(buffer.ids[i:i + 64]))[:, :-1]
                                    for i in range(0, len(buffer), 64)])
        # per-token reward: the KL penalty everywhere, the answer's score at its last token
        rewards = -kl_coef * (old_logp - ref_logp) * mask
        last = (mask * torch.arange(mask.shape[1], device=device)).argmax(-1)  # (N,) column of the last token
        rewards[torch.arange(len(buffer), device=device), last] += buffer.extra["rewards"].to(device)
        advantages, returns = gae(rewards, old_values * mask, mask, gamma, lam)
        buffer.extra.update(old_logprobs=old_logp, ref_logprobs=ref_logp, old_values=old_values,
                            returns=returns, advantages=whiten(advantages, mask))
        buffer.extra["stats"] = {"explained_variance": explained_variance(old_values, returns, mask)}
        buffer.extra["trace"] = token_trace(buffer, ctx.tokenizer, rewards, old_values, advantages, returns)

    def loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        hidden = model.policy.forward_hidden(batch["ids"])  # (B, T, d): one pass for the actor and the critic
        logp, entropy = response_logprobs(model.policy, batch["ids"], batch["response_mask"], hidden, with_entropy=True,
                                          temperature=batch["temperature"])  # at the sampling temperature
        values = model.values(hidden)  # (B, T)
        mask = batch["response_mask"][:, 1:].float()
        policy_loss, clip_frac = ppo_policy_loss(logp, batch["old_logprobs"], batch["advantages"], mask, clip_eps)
        value_loss = ppo_value_loss(values[:, :-1], batch["old_values"], batch["returns"], mask, value_clip)
        with torch.no_grad():
            stats = {"policy_loss": float(policy_loss), "value_loss": float(value_loss), "clip_frac": float(clip_frac),
                     "kl": float(masked_mean(kl_estimates(logp, batch["ref_logprobs"])["k3"], mask)),
                     "entropy": float(masked_mean(entropy, mask))}
        return policy_loss + vf_coef * value_loss, stats

    return OnlineMethod("ppo", prepare, loss, train_model=ActorCritic, policy_of=lambda m: m.policy)
