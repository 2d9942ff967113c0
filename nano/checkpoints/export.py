"""
Export: our trained model as a Hugging Face folder, so it can leave this project.

`transformers` loads a model from a folder of a few files; every production engine built around it
(vLLM, TGI, llama.cpp's GGUF converter) reads the same folder. Our model already computes what
Hugging Face's `Gemma2ForCausalLM` computes and names its weights the same way (nano/model/gemma.py), so
exporting is mostly writing things down in their format:

    config.json              the architecture and its numbers, under Hugging Face's names
    model.safetensors        the weights, "model." + our parameter names (nano/checkpoints/safetensors.py)
    generation_config.json   the stop tokens and the sampling defaults of our chat CLI
    tokenizer.json           our BPE in the `tokenizers` library's format: same ids on any text
    tokenizer_config.json    which tokens are special, and a chat template that renders exactly
                             what nano/text/chat_format.py renders

A LoRA adapter is merged into the weights first, and a 4-bit (NF4) model is dequantized: the folder
always holds one plain full-precision model (fp32 or bf16), which is what other tools expect.

`--format gguf` writes the same model as one GGUF file for llama.cpp instead (nano/checkpoints/gguf.py:
the format, and the names llama.cpp's Gemma-2 expects; `export_gguf` below).

    python -m nano.checkpoints.export                  # lesson 5's model -> runs/export/sft-full/
    python -m nano.checkpoints.export --checkpoint_path runs/pretrain/default/checkpoints/ckpt_best.pth \\
        --adapter_path runs/sft/peft/qlora/default/adapter.pth --quantize --out_dir runs/export/qlora
    model, tokenizer = load_hf("runs/export/sft-full")     # back into nano, no transformers needed
    python -m nano.checkpoints.export --format gguf    # lesson 5's model -> runs/export/sft-full.gguf

Lesson 13's doc shows how to load the folder in `transformers` and serve it with vLLM.
Tests: tests/test_13_export.py, tests/test_13_gguf.py; the checks against the real libraries:
bench/verify_hf_export.py, bench/verify_gguf_llamacpp.py.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from nano.common.config import parse_config
from nano.common.fileio import write_json
from nano.common.paths import SFT_CHECKPOINT, input_path, runs_dir, tokenizer_dir
from nano.text.chat_format import special_id
from nano.text.tokenizer import Tokenizer
from nano.model.gemma import GemmaNano, ModelConfig
from nano.model.lora import is_4bit, lora_layers, merge_lora
from nano.checkpoints.loading import load_for_inference
from nano.checkpoints.safetensors import load_file, read_header, save_file
from nano.checkpoints import gguf

HF_PREFIX = "model."  # Hugging Face nests the transformer under `model.`; the LM head (tied) has no tensor
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GGUF_DTYPES = {**EXPORT_DTYPES, "float16": torch.float16}  # llama.cpp computes with fp16 weights too
FORMATS = ("hf", "gguf")
HF_ACTIVATION = "gelu_pytorch_tanh"  # Hugging Face's name for GELU with the tanh approximation (our GeGLU's)
WEIGHTS_FILE = "model.safetensors"
FILES = ("config.json", "generation_config.json", WEIGHTS_FILE, "tokenizer.json", "tokenizer_config.json")

# the sampling defaults of our chat CLI (lessons/13_chat.py), so a tool that reads
# generation_config.json samples as `make lesson-13` does
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95, "max_new_tokens": 200}
EXPORT_DIR = "export/sft-full"  # under runs/: where `make all` exports lesson 5's model


# -----------------------------------------------------------------------------------------------
# 1. the model: checkpoint (+ adapter, + NF4) -> one full-precision GemmaNano


@torch.no_grad()
def dequantize_linears(model: nn.Module) -> nn.Module:
    """Replace every 4-bit linear layer by an nn.Linear holding its dequantized weight; returns the model.

    W_hat = code value * block scale (nano/model/nf4.py): the export stores the numbers the 4-bit model
    computed with, in full precision. (It does not undo the rounding: the original weights are gone.)
    """
    for name, module in list(model.named_modules()):
        if not is_4bit(module):
            continue
        weight = module.dequantize_weight(torch.float32)  # (out_features, in_features)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias.float())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model


def full_precision_model(
    checkpoint_path: str | Path, adapter_path: str | Path | None = None, quantize: bool = False
) -> tuple[GemmaNano, dict[str, Any]]:
    """The model to export: checkpoint -> (NF4 if `quantize`) -> adapter -> merged and dequantized, fp32.

    nano/checkpoints/loading.py does the first three steps exactly as evaluation and chat do (and refuses an
    adapter made for another base); it leaves a QLoRA adapter beside its 4-bit base, so here
    merge_lora dequantizes that base and folds the adapter in, and any 4-bit layer left (a model
    quantized without an adapter) is dequantized on its own.
    """
    model, info = load_for_inference(checkpoint_path, adapter_path, quantize=quantize)
    if not isinstance(model, GemmaNano):
        raise ValueError(f"{checkpoint_path} holds a {type(model).__name__}, not a GemmaNano language model")
    if lora_layers(model):
        merge_lora(model)  # W + (alpha / r) B A in fp32, 4-bit bases dequantized first
    dequantize_linears(model)
    model = model.float().eval().requires_grad_(False)
    left = list(lora_layers(model)) + [name for name, module in model.named_modules() if is_4bit(module)]
    if left:
        raise RuntimeError(f"layers {left[:3]} are still adapted or 4-bit after merging: cannot export them")
    return model, info


# -----------------------------------------------------------------------------------------------
# 2. config.json: our ModelConfig under Hugging Face's names


def _number(x: float) -> int | float:
    """Integral numbers as ints, as Hugging Face's configs write query_pre_attn_scalar or rope_theta.

    >>> _number(32.0), _number(0.5)
    (32, 0.5)
    """
    return int(x) if float(x).is_integer() else float(x)


def layer_types(cfg: ModelConfig) -> list[str]:
    """Gemma-2's alternation, named as Hugging Face names it: a window on layers 0, 2, 4, ..."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg.n_layers)]


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer, dtype: str = "float32") -> dict[str, Any]:
    """config.json for `Gemma2ForCausalLM`: each of our fields under its Hugging Face name.

    Our "off" switches become theirs: a soft-cap of 0 is None (no cap), and a sliding window of 0
    (every layer global) is a window as long as the context, which no query can look past anyway.
    """
    if cfg.d_model % cfg.n_heads != 0:
        # the model is still exported correctly (load_hf reads it back), but say it early
        warnings.warn(f"hidden_size {cfg.d_model} is not a multiple of num_attention_heads {cfg.n_heads}: recent "
                      "transformers versions refuse such a config even though head_dim is given separately")
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": HF_ACTIVATION,  # older transformers read this name,
        "hidden_activation": HF_ACTIVATION,  # newer ones this one
        "max_position_embeddings": cfg.context_len,
        "rope_theta": _number(cfg.rope_theta),
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "query_pre_attn_scalar": _number(cfg.query_pre_attn_scalar),
        "sliding_window": cfg.sliding_window if cfg.sliding_window > 0 else cfg.context_len,
        "layer_types": layer_types(cfg),
        "attn_logit_softcapping": float(cfg.attn_softcap) if cfg.attn_softcap > 0 else None,
        "final_logit_softcapping": float(cfg.final_softcap) if cfg.final_softcap > 0 else None,
        "tie_word_embeddings": True,
        "bos_token_id": special_id(tokenizer, "<bos>"),
        "eos_token_id": special_id(tokenizer, "<eos>"),
        "pad_token_id": special_id(tokenizer, "<pad>"),
        "use_cache": True,
        "torch_dtype": dtype,
    }


