"""
Exercise (lesson 13): the chat CLI, lessons/13_chat.py, and the loader it shares, nano/checkpoints/loading.py.

Implement
  - `load_for_inference(checkpoint, adapter_path, quantize)`: the checkpoint's model, NF4-quantized
    when asked, with a LoRA adapter on top that was made for exactly these weights (another base is
    refused with a message saying so); a missing checkpoint names the lesson that makes it,
  - `ChatSession.reply(message, write)`: stream a reply and keep the KV cache for the next turn,
    feeding only the new turn's tokens, so that a cached conversation gives the same greedy reply as
    recomputing the whole conversation; Ctrl-C forgets the cancelled turn; a full context drops the
    oldest turns,
  - `main(["--prompt", "..."])`: print one answer and return (what `make all` runs).

Everything runs on a toy model (width 32, 2 layers) with a tokenizer trained in the test on a small
string, saved where the lessons look for them (the nano_dirs fixture points data/ and runs/ at tmp).
Its text is nonsense; what is checked is that the right model, cache and tokens are used.
"""

import copy

import pytest
import torch

from adapters import impl
from conftest import load_lesson
from toy_models import BASE, CORPUS, LORA, SFT, save_lora, save_toy_runs, toy_model

loading = impl("loading")
generate_mod = impl("generate")
chat_format = impl("chat_format")

from nano.common.paths import runs_dir  # noqa: E402
from nano.text.tokenizer import Tokenizer  # noqa: E402

chat = load_lesson("13_chat")

@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CORPUS, vocab_size=300, progress=False)


@pytest.fixture
def runs(nano_dirs, tokenizer):
    """data/tokenizer/tokenizer.json, a base checkpoint, a full-SFT checkpoint and a LoRA adapter."""
    return save_toy_runs(tokenizer)


def last_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0, -1]


# ---- the loader ----------------------------------------------------------------------------------


def test_load_for_inference_plain_adapter_and_quantized(runs, tokenizer):
    ids = tokenizer.encode("Once upon a time")
    model, info = loading.load_for_inference(runs_dir() / BASE)
    assert not model.training and info["step"] == 7 and info["tokenizer_fingerprint"] == tokenizer.fingerprint()
    assert torch.allclose(last_logits(model, ids), last_logits(runs["base"], ids))

    # the adapter is applied (merged into W: the same outputs as the live LoRA branch)
    with_lora, info = loading.load_for_inference(runs_dir() / BASE, runs_dir() / LORA)
    assert info["adapter"]["config"]["r"] == 2
    assert torch.allclose(last_logits(with_lora, ids), last_logits(runs["lora"], ids), atol=1e-5)
    assert not torch.allclose(last_logits(with_lora, ids), last_logits(runs["base"], ids), atol=1e-3)

    # --quantize: every projection becomes a 4-bit layer, outputs near (not equal to) fp32
    from nano.model.nf4 import Linear4bit, quantize_model

    quantized, info = loading.load_for_inference(runs_dir() / BASE, quantize=True)
    assert info["quantized"] and sum(isinstance(m, Linear4bit) for m in quantized.modules()) == 2 * 7
    reference = quantize_model(copy.deepcopy(runs["base"]), double_quant=True)
    assert torch.allclose(last_logits(quantized, ids), last_logits(reference, ids), atol=1e-5)


def test_qlora_adapter_on_the_quantized_base(runs, tokenizer):
    adapted = save_lora(runs["base"], "sft/peft/qlora/default/adapter.pth", quantize=True)
    model, info = loading.load_for_inference(runs_dir() / BASE, runs_dir() / "sft/peft/qlora/default/adapter.pth",
                                             quantize=True)
    ids = tokenizer.encode("The cat")
    assert torch.allclose(last_logits(model, ids), last_logits(adapted, ids), atol=1e-5)
    # merge_4bit (what lesson 12 evaluates): dequantized and merged once, the same logits bit for bit
    merged, info = loading.load_for_inference(runs_dir() / BASE, runs_dir() / "sft/peft/qlora/default/adapter.pth",
                                              quantize=True, merge_4bit=True)
    assert "dequantized and merged" in info["description"]
    assert not any(hasattr(m, "dequantize_weight") for m in merged.modules())  # plain nn.Linear layers now
    batch = torch.tensor([ids, ids[::-1]])
    with torch.no_grad():
        assert torch.equal(merged(batch)[0], model(batch)[0])


