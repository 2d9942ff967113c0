"""
Exercise (lesson 13): write `nano/model/generate.py`, the sampling loop with a KV cache.

Implement
  - `top_k_filter(logits, k)` and `top_p_filter(logits, p)`: set the logits of the tokens they drop
    to -inf (top-k keeps the k largest; top-p keeps the fewest top tokens whose probability reaches p),
  - `sample_next(logits, temperature, top_k, top_p, generator)`: argmax at temperature 0, else a
    seeded draw from the filtered softmax,
  - `generate(model, prompt_ids, max_new_tokens, ...)`: prefill the prompt into the KV cache once, then
    feed one token per step, so that greedy output equals recomputing everything each step
    (`use_cache=False`); stop at a stop token (kept as the last id), at a repetition loop, or at the
    model's context length; call `on_token` for every new token,
  - `stop_reason(tokens, length, max_length, max_new_tokens, stop_tokens, repetition_stop, should_stop,
    reply_start)`: the one stop rule `generate`, `generate_batch` and the serving engine share, called
    after each appended token: "stop_token", "max_new_tokens", "repetition", "should_stop" or
    "max_length" (the first that holds, in this order), or None to go on,
  - `generate_batch(model, prompts, ...)`: left-pad the prompts, mask the padding, share one cache;
    greedy rows equal `generate` one prompt at a time,
  - `StreamDecoder`: text from token ids without ever printing half a character.

The model here is the real GemmaNano at a toy size (vocab 64, width 32, 2 layers), randomly
initialised with a fixed seed: its text is nonsense, but the cache arithmetic is the real one.
"""

import pytest
import torch

from adapters import impl
from toy_models import small_gemma

generate_mod = impl("generate")
from nano.model.attention import soft_cap  # noqa: E402

VOCAB = 64


@pytest.fixture(scope="module")
def model():
    return small_gemma(VOCAB, context_len=48, sliding_window=8)


def random_prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (length,), generator=g).tolist()


# ---- filters and sampling on hand-made logits ---------------------------------------------------


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, -2.0, 3.0, 0.5], [0.0, 0.0, 9.0, 1.0, 2.0]])
    kept = generate_mod.top_k_filter(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True, False], [False, False, True, False, True]]
    # kept logits are unchanged, not renormalised
    assert kept[0, 1] == 4.0 and kept[1, 4] == 2.0
    # k >= vocabulary keeps everything
    assert torch.equal(generate_mod.top_k_filter(logits, 5), logits)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    # p = 0.7: 0.5 alone is not enough, 0.5 + 0.3 = 0.8 is: tokens 1 and 3
    assert torch.isfinite(generate_mod.top_p_filter(logits, 0.7)).tolist() == [False, True, False, True]
    # p = 0.85: needs 0.5 + 0.3 + 0.15
    assert torch.isfinite(generate_mod.top_p_filter(logits, 0.85)).tolist() == [False, True, True, True]
    # a tiny p still keeps the top token
    assert torch.isfinite(generate_mod.top_p_filter(logits, 0.01)).tolist() == [False, True, False, False]
    # p = 1 keeps all
    assert torch.isfinite(generate_mod.top_p_filter(logits, 1.0)).all()


def test_sample_next_greedy_and_seeded():
    logits = torch.tensor([[0.1, 2.0, 1.9, -1.0], [3.0, 0.0, 0.0, 2.9]])
    assert generate_mod.sample_next(logits, temperature=0.0).tolist() == [1, 0]
    # seeded draws repeat; top_k=2 never yields a token outside the two largest
    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [generate_mod.sample_next(logits, 1.5, generator=g).tolist() for _ in range(20)]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)  # (a 1 in 2^20-ish coincidence otherwise)
    g = torch.Generator().manual_seed(0)
    many = torch.stack([generate_mod.sample_next(logits, 2.0, top_k=2, generator=g) for _ in range(200)])  # (200, 2)
    assert set(many[:, 0].tolist()) == {1, 2} and set(many[:, 1].tolist()) == {0, 3}


# ---- generation with the real model ---------------------------------------------------------------


def test_cached_greedy_equals_uncached(model):
    for length, seed in [(1, 0), (5, 1), (12, 2)]:
        prompt = random_prompt(length, seed)
        cached = generate_mod.generate(model, prompt, max_new_tokens=20, use_cache=True)
        uncached = generate_mod.generate(model, prompt, max_new_tokens=20, use_cache=False)
        assert len(cached) == 20
        assert cached == uncached, f"prompt of {length}: cache changed greedy output"


