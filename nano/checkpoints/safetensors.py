"""
safetensors: a file of named tensors that any framework can read without running code. Ours, ~200 lines.

Why not torch.save? A .pth file is a Python pickle: loading one can run arbitrary code, and only
Python can read it. safetensors (Hugging Face's format, the default of `transformers`, vLLM, TGI
and llama.cpp's converter) is just a small JSON table of contents followed by the raw bytes of every
tensor, so reading it is a JSON parse plus one copy per tensor, in any language.

The layout, as the format's description (README of github.com/huggingface/safetensors) defines it:

    bytes 0..7        N, the length of the header, an unsigned 64-bit little-endian integer
    bytes 8..8+N      the header: UTF-8 JSON, an object with one entry per tensor
                          "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}
                      and optionally "__metadata__": {string: string}. It may end in spaces (padding).
    bytes 8+N..       the data buffer: each tensor's elements, row-major (C order), little-endian,
                      at [begin, end) counted from the START OF THE BUFFER (not of the file). The
                      tensors tile the buffer exactly: no holes, no overlaps, nothing after the last.

We pad the header with spaces so that 8 + N is a multiple of 8: the data buffer then starts on an
8-byte boundary, and a reader that maps the file into memory can view an F64 or I64 tensor in place
(the format recommends this alignment). We write the tensors in the order given, back to back.

    save_file({"w": torch.ones(2, 3)}, "m.safetensors", metadata={"format": "pt"})
    tensors = load_file("m.safetensors")            # {"w": tensor of shape (2, 3)}
    header = read_header("m.safetensors")           # the JSON table of contents, as a dict

Tests: tests/test_13_safetensors.py (round trips for every dtype, the exact bytes of a small file,
corrupt and truncated files refused).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from nano.common.fileio import atomic_open

# dtype names of the format <-> torch dtypes (the ones this project meets; the format has a few more,
# such as F8_E4M3 and U16/U32/U64, that a reader here reports as unsupported)
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPE_NAMES.items()}

HEADER_ALIGNMENT = 8  # 8 + N is padded to a multiple of this: the data starts 8-byte aligned
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference reader's limit: a larger N means a corrupt file
METADATA_KEY = "__metadata__"


# -----------------------------------------------------------------------------------------------
# writing


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor, row-major: torch.tensor([1.0]) -> b'\\x00\\x00\\x80?'."""
    if sys.byteorder != "little":  # every machine torch supports today is little-endian; say so if not
        raise RuntimeError("this writer assumes a little-endian machine (safetensors stores little-endian)")
    flat = tensor.detach().cpu().contiguous().reshape(-1)  # row-major order
    # view the elements as bytes: works for every dtype, bf16 included (numpy has no bf16)
    return flat.view(torch.uint8).numpy().tobytes()


def build_header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length + the JSON header, padded with spaces so that the data starts 8-byte aligned.

    {"a": tensor of 2 F32} -> b'8\\x00\\x00\\x00\\x00\\x00\\x00\\x00{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}  '
    (N = 56 = b'8' as a u64: the 54 bytes of JSON + 2 spaces, so that 8 + N = 64 is a multiple of 8).
    """
    table: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map strings to strings (write numbers as text)")
        table[METADATA_KEY] = dict(metadata)
    offset = 0
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or name == METADATA_KEY:
            raise ValueError(f"tensor names must be non-empty strings other than {METADATA_KEY!r}, got {name!r}")
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {tensor.dtype} is not supported; use one of {sorted(DTYPES)}")
        size = tensor.numel() * tensor.element_size()
        table[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(table, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header += b" " * (-(8 + len(header)) % HEADER_ALIGNMENT)  # pad: 8 + N is a multiple of 8
    return struct.pack("<Q", len(header)) + header  # "<Q": little-endian unsigned 64-bit


def save_file(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write `tensors` ({name: tensor}) to a .safetensors file, atomically (NAME.tmp, then a rename).

    Tensors that share memory (a tied embedding and LM head) are written as separate copies; pass
    each only once. The bytes are streamed one tensor at a time, so memory stays at one tensor.
    """
    with atomic_open(path, "wb") as f:
        f.write(build_header(tensors, metadata))
        for tensor in tensors.values():
            f.write(tensor_bytes(tensor))
    return Path(path)


# -----------------------------------------------------------------------------------------------
# reading


class SafetensorsError(ValueError):
    """The file is not a valid safetensors file (truncated, corrupt, or something else)."""


