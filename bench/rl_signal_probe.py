"""
What can the SFT model learn from its own answers? A controlled probe for lesson 10's doc.

GRPO (lesson 10) did not raise greedy TinyMath accuracy. Is that the recipe, or the signal? This
script trains the same starting model (lesson 5's) with the same optimizer, the same loss (mean
log-likelihood of the target tokens) and the same number of answers per step, and changes only WHAT
it learns from:

    gold       worked solutions of TinyMath training problems (lesson 0's tinymath_train.jsonl): SFT
    own        the model's own sampled answers that reach the right number (rejection sampling,
               "RFT"/STaR: the positive half of GRPO's signal, no negatives)
    steps+     only the tokens of the model's own RIGHT arithmetic results ("... = 26" checked by
               nano/align/grpo.py: step_results): the cleanest positive signal a program can give
    steps+-    the same, plus pushing DOWN the tokens of its wrong results (step credit as in
               lesson 10's --step_credit, without the outcome term)

and prints the greedy reward on lesson 10's 200 validation prompts every --eval_every steps. The
test problems are never touched.

    .venv/bin/python bench/rl_signal_probe.py                      # all four, ~6 minutes on 2 cores
    .venv/bin/python bench/rl_signal_probe.py --sources own --prompts 16 --group 8
"""

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install
from nano.common.fileio import read_jsonl  # noqa: E402
from nano.common.paths import SFT_CHECKPOINT, raw_dir, runs_dir  # noqa: E402
from nano.text.chat_format import pad_token_id, render_prompt, render_response  # noqa: E402
from nano.align.grpo import step_credit_tensor  # noqa: E402
from nano.align.logprobs import response_logprobs  # noqa: E402
from nano.align.online_rl import greedy_answers, load_prompt_sets  # noqa: E402
from nano.align.policy import load_policy  # noqa: E402
from nano.align.rollout import math_rewards, pack_responses, sample_responses  # noqa: E402


def token_weights(source: str, policy, train_prompts, gold: list[dict], args, rng: random.Random, step: int):
    """One step's batch: ids, response_mask (N, T) and a weight per predicted token (N, T - 1).

    The loss is -sum(weight * log p) / sum(|weight|): weight 1 on every token of a gold or right answer,
    +1 / -1 on the tokens of right / wrong arithmetic results, 0 elsewhere."""
    tokenizer = policy.tokenizer
    if source == "gold":
        rows = rng.sample(gold, args.prompts * args.group)  # as many answers as the sampled sources use
        prompts = [render_prompt([{"role": "user", "content": r["question"]}], tokenizer) for r in rows]
        ids, mask = pack_responses(prompts, [render_response(r["answer"], tokenizer) for r in rows], pad_token_id(tokenizer))
        return ids, mask, mask[:, 1:].float()
    batch = train_prompts.subset(rng.sample(range(len(train_prompts)), args.prompts))
    rollout = sample_responses(policy.model, tokenizer, batch.ids, args.group, args.max_new_tokens,
                               temperature=args.temperature, seed=step)
    if source == "own":
        right = math_rewards(rollout.texts, [a for a in batch.answers for _ in range(args.group)])
        return rollout.ids, rollout.response_mask, rollout.response_mask[:, 1:].float() * right[:, None]
    penalty = 1.0 if source == "steps+-" else 0.0
    return rollout.ids, rollout.response_mask, step_credit_tensor(rollout, tokenizer, 1.0, penalty)


def probe(source: str, args) -> list[tuple[int, float, float]]:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    policy = load_policy(runs_dir() / SFT_CHECKPOINT)  # every weight trains, as in lesson 5
    model, tokenizer = policy.model, policy.tokenizer
    train_prompts, val_prompts = load_prompt_sets("tinymath", tokenizer, 200)
    gold = read_jsonl(raw_dir() / "tinymath_train.jsonl")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def val_reward() -> float:
        answers = greedy_answers(model, tokenizer, val_prompts, args.max_new_tokens)
        return float(math_rewards(answers.texts, val_prompts.answers).mean())

    history, start = [(0, val_reward(), 0.0)], time.time()
    for step in range(1, args.steps + 1):
        ids, mask, weight = token_weights(source, policy, train_prompts, gold, args, rng, step)
        model.train()
        logp, _ = response_logprobs(model, ids, mask)  # (N, T - 1), 0 off the response
        loss = -(weight * logp).sum() / weight.abs().sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.eval_every == 0:
            history.append((step, val_reward(), time.time() - start))
            print(f"  {source:8s} step {step:3d}: held-out greedy reward {history[-1][1]:.3f} ({history[-1][2]:.0f} s)", flush=True)
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", default="gold,own,steps+,steps+-")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval_every", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=128, help="prompts per step (gold: problems = prompts x group)")
    parser.add_argument("--group", type=int, default=1, help="sampled answers per prompt")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=80)
    parser.add_argument("--lr", type=float, default=2e-4, help="lesson 5's final learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for source in args.sources.split(","):
        results[source] = probe(source, args)
    steps = [s for s, _, _ in next(iter(results.values()))]
    print(f"\n# greedy reward on the 200 validation prompts; {args.prompts} x {args.group} answers per step, "
          f"AdamW lr {args.lr}, every weight trains\n")
    print("| learns from | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|" + "---:|" * len(steps))
    for source, history in results.items():
        print(f"| {source} | " + " | ".join(f"{r:.3f}" for _, r, _ in history) + " |")


if __name__ == "__main__":
    main()
