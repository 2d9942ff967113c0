"""
Lesson 14: serve your model. One command starts an OpenAI-compatible server with a chat page; many
conversations run at once through continuous batching over a paged KV cache.

    make lesson-14                                          # the newest chat model on http://127.0.0.1:8000
    python lessons/14_serve.py --port 8080 --api_key s3cret # any OpenAI client: base_url .../v1, that key
    python lessons/14_serve.py --checkpoint_path runs/pretrain/default/checkpoints/ckpt_best.pth \\
        --adapter_path runs/sft/peft/qlora/default/adapter.pth --quantize     # the 4-bit QLoRA model
    python lessons/14_serve.py --self_check                 # start, 8 concurrent clients over HTTP, numbers, stop
    python lessons/14_serve.py --screenshot lessons/images/14_chat_page.png   # the page in headless Chromium

Without --checkpoint_path it serves the stage lesson 13 would chat with (nano/checkpoints/loading.py:
default_chat_stage) and says which; --also lora,qlora loads more stages beside it (the page gets a
model picker). Open the printed URL for the chat page: its right-hand panel draws the KV blocks as
they fill and free. Ctrl-C stops the server. The doc is lessons/14_serve.md; the throughput
benchmark is bench/bench_serve.py.
"""

import http.client
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from nano.common.config import THREADS_FOR_DECODING, parse_config, pick_device, print_config, set_threads, threads_field
from nano.common.paths import BASE_CHECKPOINT, input_path
from nano.text.chat_format import render_prompt, stop_token_ids
from nano.checkpoints.checkpoint import load_tokenizer
from nano.checkpoints.loading import STAGES, default_chat_stage, load_for_inference
from nano.serve.engine import Engine
from nano.serve.kv_cache import memory_table
from nano.serve.sequence import SamplingParams
from nano.serve.server import ServedModel, ServerThread, create_app


