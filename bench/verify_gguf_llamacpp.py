"""
Check the GGUF export against llama.cpp itself: the same token ids, the same greedy tokens, and the speed.

The project never needs llama.cpp (tests/test_13_gguf.py checks the file with our own reader and a
llama.cpp-style forward pass written in torch); this script is the one-off proof with the real thing:

  0. builds llama.cpp from the copy vendored inside the `llama-cpp-python` source package (pip downloads
     it), for the CPU only: the tools llama-batched-bench, llama-tokenize and llama-completion, and
     bench/llamacpp_check.cpp against its library, with `nice -n 19` and at most 2 compile jobs. Cached
     under --work_dir (default runs/llamacpp/): only the first run builds (~15 min on 2 cores);
  1. exports the model to GGUF in float32, the weights our model computes with;
  2. tokenizer: llama.cpp's llama_tokenize gives our ids on varied text, and so it does for small
     tokenizers trained with each of lesson 1's pre-tokenizer patterns;
  3. greedy decoding: 32 new tokens after three chat prompts, ours (nano/model/generate.py) against
     llama.cpp's (token ids in and out, bench/llamacpp_check.cpp), and how far apart the logits are;
     then through llama.cpp's stock llama-completion, from text and in chat mode (the file's template);
  4. speed on ONE thread, same weights, 32-token prompts, 128 new tokens each: llama-batched-bench at 1,
     16 and 64 parallel sequences against our engine (nano/serve/engine.py) and our generate at batch 1.
     Before each timed part it waits until no other heavy process runs (`ps aux --sort=-%cpu`).

    .venv/bin/python bench/verify_gguf_llamacpp.py                  # the full-SFT model (else the pretrained one)
    .venv/bin/python bench/verify_gguf_llamacpp.py --skip_speed
    .venv/bin/python bench/verify_gguf_llamacpp.py --compiled       # torch.compile too: the batch-1 step, the engine
    .venv/bin/python bench/verify_gguf_llamacpp.py --sdist llama_cpp_python-0.3.36.tar.gz   # a copy you downloaded

It needs cmake and a C++ compiler, and the network once (~75 MB); offline it says so and stops.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from nano.checkpoints import gguf  # noqa: E402
from nano.checkpoints.export import export_gguf, model_and_tokenizer, tokenizer_json  # noqa: E402
from nano.common.paths import raw_dir, runs_dir, tokenizer_dir  # noqa: E402
from nano.model.gemma import GemmaNano, model_config  # noqa: E402
from nano.model.generate import generate  # noqa: E402
from nano.serve.engine import Engine  # noqa: E402
from nano.serve.sequence import SamplingParams  # noqa: E402
from nano.text.chat_format import render_prompt  # noqa: E402
from nano.text.pretokenize import PATTERNS  # noqa: E402
from nano.text.tokenizer import Tokenizer  # noqa: E402
from verify_hf_export import EDGE_TEXTS, find_checkpoint, random_texts  # noqa: E402  (bench/verify_hf_export.py)
from bench_compile_decode import FixedShapeStep, generate_with_step  # noqa: E402  (bench/bench_compile_decode.py)

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python release whose vendored llama.cpp this was checked with
TOOLS = ("llama-batched-bench", "llama-tokenize", "llama-completion")
CMAKE_FLAGS = [  # CPU only, and nothing the checks do not use (no server, no tests, no HTTPS)
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DBUILD_SHARED_LIBS=ON",
]
PROMPTS = ["Write a story about a cat.", "Tom has 4 apples and buys 5 more. How many apples does Tom have now?",
           "Write a short story about a dog who finds a ball."]
HEAVY = ("cc1plus", "cmake", "make", "pytest", "bench", "lessons/", "llama-", "pip")  # what disturbs a timing


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    """Run a command (its parts may be paths or numbers), printing it first."""
    print("   $ " + " ".join(map(str, cmd)), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def output(cmd: list, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command quietly and keep what it prints."""
    return subprocess.run([str(c) for c in cmd], check=check, capture_output=True, text=True)


# -----------------------------------------------------------------------------------------------
# 0. llama.cpp, built once


