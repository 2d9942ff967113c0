"""
Exercise (lesson 14): write `nano/serve/server.py`, an OpenAI-compatible API over the engine (Flask).

Implement `create_app({name: ServedModel(engine, tokenizer)}, api_key=None)` with
  - POST /v1/chat/completions: OpenAI's request fields (model, messages, temperature, top_p,
    max_tokens / max_completion_tokens, stop, seed, n, stream, stream_options.include_usage) and
    answer (id, object "chat.completion", created, model, choices[].message / finish_reason,
    usage); with "stream": true, server-sent "chat.completion.chunk" events (role first, content
    deltas, an empty delta with the finish reason, usage if asked) ending with `data: [DONE]`,
  - POST /v1/completions, GET /v1/models, GET /health, GET /stats, GET / (the chat page),
  - errors in OpenAI's shape {"error": {"message", "type", "param", "code"}} with the status a client
    library maps to its exception: 400 bad JSON / fields / roles / values / too long a prompt,
    401 wrong key, 404 unknown model or path, 413 too big a body, 429 queue full,
  - a streaming client that disconnects has its request cancelled and its blocks freed.

Tests run Flask's test client and a real server on a loopback port (the standard library's
http.client), on a toy model with a tokenizer trained in the test: the text is nonsense, the
protocol is the real one.
"""

import http.client
import json
import socket
import threading
import time

import pytest

from adapters import impl
from toy_models import CORPUS, small_gemma

server_mod = impl("server")
engine_mod = impl("engine")
from nano.text.chat_format import render_prompt, stop_token_ids  # noqa: E402
from nano.text.tokenizer import Tokenizer  # noqa: E402
from nano.serve.sequence import SamplingParams  # noqa: E402

CONTEXT = 512


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CORPUS, vocab_size=300, progress=False)


@pytest.fixture(scope="module")
def model(tokenizer):
    return small_gemma(tokenizer.vocab_size, context_len=CONTEXT, sliding_window=8)


@pytest.fixture
def served(model, tokenizer):
    engine = engine_mod.Engine(model, tokenizer, block_size=16, max_running=16).start()
    yield server_mod.ServedModel(engine, tokenizer)
    engine.shutdown()


@pytest.fixture
def client(served):
    return server_mod.create_app({"toy": served}).test_client()


def chat(**fields):
    return {"model": "toy", "messages": [{"role": "user", "content": "Tell me about the cat."}], **fields}


def parse_sse(raw: str) -> list:
    assert raw.endswith("data: [DONE]\n\n")
    events = [record[len("data: "):] for record in raw.split("\n\n") if record]
    assert all(record.startswith("data: ") for record in raw.split("\n\n") if record)
    return [json.loads(e) for e in events[:-1]]


