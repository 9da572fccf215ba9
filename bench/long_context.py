"""A 16K-token conversation in a 4K-cell cache, beside a full 16K cache, in one run.

1. edgemerge.Llama with merging, n_ctx=4096 physical cells: chat turn after turn
   (real text from /usr/share/common-licenses and Python's stdlib as user
   messages) until the logical context passes --logical tokens; then greedy
   decode --decode tokens and time them.
2. The same model as plain llama-cpp-python (merge=None) with n_ctx=16384: the
   same token stream, then the same timed decode.

Prints decode tok/s, prefill time and KV memory (allocated cache, and cells in
use) of each, the command and the machine.

    python bench/long_context.py [--logical 16384] [--cells 4096] [--decode 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import edgemerge
from edgemerge import Llama, MergeSettings
from edgemerge.reference.ggml_quants import row_bytes


def corpus() -> list[str]:
    files = sorted(Path("/usr/share/common-licenses").glob("*"))
    stdlib = Path(os.__file__).parent
    files += [stdlib / n for n in ("argparse.py", "functools.py", "subprocess.py", "typing.py")]
    words: list[str] = []
    for f in files:
        if f.is_file():
            words += f.read_text(errors="replace").split()
    return [" ".join(words[i : i + 600]) for i in range(0, len(words), 600)]


def timed_decode(llm, tokens: list[int], n: int) -> tuple[float, int]:
    eos = llm.token_eos()
    t0 = time.perf_counter()
    out = llm.create_completion(tokens, max_tokens=n, temperature=0, logit_bias={eos: -1e9})
    return time.perf_counter() - t0, out["usage"]["completion_tokens"]


def kv_bytes_per_cell(llm) -> int:
    from edgemerge.native import kvmerge

    s = kvmerge.kv_shape(llm)
    p = llm.context_params
    return s.n_layer * (
        row_bytes(int(p.type_k), s.n_head_kv * s.head_dim_k)
        + row_bytes(int(p.type_v), s.n_head_kv * s.head_dim_v)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--logical", type=int, default=16384)
    ap.add_argument("--cells", type=int, default=4096)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()

    n_batch = 512
    settings = MergeSettings(budget=args.cells - n_batch - 64, slack=64)
    merged = Llama(
        args.model,
        merge=settings,
        n_ctx=args.cells,
        n_batch=n_batch,
        n_threads=args.threads,
        verbose=False,
        seed=0,
    )
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."}]
    turns = 0
    t0 = time.perf_counter()
    for chunk in corpus():
        if merged.n_tokens >= args.logical - 700:
            break
        messages.append({"role": "user", "content": chunk + "\n\nSummarise that in one line."})
        reply = merged.create_chat_completion(messages=messages, max_tokens=32, temperature=0)
        messages.append(reply["choices"][0]["message"])
        turns += 1
        print(
            f"turn {turns}: {merged.n_tokens} logical tokens, {merged.merge_stats().cells} cells",
            file=sys.stderr,
        )
    chat_s = time.perf_counter() - t0
    stream = [int(t) for t in merged.input_ids[: merged.n_tokens]]
    m_dec_s, m_dec_n = timed_decode(merged, stream, args.decode)
    st = merged.merge_stats()
    bpc = st.bytes_per_cell
    del merged

    full = Llama(
        args.model,
        merge=None,
        n_ctx=len(stream) + args.decode + 8,
        n_batch=n_batch,
        n_threads=args.threads,
        verbose=False,
        seed=0,
    )
    t0 = time.perf_counter()
    full.eval(stream)
    full_prefill_s = time.perf_counter() - t0
    f_dec_s, f_dec_n = timed_decode(full, stream, args.decode)
    full_cells = full.n_ctx()

    print(f"command: python bench/long_context.py {' '.join(sys.argv[1:])}")
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; "
        f"edgemerge {edgemerge.__version__}; model {args.model}; {args.threads} threads"
    )
    print(
        f"conversation: {turns} chat turns, {len(stream)} logical tokens; merging "
        f"{st.merges} sets, {st.cells_merged} cells merged, {st.cells_evicted} evicted, "
        f"mean merge error {st.mean_merge_error:.3f}, {st.merge_time_s:.1f} s merging of "
        f"{chat_s:.0f} s chatting\n"
    )
    print(
        "| cache | cells allocated | cells in use | KV allocated (MB) | KV in use (MB) "
        "| decode tok/s at the end |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| edgemerge, merging | {args.cells} | {st.cells} | {args.cells * bpc / 1e6:.1f} | "
        f"{st.kv_bytes / 1e6:.1f} | {m_dec_n / m_dec_s:.1f} |"
    )
    print(
        f"| full cache (merge=None) | {full_cells} | {len(stream)} | "
        f"{full_cells * kv_bytes_per_cell(full) / 1e6:.1f} | {len(stream) * bpc / 1e6:.1f} | "
        f"{f_dec_n / f_dec_s:.1f} |"
    )
    print(f"\nfull-cache prefill of the {len(stream)} tokens: {full_prefill_s:.0f} s")


if __name__ == "__main__":
    main()