def _parse_header(raw: bytes, data_length: int, where: str) -> dict[str, Any]:
    """Check the JSON table of contents against the rules of the format; returns it as a dict."""
    try:
        table = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{where}: the header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(table, dict):
        raise SafetensorsError(f"{where}: the header must be a JSON object, got {type(table).__name__}")
    metadata = table.get(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{where}: {METADATA_KEY} must map strings to strings")

    spans = []  # (begin, end, name) of every tensor, to check that they tile the buffer
    for name, entry in table.items():
        if name == METADATA_KEY:
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"{where}: entry {name!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise SafetensorsError(f"{where}: {name!r} has dtype {dtype!r}; this reader knows {sorted(DTYPES)}")
        ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)
        if not ints(shape):
            raise SafetensorsError(f"{where}: {name!r} has shape {shape!r}; expected a list of non-negative integers")
        if not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise SafetensorsError(f"{where}: {name!r} has data_offsets {offsets!r}; expected [begin, end] with begin <= end")
        numel = 1
        for dim in shape:
            numel *= dim
        expected = numel * torch.empty((), dtype=DTYPES[dtype]).element_size()
        if offsets[1] - offsets[0] != expected:
            raise SafetensorsError(
                f"{where}: {name!r} is {dtype} {shape}, {expected} bytes, but its data_offsets {offsets} span "
                f"{offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))

    # the tensors must cover [0, data_length) exactly, one after the other (in any order)
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            problem = "overlaps the tensor before it" if begin < position else f"leaves a hole at byte {position}"
            raise SafetensorsError(f"{where}: {name!r} starts at byte {begin} of the data and {problem}")
        position = end
    if position != data_length:
        if position > data_length:
            raise SafetensorsError(
                f"{where} is truncated: the header lists {position} bytes of tensor data but only {data_length} "
                "follow it (an interrupted copy or download?) — write or download the file again")
        raise SafetensorsError(f"{where}: {data_length - position} unexpected bytes after the last tensor")
    return table


def _split(blob: bytes, where: str) -> tuple[dict[str, Any], int]:
    """(the checked header, where the data buffer starts) of a whole file held in `blob`."""
    if len(blob) < 8:
        raise SafetensorsError(f"{where} is too short ({len(blob)} bytes) to be a safetensors file: "
                               "it is empty or was cut off — write or download it again")
    (header_length,) = struct.unpack("<Q", blob[:8])
    if header_length > MAX_HEADER_BYTES:
        raise SafetensorsError(f"{where}: header length {header_length} is impossible (> {MAX_HEADER_BYTES}); "
                               "this is not a safetensors file, or its first bytes are corrupt")
    if 8 + header_length > len(blob):
        raise SafetensorsError(f"{where} is truncated: its header alone needs {8 + header_length} bytes and the file "
                               f"has {len(blob)} — write or download it again")
    raw = blob[8 : 8 + header_length]
    if not raw.startswith(b"{"):
        raise SafetensorsError(f"{where}: the header does not start with '{{': not a safetensors file")
    return _parse_header(raw, len(blob) - 8 - header_length, where), 8 + header_length


def read_header(path: str | Path) -> dict[str, Any]:
    """The checked JSON table of contents of a file: {name: {dtype, shape, data_offsets}, "__metadata__": ...}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no safetensors file at {path}")
    return _split(path.read_bytes(), str(path))[0]


def load_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a .safetensors file into CPU tensors, in the order of their data.

    A truncated or corrupt file raises SafetensorsError (a ValueError) that says what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no safetensors file at {path}")
    blob = path.read_bytes()
    table, data_start = _split(blob, str(path))
    entries = sorted(((e["data_offsets"][0], name, e) for name, e in table.items() if name != METADATA_KEY))
    tensors: dict[str, torch.Tensor] = {}
    for _, name, entry in entries:
        begin, end = (data_start + x for x in entry["data_offsets"])
        dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
        if end == begin:  # an empty tensor: frombuffer refuses an empty buffer
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        # a bytearray copy: the tensor owns writable memory (frombuffer would share the file's bytes)
        raw = torch.frombuffer(bytearray(blob[begin:end]), dtype=torch.uint8)
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


def load_metadata(path: str | Path) -> dict[str, str]:
    """The file's "__metadata__" ({} if none): {"format": "pt"} for files torch users write."""
    return dict(read_header(path).get(METADATA_KEY, {}))
