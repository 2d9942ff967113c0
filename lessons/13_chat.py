"""
Lesson 13: chat with your model in the terminal. Tokens stream out as they are sampled, and the
conversation's KV cache lives on between turns, so each turn costs only its own new tokens.

    make lesson-13                                           # talk to the newest chat model
    python lessons/13_chat.py --prompt "Write a story about a cat."    # one answer, then exit
    python lessons/13_chat.py --temperature 0                # greedy: the same answer every time
    python lessons/13_chat.py --checkpoint_path runs/pretrain/default/checkpoints/ckpt_best.pth \\
        --adapter_path runs/sft/peft/qlora/default/adapter.pth --quantize   # the QLoRA model, 4-bit

Without --checkpoint_path it picks the newest stage that exists (PPO, GRPO, DPO, then full SFT,
LoRA, QLoRA; nano/checkpoints/loading.py: default_chat_stage) and says which. In the chat: /reset, /temp 0.7,
/top_k 40, /top_p 0.9, /help, /quit or Ctrl-D to leave; Ctrl-C stops the reply being written.
With --prompt only the answer goes to stdout (the rest to stderr), so `$(...)` captures just it.
The doc is lessons/13_chat.md; the decode benchmark is bench/bench_generate.py.
"""

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from nano.common.config import DEFAULT_SEED, THREADS_FOR_DECODING, parse_config, pick_device, print_config, set_threads, threads_field
from nano.common.paths import BASE_CHECKPOINT, input_path
from nano.text.chat_format import decode_reply, encode_text, render_prompt, special_id, stop_token_ids
from nano.model.generate import StreamDecoder, generate
from nano.checkpoints.checkpoint import load_tokenizer
from nano.checkpoints.loading import default_chat_stage, load_for_inference


