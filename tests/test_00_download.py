"""
Exercise: opt-in downloads (nano/data/download.py), judged against a tiny local HTTP server and file:// URLs.

Implement `download(url, dest, limit_bytes=, cut_at=, expected_size=, timeout=)` so that
  - a whole file arrives as `dest`, with no `.part` left behind;
  - a `dest.part` left by a cut is resumed with `Range: bytes=N-` (and a server that ignores Range
    is handled by starting over);
  - a file shorter than the server announced (or than `expected_size`) is an error that says so,
    and keeps the `.part` for the next try;
  - `limit_bytes` keeps only the first N bytes, trimmed back to a story boundary with `cut_at`;
  - offline (nothing listening, or a server that never answers) it fails within seconds with a
    message saying what to do instead (`--source synthetic` or a local path);
and lesson 0 can take its stories and GSM8K from such a server (NANO_TINYSTORIES_URL / NANO_GSM8K_URL).
Never the internet: every URL here points at 127.0.0.1 or a temporary folder.

Run: make check-0   (or .venv/bin/python -m pytest -q tests/test_00_download.py)
"""

import http.server
import json
import socket
import threading
import time

import pytest

from adapters import impl
from conftest import load_lesson

download_module = impl("download")

SEP = "\n<|endoftext|>\n"
STORIES = [(f"Story {i}: " + "The cat sat on the mat and looked at the sun. " * (3 + i % 5)).strip() for i in range(60)]
STORY_TEXT = (SEP.join(STORIES) + SEP).encode()


