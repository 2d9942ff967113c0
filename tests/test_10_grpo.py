"""
Exercise: GRPO (nano/align/grpo.py, lesson 10) and the online-RL pieces it shares with PPO: the log-prob maths
(nano/align/logprobs.py) and the rollouts (nano/align/rollout.py).

1. Group advantages: (r - group mean) / (group std + eps), std with Bessel's correction.
2. One GRPO step on a toy problem where one answer is rewarded makes that answer more likely; a group
   whose rewards are all equal contributes no gradient at all.
3. Aggregation: "token" weighs every response token the same; "sequence" weighs a token by 1 / the
   length of its answer (the length bias).
4. Step credit finds each written "a op b = c" and whether it is right, at the tokens of c.
5. The lesson runs end to end, and refuses a math reward on prompts that have no answer.
"""

import json
from types import SimpleNamespace

import pytest
import torch

from adapters import impl
from conftest import run_lesson

grpo = impl("grpo")
logprobs = impl("logprobs")
rollout = impl("rollout")
policy = impl("policy")
online_rl = impl("online_rl")
model_lib = impl("gemma")


# token ids as text ("3 4"), with the special tokens sampling needs
TOY_TOKENIZER = SimpleNamespace(special_tokens={"<pad>": 0, "<eos>": 1, "<end_of_turn>": 3},
                                decode=lambda ids: " ".join(map(str, ids)))


def small_model(seed: int = 0, vocab: int = 12):
    torch.manual_seed(seed)
    cfg = model_lib.model_config("tiny", vocab_size=vocab, context_len=16, d_model=32, n_layers=1, n_heads=2, head_dim=16,
                                 d_ff=64, sliding_window=8, query_pre_attn_scalar=16.0, attn_impl="eager")
    return model_lib.GemmaNano(cfg)


def test_group_advantages_check_vector():
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4)
    assert torch.allclose(adv, torch.tensor([0.865875, -0.865875, -0.865875, 0.865875]), atol=1e-6)
    # groups are normalised separately; a group with equal rewards gets zeros
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2)
    assert adv[2:].abs().max() == 0 and adv[0] > 0 > adv[1]
    with pytest.raises(ValueError, match="groups"):
        grpo.group_advantages(torch.ones(5), group_size=2)


def test_group_advantages_use_each_groups_own_spread():
    """Two groups of very different spread: each answer is scored against ITS group's mean and std
    (Bessel-corrected, + eps = 1e-4), not the whole batch's. Worked by hand:
    group 1 = 0, .1, .2, .3: mean .15, std sqrt(.05 / 3) = 0.129099  -> +-.15 / 0.129199, +-.05 / 0.129199
    group 2 = 0, 10, 20, 30: mean 15,  std sqrt(500 / 3) = 12.909944 -> +-15 / 12.910044,  +-5 / 12.910044
    group 3 = 5, 5, 5, 5:    std 0                                   -> 0 (a group that teaches nothing)"""
    rewards = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.0, 10.0, 20.0, 30.0, 5.0, 5.0, 5.0, 5.0])
    adv = grpo.group_advantages(rewards, group_size=4)
    expected = torch.tensor([-1.160996, -0.386999, 0.386999, 1.160996,
                             -1.161886, -0.387295, 0.387295, 1.161886,
                             0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(adv, expected, atol=1e-5)


def toy_buffer(answers: list[int], rewards: list[float]) -> "rollout.Rollout":
    """One prompt [1, 2] answered with one token each (as if sampled at temperature 1); rewards given."""
    ids, mask = rollout.pack_responses([[1, 2]] * len(answers), [[a] for a in answers], pad_id=0)
    buffer = rollout.Rollout(ids, mask, [0] * len(answers), [str(a) for a in answers], [True] * len(answers), temperature=1.0)
    buffer.extra["rewards"] = torch.tensor(rewards)
    return buffer


def prob_of(model, token: int) -> float:
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([[1, 2]]))[0][0, -1], -1)[token].item()


def one_step(method, model, buffer, group_size, lr=0.05, train_model=None):
    train_model = train_model or model
    ctx = online_rl.BufferContext(model=train_model, reference=policy.frozen_copy(model), tokenizer=TOY_TOKENIZER,
                                  cfg=SimpleNamespace(group_size=group_size, steps_per_rollout=1))
    method.prepare(buffer, ctx)
    batch = online_rl.minibatch(buffer, torch.arange(len(buffer)))
    loss, stats = method.loss(train_model, batch)
    train_model.zero_grad()
    loss.backward()
    grads = [p.grad for p in train_model.parameters() if p.grad is not None]
    with torch.no_grad():
        for p in train_model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    return grads, stats


