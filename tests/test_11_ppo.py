"""
Exercise: PPO (nano/align/ppo.py, lesson 11).

1. GAE: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambda A_{t+1}, returns A + V,
   nothing before or after the response.
2. The clipped policy loss and the clipped value loss, on numbers worked out by hand.
3. One PPO step (actor-critic, per-token KL in the reward, whitened advantages) on a toy problem where
   one answer is rewarded makes that answer more likely.
4. The lesson runs end to end and leaves a policy checkpoint lessons 12 and 13 can load; a reward
   model made with another tokenizer is refused.
"""

import json
from types import SimpleNamespace

import pytest
import torch

from adapters import impl
from conftest import run_lesson
from test_10_grpo import TOY_TOKENIZER, multi_token_buffer, one_step, prob_of, sgd_step, small_model, tempered_logprobs, toy_buffer

ppo = impl("ppo")
online_rl = impl("online_rl")


def test_gae_check_vector():
    adv, returns = ppo.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3), 1.0, 0.95)
    assert torch.allclose(adv, torch.tensor([[0.46575, 0.385, 0.3]]), atol=1e-6)
    assert torch.allclose(returns, adv + torch.tensor([[0.5, 0.6, 0.7]]))


def test_gae_stays_inside_the_response():
    """Prompt and padding are outside the episode: their rewards and values never leak into the response's
    advantages and returns. The answer ends at its last token (V after it is 0), whatever value the
    padding position holds."""
    # prompt column, 2 response tokens, padding: the padding's reward and value must not leak back
    rewards, values = torch.tensor([[5.0, 0.0, 1.0, 7.0]]), torch.tensor([[9.0, 0.2, 0.4, 9.0]])
    mask = torch.tensor([[0, 1, 1, 0]])
    adv, returns = ppo.gae(rewards, values * mask, mask, gamma=1.0, lam=1.0)
    assert adv[0, 0] == 0 and adv[0, 3] == 0
    assert adv[0, 2].item() == pytest.approx(1.0 - 0.4) and adv[0, 1].item() == pytest.approx(0.0 + 0.4 - 0.2 + 0.6)
    # the same with the raw values: the padding's 9.0 is not V_{t+1} of the last token, the prompt's is not used
    adv_raw, returns_raw = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv_raw, adv) and torch.allclose(returns_raw, returns)
    assert returns_raw[0, 0] == 0 and returns_raw[0, 3] == 0
    # and with gamma, lambda < 1: delta_2 = 1 - 0.4, delta_1 = 0 + 0.9 * 0.4 - 0.2, A_1 = delta_1 + 0.9 * 0.8 * A_2
    adv, returns = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert adv[0, 2].item() == pytest.approx(0.6) and adv[0, 1].item() == pytest.approx(0.16 + 0.72 * 0.6)
    assert returns[0, 1:3].tolist() == pytest.approx([0.16 + 0.72 * 0.6 + 0.2, 0.6 + 0.4])


def test_policy_and_value_loss_check_vectors():
    loss, clip_frac = ppo.ppo_policy_loss(torch.tensor([-0.5, -1.0, -0.2]), torch.tensor([-0.7, -0.9, -0.2]),
                                          torch.tensor([1.0, -1.0, 0.5]), torch.ones(3), clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.265054, abs=1e-6)
    assert clip_frac.item() == pytest.approx(1 / 3)
    value_loss = ppo.ppo_value_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.1]), torch.tensor([1.2, -0.5]),
                                    torch.ones(2), clip_eps=0.2)
    assert value_loss.item() == pytest.approx(0.125, abs=1e-6)


def test_whiten():
    x, mask = torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1, 1, 1, 0])
    w = ppo.whiten(x, mask)
    assert w[3] == 0 and w[:3].mean().abs() < 1e-6 and w[:3].pow(2).mean().item() == pytest.approx(1.0, abs=1e-4)


