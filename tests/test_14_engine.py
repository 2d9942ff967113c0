"""
Exercise (lesson 14): write `nano/serve/engine.py`, continuous batching over the paged KV cache.

Implement `Engine(model, tokenizer, num_blocks, block_size, ...)` with
  - `submit(prompt_ids, SamplingParams)` -> request id (thread-safe), `stream(request_id)` -> events
    {"index", "text", "token_ids", "finish_reason"}, `cancel(request_id)`, `start()` / `shutdown()`
    for a background loop, and `generate(prompts, params)` that runs to completion in this thread;
  - `step()`: the scheduler's decisions (nano/serve/scheduler.py: admit waiting sequences whose blocks
    fit, give every running sequence one more slot, preempting the NEWEST when the pool is dry), one
    model call over the new prompts and one token of every running sequence, then per-request
    sampling, stop tokens, stop strings and token limits (nano/model/generate.py: stop_reason);
  - n > 1: the choices fork off the prompt's blocks (shared, copy-on-write);
  - `running`, `waiting` (the scheduler's queues) and `preemptions`, read by these tests.

The checks: greedy outputs of many requests at once equal `generate` one at a time; the same under
a pool so small that sequences get preempted; cancelling frees every block; a thousand short
requests leave the pool exactly as it started. The model is the real GemmaNano at a toy size.
"""

import threading
from pathlib import Path

import pytest
import torch

from adapters import impl
from toy_models import CORPUS, small_gemma

engine_mod = impl("engine")
generate_mod = impl("generate")

from nano.text.tokenizer import Tokenizer  # noqa: E402
from nano.serve.kv_cache import SequenceBlocks  # noqa: E402
from nano.serve.sequence import SamplingParams  # noqa: E402

VOCAB = 64


@pytest.fixture(scope="module")
def model():
    return small_gemma(VOCAB, context_len=64, sliding_window=8)


def random_prompts(count: int, seed: int, longest: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest, (count,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def pool_is_pristine(engine) -> bool:
    allocator = engine.cache.allocator
    return (allocator.num_free == engine.cache.num_blocks and all(r == 0 for r in allocator.ref_counts)
            and not engine.scheduler.has_work())


def test_concurrent_greedy_equals_generate_alone(model):
    prompts = random_prompts(16, seed=1)
    # shared prefixes: a hit or not depends on whether the first had its blocks in the cache when
    # the others were admitted (test_a_shared_system_prompt_is_computed_once makes sure, and counts)
    prompts += [prompts[3] + [7, 8, 9], prompts[3][:5]]
    stops = (5, 9)  # some replies end at a stop token (kept as their last id, as generate does)
    alone = [generate_mod.generate(model, p, max_new_tokens=24, stop_tokens=stops) for p in prompts]
    engine = engine_mod.Engine(model, block_size=4, max_running=32)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=24, stop_token_ids=stops))
    assert [o["token_ids"] for o in outputs] == alone
    for o, a in zip(outputs, alone):
        assert o["finish_reason"] == ("stop" if a[-1] in stops else "length")
    assert pool_is_pristine(engine)


def test_context_length_ends_a_reply_as_generate_does(model):
    prompt = random_prompts(1, seed=2, longest=60)[0] + [1] * 40  # close to the 64-token context
    engine = engine_mod.Engine(model, block_size=4)
    out = engine.generate([prompt], SamplingParams(max_tokens=100))[0]
    assert out["token_ids"] == generate_mod.generate(model, prompt, max_new_tokens=100)
    assert out["finish_reason"] == "length" and len(prompt) + len(out["token_ids"]) == 64


def test_repetition_stop_ends_a_reply_as_generate_does(model):
    prompts = random_prompts(8, seed=9)
    alone = [generate_mod.generate(model, p, max_new_tokens=40, repetition_stop=6) for p in prompts]
    assert any(len(a) < 40 for a in alone), "some replies were meant to loop"
    engine = engine_mod.Engine(model, block_size=4)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=40, repetition_stop=6))
    assert [o["token_ids"] for o in outputs] == alone
    for o, a in zip(outputs, alone):  # a loop ends the reply as the request asked: "stop"
        assert o["finish_reason"] == ("stop" if len(a) < 40 else "length")
    # off by default: the same prompts then run to max_tokens
    assert all(len(o["token_ids"]) == 40 for o in engine.generate(prompts, SamplingParams(max_tokens=40)))