def test_one_grpo_step_raises_the_rewarded_answer():
    model = small_model()
    before = prob_of(model, 4)
    _, stats = one_step(grpo.grpo_method(beta=0.04), model, toy_buffer([3, 4, 5, 4], [0, 1, 0, 1]), group_size=4)
    assert prob_of(model, 4) > before
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6)  # first step: the policy is still its reference


SAMPLED_AT = 0.7  # the multi-token buffer's temperature: every log-prob of the loss must be at it


def multi_token_buffer() -> "rollout.Rollout":
    """One prompt [1, 2] answered four times with answers of 2, 3, 2 and 1 tokens (right-padded), sampled
    at temperature SAMPLED_AT."""
    answers, rewards = [[3, 4], [5, 6, 7], [3, 9], [8]], [1.0, 0.0, 1.0, 0.0]
    ids, mask = rollout.pack_responses([[1, 2]] * 4, answers, pad_id=0)
    buffer = rollout.Rollout(ids, mask, [0] * 4, [str(a) for a in answers], [True] * 4, temperature=SAMPLED_AT)
    buffer.extra["rewards"] = torch.tensor(rewards)
    return buffer


def tempered_logprobs(model, buffer) -> torch.Tensor:
    """log softmax(logits / T) at each response token, by hand from the full logits, 0 elsewhere: (N, T - 1)."""
    with torch.no_grad():
        logits = model(buffer.ids)[0][:, :-1].float() / buffer.temperature
    picked = torch.log_softmax(logits, -1).gather(-1, buffer.ids[:, 1:, None])[..., 0]
    return picked * buffer.response_mask[:, 1:]


def sgd_step(model, loss, lr):
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad


def test_grpo_two_epochs_on_multi_token_answers_match_the_formula():
    """Two updates on one buffer of multi-token answers (steps_per_rollout = 2). prepare stores the sampling
    policy's log-probs; on the first update the ratio is 1 (loss = -token mean of A, nothing clipped), on
    the second the ratio has moved and the loss is, by hand, the token mean of
    max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) + beta * k3, with the clip fraction counted the same way.
    Every log-prob (policy, old, reference) is of softmax(logits / T), T the buffer's sampling temperature."""
    model, reference = small_model(), small_model(seed=1)  # a reference other than the policy: k3 > 0
    buffer, clip_eps, beta = multi_token_buffer(), 0.2, 0.1
    method = grpo.grpo_method(beta=beta, clip_eps=clip_eps)
    ctx = online_rl.BufferContext(model=model, reference=policy.frozen_copy(reference), tokenizer=TOY_TOKENIZER,
                                  cfg=SimpleNamespace(group_size=4, steps_per_rollout=2))
    method.prepare(buffer, ctx)
    mask = buffer.response_mask[:, 1:].float()  # (4, T - 1) response columns
    adv = grpo.group_advantages(buffer.extra["rewards"], 4)
    assert torch.allclose(buffer.extra["advantages"], adv)
    old, ref = tempered_logprobs(model, buffer), tempered_logprobs(reference, buffer)
    assert torch.allclose(buffer.extra["old_logprobs"], old, atol=1e-6)
    assert torch.allclose(buffer.extra["ref_logprobs"], ref, atol=1e-6)

    def by_hand():
        logp = tempered_logprobs(model, buffer)
        ratio = torch.exp(logp - old)
        a = adv[:, None].expand_as(logp)
        per_token = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_eps, 1 + clip_eps))
        per_token = per_token + beta * (torch.exp(ref - logp) - 1 - (ref - logp))  # k3 with log r = ref - logp
        clipped = (-a * ratio.clamp(1 - clip_eps, 1 + clip_eps) > -a * ratio).float()
        return (per_token * mask).sum() / mask.sum(), (clipped * mask).sum() / mask.sum(), ratio

    batch = online_rl.minibatch(buffer, torch.arange(4))
    expected, expected_clip, _ = by_hand()
    loss, stats = method.loss(model, batch)
    k3_first = (beta * (torch.exp(ref - old) - 1 - (ref - old)) * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx((-(adv[:, None] * mask).sum() / mask.sum() + k3_first).item(), abs=1e-5)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5) and stats["clip_frac"] == 0
    sgd_step(model, loss, lr=2.0)

    expected, expected_clip, ratio = by_hand()
    assert (ratio[mask.bool()] - 1).abs().max() > clip_eps  # the first update moved some token beyond the clip
    loss, stats = method.loss(model, online_rl.minibatch(buffer, torch.arange(4)))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert stats["clip_frac"] == pytest.approx(expected_clip.item()) and stats["clip_frac"] > 0