def llamacpp_source(work: Path, version: str, sdist: str | None) -> Path:
    """vendor/llama.cpp of the llama-cpp-python source package, downloaded (or given) and unpacked."""
    src = work / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if src.is_dir():
        return src
    tarball = Path(sdist) if sdist else work / f"llama_cpp_python-{version}.tar.gz"
    if not tarball.is_file():
        print(f"   downloading the llama-cpp-python {version} source package (~75 MB) ...")
        cmd = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-binary", ":all:",
               "--no-deps", "--timeout", "15", "--retries", "0", "-d", str(work)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not tarball.is_file():
            raise SystemExit(f"could not download llama-cpp-python {version} (offline?):\n{done.stderr.strip()[-600:]}\n"
                             "download it elsewhere (pip download llama-cpp-python==VERSION --no-binary :all: --no-deps) "
                             "and pass --sdist FILE")
    with tarfile.open(tarball) as tar:
        tar.extractall(work, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    unpacked = work / tarball.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    if not unpacked.is_dir():
        raise SystemExit(f"{tarball} has no vendor/llama.cpp: is it the llama-cpp-python source package?")
    return unpacked


def build_llamacpp(src: Path, work: Path) -> dict[str, Path]:
    """The tools and our checker, built if missing (or if bench/llamacpp_check.cpp changed)."""
    build, checker_src = work / "build", ROOT / "bench" / "llamacpp_check.cpp"
    paths = {tool: build / "bin" / tool for tool in TOOLS}
    paths["check"] = work / "llamacpp_check"
    if all(p.is_file() for p in paths.values()) and paths["check"].stat().st_mtime > checker_src.stat().st_mtime:
        print(f"   cached in {work}")
        return paths
    for program in ("cmake", "c++"):
        if shutil.which(program) is None:
            raise SystemExit(f"building llama.cpp needs {program}: install it (e.g. apt-get install cmake g++)")
    nice = ["nice", "-n", "19"]  # this machine runs other work: the build waits for it, not the reverse
    if not all((build / "bin" / tool).is_file() for tool in TOOLS):
        start = time.time()
        run(nice + ["cmake", "-S", src, "-B", build] + CMAKE_FLAGS, stdout=subprocess.DEVNULL)
        run(nice + ["cmake", "--build", build, "--config", "Release", "-j", "2", "--target", *TOOLS], stdout=subprocess.DEVNULL)
        print(f"   built in {time.time() - start:.0f} s")
    run(nice + ["c++", "-O2", "-std=c++17", "-I", src / "include", "-I", src / "ggml" / "include", checker_src,
                "-L", build / "bin", "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{build / 'bin'}", "-o", paths["check"]])
    return paths


# -----------------------------------------------------------------------------------------------
# 2-3. the same ids: tokenizer and greedy decoding


def llamacpp_tokenize(check: Path, model_file: Path, texts: list[str]) -> list[list[int]]:
    with tempfile.NamedTemporaryFile("w", suffix=".hex", delete=False) as f:
        f.write("".join(t.encode("utf-8").hex() + "\n" for t in texts))
    try:
        out = output([check, model_file, "tokenize", f.name]).stdout
    finally:
        os.unlink(f.name)
    return [[int(x) for x in line.split()] for line in out.split("\n")[:len(texts)]]


def llamacpp_greedy(check: Path, model_file: Path, prompt: list[int], new_tokens: int, vocab: int) -> tuple[list[int], torch.Tensor]:
    """llama.cpp's greedy ids after `prompt`, and its logits at each step (new_tokens, vocab)."""
    with tempfile.TemporaryDirectory() as tmp:
        logits_path = Path(tmp) / "logits.f32"
        out = output([check, model_file, "greedy", new_tokens, logits_path, *prompt]).stdout
        logits = torch.frombuffer(bytearray(logits_path.read_bytes()), dtype=torch.float32).view(new_tokens, vocab)
    return [int(x) for x in out.split()], logits


def check_tokenizer(paths, model_file, tokenizer) -> int:
    stories = (raw_dir() / "stories_val.txt").read_text(encoding="utf-8").split("<|endoftext|>")
    math = [json.loads(line)["question"] + "\n" + json.loads(line)["answer"] for line in
            (raw_dir() / "tinymath_test.jsonl").read_text(encoding="utf-8").splitlines()[:200]]
    groups = {"edge cases": EDGE_TEXTS, "random strings": random_texts(2000), "TinyMath problems": math,
              "validation stories (one by one)": stories, "the validation file (one text)": ["<|endoftext|>".join(stories)]}
    failures = 0
    for name, texts in groups.items():
        theirs = llamacpp_tokenize(paths["check"], model_file, texts)
        bad = [t for t, ids in zip(texts, theirs) if ids != tokenizer.encode(t)]
        tokens = sum(len(tokenizer.encode(t)) for t in texts)
        print(f"   {name:32s} {len(texts) - len(bad):5d}/{len(texts)} texts identical ({tokens:,} tokens)")
        for t in bad[:3]:
            print(f"      differs: {t[:80]!r}\n        ours     {tokenizer.encode(t)[:20]}\n        llama.cpp {llamacpp_tokenize(paths['check'], model_file, [t])[0][:20]}")
        failures += len(bad)
    # the other pre-tokenizers of lesson 1 (gguf.py: LLAMACPP_PRE_TOKENIZERS): a small tokenizer trained
    # with each pattern, in a file with a random model (llama.cpp reads only the vocabulary to tokenize)
    train_text = (raw_dir() / "stories_train.txt").read_text(encoding="utf-8")[:500_000] + "\n\n\n  \t 1234 it's DON'T"
    texts = EDGE_TEXTS + groups["random strings"] + stories
    for pattern in PATTERNS:
        small = Tokenizer.train(train_text, vocab_size=800, pattern=pattern, progress=False, num_workers=1)
        bpe = tokenizer_json(small)["model"]
        strings = [text for text, _ in sorted(bpe["vocab"].items(), key=lambda item: item[1])]
        cfg = model_config("tiny", vocab_size=small.vocab_size)
        metadata = {**gguf.gemma2_metadata(cfg), **gguf.tokenizer_metadata(small, strings, bpe["merges"], cfg.vocab_size)}
        path = gguf.write_gguf(model_file.parent / f"tokenizer_{pattern}.gguf", metadata, gguf.gemma2_tensors(GemmaNano(cfg).state_dict()))
        same = sum(ids == small.encode(t) for t, ids in zip(texts, llamacpp_tokenize(paths["check"], path, texts)))
        print(f"   a tokenizer trained with the {pattern!r} pattern, as {metadata['tokenizer.ggml.pre'].value!r}: "
              f"{same}/{len(texts)} texts identical")
        failures += len(texts) - same
    return failures


def check_greedy(paths, model_file, model, tokenizer, new_tokens: int) -> int:
    failures = 0
    specials = set(tokenizer.special_tokens.values())
    eog = {tokenizer.special_tokens[t] for t in ("<end_of_turn>", "<eos>", "<|endoftext|>")}  # where llama.cpp stops
    for text in PROMPTS:
        prompt = render_prompt([{"role": "user", "content": text}], tokenizer)
        ours = generate(model, prompt, new_tokens)  # temperature 0, no stop tokens: exactly new_tokens
        theirs, their_logits = llamacpp_greedy(paths["check"], model_file, prompt, new_tokens, model.cfg.vocab_size)
        # our logits along llama.cpp's path (prompt + its tokens, one pass), against its logits at each step
        with torch.no_grad():
            our_logits = model(torch.tensor([prompt + theirs[:-1]]))[0][0, len(prompt) - 1:]
        diff = (our_logits - their_logits).abs().max().item()
        same = ours == theirs
        failures += not same
        print(f"\n   prompt: {text!r} ({len(prompt)} tokens)")
        print(f"   ours      {ours}")
        print(f"   llama.cpp {theirs}")
        print(f"   same {new_tokens} tokens: {same}; max |logit ours - llama.cpp| along llama.cpp's path: {diff:.2e} "
              f"(logits up to {their_logits.abs().max().item():.1f})")
        print(f"   ours as text (special tokens left out): {tokenizer.decode([t for t in ours if t not in specials])!r}")
        # llama.cpp's stock tool, from text: its tokenizer, its sampler at temperature 0 (greedy), its default
        # fp16 KV cache and flash attention. It adds <bos> itself (tokenizer.ggml.add_bos_token), parses the
        # special tokens of the prompt, and stops at an end-of-generation token (our <end_of_turn>), after
        # which it prints " [end of text]" and, like every run, a blank line. Given the rendered prompt as
        # text (-no-cnv), or the user's message alone in chat mode (-cnv -st: one turn, laid out by the
        # chat template of the file, which llama.cpp recognises as Gemma's)
        reply = tokenizer.decode(ours[:next((i for i, t in enumerate(ours) if t in eog), len(ours))])
        for mode, flags in (("the rendered prompt", ["-no-cnv", "-p", tokenizer.decode(prompt).removeprefix("<bos>")]),
                            ("chat mode, the message alone", ["-cnv", "-st", "-p", text])):
            done = output([paths["llama-completion"], "-m", model_file, *flags, "-n", new_tokens, "--temp", 0,
                           "--no-display-prompt", "-t", 1, "--no-warmup"], check=False)
            written = done.stdout.removesuffix("\n\n").removesuffix(" [end of text]\n")
            same_text = done.returncode == 0 and written == reply
            failures += not same_text
            print(f"   llama-completion --temp 0, {mode}: the same reply (up to the end of turn): {same_text}"
                  + ("" if done.returncode == 0 else f" (exit {done.returncode}: {done.stderr.strip()[-300:]})"))
            if not same_text:
                print(f"      llama-completion: {done.stdout!r}")
    return failures


# -----------------------------------------------------------------------------------------------
# 4. speed


def cpu_busy(seconds: float = 2.0) -> float:
    """Fraction of all CPUs busy over the next `seconds` (from /proc/stat), 0 if it cannot be read."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return 0.0
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def wait_until_quiet(max_wait: float) -> bool:
    """Print `ps aux --sort=-%cpu | head`; wait while another heavy process runs or the CPUs are busy."""
    waited, ours = 0.0, {os.getpid()}
    while True:
        top = subprocess.run(["ps", "aux", "--sort=-%cpu"], capture_output=True, text=True).stdout.splitlines()[:8]
        heavy = [line for line in top[1:] if int(line.split()[1]) not in ours and " ps aux " not in line
                 and (float(line.split()[2]) >= 20 or (float(line.split()[2]) >= 1 and any(h in line for h in HEAVY)))]
        busy = cpu_busy()
        if not heavy and busy < 0.3:
            print(f"   quiet: CPUs {busy:.0%} busy over 2 s; top of ps aux --sort=-%cpu:")
            print("\n".join("     " + line[:150] for line in top[:4]))
            return True
        if waited >= max_wait:
            print(f"   NOT QUIET after {waited:.0f} s (CPUs {busy:.0%} busy); measuring anyway, read the numbers with care:")
            print("\n".join("     " + line[:150] for line in top[:6]))
            return False
        print(f"   waiting for a quiet machine (CPUs {busy:.0%} busy; {len(heavy)} heavy process(es): "
              f"{heavy[0].split(None, 10)[-1][:80] if heavy else ''})", flush=True)
        time.sleep(15)
        waited += 17


def llamacpp_speed(paths, model_file, prompt_len, new_tokens, parallel) -> dict[int, dict]:
    cmd = [paths["llama-batched-bench"], "-m", model_file, "-c", max(parallel) * 256, "-b", 2048, "-ub", 512,
           "-npp", prompt_len, "-ntg", new_tokens, "-npl", ",".join(map(str, parallel)), "-t", 1, "-tb", 1,
           "--output-format", "jsonl"]
    out = output(cmd).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {row["pl"]: row for row in rows}


def bench_prompts(model, prompt_len: int, count: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, model.cfg.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(count)]


def ours_speed(model, prompt_len, new_tokens, parallel, compiled_step=None, compiled_engine=None) -> tuple[dict, dict]:
    """tokens/s of each of our ways (generate, the compiled step if given, the engine at each count, and
    the compiled engine if given: keys ("compiled", n)), and how many sequences of each compiled way
    wrote the eager way's greedy tokens: {"step": 0 or 1, "engine": {n: count}}."""
    prompts = bench_prompts(model, prompt_len, max(parallel))
    params = SamplingParams(max_tokens=new_tokens)  # greedy; no stop token set: exactly new_tokens each
    engine = Engine(model, max_running=max(parallel), prefix_caching=False)
    generate(model, prompts[0], 8)  # warm up (first calls allocate), as llama-batched-bench does before it times
    engine.generate(prompts[:2], SamplingParams(max_tokens=8))
    speeds, agree = {}, {"engine": {}}
    start = time.perf_counter()
    out = generate(model, prompts[0], new_tokens)
    speeds["generate"] = len(out) / (time.perf_counter() - start)
    assert len(out) == new_tokens
    if compiled_step is not None:  # bench/bench_compile_decode.py's fixed-shape step, compiled beforehand
        start = time.perf_counter()
        compiled_out = generate_with_step(model, compiled_step, prompts[0], new_tokens)
        speeds["compiled"] = len(compiled_out) / (time.perf_counter() - start)
        agree["step"] = int(compiled_out == out)
    for n in parallel:
        start = time.perf_counter()
        results = engine.generate(prompts[:n], params)
        speeds[n] = n * new_tokens / (time.perf_counter() - start)
        assert all(len(r["token_ids"]) == new_tokens for r in results), "the engine stopped early"
        if compiled_engine is not None:  # Engine(compile_decode=True), its buckets compiled beforehand
            start = time.perf_counter()
            compiled_results = compiled_engine.generate(prompts[:n], params)
            speeds[("compiled", n)] = n * new_tokens / (time.perf_counter() - start)
            agree["engine"][n] = sum(a["token_ids"] == b["token_ids"] for a, b in zip(compiled_results, results))
    return speeds, agree


def speed_table(paths, model_file, model, args) -> None:
    parallel = [1, 16, 64]
    torch.set_num_threads(1)
    best_llama: dict[int, dict] = {}
    best_ours: dict = {}
    quiet = True
    compiled_step = compiled_engine = None
    agree = {"step": 1, "engine": {n: n for n in parallel}}  # the fewest that agreed over the runs
    if args.compiled:  # the compiles themselves (~20-50 s each) happen here, before any timing
        torch._inductor.config.cpp_wrapper = True
        compiled_step = torch.compile(FixedShapeStep(model, args.prompt_len + args.speed_new_tokens), dynamic=False)
        generate_with_step(model, compiled_step, list(range(10, 10 + args.prompt_len)), args.speed_new_tokens)
        compiled_engine = Engine(model, max_running=max(parallel), prefix_caching=False, compile_decode=True)
        start = time.perf_counter()
        for n in parallel:  # one graph per batch bucket: the runs' own (the waves of sequences that finish
            # together leave 12, 8, 4 of 16 running, so buckets 8 and 4 come up too)
            compiled_engine.generate(bench_prompts(model, args.prompt_len, n), SamplingParams(max_tokens=args.speed_new_tokens))
        print(f"   the engine's decode step compiled for {len(compiled_engine.runner.padded_decode.buckets_seen)} batch sizes "
              f"in {time.perf_counter() - start:.0f} s")
    for repeat in range(args.repeats):  # interleaved, so a busy neighbour slows both alike; best of each
        quiet &= wait_until_quiet(args.quiet_wait)
        for pl, row in llamacpp_speed(paths, model_file, args.prompt_len, args.speed_new_tokens, parallel).items():
            row["gen_per_s"] = pl * args.speed_new_tokens / row["t"]  # new tokens per second of the whole run
            if pl not in best_llama or row["gen_per_s"] > best_llama[pl]["gen_per_s"]:
                best_llama[pl] = row
        quiet &= wait_until_quiet(args.quiet_wait)
        speeds, agreed = ours_speed(model, args.prompt_len, args.speed_new_tokens, parallel, compiled_step, compiled_engine)
        agree["step"] = min(agree["step"], agreed.get("step", 1))
        for n, count in agreed["engine"].items():
            agree["engine"][n] = min(agree["engine"][n], count)
        for key, speed in speeds.items():
            best_ours[key] = max(best_ours.get(key, 0.0), speed)
        print(f"   run {repeat + 1}/{args.repeats} done", flush=True)

    print(f"\n4. speed, one thread, {args.prompt_len}-token prompts, {args.speed_new_tokens} new tokens each, best of {args.repeats} "
          f"(tokens/s = new tokens / wall time, prompt processing included){'' if quiet else '  [machine was not quiet]'}")
    print("\n| parallel sequences | llama.cpp tokens/s | llama.cpp decode only (S_TG) | ours | ours tokens/s | "
          "ms per step, llama.cpp / ours | ours / llama.cpp |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    rows = [(1, "generate")] + ([(1, "compiled")] if "compiled" in best_ours else []) + [(1, 1), (16, 16), (64, 64)]
    rows += [(n, ("compiled", n)) for n in parallel if ("compiled", n) in best_ours]
    for pl, key in rows:
        llama, rate = best_llama[pl], best_ours[key]
        if key == "compiled":
            what = f"the compiled decode step (bench/bench_compile_decode.py; tokens equal generate's: {bool(agree['step'])})"
        elif isinstance(key, tuple):
            what = (f"engine, compile_decode=True (nano/serve/compiled_decode.py; sequences with the eager "
                    f"engine's tokens: {agree['engine'][pl]}/{pl})")
        else:
            what = {"generate": "generate (nano/model/generate.py)"}.get(key, "engine (nano/serve/engine.py)")
        # a step makes one token for each of the pl sequences: ms per step = 1000 pl / (tokens/s)
        print(f"| {pl} | {llama['gen_per_s']:.0f} | {llama['speed_tg']:.0f} | {what} | {rate:.0f} | "
              f"{1000 * pl / llama['gen_per_s']:.2f} / {1000 * pl / rate:.2f} | {rate / llama['gen_per_s']:.2f}x |")
    first = next(iter(best_llama.values()))
    print(f"\n(llama.cpp: flash_attn {first['flash_attn']} (-1 = auto), n_kv_max {first['n_kv_max']}, its default fp16 KV cache; "
          f"ours: fp32 weights and KV cache, torch {torch.__version__}, {torch.get_num_threads()} thread)")


# -----------------------------------------------------------------------------------------------


def host() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{os.cpu_count()}-core {name}, {simd}, load average {os.getloadavg()[0]:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="default: the full-SFT model, else the pretrained one")
    parser.add_argument("--work_dir", default=str(runs_dir() / "llamacpp"), help="where llama.cpp is downloaded and built (cached)")
    parser.add_argument("--llama_cpp_python", default=LLAMA_CPP_PYTHON, help="the llama-cpp-python version whose llama.cpp to build")
    parser.add_argument("--sdist", default=None, help="a llama-cpp-python .tar.gz already downloaded (offline)")
    parser.add_argument("--new_tokens", type=int, default=32, help="greedy tokens compared")
    parser.add_argument("--skip_speed", action="store_true")
    parser.add_argument("--prompt_len", type=int, default=32, help="prompt tokens per sequence in the speed table")
    parser.add_argument("--speed_new_tokens", type=int, default=128, help="new tokens per sequence in the speed table")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side, interleaved; the best counts")
    parser.add_argument("--compiled", action="store_true",
                        help="also time torch.compile: the fixed-shape step at batch 1 and the engine with compile_decode=True "
                             "at each count (compiles first, ~1-2 min cold)")
    parser.add_argument("--quiet_wait", type=float, default=600, help="seconds to wait for a quiet machine before timing anyway")
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"host: {host()}; torch {torch.__version__}")

    print(f"\n0. llama.cpp from llama-cpp-python {args.llama_cpp_python} (vendor/llama.cpp), CPU only")
    src = llamacpp_source(work, args.llama_cpp_python, args.sdist)
    paths = build_llamacpp(src, work)

    checkpoint = args.checkpoint or find_checkpoint()
    print(f"\n1. export {checkpoint} to GGUF (float32)")
    model_file = export_gguf(checkpoint, work / "model.gguf", force=True)
    model, tokenizer = model_and_tokenizer(Path(checkpoint), None, False, tokenizer_dir() / "tokenizer.json")
    print(f"   {model_file}: {model_file.stat().st_size:,} bytes")

    print("\n2. tokenizer: llama.cpp's llama_tokenize (special tokens parsed, no <bos> added) == our encode")
    failures = check_tokenizer(paths, model_file, tokenizer)
    print(f"\n3. greedy decoding, {args.new_tokens} new tokens after a chat prompt, end-of-turn ignored")
    failures += check_greedy(paths, model_file, model, tokenizer, args.new_tokens)

    if not args.skip_speed:
        speed_table(paths, model_file, model, args)
    print(f"\n{'all checks passed' if failures == 0 else f'{failures} check(s) FAILED'}")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
