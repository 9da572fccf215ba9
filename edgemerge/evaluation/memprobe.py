"""Speed and peak memory of one native configuration, optionally in a child process.

Peak RSS is a per-process high-water mark, so a configuration measured inside a
process that already ran others would report their peak. ``run_in_child`` runs the
probe in a fresh interpreter (``python -m edgemerge.evaluation.memprobe``, the probe
as JSON on stdin) and reads its ``ru_maxrss`` back.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Probe:
    """One native run: prefill ``tokens``, then decode ``n_decode`` greedy tokens.

    ``budget``: cells for ``edgemerge.Llama`` merging; None: a plain cache.
    """

    model_path: str
    cache_type: str
    n_ctx: int
    n_batch: int
    n_threads: int
    budget: int | None
    tokens: list[int]
    n_decode: int
    recent: int
    merge: tuple[tuple[str, object], ...] = ()  # other MergeSettings fields


@dataclass(frozen=True)
class Measured:
    """``merge_share``: merge seconds over prefill seconds. ``peak_rss``: bytes."""

    prefill_tok_s: float
    decode_tok_s: float
    merge_share: float
    cells: int
    peak_rss: int


def run(probe: Probe) -> Measured:
    """Run ``probe`` in this process (its peak RSS is this process's so far)."""
    import llama_cpp

    from edgemerge.evaluation.suite import native_llama

    llm = native_llama(
        probe.model_path,
        probe.cache_type,
        n_ctx=probe.n_ctx,
        n_batch=probe.n_batch,
        n_threads=probe.n_threads,
        budget=probe.budget,
        recent=probe.recent,
        merge_fields=dict(probe.merge),
    )
    try:
        n_vocab = llm.n_vocab()
        t0 = time.perf_counter()
        llm.eval(probe.tokens)
        prefill_s = time.perf_counter() - t0
        merge_s = llm.merge_stats().merge_time_s if probe.budget is not None else 0.0
        t0 = time.perf_counter()
        for _ in range(probe.n_decode):
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)
            )
            llm.eval([int(np.argmax(logits))])
        decode_s = time.perf_counter() - t0
        mem = llama_cpp.llama_get_memory(llm.ctx)
        cells = int(llama_cpp.llama_memory_seq_pos_max(mem, 0)) + 1
        if probe.budget is not None:
            cells = llm.merge_stats().cells
    finally:
        llm.close()
    return Measured(
        prefill_tok_s=len(probe.tokens) / prefill_s,
        decode_tok_s=probe.n_decode / decode_s if probe.n_decode else 0.0,
        merge_share=merge_s / prefill_s,
        cells=cells,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )


def run_in_child(probe: Probe) -> Measured:
    """Run ``probe`` in a fresh Python; its own peak RSS is measured.

    Raises:
        RuntimeError: the child failed (its stderr is in the message).
    """
    import edgemerge

    # the child imports this very edgemerge, not one its working folder would shadow it with
    env = dict(os.environ)
    root = str(Path(edgemerge.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONSAFEPATH"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "edgemerge.evaluation.memprobe"],
        input=json.dumps(asdict(probe)),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the memory probe failed: {proc.stderr.strip()[-2000:]}")
    return Measured(**json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> int:
    import edgemerge  # noqa: F401  # points llama_cpp at the patched libllama

    probe = Probe(**json.loads(sys.stdin.read()))
    print(json.dumps(asdict(run(probe))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