@pytest.mark.parametrize("temperature", [0.7, 1.6])
def test_the_loss_recomputes_the_log_probs_the_sampler_drew_with(temperature):
    """Rollouts sampled at T != 1: before any update, the log-prob the loss computes for each response
    token (buffer_logprobs, response_logprobs at the buffer's temperature) is the log-prob the sampler
    drew it with — so the first ratio pi / pi_old is exactly the one of the sampling distribution.
    At T = 1 the same tokens get other numbers: that would be another policy's log-probs."""
    model = small_model()
    buffer = rollout.sample_responses(model, TOY_TOKENIZER, [[2, 5], [6, 7, 8]], group_size=4, max_new_tokens=6,
                                      temperature=temperature, seed=0)
    assert buffer.temperature == temperature
    columns = buffer.response_mask[:, 1:].bool()  # (8, T - 1): the response tokens' log-prob columns
    drawn = buffer.sampled_logprobs[columns]
    assert torch.allclose(online_rl.buffer_logprobs(model, buffer)[columns], drawn, atol=1e-5)
    assert torch.allclose(tempered_logprobs(model, buffer)[columns], drawn, atol=1e-5)
    untempered = logprobs.response_logprobs(model, buffer.ids, buffer.response_mask)[0][columns]
    assert (untempered - drawn).abs().max() > 0.05
    # GRPO with two steps per buffer stores these as pi_old
    method, cfg = grpo.grpo_method(beta=0.0), SimpleNamespace(group_size=4, steps_per_rollout=2)
    buffer.extra["rewards"] = torch.arange(8.0)
    method.prepare(buffer, online_rl.BufferContext(model, policy.frozen_copy(model), cfg, None))
    assert torch.allclose(buffer.extra["old_logprobs"][columns], drawn, atol=1e-5)


def test_k3_of_tokens_sampled_at_T_estimates_the_KL_of_the_tempered_distributions():
    """k3 is unbiased for KL(p || q) only when the tokens are drawn from p. Tokens drawn by sample_next at
    T = 0.7: the mean of k3 computed from the tempered log-probs matches the exact KL between the two
    tempered distributions (within 4 standard errors); computed from untempered log-probs it does not."""
    generate = impl("generate")
    policy_logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    reference_logits = torch.tensor([0.0, 1.5, 0.5, 0.0, -1.0])
    temperature, n = 0.7, 200_000
    tokens = generate.sample_next(policy_logits.expand(n, 5), temperature, generator=torch.Generator().manual_seed(0))
    p = generate.sampling_logprobs(policy_logits[None], temperature)[0]  # (5,) log p_T
    q = generate.sampling_logprobs(reference_logits[None], temperature)[0]
    exact = float((p.exp() * (p - q)).sum())  # KL(p_T || q_T)
    k3 = logprobs.kl_estimates(p[tokens], q[tokens])["k3"]
    stderr = float(k3.std()) / n**0.5
    assert abs(float(k3.mean()) - exact) < 4 * stderr
    p1, q1 = torch.log_softmax(policy_logits, -1), torch.log_softmax(reference_logits, -1)
    untempered = float(logprobs.kl_estimates(p1[tokens], q1[tokens])["k3"].mean())
    assert abs(untempered - exact) > 20 * stderr


def test_a_group_with_equal_rewards_gives_no_gradient():
    model = small_model()
    grads, _ = one_step(grpo.grpo_method(beta=0.04), model, toy_buffer([3, 4, 5, 4], [1, 1, 1, 1]), group_size=4)
    assert grads and all(g.abs().max() == 0 for g in grads)


