"""
Exercise: DPO (nano/align/dpo.py), the response log-probs it is built on (nano/align/logprobs.py) and the flaw
checkers that judge what the model writes afterwards (nano/align/flaws.py, lesson 9).

1. token_logprobs / sequence_logprob: a response's log-probability counts its own tokens only —
   changing a prompt or padding token's TARGET changes nothing — and equals the product of the
   next-token probabilities computed one step at a time.
2. dpo_loss: -log sigmoid(beta * ((lp_c - ref_c) - (lp_r - ref_r))), its cDPO and IPO variants,
   and its metrics; a policy equal to its reference costs exactly log 2.
3. The four flaw checkers find their flaw in hand-made answers and pass clean ones.
"""

import json
import math

import pytest
import torch

from adapters import impl
from conftest import run_lesson
from toy_models import small_gemma

dpo = impl("dpo")
logprobs = impl("logprobs")
policy = impl("policy")
flaws = impl("flaws")


def small_model(seed: int = 0, vocab: int = 40):
    return small_gemma(vocab, seed, context_len=32, sliding_window=8)


# ---------------------------------------------------------------------------------------------
# 1. log-probs of response tokens


def test_logprobs_equal_a_token_by_token_computation():
    model = small_model()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1]])  # the response is 7 8 9
    with torch.no_grad():
        lp = logprobs.token_logprobs(model, ids)
        total = logprobs.sequence_logprob(lp, mask)
        by_hand = 0.0
        for t in (3, 4, 5):  # p(ids[t] | ids[:t]), one forward pass per token
            logits = model(ids[:, :t])[0][0, -1]
            by_hand += torch.log_softmax(logits, -1)[ids[0, t]].item()
    assert lp.shape == (1, 5)
    assert total.item() == pytest.approx(by_hand, abs=1e-4)


def test_response_logprobs_equal_the_full_computation_where_it_counts():
    model = small_model()
    ids = torch.tensor([[1, 5, 6, 7, 8, 0], [1, 9, 10, 11, 12, 13]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1]])
    with torch.no_grad():
        full = logprobs.token_logprobs(model, ids) * mask[:, 1:]
        fast, entropy = logprobs.response_logprobs(model, ids, mask, with_entropy=True)
    assert torch.allclose(fast, full, atol=1e-5)
    assert (entropy[mask[:, 1:] == 0] == 0).all() and (entropy[mask[:, 1:] == 1] > 0).all()


def test_logprobs_ignore_prompt_and_padding():
    """Only response tokens are targets. Column t of the log-probs scores ids[t + 1], so a prompt or padding
    token's column is 0 whatever that token is; another prompt token moves the response's log-probs only as
    context (its own column stays 0); another padding token changes nothing at all."""
    model = small_model()
    a = torch.tensor([[1, 5, 6, 7, 8, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0]])  # prompt 1 5, response 6 7 8, padding 0 0
    columns = mask[0, 1:].bool()  # column t <- token t + 1: response columns 1, 2, 3

    def by_hand(ids):
        """log_softmax(logits[t])[ids[t + 1]] on the response's columns, 0 elsewhere."""
        logp = torch.log_softmax(model(ids)[0][0].float(), -1)
        return torch.tensor([logp[t, ids[0, t + 1]].item() if columns[t] else 0.0 for t in range(ids.shape[1] - 1)])

    def scored(ids):
        """(token_logprobs * mask, response_logprobs, sequence_logprob) of ids under the same mask."""
        full = logprobs.token_logprobs(model, ids)
        fast, _ = logprobs.response_logprobs(model, ids, mask)
        return full * mask[:, 1:], fast, logprobs.sequence_logprob(full, mask)

    other_prompt, other_padding = a.clone(), a.clone()
    other_prompt[0, 1] = 20  # the prompt's last token: a target only of column 0, which is not the response's
    other_padding[0, 5:] = torch.tensor([30, 31])
    with torch.no_grad():
        results = {}
        for name, ids in (("a", a), ("other_prompt", other_prompt), ("other_padding", other_padding)):
            full, fast, total = scored(ids)
            expected = by_hand(ids)
            assert torch.allclose(full[0], expected, atol=1e-5), name
            assert torch.allclose(fast[0], expected, atol=1e-5), name
            assert (fast[0, ~columns] == 0).all() and (fast[0, columns] != 0).all(), name
            assert total.item() == pytest.approx(expected.sum().item(), abs=1e-4), name
            results[name] = fast[0]
        # the prompt is context: another prompt token moves every response token's log-prob ...
        assert ((results["other_prompt"] - results["a"])[columns].abs() > 1e-6).all()
        # ... and would move column 0 if that column counted (it scores the changed token itself)
        unmasked = logprobs.token_logprobs(model, other_prompt)[0, 0] - logprobs.token_logprobs(model, a)[0, 0]
        assert unmasked.abs() > 1e-6
        # padding comes after the response: nothing that counts can see it
        assert torch.allclose(results["other_padding"], results["a"], atol=1e-6, rtol=0)
        other_response = a.clone()
        other_response[0, 3] = 20
        assert not torch.allclose(logprobs.sequence_logprob(logprobs.token_logprobs(model, other_response), mask),
                                  scored(a)[2])