def pool_is_pristine(engine, timeout: float = 5.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with engine.lock:
            a = engine.cache.allocator
            if a.num_free == engine.cache.num_blocks and not engine.scheduler.has_work():
                return all(r == 0 for r in a.ref_counts)
        time.sleep(0.02)
    return False


# ---- answers in OpenAI's shape -----------------------------------------------------------------------


def test_chat_completion_schema_and_greedy_equals_the_engine(client, served, tokenizer):
    r = client.post("/v1/chat/completions", json=chat(temperature=0, max_tokens=20))
    assert r.status_code == 200
    body = r.get_json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion" and body["model"] == "toy"
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant" and choice["logprobs"] is None
    assert choice["finish_reason"] in ("stop", "length")
    prompt = render_prompt(chat()["messages"], tokenizer)
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(prompt) and usage["total_tokens"] == len(prompt) + usage["completion_tokens"]
    # the same request straight through the engine: the same text
    expected = served.engine.generate([prompt], SamplingParams(
        max_tokens=20, stop_token_ids=tuple(stop_token_ids(tokenizer))))[0]
    assert choice["message"]["content"] == expected["text"]
    assert usage["completion_tokens"] == len(expected["token_ids"])
    # max_completion_tokens is the newer name of max_tokens
    r = client.post("/v1/chat/completions", json=chat(temperature=0, max_completion_tokens=3))
    assert r.get_json()["usage"]["completion_tokens"] <= 3
    assert pool_is_pristine(served.engine)


def test_streamed_chunks(client, served):
    full = client.post("/v1/chat/completions", json=chat(temperature=0, max_tokens=25)).get_json()
    r = client.post("/v1/chat/completions", json=chat(temperature=0, max_tokens=25, stream=True,
                                                      stream_options={"include_usage": True}))
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    chunks = parse_sse(r.get_data(as_text=True))
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2]]
    assert "".join(content) == full["choices"][0]["message"]["content"]
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == full["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    # without include_usage: no usage chunk
    r = client.post("/v1/chat/completions", json=chat(max_tokens=5, stream=True))
    assert "usage" not in parse_sse(r.get_data(as_text=True))[-1]


def test_n_seed_and_stop(client, served):
    body = client.post("/v1/chat/completions", json=chat(n=3, seed=7, temperature=1.0, max_tokens=15)).get_json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    again = client.post("/v1/chat/completions", json=chat(n=3, seed=7, temperature=1.0, max_tokens=15)).get_json()
    assert [c["message"] for c in body["choices"]] == [c["message"] for c in again["choices"]]  # seeded
    text = client.post("/v1/chat/completions", json=chat(temperature=0, max_tokens=30)).get_json()
    text = text["choices"][0]["message"]["content"]
    stop = text[5:8]
    if len(stop) == 3 and text.find(stop) >= 0:
        cut = client.post("/v1/chat/completions", json=chat(temperature=0, max_tokens=30, stop=[stop])).get_json()
        assert cut["choices"][0]["message"]["content"] == text[:text.find(stop)]
        assert cut["choices"][0]["finish_reason"] == "stop"


def test_completions_models_health_stats_and_page(client, served):
    r = client.post("/v1/completions", json={"model": "toy", "prompt": "Once upon a time", "max_tokens": 5})
    body = r.get_json()
    assert r.status_code == 200 and body["object"] == "text_completion" and "text" in body["choices"][0]
    assert body["usage"]["completion_tokens"] <= 5
    models = client.get("/v1/models").get_json()
    assert models["object"] == "list" and models["data"][0]["id"] == "toy" and models["data"][0]["object"] == "model"
    assert client.get("/health").get_json() == {"status": "ok", "api_key_required": False}
    for _ in range(2):  # the same prompt twice: its full blocks are prefix-cache hits the second time
        client.post("/v1/chat/completions", json=chat(max_tokens=2))
    stats = client.get("/stats").get_json()
    engine_stats = served.engine.stats()
    for key in ("running", "waiting", "kv_blocks_total", "kv_blocks_used", "kv_blocks_free", "kv_blocks_cached",
                "prefix_cache_hit_rate", "total_generated_tokens"):
        assert stats[key] == engine_stats[key], key
    assert stats["kv_blocks_used"] + stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert len(stats["block_owners"]) == stats["kv_blocks_total"]
    assert stats["prefix_cache_hit_rate"] > 0  # the same chat prompt came several times
    page = client.get("/")
    assert page.status_code == 200 and b"/v1/chat/completions" in page.data
    assert b"http://" not in page.data and b"https://" not in page.data  # nothing fetched from the internet
    assert b"innerHTML" not in page.data  # model text goes in as text
    icon = client.get("/favicon.ico")  # browsers fetch it by themselves: a 404 would be a console error
    assert icon.status_code == 200 and icon.mimetype == "image/svg+xml" and icon.data.startswith(b"<svg")


# ---- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, status, param", [
    ("{not json", 400, None),
    ("[1, 2]", 400, None),
    ({"model": "toy"}, 400, "messages"),
    ({"model": "toy", "messages": []}, 400, "messages"),
    ({"model": "toy", "messages": "hi"}, 400, "messages"),
    ({"model": "toy", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ({"model": "toy", "messages": [{"role": "user", "content": 3}]}, 400, "messages"),
    ({"model": "toy", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    (chat(temperature="hot"), 400, "temperature"),
    (chat(temperature=2.5), 400, "temperature"),
    (chat(temperature=True), 400, "temperature"),
    (chat(top_p=1.5), 400, "top_p"),
    (chat(max_tokens=0), 400, "max_tokens"),
    (chat(max_tokens=2.5), 400, "max_tokens"),
    (chat(n=0), 400, "n"),
    (chat(n=100), 400, "n"),
    (chat(seed="x"), 400, "seed"),
    (chat(stop=[1]), 400, "stop"),
    (chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (chat(stream="yes"), 400, "stream"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
])
def test_bad_requests_get_openai_errors(client, served, body, status, param):
    data = body if isinstance(body, str) else json.dumps(body)
    r = client.post("/v1/chat/completions", data=data, content_type="application/json")
    assert r.status_code == status
    error = r.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert served.engine.total_generated == 0 and not served.engine.requests  # nothing reached the engine


def test_too_long_prompt_big_body_unknown_path_and_full_queue(served, model, tokenizer):
    app = server_mod.create_app({"toy": served}, max_body_bytes=4000)
    client = app.test_client()
    long = {"model": "toy", "messages": [{"role": "user", "content": "cat " * 900}]}
    r = client.post("/v1/chat/completions", json=long)
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "context_length_exceeded"
    r = client.post("/v1/chat/completions", json={**long, "messages": [{"role": "user", "content": "x" * 5000}]})
    assert r.status_code == 413 and "error" in r.get_json()
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and r.get_json()["error"]["type"] == "invalid_request_error"
    # a queue that holds nothing: every request is "too many"
    busy = engine_mod.Engine(model, tokenizer, max_waiting=0).start()
    try:
        r = server_mod.create_app({"toy": server_mod.ServedModel(busy, tokenizer)}).test_client().post(
            "/v1/chat/completions", json=chat())
        assert r.status_code == 429 and r.get_json()["error"]["type"] == "rate_limit_exceeded"
    finally:
        busy.shutdown()
    # a stopped engine: 503, and /health says so
    stopped = engine_mod.Engine(model, tokenizer)
    c = server_mod.create_app({"toy": server_mod.ServedModel(stopped, tokenizer)}).test_client()
    assert c.post("/v1/chat/completions", json=chat()).status_code == 503
    assert c.get("/health").status_code == 503
    # the server is still fine afterwards
    assert client.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200


def test_api_key(served):
    client = server_mod.create_app({"toy": served}, api_key="s3cret").test_client()
    assert client.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code == 401
    r = client.post("/v1/chat/completions", json=chat(max_tokens=2), headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.get_json()["error"]["type"] == "authentication_error"
    assert client.get("/v1/models").status_code == 401 and client.get("/stats").status_code == 401
    ok = client.post("/v1/chat/completions", json=chat(max_tokens=2), headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200  # open
    assert client.get("/health").get_json()["api_key_required"]  # the page asks for the key first


# ---- a real server on a loopback port -------------------------------------------------------------------------


def post(url_port: int, body: dict) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", url_port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def test_real_server_concurrent_streams_match_the_engine(served, tokenizer):
    messages = [[{"role": "user", "content": f"Story number {i} about a cat."}] for i in range(6)]
    expected = served.engine.generate([render_prompt(m, tokenizer) for m in messages], SamplingParams(
        max_tokens=30, stop_token_ids=tuple(stop_token_ids(tokenizer))))
    results = [None] * len(messages)

    def client(i, port):
        conn, response = post(port, {"model": "toy", "messages": messages[i], "temperature": 0, "max_tokens": 30,
                                     "stream": True})
        raw = response.read().decode()
        conn.close()
        results[i] = "".join(c["choices"][0]["delta"].get("content", "") for c in parse_sse(raw) if c["choices"])

    with server_mod.ServerThread(server_mod.create_app({"toy": served})) as server:
        threads = [threading.Thread(target=client, args=(i, server.port)) for i in range(len(messages))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert results == [e["text"] for e in expected]
    assert pool_is_pristine(served.engine)


def test_disconnect_mid_stream_frees_the_blocks(served, monkeypatch):
    engine = served.engine
    # ignore_eos: the random model's reply runs to max_tokens (its stop token, drawn by chance, once
    # ended it before we hung up); and 2 ms per step, so that 480 tokens take about a second: the toy
    # model alone could finish them before the server's next write finds the client gone
    step = engine.step

    def slow_step():
        time.sleep(0.002)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    with server_mod.ServerThread(server_mod.create_app({"toy": served})) as server:
        # a raw socket, so that we can hang up whenever we like
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        body = json.dumps(chat(max_tokens=480, temperature=1.0, seed=0, stream=True, ignore_eos=True)).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while received.count(b"data: ") < 3:  # the first events arrived: the sequence is running
            received += sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 200")
        assert engine.stats()["kv_blocks_used"] > 0
        sock.close()  # hang up without reading the rest
        assert pool_is_pristine(engine, timeout=10), "the disconnected request still holds KV blocks"
    assert engine.total_generated < 480  # cancelled long before its 480 tokens
