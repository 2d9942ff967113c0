"""
An OpenAI-compatible HTTP server over the engine, and the chat page, in Flask.

Any program written for OpenAI's chat API (the official `openai` client, curl, LangChain, ...) can
talk to our model by changing its base URL to http://127.0.0.1:8000/v1. What it needs from us is
the exact shape of requests and answers, and errors it can understand:

    POST /v1/chat/completions   messages -> a reply (JSON, or server-sent events with "stream": true)
    POST /v1/completions        a plain text prompt -> its continuation (the older API)
    GET  /v1/models             the models this server has loaded
    GET  /health                200 while the engine runs (for a load balancer or a script)
    GET  /stats                 queues, KV blocks, prefix-cache hits, tokens/s (the chat page draws it)
    GET  /                      the chat page (nano/serve/static/chat.html)

A request travels: Flask's thread for this connection -> `parse_chat_request` (every field checked;
bad input gets a 400 here and never reaches the engine) -> chat template (nano/text/chat_format.py) ->
`Engine.submit` -> the engine thread batches it with everyone else -> events on the request's
queue -> JSON or SSE chunks back. A client that hangs up mid-stream makes the next write fail;
Flask then closes our generator, whose `finally` cancels the request and frees its blocks.

For learning and local use: Flask's development server, one process, one machine, no TLS. It binds
127.0.0.1 unless told otherwise; with `api_key` every /v1 and /stats request must carry
`Authorization: Bearer <key>`. See lessons/14_serve.md for serving the same model in production.

    app = create_app({"nano": ServedModel(engine, tokenizer)}, api_key=None)
    app.run(host="127.0.0.1", port=8000, threaded=True)      # or: serve(app, host, port) below
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import WSGIRequestHandler, make_server

from nano.text.chat_format import encode_text, render_prompt, special_id, stop_token_ids
from nano.serve.engine import Engine, QueueFull
from nano.serve.sequence import SamplingParams

STATIC_DIR = Path(__file__).resolve().parent / "static"
# the tab's icon: a blue disc with an "n", as SVG (served as /favicon.ico)
FAVICON_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><circle cx="8" cy="8" r="8" fill="#2f6fdf"/>'
               '<text x="8" y="12" font-size="11" text-anchor="middle" fill="#fff" font-family="sans-serif">n</text></svg>')
MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any prompt that fits our contexts; more is a 413
MAX_N = 8  # choices per request
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
STREAM_INTERVAL = 0.1  # seconds between a stream's writes (see create_app); bench/bench_serve.py measures it


@dataclass
class ServedModel:
    """One loaded model: its engine (running in the background) and tokenizer."""

    engine: Engine
    tokenizer: Any
    description: str = ""
    created: int = 0


class APIError(Exception):
    """An error in OpenAI's shape: HTTP status + {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_exceeded",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> Response:
        body = {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}
        return Response(json.dumps(body), status=self.status, mimetype="application/json")


# --------------------------------------------------------------------------------------------------
# 1. Checking a request: every field, before anything reaches the engine


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    """body[name] if present and a number (an int if `integer`) in [low, high], else the default."""
    value = body.get(name)
    if value is None:
        return default
    # footgun: bool is a subclass of int in Python, and true is not a temperature
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{name}' must be {kind}, got {json.dumps(value)}", param=name, code="invalid_type")
    if not low <= value <= high:
        raise APIError(400, f"'{name}' must be between {low:g} and {high:g}, got {value}", param=name,
                       code="invalid_value")
    return value


def parse_sampling(body: dict, served: ServedModel) -> tuple[SamplingParams, bool, bool]:
    """The shared fields of both endpoints -> (SamplingParams, stream, include_usage)."""
    context = served.engine.cfg.context_len
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({param: max_tokens}, param, 128, 1, context, integer=True)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    seed = _number(body, "seed", None, -(2**63), 2**63 - 1, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param="stream", code="invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise APIError(400, "'stream_options.include_usage' must be true or false", param="stream_options")
    # an extension (vLLM has it too): keep writing past <end_of_turn> / <eos>, for benchmarks that want
    # exactly max_tokens tokens per request
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError(400, "'ignore_eos' must be true or false", param="ignore_eos", code="invalid_type")
    params = SamplingParams(
        max_tokens=max_tokens, temperature=float(temperature),
        # top_p 0 means "only the likeliest token"; our filter needs p > 0, and a tiny p does exactly that
        top_p=max(float(top_p), 1e-9), stop=tuple(stop),
        stop_token_ids=() if ignore_eos else tuple(stop_token_ids(served.tokenizer)), seed=seed, n=n)
    return params, stream, include_usage


def parse_messages(body: dict, served: ServedModel) -> list[int]:
    """`messages` -> prompt ids in the chat format, or a 400 that says what is wrong."""
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "'messages' is required: a list of {\"role\": ..., \"content\": ...}", param="messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] must be an object", param="messages")
        content = message.get("content")
        # the newer API allows content as a list of parts; we accept the text parts
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            message = {**message, "content": "".join(str(p.get("text", "")) for p in content)}
            messages[i] = message
        if message.get("role") not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be 'system', 'user' or 'assistant', got "
                                f"{json.dumps(message.get('role'))}", param="messages")
        if not isinstance(message.get("content"), str):
            raise APIError(400, f"messages[{i}].content must be a string", param="messages")
    try:
        return render_prompt([{"role": m["role"], "content": m["content"]} for m in messages], served.tokenizer)
    except ValueError as e:  # the chat format's own rules: alternating turns, ending with the user
        raise APIError(400, str(e), param="messages") from None


