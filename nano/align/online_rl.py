"""
Online RL on the shared training loop: what GRPO (lesson 10) and PPO (lesson 11) have in common.

The trainer (nano/train/trainer.py) asks for a batch per step and a loss per batch. Online RL fits that
shape with a rollout buffer: at the first step of each group of `epochs * minibatches` steps,
`OnlineRun.make_batch` samples a fresh buffer from the current policy (prompts_per_rollout x group_size
answers, nano/align/rollout.py: sample_responses), scores it (`Scorer`: the TinyMath grader or lesson 8's
reward model), and lets the method add what it needs (GRPO: group advantages; PPO: values, GAE).
Every step of the group then serves one shuffled minibatch of that buffer.

A run reads as four steps (`run_online_rl`): set it up (`set_up_run`: the policy, the prompts, the
reward, in one `OnlineRun`), measure where the policy starts, train on rollout buffers (the
OnlineRun's make_batch / loss / evaluate are what the shared loop calls), then save the best policy
and report before -> after.

Resume: eval_every is a multiple of the group, so a checkpoint always falls between groups and
--resume starts a fresh buffer exactly where the uninterrupted run would have (the sampling seed
depends only on (seed, group)). A Ctrl-C save in the middle of a group resumes by sampling that
group again from the saved weights: close, but not bit-identical.

Files of a run (runs/rlhf/online/<method>-<run_name>/): checkpoints/ckpt_best.pth and ckpt_last.pth
(the whole training state, for --resume), checkpoints/policy_best.pth (the policy alone as plain
weights: what lessons 12 and 13 load), adapter.pth (LoRA runs), metrics.jsonl, rl*.svg, report.json,
and (PPO) trace.jsonl: one answer per buffer, token by token.

Tests: `.venv/bin/python -m pytest -q tests/test_10_grpo.py tests/test_11_ppo.py`.
"""

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from nano.common.config import save_config
from nano.common.fileio import append_jsonl, read_jsonl, save_checkpoint, write_json
from nano.common.paths import REWARD_MODEL, RunPaths, input_path
from nano.common.plot import line_chart, write_svg
from nano.model.generate import eval_mode
from nano.model.lora import merge_lora, save_adapter
from nano.checkpoints.checkpoint import load_checkpoint
from nano.eval.grading import accuracy_with_stderr
from nano.eval.words_skill import evaluate_words, load_words_prompts
from nano.train.sft import math_accuracy
from nano.train.trainer import PROMPT_ORDER, Task, row_generator, shuffled_index, train
from nano.align.flaws import find_flaws
from nano.align.logprobs import group_std, response_logprobs
from nano.align.policy import Policy, PolicyConfig, begin_run, load_policy, policy_state_for_saving
from nano.align.reward_model import load_reward_model
from nano.align.rl_prompts import PromptSet, load_prompt_sets, report_prompts
from nano.align.rollout import Rollout, check_answers, check_words, math_rewards, sample_responses, words_rewards


