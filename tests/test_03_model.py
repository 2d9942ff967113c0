"""
Lesson 3 exercise, part 2: the Gemma-2 Nano model (nano/model/gemma.py).

Implement `GemmaNano(cfg)` so that
  - forward(idx, targets) returns fp32 logits (B, T, vocab) soft-capped to (-30, 30) and the mean
    cross-entropy over targets != IGNORE_INDEX; a fresh model predicts near-uniformly (loss ~ ln vocab),
  - RMSNorm computes x / rms(x) * (1 + w); RoPE rotates (x_i, x_{i + D/2}) pairs ("rotate_half"),
  - the embedding is scaled by sqrt(d_model); the LM head is the embedding matrix (tied),
  - layers 0, 2, 4, ... attend within a sliding window, the others globally,
  - decoding with a KV cache (prefill, then one token at a time) gives the logits of the full forward,
    and a left-padded batch with key_mask gives each row's unpadded result,
  - n_kv_heads = 1 (MQA), a divisor of n_heads (GQA) or n_heads (MHA) all work, and the parameter
    names are Hugging Face Gemma-2's without the leading "model.".
Run: .venv/bin/python -m pytest -q tests/test_03_model.py
"""

import math

import pytest
import torch
from adapters import impl

M = impl("gemma")


def small_config(**overrides):
    """A model small enough that every test runs in well under a second."""
    base = dict(vocab_size=97, context_len=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=1,
                head_dim=8, d_ff=48, sliding_window=4, query_pre_attn_scalar=8.0, attn_impl="eager")
    return M.model_config("tiny", **{**base, **overrides})


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return M.GemmaNano(small_config(**overrides)).eval()


def random_ids(batch, seq, vocab=97, seed=0):
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_output_shapes():
    model = make_model()
    idx = random_ids(2, 10)
    logits, loss = model(idx)
    assert logits.shape == (2, 10, 97) and logits.dtype == torch.float32 and loss is None
    logits, loss = model(idx, targets=random_ids(2, 10, seed=1))
    assert loss.shape == () and torch.isfinite(loss)
    assert model.forward_hidden(idx).shape == (2, 10, 32)


def test_loss_at_init_is_about_ln_vocab():
    """A fresh model knows nothing: its loss is ln(vocab) (uniform guessing) plus a little.

    The logits at init are h . e with h the final-normed hidden state (RMS 1) and e an embedding row
    (entries N(0, 0.02^2)), so they have std sigma ~ 0.02 sqrt(d) = 0.23 at d = 128, and random
    logits raise the expected loss by about sigma^2 / 2 = 0.03 above ln(vocab). 0.1 leaves room for
    sampling noise over 256 targets; a wrong init (std 1 embeddings give sigma ~ 11) misses by far.
    """
    torch.manual_seed(0)
    model = M.GemmaNano(M.model_config("tiny", n_layers=2, attn_impl="eager"))
    _, loss = model(random_ids(2, 128, vocab=4096), targets=random_ids(2, 128, vocab=4096, seed=1))
    assert abs(loss.item() - math.log(4096)) < 0.1


def test_loss_ignores_ignore_index():
    model = make_model()
    idx, targets = random_ids(2, 8), random_ids(2, 8, seed=1)
    logits, loss = model(idx, targets)
    masked = targets.clone()
    masked[:, :5] = M.IGNORE_INDEX
    _, loss_masked = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 97), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(loss_masked, expected)
    assert not torch.isclose(loss_masked, loss)