def test_one_ppo_step_raises_the_rewarded_answer():
    model = small_model()
    actor_critic = ppo.ActorCritic(model)
    logits, values = actor_critic(torch.tensor([[1, 2, 3]]))
    assert torch.allclose(logits, model(torch.tensor([[1, 2, 3]]))[0], atol=1e-5)  # the same LM head
    assert values.shape == (1, 3) and values.abs().max() == 0  # the value head starts at 0
    before = prob_of(model, 4)
    _, stats = one_step(ppo.ppo_method(kl_coef=0.05), model, toy_buffer([3, 4, 5, 4], [0, 1, 0, 1]), group_size=4,
                        train_model=actor_critic)
    assert prob_of(model, 4) > before
    assert stats["value_loss"] > 0 and stats["kl"] == pytest.approx(0.0, abs=1e-6)


def test_ppo_prepare_and_two_epochs_on_multi_token_answers():
    """PPO on multi-token answers, checked by hand. prepare: old values are V at the log-prob columns
    (V[:, t], the state before token t + 1); the per-token reward is -kl_coef * (old - ref) on every
    response column plus the answer's score on its LAST response column, nothing on prompt or padding.
    With gamma = lambda = 1 the return R_t is the sum of the rewards from column t on, and A = whiten(R - V).
    Then two updates: ratio 1 first; after one step the clipped policy and value losses match the formulas."""
    model, reference = small_model(), small_model(seed=1)
    actor_critic = ppo.ActorCritic(model)
    torch.manual_seed(2)
    with torch.no_grad():  # a value head that is not 0, so that values that are one column off show
        actor_critic.value_head.weight.normal_(0, 0.5)
        actor_critic.value_head.bias.fill_(0.3)
    buffer, kl_coef, clip_eps, value_clip, vf_coef = multi_token_buffer(), 0.5, 0.2, 0.2, 0.1
    method = ppo.ppo_method(kl_coef=kl_coef, clip_eps=clip_eps, value_clip=value_clip, vf_coef=vf_coef, gamma=1.0, lam=1.0)
    ctx = online_rl.BufferContext(model=actor_critic, reference=impl("policy").frozen_copy(reference), tokenizer=TOY_TOKENIZER,
                                  cfg=SimpleNamespace(group_size=4, steps_per_rollout=2))
    method.prepare(buffer, ctx)
    ids, response_mask = buffer.ids, buffer.response_mask
    mask = response_mask[:, 1:].float()  # (4, T - 1)
    old, ref = tempered_logprobs(model, buffer), tempered_logprobs(reference, buffer)  # at the sampling temperature
    with torch.no_grad():
        values = actor_critic(ids)[1]  # (4, T)
    assert torch.allclose(buffer.extra["old_logprobs"], old, atol=1e-6)
    assert torch.allclose(buffer.extra["old_values"], values[:, :-1], atol=1e-5)  # V[:, t] sits in column t
    # per-token rewards by hand
    rewards = -kl_coef * (old - ref) * mask
    for row in range(4):
        last = int(mask[row].nonzero().max())  # the last response token's column
        rewards[row, last] += buffer.extra["rewards"][row]
    assert (rewards * mask != 0).sum() == mask.sum()  # a KL penalty on every response column
    returns = rewards.flip(-1).cumsum(-1).flip(-1) * mask  # R_t = r_t + r_t+1 + ... (gamma = 1)
    assert torch.allclose(buffer.extra["returns"], returns, atol=1e-5)
    adv = (returns - values[:, :-1]) * mask  # lambda = 1: A_t = R_t - V_t
    # the critic's explained variance, and the trace of the best-scored answer (row 0: reward 1, 2 tokens)
    r, v = returns[mask.bool()], values[:, :-1][mask.bool()]
    assert buffer.extra["stats"]["explained_variance"] == pytest.approx(float(1 - (r - v).var() / r.var()), abs=1e-5)
    trace = buffer.extra["trace"]
    assert trace["tokens"] == ["3", "4"] and trace["score"] == 1.0
    assert trace["reward"] == pytest.approx(rewards[0, 1:3].tolist(), abs=1e-4)  # columns 1, 2 score tokens 3, 4
    assert trace["advantage"] == pytest.approx(adv[0, 1:3].tolist(), abs=1e-4)
    mean = (adv * mask).sum() / mask.sum()
    std = (((adv - mean) ** 2 * mask).sum() / mask.sum()).sqrt()
    adv = (adv - mean) / std * mask
    assert torch.allclose(buffer.extra["advantages"], adv, atol=1e-4)

    def by_hand():
        with torch.no_grad():
            v = actor_critic(ids)[1][:, :-1]
        logp = tempered_logprobs(model, buffer)
        ratio = torch.exp(logp - old)
        surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps))
        clipped = (-adv * ratio.clamp(1 - clip_eps, 1 + clip_eps) > -adv * ratio).float()
        v_clipped = values[:, :-1] + (v - values[:, :-1]).clamp(-value_clip, value_clip)
        value_loss = 0.5 * (torch.maximum((v - returns) ** 2, (v_clipped - returns) ** 2) * mask).sum() / mask.sum()
        policy_loss = (surrogate * mask).sum() / mask.sum()
        return policy_loss, value_loss, (clipped * mask).sum() / mask.sum(), ratio

    policy_loss, value_loss, _, _ = by_hand()
    loss, stats = method.loss(actor_critic, online_rl.minibatch(buffer, torch.arange(4)))
    assert policy_loss.item() == pytest.approx(0.0, abs=1e-5)  # ratio 1: -mean of whitened advantages
    assert stats["value_loss"] == pytest.approx(value_loss.item(), abs=1e-5) and stats["clip_frac"] == 0
    assert loss.item() == pytest.approx((policy_loss + vf_coef * value_loss).item(), abs=1e-5)
    sgd_step(actor_critic, loss, lr=2.0)

    policy_loss, value_loss, clip_frac, ratio = by_hand()
    assert (ratio[mask.bool()] - 1).abs().max() > clip_eps  # the first update moved some token beyond the clip
    loss, stats = method.loss(actor_critic, online_rl.minibatch(buffer, torch.arange(4)))
    assert stats["policy_loss"] == pytest.approx(policy_loss.item(), abs=1e-5)
    assert stats["value_loss"] == pytest.approx(value_loss.item(), abs=1e-5)
    assert stats["clip_frac"] == pytest.approx(clip_frac.item()) and stats["clip_frac"] > 0
    assert loss.item() == pytest.approx((policy_loss + vf_coef * value_loss).item(), abs=1e-5)


