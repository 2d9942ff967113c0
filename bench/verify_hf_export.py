"""
Check an export against the real Hugging Face libraries: transformers, tokenizers, safetensors.

The project does not depend on them (tests/test_13_export.py checks the round trip with our own
reader); this script is the one-off proof that the folder means to them what it means to us:

  1. transformers loads it as Gemma2ForCausalLM, and its logits equal ours (max |difference|),
     on sequences longer than the sliding window, and greedy decoding gives the same tokens;
  2. `tokenizers` gives our ids on varied text (stories, TinyMath, unicode, special tokens,
     whitespace runs, random characters, and every story of the validation set);
  3. the chat template renders the same string, and the same ids, as nano/text/chat_format.py;
  4. safetensors' own `safe_open` reads our file, tensor for tensor.

Run it in a separate environment that has those libraries (nothing here needs them installed):

    python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch transformers tokenizers safetensors
    /tmp/hfvenv/bin/python bench/verify_hf_export.py                   # the newest chat model it finds
    /tmp/hfvenv/bin/python bench/verify_hf_export.py --checkpoint runs/pretrain/default/checkpoints/ckpt_best.pth \\
        --adapter_path runs/sft/peft/qlora/default/adapter.pth --quantize

Without them it says so and exits 0.
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# text that exercises the pre-tokenizer's corners: contractions, digits, unicode letters and digits,
# emoji (4-byte UTF-8), runs of spaces / newlines / tabs, special tokens glued to text
EDGE_TEXTS = [
    "Once upon a time, there was a little cat named Tom. He's happy; they'll play, we've won, I'd go.",
    "Tom has 3 apples and gets 14 more. 3 + 14 = 17\n#### 17\n12345 * 678 = 8369910, 3.14159, -42, 1e10",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский текст, 中文字符, 日本語のテキスト, 한국어, عربى, हिन्दी",
    "digits of other scripts: ٣٤٥ ४२ ௫ ¹²³ ½ Ⅻ and emoji 😀🎉👍🏽 👨‍👩‍👧 🇫🇷",
    "spaces:  two,   three,    four\n\nblank line\n\n\nthree newlines\t\ttabs \t mixed \r\n crlf   \n  ",
    "<bos>story<eos><|endoftext|><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<end_of_turn><end_of_turn> <eos>x<eos > < eos> <|endoftext|>a<|endoftext|><|endoftext|>",
    "punctuation!!! ??? ... --- *** ((())) [[x]] {y} \"quoted\" 'single' `code` ~tilde~ @at #hash $5 %",
    "   leading spaces and trailing spaces   ",
    "\u00a0non-breaking\u00a0space, zero\u200bwidth, ideographic\u3000space, line\u2028separator, \x1c\x1d\x1e\x1f ctrl, \x85 nel, \x0b\x0c vt ff",
    "",
    " ",
    "\n",
]


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Random strings over a mixed alphabet: letters, digits, spaces, newlines, symbols, unicode."""
    rng = random.Random(seed)
    alphabet = list("abcdeXYZ 0123456789  \n\n\t.,!?'\"-") + ["é", "ß", "中", "😀", "<eos>", "'s", "  ", "\u00a0"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200))) for _ in range(count)]