def test_response_logprobs_score_the_next_token_in_column_t():
    """response_logprobs(model, ids, mask)[:, t] = log_softmax(logits[:, t])[ids[:, t + 1]] where
    response_mask[:, t + 1] is 1, and 0 elsewhere: column t is the prediction made AT position t of the
    token that came next. Two rows with multi-token responses of different lengths and padding."""
    model = small_model()
    ids = torch.tensor([[1, 2, 7, 8, 9, 10, 0, 0], [1, 2, 3, 5, 6, 0, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        logp, entropy = logprobs.response_logprobs(model, ids, mask, with_entropy=True)
        log_softmax = torch.log_softmax(model(ids)[0].float(), -1)  # (B, T, V)
    assert logp.shape == entropy.shape == (2, ids.shape[1] - 1)
    for b in range(2):
        for t in range(ids.shape[1] - 1):
            if mask[b, t + 1]:
                assert logp[b, t].item() == pytest.approx(log_softmax[b, t, ids[b, t + 1]].item(), abs=1e-5), (b, t)
                assert entropy[b, t].item() > 0
            else:
                assert logp[b, t] == 0 and entropy[b, t] == 0, (b, t)


def test_clipped_surrogate_stops_at_the_clip():
    logp = torch.tensor([0.5, 0.5], requires_grad=True)  # ratio e^0.5 = 1.65, far beyond 1.2
    loss, clipped = logprobs.clipped_surrogate(logp, torch.zeros(2), torch.tensor([1.0, -1.0]), clip_eps=0.2)
    loss.sum().backward()
    assert clipped.tolist() == [True, False]
    assert logp.grad[0] == 0  # A > 0 and already above 1 + eps: no further push
    assert logp.grad[1] > 0  # A < 0 above 1 + eps: still pulled down (the min keeps the worse case)


def test_aggregation_and_length_bias():
    per_token = torch.ones(2, 4, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])  # a 1-token answer and a 4-token answer
    grpo.aggregate(per_token, mask, "token").backward()
    token_weights = per_token.grad.clone()
    per_token.grad = None
    grpo.aggregate(per_token, mask, "sequence").backward()
    assert token_weights[0, 0] == token_weights[1, 0] == pytest.approx(1 / 5)  # every token the same
    assert per_token.grad[0, 0] == pytest.approx(1 / 2) and per_token.grad[1, 0] == pytest.approx(1 / 8)  # 1 / (2 * length)
    assert per_token.grad[0, 1:].abs().sum() == 0  # padding never counts


def test_step_results_find_right_and_wrong_arithmetic():
    pieces = [b"So", b" 19", b" +", b" 6", b" =", b" 2", b"6", b".\n", b"Then", b" 3", b" *", b" 4", b" =", b" 12", b"."]
    assert grpo.step_results(pieces) == [([5, 6], False), ([13], True)]
    assert grpo.step_results([b"no", b" math"]) == []
    assert grpo.arithmetic_value("12 - 2 * 5") == 2


def test_math_rewards_use_the_grader():
    assert rollout.math_rewards(["So 2 + 3 = 5.\n#### 5", "#### 6", "five"], ["5", "5", "5"]).tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="verifiable"):
        rollout.math_rewards(["a story"], [None])


def test_lesson_10_smoke_run(pipeline_dirs):
    base = pipeline_dirs / "runs" / "pretrain" / "default" / "checkpoints" / "ckpt_best.pth"
    run_lesson("10_grpo", "--fast_dev_run", "--checkpoint_path", str(base), "--beta", "0.04")
    run = pipeline_dirs / "runs" / "rlhf" / "online" / "grpo-fast-dev-run"
    report = json.loads((run / "report.json").read_text())
    assert report["method"] == "grpo" and 0.0 <= report["val_reward_best"] <= 1.0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*rows)
    assert {"reward", "reward_group_std", "kl", "clip_frac", "entropy", "response_len", "val_reward"} <= logged
    assert (run / "rl.svg").is_file()
    impl("checkpoint").load_model(run / "checkpoints" / "policy_best.pth")  # what lessons 12 and 13 load


def test_lesson_10_lora_run_writes_an_adapter_and_a_merged_policy(pipeline_dirs):
    base = pipeline_dirs / "runs" / "pretrain" / "default" / "checkpoints" / "ckpt_best.pth"
    run_lesson("10_grpo", "--fast_dev_run", "--checkpoint_path", str(base), "--lora_r", "4", "--run_name", "lora",
               "--train_prompts", "3", "--pass_at_k", "3")
    run = pipeline_dirs / "runs" / "rlhf" / "online" / "grpo-lora"
    assert (run / "adapter.pth").is_file()
    report = json.loads((run / "report.json").read_text())  # --train_prompts: the practised prompts are graded too
    assert all(0.0 <= report[k] <= 1.0 for k in ("practised_reward_before", "practised_reward_after"))
    # --pass_at_k 3: pass@1 and pass@3 on the held-out (4 under --fast_dev_run) and the 3 practised prompts
    for when in ("before", "after"):
        rates = report[f"pass_at_k_{when}"]
        assert (rates["held_out"]["n"], rates["practised"]["n"]) == (4, 3)
        assert all(0.0 <= r["pass@1"] <= r["pass@3"] <= 1.0 for r in rates.values())
    impl("checkpoint").load_model(run / "checkpoints" / "policy_best.pth")