@pytest.mark.parametrize("cap", [30.0, 0.0])
def test_fused_softcap_cross_entropy_equals_the_plain_formula(cap):
    """softcapped_cross_entropy = c tanh(z / c) then F.cross_entropy: values and gradients."""
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(37, 300, generator=gen, dtype=torch.float64) * 40).requires_grad_()  # big: the cap bends them
    targets = torch.randint(0, 300, (37,), generator=gen)
    targets[::5] = M.IGNORE_INDEX
    weights_on_logits = torch.randn(37, 300, generator=gen, dtype=torch.float64) * 1e-3

    def plain(z):
        logits = cap * torch.tanh(z / cap) if cap > 0 else z
        return logits, torch.nn.functional.cross_entropy(logits, targets, ignore_index=M.IGNORE_INDEX)

    def fused(z):
        # z * 1.0: the function overwrites its input; 8 rows per block: 5 blocks, the last one partial
        return M.softcapped_cross_entropy(z * 1.0, targets, cap, rows_per_block=8)

    for f in (plain, fused):
        logits, loss = f(z)
        # use both outputs, so the gradient flows back through the loss AND the logits
        (grad,) = torch.autograd.grad(loss + (logits * weights_on_logits).sum(), z)
        if f is plain:
            want_logits, want_loss, want_grad = logits, loss, grad
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(grad, want_grad)


def test_final_softcap_bounds_the_logits():
    model = make_model()
    with torch.no_grad():
        model.embed_tokens.weight.mul_(200)  # huge weights: uncapped logits would be in the hundreds
    idx = random_ids(2, 12)
    logits, _ = model(idx)
    assert logits.abs().max() <= 30.0
    assert logits.abs().max() > 25.0  # the cap is doing real work here
    model.cfg.final_softcap = 0.0  # the same weights without the cap
    uncapped, _ = model(idx)
    assert uncapped.abs().max() > 30.0
    torch.testing.assert_close(logits, 30 * torch.tanh(uncapped / 30), atol=1e-4, rtol=1e-4)


def test_a_training_step_after_inference_mode_has_a_backward(monkeypatch):
    """Generation runs under torch.inference_mode, and lessons 9-11 generate before they train: a
    constant the model caches must not be an inference tensor, or the training step's backward fails."""
    attention = impl("attention")
    if hasattr(attention, "_SCALARS"):
        monkeypatch.setattr(attention, "_SCALARS", {})  # as in a fresh process: nothing cached yet
    model = make_model().train()
    idx = random_ids(2, 12)
    with torch.inference_mode():
        model(idx)  # the first use of every constant happens here
    logits, _ = model(idx)  # soft-capped logits with gradients, as RL's log-probs compute them
    logits.logsumexp(-1).mean().backward()
    assert model.embed_tokens.weight.grad.abs().sum() > 0


def test_layers_alternate_window_and_global():
    model = make_model(n_layers=4)
    assert [layer.self_attn.window for layer in model.layers] == [4, 0, 4, 0]


def test_window_layer_ignores_keys_beyond_the_window():
    """Change token 0 of 12: layer 0 (window 4) at position 11 does not move; layer 1 (global) does."""
    model = make_model(n_layers=2)
    captured = {}
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, out.detach().clone()))
    idx = random_ids(1, 12)
    model(idx)
    before = dict(captured)
    idx2 = idx.clone()
    idx2[0, 0] = (idx[0, 0] + 1) % 97
    model(idx2)
    torch.testing.assert_close(captured[0][0, -1], before[0][0, -1], atol=1e-6, rtol=0)
    assert (captured[1][0, -1] - before[1][0, -1]).abs().max() > 1e-4
    # inside the window the change is seen: position 3 still has token 0 in its window of 4
    assert (captured[0][0, 3] - before[0][0, 3]).abs().max() > 1e-4


def test_rmsnorm_uses_one_plus_w():
    norm = M.RMSNorm(4, eps=1e-6)
    x = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    rms = math.sqrt((1 + 4 + 9 + 16) / 4 + 1e-6)
    torch.testing.assert_close(norm(x), x / rms)  # w starts at 0: a plain normalisation
    with torch.no_grad():
        norm.weight.fill_(0.5)
    torch.testing.assert_close(norm(x), 1.5 * x / rms)
    assert norm(x.bfloat16()).dtype == torch.bfloat16  # computed in fp32, returned in the input dtype


