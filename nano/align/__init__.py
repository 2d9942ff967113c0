"""
Alignment: the reward model, DPO, GRPO and PPO (lessons 8-11).

    reward_model.py  a scalar head on the SFT model, trained with the Bradley-Terry loss
    dpo.py           direct preference optimization (sigmoid, cDPO, IPO) and its logged metrics
    flaws.py         programs that find the four flaws of the preference pairs in a model's answers
    policy.py        where a run starts: the policy to train (full, LoRA, QLoRA) and its frozen reference
    logprobs.py      log-probs of response tokens, masked means, KL estimators, the clipped surrogate
    rollout.py       batches of sampled responses and their rewards
    rl_prompts.py    an RL run's prompts: what it practises on, what chooses its checkpoint, what reports it
    online_rl.py     online RL on the shared training loop (rollout buffers, held-out reward, the report)
    grpo.py          group-relative policy optimization
    ppo.py           PPO with a value head and GAE
"""
