"""
Exercise (lesson 13, "take your model elsewhere"): nano/checkpoints/export.py, our model as a Hugging Face folder.

Implement
  - `export(checkpoint, out_dir, adapter_path, quantize, dtype, force)`: config.json (Gemma-2's keys
    under Hugging Face's names), model.safetensors ("model." + our names), generation_config.json,
    tokenizer.json (the `tokenizers` format of our byte-level BPE) and tokenizer_config.json (with a
    chat template that renders what nano/text/chat_format.py renders); an adapter merged, NF4 dequantized;
    a non-empty OUT_DIR refused unless force; a foreign checkpoint or mismatched adapter refused,
  - `load_hf(folder)`: the folder back into GemmaNano + Tokenizer, giving identical logits.

The model is a toy GemmaNano (width 32, 2 layers, window 16) with a tokenizer trained here on a small
string; transformers is not needed (bench/verify_hf_export.py checks against it when installed).
The tokenizer.json check replays the `tokenizers` pipeline the file describes, reading only the file.
"""

import json

import pytest
import regex
import torch

from adapters import impl
from toy_models import BASE, CORPUS, EDGE_TEXTS, LORA, QLORA, SFT, save_toy_runs, toy_model

export_mod = impl("export")
chat_format = impl("chat_format")
loading = impl("loading")

from nano.common.paths import runs_dir  # noqa: E402
from nano.text.tokenizer import Tokenizer  # noqa: E402


# what Gemma2ForCausalLM's config needs (each one is read by transformers' Gemma2Config)
CONFIG_KEYS = {
    "architectures", "model_type", "attention_bias", "attention_dropout", "attn_logit_softcapping",
    "final_logit_softcapping", "bos_token_id", "eos_token_id", "pad_token_id", "head_dim", "hidden_act",
    "hidden_activation", "hidden_size", "intermediate_size", "initializer_range", "max_position_embeddings",
    "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "query_pre_attn_scalar", "rms_norm_eps",
    "rope_theta", "sliding_window", "tie_word_embeddings", "vocab_size", "torch_dtype",
}

TEXTS = EDGE_TEXTS

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
     {"role": "assistant", "content": "2 + 3 = 5.\n#### 5"}, {"role": "user", "content": "And 4 + 4?"}],
    [{"role": "user", "content": "  spaces\n\nand lines  "}, {"role": "assistant", "content": ""}],
]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CORPUS, vocab_size=300, progress=False)


@pytest.fixture
def runs(nano_dirs, tokenizer):
    """data/tokenizer/tokenizer.json, base and SFT checkpoints, a LoRA and a QLoRA adapter for the base."""
    return {**save_toy_runs(tokenizer, qlora=True), "tmp": nano_dirs}


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]


def sample_ids(tokenizer, length: int = 80) -> list[int]:
    """More tokens than the sliding window (16), so the window layers are really exercised."""
    ids = tokenizer.encode(CORPUS)[:length]
    assert len(ids) == length
    return ids


# ---- the round trip ------------------------------------------------------------------------------


def test_export_then_load_hf_gives_identical_logits(runs, tokenizer):
    out = export_mod.export(runs_dir() / SFT, runs["tmp"] / "hf")
    assert sorted(p.name for p in out.iterdir()) == sorted(export_mod.FILES)
    model, tok = export_mod.load_hf(out)
    ids = sample_ids(tokenizer)
    assert torch.equal(logits(model, ids), logits(runs["sft"], ids))  # fp32: bit for bit
    assert model.cfg.vocab_size == runs["sft"].cfg.vocab_size and model.cfg.sliding_window == 16
    assert tok.fingerprint() == tokenizer.fingerprint()  # same vocab, merges, specials and pattern


def test_weights_are_stored_under_hugging_face_names(runs):
    out = export_mod.export(runs_dir() / SFT, runs["tmp"] / "hf")
    header = impl("safetensors").read_header(out / "model.safetensors")
    names = {n for n in header if n != "__metadata__"}
    assert names == {"model." + n for n in runs["sft"].state_dict()}
    assert "model.layers.1.self_attn.q_proj.weight" in names and "model.norm.weight" in names
    assert "lm_head.weight" not in names  # tied to the embedding
    assert header["model.layers.0.mlp.gate_proj.weight"]["shape"] == [64, 32]  # (out, in) as nn.Linear stores it
    assert header["__metadata__"]["format"] == "pt"
    assert {e["dtype"] for n, e in header.items() if n != "__metadata__"} == {"F32"}