def test_rope_rotate_half_by_hand():
    """head_dim 4, theta 100: pair (x0, x2) turns by 1 rad per position, pair (x1, x3) by 0.1 rad."""
    cos, sin = M.rope_cos_sin(torch.tensor([0, 1]), head_dim=4, theta=100.0)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4).expand(1, 1, 2, 4)
    out = M.apply_rope(x, cos, sin)[0, 0]
    torch.testing.assert_close(out[0], torch.tensor([1.0, 2.0, 3.0, 4.0]))  # position 0: no turn
    c1, s1, c2, s2 = math.cos(1), math.sin(1), math.cos(0.1), math.sin(0.1)
    by_hand = torch.tensor([1 * c1 - 3 * s1, 2 * c2 - 4 * s2, 3 * c1 + 1 * s1, 4 * c2 + 2 * s2])
    torch.testing.assert_close(out[1], by_hand)


def test_rope_scores_depend_only_on_relative_position():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=gen), torch.randn(1, 1, 1, 8, generator=gen)

    def score(q_pos, k_pos):
        cq, sq = M.rope_cos_sin(torch.tensor([q_pos]), 8, 10000.0)
        ck, sk = M.rope_cos_sin(torch.tensor([k_pos]), 8, 10000.0)
        return (M.apply_rope(q, cq, sq) * M.apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(105, 102), atol=1e-4, rtol=1e-4)
    assert not torch.isclose(score(5, 2), score(5, 3))


def test_rmsnorm_hand_written_backward_matches_autograd():
    """RMSNormFunction's backward against autograd through the plain reference (both compute in fp32)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=gen, requires_grad=True)
    w = (0.3 * torch.randn(16, generator=gen)).requires_grad_()
    grad_out = torch.randn(3, 5, 16, generator=gen)
    fused = torch.autograd.grad(M.RMSNormFunction.apply(x, w, 1e-6), (x, w), grad_out)
    plain = torch.autograd.grad(M.rms_norm_reference(x, w, 1e-6), (x, w), grad_out)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and the forward is the reference's, bit for bit
    assert torch.equal(M.RMSNormFunction.apply(x, w, 1e-6), M.rms_norm_reference(x, w, 1e-6))


def test_rope_backward_is_the_opposite_rotation():
    """RotaryEmbedding's gradient against autograd through x cos + rotate_half(x) sin, in float64."""
    gen = torch.Generator().manual_seed(0)
    cos, sin = M.rope_cos_sin(torch.arange(7), head_dim=8, theta=10000.0)
    cos, sin = cos.double(), sin.double()
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    grad_out = torch.randn(2, 3, 7, 8, dtype=torch.float64, generator=gen)
    (fused,) = torch.autograd.grad(M.apply_rope(x, cos, sin), x, grad_out)
    (plain,) = torch.autograd.grad(x * cos + M.rotate_half(x) * sin, x, grad_out)
    torch.testing.assert_close(fused, plain)


def test_embedding_scaled_by_sqrt_d_and_head_tied():
    model = make_model()
    idx = random_ids(1, 5)
    seen = {}
    model.layers[0].register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0].detach()))
    logits, _ = model(idx)
    torch.testing.assert_close(seen["x"], model.embed_tokens(idx) * math.sqrt(32))
    hidden = model.forward_hidden(idx)
    torch.testing.assert_close(logits, 30 * torch.tanh(hidden @ model.embed_tokens.weight.T / 30))


def test_parameter_names_match_hugging_face_gemma2():
    model = make_model(n_layers=2)
    names = set(model.state_dict())
    per_layer = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "post_attention_layernorm", "pre_feedforward_layernorm", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj", "post_feedforward_layernorm"]
    expected = {"embed_tokens.weight", "norm.weight"} | {
        f"layers.{i}.{part}.weight" for i in range(2) for part in per_layer
    }
    assert names == expected  # no biases, no separate lm_head (tied)
    assert model.layers[0].self_attn.k_proj.weight.shape == (8, 32)  # one KV head of 8, Linear stores [out, in]