def test_cache_feeds_one_token_per_step(model, monkeypatch):
    """With the cache: the prompt once, then single tokens. Without: the whole sequence each step.

    What the cache is fed is read from its `advance` (the fused decode step bypasses the model's
    forward, but every step advances the cache); without a cache, from the model's forward."""
    cache_type = type(model.new_kv_cache(1, 4))
    advances = []
    real_advance = cache_type.advance
    monkeypatch.setattr(cache_type, "advance", lambda cache, n: (advances.append(n), real_advance(cache, n))[1])
    generate_mod.generate(model, random_prompt(5, 3), max_new_tokens=4, use_cache=True)
    lengths = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(args[0].shape[1]), with_kwargs=True)
    try:
        generate_mod.generate(model, random_prompt(5, 3), max_new_tokens=4, use_cache=False)
    finally:
        hook.remove()
    assert advances == [5, 1, 1, 1]  # the 4th token is chosen but never fed
    assert lengths == [5, 6, 7, 8]


def test_seeded_sampling_repeats_and_cache_matches(model):
    prompt = random_prompt(6, 4)
    kwargs = dict(max_new_tokens=15, temperature=1.0, top_k=20, top_p=0.9, seed=123)
    first = generate_mod.generate(model, prompt, **kwargs)
    assert generate_mod.generate(model, prompt, **kwargs) == first
    assert generate_mod.generate(model, prompt, use_cache=False, **kwargs) == first
    assert all(0 <= t < VOCAB for t in first)


def test_batch_equals_one_by_one(model):
    prompts = [random_prompt(n, 10 + n) for n in (7, 2, 11, 1, 5)]
    batch = generate_mod.generate_batch(model, prompts, max_new_tokens=12)
    alone = [generate_mod.generate(model, p, max_new_tokens=12) for p in prompts]
    assert batch == alone


def test_batch_returns_the_log_probs_it_sampled_with(model):
    """return_logprobs: each new id comes with its log-prob under the distribution it was drawn from
    (temperature, top-k): the same tokens as without it, and a log-prob that is 0 or below, finite;
    with top_k=1 every draw is certain (log-prob 0). Greedy has no distribution: a clear error."""
    prompts = [random_prompt(n, 20 + n) for n in (3, 6)]
    plain = generate_mod.generate_batch(model, prompts, max_new_tokens=8, temperature=0.8, seed=5)
    tokens, drawn = generate_mod.generate_batch(model, prompts, max_new_tokens=8, temperature=0.8, seed=5, return_logprobs=True)
    assert tokens == plain and [len(d) for d in drawn] == [len(t) for t in tokens]
    assert all(-50 < x <= 0 for row in drawn for x in row)
    _, certain = generate_mod.generate_batch(model, prompts, max_new_tokens=4, temperature=0.8, top_k=1, return_logprobs=True)
    assert all(x == pytest.approx(0.0, abs=1e-6) for row in certain for x in row)
    with pytest.raises(ValueError, match="sampling"):
        generate_mod.generate_batch(model, prompts, max_new_tokens=4, return_logprobs=True)


def test_stop_token_stops_each_row(model):
    prompt = random_prompt(4, 5)
    free = generate_mod.generate(model, prompt, max_new_tokens=20)
    # pick a token the model writes for the first time at step k: generation must end right there
    k = next(i for i in range(2, 20) if free[i] not in free[:i])
    stopped = generate_mod.generate(model, prompt, max_new_tokens=20, stop_tokens=[free[k]])
    assert stopped == free[: k + 1]
    # in a batch, only the row that meets the stop token stops
    other = random_prompt(9, 6)
    other_free = generate_mod.generate(model, other, max_new_tokens=20, stop_tokens=[free[k]])
    rows = generate_mod.generate_batch(model, [prompt, other], max_new_tokens=20, stop_tokens=[free[k]])
    assert rows == [free[: k + 1], other_free]


def test_streaming_callback_sees_every_token(model):
    seen = []
    out = generate_mod.generate(model, random_prompt(3, 7), max_new_tokens=10, on_token=seen.append)
    assert seen == out and len(out) == 10


