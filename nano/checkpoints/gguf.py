"""
GGUF: our model as ONE file that llama.cpp runs, and the names llama.cpp's Gemma-2 expects in it.

llama.cpp (C/C++, github.com/ggml-org/llama.cpp) runs language models on laptops, phones and servers
without Python. It reads GGUF, a file that holds everything needed to run a model: the architecture's
numbers, the tokenizer and the weights, each tensor aligned so that the file can be memory-mapped and
used in place. A Hugging Face folder (nano/checkpoints/export.py) is several files that a Python
library interprets; a GGUF file is self-contained, and its metadata is typed.

The layout (version 3, every number little-endian), as llama.cpp's reader (ggml/src/gguf.cpp) reads it:

    magic          4 bytes    b"GGUF"
    version        uint32     3
    tensor count   uint64
    metadata count uint64
    metadata       per entry: key (string), value type (uint32), value
    tensor infos   per tensor: name (string), n_dims (uint32), dims (uint64 each, innermost first),
                   type (uint32: 0 = F32, 1 = F16, 30 = BF16), offset (uint64, from the start of the data)
    padding        zeros up to a multiple of the alignment (general.alignment; 32 if absent)
    data           per tensor: its bytes, row-major, then zeros up to the next multiple of the alignment

A string is a uint64 byte count and the UTF-8 bytes (no terminating zero). An array is the type of
its items (uint32), their count (uint64), then the items. Tensors are stored in the order of their
infos, each at the offset its info gives, so every tensor starts on an aligned byte.

Dims are in ggml's order, innermost first. A torch weight of shape (out, in) is row-major: `in`
varies fastest, so its dims are [in, out]: the shape reversed, the bytes unchanged.

    write_gguf("m.gguf", {"general.architecture": Value("string", "gemma2")}, {"w": torch.ones(2, 3)})
    gguf = read_gguf("m.gguf")        # .metadata {key: Value}, .tensors {name: TensorInfo}, .tensor(name)

The second half of the file maps our model onto llama.cpp's "gemma2" architecture (section 3): the
hyperparameter keys, the tensor names, the +1 on every norm weight, and the tokenizer. The export
itself (checkpoint -> merged model -> file) is nano/checkpoints/export.py: `export_gguf`.

Tests: tests/test_13_gguf.py. The check against llama.cpp itself: bench/verify_gguf_llamacpp.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from nano.common.fileio import atomic_open
from nano.model.gemma import ModelConfig
from nano.text.chat_format import special_id
from nano.text.pretokenize import PATTERNS
from nano.text.tokenizer import Tokenizer
from nano.checkpoints.safetensors import tensor_bytes

MAGIC = b"GGUF"
VERSION = 3
DEFAULT_ALIGNMENT = 32  # what a reader assumes when the file has no general.alignment
MAX_NAME_BYTES = 63  # ggml keeps a tensor's name in 64 bytes, the terminating zero included

# the metadata value types: name -> (code in the file, struct format of one item)
VALUE_TYPES: dict[str, tuple[int, str | None]] = {
    "uint8": (0, "<B"), "int8": (1, "<b"), "uint16": (2, "<H"), "int16": (3, "<h"),
    "uint32": (4, "<I"), "int32": (5, "<i"), "float32": (6, "<f"), "bool": (7, "<?"),
    "string": (8, None), "array": (9, None), "uint64": (10, "<Q"), "int64": (11, "<q"), "float64": (12, "<d"),
}
VALUE_TYPE_NAMES = {code: name for name, (code, _) in VALUE_TYPES.items()}

# tensor types: the plain float ones (the format has ~30 more, the block-quantized Q4_0, Q8_0, ...)
TENSOR_TYPES: dict[torch.dtype, tuple[str, int]] = {torch.float32: ("F32", 0), torch.float16: ("F16", 1), torch.bfloat16: ("BF16", 30)}
TENSOR_DTYPES = {name: dtype for dtype, (name, _) in TENSOR_TYPES.items()}
TENSOR_TYPE_NAMES = {code: name for name, code in TENSOR_TYPES.values()}


@dataclass(frozen=True)
class Value:
    """A metadata value and its GGUF type: Value("uint32", 4), Value("array", ["a", "b"], item="string").

    The type is explicit because Python's 4 could be any of eight integer types in the file, and
    llama.cpp checks them: a block count written as int32 instead of uint32 is refused.
    """

    type: str
    value: Any
    item: str | None = None  # arrays: the type of every item


# -----------------------------------------------------------------------------------------------
# 1. writing


def align(offset: int, alignment: int) -> int:
    """The first multiple of `alignment` at or after `offset`: align(70, 32) == 96, align(64, 32) == 64."""
    return offset + (-offset % alignment)


def encode_string(text: str) -> bytes:
    """uint64 length + UTF-8 bytes: "hi" -> b'\\x02\\x00\\x00\\x00\\x00\\x00\\x00\\x00hi'."""
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _encode_item(type_name: str, x: Any, key: str) -> bytes:
    """One string / bool / number of type `type_name`, refusing a value of the wrong kind."""
    if type_name == "string":
        if not isinstance(x, str):
            raise TypeError(f"metadata {key!r}: a string value must be a str, got {type(x).__name__}")
        return encode_string(x)
    is_bool = isinstance(x, bool)
    if type_name == "bool" and not is_bool:
        raise TypeError(f"metadata {key!r}: a bool value must be True or False, got {x!r}")
    if type_name.startswith(("uint", "int")) and (is_bool or not isinstance(x, int)):
        raise TypeError(f"metadata {key!r}: a {type_name} value must be an int, got {x!r}")
    if type_name.startswith("float") and (is_bool or not isinstance(x, (int, float))):
        raise TypeError(f"metadata {key!r}: a {type_name} value must be a number, got {x!r}")
    try:
        return struct.pack(VALUE_TYPES[type_name][1], x)
    except struct.error:
        raise ValueError(f"metadata {key!r}: {x!r} does not fit in a {type_name}") from None


def encode_value(key: str, value: Value) -> bytes:
    """The value type code, then the value (an array: item type, count, items)."""
    if value.type not in VALUE_TYPES:
        raise ValueError(f"metadata {key!r}: unknown type {value.type!r}; GGUF has {sorted(VALUE_TYPES)}")
    code = struct.pack("<I", VALUE_TYPES[value.type][0])
    if value.type != "array":
        return code + _encode_item(value.type, value.value, key)
    if value.item not in VALUE_TYPES or value.item == "array":  # the format nests arrays; we never need it
        raise ValueError(f"metadata {key!r}: an array needs an item type other than array, got {value.item!r}")
    items = list(value.value)
    return code + struct.pack("<IQ", VALUE_TYPES[value.item][0], len(items)) + b"".join(
        _encode_item(value.item, x, key) for x in items)


def write_gguf(path: str | Path, metadata: Mapping[str, Value], tensors: Mapping[str, torch.Tensor],
               alignment: int = DEFAULT_ALIGNMENT) -> Path:
    """Write a GGUF v3 file, atomically (NAME.tmp, then a rename: nano/common/fileio.py).

    metadata: {key: Value}, written in this order. tensors: {name: F32, F16 or BF16 tensor}, stored
    in this order. general.alignment is added when `alignment` is not the default 32, so a reader
    finds the tensors where we put them.
    """
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"the alignment must be a power of two, got {alignment}")
    metadata = dict(metadata)
    if alignment != DEFAULT_ALIGNMENT or "general.alignment" in metadata:
        if metadata.get("general.alignment", Value("uint32", alignment)) != Value("uint32", alignment):
            raise ValueError(f"general.alignment {metadata['general.alignment']} disagrees with alignment={alignment}")
        metadata["general.alignment"] = Value("uint32", alignment)

    # 1. the tensor infos, and where each tensor's bytes go
    infos, offset = [], 0
    for name, tensor in tensors.items():
        if tensor.dtype not in TENSOR_TYPES:
            raise ValueError(f"tensor {name!r} is {tensor.dtype}: this writer stores {[t[0] for t in TENSOR_TYPES.values()]} "
                             "(cast it first, e.g. tensor.float())")
        if not 1 <= tensor.dim() <= 4:
            raise ValueError(f"tensor {name!r} has {tensor.dim()} dimensions: ggml tensors have 1 to 4")
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise ValueError(f"tensor name {name!r} is longer than {MAX_NAME_BYTES} bytes, which ggml cannot hold")
        dims = tensor.shape[::-1]  # innermost first: (out, in) -> [in, out]
        infos.append(encode_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, TENSOR_TYPES[tensor.dtype][1], offset))
        offset = align(offset + tensor.numel() * tensor.element_size(), alignment)

    # 2. header, metadata, infos, padding, then the tensors one at a time (memory stays at one tensor)
    head = MAGIC + struct.pack("<IQQ", VERSION, len(tensors), len(metadata))
    head += b"".join(encode_string(key) + encode_value(key, value) for key, value in metadata.items())
    head += b"".join(infos)
    with atomic_open(path, "wb") as f:
        f.write(head + bytes(align(len(head), alignment) - len(head)))
        for tensor in tensors.values():
            data = tensor_bytes(tensor)
            f.write(data + bytes(align(len(data), alignment) - len(data)))
    return Path(path)


# -----------------------------------------------------------------------------------------------
# 2. reading


class GGUFError(ValueError):
    """The file is not a GGUF file we can read (wrong magic, truncated, corrupt, an unknown type)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF's order, innermost first
    type: str  # "F32", "F16", "BF16"
    offset: int  # bytes from the start of the data section

    @property
    def shape(self) -> tuple[int, ...]:
        """torch's order: the dims reversed."""
        return self.dims[::-1]

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.dims:
            numel *= d
        return numel * torch.empty((), dtype=TENSOR_DTYPES[self.type]).element_size()