def test_kv_cache_decoding_equals_full_forward():
    model = make_model()
    idx = random_ids(2, 15)
    full_logits, _ = model(idx)
    cache = model.new_kv_cache(batch_size=2, max_len=20)
    step_logits = [model(idx[:, :6], kv_cache=cache)[0]]  # prefill 6 tokens
    for t in range(6, 15):  # then one token at a time; the window (4) is long passed
        step_logits.append(model(idx[:, t:t + 1], kv_cache=cache)[0])
    assert cache.pos == 15
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full_logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="KV cache"):
        model(random_ids(2, 6), kv_cache=cache)  # 15 + 6 > 20


def test_left_padded_batch_equals_each_row_alone():
    """Prompts of 5 and 9 tokens, left-padded to 9, prefilled together, then 3 decoding steps."""
    model = make_model()
    short, long = random_ids(1, 5, seed=1), random_ids(1, 9, seed=2)
    pad = torch.zeros(1, 4, dtype=torch.long)
    batch = torch.cat([torch.cat([pad, short], dim=1), long])  # (2, 9)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[0, :4] = False
    next_tokens = random_ids(2, 3, seed=3)

    # each row alone, no padding, no cache
    alone = [model(torch.cat([row, nxt[None]], dim=1))[0] for row, nxt in ((short, next_tokens[0]), (long, next_tokens[1]))]

    # without a cache: one forward over the padded batch
    logits, _ = model(torch.cat([batch, next_tokens], dim=1), key_mask=torch.cat([key_mask, torch.ones(2, 3, dtype=torch.bool)], 1))
    torch.testing.assert_close(logits[0, 4:], alone[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], alone[1][0], atol=1e-4, rtol=1e-4)

    # with a cache: the mask given at prefill is remembered for the decoding steps
    cache = model.new_kv_cache(batch_size=2, max_len=16)
    steps = [model(batch, kv_cache=cache, key_mask=key_mask)[0]]
    for t in range(3):
        steps.append(model(next_tokens[:, t:t + 1], kv_cache=cache)[0])
    cached = torch.cat(steps, dim=1)  # (2, 12, V)
    torch.testing.assert_close(cached[0, 4:], alone[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached[1], alone[1][0], atol=1e-4, rtol=1e-4)


def test_mqa_saves_key_value_parameters_and_cache():
    """K and V projections are d x (n_kv_heads * head_dim) per layer; everything else is the same."""
    mqa, mha = make_model(n_kv_heads=1), make_model(n_kv_heads=4)
    n_layers, d, head_dim = 3, 32, 8
    saved = n_layers * 2 * d * (4 - 1) * head_dim
    assert mha.num_params() - mqa.num_params() == saved
    assert mqa.kv_cache_bytes_per_token(torch.bfloat16) == 2 * n_layers * 1 * head_dim * 2
    assert mha.kv_cache_bytes_per_token(torch.float32) == 4 * 2 * mqa.kv_cache_bytes_per_token(torch.bfloat16)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_gqa_and_mha_variants_train_and_decode(n_kv_heads):
    model = make_model(n_kv_heads=n_kv_heads).train()
    idx, targets = random_ids(2, 10), random_ids(2, 10, seed=1)
    _, loss = model(idx, targets)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(2, 10)
        model(idx[:, :9], kv_cache=cache)
        last, _ = model(idx[:, 9:], kv_cache=cache)
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-4, rtol=1e-4)


def test_presets_and_config_errors():
    tiny, nano = M.GemmaNano(M.model_config("tiny")), M.model_config("nano")
    assert 1e6 <= tiny.num_params() <= 3e6
    assert nano.n_kv_heads == 1 and nano.d_model % nano.n_heads == 0
    with pytest.raises(ValueError, match="unknown model preset"):
        M.model_config("huge")
    with pytest.raises(ValueError, match="n_kv_heads"):
        M.model_config("tiny", n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        M.model_config("tiny", d_modle=64)