def test_bfloat16_export(runs, tokenizer):
    out = export_mod.export(runs_dir() / SFT, runs["tmp"] / "hf16", dtype="bfloat16")
    header = impl("safetensors").read_header(out / "model.safetensors")
    assert {e["dtype"] for n, e in header.items() if n != "__metadata__"} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model, _ = export_mod.load_hf(out)
    rounded = toy_model(tokenizer, 1)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in runs["sft"].state_dict().items()})
    ids = sample_ids(tokenizer)
    assert torch.equal(logits(model, ids), logits(rounded, ids))  # exactly the bf16-rounded weights
    assert torch.allclose(logits(model, ids), logits(runs["sft"], ids), atol=0.05)  # and close to the originals


def test_lora_adapter_is_merged(runs, tokenizer):
    out = export_mod.export(runs_dir() / BASE, runs["tmp"] / "lora", adapter_path=runs_dir() / LORA)
    exported, _ = export_mod.load_hf(out)
    adapted, _ = loading.load_for_inference(runs_dir() / BASE, runs_dir() / LORA)
    ids = sample_ids(tokenizer)
    assert torch.allclose(logits(exported, ids), logits(adapted, ids), atol=1e-5)
    assert not torch.allclose(logits(exported, ids), logits(runs["base"], ids), atol=1e-2)  # the adapter mattered


def test_qlora_model_is_dequantized_and_merged(runs, tokenizer):
    out = export_mod.export(runs_dir() / BASE, runs["tmp"] / "qlora", adapter_path=runs_dir() / QLORA, quantize=True)
    exported, _ = export_mod.load_hf(out)
    four_bit, _ = loading.load_for_inference(runs_dir() / BASE, runs_dir() / QLORA, quantize=True)
    ids = sample_ids(tokenizer)
    assert torch.allclose(logits(exported, ids), logits(four_bit, ids), atol=1e-4)
    # a 4-bit model without an adapter exports its dequantized weights
    out = export_mod.export(runs_dir() / BASE, runs["tmp"] / "nf4", quantize=True)
    nf4_only, _ = loading.load_for_inference(runs_dir() / BASE, quantize=True)
    assert torch.allclose(logits(export_mod.load_hf(out)[0], ids), logits(nf4_only, ids), atol=1e-4)


# ---- config.json and generation_config.json ------------------------------------------------------


def test_config_keys_are_consistent_with_the_model(runs, tokenizer):
    out = export_mod.export(runs_dir() / SFT, runs["tmp"] / "hf")
    config = json.loads((out / "config.json").read_text())
    cfg = runs["sft"].cfg
    assert CONFIG_KEYS <= set(config)
    assert config["architectures"] == ["Gemma2ForCausalLM"] and config["model_type"] == "gemma2"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (cfg.d_model, cfg.d_ff, cfg.n_layers)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
    assert config["vocab_size"] == cfg.vocab_size and config["max_position_embeddings"] == cfg.context_len
    assert config["sliding_window"] == cfg.sliding_window and config["query_pre_attn_scalar"] == cfg.query_pre_attn_scalar
    assert config["attn_logit_softcapping"] == 50.0 and config["final_logit_softcapping"] == 30.0
    assert config["hidden_activation"] == config["hidden_act"] == "gelu_pytorch_tanh"
    assert config["tie_word_embeddings"] is True and config["attention_bias"] is False
    assert config["layer_types"] == ["sliding_attention", "full_attention"]  # a window on layers 0, 2, ...
    assert config["hidden_size"] % config["num_attention_heads"] == 0  # recent transformers insist
    specials = tokenizer.special_tokens
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (specials["<bos>"], specials["<eos>"], specials["<pad>"])
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [specials["<end_of_turn>"], specials["<eos>"]]  # a chat reply stops at either
    # and back: the config rebuilds the same model
    back = export_mod.model_config_from_hf(config)
    assert {k: v for k, v in vars(back).items() if k != "attn_impl"} == {k: v for k, v in vars(cfg).items() if k != "attn_impl"}


def test_switched_off_soft_caps_and_window(tokenizer):
    cfg = toy_model(tokenizer, 0).cfg
    cfg.attn_softcap, cfg.final_softcap, cfg.sliding_window = 0.0, 0.0, 0
    config = export_mod.hf_config(cfg, tokenizer)
    assert config["attn_logit_softcapping"] is None and config["final_logit_softcapping"] is None  # None = off there
    assert config["sliding_window"] == cfg.context_len  # a window as long as the context is no window


# ---- tokenizer.json ------------------------------------------------------------------------------


