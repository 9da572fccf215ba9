"""Calibrated per-layer merge thresholds against one global threshold, on real KV.

    python bench/calibration_vs_global.py [--model qwen2.5-coder-0.5b] [--tokens 1500]

Calibration runs on one text (GPL-3, what ``edgemerge calibrate`` uses by default)
and the comparison on another (a Python stdlib source), so the calibrated numbers
are held out. For each budget (share of cells kept) the KV of the evaluation text
(captured with :func:`edgemerge.capture.capture_kv`, f16 cache as at runtime) is
cut into merging sets by the runtime planner's rule (edgemerge/planner.py), with
the reference kernels:

- pair score: centred adjacent-key cosine averaged over the latter half of the
  cache layers and all heads, minus the threshold (per layer, then averaged, for
  calibrated thresholds);
- sinks (16) and the recent window (256) are never merged; sets stay inside one
  block of 16; a pair whose merge error estimate exceeds ``max_merge_error`` (0.6)
  never joins;
- every pair at or above the threshold merges, and the threshold relaxes only as
  far as the budget needs (``merging_sets_for_budget`` with ``ceiling=0``).

Rules compared:

- ``global 0.5``: ``MergeSettings()``'s default threshold;
- ``global calibrated``: one threshold, the budget-quantile of the aggregated
  score on the calibration text;
- ``per-layer calibrated``: ``edgemerge calibrate``'s thresholds (each layer's
  budget-quantile), as the planner uses them: subtracted per layer, then averaged.
  An average of per-layer offsets shifts every pair by the same constant, so this
  ranks pairs exactly as one global threshold does; only the cut differs;
- ``per-layer, min``: the same thresholds with ``reduce="min"`` (a pair scores as
  its layer/head furthest below its layer's threshold), a rule under which
  per-layer thresholds do change which pairs merge first;
- ``budget only``: no threshold, the budget alone decides (the reference point).

Sets are merged with Gaussian weights around the member of largest key norm
(``sigma_rel = 1``, direction/magnitude merge: the runtime's defaults). Reported:
cells kept / tokens, and key reconstruction error: per set from
``reference.error.key_reconstruction_error`` (mean over merged sets) and over the
whole cache (``sqrt(sum ||K - k_merged||^2 / sum ||K||^2)``, unmerged cells exact).
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from edgemerge.calibration import default_text, layer_thresholds
from edgemerge.capture import capture_kv
from edgemerge.models import resolve_model
from edgemerge.planner import pair_error
from edgemerge.reference._checks import layer_selection
from edgemerge.reference.error import key_reconstruction_error
from edgemerge.reference.gaussian import group_gaussian_weights
from edgemerge.reference.merge import merge_kv
from edgemerge.reference.merging_sets import merging_sets_for_budget, set_ranges
from edgemerge.reference.similarity import adjacent_similarity, aggregate_similarity
from edgemerge.settings import MergeSettings

BUDGETS = (0.5, 0.35, 0.25)


def tokens_of(llm: object, text: str, n: int) -> list[int]:
    tokens = llm.tokenize(text.encode(), add_bos=False)
    if len(tokens) < n:
        raise SystemExit(f"the text has only {len(tokens)} tokens, fewer than --tokens {n}")
    return tokens[:n]


def run_rule(
    keys: np.ndarray,
    values: np.ndarray,
    sim: np.ndarray,
    score: np.ndarray,
    budget: float,
    ceiling: float | None,
    s: MergeSettings,
) -> dict[str, float]:
    """Cut sets by the planner's rule, merge them, measure cells and key error."""
    n = keys.shape[2]
    pos = np.arange(n)
    layers = layer_selection(None, sim.shape[0])
    raw = aggregate_similarity(sim, layers)
    protected = (pos < s.sinks) | (pos >= n - s.recent)
    blocks = pos // s.block_size
    allowed = (blocks[:-1] == blocks[1:]) & (pair_error(raw) <= s.max_merge_error)
    target = max(1, math.floor(budget * n))
    sets = merging_sets_for_budget(
        score,
        target,
        protected=protected,
        allowed=allowed,
        max_size=s.block_size,
        ceiling=ceiling,
    )
    starts, ends = set_ranges(sets.set_ids)
    multi = np.flatnonzero(ends - starts > 1)
    members = np.concatenate([np.arange(starts[g], ends[g]) for g in multi]).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(ends[multi] - starts[multi])]).astype(np.int32)
    norms = np.linalg.norm(keys, axis=3).mean(axis=(0, 1))
    pivots = np.array(
        [starts[g] + int(np.argmax(norms[starts[g] : ends[g]])) for g in multi], np.int32
    )
    w = group_gaussian_weights(keys, members, offsets, pivots, sigma_rel=s.sigma)
    merged_k, _ = merge_kv(keys, values, members, offsets, w, magnitude=s.magnitude)
    per_set = key_reconstruction_error(keys, merged_k, members, offsets)
    group_of = np.repeat(np.arange(len(multi)), np.diff(offsets))
    diff = keys[:, :, members] - merged_k[:, :, group_of]
    total = math.sqrt(float((diff.astype(np.float64) ** 2).sum()) / float((keys**2).sum()))
    return {
        "kept": sets.n_cells / n,
        "met": sets.met,
        "sets": len(multi),
        "set_error": float(per_set.mean()) if per_set.size else 0.0,
        "cache_error": total,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="registry name or GGUF path")
    ap.add_argument("--tokens", type=int, default=1500, help="tokens of each text")
    args = ap.parse_args(argv)
    import llama_cpp  # after edgemerge (imported above), so it loads the patched libllama

    path = resolve_model(args.model)
    s = MergeSettings()
    cal_text, cal_source = default_text()
    eval_source = inspect.getsourcefile(argparse)
    eval_text = Path(eval_source).read_text()
    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    cal_tokens = tokens_of(vocab, cal_text, args.tokens)
    eval_tokens = tokens_of(vocab, eval_text, args.tokens)
    del vocab

    t0 = time.perf_counter()
    cal = capture_kv(str(path), cal_tokens, n_obs=0, flash_attn=True)
    ev = capture_kv(str(path), eval_tokens, n_obs=0, flash_attn=True)
    capture_s = time.perf_counter() - t0
    layers = layer_selection(None, len(cal.layers))
    cal_sim = adjacent_similarity(cal.keys, centre=True)
    ev_sim = adjacent_similarity(ev.keys, centre=True)
    cal_score = aggregate_similarity(cal_sim, layers)
    ev_raw = aggregate_similarity(ev_sim, layers)

    shown_args = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"$ python bench/calibration_vs_global.py {shown_args}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}"
    )
    print(
        f"model: {path.name}; cache layers {list(cal.layers)} (similarity over the latter half: "
        f"{[cal.layers[i] for i in layers]}); {args.tokens} tokens each of calibration text "
        f"{cal_source} and evaluation text {eval_source}; capture {capture_s:.1f} s"
    )
    print(
        "runtime rule: sinks 16, recent 256, blocks of 16, max_merge_error 0.6; Gaussian "
        "merge (sigma_rel 1, magnitude)\n"
    )
    header = (
        f"{'budget':>6}  {'rule':<22} {'threshold':>17}  {'kept':>6}  {'sets':>5}  "
        f"{'key err/set':>11}  {'key err/cache':>13}"
    )
    print(header)
    print("-" * len(header))
    for budget in BUDGETS:
        per_layer = layer_thresholds(cal_sim, budget)
        global_cal = float(np.quantile(cal_score, budget))
        rules = {
            "global 0.5": (ev_raw - np.float32(0.5), 0.0, "0.500"),
            "global calibrated": (ev_raw - np.float32(global_cal), 0.0, f"{global_cal:.3f}"),
            "per-layer calibrated": (
                aggregate_similarity(ev_sim, layers, layer_offsets=per_layer),
                0.0,
                f"{per_layer[layers].min():.2f}..{per_layer[layers].max():.2f}",
            ),
            "per-layer, min": (
                aggregate_similarity(ev_sim, layers, reduce="min", layer_offsets=per_layer),
                0.0,
                "same",
            ),
            "budget only": (ev_raw, None, "-"),
        }
        for name, (score, ceiling, shown) in rules.items():
            r = run_rule(ev.keys, ev.values, ev_sim, score, budget, ceiling, s)
            kept = f"{r['kept']:.3f}" + ("" if r["met"] else "*")
            print(
                f"{budget:>6.2f}  {name:<22} {shown:>17}  {kept:>6}  {r['sets']:>5}  "
                f"{r['set_error']:>11.4f}  {r['cache_error']:>13.4f}"
            )
        print()
    print("kept: cells after merging / tokens (* = budget not met by merging alone)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