def check_prompt_length(prompt_ids: list[int], params: SamplingParams, served: ServedModel) -> None:
    context = served.engine.cfg.context_len
    if len(prompt_ids) >= context:
        raise APIError(400, f"this model's context is {context} tokens, and the prompt alone is {len(prompt_ids)} "
                            "tokens: shorten the conversation", param="messages", code="context_length_exceeded")
    try:
        served.engine.check_prompt(prompt_ids, params)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None


# --------------------------------------------------------------------------------------------------
# 2. The app


def create_app(models: dict[str, ServedModel], api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               stream_interval: float = STREAM_INTERVAL) -> Flask:
    """A Flask app serving `models` (name -> ServedModel, each engine already started).

    stream_interval: seconds a streaming reply waits after each write, so tokens gather into fewer,
    bigger chunks (0 = write every token as soon as it is made).
    """
    if not models:
        raise ValueError("create_app needs at least one model")
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    default_name = next(iter(models))
    for served in models.values():
        served.created = served.created or int(time.time())

    # ---- errors: always OpenAI's JSON shape, never an HTML page or a dead server ----------------

    @app.errorhandler(APIError)
    def api_error(e: APIError):
        return e.response()

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):  # 404 unknown path, 405 wrong method, 413 body too large, ...
        messages = {413: f"the request body is larger than {max_body_bytes} bytes",
                    404: f"no route {request.path}: see /v1/chat/completions, /v1/completions, /v1/models"}
        return APIError(e.code or 500, messages.get(e.code, e.description or e.name)).response()

    @app.errorhandler(Exception)
    def unexpected(e: Exception):  # a bug of ours: the client gets a 500, the server goes on
        app.logger.exception("unexpected error")
        return APIError(500, f"internal error: {type(e).__name__}: {e}").response()

    @app.before_request
    def authenticate():
        if api_key is None or not (request.path.startswith("/v1/") or request.path == "/stats"):
            return None
        header = request.headers.get("Authorization", "")
        # compare_digest takes the same time for every wrong key: no guessing it letter by letter
        if not header.startswith("Bearer ") or not secrets.compare_digest(header[len("Bearer "):], api_key):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        return None

    def read_json() -> dict:
        data = request.get_data(cache=False)  # raises the 413 if the body is over the limit
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        return body

    def pick_model(body: dict) -> tuple[str, ServedModel]:
        name = body.get("model", default_name)
        if name is None:
            name = default_name
        if not isinstance(name, str):
            raise APIError(400, "'model' must be a string", param="model")
        if name not in models:
            raise APIError(404, f"the model {name!r} does not exist; this server has {sorted(models)}",
                           param="model", code="model_not_found")
        if not models[name].engine.is_alive():
            raise APIError(503, "the engine is not running; restart the server", code="engine_stopped")
        return name, models[name]

    def submit(served: ServedModel, prompt_ids: list[int], params: SamplingParams) -> str:
        try:
            return served.engine.submit(prompt_ids, params)
        except QueueFull as e:
            raise APIError(429, f"too many requests are queued ({e}); try again shortly", code="queue_full") from None

    # ---- the pages --------------------------------------------------------------------------------

    @app.get("/")
    def chat_page():
        return Response((STATIC_DIR / "chat.html").read_text(encoding="utf-8"), mimetype="text/html")

    @app.get("/favicon.ico")
    def favicon():
        # browsers ask for it on their own; without it the page's console shows a 404 on every load
        return Response(FAVICON_SVG, mimetype="image/svg+xml")

    @app.get("/health")
    def health():
        alive = all(m.engine.is_alive() for m in models.values())
        # api_key_required: the chat page asks for the key before it calls anything that needs one
        body = {"status": "ok" if alive else "engine stopped", "api_key_required": api_key is not None}
        return Response(json.dumps(body), status=200 if alive else 503, mimetype="application/json")

    @app.get("/v1/models")
    def list_models():
        data = [{"id": name, "object": "model", "created": m.created, "owned_by": "nano"} for name, m in models.items()]
        return {"object": "list", "data": data}

    @app.get("/stats")
    def stats():
        name = request.args.get("model", default_name)
        if name not in models:
            raise APIError(404, f"the model {name!r} does not exist; this server has {sorted(models)}", param="model")
        return {"model": name, "models": list(models), **models[name].engine.stats()}

    # ---- completions ------------------------------------------------------------------------------

    def answer(body: dict, name: str, served, prompt_ids: list[int], chat: bool):
        """What both endpoints do once they have a prompt: check it fits, queue it, reply whole or streamed."""
        params, stream, include_usage = parse_sampling(body, served)
        check_prompt_length(prompt_ids, params, served)
        request_id = submit(served, prompt_ids, params)
        reply = Reply(served.engine, request_id, name, len(prompt_ids), chat=chat, stream_interval=stream_interval)
        if stream:
            return Response(reply.sse(include_usage), mimetype="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return reply.whole()

    @app.post("/v1/chat/completions")
    def chat_completions():
        body = read_json()
        name, served = pick_model(body)
        prompt_ids = parse_messages(body, served)
        return answer(body, name, served, prompt_ids, chat=True)

    @app.post("/v1/completions")
    def completions():
        body = read_json()
        name, served = pick_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string", param="prompt")
        prompt_ids = [special_id(served.tokenizer, "<bos>")] + encode_text(served.tokenizer, prompt)
        return answer(body, name, served, prompt_ids, chat=False)

    return app


class Reply:
    """The answer to one request, as one JSON object or as a stream of server-sent events."""

    def __init__(self, engine: Engine, request_id: str, model: str, prompt_tokens: int, chat: bool,
                 stream_interval: float = 0.0):
        self.engine, self.request_id, self.model, self.chat = engine, request_id, model, chat
        self.stream_interval = stream_interval
        self.prompt_tokens = prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.n = engine.requests[request_id].params.n

    def usage(self) -> dict:
        request = self.engine.requests.get(self.request_id)
        completion = request.completion_tokens if request else 0
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def whole(self) -> dict:
        texts, reasons = [""] * self.n, [None] * self.n
        try:
            for event in self.engine.stream(self.request_id):
                texts[event["index"]] += event["text"]
                reasons[event["index"]] = event["finish_reason"] or reasons[event["index"]]
            usage = self.usage()
        finally:  # the client gone while we waited (or anything else): free the blocks
            self.engine.cancel(self.request_id)
            self.engine.release(self.request_id)
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "finish_reason": reasons[i], "logprobs": None} for i in range(self.n)]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": texts[i], "finish_reason": reasons[i], "logprobs": None}
                       for i in range(self.n)]
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}

    def chunk(self, choices: list[dict], **extra) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n"

    def delta(self, index: int, text: str | None, finish_reason: str | None = None) -> dict:
        """One choice of a streamed chunk: new text, or (text None) the end with its finish reason."""
        if self.chat:
            piece = {} if text is None else {"content": text}
            return {"index": index, "delta": piece, "logprobs": None, "finish_reason": finish_reason}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def sse(self, include_usage: bool) -> Iterator[str]:
        """Server-sent events: the role first, then text deltas, then each choice's finish reason,
        then (if asked) the usage, then `data: [DONE]`. Cancels the request if the client leaves."""
        finished, ended = False, 0  # ended: choices whose finish reason went out
        try:
            if self.chat:
                for i in range(self.n):
                    yield self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}])
            for batch in self.engine.stream_batches(self.request_id):
                # the events that arrived together become one write, and a choice's consecutive text
                # pieces one delta: a client sees the same text in fewer chunks when we fall behind
                pieces: list[list] = []  # [index, text, finish_reason]
                for event in batch:
                    if pieces and pieces[-1][0] == event["index"] and pieces[-1][2] is None:
                        pieces[-1][1] += event["text"]
                        pieces[-1][2] = event["finish_reason"]
                    else:
                        pieces.append([event["index"], event["text"], event["finish_reason"]])
                out = []
                for index, text, reason in pieces:
                    if text:
                        out.append(self.chunk([self.delta(index, text)]))
                    if reason is not None:
                        out.append(self.chunk([self.delta(index, None, reason)]))
                if out:
                    yield "".join(out)
                ended += sum(reason is not None for _, _, reason in pieces)
                if self.stream_interval > 0 and ended < self.n:  # (no wait after the last event)
                    # let a few tokens gather before the next write: each wake-up and write of a
                    # request thread costs CPU time (and the GIL) that the engine thread needs;
                    # 10 chunks a second still reads as smooth streaming (a few words per update),
                    # and 32 streams then keep about three quarters of the engine's throughput
                    # against under half when every token is written at once (bench/bench_serve.py)
                    time.sleep(self.stream_interval)
            finished = True
            if include_usage:
                yield self.chunk([], usage=self.usage())
            yield "data: [DONE]\n\n"
        finally:
            # GeneratorExit lands here when the client disconnects: the write failed, Flask closed us
            if not finished:
                self.engine.cancel(self.request_id)
            self.engine.release(self.request_id)


# --------------------------------------------------------------------------------------------------
# 3. Running it


class QuietHandler(WSGIRequestHandler):
    """Werkzeug's request handler without its one log line per request (benchmarks, self-checks)."""

    def log_request(self, *args, **kwargs) -> None:
        pass


class ServerThread:
    """The app on a real socket in a background thread (the lesson's self-check and the tests).

    port 0 picks a free port; `.url` says which. Werkzeug's threaded server: one thread per connection.
    """

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 0, log_requests: bool = False):
        handler = WSGIRequestHandler if log_requests else QuietHandler
        self.server = make_server(host, port, app, threaded=True, request_handler=handler)
        self.host, self.port = host, self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, name="nano-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.thread.join()