def find_checkpoint() -> str:
    from nano.common.paths import runs_dir  # (NANO_RUNS_DIR, else the repository's runs/)

    for rel in ("sft/full/default/checkpoints/ckpt_best.pth", "pretrain/default/checkpoints/ckpt_best.pth"):
        if (runs_dir() / rel).is_file():
            return str(runs_dir() / rel)
    raise SystemExit("no checkpoint under runs/: run `make lesson-5` (or lesson-4) first, or pass --checkpoint")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="default: the full-SFT model, else the pretrained one")
    parser.add_argument("--adapter_path", default=None)
    parser.add_argument("--quantize", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=None, help="export folder (default: a temporary one)")
    args = parser.parse_args()
    try:
        import safetensors
        import tokenizers
        import transformers
        from safetensors import safe_open
    except ImportError as e:
        print(f"skipped: {e.name} is not installed here. This check needs transformers, tokenizers and safetensors, "
              "which the project itself never uses; install them in a separate venv (see this file's docstring).")
        return 0
    import torch

    from nano.text.chat_format import render_conversation, render_prompt
    from nano.checkpoints.export import export, full_precision_model
    from nano.common.fileio import read_jsonl
    from nano.checkpoints.safetensors import load_file

    torch.manual_seed(0)
    checkpoint = args.checkpoint or find_checkpoint()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "export"
    t0 = time.time()
    export(checkpoint, out, args.adapter_path, args.quantize, args.dtype, force=True)
    print(f"exported {checkpoint}{' + ' + args.adapter_path if args.adapter_path else ''} ({args.dtype}) to {out} "
          f"in {time.time() - t0:.1f} s; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"tokenizers {tokenizers.__version__}, safetensors {safetensors.__version__}")
    ours, _ = full_precision_model(checkpoint, args.adapter_path, args.quantize)
    from nano.text.tokenizer import Tokenizer
    from nano.common.paths import tokenizer_dir
    tok = Tokenizer.load(tokenizer_dir() / "tokenizer.json")
    failures = 0

    # 1. transformers: the class it builds, and the logits
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    print(f"\n1. transformers loads {type(hf).__name__} ({sum(p.numel() for p in hf.parameters()):,} parameters)")
    if args.dtype == "bfloat16":  # compare with our model holding the same bf16-rounded weights
        ours = ours.to(torch.bfloat16).float()
    stories = (ROOT / "data/raw/stories_val.txt").read_text(encoding="utf-8").split("<|endoftext|>")
    ctx = ours.cfg.context_len
    batch = []
    for story in stories[:8]:
        ids = [tok.special_tokens["<bos>"]] + tok.encode(story.strip())
        batch.append((ids * (ctx // len(ids) + 1))[:ctx])  # context_len tokens: longer than the window
    idx = torch.tensor(batch)
    with torch.no_grad():
        our_logits = ours(idx)[0]
        hf_logits = hf(idx).logits.float()
    diff = (our_logits - hf_logits).abs().max().item()
    same_argmax = (our_logits.argmax(-1) == hf_logits.argmax(-1)).float().mean().item()
    print(f"   logits on {idx.shape[0]} x {idx.shape[1]} tokens (window {ours.cfg.sliding_window}): max |ours - transformers| = {diff:.3g}, "
          f"|logits| up to {our_logits.abs().max().item():.1f}; same argmax at {same_argmax:.2%} of positions")
    failures += diff > 1e-3
    prompt = render_prompt([{"role": "user", "content": "Write a short story about a cat."}], tok)
    from nano.model.generate import generate
    our_new = generate(ours, prompt, max_new_tokens=48, temperature=0.0)
    hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False, eos_token_id=None)[0, len(prompt):].tolist()
    our_new = [int(t) for t in our_new][:48]
    print(f"   greedy, 48 new tokens after a chat prompt: {'same tokens' if hf_out[:len(our_new)] == our_new else 'DIFFERENT'}"
          f" ({tok.decode(our_new)[:70]!r}...)")
    failures += hf_out[:len(our_new)] != our_new

    # 1b. a trained model attends softly, so an off-by-one in the window or a missing soft-cap could
    # hide in the noise. A random model with 15x sharper queries and keys and random norm gains makes
    # every attention score count: a window one key longer changes its logits by ~1, not 1e-5.
    from nano.checkpoints.export import hf_config, hf_state_dict
    from nano.model.gemma import GemmaNano
    from nano.checkpoints.safetensors import save_file
    sharp = GemmaNano(ours.cfg).eval()
    with torch.no_grad():
        for name, p in sharp.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(15)
            if name.endswith("norm.weight"):
                p.normal_(0, 0.5)
    sharp_dir = out.parent / "sharp"
    sharp_dir.mkdir(exist_ok=True)
    (sharp_dir / "config.json").write_text(json.dumps(hf_config(sharp.cfg, tok)))
    save_file(hf_state_dict(sharp), sharp_dir / "model.safetensors", {"format": "pt"})
    hf_sharp = AutoModelForCausalLM.from_pretrained(sharp_dir, attn_implementation="eager", dtype=torch.float32).eval()
    random_ids = torch.randint(0, sharp.cfg.vocab_size, (4, ctx))
    with torch.no_grad():
        sharp_diff = (sharp(random_ids)[0] - hf_sharp(random_ids).logits).abs().max().item()
        for layer in sharp.layers[::2]:  # the window layers, one key wider
            layer.self_attn.window += 1
        off_by_one = (sharp(random_ids)[0] - hf_sharp(random_ids).logits).abs().max().item()
    print(f"   random model with sharp attention: max |ours - transformers| = {sharp_diff:.3g} "
          f"(with our window one key wider it would be {off_by_one:.3g})")
    failures += sharp_diff > 1e-3

    # 2. tokenizers: the ids of varied text
    from tokenizers import Tokenizer as HFTokenizer
    hf_tok = HFTokenizer.from_file(str(out / "tokenizer.json"))
    math = [json.loads(line)["question"] + "\n" + json.loads(line)["answer"] for line in
            (ROOT / "data/raw/tinymath_test.jsonl").read_text(encoding="utf-8").splitlines()[:200]]
    groups = {"edge cases": EDGE_TEXTS, "random strings": random_texts(2000), "TinyMath problems": math,
              "validation stories (one by one)": stories, "the validation file (one text)": ["<|endoftext|>".join(stories)]}
    print("\n2. tokenizers: encode(text, add_special_tokens=False).ids == our encode(text)")
    for name, texts in groups.items():
        bad = [t for t in texts if hf_tok.encode(t, add_special_tokens=False).ids != tok.encode(t)]
        tokens = sum(len(tok.encode(t)) for t in texts)
        print(f"   {name:32s} {len(texts) - len(bad):5d}/{len(texts)} texts identical ({tokens:,} tokens)")
        for t in bad[:3]:
            print(f"      differs: {t[:80]!r}")
        failures += len(bad)
    with_bos = hf_tok.encode("Once upon a time").ids == [tok.special_tokens["<bos>"]] + tok.encode("Once upon a time")
    print(f"   encode(text) with special tokens = <bos> + our ids, as lesson 2 writes stories: {with_bos}")
    failures += not with_bos
    # the other pre-tokenization patterns of lesson 1 (possessive quantifiers, per-digit numbers):
    # small tokenizers trained here, written with tokenizer_json, read by `tokenizers`
    from nano.checkpoints.export import tokenizer_json
    from nano.text.tokenizer import PATTERNS
    train_text = (ROOT / "data/raw/stories_train.txt").read_text(encoding="utf-8")[:500_000] + "\n\n\n  \t 1234 it's DON'T"
    for pattern in PATTERNS:
        small = Tokenizer.train(train_text, vocab_size=800, pattern=pattern, progress=False, num_workers=1)
        path = out.parent / f"tokenizer_{pattern}.json"
        path.write_text(json.dumps(tokenizer_json(small)), encoding="utf-8")
        other = HFTokenizer.from_file(str(path))
        texts = EDGE_TEXTS + groups["random strings"] + stories
        same = sum(other.encode(t, add_special_tokens=False).ids == small.encode(t) for t in texts)
        print(f"   a tokenizer trained with the {pattern!r} pattern: {same}/{len(texts)} texts identical")
        failures += len(texts) - same
        # the known limit of a chat template (lesson 13's doc): a message that starts with a newline,
        # when the tokenizer has a token for a run of newlines ("\n\n" made one pre-token with the
        # "\n" after the role); this tokenizer learned one from the "\n\n\n" above
        conv = [{"role": "user", "content": "\n\nhi"}]
        whole = other.encode(tok.decode(render_conversation(conv, small)[0]), add_special_tokens=False).ids
        print(f"      a message starting with a newline: ids {'same' if whole == render_conversation(conv, small)[0] else 'different'} "
              f"when the rendered string is tokenized whole")
    roundtrip = all(hf_tok.decode(tok.encode(t), skip_special_tokens=False) == t for t in EDGE_TEXTS + math)
    print(f"   decode(our ids) gives the text back: {roundtrip}")
    failures += not roundtrip

    # 3. the chat template (AutoTokenizer reads tokenizer_config.json)
    auto = AutoTokenizer.from_pretrained(out)
    convs = [row["messages"] for row in read_jsonl(ROOT / "data/raw/instructions_val.jsonl")]
    convs += [[{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "What is 2 + 3?"},
               {"role": "assistant", "content": "2 + 3 = 5.\n#### 5"}, {"role": "user", "content": "And 4 + 4?"}]]
    string_same = ids_same = prompt_same = 0
    for conv in convs:
        ids, _ = render_conversation(conv, tok)
        text = auto.apply_chat_template(conv, tokenize=False)
        string_same += text == tok.decode(ids)
        ids_same += auto(text, add_special_tokens=False)["input_ids"] == ids
        head = conv[:-1] if conv[-1]["role"] == "assistant" else conv
        prompt_text = auto.apply_chat_template(head, tokenize=False, add_generation_prompt=True)
        prompt_same += auto(prompt_text, add_special_tokens=False)["input_ids"] == render_prompt(head, tok)
    print(f"\n3. chat template on {len(convs)} conversations: same string {string_same}/{len(convs)}, same ids {ids_same}/{len(convs)}, "
          f"same generation-prompt ids {prompt_same}/{len(convs)}")
    failures += (len(convs) - string_same) + (len(convs) - ids_same) + (len(convs) - prompt_same)
    for conv in (convs[0], [{"role": "user", "content": "\n leading newline"}], [{"role": "user", "content": "say <end_of_turn> please"}]):
        ids, _ = render_conversation(conv, tok)
        text = auto.apply_chat_template(conv, tokenize=False)
        print(f"   {conv[0]['content'][:28]!r:32s} string {'same' if text == tok.decode(ids) else 'DIFFERENT'}, "
              f"ids {'same' if auto(text, add_special_tokens=False)['input_ids'] == ids else 'different'}")

    # 4. safetensors' own reader
    ours_tensors = load_file(out / "model.safetensors")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        same = all(torch.equal(f.get_tensor(n), ours_tensors[n]) for n in names)
        meta = f.metadata()
    print(f"\n4. safetensors.safe_open reads {len(names)} tensors, identical to our reader's: {same}; metadata {meta}")
    failures += not same or set(names) != set(ours_tensors)
    print(f"\n{'all checks passed' if failures == 0 else f'{failures} check(s) FAILED'}")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
