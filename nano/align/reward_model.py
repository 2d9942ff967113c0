"""
A reward model: the SFT model with its language-model head swapped for one number, "how good is this
answer to this prompt", learned from pairs of answers where we know which one is better.

    prompt + answer  ->  backbone (the SFT model's layers)  ->  hidden state of the LAST real token
                     ->  linear head (d_model -> 1)          ->  score r

The last token is the one that has read everything (causal attention): prompt, answer and the
<end_of_turn> that closes it. Padding is on the right and never read (`last_token_index`).

Training (Bradley-Terry model, as in InstructGPT, Ouyang et al. 2022): for a prompt with a chosen
answer c and a rejected answer r, the model says P(c better than r) = sigmoid(r_c - r_r), and we
maximise its log-likelihood:

    loss = -log sigmoid(r_chosen - r_rejected)

Only differences of scores enter the loss: adding a constant to every score changes nothing, so the
zero is arbitrary (the sigmoid does fix the unit: a difference of 1 means odds of e to 1). Lesson 11
(PPO, `--reward rm`) uses the raw score; its advantages are whitened, which removes any offset.

    rm = RewardModel.from_checkpoint("runs/sft/full/default/checkpoints/ckpt_best.pth")
    scores = rm(ids, lengths)          # (B,)

Ask a trained one what it pays for (lesson 11 uses this to find what PPO learned to exploit):

    python -m nano.align.reward_model --prompt "Tell me a story with the words moon, cake and dog." \
        --answer "Once upon a time, ..." --answer "Once upon a time, ... And that was a very good day."

Lesson 8 trains one: `make lesson-8`. Tests: `.venv/bin/python -m pytest -q tests/test_08_reward_model.py`.
"""

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nano.text.chat_format import pad_token_id, render_prompt, render_response
from nano.text.padding import right_pad
from nano.model.gemma import GemmaNano, ModelConfig
from nano.checkpoints.checkpoint import load_checkpoint, load_model, load_tokenizer
from nano.common.paths import REWARD_MODEL, input_path


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected) over the pairs.

    Equal scores cost log 2 = 0.693 (a coin flip); a large positive margin costs ~0.
    logsigmoid is computed stably (no exp overflow for large margins).

    >>> bradley_terry_loss(torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0]))   # (0.3133 + 0.9741) / 2
    tensor(0.6437)
    """
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def last_token_index(lengths: torch.Tensor) -> torch.Tensor:
    """Column of each row's last real token in a right-padded batch: lengths (B,) -> (B,) = lengths - 1."""
    if (lengths < 1).any():
        raise ValueError("every sequence needs at least one token")
    return lengths - 1


