"""
Serving many users at once: a paged KV cache, continuous batching, an HTTP API (lesson 14).

    kv_cache.py         the paged KV cache: a block pool, block tables, prefix caching, fork
    paged_attention.py  attention that reads K/V through a block table (gather path, Triton decode kernel)
    sequence.py         what a request asks for (SamplingParams) and the sequences that carry it
    scheduler.py        the waiting and running queues: admit, reserve decode slots, preempt, fork
    model_runner.py     one batched model call over many sequences' paged caches
    compiled_decode.py  decode steps padded to a few fixed shapes, for torch.compile (Engine(compile_decode=True))
    engine.py           continuous batching: the loop (schedule, run the model, sample, stream, cancel)
    server.py           an OpenAI-compatible HTTP API and the chat page (Flask; static/chat.html)
"""
