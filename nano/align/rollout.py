"""
What every preference and RL method needs (lessons 9-11): log-probabilities of a response, a frozen
reference, batches of sampled responses, KL estimators and rewards.

A "response" is what the model writes after a prompt. Every method here scores a response by the
sum (or mean) of the log-probabilities of ITS tokens only: the prompt was given, not chosen, and
padding is not text at all. We keep one layout for all of them, a right-padded batch

    ids            <bos> <sot> user ... <sot> model \\n  2 + 3 = 5 <eot>  <pad> <pad>     (B, T)
    response_mask    0     0    0  ...  0     0    0   1  1 1 1 1   1      0     0       (B, T)

and `token_logprobs(model, ids)[:, t]` = log p(ids[t + 1] | ids[:t + 1]), so the log-prob of the
token at position t is column t - 1: `response_mask[:, 1:]` picks exactly the response's columns.

The pieces, in the order the lessons meet them:
  * token_logprobs / sequence_logprob: the policy's (with gradients) and the reference's (without),
  * kl_estimates: k1, k2, k3 of "Approximating KL divergence" (Schulman, 2020),
  * sample_responses: G sampled answers per prompt with the KV cache (nano/model/generate.py: generate_batch),
  * math_rewards / the reward model's score: what an answer is worth,
  * load_policy: the model to train (full weights, LoRA, or LoRA on a 4-bit base) and its frozen reference.

How GRPO and PPO run these on the shared training loop (a rollout buffer per group of steps) is
nano/align/online_rl.py. Tests: `.venv/bin/python -m pytest -q tests/test_10_grpo.py tests/test_09_dpo.py`.
"""

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from nano.common.config import print_config
from nano.common.paths import SFT_CHECKPOINT, input_path
from nano.text.chat_format import stop_token_ids
from nano.model.generate import generate_batch
from nano.model.lora import inject_lora, load_adapter
from nano.checkpoints.checkpoint import base_identity, load_model, load_tokenizer
from nano.checkpoints.loading import quantize_base
from nano.eval.evaluate import is_correct
from nano.train.trainer import TrainConfig


@dataclass
class PolicyConfig(TrainConfig):
    """Where a preference or RL run starts and how its policy trains (lessons 9-11: begin_run, load_policy)."""

    checkpoint_path: str = field(default="", metadata={"help": f"policy to start from (default runs/{SFT_CHECKPOINT})"})
    adapter_path: str = field(default="", metadata={"help": "train this LoRA adapter on top of the checkpoint"})
    quantize: bool = field(default=False, metadata={"help": "NF4 base + LoRA adapter (QLoRA); the reference is the frozen 4-bit base"})
    lora_r: int = field(default=8, metadata={"help": "train a fresh LoRA adapter of this rank (0 = full weights)"})
    eval_problems: int = field(default=200, metadata={"help": "held-out TinyMath test problems graded before and after (0 = skip)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default, every core; 1 if another program keeps a core busy)"})


def begin_run(cfg: Any) -> Path:
    """What lessons 8-11 do first: print the config, seed torch, set its CPU threads; returns the
    checkpoint the run starts from (cfg.checkpoint_path, or lesson 5's model under runs/)."""
    print_config(cfg)
    torch.manual_seed(cfg.seed)
    if cfg.threads > 0:  # 0: torch's default, every core. On a quiet machine two threads halve a step
        torch.set_num_threads(cfg.threads)  # (whole answers make big batches); next to a busy program
        # they wait for each other at every operation: pass 1 then
    return input_path(cfg.checkpoint_path, SFT_CHECKPOINT)


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
                      hidden: torch.Tensor | None = None, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """token_logprobs, computed ONLY where response_mask[:, 1:] is 1 (0 elsewhere): (B, T - 1), and the
    entropy there if asked.

    The same numbers as token_logprobs(model, ids) * response_mask[:, 1:], several times cheaper: the
    (B, T, V) logits are the biggest tensor of the whole step, and most of a batch's positions are
    prompt or padding. So we run the layers on every token (attention needs the prompt) but the
    vocabulary projection only on the response's positions. `hidden`: model.forward_hidden(ids), if
    already computed (PPO's value head reads it too).
    """
    if hidden is None:
        hidden = model.forward_hidden(ids)  # (B, T, d)
    columns = response_mask[:, 1:].bool()  # (B, T-1): position t predicts token t + 1
    logp_all = F.log_softmax(model.lm_head(hidden[:, :-1][columns]), dim=-1)  # (n, V), n = response tokens
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


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is 1 (over everything, or along `dim`); 0 where there is nothing to average."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


