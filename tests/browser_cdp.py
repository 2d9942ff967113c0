"""
Drive headless Chromium as a person would: type, press keys, click, and read the page back.

`lessons/14_serve.py: run_chromium` loads a page and dumps what it ended with; a person does more:
types into fields, presses Enter, waits, clicks Stop. Chromium is driven by the Chrome DevTools
Protocol (https://chromedevtools.github.io/devtools-protocol/): JSON commands {"id", "method",
"params"} and their answers {"id", "result"}, plus events {"method", "params"} it sends on its own.
With --remote-debugging-pipe it reads commands from its file descriptor 3 and writes answers to 4,
each message ending in a NUL byte, so two pipes are all the transport this needs (no websocket).

    with Browser() as browser:
        page = browser.open("http://127.0.0.1:8000/")
        page.focus("#input"); page.type("Hello"); page.key("Enter")
        page.wait_for("document.body.dataset.replies === '1'")
        assert page.console == []        # what the page logged, errors and failed loads included

A test helper, not part of nano; Chromium comes from `apt-get install chromium`.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import subprocess
import tempfile
import time

KEYS = {"Enter": {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "text": "\r"}}


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium process and the pipes to talk to it."""

    def __init__(self, chromium: str, timeout: float = 30.0):
        self.timeout, self.next_id, self.events, self.buffer = timeout, 0, [], b""
        self.profile = tempfile.TemporaryDirectory()
        to_chromium_read, self.to_chromium = os.pipe()
        self.from_chromium, from_chromium_write = os.pipe()

        def at_3_and_4():  # in the child: the read end becomes fd 3, the write end fd 4
            read_end = fcntl.fcntl(to_chromium_read, fcntl.F_DUPFD, 10)  # out of the way of 3 and 4 first
            write_end = fcntl.fcntl(from_chromium_write, fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.process = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", "--remote-debugging-pipe",
             f"--user-data-dir={self.profile.name}", "--window-size=1100,700", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=at_3_and_4, pass_fds=(3, 4))
        os.close(to_chromium_read)
        os.close(from_chromium_write)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except BrowserError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self.to_chromium)
        os.close(self.from_chromium)
        self.profile.cleanup()

    # ---- the protocol ---------------------------------------------------------------------------

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict:
        """Send one command and wait for its answer (events that arrive meanwhile are kept)."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_chromium, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for reply in self._read(deadline):
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise BrowserError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
                self.events.append(reply)

    def _read(self, deadline: float) -> list[dict]:
        """The messages that are complete after one read (blocking until something comes)."""
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([self.from_chromium], [], [], left)[0]:
            raise BrowserError("Chromium did not answer in time")
        chunk = os.read(self.from_chromium, 1 << 20)
        if not chunk:
            raise BrowserError("Chromium closed the pipe")
        self.buffer += chunk
        *complete, self.buffer = self.buffer.split(b"\0")
        return [json.loads(m) for m in complete if m]

    def pump(self, seconds: float) -> None:
        """Let events arrive for a while (no command)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.events += self._read(deadline)
            except BrowserError:
                return

    def open(self, url: str) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Runtime", "Log", "Page"):
            page.send(f"{domain}.enable")
        page.send("Page.navigate", {"url": url})
        page.wait_for("document.readyState === 'complete'")
        return page


class Page:
    """One tab: evaluate JavaScript, type, press keys, click, and what it logged."""

    def __init__(self, browser: Browser, session: str):
        self.browser, self.session = browser, session

    def send(self, method: str, params: dict | None = None) -> dict:
        return self.browser.send(method, params, self.session)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0, every: float = 0.05):
        """Poll until the expression is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            self.browser.pump(every)
        raise BrowserError(f"timed out waiting for: {expression}")

    def focus(self, selector: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")

    def type(self, text: str) -> None:
        """Text into the focused field, as a keyboard's input would put it there."""
        self.send("Input.insertText", {"text": text})

    def key(self, name: str) -> None:
        """A key pressed and released (a real keyboard event: the page's key handlers see it)."""
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", {"type": kind, **KEYS[name]})

    def click(self, selector: str) -> None:
        """A mouse click at the middle of the element, as a person clicks."""
        box = self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left",
                                                   "clickCount": 1})

    @property
    def console(self) -> list[str]:
        """Everything the page logged: console calls, uncaught errors, and the browser's own entries
        (a failed load, a 404, a form problem)."""
        lines = []
        for event in self.browser.events:
            if event.get("sessionId") != self.session:
                continue
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled":
                lines.append(f"console.{params['type']}: " + " ".join(str(a.get("value", a.get("description")))
                                                                      for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                lines.append("uncaught: " + params["exceptionDetails"].get("text", ""))
            elif method == "Log.entryAdded":
                entry = params["entry"]
                lines.append(f"{entry['level']} ({entry['source']}): {entry['text']} {entry.get('url', '')}")
        return lines
