"""
Exercise (lesson 13, export): nano/checkpoints/safetensors.py, a writer and reader for the safetensors format.

The format (README of github.com/huggingface/safetensors): 8 bytes holding N, the header length,
as a little-endian unsigned 64-bit integer; N bytes of UTF-8 JSON mapping each tensor name to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets from the start of the data, which follows
the header) plus an optional "__metadata__" of strings; then the raw little-endian bytes, row-major,
the tensors tiling the data with no holes.

Implement
  - `save_file(tensors, path, metadata)`: that layout, with the header padded with spaces so that
    the data starts at a multiple of 8 bytes, written atomically,
  - `load_file(path)` and `read_header(path)`: the tensors and the header back, refusing a corrupt or
    truncated file with a SafetensorsError (a ValueError) that says what is wrong.
"""

import json
import struct

import pytest
import torch

from adapters import impl

st = impl("safetensors")


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).to(torch.float16),
        "f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "i64": torch.tensor([[-(2**40), 3], [7, 2**62]], dtype=torch.int64),
        "i32": torch.tensor([-5, 0, 2**31 - 1], dtype=torch.int32),
        "i16": torch.tensor([1, -2, 300], dtype=torch.int16),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),  # shape []
        "empty": torch.zeros(0, 4),  # 0 bytes of data
        "transposed": torch.arange(6.0).reshape(2, 3).t(),  # not contiguous: written row-major all the same
    }


def test_every_dtype_round_trips(tmp_path):
    tensors = sample_tensors()
    path = st.save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    loaded = st.load_file(path)
    assert list(loaded) == list(tensors)  # written and read back in the order given
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name
    assert st.load_metadata(path) == {"format": "pt"}
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left nothing behind


def test_the_bytes_of_a_small_file(tmp_path):
    """Checked byte by byte against the format's definition, computed by hand."""
    path = st.save_file(
        {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([1.0], dtype=torch.bfloat16), "c": torch.tensor([1, -2], dtype=torch.int16)},
        tmp_path / "small.safetensors")
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])  # the header length, little-endian u64
    assert (8 + n) % 8 == 0  # padded: the data starts 8-byte aligned
    header_text = blob[8 : 8 + n].decode("utf-8")
    assert header_text.startswith("{") and header_text.rstrip(" ") == header_text.rstrip()  # padding is spaces
    header = json.loads(header_text)
    assert header == {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "BF16", "shape": [1], "data_offsets": [8, 10]},
        "c": {"dtype": "I16", "shape": [2], "data_offsets": [10, 14]},
    }
    data = blob[8 + n :]
    # fp32 little-endian; bf16 1.0 is 0x3F80 (the top half of fp32 1.0); int16 two's complement
    assert data == struct.pack("<ff", 1.0, -2.0) + b"\x80\x3f" + struct.pack("<hh", 1, -2)
    assert st.read_header(path) == header


def test_header_is_padded_to_eight_bytes_for_any_name_length(tmp_path):
    for length in range(1, 12):
        path = st.save_file({"x" * length: torch.zeros(1)}, tmp_path / f"{length}.safetensors")
        (n,) = struct.unpack("<Q", path.read_bytes()[:8])
        assert (8 + n) % 8 == 0
        assert st.load_file(path)["x" * length].tolist() == [0.0]


def test_bad_arguments_to_the_writer(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        st.save_file({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "z.safetensors")
    with pytest.raises(TypeError, match="strings"):
        st.save_file({"z": torch.zeros(2)}, tmp_path / "z.safetensors", metadata={"step": 3})
    with pytest.raises(ValueError, match="names"):
        st.save_file({"__metadata__": torch.zeros(2)}, tmp_path / "z.safetensors")
    assert not (tmp_path / "z.safetensors").exists()


# ---- corrupt and truncated files -----------------------------------------------------------------


@pytest.fixture
def good_file(tmp_path):
    return st.save_file({"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(4)}, tmp_path / "good.safetensors")


def write_file(tmp_path, header: dict, data: bytes, name: str = "bad.safetensors"):
    raw = json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def refused(path, match: str):
    with pytest.raises(st.SafetensorsError, match=match) as info:
        st.load_file(path)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_truncated_file_is_refused(good_file, tmp_path):
    blob = good_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(blob[:-1])  # one byte of data missing
    message = refused(cut, "truncated")
    assert str(cut) in message and "again" in message  # names the file and says what to do
    cut.write_bytes(blob[:20])  # cut inside the header
    refused(cut, "truncated")
    cut.write_bytes(blob[:5])  # not even the length
    refused(cut, "too short")
    cut.write_bytes(b"")
    refused(cut, "too short")


def test_corrupt_header_is_refused(good_file, tmp_path):
    blob = bytearray(good_file.read_bytes())
    blob[9] = ord("#")  # JSON broken
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(blob))
    refused(bad, "JSON")
    bad.write_bytes(struct.pack("<Q", 2**40) + b"{}")  # an absurd header length
    refused(bad, "header length")
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 60)  # a zip file (what torch.save writes) is not safetensors
    with pytest.raises(st.SafetensorsError):
        st.load_file(bad)


def test_inconsistent_offsets_are_refused(tmp_path):
    entry = lambda shape, begin, end, dtype="F32": {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    refused(write_file(tmp_path, {"a": entry([2], 0, 8), "b": entry([2], 12, 20)}, b"\0" * 20), "hole")
    refused(write_file(tmp_path, {"a": entry([2], 0, 8), "b": entry([2], 4, 12)}, b"\0" * 12), "overlaps")
    refused(write_file(tmp_path, {"a": entry([3], 0, 8)}, b"\0" * 8), "12 bytes")  # shape says 3 floats
    refused(write_file(tmp_path, {"a": entry([2], 0, 8)}, b"\0" * 12), "unexpected bytes")
    refused(write_file(tmp_path, {"a": entry([2], 0, 8, "F8_E9")}, b"\0" * 8), "dtype")
    refused(write_file(tmp_path, {"a": entry([-2], 0, 8)}, b"\0" * 8), "shape")
    refused(write_file(tmp_path, {"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "data_offsets")
    refused(write_file(tmp_path, {"__metadata__": {"step": 3}}, b""), "__metadata__")
    # and a valid hand-made file with tensors stored out of name order is read fine
    ok = write_file(tmp_path, {"b": entry([1], 4, 8), "a": entry([1], 0, 4)}, struct.pack("<ff", 1.0, 2.0), "ok.safetensors")
    loaded = st.load_file(ok)
    assert loaded["a"].item() == 1.0 and loaded["b"].item() == 2.0


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        st.load_file(tmp_path / "nope.safetensors")