def test_repetition_stop(model):
    assert generate_mod.is_looping([9, 1, 2, 1, 2, 1, 2], window=6)
    assert generate_mod.is_looping([5, 5, 5, 5], window=4)
    assert not generate_mod.is_looping([1, 2, 3, 1, 2, 4], window=6)
    assert not generate_mod.is_looping([5, 5, 5], window=4)  # shorter than the window
    assert not generate_mod.is_looping([5] * 10, window=0)  # 0 = off
    prompt = random_prompt(5, 8)
    free = generate_mod.generate(model, prompt, max_new_tokens=40)
    # where the rule says the loop is seen first
    expected_len = next((n for n in range(1, 41) if generate_mod.is_looping(free[:n], 6)), 40)
    assert expected_len < 40, "this seeded toy model was expected to fall into a loop"
    assert generate_mod.generate(model, prompt, max_new_tokens=40, repetition_stop=6) == free[:expected_len]
    assert generate_mod.generate_batch(model, [prompt], max_new_tokens=40, repetition_stop=6) == [free[:expected_len]]


def test_stop_reason_says_why_in_a_fixed_order():
    rule = generate_mod.stop_reason
    # one rule per reason; `length` is measured by the caller, the reply counted from reply_start
    assert rule([3, 4, 9], length=5, max_length=48, max_new_tokens=10, stop_tokens={9}) == "stop_token"
    assert rule([3, 4, 5], length=5, max_length=48, max_new_tokens=3) == "max_new_tokens"
    assert rule([7, 7, 7, 7], length=5, max_length=48, max_new_tokens=10, repetition_stop=4) == "repetition"
    assert rule([3, 4], length=5, max_length=48, max_new_tokens=10, should_stop=lambda r: r == [3, 4]) == "should_stop"
    assert rule([3, 4], length=48, max_length=48, max_new_tokens=10) == "max_length"
    assert rule([3, 4], length=47, max_length=48, max_new_tokens=10) is None
    assert rule([3, 4], length=500, max_length=None, max_new_tokens=10) is None  # no limit
    # the first that holds wins: a stop token at the last allowed token is still a stop token
    assert rule([3, 9], length=48, max_length=48, max_new_tokens=2, stop_tokens={9}) == "stop_token"
    assert rule([3, 4], length=48, max_length=48, max_new_tokens=2) == "max_new_tokens"
    # prompt + reply in one list: only the reply counts towards max_new_tokens, loops and the predicate
    seen = []
    tokens = [7, 7, 7, 7, 1, 2]  # a prompt of four 7s, a reply [1, 2]
    assert rule(tokens, 6, 48, max_new_tokens=3, repetition_stop=4, should_stop=seen.append, reply_start=4) is None
    assert seen == [[1, 2]]
    assert rule(tokens, 6, 48, max_new_tokens=2, reply_start=4) == "max_new_tokens"


def test_context_length_is_respected(model):
    context_len = model.cfg.context_len
    prompt = random_prompt(context_len - 5, 9)
    # the sequence never exceeds the context: 5 new tokens at most, with or without the cache
    for use_cache in (True, False):
        assert len(generate_mod.generate(model, prompt, max_new_tokens=20, use_cache=use_cache)) == 5
    # a prompt longer than the context keeps its last context_len - 1 tokens
    long_prompt = random_prompt(context_len + 10, 10)
    assert generate_mod.generate(model, long_prompt, 3) == generate_mod.generate(model, long_prompt[-(context_len - 1):], 3)
    assert len(generate_mod.generate(model, long_prompt, 3)) == 1


def test_cache_reuse_across_turns(model):
    """Multi-turn chat: a second call that extends the same cache equals one fresh call on everything."""
    first_turn, second_turn = random_prompt(6, 11), random_prompt(4, 12)
    cache = model.new_kv_cache(1, model.cfg.context_len)
    reply = generate_mod.generate(model, first_turn, max_new_tokens=5, kv_cache=cache)
    # the cache holds the prompt and every reply token but the last, which the next call feeds first
    assert cache.pos == len(first_turn) + len(reply) - 1
    second = generate_mod.generate(model, [reply[-1]] + second_turn, max_new_tokens=5, kv_cache=cache)
    fresh = generate_mod.generate(model, first_turn + reply + second_turn, max_new_tokens=5)
    assert second == fresh


# ---- printing a stream of bytes safely --------------------------------------------------------------


def tokenizer_with_half_an_emoji():
    """A real nano Tokenizer, built from parts: specials 0-5, bytes 6-261, and ONE merge F0 + 9F -> 262.

    "😀" is the 4 bytes F0 9F 98 80, so it encodes as [262, 6 + 0x98, 6 + 0x80]: one character
    spread over three tokens, the first of which is half a character.
    """
    tokenizer_mod = impl("tokenizer")
    specials = tokenizer_mod.SPECIAL_TOKENS
    vocab = {i: name.encode() for i, name in enumerate(specials)}
    vocab.update({len(specials) + b: bytes([b]) for b in range(256)})
    vocab[len(specials) + 256] = b"\xf0\x9f"
    return tokenizer_mod.Tokenizer(vocab, [(b"\xf0", b"\x9f")], special_tokens=specials)