def test_math_reward_needs_prompts_with_answers(pipeline_dirs):
    base = pipeline_dirs / "runs" / "pretrain" / "default" / "checkpoints" / "ckpt_best.pth"
    with pytest.raises(ValueError, match="verifiable"):
        run_lesson("10_grpo", "--fast_dev_run", "--checkpoint_path", str(base), "--prompts", "preferences")


def test_lesson_10_words_reward_run(pipeline_dirs):
    """--reward words samples lesson 0's "use the words" requests (its default prompts), rewards the share
    of the words a story uses, and grades the held-out requests before and after."""
    base = pipeline_dirs / "runs" / "pretrain" / "default" / "checkpoints" / "ckpt_best.pth"
    run_lesson("10_grpo", "--fast_dev_run", "--checkpoint_path", str(base), "--reward", "words", "--run_name", "words")
    run = pipeline_dirs / "runs" / "rlhf" / "online" / "grpo-words"
    report = json.loads((run / "report.json").read_text())
    assert report["reward"] == "words" and report["words_n"] == 4
    assert all(0.0 <= report[f"words_{k}_{when}"] <= 1.0 for k in ("accuracy", "mean_share") for when in ("before", "after"))
    rows = [json.loads(line) for line in (run / "words_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["words"]) == 3 and r["words"][0] in r["prompt"] for r in rows)
    rewards = [r["reward"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
    assert rewards and all(0.0 <= r <= 1.0 for r in rewards)
    with pytest.raises(ValueError, match="--prompts words"):
        run_lesson("10_grpo", "--fast_dev_run", "--checkpoint_path", str(base), "--reward", "words", "--prompts", "tinymath")


def test_missing_sft_checkpoint_names_lesson_5(nano_dirs):
    with pytest.raises(FileNotFoundError, match="lesson-5"):
        run_lesson("10_grpo", "--fast_dev_run")


def test_resume_continues_exactly_where_the_run_stopped(pipeline_dirs):
    """2 steps + --resume to 4 steps gives the same weights as 4 steps in one go: buffers are sampled
    with a seed of (seed, buffer index) only, and checkpoints fall between buffers.

    The method here just raises the log-prob of the policy's own samples, so that every step really
    changes the weights (the smoke-test model rarely gets a math answer right: GRPO would see zeros)."""
    online_rl = impl("online_rl")
    base = pipeline_dirs / "runs" / "pretrain" / "default" / "checkpoints" / "ckpt_best.pth"
    small = dict(checkpoint_path=str(base), lora_r=0, prompts_per_rollout=2, group_size=2, max_new_tokens=6,
                 val_prompts=4, eval_problems=0, eval_every=2, warmup_steps=1, samples=0, lr=1e-2)

    def imitate(model, batch):
        logp, _ = logprobs.response_logprobs(model, batch["ids"], batch["response_mask"])
        return -logp.sum() / batch["response_mask"].sum(), {}

    method = online_rl.OnlineMethod("grpo", prepare=lambda buffer, ctx: None, loss=imitate)
    runs = pipeline_dirs / "runs" / "rlhf" / "online"

    def last_state(run_name, steps, resume=False):
        cfg = online_rl.OnlineRLConfig(run_name=run_name, steps=steps, resume=resume, **small)
        online_rl.run_online_rl(cfg, "rlhf/online", method)
        return torch.load(runs / f"grpo-{run_name}" / "checkpoints" / "ckpt_last.pth", weights_only=False)

    assert last_state("split", 2)["step"] == 2
    split = last_state("split", 4, resume=True)
    whole = last_state("whole", 4)
    start = torch.load(base, weights_only=False)["model"]
    assert split["step"] == whole["step"] == 4
    assert not all(torch.equal(whole["model"][k], start[k]) for k in start)  # it did train
    assert all(torch.equal(split["model"][k], whole["model"][k]) for k in whole["model"])
