"""
Exercise (lesson 13, "take your model elsewhere"): nano/checkpoints/gguf.py, our model as one GGUF file for llama.cpp.

Implement
  - `write_gguf(path, metadata, tensors, alignment)`: GGUF v3 — magic, version, counts, typed metadata
    (`Value(type, value, item)`), tensor infos (dims = the torch shape reversed, type F32 / F16 / BF16,
    offset), zero padding so that the data and every tensor start on a multiple of the alignment;
    atomic (NAME.tmp, then a rename). `read_gguf(path)` reads it back and refuses a damaged file;
  - `gemma2_metadata(cfg, dtype, name)`, `gemma2_tensors(state_dict, dtype)` and
    `tokenizer_metadata(tokenizer, token_strings, merges, vocab_size, chat_template)`: llama.cpp's gemma2
    keys, tensor names (every norm weight + 1) and its "gpt2" BPE tokenizer;
  - `check_llamacpp_can_run(cfg)`: a config llama.cpp's gemma2 would compute otherwise is refused,
and in nano/checkpoints/export.py `export_gguf(checkpoint, out, ...)` and `--format gguf`.

The model is a toy GemmaNano (width 32, 2 layers, window 16) with a tokenizer trained here; llama.cpp is
not needed. `llamacpp_forward` below recomputes the logits the way llama.cpp's gemma2 graph does,
from the file alone, so a missing +1 or a transposed weight shows as different logits.
(bench/verify_gguf_llamacpp.py runs the real llama.cpp.)
"""

import math
import struct

import pytest
import torch
import torch.nn.functional as F

from adapters import impl
from toy_models import BASE, CORPUS, EDGE_TEXTS, LORA, SFT, save_toy_runs, small_gemma

gguf_mod = impl("gguf")
export_mod = impl("export")
loading = impl("loading")

from nano.common.paths import runs_dir  # noqa: E402
from nano.text.pretokenize import PATTERNS  # noqa: E402
from nano.text.tokenizer import Tokenizer  # noqa: E402


def Value(*args, **kwargs):
    """gguf_mod.Value, looked up when a test runs (so a module of yours without it yet still loads)."""
    return gguf_mod.Value(*args, **kwargs)


TEXTS = EDGE_TEXTS


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CORPUS, vocab_size=300, progress=False)


@pytest.fixture
def runs(nano_dirs, tokenizer):
    """data/tokenizer/tokenizer.json, base and SFT checkpoints, a LoRA adapter for the base."""
    return {**save_toy_runs(tokenizer), "tmp": nano_dirs}


def export_sft(runs, **kwargs):
    return gguf_mod.read_gguf(export_mod.export_gguf(runs_dir() / SFT, runs["tmp"] / "m.gguf", **kwargs))


# ---- the format ----------------------------------------------------------------------------------


def test_the_bytes_of_a_small_file(tmp_path):
    """Every field where the format puts it: header, one metadata entry, one tensor info, padding, data."""
    weight = torch.arange(6, dtype=torch.float32).view(2, 3)  # torch (2, 3) -> GGUF dims [3, 2]
    path = gguf_mod.write_gguf(tmp_path / "m.gguf", {"general.architecture": Value("string", "gemma2")}, {"w": weight})
    blob = path.read_bytes()
    assert blob[:4] == b"GGUF"
    assert struct.unpack_from("<IQQ", blob, 4) == (3, 1, 1)  # version, tensor count, metadata count
    key = b"general.architecture"
    expected = (struct.pack("<Q", len(key)) + key + struct.pack("<I", 8)  # the key, type 8 = string
                + struct.pack("<Q", 6) + b"gemma2"  # the value
                + struct.pack("<Q", 1) + b"w" + struct.pack("<I2QIQ", 2, 3, 2, 0, 0))  # name, n_dims, dims, F32, offset
    assert blob[24:24 + len(expected)] == expected
    end_of_infos = 24 + len(expected)
    assert end_of_infos == 111  # 24 + 46 (the metadata entry) + 41 (the tensor info)
    assert blob[111:128] == bytes(17)  # zeros up to the next multiple of 32
    assert blob[128:128 + 24] == weight.numpy().tobytes()  # row-major, little-endian
    assert len(blob) == 128 + 32  # the last tensor is padded too