def model_config_from_hf(config: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """The inverse of hf_config, refusing a config our model cannot compute (another architecture)."""
    if config.get("model_type") != "gemma2":
        raise ValueError(f"{where} has model_type {config.get('model_type')!r}: only Gemma-2 (\"gemma2\") folders load into GemmaNano")
    try:
        cfg = ModelConfig(
            vocab_size=int(config["vocab_size"]), context_len=int(config["max_position_embeddings"]),
            d_model=int(config["hidden_size"]), n_layers=int(config["num_hidden_layers"]),
            n_heads=int(config["num_attention_heads"]), n_kv_heads=int(config["num_key_value_heads"]),
            head_dim=int(config["head_dim"]), d_ff=int(config["intermediate_size"]),
            sliding_window=int(config["sliding_window"]), query_pre_attn_scalar=float(config["query_pre_attn_scalar"]),
            attn_softcap=float(config.get("attn_logit_softcapping") or 0.0),
            final_softcap=float(config.get("final_logit_softcapping") or 0.0),
            rope_theta=float(config.get("rope_theta", 10000.0)), rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            initializer_range=float(config.get("initializer_range", 0.02)),
        )
    except KeyError as e:
        raise ValueError(f"{where} lacks the key {e.args[0]!r}: it was not written by nano.checkpoints.export (or is damaged)") from None
    activation = config.get("hidden_activation") or config.get("hidden_act")
    if activation != HF_ACTIVATION or config.get("tie_word_embeddings", True) is not True:
        raise ValueError(f"{where}: GemmaNano computes {HF_ACTIVATION} with tied embeddings; this config has "
                         f"{activation!r}, tie_word_embeddings={config.get('tie_word_embeddings')}")
    if "layer_types" in config and config["layer_types"] != layer_types(cfg):
        raise ValueError(f"{where}: layer_types {config['layer_types']} is not Gemma-2's alternation, which GemmaNano computes")
    return cfg


# -----------------------------------------------------------------------------------------------
# 3. the weights


def hf_state_dict(model: GemmaNano, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face's names, cast to `dtype`, in the model's order.

    layers.0.self_attn.q_proj.weight -> model.layers.0.self_attn.q_proj.weight. Linear weights are
    (out, in) in both. There is no lm_head.weight: the LM head is the embedding (tie_word_embeddings).
    """
    return {HF_PREFIX + name: tensor.detach().to(dtype).contiguous() for name, tensor in model.state_dict().items()}


# -----------------------------------------------------------------------------------------------
# 4. tokenizer.json in the `tokenizers` library's format


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table that writes every byte as one printable character: how byte-level BPE vocabularies
    spell their tokens in JSON (a token may be half a UTF-8 character, so it cannot be plain text).

    The 188 bytes that are visible characters in Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
    themselves; the other 68 (controls, space, 0x7f-0xa0, 0xad) get the characters 256, 257, ...
    in byte order. So b" the" is "Ġthe" (space = 0x20 is the 33rd such byte: chr(256 + 32)) and b"\\n" is "Ċ".
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in visible}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def token_string(token: bytes, table: dict[int, str] | None = None) -> str:
    """A token's bytes written with bytes_to_unicode (what tokenizer.json stores).

    >>> token_string(b" cat"), token_string(b"\\n\\n"), token_string("é".encode())   # é is two bytes
    ('Ġcat', 'ĊĊ', 'Ã©')
    """
    table = table or bytes_to_unicode()
    return "".join(table[b] for b in token)


def tokenizer_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """Our tokenizer as a `tokenizers` tokenizer.json: the same ids for any text.

    The pipeline `tokenizers` runs, and what each of our steps becomes in it:
      added_tokens     our special tokens: cut out of the text first, longest match first, as we do;
      pre_tokenizer    Split with our regex (each match is a pre-token, as our findall), then ByteLevel
                       to spell each pre-token's bytes with bytes_to_unicode (its own regex turned off);
      model            BPE: the vocabulary {token string: id} and the merges in the order learned
                       (the earliest merge is applied first, as in our encoder);
      post_processor   <bos> in front of a text, because lesson 2 starts every story with <bos>
                       (encode(text, add_special_tokens=False) gives exactly our ids);
      decoder          ByteLevel: characters back to bytes, bytes to UTF-8 text.
    """
    table = bytes_to_unicode()
    specials = tokenizer.special_tokens  # {"<pad>": 0, ...}
    vocab: dict[str, int] = {}
    for token_id in sorted(tokenizer.vocab):
        text = next((s for s, i in specials.items() if i == token_id), None)
        if text is None:
            text = token_string(tokenizer.vocab[token_id], table)
        if text in vocab:
            # two ids for one string: `tokenizers` can hold only one of them, so its ids would differ from ours
            raise ValueError(f"tokens {vocab[text]} and {token_id} are both {text!r}: the `tokenizers` format cannot "
                             "hold two tokens with the same bytes. Retrain the tokenizer (make lesson-1) with another vocab_size")
        vocab[text] = token_id
    merges = [f"{token_string(a, table)} {token_string(b, table)}" for a, b in tokenizer.merges]
    bos = special_id(tokenizer, "<bos>")
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for s, i in sorted(specials.items(), key=lambda item: item[1])
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<bos>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [bos], "tokens": ["<bos>"]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab,
            # "a b" (one space) is the form every `tokenizers` version reads; no token string holds a
            # real space, since bytes_to_unicode writes the byte 0x20 as "Ġ"
            "merges": merges,
        },
    }


def tokenizer_from_json(data: dict[str, Any], where: str = "tokenizer.json") -> Tokenizer:
    """The inverse of tokenizer_json: a `tokenizers` byte-level BPE file -> our Tokenizer."""
    try:
        model = data["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"{where}: model type {model.get('type')!r}; only byte-level BPE is supported")
        split = next(p for p in data["pre_tokenizer"]["pretokenizers"] if p["type"] == "Split")
        pattern = split["pattern"]["Regex"]
        specials = {t["content"]: int(t["id"]) for t in data["added_tokens"] if t.get("special")}
        char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
        vocab: dict[int, bytes] = {}
        for text, token_id in model["vocab"].items():
            if text in specials:
                vocab[int(token_id)] = text.encode("utf-8")
            else:
                vocab[int(token_id)] = bytes(char_to_byte[c] for c in text)
        ids = model["vocab"]
        pairs = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        merges = [(ids[a], ids[b]) for a, b in pairs]
    except (KeyError, TypeError, StopIteration, ValueError) as e:
        if isinstance(e, ValueError) and str(e).startswith(where):
            raise
        raise ValueError(f"{where} is not a byte-level BPE tokenizer as nano.checkpoints.export writes it ({type(e).__name__}: {e})") from None
    return Tokenizer(vocab, merges, specials, pattern)


# -----------------------------------------------------------------------------------------------
# 5. tokenizer_config.json and the chat template

# A Jinja template (what `tokenizer.apply_chat_template` and vLLM's chat endpoint run) that writes
# exactly the text nano/text/chat_format.py renders: <bos>, then per turn
# "<start_of_turn>{user|model}\n{content}<end_of_turn>\n", a system message folded into the first
# user turn after a blank line, and "<start_of_turn>model\n" when a reply is wanted. Conversations
# render_conversation refuses (roles out of order, a system message later on) are refused too.
# Every tag trims the whitespace around it ({%- -%}), so the line breaks here are not output.
CHAT_TEMPLATE = "\n".join([
    "{%- if messages | length == 0 -%}{{ raise_exception('empty conversation') }}{%- endif -%}",
    "{%- if messages[0]['role'] == 'system' -%}",
    "{%- if messages | length < 2 or messages[1]['role'] != 'user' -%}"
    "{{ raise_exception('a system message must be followed by a user message') }}{%- endif -%}",
    "{%- set turns = [{'role': 'user', 'content': messages[0]['content'] + '\\n\\n' + messages[1]['content']}] + messages[2:] -%}",
    "{%- else -%}{%- set turns = messages -%}{%- endif -%}",
    "<bos>",
    "{%- for message in turns -%}",
    "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
    "{{ raise_exception('a conversation starts with the user and then alternates user / assistant "
    "(a system message may only come first)') }}{%- endif -%}",
    "{%- if message['content'] is not string -%}{{ raise_exception('message content must be a string') }}{%- endif -%}",
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\\n' + message['content'] + '<end_of_turn>\\n' }}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}",
    "{%- if turns[-1]['role'] != 'user' -%}{{ raise_exception('a reply is asked for after a user message only') }}{%- endif -%}",
    "{{ '<start_of_turn>model\\n' }}",
    "{%- endif -%}",
])


def tokenizer_config(tokenizer: Tokenizer, context_len: int) -> dict[str, Any]:
    """tokenizer_config.json: which tokens play which role, the context length and the chat template."""
    named = {"<bos>": "bos_token", "<eos>": "eos_token", "<pad>": "pad_token"}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # reads tokenizer.json as it is
        "model_max_length": context_len,
        "clean_up_tokenization_spaces": False,  # our decode gives the text back byte for byte
        "add_bos_token": True,
        "add_eos_token": False,
        "additional_special_tokens": [s for s in tokenizer.special_tokens if s not in named],
        "chat_template": CHAT_TEMPLATE,
    }
    for token, role in named.items():
        special_id(tokenizer, token)  # a clear error if the tokenizer lacks it
        config[role] = token
    config["added_tokens_decoder"] = {
        str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for s, i in sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    }
    return config


def generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """generation_config.json: a reply ends at <end_of_turn> (chat) or <eos> (a story), as in our chat CLI."""
    return {
        "bos_token_id": special_id(tokenizer, "<bos>"),
        "eos_token_id": [special_id(tokenizer, "<end_of_turn>"), special_id(tokenizer, "<eos>")],
        "pad_token_id": special_id(tokenizer, "<pad>"),
        **SAMPLING_DEFAULTS,
    }


# -----------------------------------------------------------------------------------------------
# 6. the folder: write it, read it back


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _export_inputs(checkpoint_path: str | Path, adapter_path: str | Path | None,
                   tokenizer_path: str | Path | None) -> tuple[Path, Path, list[Path]]:
    """The checkpoint and the tokenizer (by default lesson 1's) as paths, and every file the export
    reads: what its output must never replace."""
    checkpoint_path = Path(checkpoint_path)
    tokenizer_path = Path(tokenizer_path) if tokenizer_path else tokenizer_dir() / "tokenizer.json"
    return checkpoint_path, tokenizer_path, [checkpoint_path, tokenizer_path] + ([Path(adapter_path)] if adapter_path else [])


def _check_out_dir(out_dir: Path, force: bool, inputs: Sequence[Path]) -> None:
    """Refuse to overwrite anything by accident: a non-empty folder needs --force, and even then not
    a folder that holds the export's own inputs or a git repository."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is a file: pick a folder name for the export")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not force:
        raise ValueError(f"{out_dir} exists and is not empty: pick a new folder, or pass --force to replace it")
    for path in inputs:
        if _inside(path, out_dir):
            raise ValueError(f"refusing to replace {out_dir}: it holds {path}, which this export reads")
    if (out_dir / ".git").exists():
        raise ValueError(f"refusing to replace {out_dir}: it is a git repository")


def model_and_tokenizer(checkpoint_path: Path, adapter_path: str | Path | None, quantize: bool,
                        tokenizer_path: Path) -> tuple[GemmaNano, Tokenizer]:
    """The model to export (full_precision_model) and the tokenizer it was trained with, checked."""
    model, info = full_precision_model(checkpoint_path, adapter_path, quantize)
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"no tokenizer at {tokenizer_path} — run `make lesson-1` first (or pass --tokenizer_path)")
    tokenizer = Tokenizer.load(tokenizer_path)
    expected = info.get("tokenizer_fingerprint")
    if expected is not None and tokenizer.fingerprint() != expected:
        raise ValueError(f"{checkpoint_path} was trained with tokenizer {expected}, but {tokenizer_path} is "
                         f"{tokenizer.fingerprint()}: pass the tokenizer it was trained with (--tokenizer_path)")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.cfg.vocab_size} rows of embedding")
    return model, tokenizer


def export(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    adapter_path: str | Path | None = None,
    quantize: bool = False,
    dtype: str = "float32",
    force: bool = False,
    tokenizer_path: str | Path | None = None,
) -> Path:
    """Write the Hugging Face folder for a checkpoint (+ adapter); returns the folder.

    The folder appears whole or not at all: the files are written into a hidden sibling folder
    (".NAME.partial"), which is renamed to NAME at the end. An interrupted export leaves only the
    hidden folder, removed by the next export; with --force the old NAME is replaced in one rename.
    """
    if dtype not in EXPORT_DTYPES:
        hint = " (float16 is for --format gguf)" if dtype in GGUF_DTYPES else ""
        raise ValueError(f"--dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}{hint}")
    out_dir = Path(out_dir)
    checkpoint_path, tokenizer_path, inputs = _export_inputs(checkpoint_path, adapter_path, tokenizer_path)
    _check_out_dir(out_dir, force, inputs)

    # 1. the model, merged and dequantized; the tokenizer it was trained with
    model, tokenizer = model_and_tokenizer(checkpoint_path, adapter_path, quantize, tokenizer_path)
    cfg = model.cfg

    # 2. every file into the hidden folder
    staging = out_dir.parent / f".{out_dir.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted export
    staging.mkdir(parents=True)
    write_json(staging / "config.json", hf_config(cfg, tokenizer, dtype))
    write_json(staging / "generation_config.json", generation_config(tokenizer))
    metadata = {"format": "pt", "source": "nano.checkpoints.export", "checkpoint": str(checkpoint_path),
                "adapter": str(adapter_path or ""), "tokenizer_fingerprint": tokenizer.fingerprint()}
    save_file(hf_state_dict(model, EXPORT_DTYPES[dtype]), staging / WEIGHTS_FILE, metadata)
    write_json(staging / "tokenizer.json", tokenizer_json(tokenizer))
    write_json(staging / "tokenizer_config.json", tokenizer_config(tokenizer, cfg.context_len))

    # 3. the hidden folder becomes OUT_DIR (the old one, if --force, is moved aside and removed)
    old = out_dir.parent / f".{out_dir.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    if old.exists():
        shutil.rmtree(old)
    return out_dir


def load_hf(folder: str | Path, device: str = "cpu") -> tuple[GemmaNano, Tokenizer]:
    """Read an exported folder back into our model (fp32, eval mode) and tokenizer; no transformers needed."""
    folder = Path(folder)
    missing = [name for name in ("config.json", WEIGHTS_FILE, "tokenizer.json") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} has no {', '.join(missing)}: export a model there first (python -m nano.checkpoints.export --checkpoint_path CHECKPOINT --out_dir {folder})")
    cfg = model_config_from_hf(json.loads((folder / "config.json").read_text(encoding="utf-8")), str(folder / "config.json"))
    model = GemmaNano(cfg)
    tensors = load_file(folder / WEIGHTS_FILE)
    expected = {HF_PREFIX + name: tensor for name, tensor in model.state_dict().items()}
    unknown, absent = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
    if unknown or absent:
        raise ValueError(f"{folder / WEIGHTS_FILE} does not fit the model of its config.json: "
                         f"unexpected {unknown[:3]}, missing {absent[:3]}")
    state = {}
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{folder / WEIGHTS_FILE}: {name} is {tuple(tensor.shape)}, config.json says {tuple(expected[name].shape)}")
        state[name[len(HF_PREFIX):]] = tensor.float()
    model.load_state_dict(state)
    tokenizer = tokenizer_from_json(json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")), str(folder / "tokenizer.json"))
    return model.to(device).eval(), tokenizer


# -----------------------------------------------------------------------------------------------
# 7. one GGUF file for llama.cpp


def export_gguf(
    checkpoint_path: str | Path,
    out: str | Path,
    adapter_path: str | Path | None = None,
    quantize: bool = False,
    dtype: str = "float32",
    force: bool = False,
    tokenizer_path: str | Path | None = None,
) -> Path:
    """Write the checkpoint (+ adapter, merged; NF4 dequantized) as one GGUF file; returns its path.

    The same model as the Hugging Face folder, under llama.cpp's names (nano/checkpoints/gguf.py): the
    config as gemma2.* keys, the weights as blk.N.* tensors with every norm weight + 1, our BPE as
    tokenizer.ggml.*, the chat template. Written atomically: NAME.tmp, renamed to NAME at the end.
    """
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(GGUF_DTYPES)}, got {dtype!r}")
    out = Path(out)
    checkpoint_path, tokenizer_path, inputs = _export_inputs(checkpoint_path, adapter_path, tokenizer_path)
    if out.is_dir():
        raise ValueError(f"{out} is a folder: a GGUF export is one file, name it (e.g. {out / 'model.gguf'})")
    if out.exists() and not force:
        raise ValueError(f"{out} exists: pick a new name, or pass --force to replace it")
    if any(_inside(path, out) for path in inputs):
        raise ValueError(f"refusing to replace {out}: it is one of this export's inputs")

    model, tokenizer = model_and_tokenizer(checkpoint_path, adapter_path, quantize, tokenizer_path)
    gguf.check_llamacpp_can_run(model.cfg)  # before writing: a config llama.cpp would compute otherwise
    bpe = tokenizer_json(tokenizer)["model"]  # token strings (GPT-2's byte table) and "a b" merges, checked
    token_strings = [text for text, _ in sorted(bpe["vocab"].items(), key=lambda item: item[1])]
    metadata = {
        **gguf.gemma2_metadata(model.cfg, dtype, name=out.stem),
        **gguf.tokenizer_metadata(tokenizer, token_strings, bpe["merges"], model.cfg.vocab_size, CHAT_TEMPLATE),
    }
    tensors = gguf.gemma2_tensors(model.state_dict(), GGUF_DTYPES[dtype])
    return gguf.write_gguf(out, metadata, tensors)


# -----------------------------------------------------------------------------------------------
# the command line


@dataclass
class ExportConfig:
    checkpoint_path: str = field(default="", metadata={"help": f"the nano checkpoint to export (default runs/{SFT_CHECKPOINT}: lesson 5's model)"})
    format: str = field(default="hf", metadata={"help": "hf: a Hugging Face folder; gguf: one file for llama.cpp", "choices": list(FORMATS)})
    out_dir: str = field(default="", metadata={"help": f"--format hf: the folder to write; it must not exist or be empty, unless --force (default runs/{EXPORT_DIR}, for lesson 5's model)"})
    out: str = field(default="", metadata={"help": f"--format gguf: the file to write (default runs/{EXPORT_DIR}.gguf, for lesson 5's model)"})
    adapter_path: str = field(default="", metadata={"help": "a LoRA/QLoRA adapter to merge into the weights"})
    quantize: bool = field(default=False, metadata={"help": "load the base in NF4 first, as lesson 7 trained a QLoRA adapter on it (the export is dequantized)"})
    dtype: str = field(default="float32", metadata={"help": "dtype of the stored weights (float16: gguf only)", "choices": sorted(GGUF_DTYPES)})
    force: bool = field(default=False, metadata={"help": "replace --out_dir / --out if it exists and is not empty"})
    tokenizer_path: str = field(default="", metadata={"help": "tokenizer.json of nano ('' = data/tokenizer/tokenizer.json)"})

    def __post_init__(self):
        # the default output is named after lesson 5's model: another checkpoint needs a name of its own
        if self.format == "hf" and self.out:
            raise ValueError("--out names a GGUF file: with --format hf, give --out_dir")
        if self.format == "gguf" and self.out_dir:
            raise ValueError("--out_dir names a folder: with --format gguf, give --out (a .gguf file)")
        if self.checkpoint_path and not (self.out_dir or self.out):
            flag = "--out" if self.format == "gguf" else "--out_dir"
            raise ValueError(f"{flag}: say where to write the export of --checkpoint_path")


def main(argv: Sequence[str] | None = None) -> int:
    """python -m nano.checkpoints.export [--checkpoint_path CKPT --out_dir DIR] [--adapter_path ...] [--force]
    python -m nano.checkpoints.export --format gguf [--checkpoint_path CKPT --out FILE.gguf] [...]"""
    cfg = parse_config(ExportConfig, argv)
    checkpoint = input_path(cfg.checkpoint_path, SFT_CHECKPOINT)
    if cfg.format == "gguf":
        out = Path(cfg.out) if cfg.out else runs_dir() / f"{EXPORT_DIR}.gguf"
        try:
            out = export_gguf(checkpoint, out, cfg.adapter_path or None, cfg.quantize, cfg.dtype, cfg.force,
                              cfg.tokenizer_path or None)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        info = gguf.read_gguf(out)
        num_params = sum(torch.Size(t.shape).numel() for t in info.tensors.values())
        print(f"exported {num_params:,} parameters ({cfg.dtype}; norms float32) to {out}: {out.stat().st_size:,} bytes, "
              f"{len(info.tensors)} tensors, {len(info.metadata)} metadata keys")
        print(f"run it with llama.cpp: llama-cli -m {out}   (lesson 13's doc, section 6)")
        return 0
    out_dir = Path(cfg.out_dir) if cfg.out_dir else runs_dir() / EXPORT_DIR
    try:
        out = export(checkpoint, out_dir, cfg.adapter_path or None, cfg.quantize, cfg.dtype, cfg.force,
                     cfg.tokenizer_path or None)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    header = read_header(out / WEIGHTS_FILE)
    num_params = sum(torch.Size(e["shape"]).numel() for name, e in header.items() if name != "__metadata__")
    print(f"exported {num_params:,} parameters ({cfg.dtype}) to {out}/")
    for name in FILES:
        print(f"  {name:24s} {(out / name).stat().st_size:>12,} bytes")
    print("load it with transformers: AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
