"""Prefill and decode throughput: edgemerge's patched libllama beside stock llama-cpp-python.

Both run the same llama-cpp-python 0.3.36 Python layer on the same model and
text; only the native library differs (edgemerge's build vs the one stock
llama-cpp-python builds from the same sdist, see bench/stock_llama.py). Runs
alternate between the two in one invocation and each figure is the median,
because this machine is noisy; the table gives the ratio.

    python bench/throughput.py [--model qwen2.5-coder-0.5b] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT = Path("/usr/share/common-licenses/GPL-3")


def worker(args: argparse.Namespace) -> None:
    if args.lib == "edgemerge":
        import edgemerge  # noqa: F401  (points llama_cpp at the patched library)
    else:
        os.environ["LLAMA_CPP_LIB_PATH"] = args.lib
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=args.prompt_tokens + args.gen_tokens + 16,
        n_batch=512,
        n_threads=args.threads,
        verbose=False,
    )
    tokens = llm.tokenize(TEXT.read_bytes())[: args.prompt_tokens]
    n_vocab = llm.n_vocab()

    def greedy() -> int:
        logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(n_vocab,)).argmax())

    t0 = time.perf_counter()
    llm.eval(tokens)
    prefill_s = time.perf_counter() - t0
    tok = greedy()
    t0 = time.perf_counter()
    for _ in range(args.gen_tokens):
        llm.eval([tok])
        tok = greedy()
    decode_s = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "prefill_tok_s": len(tokens) / prefill_s,
                "decode_tok_s": args.gen_tokens / decode_s,
            }
        )
    )


def run_one(lib: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--lib",
        lib,
        "--model",
        args.model,
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--gen-tokens",
        str(args.gen_tokens),
        "--threads",
        str(args.threads),
    ]
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker for {lib} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lib", default="edgemerge", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    sys.path.insert(0, str(HERE))
    from stock_llama import stock_lib_dir

    from edgemerge.models import resolve_model

    args.model = str(resolve_model(args.model))
    stock = str(stock_lib_dir())
    results: dict[str, list[dict]] = {"edgemerge": [], "stock": []}
    for _ in range(args.rounds):
        results["edgemerge"].append(run_one("edgemerge", args))
        results["stock"].append(run_one(stock, args))

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(f"command: python bench/{Path(__file__).name} " + " ".join(sys.argv[1:]))
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}"
    )
    print(
        f"model: {Path(args.model).name}; prompt {args.prompt_tokens} tokens, "
        f"decode {args.gen_tokens} tokens, {args.threads} threads, "
        f"median of {args.rounds} alternating rounds\n"
    )
    print("| metric | edgemerge | stock llama-cpp-python | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for key, label in (("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s")):
        a, b = med("edgemerge", key), med("stock", key)
        print(f"| {label} | {a:.1f} | {b:.1f} | {a / b:.3f} |")


if __name__ == "__main__":
    main()