def test_lesson_11_smoke_run(pipeline_dirs):
    base = pipeline_dirs / "runs" / "pretrain" / "default" / "checkpoints" / "ckpt_best.pth"
    run_lesson("11_ppo", "--fast_dev_run", "--checkpoint_path", str(base))
    run = pipeline_dirs / "runs" / "rlhf" / "online" / "ppo-fast-dev-run"
    report = json.loads((run / "report.json").read_text())
    assert report["method"] == "ppo"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"value_loss", "kl", "clip_frac", "entropy", "reward", "explained_variance"} <= set().union(*rows)
    traces = [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]
    assert traces and all(len(t["tokens"]) == len(t["reward"]) == len(t["value"]) == len(t["advantage"]) for t in traces)
    # the policy checkpoint is the base model's architecture alone (no value head), with the base's config
    model, ckpt = impl("checkpoint").load_model(run / "checkpoints" / "policy_best.pth")
    base_ckpt = torch.load(base, weights_only=False)
    assert set(ckpt["model"]) == set(base_ckpt["model"]) and not any("value_head" in k for k in ckpt["model"])
    assert ckpt["model_config"] == base_ckpt["model_config"]
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]]))[0]
    assert logits.shape == (1, 3, ckpt["model_config"]["vocab_size"]) and torch.isfinite(logits).all()