def test_bytes_to_unicode_table():
    table = export_mod.bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256  # one character per byte, no two alike
    assert table[ord("a")] == "a" and table[ord("!")] == "!" and table[0xE9] == "é"  # visible bytes stand for themselves
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[0] == "Ā"  # the others: 256, 257, ...
    assert all(not c.isspace() and c.isprintable() for c in table.values())


def test_tokenizer_json_lists_every_token_and_merge(runs, tokenizer):
    out = export_mod.export(runs_dir() / SFT, runs["tmp"] / "hf")
    data = json.loads((out / "tokenizer.json").read_text())
    table = export_mod.bytes_to_unicode()
    vocab = data["model"]["vocab"]
    assert data["model"]["type"] == "BPE" and len(vocab) == tokenizer.vocab_size
    specials = {t["content"]: t["id"] for t in data["added_tokens"]}
    assert specials == tokenizer.special_tokens and all(t["special"] for t in data["added_tokens"])
    for token_id, token in tokenizer.vocab.items():
        name = token.decode() if token_id in specials.values() else "".join(table[b] for b in token)
        assert vocab[name] == token_id
    merges = data["model"]["merges"]
    assert len(merges) == len(tokenizer.merges)
    for merge, (a, b) in zip(merges, tokenizer.merges):  # in the order learned
        assert merge.split(" ") == ["".join(table[x] for x in a), "".join(table[x] for x in b)]
    assert data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == tokenizer.pattern
    assert export_mod.tokenizer_from_json(data).fingerprint() == tokenizer.fingerprint()


def replay_tokenizers_pipeline(data: dict, text: str) -> list[int]:
    """What the `tokenizers` library does with this tokenizer.json, written from the file alone:
    cut out added tokens (longest first), split with the regex, spell bytes with the byte table,
    then BPE: merge the pair of lowest rank (earliest merge) until none applies, look tokens up."""
    vocab, ranks = data["model"]["vocab"], {tuple(m.split(" ")): r for r, m in enumerate(data["model"]["merges"])}
    added = sorted((t["content"] for t in data["added_tokens"]), key=len, reverse=True)
    split = regex.compile(data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"])
    table = export_mod.bytes_to_unicode()
    ids: list[int] = []
    for part in regex.split("(" + "|".join(regex.escape(a) for a in added) + ")", text):
        if part in added:
            ids.append(vocab[part])
            continue
        for piece in split.findall(part):
            symbols = [table[b] for b in piece.encode("utf-8")]
            while len(symbols) > 1:
                rank, i = min((ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])))
                if rank == float("inf"):
                    break
                symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
            ids += [vocab[s] for s in symbols]
    return ids


def test_tokenizer_json_gives_our_ids(tokenizer):
    data = export_mod.tokenizer_json(tokenizer)
    for text in TEXTS + [CORPUS]:
        assert replay_tokenizers_pipeline(data, text) == tokenizer.encode(text), text
    # the post-processor puts <bos> in front, as lesson 2 starts every story
    assert data["post_processor"]["special_tokens"]["<bos>"]["ids"] == [tokenizer.special_tokens["<bos>"]]


# ---- tokenizer_config.json: the chat template ----------------------------------------------------


