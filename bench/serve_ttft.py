"""Time to first token of a resent long history: `edgemerge serve` vs `python -m llama_cpp.server`.

Each server runs as its own process on the same model. Conversation A sends a history of
``--history`` tokens (GPL-3 text), conversation B another, then A's second turn resends
A's whole history plus the reply and a question. Printed per server: time to first
streamed token of each request, the server's RSS after them, and (edgemerge) the bytes
its saved conversation holds.

    python bench/serve_ttft.py --model qwen2.5-coder-0.5b --history 4096
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai

from edgemerge.models import resolve_model

TEXT = Path("/usr/share/common-licenses/GPL-3").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(cmd: list[str], port: int) -> tuple[subprocess.Popen, openai.OpenAI]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=900)
    deadline = time.monotonic() + 300
    while True:
        try:
            c.models.list()
            return proc, c
        except openai.APIConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {' '.join(cmd)}") from None
            time.sleep(0.5)


def ask(c: openai.OpenAI, model: str, messages: list[dict]) -> tuple[float, str, dict]:
    t0 = time.perf_counter()
    ttft, text, extra = None, "", {}
    for ch in c.chat.completions.create(
        model=model, messages=messages, max_tokens=16, temperature=0, stream=True
    ):
        if ch.choices and ch.choices[0].delta.content and ttft is None:
            ttft = time.perf_counter() - t0
        if ch.choices:
            text += ch.choices[0].delta.content or ""
        extra = (ch.model_extra or {}).get("edgemerge", extra)
    return ttft if ttft is not None else time.perf_counter() - t0, text, extra


def history(tokens: int, offset: int) -> str:
    # about 4.3 characters per token for this English text with Qwen's tokenizer
    return TEXT[offset : offset + int(tokens * 4.3)]


def run(name: str, cmd: list[str], port: int, model: str, n: int) -> dict:
    proc, c = start(cmd, port)
    try:
        a = [{"role": "user", "content": history(n, 0) + "\nSummarise this."}]
        b = [{"role": "user", "content": history(n // 4, 20000) + "\nSummarise this."}]
        t_a1, reply, e_a1 = ask(c, model, a)
        t_b1, _, _ = ask(c, model, b)
        a2 = a + [
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "And in one word?"},
        ]
        t_a2, _, e_a2 = ask(c, model, a2)
        return {
            "server": name,
            "ttft_a1": t_a1,
            "ttft_b1": t_b1,
            "ttft_a2": t_a2,
            "rss_mb": rss_mb(proc.pid),
            "conv_mb": (e_a2.get("conversation_bytes") or 0) / 2**20 if e_a2 else None,
            "tokens": e_a1.get("logical_tokens"),
            "cells": e_a2.get("cells"),
        }
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--history", type=int, default=4096, help="tokens of A's history")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--budget", type=int, default=2048, help="edgemerge cells per conversation")
    args = p.parse_args()
    path = str(resolve_model(args.model))
    n_ctx = args.history + 1024
    rows = []
    port = free_port()
    em = [sys.executable, "-m", "edgemerge", "serve", "--model", args.model, "--port", str(port)]
    em += ["--n-ctx", str(args.budget + 512 + 64), "--budget", str(args.budget)]
    em += ["--threads", str(args.threads)]
    rows.append(run("edgemerge serve", em, port, args.model, args.history))
    for cache in ("false", "true"):
        port = free_port()
        lc = [sys.executable, "-m", "llama_cpp.server", "--model", path, "--port", str(port)]
        lc += ["--n_ctx", str(n_ctx), "--n_threads", str(args.threads), "--cache", cache]
        lc += ["--model_alias", args.model]
        rows.append(run(f"llama_cpp.server --cache {cache}", lc, port, args.model, args.history))
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"model: {args.model}; A: ~{args.history} tokens, B: ~{args.history // 4}, then A again")
    print("| server | TTFT A1 s | TTFT B1 s | TTFT A2 (resent history) s | RSS MB | conv MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        conv = f"{r['conv_mb']:.1f}" if r["conv_mb"] is not None else "-"
        print(
            f"| {r['server']} | {r['ttft_a1']:.2f} | {r['ttft_b1']:.2f} | {r['ttft_a2']:.2f} | "
            f"{r['rss_mb']:.0f} | {conv} |"
        )
    em_row = rows[0]
    print(f"edgemerge: A had {em_row['tokens']} logical tokens in {em_row['cells']} cells")


if __name__ == "__main__":
    main()