def test_reward_model_of_another_tokenizer_is_refused(pipeline_dirs):
    rm_lib = impl("reward_model")
    base = pipeline_dirs / "runs" / "pretrain" / "default" / "checkpoints" / "ckpt_best.pth"
    rm, _ = rm_lib.RewardModel.from_checkpoint(base)
    path = pipeline_dirs / "runs" / "rm" / "other" / "rm.pth"
    impl("fileio").save_checkpoint(path, {"model": rm.state_dict(), **rm_lib.reward_model_extra(rm, "feedfacefeedface", str(base))})
    # the file is a sound reward model: it loads, and only the tokenizer check refuses it
    loaded = rm_lib.load_reward_model(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in rm.state_dict().items())
    assert rm_lib.load_reward_model(path, "feedfacefeedface") is not None
    with pytest.raises(ValueError, match="tokenizer"):
        rm_lib.load_reward_model(path, "0123456789abcdef")
    with pytest.raises(ValueError, match="tokenizer"):
        run_lesson("11_ppo", "--fast_dev_run", "--checkpoint_path", str(base), "--reward", "rm", "--prompts", "preferences",
                   "--reward_model_path", str(path))


def test_judge_report_pairs_the_prompts():
    """Scores change prompt by prompt: before [1, 2, 3, 4], after [2, 2, 5, 4] -> changes [1, 0, 2, 0],
    mean 0.75, stderr std/sqrt(4) = 0.9574 / 2; the flaw rate is a share with its binomial stderr."""
    report = online_rl.judge_report({"scores": [1.0, 2.0, 3.0, 4.0], "flawed": [True, True, False, False]},
                                    {"scores": [2.0, 2.0, 5.0, 4.0], "flawed": [False, True, False, False]})
    assert report["report_n"] == 4 and (report["rm_score_before"], report["rm_score_after"]) == (2.5, 3.25)
    assert report["rm_score_change"] == pytest.approx(0.75)
    assert report["rm_score_change_stderr"] == pytest.approx((2.75 / 3) ** 0.5 / 2)
    assert (report["flaw_rate_before"], report["flaw_rate_after"]) == (0.5, 0.25)
    assert report["flaw_rate_stderr_after"] == pytest.approx((0.25 * 0.75 / 4) ** 0.5)


def test_lesson_11_reward_model_run_reports_on_prompts_that_chose_nothing(pipeline_dirs):
    """--reward rm --prompts preferences: the first --val_prompts of the val split choose the checkpoint,
    the rest report it, scored by the reward model and by the flaw checkers."""
    rm_lib, rl_prompts = impl("reward_model"), impl("rl_prompts")
    base = pipeline_dirs / "runs" / "pretrain" / "default" / "checkpoints" / "ckpt_best.pth"
    rm, ckpt = rm_lib.RewardModel.from_checkpoint(base)
    path = pipeline_dirs / "runs" / "rm" / "smoke" / "rm.pth"
    impl("fileio").save_checkpoint(path, {"model": rm.state_dict(),
                                          **rm_lib.reward_model_extra(rm, ckpt["tokenizer_fingerprint"], str(base))})
    run_lesson("11_ppo", "--fast_dev_run", "--checkpoint_path", str(base), "--reward", "rm", "--prompts", "preferences",
               "--reward_model_path", str(path), "--run_name", "rm")
    report = json.loads((pipeline_dirs / "runs" / "rlhf" / "online" / "ppo-rm" / "report.json").read_text())
    assert report["report_n"] == 4  # --fast_dev_run: 8 validation prompts, 4 to report
    assert 0.0 <= report["flaw_rate_before"] <= 1.0 and 0.0 <= report["flaw_rate_after"] <= 1.0
    assert report["rm_score_change"] == pytest.approx(report["rm_score_after"] - report["rm_score_before"], abs=1e-5)
    tokenizer = impl("checkpoint").load_tokenizer(ckpt["tokenizer_fingerprint"])
    _, val = rl_prompts.load_prompt_sets("preferences", tokenizer, 8)
    reported = rl_prompts.report_prompts("preferences", tokenizer, 8, 4)
    assert len(val) == 8 and len(reported) == 4 and not set(map(tuple, val.ids)) & set(map(tuple, reported.ids))
    assert all(info["kind"] in ("math", "story") for info in reported.infos)