@dataclass
class GGUFFile:
    """What read_gguf found: the header's numbers, the metadata, the tensor infos, and the bytes."""

    path: Path
    version: int
    alignment: int
    data_start: int  # where the data section begins in the file (a multiple of the alignment)
    metadata: dict[str, Value] = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    blob: bytes = field(default=b"", repr=False)

    def value(self, key: str) -> Any:
        """A metadata value without its type: gguf.value("gemma2.block_count") -> 4."""
        if key not in self.metadata:
            raise KeyError(f"{self.path} has no metadata key {key!r}")
        return self.metadata[key].value

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, in torch's shape order, copied out of the file."""
        info = self.tensors[name]
        begin = self.data_start + info.offset
        raw = torch.frombuffer(bytearray(self.blob[begin:begin + info.nbytes]), dtype=torch.uint8)
        return raw.view(TENSOR_DTYPES[info.type]).reshape(info.shape)


class _Reader:
    """Reads numbers and strings from the start of a byte string on, saying what it was reading
    and where if the bytes run out (a truncated file)."""

    def __init__(self, blob: bytes, where: str):
        self.blob, self.pos, self.where = blob, 0, where

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.blob):
            raise GGUFError(f"{self.where} is truncated: it ends at byte {len(self.blob)} while reading {what} "
                            f"(bytes {self.pos}..{self.pos + n}) — write or download it again")
        data = self.blob[self.pos:self.pos + n]
        self.pos += n
        return data

    def number(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        data = self.take(self.number("<Q", f"the length of {what}"), what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.where}: {what} is not valid UTF-8 (a corrupt file?)") from None

    def item(self, type_name: str, what: str) -> Any:
        return self.string(what) if type_name == "string" else self.number(VALUE_TYPES[type_name][1], what)

    def value(self, key: str) -> Value:
        code = self.number("<I", f"the type of {key!r}")
        if code not in VALUE_TYPE_NAMES:
            raise GGUFError(f"{self.where}: metadata {key!r} has the unknown value type {code}")
        type_name = VALUE_TYPE_NAMES[code]
        if type_name != "array":
            return Value(type_name, self.item(type_name, f"the value of {key!r}"))
        item_code, count = self.number("<I", f"the item type of {key!r}"), self.number("<Q", f"the length of {key!r}")
        if item_code not in VALUE_TYPE_NAMES or VALUE_TYPE_NAMES[item_code] == "array":
            raise GGUFError(f"{self.where}: array {key!r} has item type {item_code}, which this reader does not read")
        item = VALUE_TYPE_NAMES[item_code]
        return Value("array", [self.item(item, f"item {i} of {key!r}") for i in range(count)], item)


def read_gguf(path: str | Path) -> GGUFFile:
    """Read and check a GGUF v3 file: header, metadata, tensor infos and where the tensors lie.

    Refused with a GGUFError (a ValueError) that says why: another kind of file, another version,
    a truncated file, an unknown type, a tensor that is misaligned, overlaps another or runs past
    the end.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    blob = path.read_bytes()
    r = _Reader(blob, str(path))
    magic = r.take(4, "the magic") if len(blob) >= 4 else blob
    if magic != MAGIC:
        raise GGUFError(f"{path} is not a GGUF file: it starts with {magic!r}, not {MAGIC!r}")
    version = r.number("<I", "the version")
    if version != VERSION:
        raise GGUFError(f"{path} is GGUF version {version}; this reader reads version {VERSION}")
    n_tensors, n_metadata = r.number("<Q", "the tensor count"), r.number("<Q", "the metadata count")

    gguf = GGUFFile(path, version, DEFAULT_ALIGNMENT, 0, blob=blob)
    for i in range(n_metadata):
        key = r.string(f"metadata key {i}")
        gguf.metadata[key] = r.value(key)
    if "general.alignment" in gguf.metadata:
        alignment = gguf.metadata["general.alignment"]
        if alignment.type != "uint32" or alignment.value <= 0 or alignment.value & (alignment.value - 1):
            raise GGUFError(f"{path}: general.alignment must be a uint32 power of two, got {alignment}")
        gguf.alignment = alignment.value

    for i in range(n_tensors):
        name = r.string(f"the name of tensor {i}")
        n_dims = r.number("<I", f"the n_dims of {name!r}")
        if not 1 <= n_dims <= 4:
            raise GGUFError(f"{path}: tensor {name!r} has {n_dims} dimensions; ggml tensors have 1 to 4")
        dims = tuple(r.number("<Q", f"the dims of {name!r}") for _ in range(n_dims))
        code, offset = r.number("<I", f"the type of {name!r}"), r.number("<Q", f"the offset of {name!r}")
        if code not in TENSOR_TYPE_NAMES:
            raise GGUFError(f"{path}: tensor {name!r} has type {code}; this reader knows "
                            f"{sorted(TENSOR_TYPE_NAMES.values())} (a quantized file?)")
        gguf.tensors[name] = TensorInfo(name, dims, TENSOR_TYPE_NAMES[code], offset)

    # the data: starts at the first aligned byte after the infos; each tensor aligned, in order, inside the file
    gguf.data_start = align(r.pos, gguf.alignment)
    end = 0
    for info in gguf.tensors.values():
        if info.offset % gguf.alignment:
            raise GGUFError(f"{path}: tensor {info.name!r} starts at offset {info.offset}, not a multiple of {gguf.alignment}")
        if info.offset < end:
            raise GGUFError(f"{path}: tensor {info.name!r} at offset {info.offset} overlaps the tensor before it")
        end = info.offset + info.nbytes
        if gguf.data_start + end > len(blob):
            raise GGUFError(f"{path} is truncated: tensor {info.name!r} needs bytes up to {gguf.data_start + end}, "
                            f"the file has {len(blob)} — write or download it again")
        end = align(end, gguf.alignment)
    return gguf


# -----------------------------------------------------------------------------------------------
# 3. Gemma-2 in llama.cpp's names
#
# What follows is checked against llama.cpp's own source (src/models/gemma2.cpp, src/llama-arch.cpp,
# src/llama-vocab.cpp, gguf-py/gguf/constants.py, and convert_hf_to_gguf.py's Gemma2Model, which does
# the same from a Hugging Face folder) and, end to end, by bench/verify_gguf_llamacpp.py.

ARCH = "gemma2"
FILE_TYPES = {"float32": 0, "float16": 1, "bfloat16": 32}  # general.file_type: ALL_F32, MOSTLY_F16, MOSTLY_BF16

# our names -> llama.cpp's ("blk.N." + the name inside a layer)
GLOBAL_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_feedforward_layernorm": "post_ffw_norm",
}

# llama.cpp does not read a pre-tokenizer regex from the file: tokenizer.ggml.pre names one of its
# built-in pre-tokenizers. Ours -> the one that cuts text into the same pieces (src/llama-vocab.cpp):
#   gpt2 -> "gpt-2": GPT-2's regex, which llama.cpp splits with hand-written C++ (src/unicode.cpp) that
#           also does the pattern's last alternative, \s+ (its regex list leaves that one out);
#   gpt4 -> "dbrx": Llama-3's regex, which is GPT-4's. Not "llama-bpe", the same regex with a shortcut
#           (ignore_merges: a piece found whole in the vocabulary is taken as one token without merging),
#           which gives our ids only where the merges would have made that token anyway;
#   nano -> "qwen2": GPT-4's regex with one digit per piece, which is ours.
# For gpt4 and nano one corner differs: our (?i:...) contractions also match "'ſ" (the long s folds to
# s), llama.cpp's '[sS] does not, so "he'ſt" is cut "'ſ" "t" here and "'ſt" there (the ids differ only
# if a merge joins those bytes). A regex of your own has no llama.cpp name: the export refuses it.
LLAMACPP_PRE_TOKENIZERS = {PATTERNS["gpt2"]: "gpt-2", PATTERNS["gpt4"]: "dbrx", PATTERNS["nano"]: "qwen2"}
TOKEN_TYPES = {"normal": 1, "control": 3, "unused": 5}  # llama.cpp's llama_token_type


def check_llamacpp_can_run(cfg: ModelConfig) -> None:
    """Refuse a config that llama.cpp's gemma2 would compute differently from GemmaNano.

    llama.cpp builds gemma2 from the numbers in the file plus choices of its own (src/models/gemma2.cpp):
      - queries are scaled by 1 / sqrt(head_dim) (by 1 / sqrt(d_model / n_heads) for a model of 46 layers,
        which it takes for Gemma-2-27B): query_pre_attn_scalar must be that number;
      - both soft-caps are always applied, c * tanh(x / c): a cap of 0 (ours for "off") would divide by zero;
      - the window is on layers 0, 2, 4, ... (its swa pattern 2, as ours) and covers the query and the
        window - 1 keys before it (p1 - p0 < n_swa, as our p - k < window);
      - RoPE in the rotate-half layout (its NEOX type), GELU-tanh GeGLU, sandwich norms, embeddings
        times sqrt(d_model), the LM head tied to the embedding: what GemmaNano computes, always.
    """
    expected = cfg.d_model / cfg.n_heads if cfg.n_layers == 46 else cfg.head_dim
    problems = []
    if cfg.query_pre_attn_scalar != expected:
        problems.append(f"query_pre_attn_scalar is {cfg.query_pre_attn_scalar:g}, but llama.cpp's gemma2 scales queries by "
                        f"1/sqrt({expected:g}) ({'d_model / n_heads at 46 layers' if cfg.n_layers == 46 else 'head_dim'})")
    for name in ("attn_softcap", "final_softcap"):
        if getattr(cfg, name) <= 0:
            problems.append(f"{name} is {getattr(cfg, name):g} (off), but llama.cpp's gemma2 always soft-caps")
    if problems:
        raise ValueError("llama.cpp's gemma2 cannot run this model as GemmaNano computes it: " + "; ".join(problems))


def gguf_tensor_name(name: str) -> str:
    """Our parameter name -> llama.cpp's: layers.3.mlp.gate_proj.weight -> blk.3.ffn_gate.weight."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".")
    inner = ".".join(parts[2:-1])
    if parts[0] != "layers" or inner not in LAYER_NAMES or parts[-1] != "weight":
        raise ValueError(f"{name!r} is not a GemmaNano parameter that llama.cpp's gemma2 has a place for")
    return f"blk.{parts[1]}.{LAYER_NAMES[inner]}.weight"


def gemma2_tensors(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's names, the matrices in `dtype`.

    Every RMSNorm weight gets +1. Gemma stores the gain as an offset w and computes x / rms(x) * (1 + w)
    (nano/model/gemma.py: RMSNorm); llama.cpp multiplies by the stored weight as it is, so the file must
    hold 1 + w. The norms stay F32 whatever `dtype` is, as llama.cpp's converter keeps every 1-D
    tensor: they are tiny, and 1 + w rounded to bf16 would lose the small w a trained norm learned.
    There is no output.weight: llama.cpp's gemma2 reuses token_embd as the LM head (tied).
    """
    tensors = {}
    for name, tensor in state_dict.items():
        if name.endswith("norm.weight"):
            tensors[gguf_tensor_name(name)] = (tensor.detach().float() + 1.0).contiguous()
        else:
            tensors[gguf_tensor_name(name)] = tensor.detach().to(dtype).contiguous()
    return tensors


def llamacpp_pre_tokenizer(tokenizer: Tokenizer) -> str:
    """The name of llama.cpp's pre-tokenizer that cuts text as ours does (see LLAMACPP_PRE_TOKENIZERS)."""
    if tokenizer.pattern not in LLAMACPP_PRE_TOKENIZERS:
        raise ValueError(f"the tokenizer's pre-tokenizer regex {tokenizer.pattern!r} is none of lesson 1's patterns "
                         f"{sorted(PATTERNS)}: llama.cpp has no pre-tokenizer known to match it")
    return LLAMACPP_PRE_TOKENIZERS[tokenizer.pattern]


def tokenizer_metadata(tokenizer: Tokenizer, token_strings: Sequence[str], merges: Sequence[str],
                       vocab_size: int, chat_template: str = "") -> dict[str, Value]:
    """tokenizer.ggml.*: our byte-level BPE as llama.cpp's "gpt2" tokenizer model.

    token_strings[i]: token i spelled with GPT-2's byte-to-character table (" the" -> "Ġthe"), the
    special tokens as their text; merges: "a b" in the order learned (earliest merge = rank 0, applied
    first, as in our encoder). Both come from nano/checkpoints/export.py: tokenizer_json, which also
    refuses two ids with the same bytes (llama.cpp looks tokens up by their string, and stops on that).
    Rows of the embedding past the tokenizer's last id get the placeholder "[PADi]", marked unused.
    """
    if len(token_strings) > vocab_size:
        raise ValueError(f"the tokenizer has {len(token_strings)} tokens but the model only {vocab_size} rows of embedding")
    specials = set(tokenizer.special_tokens.values())
    tokens = list(token_strings) + [f"[PAD{i}]" for i in range(len(token_strings), vocab_size)]
    types = [TOKEN_TYPES["control" if i in specials else "normal"] for i in range(len(token_strings))]
    types += [TOKEN_TYPES["unused"]] * (vocab_size - len(token_strings))
    metadata = {
        "tokenizer.ggml.model": Value("string", "gpt2"),  # byte-level BPE, GPT-2's family
        "tokenizer.ggml.pre": Value("string", llamacpp_pre_tokenizer(tokenizer)),
        "tokenizer.ggml.tokens": Value("array", tokens, item="string"),
        "tokenizer.ggml.token_type": Value("array", types, item="int32"),  # control: cut out of text, never merged
        "tokenizer.ggml.merges": Value("array", list(merges), item="string"),
        "tokenizer.ggml.bos_token_id": Value("uint32", special_id(tokenizer, "<bos>")),
        "tokenizer.ggml.eos_token_id": Value("uint32", special_id(tokenizer, "<eos>")),
        # the end of a chat reply: llama.cpp stops generating at eos AND eot ("end of generation" tokens)
        "tokenizer.ggml.eot_token_id": Value("uint32", special_id(tokenizer, "<end_of_turn>")),
        "tokenizer.ggml.padding_token_id": Value("uint32", special_id(tokenizer, "<pad>")),
        "tokenizer.ggml.add_bos_token": Value("bool", True),  # lesson 2 starts every text with <bos>
        "tokenizer.ggml.add_eos_token": Value("bool", False),
    }
    if chat_template:  # llama.cpp recognises Gemma's format by its "<start_of_turn>"
        metadata["tokenizer.chat_template"] = Value("string", chat_template)
    return metadata


def gemma2_metadata(cfg: ModelConfig, dtype: str = "float32", name: str = "nano") -> dict[str, Value]:
    """general.* and gemma2.*: the architecture's numbers under llama.cpp's keys, with its types.

    A window of 0 (ours for "every layer global") becomes a window as long as the context, as in
    config.json (export.py: hf_config): no query inside the context can look past it.
    """
    check_llamacpp_can_run(cfg)
    u32, f32 = (lambda x: Value("uint32", int(x))), (lambda x: Value("float32", float(x)))
    return {
        "general.architecture": Value("string", ARCH),  # which graph llama.cpp builds; prefixes the keys below
        "general.name": Value("string", name),
        "general.file_type": u32(FILE_TYPES[dtype]),
        f"{ARCH}.context_length": u32(cfg.context_len),
        f"{ARCH}.embedding_length": u32(cfg.d_model),
        f"{ARCH}.block_count": u32(cfg.n_layers),
        f"{ARCH}.feed_forward_length": u32(cfg.d_ff),
        f"{ARCH}.attention.head_count": u32(cfg.n_heads),
        f"{ARCH}.attention.head_count_kv": u32(cfg.n_kv_heads),  # 1: multi-query attention
        f"{ARCH}.attention.key_length": u32(cfg.head_dim),
        f"{ARCH}.attention.value_length": u32(cfg.head_dim),
        f"{ARCH}.attention.layer_norm_rms_epsilon": f32(cfg.rms_norm_eps),
        f"{ARCH}.attention.sliding_window": u32(cfg.sliding_window if cfg.sliding_window > 0 else cfg.context_len),
        f"{ARCH}.attn_logit_softcapping": f32(cfg.attn_softcap),
        f"{ARCH}.final_logit_softcapping": f32(cfg.final_softcap),
        f"{ARCH}.rope.freq_base": f32(cfg.rope_theta),  # llama.cpp's default is 10000 too; written to be sure
    }