def test_kl_estimator_check_vector():
    kl = logprobs.kl_estimates(torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.2, -1.5, -0.5]))
    assert torch.allclose(kl["k1"], torch.tensor([0.2, -0.5, 0.0]), atol=1e-6)
    assert torch.allclose(kl["k2"], torch.tensor([0.02, 0.125, 0.0]), atol=1e-6)
    assert torch.allclose(kl["k3"], torch.tensor([0.018731, 0.148721, 0.0]), atol=1e-6)
    assert (kl["k3"] >= 0).all()


# ---------------------------------------------------------------------------------------------
# 2. the DPO loss


POLICY_C, POLICY_R = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -18.0])
REF_C, REF_R = torch.tensor([-11.0, -20.0]), torch.tensor([-11.0, -19.0])


def test_dpo_loss_and_metrics_check_vector():
    loss, m = dpo.dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta=0.1)
    assert loss.item() == pytest.approx(0.671268, abs=1e-6)
    assert torch.allclose(m["rewards/chosen"], torch.tensor([0.1, 0.0]), atol=1e-6)
    assert torch.allclose(m["rewards/rejected"], torch.tensor([-0.1, 0.1]), atol=1e-6)
    assert m["rewards/accuracy"].item() == pytest.approx(0.5)
    assert m["rewards/margin"].item() == pytest.approx((0.2 - 0.1) / 2, abs=1e-6)


def test_cdpo_and_ipo():
    loss, _ = dpo.dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta=0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.676268, abs=1e-6)
    # IPO: (D - 1 / (2 beta))^2 with D = [2, -1], 1 / (2 beta) = 5 -> (9 + 36) / 2
    loss, _ = dpo.dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta=0.1, loss_type="ipo")
    assert loss.item() == pytest.approx(22.5, abs=1e-5)
    with pytest.raises(ValueError, match="loss_type"):
        dpo.dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, loss_type="hinge?")


def test_policy_equal_to_reference_costs_log2_and_dpo_steps_prefer_chosen():
    model = small_model()
    reference = policy.frozen_copy(model)
    items = [{"chosen_ids": [1, 5, 6, 7, 8], "chosen_mask": [0, 0, 0, 1, 1],
              "rejected_ids": [1, 5, 6, 9, 10, 11], "rejected_mask": [0, 0, 0, 1, 1, 1], "flaw": "x"},
             {"chosen_ids": [1, 12, 7, 8], "chosen_mask": [0, 0, 1, 1],
              "rejected_ids": [1, 12, 9], "rejected_mask": [0, 0, 1], "flaw": "y"}]
    batch = dpo.preference_batch(items, max_len=32)
    assert batch["ids"].shape == (4, 6) and batch["response_mask"][3].tolist() == [0, 0, 1, 0, 0, 0]

    def step_loss():
        c, r = dpo.pair_logprobs(model, batch)
        with torch.no_grad():
            rc, rr = dpo.pair_logprobs(reference, batch)
        return dpo.dpo_loss(c, r, rc, rr, beta=0.5)

    loss, _ = step_loss()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(5):
        loss, m = step_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss, m = step_loss()
    assert loss.item() < math.log(2) and m["rewards/accuracy"].item() == 1.0
    assert not any(p.grad is not None for p in reference.parameters())  # the reference never trains


# ---------------------------------------------------------------------------------------------
# 3. flaw checkers

CLEAN_STORY = 'Tom had a red ball. He played in the park with his dog. "Thank you!" said Tom. They went home happy.'


