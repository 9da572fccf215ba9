"""Kernel benchmark: GGML_OP_MERGE_ROWS throughput per cache type, as a share of copy bandwidth.

The op reads every member row (dequantizing it) and writes one f32 row per group,
so it is memory-bound; the table gives the bytes it moves per second beside the
machine's copy bandwidth (a large numpy copy, measured in the same run) and their
ratio. Shapes follow Qwen2.5-0.5B's KV rows (2 KV heads x 64) and Gemma 3 270M's
(1 x 256); groups of 8 members. On the CPU both of the kernel's paths run, one after
the other per row of the table: the vec-helper path (EDGEMERGE_MERGE_ROWS_VEC=1) and
the fused per-head path, where the build has it (it is the same path otherwise).

    python bench/merge_rows.py [--backend CPU] [--rows 65536] [--iters 20] [--order random]
        [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

from edgemerge.native import ops
from edgemerge.reference.ggml_quants import quantize_rows, row_bytes

TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0"]
SHAPES = [("qwen2.5-0.5b", 2, 64), ("gemma-3-270m", 1, 256)]


def copy_bandwidth(n_bytes: int = 512 << 20, reps: int = 5) -> float:
    """Bytes moved per second (read + write) by a large memory copy."""
    src = np.ones(n_bytes, np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="CPU")
    p.add_argument("--rows", type=int, default=65536, help="member rows read per run")
    p.add_argument("--group", type=int, default=8, help="members per group")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument(
        "--order",
        choices=["random", "adjacent"],
        default="random",
        help="members in a random permutation of the rows, or adjacent rows (as the planner "
        "merges runs of neighbouring cells)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="backend threads (default: the cores, as llama.cpp runs the merge graphs)",
    )
    args = p.parse_args()

    ceiling = copy_bandwidth()
    print(f"command: python bench/merge_rows.py {' '.join(sys.argv[1:])}")
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; "
        f"backend {args.backend}, {args.threads} threads; members {args.order}; "
        f"copy ceiling {ceiling / 1e9:.1f} GB/s (numpy copy)\n"
    )
    print(
        "| shape | type | rows | vec path ms/run | vec GB/s | vec share of copy | "
        "fused ms/run | fused GB/s | fused share of copy | vec / fused time |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rng = np.random.default_rng(0)
    for name, n_head, hd in SHAPES:
        n_embd = n_head * hd
        x = rng.standard_normal((args.rows, n_embd)).astype(np.float32) + 1.0
        n_group = args.rows // args.group
        if args.order == "random":
            idx = rng.permutation(args.rows).astype(np.int32)
        else:
            idx = np.arange(args.rows, dtype=np.int32)
        offs = (np.arange(n_group + 1) * args.group).astype(np.int32)
        w = np.full((args.rows, n_head), 1.0 / args.group, np.float32)
        for qtype in TYPES:
            raw = x if qtype == "f32" else quantize_rows(x, qtype)
            moved = (
                args.rows * row_bytes(qtype, n_embd) + n_group * n_embd * 4 + w.nbytes + idx.nbytes
            )
            cells = []
            times = []
            for vec in (True, False):
                secs = _time(raw, qtype, n_embd, idx, w, offs, n_head, args, vec=vec)
                times.append(secs)
                gbs = moved / secs
                cells += [f"{secs * 1e3:.2f}", f"{gbs / 1e9:.2f}", f"{gbs / ceiling:.2f}"]
            print(
                f"| {name} ({n_head}x{hd}) | {qtype} | {args.rows} | {' | '.join(cells)} | "
                f"{times[0] / times[1]:.2f} |"
            )


def _time(raw, qtype, n_embd, idx, w, offs, n_head, args, *, vec: bool) -> float:  # noqa: ANN001
    """Seconds per run of the op on one of the CPU kernel's two paths."""
    if vec:
        os.environ["EDGEMERGE_MERGE_ROWS_VEC"] = "1"
    try:
        _, secs = ops.time_merge_rows(
            raw,
            qtype,
            n_embd,
            idx,
            w,
            offs,
            n_head,
            backend=args.backend,
            n_iter=args.iters,
            n_threads=args.threads,
        )
    finally:
        os.environ.pop("EDGEMERGE_MERGE_ROWS_VEC", None)
    return secs


if __name__ == "__main__":
    main()