def test_stream_decoder_holds_back_partial_utf8():
    tokenizer = tokenizer_with_half_an_emoji()
    text = "hi 😀 é!"
    ids = tokenizer.encode(text)
    emoji_at = len(tokenizer.encode("hi "))
    assert ids[emoji_at] == len(tokenizer.special_tokens) + 256  # the merged half-emoji token is used
    decoder = generate_mod.StreamDecoder(tokenizer)
    pieces = [decoder.feed(i) for i in ids]
    # the emoji's 3 tokens arrive one by one: nothing is printed until the last, never U+FFFD
    assert pieces[emoji_at : emoji_at + 3] == ["", "", "😀"]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + decoder.flush() == text
    # whereas decoding each token on its own would print replacement characters
    assert "\ufffd" in tokenizer.decode([ids[emoji_at]])


def test_stream_decoder_specials_batches_and_flush():
    tokenizer = tokenizer_with_half_an_emoji()
    decoder = generate_mod.StreamDecoder(tokenizer)
    end_of_turn = tokenizer.special_tokens["<end_of_turn>"]
    # several ids at once work; special tokens are skipped
    assert decoder.feed(tokenizer.encode("ok") + [end_of_turn]) == "ok"
    assert decoder.feed(tokenizer.encode("😀")[:1]) == ""
    assert decoder.flush() == "\ufffd"  # the stream ended mid-character: only now is it replaced
    assert generate_mod.StreamDecoder(tokenizer, skip_special=False).feed([end_of_turn]) == "<end_of_turn>"


def test_generation_restores_training_mode(model):
    """RL lessons generate mid-training: generation runs in eval mode and gives the mode back."""
    modes_seen = []
    hook = model.register_forward_pre_hook(lambda module, args: modes_seen.append(module.training))
    model.train()
    try:
        generate_mod.generate(model, [1, 2], max_new_tokens=2)
        assert model.training
        generate_mod.generate_batch(model, [[1, 2], [3]], max_new_tokens=2)
        assert model.training
    finally:
        model.eval()
        hook.remove()
    assert modes_seen and not any(modes_seen)  # every forward pass ran in eval mode


def test_training_after_generation_still_works():
    """RL lessons generate (under torch.inference_mode) and then train the same model. Nothing made
    during generation may end up in the training graph: a constant cached there (the soft-caps' 0-dim
    tensors) would be an inference tensor, and the first backward pass would refuse it."""
    gemma = impl("gemma")
    torch.manual_seed(0)
    # soft-caps of values no other test uses, so their constants are first made inside generation
    cfg = gemma.model_config("tiny", vocab_size=VOCAB, context_len=32, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                             head_dim=16, d_ff=64, sliding_window=8, query_pre_attn_scalar=16.0, attn_impl="eager",
                             attn_softcap=47.25, final_softcap=28.75)
    fresh = gemma.GemmaNano(cfg)
    generate_mod.generate_batch(fresh, [[1, 2, 3], [4]], max_new_tokens=3)
    ids = torch.tensor([random_prompt(12, seed=1)])
    fresh.train()
    logits = fresh.lm_head(fresh.forward_hidden(ids))  # soft-capped logits, as RL scores its answers
    torch.log_softmax(logits, dim=-1)[0, :-1].gather(-1, ids[0, 1:, None]).mean().backward()
    assert all(p.grad is not None for p in fresh.parameters() if p.requires_grad)


def test_greedy_capped_is_argmax_of_the_capped_logits_ties_included():
    cap = 30.0
    raw = torch.randn(64, 500) * 8
    raw[1, :2] = torch.tensor([1000.0, 1001.0])  # both cap to exactly 30.0: the FIRST wins, not the larger
    raw[2, 10:20] = 2000.0  # a tie of ten, past the k = 4 looked at first: that row is capped in full
    expected = soft_cap(raw, cap).argmax(dim=-1)
    got = generate_mod.greedy_capped(raw, cap)
    assert torch.equal(got, expected)
    assert got[1] == 0 and got[2] == 10 and raw[1].argmax() == 1  # the raw argmax would differ