@torch.no_grad()
def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The reference model: a copy that never trains (eval mode, no gradients).

    DPO, GRPO and PPO all measure how far the policy has moved from where it started; the
    reference IS where it started, so it must not move with it.
    """
    return copy.deepcopy(model).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# 2. KL between the policy and the reference, estimated from the sampled tokens


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
# 3. sampling a batch of responses


@dataclass
class Rollout:
    """Sampled responses, laid out for scoring: prompt + response, right-padded.

    ids (N, T) and response_mask (N, T) as in the module docstring; prompt_index[i] says which
    prompt row i answers (the G answers of one prompt are rows [g*G, (g+1)*G)); texts are the
    decoded responses (stop token removed); finished[i] is False when a response hit the length limit.
    """

    ids: torch.Tensor
    response_mask: torch.Tensor
    prompt_index: list[int]
    texts: list[str]
    finished: list[bool]
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
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        ids[row, : len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
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
    different answers, so their rewards can be compared.
    """
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.special_tokens.get("<pad>", 0)
    repeated = [list(p) for p in prompts for _ in range(group_size)]
    responses: list[list[int]] = []
    for start in range(0, len(repeated), batch_size):  # generate_batch runs the model in eval mode
        chunk = repeated[start : start + batch_size]
        responses += generate_batch(model, chunk, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    stop_tokens=stops, seed=None if seed is None else seed + start, pad_id=pad_id)
    device = next(model.parameters()).device
    ids, mask = pack_responses(repeated, responses, pad_id)
    texts = [tokenizer.decode([t for t in r if t not in stops]) for r in responses]
    finished = [bool(r) and r[-1] in stops for r in responses]
    return Rollout(ids.to(device), mask.to(device), [g for g in range(len(prompts)) for _ in range(group_size)],
                   texts, finished)


# ---------------------------------------------------------------------------------------------
# 4. rewards


def math_rewards(texts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """1.0 for an answer that ends in the right number, else 0.0 — graded by the evaluation's own
    extractor (nano/eval/evaluate.py: is_correct), so RL optimises exactly what lesson 12 measures.

    >>> math_rewards(["2 + 3 = 5.\\n#### 5", "#### 6"], ["5", "5"])
    tensor([1., 0.])
    """
    check_answers(answers)
    return torch.tensor([1.0 if is_correct(t, a) else 0.0 for t, a in zip(texts, answers)])


def check_answers(answers: Sequence[str | None]) -> None:
    """Refuse prompts that have no answer to grade against (the preference prompts, say)."""
    if any(a is None or str(a).strip() == "" for a in answers):
        raise ValueError("--reward math needs prompts with a verifiable numeric answer, and these have none: "
                         "use --prompts tinymath, or --reward rm (lesson 8's reward model, `make lesson-8`)")


# ---------------------------------------------------------------------------------------------
# 5. the policy to train and its reference


@dataclass
class Policy:
    """The model RL trains, its frozen reference, and what was loaded."""

    model: torch.nn.Module
    reference: torch.nn.Module
    tokenizer: Any
    checkpoint: dict  # the checkpoint it started from
    description: str
    lora: bool  # True: only LoRA adapters train (save them with save_adapter)
    identity: dict  # base identity for adapter files


def load_policy(checkpoint_path: str | Path, adapter_path: str | None = None, quantize: bool = False,
                lora_r: int = 0, lora_alpha: float = 16.0) -> Policy:
    """The policy and its frozen reference, in one of three set-ups:

      full weights (default)   every weight trains; reference = a frozen copy of the checkpoint
      --adapter_path / --lora_r  a LoRA adapter trains beside the frozen checkpoint (loaded from
                               the file, or fresh with rank lora_r); reference = the starting policy
      --quantize               the checkpoint's projections go to 4-bit NF4 first (QLoRA); a fresh
                               adapter (rank lora_r, 8 if unset) or the one in --adapter_path trains;
                               reference = the frozen 4-bit base (+ the adapter it started with)

    A missing checkpoint says which lesson makes it (nano/checkpoints/checkpoint.py); the tokenizer must be the
    one the checkpoint was trained with (load_tokenizer refuses another).
    """
    model, ckpt = load_model(checkpoint_path)
    tokenizer = load_tokenizer(ckpt.get("tokenizer_fingerprint"))
    identity = base_identity(ckpt)
    parts = [f"{checkpoint_path} (step {ckpt.get('step', '?')})"]
    if quantize:
        quantize_base(model, identity)
        parts.append("NF4-quantized base")
        lora_r = lora_r or 8
    if adapter_path:
        load_adapter(model, adapter_path, base_identity=identity)
        parts.append(f"+ LoRA adapter {adapter_path}")
    reference = frozen_copy(model)  # the starting policy, frozen (before any fresh adapter: B = 0 adds nothing)
    lora = bool(adapter_path) or lora_r > 0
    if lora and not adapter_path:
        inject_lora(model, r=lora_r, alpha=lora_alpha)
        parts.append(f"+ fresh LoRA r={lora_r}")
    elif adapter_path:  # load_adapter leaves the adapter trainable; freeze everything else
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    return Policy(model.train(), reference, tokenizer, ckpt, " ".join(parts), lora, identity)


def policy_state_for_saving(policy: Policy) -> dict:
    """What an RL checkpoint records besides the weights: enough for load_model and evaluation."""
    return {"model_config": asdict(policy.model.cfg), "tokenizer_fingerprint": policy.tokenizer.fingerprint(),
            "start_identity": policy.identity}


def group_std(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group standard deviation (Bessel-corrected), (N,) -> (N // group_size,); 0 for a group of one."""
    groups = x.view(-1, group_size)
    return groups.std(dim=1) if group_size > 1 else torch.zeros(groups.shape[0])