def test_adapter_for_another_base_is_refused(runs, tokenizer):
    other = toy_model(tokenizer, seed=5)  # same shapes, other weights
    save_lora(other, "elsewhere/adapter.pth")
    with pytest.raises(ValueError, match="made for another base model"):
        loading.load_for_inference(runs_dir() / BASE, runs_dir() / "elsewhere/adapter.pth")
    # and through the CLI, with the same message
    with pytest.raises(ValueError, match="made for another base model"):
        chat.main(["--adapter_path", str(runs_dir() / "elsewhere/adapter.pth"), "--prompt", "hi"])


def test_missing_checkpoint_says_which_lesson(nano_dirs):
    with pytest.raises(FileNotFoundError, match="make lesson-5"):
        chat.main(["--checkpoint_path", str(runs_dir() / SFT), "--prompt", "hi"])
    with pytest.raises(FileNotFoundError, match="make lesson-4"):
        loading.load_for_inference(runs_dir() / BASE)
    # no chat model at all: the default says what to train
    with pytest.raises(FileNotFoundError, match="make lesson-5"):
        chat.main(["--prompt", "hi"])


def test_missing_adapter_says_which_lesson(runs):
    with pytest.raises(FileNotFoundError, match="make lesson-6"):
        loading.load_for_inference(runs_dir() / BASE, runs_dir() / "sft/peft/lora/nope/adapter.pth")


# ---- one-shot mode -------------------------------------------------------------------------------


def greedy_reply(model, tokenizer, message, max_new_tokens):
    prompt = chat_format.render_prompt([{"role": "user", "content": message}], tokenizer)
    stops = chat_format.stop_token_ids(tokenizer)
    return chat_format.decode_reply(generate_mod.generate(model, prompt, max_new_tokens, stop_tokens=stops), tokenizer)


def test_one_shot_prints_the_answer_of_the_default_chat_model(runs, tokenizer, capsys):
    chat.main(["--prompt", "Write a story about a cat.", "--temperature", "0", "--max_new_tokens", "12"])
    out, err = capsys.readouterr()
    # stdout is the answer alone: the full-SFT model's greedy reply; what was loaded goes to stderr
    assert out == greedy_reply(runs["sft"], tokenizer, "Write a story about a cat.", 12) + "\n"
    assert "sft-full" in err and "ChatConfig" in err


def test_one_shot_with_adapter_and_quantize_flags(runs, tokenizer, capsys):
    chat.main(["--checkpoint_path", str(runs_dir() / BASE), "--adapter_path", str(runs_dir() / LORA),
               "--prompt", "Hello", "--temperature", "0", "--max_new_tokens", "10"])
    out, err = capsys.readouterr()
    assert out == greedy_reply(runs["lora"], tokenizer, "Hello", 10) + "\n"
    assert "LoRA adapter" in err

    from nano.model.nf4 import quantize_model

    chat.main(["--checkpoint_path", str(runs_dir() / BASE), "--quantize", "--prompt", "Hello", "--temperature", "0",
               "--max_new_tokens", "10"])
    out, err = capsys.readouterr()
    quantized = quantize_model(copy.deepcopy(runs["base"]), double_quant=True).eval()
    assert out == greedy_reply(quantized, tokenizer, "Hello", 10) + "\n"
    assert "NF4" in err


def test_sampling_is_seeded(runs, capsys):
    answers = []
    for seed in (3, 3, 4):
        chat.main(["--prompt", "Hi", "--temperature", "1.0", "--seed", str(seed), "--max_new_tokens", "16"])
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0] != answers[2]


# ---- the conversation: one KV cache across turns -------------------------------------------------


def session(model, tokenizer, **overrides):
    cfg = chat.ChatConfig(temperature=0.0, max_new_tokens=8, repetition_stop=0, **overrides)
    return chat.ChatSession(model, tokenizer, cfg)


