"""
Opt-in downloads (TinyStories, GSM8K) with the standard library only: resume, size check, a limit.

A download streams into `NAME.part` and is renamed to `NAME` only when complete, so a half-written
file is never mistaken for a whole one. Run it again after a cut and it asks the server for the
rest with an HTTP Range header (`Range: bytes=N-`, answered by `206 Partial Content`), then checks
the final size against what the server announced (`Content-Length` / `Content-Range`). With
`limit_bytes` it stops after the first N bytes and, if asked, trims back to the last story separator.

Nothing here runs unless you ask (`--source tinystories`, `--gsm8k download`); offline it fails in
seconds with a message saying what to do instead. Tests: tests/test_00_download.py (a local server).
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

# The real datasets. Override the base URLs with NANO_TINYSTORIES_URL / NANO_GSM8K_URL (a mirror,
# a local server, a file:// folder); the file names stay the same.
TINYSTORIES_BASE_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"
TINYSTORIES_FILES = {"train": "TinyStoriesV2-GPT4-train.txt", "valid": "TinyStoriesV2-GPT4-valid.txt"}
GSM8K_BASE_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data"
GSM8K_FILES = {"train": "train.jsonl", "test": "test.jsonl"}

CONNECT_TIMEOUT_S = 10.0  # a socket that hears nothing for this long is given up (offline fails fast)
CHUNK_BYTES = 1 << 20

OFFLINE_HINT = ("use the built-in data instead (`--source synthetic`, the default) "
                "or a local copy (`--source PATH` to a TinyStories-format .txt file)")


class DownloadError(RuntimeError):
    """A download that could not finish; the message says why and what to do next."""


def tinystories_url(split: str) -> str:
    """URL of the TinyStoriesV2-GPT4 'train' or 'valid' text file (NANO_TINYSTORIES_URL moves the base)."""
    base = os.environ.get("NANO_TINYSTORIES_URL", TINYSTORIES_BASE_URL).rstrip("/")
    return f"{base}/{TINYSTORIES_FILES[split]}"


def gsm8k_url(split: str) -> str:
    """URL of the official GSM8K 'train' or 'test' jsonl (NANO_GSM8K_URL moves the base)."""
    base = os.environ.get("NANO_GSM8K_URL", GSM8K_BASE_URL).rstrip("/")
    return f"{base}/{GSM8K_FILES[split]}"


def download(url: str, dest: str | Path, *, limit_bytes: int | None = None, cut_at: str | None = None,
             expected_size: int | None = None, timeout: float = CONNECT_TIMEOUT_S, progress: bool = True,
             hint: str = OFFLINE_HINT) -> Path:
    """Fetch `url` into `dest` (http://, https:// or file://); return `dest`.

    - `dest` already there: nothing to do (it only appears once complete).
    - `dest.part` there: resume from its size (Range request; a server that ignores Range starts over).
    - `limit_bytes`: keep only the first N bytes; `cut_at` (e.g. "<|endoftext|>") then trims the
      tail back to just after the last separator, so no story is cut in half.
    - The size is checked against the server's (or `expected_size`); a short file stays as `.part`
      and the error says to rerun, which resumes.
    - Offline, refused or timed out: DownloadError within about `timeout` seconds, ending in `hint`.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0

    if limit_bytes is not None and have >= limit_bytes:
        total = None  # an earlier run already fetched enough
    elif urllib.parse.urlparse(url).scheme == "file":
        total = _copy_file(url, part, have, limit_bytes, progress)
    else:
        total = _fetch_http(url, part, have, limit_bytes, timeout, progress, hint)

    size = part.stat().st_size
    if limit_bytes is not None and size >= limit_bytes:
        _truncate(part, limit_bytes)
        if cut_at:
            _cut_at_last(part, cut_at.encode("utf-8"))
    else:
        want = expected_size if expected_size is not None else total
        if want is not None and size != want:
            if size > want:  # a corrupt .part: resuming cannot fix it
                part.unlink()
                raise DownloadError(f"{url}: got {size:,} bytes but expected {want:,}; deleted {part}, run again")
            raise DownloadError(f"{url}: size mismatch, got {size:,} of {want:,} bytes (the connection was cut?); "
                                f"run the same command again to resume from {part}")
    part.replace(dest)
    return dest


def _fetch_http(url: str, part: Path, have: int, limit_bytes: int | None, timeout: float, progress: bool,
                hint: str) -> int | None:
    """Stream `url` into `part` from byte `have` on; return the full size the server announced (or None)."""
    request = urllib.request.Request(url, headers={"User-Agent": "nano-course/0.1"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # "range not satisfiable": the .part already holds the whole file
            total = _content_range_total(e.headers.get("Content-Range"))
            return total if total is not None else have
        raise DownloadError(f"{url}: the server answered HTTP {e.code} {e.reason}. Check the URL "
                            f"(NANO_TINYSTORIES_URL / NANO_GSM8K_URL override it), or {hint}") from None
    except (urllib.error.URLError, socket.timeout, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"could not reach {urllib.parse.urlparse(url).netloc} ({reason}): are you offline? "
                            f"To go on without the network, {hint}") from None

    with response:
        length = response.headers.get("Content-Length")
        if response.status == 206:  # the server sends the rest
            total = _content_range_total(response.headers.get("Content-Range"))
            mode = "ab"
        else:  # 200: the whole file again (no Range support, or nothing to resume)
            total = int(length) if length is not None else None
            have, mode = 0, "wb"
        goal = total if limit_bytes is None else (min(total, limit_bytes) if total else limit_bytes)
        bar = tqdm(total=goal, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=part.name.removesuffix(".part"), disable=not progress)
        try:
            with open(part, mode) as out:
                while limit_bytes is None or have < limit_bytes:
                    want = CHUNK_BYTES if limit_bytes is None else min(CHUNK_BYTES, limit_bytes - have)
                    chunk = response.read(want)
                    if not chunk:
                        break
                    out.write(chunk)
                    have += len(chunk)
                    bar.update(len(chunk))
        except (OSError, socket.timeout) as e:  # includes http.client.IncompleteRead
            raise DownloadError(f"{url}: the connection broke after {have:,} bytes ({e}); "
                                f"run the same command again to resume from {part}") from None
        finally:
            bar.close()
    return total


def _copy_file(url: str, part: Path, have: int, limit_bytes: int | None, progress: bool) -> int:
    """file:// URLs: copy from byte `have` on (urllib's file handler cannot resume)."""
    source = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
    if not source.is_file():
        raise DownloadError(f"{url}: no such file {source}")
    total = source.stat().st_size
    goal = total if limit_bytes is None else min(total, limit_bytes)
    with open(source, "rb") as src, open(part, "ab" if have else "wb") as out:
        src.seek(have)
        with tqdm(total=goal, initial=have, unit="B", unit_scale=True, desc=source.name, disable=not progress) as bar:
            while have < goal:
                chunk = src.read(min(CHUNK_BYTES, goal - have))
                if not chunk:
                    break
                out.write(chunk)
                have += len(chunk)
                bar.update(len(chunk))
    return total


def _content_range_total(header: str | None) -> int | None:
    """'bytes 100-999/1000' -> 1000; 'bytes */1000' -> 1000; unknown ('/*') or missing -> None."""
    if not header or "/" not in header:
        return None
    total = header.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _cut_at_last(path: Path, separator: bytes, window: int = 1 << 20) -> None:
    """Trim `path` to end right after the last `separator` (and the newline after it, if any).

    Searches backwards in windows, so a 100 MB file is not read whole. If there is no separator at
    all, the file is left as it is (one long story is better than nothing).
    """
    size = path.stat().st_size
    with open(path, "r+b") as f:
        end = size
        while end > 0:
            start = max(0, end - window)
            f.seek(start)
            block = f.read(end - start + len(separator))  # overlap so a separator on the border is found
            at = block.rfind(separator)
            if at >= 0:
                keep = start + at + len(separator)
                f.seek(keep)
                if f.read(1) == b"\n":
                    keep += 1
                f.truncate(keep)
                return
            end = start
