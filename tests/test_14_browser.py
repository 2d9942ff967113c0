"""
The chat page in a real browser, driven over Chrome's DevTools protocol (tests/browser_cdp.py):
headless Chromium loads it from a running server, the page sends a message by itself (/?demo=...),
streams the reply, and the DOM it ends with must hold that reply — the same text the engine writes
for the same conversation, greedy. Then a person's session: the API key typed, Enter, Stop.

Skips, saying why, where Chromium is not installed (`apt-get install chromium` on Debian/Ubuntu):
`make test` needs nothing beyond the Makefile's set-up. The toy model's text is nonsense; what is
checked is the page: the request it sends, the SSE stream it reads, and text inserted as text.
"""

import html
import re
import time
import urllib.parse

import pytest

import browser_cdp
from adapters import impl
from conftest import load_lesson
from toy_models import CORPUS, small_gemma

serve = load_lesson("14_serve")
server_mod = impl("server")
engine_mod = impl("engine")
from nano.text.chat_format import render_prompt, stop_token_ids  # noqa: E402
from nano.text.tokenizer import Tokenizer  # noqa: E402
from nano.serve.sequence import SamplingParams  # noqa: E402

pytestmark = pytest.mark.skipif(serve.find_chromium() is None,
                                reason="Chromium is not installed (apt-get install chromium): the page is not checked")


# a chat bubble in the DOM: (role, its text, the meta line under it: tokens, finish reason)
BUBBLE = r'<div class="msg (user|assistant)[^"]*">(.*?)(?:<div class="meta">(.*?)</div>)?</div>'


def test_page_streams_a_reply_in_headless_chromium():
    tokenizer = Tokenizer.train(CORPUS, vocab_size=300, progress=False)
    model = small_gemma(tokenizer.vocab_size, context_len=128, sliding_window=8)
    engine = engine_mod.Engine(model, tokenizer, block_size=16).start()
    message = "Tell me <b>about</b> the cat."  # markup in a message must show as text
    try:
        served = server_mod.ServedModel(engine, tokenizer)
        expected = engine.generate([render_prompt([{"role": "user", "content": message}], tokenizer)],
                                   SamplingParams(max_tokens=30, stop_token_ids=tuple(stop_token_ids(tokenizer))))
        query = urllib.parse.urlencode({"demo": message, "temperature": 0, "max_tokens": 30})
        with server_mod.ServerThread(server_mod.create_app({"toy": served})) as server, \
                browser_cdp.Browser(serve.find_chromium()) as browser:
            page = browser.open(f"{server.url}/?{query}")
            page.wait_for("document.body.dataset.replies === '1'")  # the page counts the replies it finished
            dom = page.evaluate("document.documentElement.outerHTML")
            console = page.console  # the page logs nothing itself: any line is an error it raised
            bubbles = re.findall(BUBBLE, dom, re.S)
    finally:
        engine.shutdown()
    assert [role for role, _, _ in bubbles] == ["user", "assistant"], dom[-3000:]
    assert html.unescape(bubbles[0][1]) == message  # escaped in the DOM: it was inserted as text
    assert "<b>" not in bubbles[0][1]
    assert html.unescape(bubbles[1][1]) == expected[0]["text"]  # the streamed reply, whole
    assert "finish:" in bubbles[1][2]
    assert 'data-replies="1"' in dom
    assert console == [], console


# ---- the page driven as a person uses it (tests/browser_cdp.py: the DevTools protocol over a pipe) ----

COLOURED_BLOCKS = "[...document.querySelectorAll('#blocks div')].filter(d => d.style.background).length"


def test_a_person_types_a_key_chats_watches_the_blocks_and_stops_a_reply():
    tokenizer = Tokenizer.train(CORPUS, vocab_size=300, progress=False)
    model = small_gemma(tokenizer.vocab_size, context_len=128, sliding_window=8)
    engine = engine_mod.Engine(model, tokenizer, block_size=8)
    stops = tuple(stop_token_ids(tokenizer))
    first, long = "Tell me about the cat.", "Once upon a time"
    expected = engine.generate([render_prompt([{"role": "user", "content": first}], tokenizer)],
                               SamplingParams(max_tokens=12, stop_token_ids=stops))[0]
    long_reply = engine.generate([render_prompt([{"role": "user", "content": long}], tokenizer)],
                                 SamplingParams(max_tokens=90, stop_token_ids=stops))[0]
    assert len(long_reply["token_ids"]) == 90, "the second message was chosen for a reply that runs to its limit"
    forward = engine.runner.forward

    def slow_forward(spans, **kwargs):  # 0.15 s a token: a person (and this test) sees the reply grow, and has time to stop it
        time.sleep(0.15)
        return forward(spans, **kwargs)

    engine.runner.forward = slow_forward
    engine.start()
    app = server_mod.create_app({"toy": server_mod.ServedModel(engine, tokenizer)}, api_key="s3cret")
    try:
        with server_mod.ServerThread(app) as server, browser_cdp.Browser(serve.find_chromium()) as browser:
            page = browser.open(server.url + "/")
            # 1. the server wants a key: the page asks for it and calls nothing that would be refused
            page.wait_for("document.getElementById('numbers').textContent.includes('needs an API key')")
            page.focus("#api_key")
            page.type("s3cret")
            page.focus("#input")  # leaving the key field: the page starts (models, the /stats panel)
            page.wait_for("document.getElementById('numbers').textContent.includes('running / waiting')")
            page.evaluate("document.getElementById('temperature').value = '0'")
            page.evaluate("document.getElementById('max_tokens').value = '12'")
            # 2. type, press Enter, the reply streams in whole
            page.type(first)
            page.key("Enter")
            page.wait_for("document.body.dataset.replies === '1'")
            reply = page.evaluate("document.querySelector('.msg.assistant').firstChild.textContent")
            assert reply == expected["text"]
            # 3. a long reply: the panel colours its blocks while it runs; Stop cancels it on the server
            page.wait_for(f"{COLOURED_BLOCKS} === 0")  # the panel has caught up: the first reply's blocks are free
            page.click("#new-chat")
            before = engine.total_generated
            page.evaluate("document.getElementById('max_tokens').value = '90'")
            page.type(long)
            page.key("Enter")
            assert page.wait_for(COLOURED_BLOCKS) >= 1  # this sequence's blocks, in its colour
            assert engine.stats()["running"] == 1  # (the panel draws what /stats said: it is running)
            page.click("#stop")
            page.wait_for("document.body.dataset.replies === '2'")
            assert "finish: stopped" in page.evaluate("document.querySelector('.msg.assistant .meta').textContent")
            deadline = time.monotonic() + 5  # the server sees the closed connection at its next write
            while engine.stats()["running"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
            assert engine.total_generated - before < 90  # cut short: the reply would have run to 90 tokens
            page.wait_for(f"{COLOURED_BLOCKS} === 0")  # the panel shows the blocks given back
            assert page.console == [], page.console
    finally:
        engine.shutdown()