def test_next_turn_continues_the_chat_format(runs, tokenizer):
    s = session(runs["sft"], tokenizer)
    # as if the model had answered "Yo" and then chosen <end_of_turn>
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    full, _ = chat_format.render_conversation(conversation, tokenizer)
    s.history, s.ids = conversation, full[:-2]  # everything up to "Yo", then <end_of_turn> \n remain
    s.pending = tokenizer.special_tokens["<end_of_turn>"]
    nxt = chat_format.render_prompt(conversation + [{"role": "user", "content": "And?"}], tokenizer)
    assert s.ids + s.turn_ids("And?") == nxt
    # a reply that stopped on <eos> is closed with <end_of_turn>, as in training
    s.pending = tokenizer.special_tokens["<eos>"]
    assert s.ids + s.turn_ids("And?") == nxt


def test_cached_turns_equal_recomputing_the_whole_conversation(runs, tokenizer):
    s = session(runs["sft"], tokenizer)
    streamed = []
    first = s.reply("Tell me about the cat.", write=streamed.append)
    assert "".join(streamed) == first["text"] and s.cache.pos == len(s.ids)
    before = list(s.ids)
    second_ids = s.turn_ids("And the ball?")
    second = s.reply("And the ball?", write=lambda text: None)
    # only the new turn was fed; the greedy reply equals a no-cache run over the whole conversation
    assert second["prompt_tokens"] == len(second_ids) < len(before + second_ids)
    stops = chat_format.stop_token_ids(tokenizer)
    recomputed = generate_mod.generate(runs["sft"], before + second_ids, 8, stop_tokens=stops, use_cache=False)
    assert second["text"] == chat_format.decode_reply(recomputed, tokenizer)
    assert s.cache.pos == len(s.ids) and len(s.history) == 4


def test_ctrl_c_forgets_the_cancelled_turn(runs, tokenizer):
    s = session(runs["sft"], tokenizer)
    s.reply("Hi", write=lambda text: None)
    state = (s.cache.pos, list(s.ids), list(s.history), s.pending)

    def interrupt_after_three(text, count=[0]):
        count[0] += 1
        if count[0] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        s.reply("a long question", write=interrupt_after_three)
    assert (s.cache.pos, s.ids, s.history, s.pending) == state
    # the conversation goes on as if the cancelled turn never happened
    after = s.reply("Bye", write=lambda text: None)["text"]
    fresh = session(runs["sft"], tokenizer)
    fresh.reply("Hi", write=lambda text: None)
    assert after == fresh.reply("Bye", write=lambda text: None)["text"]


def test_full_context_drops_the_oldest_turns(tokenizer):
    model = toy_model(tokenizer, 1, context_len=64)
    s = session(model, tokenizer)
    notes = []
    for i in range(6):
        s.reply(f"Tell me about the cat number {i}.", write=lambda text: None, note=notes.append)
        assert s.cache.pos == len(s.ids) <= 64
    assert any("forgot" in n for n in notes)
    # after a drop the cache holds exactly the kept turns, re-encoded in the chat format, + the last reply
    kept_users = [m["content"] for m in s.history if m["role"] == "user"]
    assert kept_users[-1] == "Tell me about the cat number 5." and len(kept_users) < 6
    # a message that can never fit is refused with a clear message
    with pytest.raises(ValueError, match="shorten it"):
        s.reply("cat " * 200, write=lambda text: None)


def test_commands(runs, tokenizer, capsys):
    s = session(runs["sft"], tokenizer)
    s.reply("Hi", write=lambda text: None)
    assert chat.command(s, "/temp 0.7") and s.cfg.temperature == 0.7
    assert chat.command(s, "/temp -1") and s.cfg.temperature == 0.7  # refused, unchanged
    assert chat.command(s, "/top_p 0.9") and s.cfg.top_p == 0.9
    assert chat.command(s, "/reset") and s.cache.pos == 0 and s.history == [] and s.ids == []
    assert chat.command(s, "/help") and "/reset" in capsys.readouterr().out
    assert chat.command(s, "/nope") and "unknown command" in capsys.readouterr().out
    assert chat.command(s, "/quit") is False


def test_interactive_loop_reads_until_eof(runs, monkeypatch, capsys):
    lines = iter(["Hi", "/temp 0", "Again", "/reset"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None  # Ctrl-D

    monkeypatch.setattr("builtins.input", fake_input)
    chat.main(["--max_new_tokens", "5"])
    out = capsys.readouterr().out
    assert out.count("model> ") == 2 and "[temperature 0 (greedy)]" in out and "KV cache empty" in out