def test_every_value_type_round_trips(tmp_path):
    metadata = {
        "u8": Value("uint8", 255), "i8": Value("int8", -128), "u16": Value("uint16", 65535), "i16": Value("int16", -2),
        "u32": Value("uint32", 2**32 - 1), "i32": Value("int32", -(2**31)), "u64": Value("uint64", 2**64 - 1),
        "i64": Value("int64", -(2**63)), "f32": Value("float32", 0.5), "f64": Value("float64", 1e-300),
        "yes": Value("bool", True), "no": Value("bool", False), "text": Value("string", "héllo 😀\n"), "empty": Value("string", ""),
        "names": Value("array", ["a b", "Ġthe", ""], item="string"), "ids": Value("array", [1, -3, 5], item="int32"),
        "none": Value("array", [], item="float32"),
    }
    back = gguf_mod.read_gguf(gguf_mod.write_gguf(tmp_path / "m.gguf", metadata, {}))
    assert back.metadata == metadata and list(back.metadata) == list(metadata)  # values, types and order
    assert back.tensors == {}


def test_tensors_round_trip_in_every_dtype_with_any_alignment(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).half(), "c": torch.randn(2, 3, 4).bfloat16(), "d": torch.randn(1)}
    for alignment in (32, 64, 8):
        back = gguf_mod.read_gguf(gguf_mod.write_gguf(tmp_path / "m.gguf", {}, tensors, alignment=alignment))
        assert back.alignment == alignment
        assert ("general.alignment" in back.metadata) == (alignment != 32)  # written when not the default
        assert back.data_start % alignment == 0
        for name, tensor in tensors.items():
            info = back.tensors[name]
            assert info.offset % alignment == 0
            assert info.dims == tuple(reversed(tensor.shape)) and info.shape == tuple(tensor.shape)
            assert torch.equal(back.tensor(name), tensor) and back.tensor(name).dtype == tensor.dtype
        assert [back.tensors[n].type for n in tensors] == ["F32", "F16", "BF16", "F32"]


def test_bad_values_and_tensors_are_refused(tmp_path):
    path = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match="does not fit in a uint32"):
        gguf_mod.write_gguf(path, {"n": Value("uint32", -1)}, {})
    with pytest.raises(TypeError, match="must be an int"):
        gguf_mod.write_gguf(path, {"n": Value("uint32", 2.5)}, {})
    with pytest.raises(TypeError, match="must be a str"):
        gguf_mod.write_gguf(path, {"s": Value("string", 3)}, {})
    with pytest.raises(ValueError, match="unknown type"):
        gguf_mod.write_gguf(path, {"x": Value("uint128", 3)}, {})
    with pytest.raises(ValueError, match="int64"):  # unsupported dtype, and what to do
        gguf_mod.write_gguf(path, {}, {"w": torch.zeros(2, dtype=torch.int64)})
    with pytest.raises(ValueError, match="longer than"):
        gguf_mod.write_gguf(path, {}, {"x" * 64: torch.zeros(2)})
    with pytest.raises(ValueError, match="power of two"):
        gguf_mod.write_gguf(path, {}, {}, alignment=48)
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing written, no NAME.tmp left


def test_damaged_files_are_refused(tmp_path):
    good = gguf_mod.write_gguf(tmp_path / "m.gguf", {"k": Value("uint32", 1)}, {"w": torch.ones(4, 4)}).read_bytes()
    bad = tmp_path / "bad.gguf"
    cases = [
        (b"PK\x03\x04" + good[4:], "not a GGUF file"),  # a zip, say
        (good[:4] + struct.pack("<I", 2) + good[8:], "version 2"),
        (good[:30], "truncated"),  # inside the metadata
        (good[:-40], "truncated"),  # inside the tensor data
        (b"", "not a GGUF file"),
    ]
    info_offset = good.index(b"\x01\x00\x00\x00\x00\x00\x00\x00w") + 9 + 4 + 16 + 4  # name, n_dims, dims, type
    cases.append((good[:info_offset] + struct.pack("<Q", 4) + good[info_offset + 8:], "not a multiple of 32"))
    type_offset = info_offset - 4
    cases.append((good[:type_offset] + struct.pack("<I", 2) + good[type_offset + 4:], "quantized"))  # Q4_0
    for blob, message in cases:
        bad.write_bytes(blob)
        with pytest.raises(ValueError, match=message):
            gguf_mod.read_gguf(bad)
    with pytest.raises(FileNotFoundError):
        gguf_mod.read_gguf(tmp_path / "missing.gguf")


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    path = tmp_path / "m.gguf"
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(gguf_mod, "tensor_bytes", killed)  # Ctrl-C while the weights are written
        gguf_mod.write_gguf(path, {}, {"w": torch.ones(3)})
    assert not list(tmp_path.iterdir())