def render_template(template: str, messages, add_generation_prompt: bool = False) -> str:
    """Render a chat template as transformers does (jinja2 comes with flask, one of our dependencies)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def test_chat_template_renders_what_chat_format_renders(runs, tokenizer):
    out = export_mod.export(runs_dir() / SFT, runs["tmp"] / "hf")
    config = json.loads((out / "tokenizer_config.json").read_text())
    template = config["chat_template"]
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<bos>", "<eos>", "<pad>")
    for conv in CONVERSATIONS:
        ids, _ = chat_format.render_conversation(conv, tokenizer)
        text = render_template(template, conv)
        assert text == tokenizer.decode(ids)
        assert tokenizer.encode(text) == ids  # the rendered string tokenizes back to the same ids
        head = conv if conv[-1]["role"] == "user" else conv[:-1]
        prompt = render_template(template, head, add_generation_prompt=True)
        assert tokenizer.encode(prompt) == chat_format.render_prompt(head, tokenizer)
    # conversations the chat format refuses, the template refuses too
    from jinja2.exceptions import TemplateError

    for bad in ([{"role": "assistant", "content": "Hi"}], [{"role": "system", "content": "x"}],
                [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], []):
        with pytest.raises(ValueError):
            chat_format.render_conversation(bad, tokenizer)
        with pytest.raises(TemplateError):
            render_template(template, bad)


# ---- bad input -----------------------------------------------------------------------------------


def test_adapter_for_another_base_is_refused(runs, tokenizer):
    with pytest.raises(ValueError, match="another base"):
        export_mod.export(runs_dir() / SFT, runs["tmp"] / "x", adapter_path=runs_dir() / LORA)  # LORA was made for BASE
    assert not (runs["tmp"] / "x").exists()


def test_non_empty_output_folder_needs_force(runs, tokenizer):
    out = runs["tmp"] / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--force"):
        export_mod.export(runs_dir() / SFT, out)
    assert (out / "notes.txt").read_text() == "mine"  # untouched
    export_mod.export(runs_dir() / SFT, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(export_mod.FILES)  # replaced as a whole
    assert not list(runs["tmp"].glob(".hf.*"))  # no staging or old folder left beside it
    empty = runs["tmp"] / "empty"
    empty.mkdir()
    export_mod.export(runs_dir() / SFT, empty)  # an empty folder is fine without --force
    with pytest.raises(ValueError, match="holds"):  # --force never deletes the export's own inputs
        export_mod.export(runs_dir() / SFT, runs_dir(), force=True)
    assert (runs_dir() / SFT).is_file()


def test_checkpoint_that_is_not_ours_is_refused(runs, tokenizer):
    tmp = runs["tmp"]
    (tmp / "notes.pth").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(3)}, tmp / "other.pth")
    for path in (tmp / "notes.pth", tmp / "other.pth", runs_dir() / LORA):
        with pytest.raises(ValueError, match="checkpoint"):
            export_mod.export(path, tmp / "x")
    with pytest.raises(FileNotFoundError, match="make lesson-5"):
        export_mod.export(runs_dir() / "sft/full/default/checkpoints/missing.pth", tmp / "x")
    assert not (tmp / "x").exists()


def test_tokenizer_of_another_model_is_refused(runs):
    Tokenizer.train(CORPUS + " extra words", vocab_size=290, progress=False).save(runs["tmp"] / "other.json")
    with pytest.raises(ValueError, match="trained with tokenizer"):
        export_mod.export(runs_dir() / SFT, runs["tmp"] / "x", tokenizer_path=runs["tmp"] / "other.json")


def test_interrupted_export_leaves_no_folder(runs, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(export_mod, "save_file", killed)  # Ctrl-C while the weights are written
        export_mod.export(runs_dir() / SFT, runs["tmp"] / "hf")
    assert not (runs["tmp"] / "hf").exists()  # nothing that looks like a finished export
    export_mod.export(runs_dir() / SFT, runs["tmp"] / "hf")  # the next run cleans up and succeeds
    assert not (runs["tmp"] / ".hf.partial").exists()


def test_load_hf_refuses_what_it_cannot_read(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="nano.checkpoints.export"):
        export_mod.load_hf(tmp_path / "nothing")
    out = export_mod.export(runs_dir() / SFT, runs["tmp"] / "hf")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="gemma2"):
        export_mod.load_hf(out)
    three_layers = {**config, "num_hidden_layers": 3, "layer_types": ["sliding_attention", "full_attention"] * 2}
    (out / "config.json").write_text(json.dumps({**three_layers, "layer_types": three_layers["layer_types"][:3]}))
    with pytest.raises(ValueError, match="missing"):  # the weights hold 2 layers
        export_mod.load_hf(out)
    (out / "config.json").write_text(json.dumps(config))
    blob = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated"):
        export_mod.load_hf(out)


def test_command_line(runs, capsys):
    """Flags like every other command: --checkpoint_path, --out_dir (and the rest of export's arguments)."""
    out = runs["tmp"] / "cli"
    args = ["--checkpoint_path", str(runs_dir() / SFT), "--out_dir", str(out)]
    assert export_mod.main(args + ["--dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    assert "model.safetensors" in printed and "bfloat16" in printed
    assert export_mod.main(args) == 1  # exists now: refused, with the reason
    assert "--force" in capsys.readouterr().err
    assert export_mod.main(args + ["--force"]) == 0
    # no flags: lesson 5's model into runs/export/sft-full/, what `make all` exports
    assert export_mod.main([]) == 0
    assert (runs_dir() / "export" / "sft-full" / "model.safetensors").is_file()
    # another checkpoint has no default folder: --out_dir is asked for, not guessed
    with pytest.raises(SystemExit):
        export_mod.main(["--checkpoint_path", str(runs_dir() / SFT)])
    assert "--out_dir" in capsys.readouterr().err