def test_preemption_under_a_small_pool_gives_the_same_outputs(model):
    prompts = random_prompts(10, seed=3)
    alone = [generate_mod.generate(model, p, max_new_tokens=30) for p in prompts]
    # 14 blocks of 4 = 56 slots: two or three sequences at a time, so the pool runs dry mid-reply
    engine = engine_mod.Engine(model, num_blocks=14, block_size=4, prefix_caching=False)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=30))
    assert engine.preemptions > 0, "the pool was meant to be too small for all of them"
    assert [o["token_ids"] for o in outputs] == alone
    assert pool_is_pristine(engine)



def test_a_shared_system_prompt_is_computed_once(model):
    system = random_prompts(1, seed=12, longest=40)[0] + list(range(24))  # 24+ tokens: several full blocks
    prompts = [system + question for question in random_prompts(6, seed=13, longest=6)]
    alone = [generate_mod.generate(model, p, max_new_tokens=10) for p in prompts]
    engine = engine_mod.Engine(model, block_size=4)
    first = engine.submit(prompts[0], SamplingParams(max_tokens=10))
    engine.step()  # its prompt is in the cache now, full blocks registered
    ids = [first] + [engine.submit(p, SamplingParams(max_tokens=10)) for p in prompts[1:]]
    while engine.scheduler.has_work():
        engine.step()
    shared_blocks = len(system) // 4
    # each later prompt found every full block of the system prompt (the allocator counts blocks)
    assert engine.cache.allocator.hits >= 5 * shared_blocks
    assert [engine.release(i).sequences[0].output_ids for i in ids] == alone


@pytest.mark.parametrize("pool", [None, 14])
def test_chunked_prefill_gives_the_same_outputs(model, pool):
    prompts = random_prompts(10, seed=3, longest=40)
    prompts += [prompts[2] + [5, 6], prompts[2][:9]]  # shared prefixes, partly cached while chunks go in
    alone = [generate_mod.generate(model, p, max_new_tokens=16) for p in prompts]
    # 7 prompt tokens a step: most prompts take several steps, beside the others' decoding; with 14
    # blocks of 4 the pool also runs dry, and a sequence may be preempted in the middle of its prompt
    engine = engine_mod.Engine(model, num_blocks=pool, block_size=4, max_prefill_tokens=7, chunked_prefill=True)
    steps_with_both = 0
    ids = [engine.submit(p, SamplingParams(max_tokens=16)) for p in prompts]
    while engine.scheduler.has_work():
        prefill_before = len(engine.scheduler.prefilling)
        engine.step()
        steps_with_both += prefill_before > 0 and len(engine.running) > 0
    assert steps_with_both > 0
    assert [engine.release(i).sequences[0].output_ids for i in ids] == alone
    if pool:
        assert engine.preemptions > 0
    assert pool_is_pristine(engine)

def test_cancellation_frees_every_block_at_once(model):
    engine = engine_mod.Engine(model, num_blocks=40, block_size=4)
    ids = [engine.submit(p, SamplingParams(max_tokens=50)) for p in random_prompts(6, seed=4)]
    for _ in range(5):
        engine.step()
    assert engine.cache.allocator.num_used > 0
    for request_id in ids[:3]:
        engine.cancel(request_id)
    # the cancelled sequences hold nothing; the others go on
    cancelled = {s.seq_id for i in ids[:3] for s in engine.requests[i].sequences}
    assert not any(s.seq_id in cancelled for s in engine.running + list(engine.waiting))
    used_by_rest = {b for s in engine.running for b in s.blocks.block_table}
    assert engine.cache.allocator.num_used == len(used_by_rest)
    for request_id in ids[3:]:
        engine.cancel(request_id)
    assert pool_is_pristine(engine)
    events = list(engine.stream(ids[0]))
    assert events[-1]["finish_reason"] == "cancelled"


def test_a_thousand_short_requests_leave_the_pool_as_it_started(model):
    engine = engine_mod.Engine(model, num_blocks=64, block_size=4, max_running=64, max_waiting=1000)
    prompts = [[i % VOCAB, (3 * i) % VOCAB, 1 + i % 7] for i in range(1000)]
    outputs = engine.generate(prompts, SamplingParams(max_tokens=3))
    assert all(len(o["token_ids"]) == 3 for o in outputs)
    assert pool_is_pristine(engine)
    assert not engine.requests  # every request was released


