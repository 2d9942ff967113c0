"""
Exercise: a reward model (nano/align/reward_model.py, lesson 8).

Build a model that reads prompt + answer and returns one number from the hidden state of the LAST
REAL token (padding on the right must not matter), train it with the Bradley-Terry loss
-log sigmoid(r_chosen - r_rejected), and refuse to score answers written with another tokenizer.
"""

import math

import pytest
import torch

from adapters import impl
from conftest import run_lesson

rm_lib = impl("reward_model")
model_lib = impl("gemma")


def small_rm(seed: int = 0):
    torch.manual_seed(seed)
    cfg = model_lib.model_config("tiny", vocab_size=40, context_len=32, d_model=32, n_layers=2, n_heads=2, head_dim=16,
                                 d_ff=64, sliding_window=8, query_pre_attn_scalar=16.0, attn_impl="eager")
    rm = rm_lib.RewardModel(cfg)
    torch.nn.init.normal_(rm.head.weight, std=0.5)  # a head that is not all zeros, so scores differ
    return rm.eval()


def test_bradley_terry_loss_check_vector():
    loss = rm_lib.bradley_terry_loss(torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx(0.643669, abs=1e-6)
    # equal scores: a coin flip, log 2; a huge margin: ~0, and no overflow
    assert rm_lib.bradley_terry_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))
    assert rm_lib.bradley_terry_loss(torch.tensor([1e4]), torch.tensor([-1e4])).item() == pytest.approx(0.0, abs=1e-6)


def test_score_is_read_at_the_last_real_token():
    rm = small_rm()
    ids = torch.tensor([[5, 6, 7, 8, 0, 0]])
    score = rm(ids, torch.tensor([4]))
    # whatever sits in the padding, the score is the same...
    assert torch.allclose(rm(torch.tensor([[5, 6, 7, 8, 30, 31]]), torch.tensor([4])), score)
    # ...and equals the score of the unpadded sequence
    assert torch.allclose(rm(torch.tensor([[5, 6, 7, 8]]), torch.tensor([4])), score, atol=1e-5)
    # but a different last token changes it
    assert not torch.allclose(rm(torch.tensor([[5, 6, 7, 9, 0, 0]]), torch.tensor([4])), score)
    # a batch scores each row as it would alone
    batch = rm(torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 12, 13]]), torch.tensor([4, 5]))
    assert torch.allclose(batch[0], score[0], atol=1e-5)


def test_a_fresh_head_scores_zero_so_the_first_loss_is_log2():
    torch.manual_seed(0)
    cfg = model_lib.model_config("tiny", vocab_size=40, context_len=32, d_model=32, n_layers=1, n_heads=2, head_dim=16,
                                 d_ff=64, sliding_window=8, query_pre_attn_scalar=16.0)
    rm = rm_lib.RewardModel(cfg)
    c, r = rm(torch.tensor([[1, 2, 3]]), torch.tensor([3])), rm(torch.tensor([[1, 2, 4]]), torch.tensor([3]))
    assert rm_lib.bradley_terry_loss(c, r).item() == pytest.approx(math.log(2))


def test_training_steps_separate_chosen_from_rejected():
    rm = small_rm().train()
    chosen, rejected = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 8]]), torch.tensor([[5, 6, 7, 20], [5, 6, 9, 21]])
    lengths = torch.tensor([4, 4])
    optimizer = torch.optim.AdamW(rm.parameters(), lr=1e-2)
    first = None
    for _ in range(20):
        loss = rm_lib.bradley_terry_loss(rm(chosen, lengths), rm(rejected, lengths))
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 4
    assert (rm(chosen, lengths) > rm(rejected, lengths)).all()


def test_lesson_8_smoke_run_and_tokenizer_check(pipeline_dirs):
    base = pipeline_dirs / "runs" / "pretrain" / "default" / "checkpoints" / "ckpt_best.pth"
    run_lesson("08_reward_model", "--fast_dev_run", "--checkpoint_path", str(base), "--batch_size", "4",
               "--micro_batch_size", "4", "--max_len", "1024")  # (the smoke tokenizer has 300 tokens: long ids)
    import json

    run = pipeline_dirs / "runs" / "rm" / "fast-dev-run"
    report = json.loads((run / "report.json").read_text())
    assert 0.0 <= report["val_accuracy"] <= 1.0 and report["n"] > 0
    assert set(report["per_flaw"]) <= {"wrong_number", "missing_word", "broken_off", "repetition"}
    assert (run / "scores.svg").read_text().startswith("<svg")
    # the checkpoint is chosen on the selection pairs (their loss is logged and is the best one), and the
    # validation pairs, which report it, chose nothing: their loss is another number
    logged = [json.loads(line)["val_loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert report["select_loss"] == pytest.approx(min(logged)) and report["val_loss"] != pytest.approx(report["select_loss"])
    # the policy's own answers: sampled per validation prompt, scored where a prompt gave a clean and a flawed one
    own = report["own"]
    assert own["prompts"] == report["n"] and 0 <= own["n"] <= own["prompts"]
    assert sum(r["n"] for r in own["per_flaw"].values()) == own["n"]
    path = run / "checkpoints" / "ckpt_best.pth"
    ckpt = torch.load(path, weights_only=False)
    rm = rm_lib.load_reward_model(path, ckpt["tokenizer_fingerprint"])
    assert not any(p.requires_grad for p in rm.parameters())
    with pytest.raises(ValueError, match="tokenizer"):
        rm_lib.load_reward_model(path, "0123456789abcdef")
    # score_answers (the CLI lesson 11 asks the reward model with) lays an answer out exactly as lesson 8's pairs
    from nano.checkpoints.checkpoint import load_tokenizer
    from nano.common.fileio import read_jsonl
    from nano.common.paths import raw_dir
    from nano.text.bins import PreferenceDataset

    tokenizer = load_tokenizer()
    raw, pair = read_jsonl(raw_dir() / "preferences_val.jsonl")[0], PreferenceDataset("val", tokenizer)[0]
    ids = torch.as_tensor(pair["chosen_ids"]).unsqueeze(0)
    scores = rm_lib.score_answers(rm, tokenizer, raw["prompt"], [raw["chosen"], raw["rejected"]])
    assert scores[0] == pytest.approx(rm(ids, torch.tensor([ids.shape[1]])).item(), abs=1e-5)
    assert scores[1] != pytest.approx(scores[0])


def test_missing_sft_checkpoint_names_lesson_5(nano_dirs):
    with pytest.raises(FileNotFoundError, match="lesson-5"):
        run_lesson("08_reward_model", "--fast_dev_run")