# ---- Gemma-2 as llama.cpp names it ---------------------------------------------------------------


def test_hyperparameters_under_llamacpp_keys(runs):
    gguf = export_sft(runs)
    cfg = runs["sft"].cfg
    v = gguf.value
    assert v("general.architecture") == "gemma2" and v("general.file_type") == 0  # all F32
    assert (v("gemma2.context_length"), v("gemma2.embedding_length"), v("gemma2.block_count")) == (cfg.context_len, cfg.d_model, cfg.n_layers)
    assert (v("gemma2.feed_forward_length"), v("gemma2.attention.head_count"), v("gemma2.attention.head_count_kv")) == (cfg.d_ff, cfg.n_heads, 1)
    assert v("gemma2.attention.key_length") == v("gemma2.attention.value_length") == cfg.head_dim
    assert v("gemma2.attention.sliding_window") == 16
    assert (v("gemma2.attn_logit_softcapping"), v("gemma2.final_logit_softcapping")) == (50.0, 30.0)
    assert v("gemma2.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    # llama.cpp checks the types: counts are uint32, real numbers float32
    assert gguf.metadata["gemma2.block_count"].type == "uint32"
    assert gguf.metadata["gemma2.attn_logit_softcapping"].type == "float32"


def test_tensors_are_ours_with_norms_plus_one(runs):
    gguf = export_sft(runs)
    ours = runs["sft"].state_dict()
    assert len(gguf.tensors) == len(ours) == 2 + 11 * runs["sft"].cfg.n_layers  # no output.weight: tied
    assert torch.equal(gguf.tensor("token_embd.weight"), ours["embed_tokens.weight"])
    assert gguf.tensors["token_embd.weight"].dims == (32, ours["embed_tokens.weight"].shape[0])  # {n_embd, n_vocab}
    assert gguf.tensors["blk.0.ffn_gate.weight"].dims == (32, 64)  # {n_embd, n_ff}: (out, in) reversed
    assert torch.equal(gguf.tensor("blk.1.attn_k.weight"), ours["layers.1.self_attn.k_proj.weight"])
    assert torch.equal(gguf.tensor("blk.0.ffn_down.weight"), ours["layers.0.mlp.down_proj.weight"])
    for name in ("norm.weight", "layers.1.input_layernorm.weight", "layers.0.post_feedforward_layernorm.weight"):
        gguf_name = gguf_mod.gguf_tensor_name(name)
        assert torch.equal(gguf.tensor(gguf_name), ours[name] + 1)  # Gemma's (1 + w), stored whole
    assert {gguf_mod.gguf_tensor_name(n) for n in ours} == set(gguf.tensors)


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight  # the weight as stored: no +1


def llamacpp_forward(gguf, ids: list[int]) -> torch.Tensor:
    """The logits of llama.cpp's gemma2 graph (src/models/gemma2.cpp), written from the GGUF file alone.

    Where it differs from GemmaNano in form: norms multiply by the stored weight, queries are scaled
    by 1/sqrt(key_length) before the scores, ggml's mul_mat(W, x) with W of dims [in, out] is x @ W^T
    for W read back in torch's (out, in) order, and the window comes from the metadata, on layers 0, 2, ...
    """
    v, w = gguf.value, gguf.tensor
    d, n_head, n_kv, head = v("gemma2.embedding_length"), v("gemma2.attention.head_count"), v("gemma2.attention.head_count_kv"), v("gemma2.attention.key_length")
    eps, window = v("gemma2.attention.layer_norm_rms_epsilon"), v("gemma2.attention.sliding_window")
    attn_cap, final_cap, theta = v("gemma2.attn_logit_softcapping"), v("gemma2.final_logit_softcapping"), v("gemma2.rope.freq_base")
    T = len(ids)
    x = w("token_embd.weight").float()[ids] * math.sqrt(d)  # (T, d)
    pos = torch.arange(T).float()
    inv_freq = theta ** (-torch.arange(0, head, 2).float() / head)
    angles = torch.cat([pos[:, None] * inv_freq] * 2, -1)  # NEOX: pairs (i, i + head/2)
    cos, sin = angles.cos(), angles.sin()

    def rope(t):  # (H, T, head)
        t1, t2 = t[..., : head // 2], t[..., head // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    distance = pos[:, None] - pos[None, :]
    for i in range(v("gemma2.block_count")):
        b = f"blk.{i}."
        h = rms_norm(x, w(b + "attn_norm.weight"), eps)
        q = rope((h @ w(b + "attn_q.weight").T).view(T, n_head, head).transpose(0, 1)) / math.sqrt(head)
        k = rope((h @ w(b + "attn_k.weight").T).view(T, n_kv, head).transpose(0, 1)).repeat_interleave(n_head // n_kv, 0)
        val = (h @ w(b + "attn_v.weight").T).view(T, n_kv, head).transpose(0, 1).repeat_interleave(n_head // n_kv, 0)
        scores = attn_cap * torch.tanh(q @ k.transpose(1, 2) / attn_cap)
        masked = (distance < 0) | ((distance >= window) if i % 2 == 0 else False)
        attn = torch.softmax(scores.masked_fill(masked, float("-inf")), -1) @ val  # (H, T, head)
        out = attn.transpose(0, 1).reshape(T, n_head * head) @ w(b + "attn_output.weight").T
        x = x + rms_norm(out, w(b + "post_attention_norm.weight"), eps)
        h = rms_norm(x, w(b + "ffn_norm.weight"), eps)
        ffn = (F.gelu(h @ w(b + "ffn_gate.weight").T, approximate="tanh") * (h @ w(b + "ffn_up.weight").T)) @ w(b + "ffn_down.weight").T
        x = x + rms_norm(ffn, w(b + "post_ffw_norm.weight"), eps)
    logits = rms_norm(x, w("output_norm.weight"), eps) @ w("token_embd.weight").float().T
    return final_cap * torch.tanh(logits / final_cap)


def test_llamacpp_style_forward_from_the_file_gives_our_logits(runs, tokenizer):
    gguf = export_sft(runs)
    ids = tokenizer.encode(CORPUS)[:80]  # longer than the window (16): the window layers matter
    with torch.no_grad():
        ours = runs["sft"](torch.tensor([ids]))[0][0]
    assert torch.allclose(llamacpp_forward(gguf, ids), ours, atol=1e-4)
    # and the check can fail: without the +1 on the norms the logits are far off
    minus_one = {n: (t - 1 if n.endswith("norm.weight") else t) for n, t in gguf_mod.gemma2_tensors(runs["sft"].state_dict()).items()}
    wrong = gguf_mod.read_gguf(gguf_mod.write_gguf(runs["tmp"] / "wrong.gguf", gguf.metadata, minus_one))
    assert not torch.allclose(llamacpp_forward(wrong, ids), ours, atol=1e-1)


def test_lora_adapter_is_merged_into_the_file(runs, tokenizer):
    path = export_mod.export_gguf(runs_dir() / BASE, runs["tmp"] / "lora.gguf", adapter_path=runs_dir() / LORA)
    adapted, _ = loading.load_for_inference(runs_dir() / BASE, runs_dir() / LORA)
    ids = tokenizer.encode(CORPUS)[:40]
    with torch.no_grad():
        expected = adapted(torch.tensor([ids]))[0][0]
    got = llamacpp_forward(gguf_mod.read_gguf(path), ids)
    assert torch.allclose(got, expected, atol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(got, runs["base"](torch.tensor([ids]))[0][0], atol=1e-2)  # the adapter mattered


def test_half_precision_files_keep_the_norms_in_float32(runs):
    for dtype, torch_dtype, file_type in (("float16", torch.float16, 1), ("bfloat16", torch.bfloat16, 32)):
        gguf = export_sft(runs, dtype=dtype, force=True)
        assert gguf.value("general.file_type") == file_type
        assert {t.type for n, t in gguf.tensors.items() if not n.endswith("norm.weight")} == {gguf_mod.TENSOR_TYPES[torch_dtype][0]}
        assert {t.type for n, t in gguf.tensors.items() if n.endswith("norm.weight")} == {"F32"}
        emb = runs["sft"].state_dict()["embed_tokens.weight"]
        assert torch.equal(gguf.tensor("token_embd.weight"), emb.to(torch_dtype))


# ---- the tokenizer -------------------------------------------------------------------------------


def tokenizer_from_gguf(gguf) -> Tokenizer:
    """Our Tokenizer rebuilt from the file's tokens, types, merges and pre-tokenizer name alone."""
    char_to_byte = {c: b for b, c in export_mod.bytes_to_unicode().items()}
    tokens, types = gguf.value("tokenizer.ggml.tokens"), gguf.value("tokenizer.ggml.token_type")
    specials = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == gguf_mod.TOKEN_TYPES["control"]}
    vocab = {i: t.encode() if i in specials.values() else bytes(char_to_byte[c] for c in t)
             for i, (t, kind) in enumerate(zip(tokens, types)) if kind != gguf_mod.TOKEN_TYPES["unused"]}
    ids = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(ids[part] for part in m.split(" ")) for m in gguf.value("tokenizer.ggml.merges")]
    pattern = {name: regex for regex, name in gguf_mod.LLAMACPP_PRE_TOKENIZERS.items()}[gguf.value("tokenizer.ggml.pre")]
    return Tokenizer(vocab, merges, specials, pattern)


def test_tokens_and_merges_rebuild_our_tokenizer(runs, tokenizer):
    gguf = export_sft(runs)
    assert gguf.value("tokenizer.ggml.model") == "gpt2"  # byte-level BPE
    assert gguf.value("tokenizer.ggml.pre") == "qwen2"  # Tokenizer.train's default pattern, "nano" (lesson 1 picks gpt2)
    tokens = gguf.value("tokenizer.ggml.tokens")
    assert len(tokens) == runs["sft"].cfg.vocab_size and tokens[tokenizer.special_tokens["<eos>"]] == "<eos>"
    spaced = next(i for i, t in tokenizer.vocab.items() if t.startswith(b" ") and len(t) > 1)  # " a", say
    assert tokens[spaced] == "Ġ" + tokenizer.vocab[spaced][1:].decode()  # GPT-2's byte-to-character spelling
    assert len(gguf.value("tokenizer.ggml.merges")) == len(tokenizer.merges)
    rebuilt = tokenizer_from_gguf(gguf)
    assert rebuilt.fingerprint() == tokenizer.fingerprint()
    for text in TEXTS + [CORPUS]:
        assert rebuilt.encode(text) == tokenizer.encode(text), text
    specials = tokenizer.special_tokens
    v = gguf.value
    assert (v("tokenizer.ggml.bos_token_id"), v("tokenizer.ggml.eos_token_id"), v("tokenizer.ggml.padding_token_id")) == (
        specials["<bos>"], specials["<eos>"], specials["<pad>"])
    assert v("tokenizer.ggml.eot_token_id") == specials["<end_of_turn>"]  # where a chat reply stops
    assert v("tokenizer.ggml.add_bos_token") is True and "<start_of_turn>" in v("tokenizer.chat_template")
    assert gguf.metadata["tokenizer.ggml.token_type"].item == "int32"  # the type llama.cpp insists on


@pytest.mark.parametrize("pattern, llamacpp_name", [("gpt2", "gpt-2"), ("gpt4", "dbrx"), ("nano", "qwen2")])
def test_each_lesson_1_pattern_has_its_llamacpp_pre_tokenizer(pattern, llamacpp_name):
    tok = Tokenizer.train(CORPUS, vocab_size=290, pattern=pattern, progress=False)
    bpe = export_mod.tokenizer_json(tok)["model"]
    strings = [s for s, _ in sorted(bpe["vocab"].items(), key=lambda item: item[1])]
    meta = gguf_mod.tokenizer_metadata(tok, strings, bpe["merges"], vocab_size=tok.vocab_size + 3)
    assert meta["tokenizer.ggml.pre"].value == llamacpp_name
    assert meta["tokenizer.ggml.tokens"].value[-3:] == [f"[PAD{tok.vocab_size + i}]" for i in range(3)]  # padded rows
    assert meta["tokenizer.ggml.token_type"].value[-3:] == [gguf_mod.TOKEN_TYPES["unused"]] * 3
    own = Tokenizer(tok.vocab, tok.merges, tok.special_tokens, PATTERNS["gpt2"] + "|x")
    with pytest.raises(ValueError, match="no pre-tokenizer"):
        gguf_mod.tokenizer_metadata(own, strings, bpe["merges"], vocab_size=tok.vocab_size)


# ---- what llama.cpp cannot run, and the command line ---------------------------------------------


def test_configs_llamacpp_would_compute_otherwise_are_refused(tokenizer):
    cfg = small_gemma(tokenizer.vocab_size).cfg
    gguf_mod.check_llamacpp_can_run(cfg)  # ours: fine
    for change, message in (({"query_pre_attn_scalar": 20.0}, "1/sqrt"), ({"final_softcap": 0.0}, "always soft-caps"),
                            ({"attn_softcap": 0.0}, "always soft-caps")):
        with pytest.raises(ValueError, match=message):
            gguf_mod.check_llamacpp_can_run(small_gemma(tokenizer.vocab_size).cfg.__class__(**{**vars(cfg), **change}))
    no_window = cfg.__class__(**{**vars(cfg), "sliding_window": 0})  # every layer global: a window as long as the context
    assert gguf_mod.gemma2_metadata(no_window)["gemma2.attention.sliding_window"] == Value("uint32", cfg.context_len)


def test_export_gguf_refuses_bad_requests(runs):
    out = runs["tmp"] / "m.gguf"
    with pytest.raises(ValueError, match="dtype"):
        export_mod.export_gguf(runs_dir() / SFT, out, dtype="int8")
    with pytest.raises(ValueError, match="float16 is for --format gguf"):
        export_mod.export(runs_dir() / SFT, runs["tmp"] / "hf", dtype="float16")
    with pytest.raises(ValueError, match="a folder"):
        export_mod.export_gguf(runs_dir() / SFT, runs["tmp"])
    export_mod.export_gguf(runs_dir() / SFT, out)
    with pytest.raises(ValueError, match="--force"):
        export_mod.export_gguf(runs_dir() / SFT, out)
    with pytest.raises(ValueError, match="inputs"):
        export_mod.export_gguf(runs_dir() / SFT, runs_dir() / SFT, force=True)
    assert (runs_dir() / SFT).is_file()
    with pytest.raises(FileNotFoundError, match="make lesson-5"):
        export_mod.export_gguf(runs_dir() / "sft/full/default/checkpoints/missing.pth", runs["tmp"] / "x.gguf")


def test_command_line(runs, capsys):
    assert export_mod.main(["--format", "gguf"]) == 0  # lesson 5's model -> runs/export/sft-full.gguf
    default = runs_dir() / "export" / "sft-full.gguf"
    assert gguf_mod.read_gguf(default).value("general.name") == "sft-full"
    assert "sft-full.gguf" in capsys.readouterr().out
    assert export_mod.main(["--format", "gguf"]) == 1  # exists now: refused, with the reason
    assert "--force" in capsys.readouterr().err
    assert export_mod.main(["--format", "gguf", "--force", "--dtype", "float16"]) == 0
    out = runs["tmp"] / "base.gguf"
    assert export_mod.main(["--format", "gguf", "--checkpoint_path", str(runs_dir() / BASE), "--out", str(out)]) == 0
    assert out.is_file()
    for bad, message in ((["--format", "onnx"], "must be one of"),  # an unknown format
                         (["--format", "gguf", "--checkpoint_path", str(runs_dir() / BASE)], "--out"),
                         (["--format", "gguf", "--out_dir", str(runs["tmp"] / "d")], "--out_dir names a folder")):
        with pytest.raises(SystemExit):
            export_mod.main(bad)
        assert message in capsys.readouterr().err