class Handler(http.server.BaseHTTPRequestHandler):
    """GET /<mode>/<name>: mode 'ok' honours Range, 'norange' ignores it, 'short' sends half of what it announces."""

    def do_GET(self):
        mode, _, name = self.path.lstrip("/").partition("/")
        data = self.server.files.get(name)
        range_header = self.headers.get("Range")
        self.server.requests.append((self.path, range_header))
        if data is None:
            self.send_error(404)
            return
        start = 0
        if range_header and mode != "norange":
            start = int(range_header.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "short":
            body = body[: len(body) // 2]
        self.server.sent.append(len(body))
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files = {"stories.txt": STORY_TEXT, "blob.bin": bytes(range(256)) * 400}
    httpd.requests, httpd.sent = [], []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- http ---------------------------------------------------------------------------------------


def test_full_download(server, tmp_path):
    dest = download_module.download(f"{server.url}/ok/blob.bin", tmp_path / "blob.bin", progress=False)
    assert dest.read_bytes() == server.files["blob.bin"]
    assert not (tmp_path / "blob.bin.part").exists()
    # a finished file is not fetched again
    download_module.download(f"{server.url}/ok/blob.bin", tmp_path / "blob.bin", progress=False)
    assert len(server.requests) == 1


def test_resume_after_a_cut(server, tmp_path):
    data = server.files["blob.bin"]
    (tmp_path / "blob.bin.part").write_bytes(data[:30_000])
    dest = download_module.download(f"{server.url}/ok/blob.bin", tmp_path / "blob.bin", progress=False)
    assert dest.read_bytes() == data
    assert server.requests == [("/ok/blob.bin", "bytes=30000-")]
    assert server.sent == [len(data) - 30_000], "only the missing bytes were sent"


def test_resume_when_the_server_ignores_range(server, tmp_path):
    data = server.files["blob.bin"]
    (tmp_path / "blob.bin.part").write_bytes(b"x" * 1000)  # garbage: it must be replaced, not appended to
    dest = download_module.download(f"{server.url}/norange/blob.bin", tmp_path / "blob.bin", progress=False)
    assert dest.read_bytes() == data


def test_part_already_complete(server, tmp_path):
    data = server.files["blob.bin"]
    (tmp_path / "blob.bin.part").write_bytes(data)  # cut just before the rename
    assert download_module.download(f"{server.url}/ok/blob.bin", tmp_path / "blob.bin", progress=False).read_bytes() == data


def test_size_mismatch_is_an_error_and_the_part_resumes(server, tmp_path):
    dest = tmp_path / "blob.bin"
    with pytest.raises(download_module.DownloadError, match="size mismatch"):
        download_module.download(f"{server.url}/short/blob.bin", dest, progress=False)
    assert not dest.exists()
    part = tmp_path / "blob.bin.part"
    assert part.stat().st_size == len(server.files["blob.bin"]) // 2
    download_module.download(f"{server.url}/ok/blob.bin", dest, progress=False)  # the next run finishes it
    assert dest.read_bytes() == server.files["blob.bin"]


def test_expected_size_is_checked(server, tmp_path):
    with pytest.raises(download_module.DownloadError, match="expected"):
        download_module.download(f"{server.url}/ok/blob.bin", tmp_path / "blob.bin", expected_size=123, progress=False)
    assert not (tmp_path / "blob.bin").exists()


def test_limit_bytes_cut_at_a_story_boundary(server, tmp_path):
    dest = download_module.download(f"{server.url}/ok/stories.txt", tmp_path / "s.txt", limit_bytes=5000, cut_at="<|endoftext|>",
                    progress=False)
    got = dest.read_bytes()
    assert 0 < len(got) <= 5000 and STORY_TEXT.startswith(got)
    assert got.endswith(b"<|endoftext|>\n")
    assert len(got) > 5000 - max(len(s) for s in STORIES) - len(SEP), "cut at the last boundary, not an earlier one"
    # without cut_at: exactly the first N bytes
    exact = download_module.download(f"{server.url}/ok/stories.txt", tmp_path / "t.txt", limit_bytes=777, progress=False)
    assert exact.read_bytes() == STORY_TEXT[:777]


def test_http_error_names_the_status(server, tmp_path):
    with pytest.raises(download_module.DownloadError, match="404"):
        download_module.download(f"{server.url}/ok/missing.txt", tmp_path / "m.txt", progress=False)


# --- offline ------------------------------------------------------------------------------------


def test_offline_fails_fast_with_a_helpful_message(tmp_path):
    start = time.time()
    with pytest.raises(download_module.DownloadError) as error:
        download_module.download(f"http://127.0.0.1:{unused_port()}/stories.txt", tmp_path / "s.txt", progress=False)
    assert time.time() - start < 5
    message = str(error.value)
    assert "offline" in message and "--source synthetic" in message and "--source PATH" in message


def test_a_server_that_never_answers_times_out(tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts the connection, never says anything
    try:
        start = time.time()
        with pytest.raises(download_module.DownloadError, match="offline"):
            download_module.download(f"http://127.0.0.1:{silent.getsockname()[1]}/s.txt", tmp_path / "s.txt", timeout=0.5, progress=False)
        assert time.time() - start < 5
    finally:
        silent.close()


# --- file:// ------------------------------------------------------------------------------------


def test_file_url_full_resume_and_limit(tmp_path):
    source = tmp_path / "source.txt"
    source.write_bytes(STORY_TEXT)
    url = source.as_uri()
    assert download_module.download(url, tmp_path / "a.txt", progress=False).read_bytes() == STORY_TEXT
    (tmp_path / "b.txt.part").write_bytes(STORY_TEXT[:100])
    assert download_module.download(url, tmp_path / "b.txt", progress=False).read_bytes() == STORY_TEXT
    limited = download_module.download(url, tmp_path / "c.txt", limit_bytes=3000, cut_at="<|endoftext|>", progress=False).read_bytes()
    assert STORY_TEXT.startswith(limited) and limited.endswith(b"<|endoftext|>\n") and len(limited) <= 3000
    with pytest.raises(download_module.DownloadError, match="no such file"):
        download_module.download((tmp_path / "nope.txt").as_uri(), tmp_path / "d.txt", progress=False)


def test_urls_and_env_overrides(monkeypatch):
    assert download_module.tinystories_url("train") == (
        "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt")
    assert download_module.tinystories_url("valid").endswith("TinyStoriesV2-GPT4-valid.txt")
    assert download_module.gsm8k_url("test") == (
        "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl")
    monkeypatch.setenv("NANO_TINYSTORIES_URL", "http://127.0.0.1:1/mirror/")
    monkeypatch.setenv("NANO_GSM8K_URL", "file:///tmp/gsm")
    assert download_module.tinystories_url("valid") == "http://127.0.0.1:1/mirror/TinyStoriesV2-GPT4-valid.txt"
    assert download_module.gsm8k_url("train") == "file:///tmp/gsm/train.jsonl"


# --- lesson 0 with a downloaded source ----------------------------------------------------------




SMALL = ["--conversations", "10", "--val_conversations", "4", "--tinymath_train", "20", "--tinymath_test", "10",
         "--preferences", "8", "--val_preferences", "4", "--rl_prompts", "8", "--rl_test", "4"]


def test_lesson_with_tinystories_and_gsm8k_from_a_local_server(server, nano_dirs, monkeypatch):
    valid = STORIES[:10]
    server.files["TinyStoriesV2-GPT4-train.txt"] = STORY_TEXT
    server.files["TinyStoriesV2-GPT4-valid.txt"] = (SEP.join(valid) + SEP).encode()
    gsm_rows = [{"question": "What is 2 + 2?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}]
    for split in ("test", "train"):
        server.files[f"{split}.jsonl"] = "".join(json.dumps(r) + "\n" for r in gsm_rows).encode()
    monkeypatch.setenv("NANO_TINYSTORIES_URL", f"{server.url}/ok")
    monkeypatch.setenv("NANO_GSM8K_URL", f"{server.url}/ok")

    lesson = load_lesson("00_data")
    lesson.main(SMALL + ["--source", "tinystories", "--val_stories", "4", "--data_limit_mb", "0.004", "--gsm8k", "download"])
    raw = nano_dirs / "data" / "raw"
    story_files = impl("story_files")
    assert story_files.read_stories(raw / "stories_val.txt") == valid[:4]
    train = story_files.read_stories(raw / "stories_train.txt")
    assert 0 < len(train) < len(STORIES) and train == STORIES[: len(train)]
    assert (raw / "stories_train.txt").stat().st_size <= 4000
    assert json.loads((raw / "gsm8k_test.jsonl").read_text().splitlines()[0]) == gsm_rows[0]
    assert (raw / "manifest.json").exists()


def test_lesson_offline_says_what_to_do(nano_dirs, monkeypatch):
    monkeypatch.setenv("NANO_TINYSTORIES_URL", f"http://127.0.0.1:{unused_port()}")
    lesson = load_lesson("00_data")
    start = time.time()
    with pytest.raises(SystemExit) as error:
        lesson.main(SMALL + ["--source", "tinystories"])
    assert time.time() - start < 10
    assert "offline" in str(error.value) and "--source synthetic" in str(error.value)
    assert not (nano_dirs / "data" / "raw" / "manifest.json").exists()


def test_failed_download_keeps_the_earlier_data(nano_dirs, monkeypatch):
    """Switching to TinyStories while offline must not cost the built-in data already there."""
    lesson = load_lesson("00_data")
    lesson.main(SMALL)
    manifest = nano_dirs / "data" / "raw" / "manifest.json"
    before = manifest.read_text()
    monkeypatch.setenv("NANO_TINYSTORIES_URL", f"http://127.0.0.1:{unused_port()}")
    with pytest.raises(SystemExit) as error:
        lesson.main(SMALL + ["--source", "tinystories"])
    assert "earlier, complete data" in str(error.value)
    assert manifest.read_text() == before
