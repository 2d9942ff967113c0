"""
Serving many users at once: a paged KV cache, continuous batching, an HTTP API (lesson 14).

    kv_cache.py         the paged KV cache: a block pool, block tables, prefix caching, fork
    paged_attention.py  attention that reads K/V through a block table (gather path, Triton decode kernel)
    model_runner.py     one batched model call over many sequences' paged caches
    engine.py           continuous batching: admit, decode, preempt, cancel, stream
    server.py           an OpenAI-compatible HTTP API and the chat page (Flask; static/chat.html)
"""