def test_n_choices_fork_and_match_separate_seeded_requests(model):
    prompt = random_prompts(1, seed=5, longest=15)[0] + [3, 4, 5]
    params = dict(max_tokens=12, temperature=1.0, seed=11)
    engine = engine_mod.Engine(model, block_size=4)
    forked = engine.generate([prompt], SamplingParams(n=3, **params))[0]["choices"]
    assert len(forked) == 3
    # choice i is what a request of its own with seed + i writes (the fork copied the shared block
    # before writing into it, so no choice saw another's tokens)
    for i, choice in enumerate(forked):
        alone = engine.generate([prompt], SamplingParams(**{**params, "seed": 11 + i}))[0]
        assert choice["token_ids"] == alone["token_ids"]
    assert len({tuple(c["token_ids"]) for c in forked}) > 1  # different seeds, different samples
    assert pool_is_pristine(engine)


def test_sampling_is_per_request_and_seeded(model):
    prompt = [1, 2, 3, 4]
    engine = engine_mod.Engine(model, block_size=4)
    p = SamplingParams(max_tokens=10, temperature=1.2, top_p=0.9, seed=3)
    # the same seeded request twice in one batch, next to a greedy one: equal samples, greedy unchanged
    a, b, greedy = engine.generate([prompt, prompt, prompt], [p, p, SamplingParams(max_tokens=10)])
    assert a["token_ids"] == b["token_ids"]
    assert greedy["token_ids"] == generate_mod.generate(model, prompt, max_new_tokens=10)


