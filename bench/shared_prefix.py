"""Several live sequences behind one long system prompt: shared through seq_cp or not.

``SharedPrefixPool`` (edgemerge/prefix/sequences.py) runs every sequence in one unified-cache
context; a sequence whose leading blocks match a live one copies them with ``seq_cp``
(no K/V is copied: the cells gain a second owner) and decodes only its own suffix.
The baseline runs the same sequences in the same kind of context with sharing made
impossible (each prompt is prefixed with a distinct token, so no block hash matches):
every sequence decodes its whole prompt.

Measured per sequence: time from ``open`` to the first greedy token (TTFT), tokens
decoded; at the end: KV cells in use for all of them together.

    python bench/shared_prefix.py [--model qwen2.5-coder-0.5b] [--system-tokens 2048]
        [--sequences 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from edgemerge import Llama  # noqa: E402  (before llama_cpp: the patched lib)
from edgemerge.prefix.sequences import SharedPrefixPool  # noqa: E402

TEXT = Path("/usr/share/common-licenses/GPL-3")
QUESTIONS = [
    "\n\nQuestion: what does the preamble promise?\nAnswer:",
    "\n\nQuestion: may I charge a fee for copies?\nAnswer:",
    "\n\nQuestion: what is a covered work?\nAnswer:",
    "\n\nQuestion: how do I apply these terms to my program?\nAnswer:",
    "\n\nQuestion: what happens if I violate the licence?\nAnswer:",
    "\n\nQuestion: is there a warranty?\nAnswer:",
]


def run_pool(llm: Llama, prompts: list[list[int]], n_ctx: int, threads: int) -> list[tuple]:
    rows = []
    with SharedPrefixPool(llm, n_ctx=n_ctx, n_seq_max=len(prompts), n_threads=threads) as pool:
        for prompt in prompts:
            before = pool.stats.tokens_decoded
            t0 = time.perf_counter()
            seq = pool.open(prompt)
            pool.generate(seq, 1)
            rows.append((time.perf_counter() - t0, pool.stats.tokens_decoded - before))
        cells = pool.used_cells()
    return rows, cells


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--system-tokens", type=int, default=2048)
    ap.add_argument("--sequences", type=int, default=4, choices=range(2, len(QUESTIONS) + 1))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    llm = Llama(args.model, n_ctx=256, n_threads=args.threads, verbose=False)
    system = llm.tokenize(TEXT.read_bytes(), add_bos=True)[: args.system_tokens]
    questions = [llm.tokenize(q.encode(), add_bos=False) for q in QUESTIONS[: args.sequences]]
    shared = [system + q for q in questions]
    # a distinct first token after BOS changes every block hash: nothing can be shared
    apart = [system[:1] + [system[1] + i + 1] + system[2:] + q for i, q in enumerate(questions)]
    n_ctx = args.sequences * (args.system_tokens + 64) + 256
    results = {}
    for label, prompts in (("independent", apart), ("shared via seq_cp", shared)):
        results[label] = run_pool(llm, prompts, n_ctx, args.threads)
    print(f"command: python bench/shared_prefix.py {' '.join(argv or sys.argv[1:])}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(f"model: {args.model}; system prompt {len(system)} tokens; {args.sequences} sequences\n")
    print("| sequences | sequence | TTFT s | tokens decoded |")
    print("| --- | ---: | ---: | ---: |")
    for label, (rows, _) in results.items():
        for i, (secs, decoded) in enumerate(rows):
            print(f"| {label} | {i + 1} | {secs:.2f} | {decoded} |")
    print("\n| sequences | KV cells in use | total open time s |")
    print("| --- | ---: | ---: |")
    for label, (rows, cells) in results.items():
        print(f"| {label} | {cells} | {sum(r[0] for r in rows):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
