"""Calibrated per-layer merge thresholds against one global threshold, on real KV.

    python bench/calibration_vs_global.py [--model qwen2.5-coder-0.5b] [--tokens 1500]

Calibration runs on one text (GPL-3, what ``edgemerge calibrate`` uses by default)
and the comparison on another (a Python stdlib source), so the calibrated numbers
are held out. For each budget (share of cells kept) the KV of the evaluation text
(captured with :func:`edgemerge.native.capture.capture_kv`, f16 cache as at runtime) is
planned by :func:`edgemerge.merging.policy.plan` (the rule both BlockMerges run) on the
features the runtime computes (:func:`edgemerge.methods.blockmerge.snapshot_features`),
with ``MergeSettings()`` but for the threshold and ``retain_top=0`` (so that only the
threshold rule differs): sinks 16, recent 256, sets inside one block of 16, the
error estimate under ``max_merge_error``; every pair at or above the threshold
merges, and the threshold relaxes only as far as the budget needs.

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
- ``budget only``: ``threshold=1``, the budget alone decides (the reference point).

The ``per-layer, min`` row hands the policy its own pair scores (``plan(score=...)``);
every other row is a MergeSettings. Sets are merged as the plan says (its pivots
and Gaussian weights, direction/magnitude merge: the runtime's defaults). Reported:
cells kept / tokens, and key reconstruction error: per set from
``reference.error.key_reconstruction_error`` (mean over merged sets) and over the
whole cache (``sqrt(sum ||K - k_merged||^2 / sum ||K||^2)``, unmerged cells exact).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from edgemerge.merging import policy
from edgemerge.merging.calibration import default_text, layer_thresholds
from edgemerge.methods.blockmerge import snapshot_features
from edgemerge.models import resolve_model
from edgemerge.native.capture import capture_kv
from edgemerge.reference._checks import layer_selection
from edgemerge.reference.error import key_reconstruction_error
from edgemerge.reference.merge import merge_kv
from edgemerge.reference.similarity import adjacent_similarity, aggregate_similarity
from edgemerge.settings import CALIBRATED, MergeSettings

BUDGETS = (0.5, 0.35, 0.25)


def tokens_of(llm: object, text: str, n: int) -> list[int]:
    tokens = llm.tokenize(text.encode(), add_bos=False)
    if len(tokens) < n:
        raise SystemExit(f"the text has only {len(tokens)} tokens, fewer than --tokens {n}")
    return tokens[:n]


def run_rule(
    snapshot: object,
    feats: policy.PlanningFeatures,
    budget: float,
    s: MergeSettings,
    *,
    layer_thresholds: np.ndarray | None = None,
    score: np.ndarray | None = None,
) -> dict[str, float]:
    """Plan with the policy, merge the sets as planned, measure cells and key error."""
    keys, values = snapshot.keys, snapshot.values
    n = keys.shape[2]
    target = max(1, math.floor(budget * n))
    p = policy.plan(feats, s, target, layer_thresholds=layer_thresholds, score=score)
    merged_k, _ = merge_kv(keys, values, p.members, p.offsets, p.weights, magnitude=s.magnitude)
    per_set = key_reconstruction_error(keys, merged_k, p.members, p.offsets)
    group_of = np.repeat(np.arange(p.n_group), np.diff(p.offsets))
    diff = keys[:, :, p.members] - merged_k[:, :, group_of]
    total = math.sqrt(float((diff.astype(np.float64) ** 2).sum()) / float((keys**2).sum()))
    return {
        "kept": p.starts.size / n,  # cells after merging, before any eviction
        "met": bool(p.keep.all()),
        "sets": p.n_group,
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
    s = MergeSettings(retain_top=0.0)
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
    cal_sim = adjacent_similarity(cal.keys, centre=s.centre)
    feats = snapshot_features(ev.snapshot, centre=s.centre)
    cal_score = aggregate_similarity(cal_sim, layers)

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
    print(f"policy: edgemerge.merging.policy.plan with {s} (threshold per row)\n")
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
            "global 0.5": (dict(threshold=0.5), {}, "0.500"),
            "global calibrated": (dict(threshold=global_cal), {}, f"{global_cal:.3f}"),
            "per-layer calibrated": (
                dict(threshold=CALIBRATED),
                dict(layer_thresholds=per_layer),
                f"{per_layer[layers].min():.2f}..{per_layer[layers].max():.2f}",
            ),
            "per-layer, min": (
                dict(threshold=CALIBRATED),
                dict(
                    layer_thresholds=per_layer,
                    score=aggregate_similarity(
                        feats.k_sim, layers, reduce="min", layer_offsets=per_layer
                    ),
                ),
                "same",
            ),
            "budget only": (dict(threshold=1.0), {}, "-"),
        }
        for name, (changes, extra, shown) in rules.items():
            rule = dataclasses.replace(s, **changes)
            r = run_rule(ev.snapshot, feats, budget, rule, **extra)
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