@dataclass
class ServeConfig:
    checkpoint_path: str = field(default="", metadata={"help": "model to serve ('' = the newest chat model under runs/)"})
    adapter_path: str = field(default="", metadata={"help": "LoRA/QLoRA adapter on top (without --checkpoint_path: on the base)"})
    quantize: bool = field(default=False, metadata={"help": "NF4-quantize the projections (4.1 bits a weight)"})
    also: str = field(default="", metadata={"help": "more stages to serve beside it, e.g. 'lora,qlora' (a model picker)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; 0.0.0.0 opens it to your network"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    api_key: str = field(default="", metadata={"help": "require 'Authorization: Bearer KEY' on /v1 and /stats ('' = open)"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    num_blocks: int = field(default=0, metadata={"help": "KV blocks in the pool (0 = enough for max_running full contexts)"})
    max_running: int = field(default=64, metadata={"help": "sequences decoded together at most"})
    max_waiting: int = field(default=256, metadata={"help": "queued sequences at most (more get HTTP 429)"})
    max_prefill_tokens: int = field(default=128, metadata={"help": "prompt tokens fed per engine step"})
    chunked_prefill: bool = field(default=True, metadata={"help": "feed a prompt longer than max_prefill_tokens in pieces, one a step, beside the running sequences (false: whole, alone)"})
    compile_decode: bool = field(default=False, metadata={"help": "torch.compile the engine's decode steps of up to 16 sequences, padded to 1, 2, 4, 8, 16 (5-45 s each on first use; here 1.9-3x the tokens/s at one sequence, 1.1-1.5x at 16; needs g++)"})
    self_check: bool = field(default=False, metadata={"help": "serve on a free port, run concurrent clients, print numbers, stop"})
    screenshot: str = field(default="", metadata={"help": "save a headless-Chromium screenshot of the chat page answering a demo message to this PNG, then stop"})
    check_clients: int = field(default=8, metadata={"help": "--self_check: concurrent streaming clients"})
    check_tokens: int = field(default=48, metadata={"help": "--self_check: max_tokens of each client"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto"})
    threads: int = threads_field(THREADS_FOR_DECODING)  # and the HTTP threads need the other core


def load_models(cfg: ServeConfig, device: str) -> dict:
    """{name: (model, tokenizer, description)} for the model asked for and any --also stages."""
    chosen = []
    if cfg.checkpoint_path or cfg.adapter_path:
        checkpoint = input_path(cfg.checkpoint_path, BASE_CHECKPOINT)
        chosen.append(("nano", checkpoint, cfg.adapter_path or None, cfg.quantize, "as asked"))
    else:
        stage = default_chat_stage()
        checkpoint, adapter = stage.paths()
        chosen.append((stage.name, checkpoint, adapter, cfg.quantize or stage.quantize,
                       "the newest chat model found; --checkpoint_path picks another"))
    by_name = {stage.name: stage for stage in STAGES}
    for name in filter(None, (n.strip() for n in cfg.also.split(","))):
        if name not in by_name:
            raise ValueError(f"--also {name}: unknown stage; stages are {', '.join(by_name)}")
        stage = by_name[name]
        if not stage.exists():
            raise FileNotFoundError(f"--also {name}: not trained yet — run `make lesson-{stage.lesson}` first")
        checkpoint, adapter = stage.paths()
        chosen.append((stage.name, checkpoint, adapter, stage.quantize, "--also"))
    models = {}
    for name, checkpoint, adapter, quantize, why in chosen:
        model, info = load_for_inference(checkpoint, adapter, quantize=quantize, device=device)
        tokenizer = load_tokenizer(info["tokenizer_fingerprint"])
        models[name] = (model, tokenizer, f"{info['description']} ({why})")
    return models


def print_memory(model, cfg: ServeConfig, engine: Engine) -> None:
    """The paged cache's arithmetic: bytes per token, blocks, and what multi-query attention saves."""
    mcfg = model.cfg
    budget = engine.cache.nbytes()
    dtype = engine.cache.keys[0].dtype
    print(f"\nKV cache: {engine.cache.num_blocks} blocks x {cfg.block_size} tokens, {budget / 2**20:.1f} MiB ({dtype})")
    print(f"  bytes per token = 2 (K and V) x {mcfg.n_layers} layers x kv_heads x {mcfg.head_dim} head_dim x "
          f"{dtype.itemsize} bytes")
    for name, row in memory_table(mcfg, cfg.block_size, budget, dtype).items():
        print(f"  {name:<28} kv_heads {row['kv_heads']:>2}: {row['bytes_per_token']:>6} B/token, "
              f"{row['tokens']:>7} tokens fit = {row['full_contexts']:>4} full {mcfg.context_len}-token contexts")


# --------------------------------------------------------------------------------------------------
# the chat page in a real browser: headless Chromium (Debian/Ubuntu: apt-get install chromium)

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DEMO_MESSAGE = "Write a short story about a cat."


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) executable, or None."""
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def run_chromium(url: str, *, dump_dom: bool = False, screenshot: str = "", budget_ms: int = 8000,
                 size: str = "1100,640", console: list[str] | None = None) -> str:
    """Load `url` in headless Chromium; return the DOM it ended with (dump_dom) or save a PNG.

    --virtual-time-budget lets the page run its timers for that long (paused while requests are in
    flight, so a streamed reply finishes first). Every flag that would reach the internet is off.
    A `console` list receives what the page wrote to its console (uncaught errors included): Chromium
    logs each message to stderr as a line with ":CONSOLE" in it.
    """
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found: `apt-get install chromium` (Debian/Ubuntu) to check the page")
    with tempfile.TemporaryDirectory() as profile:
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", f"--window-size={size}",
                   "--hide-scrollbars"]
        command += ["--dump-dom"] if dump_dom else [f"--screenshot={Path(screenshot).resolve()}"]
        command += ["--enable-logging=stderr", "--v=0"] if console is not None else []
        result = subprocess.run(command + [url], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"chromium failed ({result.returncode}): {result.stderr[-2000:]}")
    if console is not None:
        console += [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return result.stdout


def take_screenshot(name: str, served: ServedModel, cfg: ServeConfig) -> None:
    """Serve on a free port, let the page send DEMO_MESSAGE, save what the browser shows."""
    app = create_app({name: served}, api_key=cfg.api_key or None)
    query = urllib.parse.urlencode({"demo": DEMO_MESSAGE, "temperature": 0, "max_tokens": 150})
    with ServerThread(app, "127.0.0.1", 0) as server:
        # other users chatting all the while, so the KV panel shows several sequences (and, as two of
        # them ask the same thing, shared prefix blocks)
        done = threading.Event()

        def other_user(prompt: str) -> None:
            body = {"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": 150,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            while not done.is_set():
                stream_one(server.port, body, cfg.api_key)

        others = [threading.Thread(target=other_user, args=(p,)) for p in CHECK_PROMPTS[1:3] + CHECK_PROMPTS[1:3]]
        for t in others:
            t.start()
        try:
            run_chromium(f"{server.url}/?{query}", screenshot=cfg.screenshot)
        finally:
            done.set()
            for t in others:
                t.join()
    print(f"screenshot of {server.url}/?{query} saved to {cfg.screenshot}")


# --------------------------------------------------------------------------------------------------
# the self-check: real HTTP clients against a real server


def stream_one(port: int, body: dict, api_key: str) -> dict:
    """One streaming chat request over HTTP; returns its text, token count and timings."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=headers)
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read().decode()}")
    text, first, usage = "", None, None
    for line in response:  # server-sent events, one "data: ..." line each (then a blank line)
        line = line.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[len("data: "):])
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            piece = choice["delta"].get("content", "")
            if piece and first is None:
                first = time.perf_counter() - start
            text += piece
    conn.close()
    return {"text": text, "ttft": first if first is not None else time.perf_counter() - start,
            "seconds": time.perf_counter() - start, "tokens": usage["completion_tokens"]}


CHECK_PROMPTS = ("Write a short story about a cat.", "Tell me a story about a brave little dog.",
                 "What is 3 + 4?", "Write a story about the sea.", "Tell me about a red ball.",
                 "Write a short story about a bird who could not fly.", "What is 12 - 5?", "Tell me a story about a tree.")


def self_check(name: str, served: ServedModel, cfg: ServeConfig) -> None:
    """Start on a free port, run concurrent greedy streaming clients, compare with the engine, stop."""
    app = create_app({name: served}, api_key=cfg.api_key or None)
    messages = [[{"role": "user", "content": CHECK_PROMPTS[i % len(CHECK_PROMPTS)]}] for i in range(cfg.check_clients)]
    bodies = [{"model": name, "messages": m, "temperature": 0, "max_tokens": cfg.check_tokens, "stream": True,
               "stream_options": {"include_usage": True}} for m in messages]
    results = [None] * len(bodies)
    with ServerThread(app, "127.0.0.1", 0) as server:
        print(f"\nself-check: {len(bodies)} concurrent streaming clients -> {server.url}/v1/chat/completions")
        start = time.perf_counter()
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stream_one(server.port, bodies[i], cfg.api_key)))
                   for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        stats = served.engine.stats()
    if any(r is None for r in results):
        raise RuntimeError("a self-check client failed (see the traceback above)")
    # the same prompts straight through the engine, greedy: the HTTP layer must not change a token
    prompts = [render_prompt(m, served.tokenizer) for m in messages]
    direct = served.engine.generate(prompts, SamplingParams(max_tokens=cfg.check_tokens,
                                                             stop_token_ids=tuple(stop_token_ids(served.tokenizer))))
    same = sum(r["text"] == d["text"] for r, d in zip(results, direct))
    tokens = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    print(f"  {tokens} tokens in {wall:.2f} s = {tokens / wall:.0f} tokens/s in total; time to first token "
          f"p50 {statistics.median(ttfts) * 1000:.0f} ms, max {ttfts[-1] * 1000:.0f} ms")
    print(f"  KV pool after: {stats['kv_blocks_used']} blocks used, {stats['kv_blocks_cached']} cached prefixes, "
          f"prefix-cache hit rate {stats['prefix_cache_hit_rate']:.0%}, {stats['preemptions']} preemptions")
    print(f"  replies equal to the engine's own (greedy): {same}/{len(results)}")
    print(f"  first reply: {results[0]['text'][:160]!r}")
    if same != len(results):
        raise RuntimeError("HTTP replies differ from the engine's: the server changed the output")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ServeConfig, argv)
    print_config(cfg)
    set_threads(cfg.threads)
    device = pick_device(cfg.device)

    # 1. the model(s), each with its own engine running in a background thread
    served = {}
    for name, (model, tokenizer, description) in load_models(cfg, device).items():
        engine = Engine(model, tokenizer, num_blocks=cfg.num_blocks or None, block_size=cfg.block_size,
                        max_running=cfg.max_running, max_waiting=cfg.max_waiting,
                        max_prefill_tokens=cfg.max_prefill_tokens, chunked_prefill=cfg.chunked_prefill,
                        model_name=name, compile_decode=cfg.compile_decode).start()
        served[name] = ServedModel(engine, tokenizer, description)
        print(f"model {name!r}: {description}")
    first_name, first = next(iter(served.items()))
    print_memory(first.engine.model, cfg, first.engine)

    try:
        # 2a. make all: a short self-check instead of serving forever (or a screenshot for the doc)
        if cfg.self_check:
            self_check(first_name, first, cfg)
            return
        if cfg.screenshot:
            take_screenshot(first_name, first, cfg)
            return
        # 2b. serve until Ctrl-C
        app = create_app(served, api_key=cfg.api_key or None)
        server = ServerThread(app, cfg.host, cfg.port, log_requests=True)
        print(f"\nserving {', '.join(served)} on {server.url}  (chat page: {server.url}/ , API: {server.url}/v1)")
        if cfg.host not in ("127.0.0.1", "localhost"):
            print("  note: bound to a non-loopback address: anyone on your network can reach it"
                  + ("" if cfg.api_key else " (no --api_key set)"))
        print("  try: curl " + server.url + "/v1/chat/completions -H 'Content-Type: application/json' "
              "-d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"max_tokens\": 40}'")
        print("Ctrl-C stops the server.")
        with server:
            while True:
                time.sleep(3600)
    finally:
        for s in served.values():
            s.engine.shutdown()


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # bad input: one line that says what to do, no traceback
        sys.exit(f"error: {e}")
    except OSError as e:  # most often: the port is taken
        sys.exit(f"error: {e} — is another server on that port? try --port 8001")
    except KeyboardInterrupt:
        print("\nstopped")