class RewardModel(nn.Module):
    """A GemmaNano backbone (its layers and final norm) + a linear head read at the last real token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone = GemmaNano(cfg)
        self.cfg = cfg
        # one number per sequence; starts at 0 (weights 0) so the first losses are exactly log 2
        self.head = nn.Linear(cfg.d_model, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> tuple["RewardModel", dict]:
        """A reward model whose backbone starts as the checkpoint's model (the SFT model in lesson 8)."""
        base, ckpt = load_model(path)
        rm = cls(base.cfg)
        rm.backbone.load_state_dict(base.state_dict())
        return rm, ckpt

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded, lengths (B,) real tokens per row -> scores (B,)."""
        hidden = self.backbone.forward_hidden(ids)  # (B, T, d): no LM head, no logits
        last = last_token_index(lengths.to(ids.device))  # (B,)
        picked = hidden[torch.arange(ids.shape[0], device=ids.device), last]  # (B, d)
        return self.head(picked.float()).squeeze(-1)  # (B,)


def pair_batch(items: Sequence[dict], max_len: int, pad_id: int = 0, device: str | torch.device = "cpu") -> dict:
    """Preference pairs (nano/text/bins.py: PreferenceDataset items) -> chosen and rejected, each right-padded.

    Sequences longer than max_len keep their first max_len tokens (lesson 8 skips such pairs, so
    this only guards the model's context).
    """
    chosen, chosen_len = right_pad([it["chosen_ids"][:max_len] for it in items], pad_id, device)
    rejected, rejected_len = right_pad([it["rejected_ids"][:max_len] for it in items], pad_id, device)
    return {"chosen": chosen, "chosen_len": chosen_len, "rejected": rejected, "rejected_len": rejected_len,
            "flaws": [it["flaw"] for it in items]}


# ---------------------------------------------------------------------------------------------
# files: a reward model knows its tokenizer, and is refused with another one

REWARD_MODEL_FORMAT = "nano-reward-model"


def reward_model_extra(rm: RewardModel, tokenizer_fingerprint: str, base_checkpoint: str) -> dict[str, Any]:
    """What a reward-model checkpoint records besides its weights (the trainer adds them to each save)."""
    return {"format": REWARD_MODEL_FORMAT, "model_config": asdict(rm.cfg),
            "tokenizer_fingerprint": tokenizer_fingerprint, "base_checkpoint": base_checkpoint}


def load_reward_model(path: str | Path, tokenizer_fingerprint: str | None = None, device: str = "cpu") -> RewardModel:
    """Load lesson 8's reward model, frozen, in eval mode.

    `tokenizer_fingerprint` is the tokenizer of the policy that will be scored: a reward model trained
    on other token ids would read the policy's answers as gibberish and score nonsense without any
    error, so a mismatch is refused here.
    """
    ckpt = load_checkpoint(path)  # a missing file says "run `make lesson-8` first" (runs/rm/...)
    if ckpt.get("format") != REWARD_MODEL_FORMAT:
        raise ValueError(f"{path} is not a reward model (lesson 8 writes one to runs/rm/default/checkpoints/)")
    if tokenizer_fingerprint is not None and ckpt.get("tokenizer_fingerprint") != tokenizer_fingerprint:
        raise ValueError(
            f"the reward model {path} was trained with tokenizer {ckpt.get('tokenizer_fingerprint')}, but the policy "
            f"uses {tokenizer_fingerprint}: retrain it on this policy's tokenizer with `make lesson-8`")
    rm = RewardModel(ModelConfig(**ckpt["model_config"]))
    rm.load_state_dict(ckpt["model"])
    return rm.to(device).eval().requires_grad_(False)


@torch.no_grad()
def score_answers(rm: RewardModel, tokenizer, prompt: str, answers: Sequence[str]) -> list[float]:
    """The score of each answer to a one-turn `prompt`, laid out as lesson 8's pairs are: the rendered
    prompt, the answer, <end_of_turn> (nano/text/bins.py: write_preference_bins)."""
    prompt_ids = render_prompt([{"role": "user", "content": prompt}], tokenizer)
    ids, lengths = right_pad([prompt_ids + render_response(a, tokenizer) for a in answers], pad_token_id(tokenizer))
    return rm(ids, lengths).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description="Score answers to one prompt with lesson 8's reward model.")
    parser.add_argument("--prompt", required=True, help="the user's message")
    parser.add_argument("--answer", action="append", required=True, help="an answer to score (repeat the flag)")
    parser.add_argument("--reward_model_path", default="", help=f"default runs/{REWARD_MODEL}")
    args = parser.parse_args()
    tokenizer = load_tokenizer()
    rm = load_reward_model(input_path(args.reward_model_path, REWARD_MODEL), tokenizer.fingerprint())
    for answer, score in zip(args.answer, score_answers(rm, tokenizer, args.prompt, args.answer)):
        shown = answer if len(answer) <= 70 else f"{answer[:30]} ... {answer[-35:]}"
        print(f"{score:+7.2f}  {shown!r}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # no reward model, another tokenizer: say what to run
        raise SystemExit(f"error: {e}")