@dataclass
class OnlineRLConfig(PolicyConfig):
    """Knobs shared by GRPO and PPO (lessons 10 and 11), with the defaults both use (fitted to the tiny
    preset on 2 CPU cores, chosen on the validation prompts; see the lesson docs); each lesson adds
    its own knobs and learning rate."""

    reward: str = field(default="math", metadata={"help": "math: graded answer (1/0); words: share of the required words "
                                                          "the story uses; rm: lesson 8's reward model",
                                                  "choices": ["math", "words", "rm"]})
    reward_model_path: str = field(default="", metadata={"help": f"reward model for --reward rm (default runs/{REWARD_MODEL})"})
    prompts: str = field(default="", metadata={"help": "tinymath: RL prompts with answers; words: 'use the words ...' requests; "
                                                       "preferences: lesson 0's preference prompts (no answers); '' = words for "
                                                       "--reward words, else tinymath",
                                               "choices": ["", "tinymath", "words", "preferences"]})
    val_prompts: int = field(default=200, metadata={"help": "prompts held out of training: choose settings and ckpt_best on these"})
    train_prompts: int = field(default=0, metadata={"help": "train on the first N training prompts only, many times each (0 = all); their greedy reward is reported too"})
    prompts_per_rollout: int = field(default=16, metadata={"help": "prompts per rollout buffer"})
    group_size: int = field(default=8, metadata={"help": "sampled answers per prompt"})
    max_new_tokens: int = field(default=0, metadata={"help": "longest sampled answer (0 = 80 tokens for TinyMath answers, "
                                                             "160 for stories)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of the rollouts"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of the rollouts (1 = off)"})
    epochs: int = field(default=1, metadata={"help": "passes over each rollout buffer"})
    minibatches: int = field(default=1, metadata={"help": "optimizer steps per pass (the buffer is split this many ways)"})
    clip_eps: float = field(default=0.2, metadata={"help": "ratio clip: pi/pi_old stays in [1 - eps, 1 + eps]"})
    pass_at_k: int = field(default=0, metadata={"help": "before and after: k sampled answers per held-out (and practised) "
                                                      "prompt, for pass@1 and pass@k (0 = off; math and words rewards)"})
    # shared-loop defaults for RL: a short run, no decay, a constant rate
    steps: int = field(default=40, metadata={"help": "optimizer steps"})
    eval_every: int = field(default=10, metadata={"help": "steps between held-out evaluations and checkpoints"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(default=5, metadata={"help": "linear warm-up steps"})
    schedule: str = field(default="constant", metadata={"help": "lr schedule after warm-up", "choices": ["cosine", "constant"]})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decay (matrices only)"})
    samples: int = field(default=2, metadata={"help": "held-out answers written at each evaluation"})
    batch_size: int = field(default=0, metadata={"help": "rows per optimizer step (0 = derived: buffer / minibatches)"})
    micro_batch_size: int = field(default=0, metadata={"help": "rows per forward pass (0 = the whole step)"})

    def __post_init__(self):
        self.prompts = self.prompts or ("words" if self.reward == "words" else "tinymath")
        self.max_new_tokens = self.max_new_tokens or (80 if self.prompts == "tinymath" else 160)
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0 (got {self.temperature}): greedy rollouts give every answer "
                             "of a group the same reward, and their tokens have no sampling distribution")
        if self.fast_dev_run:
            self.prompts_per_rollout, self.group_size, self.max_new_tokens = 2, 4, 24
            self.val_prompts, self.eval_problems = min(self.val_prompts, 8), min(self.eval_problems, 4)
        buffer = self.prompts_per_rollout * self.group_size
        if buffer % self.minibatches:
            raise ValueError(f"prompts_per_rollout * group_size ({buffer}) must split into {self.minibatches} minibatches")
        self.batch_size = buffer // self.minibatches
        self.micro_batch_size = self.micro_batch_size or self.batch_size
        super().__post_init__()
        # checkpoints only between buffers (see "Resume" above)
        per_buffer = self.epochs * self.minibatches
        self.eval_every = max(per_buffer, -(-self.eval_every // per_buffer) * per_buffer)

    @property
    def steps_per_rollout(self) -> int:
        return self.epochs * self.minibatches


class Scorer:
    """The reward of an answer: graded against the prompt's number (math), the share of the prompt's words
    it uses (words), or lesson 8's reward model (rm)."""

    def __init__(self, kind: str, tokenizer: Any, reward_model_path: str | Path = ""):
        self.kind, self.rm = kind, None
        if kind == "rm":
            self.rm = load_reward_model(input_path(reward_model_path, REWARD_MODEL), tokenizer.fingerprint())

    def check(self, prompts: PromptSet) -> None:
        """Fail before any sampling when the reward cannot grade these prompts."""
        if self.kind == "math":
            check_answers(prompts.answers)
        if self.kind == "words":
            check_words(prompts.answers)

    @torch.no_grad()
    def __call__(self, rollout: Rollout, answers: Sequence[Any]) -> torch.Tensor:
        if self.kind == "math":
            return math_rewards(rollout.texts, answers)
        if self.kind == "words":
            return words_rewards(rollout.texts, answers)
        device = rollout.ids.device
        self.rm.to(device)
        return self.rm(rollout.ids, real_lengths(rollout.response_mask)).float().cpu()


def real_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """Prompt + response tokens of each right-padded row: one past its last response token. (N, T) -> (N,)

    >>> real_lengths(torch.tensor([[0, 1, 1, 0], [0, 0, 0, 1]]))
    tensor([3, 4])
    """
    positions = torch.arange(response_mask.shape[1], device=response_mask.device)
    return (response_mask * positions).max(-1).values + 1


@dataclass
class BufferContext:
    """What a method's prepare(buffer, ctx) may read besides the freshly sampled and scored buffer."""

    model: torch.nn.Module  # the module the loop trains (the policy, or PPO's policy + value head)
    reference: torch.nn.Module  # the frozen reference policy
    cfg: Any  # the run's OnlineRLConfig (group_size, steps_per_rollout, ...)
    tokenizer: Any
    answers: list[str | None] = field(default_factory=list)  # the answer each row must reach (None: no answer)


@dataclass
class OnlineMethod:
    """What GRPO and PPO each bring to `run_online_rl`.

    train_model(policy_model) -> the module the loop trains (the policy, or policy + value head)
    policy_of(train_model)    -> the policy inside it (to sample, evaluate and save)
    prepare(buffer, ctx)      -> fill buffer.extra with per-row tensors (advantages, values, ...); ctx: a BufferContext
    loss(model, minibatch)    -> (scalar loss, {stat: float}) for one minibatch
    """

    name: str
    prepare: Callable[[Rollout, BufferContext], None]
    loss: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]
    train_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
    policy_of: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m


@torch.no_grad()
def buffer_logprobs(model: torch.nn.Module, buffer: Rollout, chunk: int = 64) -> torch.Tensor:
    """response_logprobs of a whole buffer without gradients, `chunk` rows at a time, in eval mode, at the
    temperature the buffer was sampled with: (N, T - 1)."""
    ids, mask = buffer.ids, buffer.response_mask
    with eval_mode(model):
        return torch.cat([response_logprobs(model, ids[i : i + chunk], mask[i : i + chunk], temperature=buffer.temperature)[0]
                          for i in range(0, ids.shape[0], chunk)])


def minibatch(buffer: Rollout, rows: torch.Tensor) -> dict:
    """Rows of the buffer, trimmed to the longest of them: ids, response_mask, every per-row extra, and the
    temperature the rows were sampled at (the loss computes its log-probs there)."""
    mask = buffer.response_mask[rows]
    width = max(int(real_lengths(mask).max()), 2)
    out = {"ids": buffer.ids[rows, :width], "response_mask": mask[:, :width], "temperature": buffer.temperature}
    for key, value in buffer.extra.items():
        if isinstance(value, torch.Tensor) and value.shape[0] == len(buffer):
            out[key] = value[rows][:, : width - 1] if value.dim() == 2 else value[rows]
    return out


def greedy_answers(model: torch.nn.Module, tokenizer: Any, prompts: PromptSet, max_new_tokens: int, batch_size: int = 100) -> Rollout:
    """The policy's greedy answer to each prompt (what evaluation and chat see)."""
    return sample_responses(model, tokenizer, prompts.ids, 1, max_new_tokens, temperature=0.0, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------
# the run, step by step: set up, measure the start, train on rollout buffers, report


@dataclass
class BufferState:
    """Where the loop is in its rollout buffers, and the stats gathered per step until they are logged."""

    group: int | None = None  # the group of steps the current buffer serves
    buffer: Rollout | None = None
    rollout_stats: dict[str, float] = field(default_factory=dict)  # the current buffer's reward, length, ...
    stats: dict[int, dict[str, list[float]]] = field(default_factory=dict)  # step -> stat -> values, until logged


@dataclass
class OnlineRun:
    """One online RL run: what it trains and on which prompts (set up once by `set_up_run`), and the
    pieces the shared loop calls at every step (make_batch, loss, evaluate, sample)."""

    cfg: OnlineRLConfig
    method: OnlineMethod
    policy: Policy  # the policy, its frozen reference, the tokenizer
    model: torch.nn.Module  # what the loop trains: method.train_model(policy.model)
    train_prompts: PromptSet
    val_prompts: PromptSet
    scorer: Scorer
    paths: RunPaths  # the run's folder and its files
    buffers: BufferState = field(default_factory=BufferState)
    last_eval_texts: list[str] = field(default_factory=list)  # held-out answers of the last evaluation

    @property
    def tokenizer(self) -> Any:
        return self.policy.tokenizer

    # -- held-out measurements

    def greedy_reward(self, model: torch.nn.Module, prompts: PromptSet) -> tuple[Rollout, torch.Tensor]:
        """The policy's greedy answers to `prompts`, and their rewards."""
        answers = greedy_answers(self.method.policy_of(model), self.tokenizer, prompts, self.cfg.max_new_tokens)
        return answers, self.scorer(answers, prompts.answers)

    def val_reward(self, model: torch.nn.Module) -> dict:
        """The mean greedy reward (and answer length) on the validation prompts; keeps a few answers to read."""
        answers, rewards = self.greedy_reward(model, self.val_prompts)
        self.last_eval_texts[:] = [f"{p}\n-> {t}" for p, t in zip(self.val_prompts.texts[: self.cfg.samples], answers.texts)]
        return {"val_reward": float(rewards.mean()), "val_response_len": float(answers.response_lengths.float().mean())}

    def practised_reward(self, model: torch.nn.Module) -> float | None:
        """The mean greedy reward on the practised training prompts (--train_prompts; None without)."""
        return float(self.greedy_reward(model, self.train_prompts)[1].mean()) if self.cfg.train_prompts else None

    def words_skill(self, out_jsonl: Path | None = None) -> dict:
        """--reward words: the held-out words skill (lesson 0's test requests, greedy; {} otherwise)."""
        if self.cfg.reward != "words" or not self.cfg.eval_problems:
            return {}
        prompts = load_words_prompts("test")[: self.cfg.eval_problems]
        result = evaluate_words(self.method.policy_of(self.model), self.tokenizer, prompts,
                                out_jsonl=out_jsonl)  # lesson 12's setting: whole stories, greedy
        return {k: result[k] for k in ("accuracy", "stderr", "n", "mean_share")}

    def heldout_prompts(self) -> PromptSet:
        """The first --eval_problems prompts that report the run (nano/align/rl_prompts.py: report_prompts)."""
        return report_prompts(self.cfg.prompts, self.tokenizer, self.cfg.val_prompts, self.cfg.eval_problems)

    def judged(self) -> dict:
        """--reward rm: the greedy answers to the report prompts, scored by the reward model AND by a judge the
        run does not optimise, the flaw checkers (nano/align/flaws.py): per prompt, to compare before -> after."""
        if self.cfg.reward != "rm" or not self.cfg.eval_problems:
            return {}
        prompts = self.heldout_prompts()
        answers, scores = self.greedy_reward(self.model, prompts)
        return {"scores": scores.tolist(), "flawed": [bool(find_flaws(t, i)) for t, i in zip(answers.texts, prompts.infos)]}

    def pass_rates(self) -> dict:
        """--pass_at_k k: k answers sampled (at the rollouts' temperature) per held-out prompt, and per practised
        one with --train_prompts. pass@1 = the share of samples that solve it (full reward), pass@k = the share
        of prompts with at least one: does RL teach new answers, or sharpen the ones it could already sample?"""
        cfg, k = self.cfg, self.cfg.pass_at_k
        if not k or cfg.reward == "rm":
            return {}
        sets = {"held_out": self.heldout_prompts()} | ({"practised": self.train_prompts} if cfg.train_prompts else {})
        out = {}
        for name, prompts in sets.items():
            rollout = sample_responses(self.method.policy_of(self.model), self.tokenizer, prompts.ids, k, cfg.max_new_tokens,
                                       cfg.temperature, seed=cfg.seed + 99, batch_size=128)
            solved = (self.scorer(rollout, [a for a in prompts.answers for _ in range(k)]) == 1.0).view(-1, k)
            out[name] = {"pass@1": float(solved.float().mean()), f"pass@{k}": float(solved.any(1).float().mean()),
                         "n": len(prompts)}
        return out

    def test_accuracy(self, out_jsonl: Path | None = None) -> dict:
        """Greedy TinyMath test accuracy of the policy ({} with --eval_problems 0)."""
        n_test = self.cfg.eval_problems
        return math_accuracy(self.method.policy_of(self.model), self.tokenizer, n_test, out_jsonl) if n_test else {}

    # -- the rollout buffer: sampled at the first step of each group of steps_per_rollout steps

    def new_buffer(self, group: int, device: str) -> Rollout:
        """Sample buffer `group` from the current policy, score it, and let the method prepare it."""
        cfg = self.cfg
        actor = self.method.policy_of(self.model)
        picks = [shuffled_index(cfg.seed, group * cfg.prompts_per_rollout + i, len(self.train_prompts), PROMPT_ORDER)
                 for i in range(cfg.prompts_per_rollout)]
        chosen = self.train_prompts.subset(picks)
        buffer = sample_responses(actor, self.tokenizer, chosen.ids, cfg.group_size, cfg.max_new_tokens, cfg.temperature,
                                  cfg.top_p if cfg.top_p < 1 else None, seed=cfg.seed * 1_000_003 + group)
        answers = [a for a in chosen.answers for _ in range(cfg.group_size)]
        rewards = self.scorer(buffer, answers)
        self.policy.reference.to(device)
        buffer.extra["rewards"] = rewards.to(device)
        self.method.prepare(buffer, BufferContext(self.model, self.policy.reference, cfg, self.tokenizer, answers))
        spread = group_std(rewards, cfg.group_size)
        self.buffers.rollout_stats = {
            "reward": float(rewards.mean()), "reward_group_std": float(spread.mean()),
            "groups_all_equal": float((spread == 0).float().mean()),
            "response_len": float(buffer.response_lengths.float().mean()),
            "finished": sum(buffer.finished) / len(buffer), **buffer.extra.pop("stats", {})}
        if "trace" in buffer.extra:  # one answer token by token (PPO: rewards, values, advantages)
            append_jsonl(self.paths.dir / "trace.jsonl", {"buffer": group, **buffer.extra.pop("trace")})
        return buffer

    def flush_stats(self, step: int) -> None:
        """Log the stats gathered over step `step` (reward, KL, clipping, ...) as one metrics line."""
        stats = self.buffers.stats.pop(step, None)
        if stats:
            row = {"step": step, **{k: round(sum(v) / len(v), 5) for k, v in stats.items()}}
            append_jsonl(self.paths.metrics, row)

    # -- what the shared loop calls (nano/train/trainer.py: Task)

    def make_batch(self, step: int, rows: list[int], device: str) -> dict:
        """Step `step`'s minibatch: a fresh buffer at the first step of a group, then shuffled rows of it."""
        cfg, state = self.cfg, self.buffers
        group, within = divmod(step, cfg.steps_per_rollout)
        if state.group != group:
            self.flush_stats(step - 1)
            state.buffer, state.group = self.new_buffer(group, device), group
            state.stats.setdefault(step, {})
            for k, v in state.rollout_stats.items():
                state.stats[step].setdefault(k, []).append(v)
        elif rows[0] == 0:
            self.flush_stats(step - 1)
        epoch, mb = divmod(within, cfg.minibatches)
        order = torch.randperm(len(state.buffer), generator=row_generator(cfg.seed, group, epoch))
        picked = order[torch.tensor(rows) + mb * cfg.batch_size].to(device)
        batch = minibatch(state.buffer, picked)
        batch["step"] = step
        return batch

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        value, stats = self.method.loss(model, batch)
        bucket = self.buffers.stats.setdefault(batch["step"], {})
        for k, v in stats.items():
            bucket.setdefault(k, []).append(float(v))
        return value

    def evaluate(self, model: torch.nn.Module) -> dict:
        return self.val_reward(model)

    def sample(self, model: torch.nn.Module) -> list[str]:
        return list(self.last_eval_texts)


def set_up_run(cfg: OnlineRLConfig, stage: str, method: OnlineMethod, start: Path) -> OnlineRun:
    """Step 1: the policy, its frozen reference, the prompts and the reward; the run's folder and config."""
    policy = load_policy(start, cfg.adapter_path or None, cfg.quantize, cfg.lora_r)
    tokenizer = policy.tokenizer
    train_prompts, val_prompts = load_prompt_sets(cfg.prompts, tokenizer, cfg.val_prompts)
    if cfg.train_prompts:  # practise a few problems many times (lesson 10's doc: practice vs transfer)
        train_prompts = train_prompts.subset(range(min(cfg.train_prompts, len(train_prompts))))
    scorer = Scorer(cfg.reward, tokenizer, cfg.reward_model_path)
    scorer.check(train_prompts)
    paths = RunPaths.of(stage, cfg.run_name, method=method.name)
    trainable = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    print(f"policy: {policy.description}; {trainable:,} trainable parameters")
    print(f"prompts: {len(train_prompts):,} {cfg.prompts} for training, {len(val_prompts)} held out; reward: {cfg.reward}")
    print(f"each buffer: {cfg.prompts_per_rollout} prompts x {cfg.group_size} answers, {cfg.epochs} epoch(s) x "
          f"{cfg.minibatches} minibatch(es) = {cfg.steps_per_rollout} optimizer step(s); writing to {paths.dir}")
    save_config(cfg, paths.dir)
    model = method.train_model(policy.model)
    return OnlineRun(cfg, method, policy, model, train_prompts, val_prompts, scorer, paths)


def save_best_policy(run: OnlineRun, start: Path, extra: dict) -> dict:
    """Step 4a: load the best checkpoint (by held-out reward) into the model and save the policy alone:
    the adapter (LoRA runs) and plain weights (policy_best.pth). Returns the best checkpoint."""
    best = load_checkpoint(run.paths.best)
    run.model.load_state_dict(best["model"])
    actor = run.method.policy_of(run.model)
    if run.policy.lora:  # the adapter alone: a small file for --adapter_path (lessons 12 and 13)
        path = save_adapter(actor, run.paths.adapter, run.policy.identity)
        print(f"adapter: {path} (on --checkpoint_path {start}{' --quantize' if run.cfg.quantize else ''})")
    # the policy alone as plain weights (no value head, adapters merged): what load_model, lesson 12
    # and lesson 13 read; ckpt_best.pth / ckpt_last.pth keep the whole training state for --resume
    plain = merge_lora(copy.deepcopy(actor)) if run.policy.lora else actor
    save_checkpoint(run.paths.policy,
                    {"model": plain.state_dict(), "step": best["step"], "val_reward": best.get("best_value"), **extra})
    return best


def run_online_rl(cfg: OnlineRLConfig, stage: str, method: OnlineMethod) -> dict:
    """Online RL on the shared loop: sample, score, let `method` turn scores into a loss, repeat.

    Writes runs/<stage>/<run_name>/ (checkpoints, metrics.jsonl, rl.svg, report.json) and returns the report.
    """
    start = begin_run(cfg)
    t0 = time.time()
    # 1. the policy, its frozen reference, the prompts and the reward
    run = set_up_run(cfg, stage, method, start)

    # 2. where the policy starts: held-out reward and TinyMath test accuracy
    before_val = run.val_reward(run.model)
    before_test = run.test_accuracy()
    words_before = run.words_skill()
    pass_before = run.pass_rates()
    judged_before = run.judged()
    practised_before = run.practised_reward(run.model)
    print(f"before: held-out reward {before_val['val_reward']:.3f}" +
          (f", TinyMath test {before_test['accuracy']:.1%} (± {before_test['stderr']:.1%})" if cfg.eval_problems else ""))

    # 3. train: each group of steps_per_rollout steps samples one buffer (run.make_batch)
    extra = policy_state_for_saving(run.policy)
    extra.update({"base_checkpoint": str(start), "method": method.name})
    task = Task(make_batch=run.make_batch, loss=run.loss, evaluate=run.evaluate, sample=run.sample, checkpoint_extra=extra,
                count_tokens=lambda b: int(b["response_mask"].sum()), best_metric="val_reward", higher_is_better=True)
    result = train(run.model, cfg, run.paths.dir, task)
    run.flush_stats(cfg.steps - 1)

    # 4. the best checkpoint (by held-out reward), graded on the test problems; curves; report
    best = save_best_policy(run, start, extra)
    after_test = run.test_accuracy(run.paths.dir / "tinymath_samples.jsonl")
    words_after = run.words_skill(run.paths.dir / "words_samples.jsonl")
    pass_after = run.pass_rates()
    judged_after = run.judged()
    practised_after = run.practised_reward(run.model)
    plot_rl_history(run.paths.metrics, run.paths.dir / "rl.svg", method.name)
    report = {
        "stage": stage, "method": method.name, "reward": cfg.reward, "best_step": best["step"],
        "val_reward_before": before_val["val_reward"], "val_reward_best": result.best_value,
        "tinymath_before": before_test.get("accuracy"), "tinymath_after": after_test.get("accuracy"),
        "tinymath_stderr_before": before_test.get("stderr"), "tinymath_stderr_after": after_test.get("stderr"),
        "tinymath_n": after_test.get("n"), "practised_reward_before": practised_before,
        "practised_reward_after": practised_after, "seconds": round(time.time() - t0, 1),
    }
    if pass_before:
        report.update(pass_at_k_before=pass_before, pass_at_k_after=pass_after)
    if judged_before:
        report.update(judge_report(judged_before, judged_after))
    if words_before:  # the words skill on held-out requests, before -> after
        report.update({f"words_{k}_{when}": r[k] for when, r in (("before", words_before), ("after", words_after))
                       for k in ("accuracy", "stderr", "mean_share")}, words_n=words_after["n"])
    write_json(run.paths.report, report)
    print_report(run, report)
    return report


def judge_report(before: dict, after: dict) -> dict:
    """Reward-model scores and flaw rates of the same report prompts before and after, with standard errors.
    A score's change is taken prompt by prompt (paired): only differences of scores mean something
    (lesson 8: Bradley-Terry fixes no zero), and pairing removes the spread between prompts."""
    change = torch.tensor(after["scores"]) - torch.tensor(before["scores"])
    n = len(change)
    out = {"report_n": n, "rm_score_before": sum(before["scores"]) / n, "rm_score_after": sum(after["scores"]) / n,
           "rm_score_change": float(change.mean()), "rm_score_change_stderr": float(change.std() / n**0.5) if n > 1 else None}
    for when, judged in (("before", before), ("after", after)):
        out[f"flaw_rate_{when}"], out[f"flaw_rate_stderr_{when}"] = accuracy_with_stderr(judged["flawed"])
    return out


def print_report(run: OnlineRun, report: dict) -> None:
    """Step 4b: before -> after, on the held-out prompts, the practised ones and the test problems."""
    print(f"\nheld-out reward ({len(run.val_prompts)} validation prompts, greedy): before {report['val_reward_before']:.3f} -> "
          f"best {report['val_reward_best']:.3f} at step {report['best_step']}")
    if run.cfg.train_prompts:
        print(f"the {len(run.train_prompts)} practised training prompts (greedy): before {report['practised_reward_before']:.3f} -> "
              f"after {report['practised_reward_after']:.3f} (step {report['best_step']})")
    if "report_n" in report:
        print(f"{report['report_n']} report prompts (greedy; they chose nothing): reward-model score "
              f"{report['rm_score_before']:+.2f} -> {report['rm_score_after']:+.2f}, change {report['rm_score_change']:+.2f} "
              f"(± {report['rm_score_change_stderr'] or 0:.2f}); answers the flaw checkers fault "
              f"{report['flaw_rate_before']:.1%} -> {report['flaw_rate_after']:.1%} (± {report['flaw_rate_stderr_after']:.1%})")
    if "words_n" in report:
        print(f"held-out words requests ({report['words_n']}, greedy): every word used {report['words_accuracy_before']:.1%} -> "
              f"{report['words_accuracy_after']:.1%} (± {report['words_stderr_after']:.1%}); share of words used "
              f"{report['words_mean_share_before']:.1%} -> {report['words_mean_share_after']:.1%}")
    for name, before in report.get("pass_at_k_before", {}).items():
        after, k = report["pass_at_k_after"][name], run.cfg.pass_at_k
        print(f"{name.replace('_', '-')} ({before['n']} prompts, {k} samples each at T={run.cfg.temperature}): pass@1 "
              f"{before['pass@1']:.1%} -> {after['pass@1']:.1%}, pass@{k} {before[f'pass@{k}']:.1%} -> {after[f'pass@{k}']:.1%}")
    if run.cfg.eval_problems:
        print(f"TinyMath test accuracy ({report['tinymath_n']} problems, greedy): before {report['tinymath_before']:.1%} -> "
              f"after {report['tinymath_after']:.1%} (± {report['tinymath_stderr_after']:.1%})")
    print(f"curves: {run.paths.dir / 'rl.svg'}; took {report['seconds']:.0f} s")


def plot_rl_history(metrics_path: Path, out: Path, name: str) -> None:
    """Reward, held-out reward, KL, clip fraction, entropy, length and value loss over the steps, as SVGs."""
    rows = read_jsonl(metrics_path) if metrics_path.exists() else []

    def series(key: str) -> list[tuple[float, float]]:
        return [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]

    write_svg(out, line_chart({"batch reward": series("reward"), "held-out reward (greedy)": series("val_reward")},
                              title=f"{name}: reward", xlabel="step", ylabel="mean reward"))
    others = {k: series(k) for k in ("kl", "clip_frac", "entropy", "value_loss", "explained_variance", "reward_group_std")
              if series(k)}
    write_svg(out.with_name(out.stem + "_stats.svg"), line_chart(others, title=f"{name}: KL, clipping, entropy",
                                                                   xlabel="step", ylabel="per token"))
    write_svg(out.with_name(out.stem + "_length.svg"), line_chart({"response length": series("response_len")},
                                                                    title=f"{name}: response length", xlabel="step",
                                                                    ylabel="tokens"))