def test_stop_strings_and_streamed_text():
    tokenizer = Tokenizer.train(CORPUS, vocab_size=300, progress=False)
    model = small_gemma(tokenizer.vocab_size, context_len=64, sliding_window=8)
    engine = engine_mod.Engine(model, tokenizer, block_size=4).start()
    try:
        prompt = tokenizer.encode("Once upon a time")
        request_id = engine.submit(prompt, SamplingParams(max_tokens=40))
        events = list(engine.stream(request_id, timeout=30))
        full = "".join(e["text"] for e in events)
        assert full == engine.requests[request_id].sequences[0].text
        assert sum(len(e["token_ids"]) for e in events) == 40 and events[-1]["finish_reason"] == "length"
        # a stop string taken from the middle of that text ends the reply just before it
        stop = full[len(full) // 2: len(full) // 2 + 3]
        request_id = engine.submit(prompt, SamplingParams(max_tokens=40, stop=(stop,)))
        events = list(engine.stream(request_id, timeout=30))
        text = "".join(e["text"] for e in events)
        assert events[-1]["finish_reason"] == "stop" and stop not in text and full.startswith(text)
        assert text == full[:full.find(stop)]
    finally:
        engine.shutdown()


def test_submit_from_many_threads(model):
    prompts = random_prompts(12, seed=6)
    alone = [generate_mod.generate(model, p, max_new_tokens=16) for p in prompts]
    engine = engine_mod.Engine(model, block_size=4).start()
    results = [None] * len(prompts)

    def client(i):
        request_id = engine.submit(prompts[i], SamplingParams(max_tokens=16))
        results[i] = [t for e in engine.stream(request_id, timeout=30) for t in e["token_ids"]]
        engine.release(request_id)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        engine.shutdown()
    assert results == alone
    assert pool_is_pristine(engine)


def test_bad_requests_are_refused_before_the_queue(model):
    engine = engine_mod.Engine(model, block_size=4, max_waiting=2)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(ValueError, match="context"):
        engine.submit([1] * 64, SamplingParams())
    engine.submit([1], SamplingParams())
    engine.submit([1], SamplingParams())
    with pytest.raises(engine_mod.QueueFull):
        engine.submit([1], SamplingParams())


def test_nf4_model_serves_the_same_tokens_as_generate(model):
    """A 4-bit model: the engine dequantizes fused weights once per step (nano/model/decode_step.py), generate
    through the Linear4bit layers; both are the same numbers, so the same greedy tokens."""
    import copy

    from nano.model.nf4 import quantize_model

    quantized = quantize_model(copy.deepcopy(model), double_quant=True).eval()
    prompts = random_prompts(6, seed=7)
    alone = [generate_mod.generate(quantized, p, max_new_tokens=20) for p in prompts]
    engine = engine_mod.Engine(quantized, block_size=4)
    assert [o["token_ids"] for o in engine.generate(prompts, SamplingParams(max_tokens=20))] == alone


def test_fast_decode_step_is_bit_for_bit_the_plain_forward(model):
    """The fused one-token step (nano/model/decode_step.py, which generate takes) against the layer-by-layer forward."""
    prompt = torch.tensor([random_prompts(1, seed=8, longest=10)[0] + [1, 2, 3]])
    fast_cache, plain_cache = model.new_kv_cache(1, 64), model.new_kv_cache(1, 64)
    with torch.no_grad():
        logits, _ = model(prompt, kv_cache=fast_cache)
        model(prompt, kv_cache=plain_cache)
        for _ in range(30):  # past the sliding window of 8: the window mask is exercised
            token = logits[:, -1].argmax(-1, keepdim=True)
            logits = generate_mod.next_logits(model, token, fast_cache)  # the fast path
            hidden = model.forward_hidden(token, plain_cache)  # the plain one
            plain = (hidden[:, -1] @ model.embed_tokens.weight.T).float()
            plain = model.cfg.final_softcap * torch.tanh(plain / model.cfg.final_softcap)
            assert torch.equal(logits[:, -1], plain)


def test_fast_decode_step_on_a_left_padded_batch_is_bit_for_bit_the_plain_forward(model):
    """generate_batch's rows are left-padded: the fused step hides each row's padding with the cache's
    key_mask (as it hides keys outside the window) and must still give the forward's very numbers."""
    from nano.text.padding import left_pad

    ids, key_mask = left_pad([random_prompts(1, seed=s, longest=12)[0] for s in (9, 10, 11)])
    assert not key_mask.all()  # some padding to hide
    fast_cache, plain_cache = model.new_kv_cache(3, 64), model.new_kv_cache(3, 64)
    with torch.no_grad():
        logits, _ = model(ids, kv_cache=fast_cache, key_mask=key_mask)
        model(ids, kv_cache=plain_cache, key_mask=key_mask)
        for _ in range(30):  # past the sliding window of 8: window and padding masks together
            token = logits[:, -1].argmax(-1, keepdim=True)
            logits = generate_mod.next_logits(model, token, fast_cache)  # the fast path
            assert getattr(fast_cache, "inference_model", None) is not None  # (it was taken)
            assert torch.equal(logits, model(token, kv_cache=plain_cache)[0])


@pytest.mark.parametrize("four_bit", [False, True])
def test_fast_decode_step_of_a_lora_model_is_bit_for_bit_its_forward(model, four_bit):
    """An unmerged LoRA model (the RL lessons' policies, lessons 6 and 7 before saving): the fused step
    multiplies by each layer's W + s B A formed once per generation, its forward forms it per call."""
    import copy

    from nano.model.lora import inject_lora
    from nano.model.nf4 import quantize_model
    from nano.text.padding import left_pad

    adapted = quantize_model(copy.deepcopy(model), double_quant=True) if four_bit else copy.deepcopy(model)
    inject_lora(adapted, r=4, alpha=8)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:  # B = 0 at init would make the adapters invisible
                p.normal_(std=0.05)
    adapted.eval()
    ids, key_mask = left_pad([random_prompts(1, seed=s, longest=12)[0] for s in (12, 13)])
    fast_cache, plain_cache = adapted.new_kv_cache(2, 64), adapted.new_kv_cache(2, 64)
    with torch.no_grad():
        logits, _ = adapted(ids, kv_cache=fast_cache, key_mask=key_mask)
        adapted(ids, kv_cache=plain_cache, key_mask=key_mask)
        for _ in range(12):
            token = logits[:, -1].argmax(-1, keepdim=True)
            logits = generate_mod.next_logits(adapted, token, fast_cache)
            assert fast_cache.inference_model.layers[0]["qkv"].weight is not None  # fused, not called layer by layer
            assert torch.equal(logits, adapted(token, kv_cache=plain_cache)[0])


def test_a_cancel_while_the_model_runs_is_skipped_and_frees_everything(model):
    # the engine lets go of its lock while the model runs (other threads may submit, cancel, read
    # /stats); here the cancel comes from inside that window, as another thread's would
    prompts = random_prompts(4, seed=21)
    alone = [generate_mod.generate(model, p, max_new_tokens=12) for p in prompts]
    engine = engine_mod.Engine(model, block_size=4)
    ids = [engine.submit(p, SamplingParams(max_tokens=12)) for p in prompts]
    forward = engine.runner.forward
    calls = []

    def forward_then_cancel(spans, **kwargs):
        logits = forward(spans, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            engine.cancel(ids[1])  # its blocks go back while this step's results are still to come
        return logits

    engine.runner.forward = forward_then_cancel
    while engine.scheduler.has_work():
        engine.step()
    requests = [engine.release(i) for i in ids]
    cancelled = requests[1].sequences[0]
    assert cancelled.finish_reason == "cancelled" and cancelled.num_output == 2  # nothing added after the cancel
    assert [r.sequences[0].output_ids for i, r in enumerate(requests) if i != 1] == alone[:1] + alone[2:]
    assert pool_is_pristine(engine)


def test_the_fixed_shape_step_of_the_compile_benchmark_decodes_like_generate(model):
    """bench/bench_compile_decode.py times torch.compile on a decode step of one fixed shape (attention
    over the whole cache, later positions hidden by the bias): eager, it must give generate's tokens,
    past the sliding window, and logits equal to the plain forward's up to float rounding."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from bench_compile_decode import FixedShapeStep, generate_with_step

    prompt = random_prompts(1, seed=12, longest=10)[0] + [4, 5]
    step = FixedShapeStep(model, len(prompt) + 30)  # its shape: a cache of exactly this many positions
    assert generate_with_step(model, step, prompt, 30) == generate_mod.generate(model, prompt, 30)
    cache, plain_cache = model.new_kv_cache(1, len(prompt) + 30), model.new_kv_cache(1, len(prompt) + 30)
    with torch.inference_mode():
        model(torch.tensor([prompt]), kv_cache=cache)
        model(torch.tensor([prompt]), kv_cache=plain_cache)
        for pos, token in zip(range(len(prompt), len(prompt) + 20), range(3, 23)):
            fixed = step(torch.tensor([token]), torch.tensor([pos]), cache.keys, cache.values)
            plain = model(torch.tensor([[token]]), kv_cache=plain_cache)[0][:, -1]
            torch.testing.assert_close(fixed, plain, rtol=1e-5, atol=1e-5)


def test_the_padded_decode_step_serves_the_same_tokens_as_the_engine(model):
    """Engine(compile_decode=True) pads decode steps to a few fixed shapes for torch.compile
    (nano/serve/compiled_decode.py). Run eagerly here (compiling takes tens of seconds): batches of
    5, 3, 2 and 1 padded to 8, 4, 2 and 1, tables as wide as the context, the padding rows writing
    into a scratch block. The tokens must be generate's, past the sliding window, and the pool's
    blocks must all come back but the scratch one."""
    from nano.serve.compiled_decode import PaddedDecode

    prompts = random_prompts(5, seed=21)
    stops = (5, 9)  # replies end at different steps: the batch shrinks through the buckets
    alone = [generate_mod.generate(model, p, max_new_tokens=40, stop_tokens=stops) for p in prompts]
    engine = engine_mod.Engine(model, block_size=4, max_running=8)
    padded = engine.runner.padded_decode = PaddedDecode(engine.runner, compile=False)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=40, stop_token_ids=stops))
    assert [o["token_ids"] for o in outputs] == alone
    assert len({len(a) for a in alone}) > 2  # (the batch did shrink)
    allocator = engine.cache.allocator
    assert allocator.num_free == engine.cache.num_blocks - 1 and allocator.ref_counts[padded.scratch_block] == 1
    # and one step's logits, padded (3 -> 4 rows) against the engine's own path, up to float rounding
    # (the scratch block taken after the sequences' blocks: the padding row must write there, not in block 0)
    engine = engine_mod.Engine(model, block_size=4, prefix_caching=False)
    seqs = [SequenceBlocks() for _ in range(3)]
    for blocks, prompt in zip(seqs, prompts[:3]):
        engine.cache.allocate(blocks, prompt + [7])  # room for the prompt and one more token
    padded = PaddedDecode(engine.runner, compile=False)
    engine.runner.forward([(b, p, 0) for b, p in zip(seqs, prompts[:3])])  # the prompts' K/V into their blocks
    decode_spans = [(b, [7], len(p)) for b, p in zip(seqs, prompts[:3])]
    expected = engine.runner.forward(decode_spans)
    before = [pool.clone() for pool in engine.cache.pools]
    torch.testing.assert_close(padded(decode_spans), expected, rtol=1e-5, atol=1e-5)
    untouched = [b for b in range(engine.cache.num_blocks) if b != padded.scratch_block and all(b not in s.block_table for s in seqs)]
    assert all(torch.equal(pool[:, untouched], old[:, untouched]) for pool, old in zip(engine.cache.pools, before))