@dataclass
class ChatConfig:
    checkpoint_path: str = field(default="", metadata={"help": "model to talk to ('' = the newest chat model under runs/)"})
    adapter_path: str = field(default="", metadata={"help": "LoRA/QLoRA adapter on top (without --checkpoint_path: on the base)"})
    quantize: bool = field(default=False, metadata={"help": "NF4-quantize the projections (4.1 bits a weight)"})
    prompt: str = field(default="", metadata={"help": "answer this one message and exit (no interactive chat)"})
    temperature: float = field(default=0.8, metadata={"help": "0 = greedy; < 1 sharper, > 1 wilder"})
    top_k: int = field(default=50, metadata={"help": "sample among the k likeliest tokens (0 = off)"})
    top_p: float = field(default=0.95, metadata={"help": "sample among the fewest tokens holding p of the probability (1 = off)"})
    max_new_tokens: int = field(default=200, metadata={"help": "longest reply in tokens"})
    repetition_stop: int = field(default=64, metadata={"help": "stop a reply whose last N tokens loop (0 = off)"})
    seed: int = field(default=DEFAULT_SEED, metadata={"help": "seed of turn 1 (turn t uses seed + t - 1); -1 = a new draw every run"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto"})
    threads: int = threads_field(THREADS_FOR_DECODING)  # decoding one token at a time is latency-bound


HELP = """commands:
  /reset        forget the conversation (empties the KV cache)
  /temp 0.7     set the temperature (0 = greedy)
  /top_k 40     keep the 40 likeliest tokens (0 = off)
  /top_p 0.9    keep the fewest tokens holding 90% of the probability (1 = off)
  /help         this text
  /quit         leave (or Ctrl-D); Ctrl-C stops the reply being written"""


class ChatSession:
    """A conversation with one KV cache that outlives each turn.

    The cache holds every token the model has read so far. A new turn feeds only what is new:

        (end of the last reply) <end_of_turn> \\n <start_of_turn>user\\n{message}<end_of_turn>\\n<start_of_turn>model\\n

    which is exactly what render_conversation would write for the whole history, so the model sees
    the training format. `generate` returns the reply's tokens; its last one (usually <end_of_turn>)
    was chosen but never fed, so it is `pending` and goes first into the next turn.

    When the next turn would not fit in the context, the oldest turns are dropped and the rest is
    re-encoded into a fresh cache (the one time a turn costs more than its own tokens).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, cfg: ChatConfig):
        if cfg.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {cfg.max_new_tokens}")
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.context_len = model.cfg.context_len
        self.stops = stop_token_ids(tokenizer)  # [<end_of_turn>, <eos>]
        self.end_of_turn = special_id(tokenizer, "<end_of_turn>")
        self.newline = encode_text(tokenizer, "\n")
        self.turns = 0
        self.reset()

    def reset(self) -> None:
        self.cache = self.model.new_kv_cache(1, self.context_len)
        self.history: list[dict] = []  # the messages so far, for re-encoding when the context is full
        self.ids: list[int] = []  # the tokens the cache holds (len(self.ids) == self.cache.pos)
        self.pending: int | None = None  # the last reply's final token, chosen but not yet fed

    def reply_room(self) -> int:
        """Cache positions kept free for a reply when a turn starts (the rest may hold history)."""
        return min(self.cfg.max_new_tokens, self.context_len // 4)

    def turn_ids(self, message: str) -> list[int]:
        """The tokens this turn adds to the cache (see the class docstring)."""
        user_turn = render_prompt([{"role": "user", "content": message}], self.tokenizer)  # <bos> ... model\n
        if not self.history:
            return user_turn
        # close the last reply as the chat format does: content <end_of_turn> \n. The pending token is
        # kept when it is content (the reply was cut by max_new_tokens); a stop token, <eos>
        # included, becomes <end_of_turn>, the token the format has there.
        closing = [] if self.pending in self.stops else [self.pending]
        return closing + [self.end_of_turn] + self.newline + user_turn[1:]  # no second <bos>

    def _make_room(self, message: str) -> tuple[list[int], str]:
        """Drop the oldest turns until the history + message fit; a fresh cache for the re-encoding."""
        history = list(self.history)
        room = self.context_len - self.reply_room()
        while True:
            ids = render_prompt(history + [{"role": "user", "content": message}], self.tokenizer)
            if len(ids) <= room or not history:
                break
            history = history[2:]  # one user turn and its reply
        if len(ids) > room:
            raise ValueError(f"this message is {len(ids)} tokens with the chat format; the model's context holds "
                             f"{self.context_len}, and {self.reply_room()} are kept for the reply — shorten it")
        dropped, kept = (len(self.history) - len(history)) // 2, len(history) // 2
        if kept:
            note = f"[context full: forgot the {dropped} oldest turn(s), re-encoded the last {kept} ({len(ids)} tokens)]"
        else:
            note = f"[context full: forgot the whole conversation ({dropped} turn(s)); this message starts a new one]"

        self.history, self.pending, self.ids = history, None, []
        self.cache = self.model.new_kv_cache(1, self.context_len)
        return ids, note

    def reply(self, message: str, write: Callable[[str], None], note: Callable[[str], None] = print) -> dict:
        """Answer `message`, streaming text through `write`; returns the reply and its speed.

        Ctrl-C (KeyboardInterrupt) while it writes: the session goes back to where it was before this
        turn (the cache position is simply rewound: later positions get overwritten), then re-raises.
        """
        saved = (self.cache, self.cache.pos, self.pending, list(self.history), list(self.ids))
        new_ids = self.turn_ids(message)
        if self.cache.pos + len(new_ids) + self.reply_room() > self.context_len:
            new_ids, message_note = self._make_room(message)
            note(message_note)
        decoder = StreamDecoder(self.tokenizer)  # holds back half a UTF-8 character until it is whole
        self.turns += 1
        seed = None if self.cfg.seed < 0 else self.cfg.seed + self.turns - 1
        start = time.perf_counter()
        try:
            tokens = generate(
                self.model, new_ids, max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                top_k=self.cfg.top_k or None, top_p=self.cfg.top_p if self.cfg.top_p < 1.0 else None,
                stop_tokens=self.stops, seed=seed, repetition_stop=self.cfg.repetition_stop,
                on_token=lambda token: write(decoder.feed(token)), kv_cache=self.cache,
            )
        except KeyboardInterrupt:
            write(decoder.flush())
            self.cache, position, self.pending, self.history, self.ids = saved
            self.cache.pos = position  # rewind: what the cancelled turn wrote past it is overwritten later
            raise
        seconds = time.perf_counter() - start
        write(decoder.flush())
        text = decode_reply(tokens, self.tokenizer)
        self.ids += new_ids + tokens[:-1]  # the last token was chosen, not fed: it is pending
        self.pending = tokens[-1]
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": text}]
        full = self.cache.pos + 1 >= self.context_len
        if full:
            note("\n[the context is full: the next message first forgets the oldest turns]")
        return {"text": text, "tokens": len(tokens), "prompt_tokens": len(new_ids), "seconds": seconds,
                "cache_tokens": self.cache.pos, "context_full": full}


def command(session: ChatSession, line: str) -> bool:
    """Run one /command; False means quit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    try:
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            session.reset()
            print("[conversation forgotten, KV cache empty]")
        elif name in ("/temp", "/temperature"):
            value = float(arg)
            if value < 0:
                raise ValueError
            session.cfg.temperature = value
            print(f"[temperature {value:g}{' (greedy)' if value == 0 else ''}]")
        elif name == "/top_k":
            value = int(arg)
            if value < 0:
                raise ValueError
            session.cfg.top_k = value
            print(f"[top_k {value}{' (off)' if value == 0 else ''}]")
        elif name == "/top_p":
            value = float(arg)
            if not 0 < value <= 1:
                raise ValueError
            session.cfg.top_p = value
            print(f"[top_p {value:g}{' (off)' if value == 1 else ''}]")
        elif name == "/help":
            print(HELP)
        else:
            print(f"unknown command {name} — /help lists them")
    except ValueError:
        print(f"{name} needs a number: /temp 0.7 (>= 0), /top_k 40 (>= 0), /top_p 0.9 (in (0, 1])")
    return True


def interactive(session: ChatSession) -> None:
    """The read-reply loop: a line in, a streamed reply out, until Ctrl-D or /quit."""
    print("Type a message and press Enter. /help lists the commands; Ctrl-D quits.\n")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:  # Ctrl-D
            print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: not a way out, say what is
            print("\n(Ctrl-D or /quit leaves)")
            continue
        if not line:
            continue
        if line.startswith("/"):
            if not command(session, line):
                return
            continue
        print("model> ", end="", flush=True)
        try:
            stats = session.reply(line, write=lambda text: print(text, end="", flush=True))
        except KeyboardInterrupt:
            print("\n[stopped: this turn is forgotten]")
            continue
        except ValueError as e:  # a message too long for the context
            print(f"\n[{e}]")
            continue
        print(f"\n{describe_speed(stats, session.context_len)}\n")


def describe_speed(stats: dict, context_len: int) -> str:
    """'[42 tokens in 0.35 s, 120 tokens/s; 97/256 positions of the KV cache used]'."""
    rate = stats["tokens"] / stats["seconds"] if stats["seconds"] > 0 else float("inf")
    return (f"[{stats['tokens']} tokens in {stats['seconds']:.2f} s, {rate:.0f} tokens/s; "
            f"{stats['cache_tokens']}/{context_len} positions of the KV cache used]")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ChatConfig, argv)
    one_shot = bool(cfg.prompt)
    # with --prompt, stdout carries the answer alone: everything else goes to stderr
    log = sys.stderr if one_shot else sys.stdout
    with contextlib.redirect_stdout(log):
        print_config(cfg)
    set_threads(cfg.threads)
    device = pick_device(cfg.device)

    # 1. the model: the one asked for, or the newest chat model there is
    if cfg.checkpoint_path or cfg.adapter_path:
        checkpoint = input_path(cfg.checkpoint_path, BASE_CHECKPOINT)
        model, info = load_for_inference(checkpoint, cfg.adapter_path or None, quantize=cfg.quantize, device=device)
        chosen = "as asked"
    else:
        stage = default_chat_stage()
        checkpoint, adapter = stage.paths()
        model, info = load_for_inference(checkpoint, adapter, quantize=cfg.quantize or stage.quantize, device=device)
        chosen = f"stage '{stage.name}', the newest chat model found; --checkpoint_path picks another"
    tokenizer = load_tokenizer(info["tokenizer_fingerprint"])
    print(f"model: {info['description']} ({chosen})", file=log)
    print(f"context {model.cfg.context_len} tokens, device {device}, {torch.get_num_threads()} CPU thread(s)", file=log)
    session = ChatSession(model, tokenizer, cfg)

    # 2. one answer, or a conversation
    if one_shot:
        stats = session.reply(cfg.prompt, write=lambda text: print(text, end="", flush=True),
                              note=lambda text: print(text, file=sys.stderr))
        print()
        print(describe_speed(stats, session.context_len), file=sys.stderr)
    else:
        interactive(session)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # bad input: one line that says what to do, no traceback
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C during loading or a one-shot answer
        sys.exit(130)
