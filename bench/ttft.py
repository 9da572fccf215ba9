"""Time to first token of a chat turn behind a long shared system prompt, cold and warm.

One model, one run, the same conversation through each prompt cache in turn:

- no cache, cold: a fresh context evaluates the whole prompt;
- live context: the same Llama takes the next turn (llama-cpp-python's in-context
  prefix reuse, no cache object involved): the floor any cache can reach;
- for llama-cpp-python's ``LlamaRAMCache`` and edgemerge's ``BlockCache`` (RAM and
  disk): a first turn in an empty context fills the cache (cold), then the context is
  reset and a different user turn behind the same system prompt is asked (warm: the
  system prompt's state comes from the cache). The disk cache is then reopened as a
  new object over the same directory (a restart) for a third turn.

TTFT is the time from the call to the first streamed chunk (the first sampled token).
Each figure is the median of ``--rounds`` runs.

    python bench/ttft.py [--model qwen2.5-coder-0.5b] [--system-tokens 2048] [--rounds 1]
        [--with-merge]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from edgemerge import Llama, MergeSettings  # noqa: E402  (before llama_cpp: the patched lib)
from edgemerge.models import resolve_model  # noqa: E402
from edgemerge.prefix.blockcache import BlockCache  # noqa: E402

TEXT = Path("/usr/share/common-licenses/GPL-3")
TURNS = [
    "Summarise the preamble in one sentence.",
    "Which section covers conveying modified source versions?",
    "Does the licence allow charging a fee for copies?",
]


def ttft(llm: Llama, system: str, user: str, max_tokens: int) -> tuple[float, float]:
    """(seconds to the first streamed token, seconds for the whole call)."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    t0 = time.perf_counter()
    first = None
    for _ in llm.create_chat_completion(
        messages=messages, max_tokens=max_tokens, temperature=0, stream=True
    ):
        if first is None:
            first = time.perf_counter() - t0
    return first, time.perf_counter() - t0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, load average {load} at start, {platform.platform()}"


def run(args: argparse.Namespace) -> list[tuple[str, str, float, float, str]]:
    path = resolve_model(args.model)
    kw = {
        "n_ctx": args.system_tokens + 512,
        "n_batch": 512,
        "n_threads": args.threads,
        "n_threads_batch": args.threads,
        "verbose": False,
    }
    llm = Llama(str(path), **kw)
    system = llm.detokenize(llm.tokenize(TEXT.read_bytes(), add_bos=False)[: args.system_tokens])
    system = system.decode("utf-8", errors="ignore")
    rows: list[tuple[str, str, float, float, str]] = []

    active = [llm]  # the Llama the next measurement runs on

    def measure(label: str, phase: str, user: str, note=None, reset: bool = True) -> None:
        if reset:
            active[0].reset()
        first, total = ttft(active[0], system, user, args.max_tokens)
        rows.append((label, phase, first, total, note() if note else ""))
        print(f"{label:34s} {phase:22s} TTFT {first:7.3f} s  call {total:7.3f} s", flush=True)

    llm.set_cache(None)
    measure("no cache", "cold", TURNS[0])
    measure("live context (same Llama)", "warm", TURNS[1], reset=False)

    ram = __import__("llama_cpp").LlamaRAMCache(capacity_bytes=4 << 30)
    llm.set_cache(ram)
    measure("llama_cpp.LlamaRAMCache", "cold (fills cache)", TURNS[0])
    measure(
        "llama_cpp.LlamaRAMCache",
        "warm",
        TURNS[1],
        lambda: f"{ram.cache_size / 2**20:.0f} MiB held",
    )

    block = BlockCache.in_ram(4 << 30, block_size=16, namespace=args.model)
    llm.set_cache(block)
    measure("edgemerge BlockCache (RAM)", "cold (fills cache)", TURNS[0])
    measure(
        "edgemerge BlockCache (RAM)",
        "warm",
        TURNS[1],
        lambda: f"{block.cache_size / 2**20:.0f} MiB held, {block.stats.restored_tokens} restored",
    )

    with tempfile.TemporaryDirectory(prefix="ttft-blockcache-") as tmp:
        disk = BlockCache.on_disk(tmp, 8 << 30, block_size=16, namespace=args.model)
        llm.set_cache(disk)
        measure("edgemerge BlockCache (disk)", "cold (fills cache)", TURNS[0])
        measure("edgemerge BlockCache (disk)", "warm", TURNS[1])
        reopened = BlockCache.on_disk(tmp, 8 << 30, block_size=16, namespace=args.model)
        llm.set_cache(reopened)
        measure(
            "edgemerge BlockCache (disk)",
            "warm after restart",
            TURNS[2],
            lambda: (
                f"{reopened.cache_size / 2**20:.0f} MiB on disk, "
                f"{reopened.stats.restored_tokens} restored"
            ),
        )
    llm.close()

    if args.with_merge:
        # half the system prompt's cells; the first chunk of n_batch must fit the budget
        budget = max(args.system_tokens // 2, 3 * 256)
        merging = Llama(
            str(path),
            merge=MergeSettings(budget=budget, recent=256),
            n_ctx_logical=8192,
            **{**kw, "n_batch": 256},
        )
        cache = BlockCache.in_ram(4 << 30, block_size=16, namespace=args.model + "+merge")
        merging.set_cache(cache)
        active[0] = merging
        measure("BlockCache (RAM), merging Llama", "cold (fills cache)", TURNS[0])
        measure(
            "BlockCache (RAM), merging Llama",
            "warm",
            TURNS[1],
            lambda: f"{cache.cache_size / 2**20:.0f} MiB, {cache.stats.restored_tokens} restored",
        )
        merging.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--system-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--with-merge", action="store_true", help="add a merging Llama's rows")
    args = p.parse_args()
    if args.rounds < 1 or args.system_tokens < 16:
        p.error("--rounds must be >= 1 and --system-tokens >= 16")
    where = machine()
    runs = [run(args) for _ in range(args.rounds)]
    print()
    print(f"command: python bench/ttft.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"machine: {where}")
    print(f"model: {args.model}, system prompt {args.system_tokens} tokens, {args.rounds} round(s)")
    print()
    print("| cache | turn | TTFT s (median) | whole call s | note |")
    print("| --- | --- | ---: | ---: | --- |")
    for i, (label, phase, _, _, note) in enumerate(runs[0]):
        first = statistics.median(r[i][2] for r in runs)
        total = statistics.median(r[i][3] for r in runs)
        print(f"| {label} | {phase} | {first:.3f} | {total:.3f} | {note} |")


if __name__ == "__main__":
    main()