def test_flaw_checkers_find_each_flaw():
    story = {"kind": "story", "required_words": ["ball", "park", "dog"]}
    assert flaws.find_flaws(CLEAN_STORY, story) == []
    assert flaws.find_flaws(CLEAN_STORY.replace("dog", "cat"), story) == ["missing_word"]
    assert flaws.find_flaws("Tom had a red ball. He played in the park with his", story) == ["missing_word", "broken_off"]
    looping = CLEAN_STORY + " They went home happy. They went home happy."
    assert flaws.find_flaws(looping, story) == ["repetition"]
    math_prompt = {"kind": "math", "answer": "16"}
    assert flaws.find_flaws("So there are 5 + 11 = 16 frogs.\n#### 16", math_prompt) == []
    assert flaws.find_flaws("So there are 5 + 11 = 13 frogs.\n#### 13", math_prompt) == ["wrong_number"]
    assert flaws.find_flaws("I like frogs", math_prompt) == ["wrong_number"]


def test_own_pairs_take_a_clean_and_a_flawed_answer_of_the_model():
    assert flaws.own_pair_sides([[1], [2], [3]], [["broken_off"], [], []]) == ([2], [1])
    assert flaws.own_pair_sides([[1], [2]], [[], []]) == ([1], None)  # nothing flawed: lesson 0's rejected stays
    assert flaws.own_pair_sides([[1], [2]], [["repetition"], ["missing_word"]]) == (None, [1])


def test_flaw_checkers_edge_cases():
    assert flaws.uses_word("Two balls and a Park.", "ball") and flaws.uses_word("two boxes", "box")
    assert not flaws.uses_word("a ballet", "ball")
    assert not flaws.is_broken_off('She smiled. "Yes!"') and flaws.is_broken_off("")
    assert flaws.repeated_sentence("Yes! Yes! No.") is None  # short exclamations are not a loop
    pair = {"flaw": "missing_word", "required_words": ["a", "b"]}
    assert flaws.prompt_info_of(pair) == {"kind": "story", "required_words": ["a", "b"]}
    assert flaws.prompt_info_of({"flaw": "wrong_number", "correct_answer": 7}) == {"kind": "math", "answer": "7"}


def test_lesson_9_smoke_run(pipeline_dirs):
    base = pipeline_dirs / "runs" / "pretrain" / "default" / "checkpoints" / "ckpt_best.pth"
    run_lesson("09_dpo", "--fast_dev_run", "--checkpoint_path", str(base), "--batch_size", "2", "--micro_batch_size", "2", "--sft_weight", "0",
               "--max_len", "1024", "--pairs", "own")
    run = pipeline_dirs / "runs" / "rlhf" / "offline" / "dpo-fast-dev-run"
    own = [json.loads(line) for line in (run / "own_pairs.jsonl").read_text().splitlines()]
    assert own and all(set(row) == {"prompt", "chosen", "rejected"} for row in own)  # --pairs own: the model's answers, labelled
    report = json.loads((run / "report.json").read_text())
    assert report["pairs_before"]["val_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference
    assert 0.0 <= report["flaws_after"]["total"] <= 1.0
    load_model = impl("checkpoint").load_model
    load_model(run / "checkpoints" / "policy_best.pth")  # plain weights (adapter merged): lessons 12 and 13 load it
    assert (run / "adapter.pth").is_file()


def test_lesson_9_smoke_run_on_the_default_rpo_path(pipeline_dirs):
    """The default recipe (an SFT term on the chosen answers beside DPO, RPO), end to end. Before
    training the policy is the reference, so the DPO part of the loss is exactly ln 2 and the SFT
    part, the chosen answers' mean NLL, comes on top of it."""
    base = pipeline_dirs / "runs" / "pretrain" / "default" / "checkpoints" / "ckpt_best.pth"
    run_lesson("09_dpo", "--fast_dev_run", "--checkpoint_path", str(base), "--batch_size", "2", "--micro_batch_size", "2",
               "--max_len", "1024", "--run_name", "rpo")
    run = pipeline_dirs / "runs" / "rlhf" / "offline" / "dpo-rpo"
    config = json.loads((run / "config.json").read_text())
    assert config["sft_weight"] > 0  # the default path, not the plain DPO of the run above
    report = json.loads((run / "report.json").read_text())
    assert report["pairs_before"]["val_loss"] > math.log(2) + 0.1  # ln 2 + sft_weight * NLL (a 4-step model's NLL is large)
    impl("checkpoint").load_model(run / "checkpoints" / "policy_best.pth")


def test_rpo_sft_term():
    assert dpo.chosen_nll(torch.tensor([-10.0, -20.0]), torch.tensor([5, 10])).item() == pytest.approx(2.0)
