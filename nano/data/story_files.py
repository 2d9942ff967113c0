"""
The TinyStories file format: each story followed by "\\n<|endoftext|>\\n", one file per split.

TinyStoriesV2 (Eldan & Li, 2023) ships its stories this way, and lesson 0 writes the built-in ones
the same way, so the real dataset is a drop-in replacement. Lesson 0 writes these files, lesson 1
trains the tokenizer on them and lesson 2 encodes them; all three go through this module, so the
separator is spelled in one place and every reader splits the same way.

Files can be gigabytes (the real train split is 2.2 GB), so the reader streams: it reads a chunk,
yields the stories the chunk completes and keeps the unfinished rest for the next chunk.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "stories.txt"
    >>> write_story_file(path, ["Once upon a time.", "The end."])
    {'count': 2, 'bytes': 55}
    >>> path.read_text()
    'Once upon a time.\\n<|endoftext|>\\nThe end.\\n<|endoftext|>\\n'
    >>> list(iter_story_file(path, chunk_chars=7))   # 7-character chunks cut stories and separators
    ['Once upon a time.', 'The end.']
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator

from nano.common.fileio import atomic_open

STORY_END = "<|endoftext|>"  # the special token between two stories (a document boundary)
STORY_SEPARATOR = "\n" + STORY_END + "\n"  # how it sits in a file: on a line of its own after each story


def write_story_file(path: str | Path, stories: Iterable[str], limit_bytes: int | None = None) -> dict:
    """Write stories in the TinyStories format, atomically; stop before passing `limit_bytes` (None = all).

    Returns {"count": stories written, "bytes": size of the file}. At least one story is written
    even if it alone is over the limit.
    """
    count = size = 0
    with atomic_open(path) as f:
        for story in stories:
            block = story + STORY_SEPARATOR
            block_bytes = len(block.encode("utf-8"))
            if limit_bytes is not None and size + block_bytes > limit_bytes and count:
                break
            f.write(block)
            count, size = count + 1, size + block_bytes
    return {"count": count, "bytes": size}


def iter_story_file(path: str | Path, chunk_chars: int = 1 << 20,
                    on_read: Callable[[int], object] | None = None) -> Iterator[str]:
    """Stream the stories of a TinyStories-format file, stripped of the newlines around the separator.

    "Once upon a time.\\n<|endoftext|>\\nThe end.\\n<|endoftext|>\\n" -> "Once upon a time.", "The end."

    Empty stories are dropped. The file is read `chunk_chars` characters at a time, so memory does
    not grow with its size; `on_read(n)` hears the bytes of each chunk (for a progress bar). Bytes
    that are not UTF-8 become "\\ufffd" instead of stopping a long download's file at its first bad byte.
    """
    pending = ""  # text after the last separator seen: the start of a story not finished yet
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            chunk = f.read(chunk_chars)
            if on_read is not None:
                on_read(len(chunk.encode("utf-8")))
            pieces = (pending + chunk).split(STORY_END)
            # subtle: the last piece may be a story (or a separator) cut by the chunk boundary, so it
            # waits for the next chunk; at the end of the file (empty chunk) it is a story like the others
            pending = pieces.pop() if chunk else ""
            for piece in pieces:
                story = piece.strip()
                if story:
                    yield story
            if not chunk:
                return


def read_stories(path: str | Path) -> list[str]:
    """All the stories of a TinyStories-format file: 'a\\n<|endoftext|>\\nb\\n<|endoftext|>\\n' -> ['a', 'b']."""
    return list(iter_story_file(path))
