"""The BlockMerge policy: which neighbouring cells to merge, and how. Pure numpy.

Both BlockMerges run this one function, :func:`plan`:

- online, :class:`edgemerge.merging.planner.BlockMergePlanner` feeds it the features the
  patched cache computes on its own backend (:func:`edgemerge.native.kvmerge.kv_features`)
  and the cell list (:func:`edgemerge.native.kvcells.list_cells`), and turns the plan into
  :class:`edgemerge.native.kvmerge.MergeGroups`;
- offline, :class:`edgemerge.methods.blockmerge.BlockMerge` computes the same
  features from a captured :class:`~edgemerge.methods.base.KVSnapshot`
  (:func:`edgemerge.methods.blockmerge.snapshot_features`) and applies the plan
  with the reference merge.

Input: :class:`PlanningFeatures` of ``n`` cells in position order, a
:class:`~edgemerge.settings.MergeSettings` and a target cell count. The rule:

1. Protected cells: the sinks (position < ``sinks``), the recent window (position
   >= ``n_logical - recent``) and, among the other cells (the candidates), the
   ``floor(retain_top * n_candidates)`` most distinctive ones: least similar to
   either neighbour (``1 - max(left, right score)``), the query-free retention proxy.
2. Pair score: adjacent-key cosine (centred on the mean key of the cells when
   ``centre``; that is what the features hold) averaged over the similarity layers
   and all heads, minus ``threshold``; with ``threshold="calibrated"`` each layer's
   calibrated threshold is subtracted before averaging. So 0 means "at threshold".
3. Allowed pairs: both cells in one block of ``block_size`` positions (a set never
   spans two blocks), and the pair's error estimate at most ``max_merge_error``.
   Estimate for unit keys with cosine ``c``: the distance of each to their
   normalised mean, ``sqrt(2 - 2 sqrt((1 + c) / 2))``, on the averaged cosine; a
   set's error is its largest pair error.
4. Sets (:func:`edgemerge.reference.merging_sets.merging_sets_for_budget`): runs
   of unprotected cells joined by allowed pairs. Every pair scoring >= 0 joins; if
   the sets still exceed the target, the cut relaxes (bisection) only as far as the
   target needs. ``threshold=1`` thus merges only what the target needs.
5. Eviction: if merging every allowed pair still leaves more than the target, whole
   sets are evicted, oldest first, sinks and recent cells never and retained cells
   last (``eviction="position"``), or :class:`BudgetError` is raised (``"none"``).
6. Merge of each remaining set of two or more cells: the pivot (destination) is
   the member carrying the most mass (a cell carries ``exp(bias)`` tokens with
   ``attention_bias``, else 1; ties: larger mean key norm, then the earlier cell).
   Weights per layer and head: a Gaussian kernel of the chain distance to the pivot
   (sum of ``2 (1 - c)`` along the run, the squared chord between unit keys for
   small angles) with width ``sigma`` times the mean distance, times each member's
   mass, normalised. Bias: ``log`` of the total mass (0 without ``attention_bias``);
   span: the union of the members' spans. Keys merge by direction and magnitude
   (``magnitude``; SLERP for pairs), values by the weighted mean: the caller applies
   this (native ``kv_merge`` or ``reference.merge.merge_kv``).

Rules the offline method had and the online planner did not, and where they went
(the ablations are those of docs/fidelity.md, offline, Qwen 0.5B and Gemma 270M):

- SimHash-gated block crossing: gone. It needs the keys (the device returns only
  features), no ablation measured it, and sets that stay in one block keep every
  set at most ``block_size`` cells, which the error estimate of step 3 assumes.
- Measured error check (merge, measure key and attention-output error, split, plan
  again): gone; the closed-form estimate of step 3 (``max_merge_error``) is the
  error control. The measured check needed keys and observation queries, and no
  ablation isolated it.
- Importance-based retention (accumulated attention, ``ceil``) and importance
  pivots, the block-value penalty, importance eviction order: gone. Retention
  itself helps (switching it off cost +0.155 recall NLL on Qwen, +0.178 on
  Gemma), so it stays as ``retain_top`` with the query-free proxy of step 1:
  the product runs with flash attention, where attention mass does not exist.
- Merge only what the budget needs: a setting now, ``threshold=1`` (no centred
  cosine exceeds 1, so only the target makes pairs join).
- Centring: a setting, ``centre`` (the ablation: recall NLL 0.358 without it
  against 0.696 with it at 50% on Qwen; about equal on Gemma).
- ``sigma_rel`` is ``sigma``; the Gaussian ablation (+0.056 recall NLL when off) is
  ``sigma=1e6``, a flat kernel, i.e. mass shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgemerge.reference.merging_sets import merging_sets_for_budget, set_ranges
from edgemerge.reference.similarity import aggregate_similarity
from edgemerge.settings import CALIBRATED, LATTER_HALF, MergeSettings, SettingsError


class BudgetError(RuntimeError):
    """Merging cannot bring the sequence within its budget and eviction is off."""


@dataclass(frozen=True, eq=False)
class PlanningFeatures:
    """What the policy decides from, for ``n`` cells of one sequence in position order.

    Attributes:
        k_sim: float32 [n_layer, n_head_kv, n - 1], cosine of adjacent keys per layer
            and head (centred on the mean key of the ``n`` cells when the settings say
            ``centre``).
        k_norm: float32 [n_layer, n_head_kv, n], key norm per cell.
        v_norm: float32 [n_layer, n_head_kv, n], value norm per cell.
        positions: int32 [n], non-decreasing.
        spans: int32 [n, 2], first and last position each cell covers.
        bias: float32 [n], attention bias per cell (``log`` of the tokens it stands for).
        n_logical: logical tokens of the sequence (the recent window ends there).
    """

    k_sim: np.ndarray
    k_norm: np.ndarray
    v_norm: np.ndarray
    positions: np.ndarray
    spans: np.ndarray
    bias: np.ndarray
    n_logical: int

    def __post_init__(self) -> None:
        n = len(self.positions)
        if n < 2:
            raise ValueError(f"planning needs at least 2 cells, got {n}")
        k_norm = np.asarray(self.k_norm, np.float32)
        if k_norm.ndim != 3 or k_norm.shape[2] != n:
            raise ValueError(f"k_norm must be [n_layer, n_head_kv, {n}], got {k_norm.shape}")
        dims = k_norm.shape[:2]
        for name, want in (("k_sim", (*dims, n - 1)), ("v_norm", (*dims, n))):
            got = np.shape(getattr(self, name))
            if got != want:
                raise ValueError(f"{name} must have shape {want}, got {got}")
        if np.shape(self.spans) != (n, 2) or np.shape(self.bias) != (n,):
            raise ValueError(
                f"spans must be [{n}, 2] and bias [{n}], got {np.shape(self.spans)} and "
                f"{np.shape(self.bias)}"
            )
        if not np.isfinite(self.k_sim).all():
            raise ValueError("k_sim holds NaN or inf; the cache rows are not finite")

    @property
    def n(self) -> int:
        return len(self.positions)

    @property
    def n_layer(self) -> int:
        return int(np.shape(self.k_norm)[0])


@dataclass(frozen=True, eq=False)
class Plan:
    """What to do to one sequence; every index is into the ``n`` cells given.

    Attributes:
        starts, ends: int32 [n_set], the sets ``range(starts[s], ends[s])`` tiling the cells.
        keep: bool [n_set], False for a set evicted.
        members, offsets: the merges in CSR form: group g merges cells
            ``members[offsets[g]:offsets[g + 1]]`` (int32 [n_src], int32 [n_group + 1]);
            only kept sets of two or more cells, in position order.
        pivots: int32 [n_group], the destination cell of each group (one of its members).
        weights: float32 [n_layer, n_head_kv, n_src], merge weights (per group, layer and
            head they sum to 1).
        bias: float32 [n_group], attention bias of each merged cell.
        spans: int32 [n_group, 2], first and last position each merged cell covers.
        errors: float32 [n_group], estimated relative key error of each group.
        evict_spans: int32 [n_evict, 2], the spans (inclusive) of the evicted cells, oldest
            first; removing a span removes exactly that cell. Evicted sets are not merged.
        threshold: the cut, in the units of the similarity (inf: no merge needed).
        protected: bool [n], cells that were never merge candidates.
        retained: bool [n], candidates protected by ``retain_top``.
        n_before, n_after: cells before and after the plan.
    """

    starts: np.ndarray
    ends: np.ndarray
    keep: np.ndarray
    members: np.ndarray
    offsets: np.ndarray
    pivots: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    spans: np.ndarray
    errors: np.ndarray
    evict_spans: np.ndarray
    threshold: float
    protected: np.ndarray
    retained: np.ndarray
    n_before: int
    n_after: int

    @property
    def n_group(self) -> int:
        return len(self.pivots)


def pair_error(cos: np.ndarray) -> np.ndarray:
    """Distance of two unit vectors with cosine ``cos`` to their normalised mean."""
    c = np.clip(cos, -1.0, 1.0)
    return np.sqrt(np.maximum(0.0, 2.0 - 2.0 * np.sqrt((1.0 + c) / 2.0)))


def similarity_layers(settings: MergeSettings, n_layer: int) -> list[int] | None:
    """The cache layers whose similarity counts (None: the latter half).

    Raises:
        SettingsError: an index beyond the cache's ``n_layer`` layers.
    """
    layers = settings.similarity_layers
    if layers == LATTER_HALF:
        return None
    bad = [i for i in layers if i >= n_layer]
    if bad:
        raise SettingsError(f"similarity_layers {bad} are beyond the cache's {n_layer} layers")
    return list(layers)


def check_settings(
    settings: MergeSettings, n_layer: int, layer_thresholds: np.ndarray | None
) -> np.ndarray | None:
    """Fail now, not mid-sequence, when ``settings`` do not fit a cache of ``n_layer``
    layers; returns the calibrated thresholds as float32 [n_layer] (or None)."""
    similarity_layers(settings, n_layer)
    if settings.threshold != CALIBRATED:
        return None
    if layer_thresholds is None:
        raise SettingsError(
            "threshold: 'calibrated' needs per-layer thresholds; run `edgemerge calibrate` "
            "on the model, or give a number"
        )
    off = np.asarray(layer_thresholds, np.float32)
    if off.shape != (n_layer,):
        raise SettingsError(
            f"calibration has {off.size} layer thresholds, the cache has {n_layer} layers"
        )
    if not np.isfinite(off).all():
        raise SettingsError("the calibrated thresholds of the merged layers must be finite")
    return off


def plan(
    features: PlanningFeatures,
    settings: MergeSettings,
    target: int,
    *,
    layer_thresholds: np.ndarray | None = None,
    score: np.ndarray | None = None,
) -> Plan:
    """Plan merges (and evictions) so that the cells fit in ``target`` cells (the rule:
    module docstring).

    Args:
        features: the cells' :class:`PlanningFeatures`.
        settings: the policy's knobs.
        target: the most cells wanted after the plan (>= 1).
        layer_thresholds: float32 [n_layer] calibrated thresholds of the cache layers
            (needed with ``threshold="calibrated"``).
        score: float32 [n - 1] pair scores (0 = at threshold) to use instead of step 2,
            for benchmarks that compare scoring rules; everything else is unchanged.

    Raises:
        BudgetError: the target cannot be met (eviction off, or nothing left to evict).
        SettingsError: the settings do not fit these features.
    """
    s, f = settings, features
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or target < 1:
        raise ValueError(f"target must be a cell count >= 1, got {target!r}")
    offsets = check_settings(s, f.n_layer, layer_thresholds)
    n = f.n
    pos = np.asarray(f.positions, np.int64)
    mass = np.exp(np.asarray(f.bias, np.float64)) if s.attention_bias else np.ones(n)

    fixed = (pos < s.sinks) | (pos >= f.n_logical - s.recent)  # never merged or evicted
    protected = fixed.copy()
    layers = similarity_layers(s, f.n_layer)
    raw = aggregate_similarity(f.k_sim, layers)  # [n-1]
    shift = 0.0  # what the cut is relative to, in similarity units
    if score is not None:
        score = np.asarray(score, np.float32)
        if score.shape != raw.shape:
            raise ValueError(f"score must have shape {raw.shape}, got {score.shape}")
    elif offsets is not None:
        score = aggregate_similarity(f.k_sim, layers, layer_offsets=offsets)
    else:
        shift = float(s.threshold)
        score = raw - np.float32(shift)

    retained = np.zeros(n, np.bool_)
    if s.retain_top > 0 and n > 2:
        left = np.concatenate([[-np.inf], raw])
        right = np.concatenate([raw, [-np.inf]])
        distinct = 1.0 - np.maximum(left, right)
        cand = np.flatnonzero(~protected)
        k = int(math.floor(s.retain_top * cand.size))
        if k > 0:
            retained[cand[np.argsort(-distinct[cand], kind="stable")[:k]]] = True
    protected |= retained

    blocks = pos // s.block_size
    allowed = (blocks[:-1] == blocks[1:]) & (pair_error(raw) <= s.max_merge_error)
    sets = merging_sets_for_budget(
        score, int(target), protected=protected, allowed=allowed, max_size=s.block_size, ceiling=0.0
    )
    starts, ends = set_ranges(sets.set_ids)
    keep = np.ones(starts.size, np.bool_)
    n_after = sets.n_cells
    if n_after > target:
        if s.eviction == "none":
            raise BudgetError(
                f"merging can bring this sequence to {n_after} cells at best, over its budget "
                f"of {target}; raise the budget, raise max_merge_error, or allow eviction "
                "(eviction='position')"
            )
        keep = _keep_after_eviction(fixed, retained, starts, ends, n_after - int(target))
        n_after = int(keep.sum())
    sp = np.asarray(f.spans, np.int32)
    gone = np.flatnonzero(~keep)
    # one span per evicted cell (a set that goes is not merged first)
    gone_cells = np.concatenate([np.arange(starts[g], ends[g]) for g in gone]) if gone.size else []
    evict_spans = sp[np.asarray(gone_cells, np.int64)].reshape(-1, 2).astype(np.int32)

    multi = np.flatnonzero(keep & (ends - starts > 1))
    members, offs, pivots, weights, bias, spans, errors = _groups(
        f, s, raw, mass, starts[multi], ends[multi]
    )
    threshold = sets.threshold + shift
    return Plan(
        starts=starts,
        ends=ends,
        keep=keep,
        members=members,
        offsets=offs,
        pivots=pivots,
        weights=weights,
        bias=bias,
        spans=spans,
        errors=errors,
        evict_spans=evict_spans,
        threshold=threshold,
        protected=protected,
        retained=retained,
        n_before=n,
        n_after=n_after,
    )


def _groups(
    f: PlanningFeatures,
    s: MergeSettings,
    raw: np.ndarray,
    mass: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Members, offsets, pivots, weights [L, H, n_src], bias, spans, errors of the groups."""
    L, H = np.shape(f.k_norm)[:2]
    # squared chord length between adjacent unit keys, per layer and head: [L, H, n-1]
    step = 2.0 * (1.0 - np.clip(np.asarray(f.k_sim, np.float64), -1.0, 1.0))
    sp = np.asarray(f.spans, np.int32)
    pivots, bias, spans, errors, cols = [], [], [], [], []
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        m = mass[a:b]
        tie = 1e-6 * np.asarray(f.k_norm[:, :, a:b], np.float64).mean(axis=(0, 1))
        p = int(np.argmax(m + tie))
        # chain distance of every member to the pivot: cumulative steps along the run
        cum = np.concatenate([np.zeros((L, H, 1)), np.cumsum(step[:, :, a : b - 1], axis=2)], 2)
        d2 = np.abs(cum - cum[:, :, p : p + 1])
        mean_d2 = d2.sum(axis=2, keepdims=True) / (b - a - 1)
        sig2 = (s.sigma**2) * np.where(mean_d2 > 0, mean_d2, 1.0)
        g = np.exp(-d2 / (2.0 * sig2)) * m[None, None, :]
        cols.append(g / g.sum(axis=2, keepdims=True))
        pivots.append(a + p)
        bias.append(math.log(m.sum()) if s.attention_bias else 0.0)
        spans.append((int(sp[a:b, 0].min()), int(sp[a:b, 1].max())))
        errors.append(float(pair_error(raw[a : b - 1]).max()))
    sizes = ends - starts
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    members = (
        np.concatenate([np.arange(a, b) for a, b in zip(starts, ends, strict=True)])
        if sizes.size
        else np.zeros(0)
    ).astype(np.int32)
    weights = (
        np.concatenate(cols, axis=2).astype(np.float32) if cols else np.zeros((L, H, 0), np.float32)
    )
    return (
        members,
        offsets,
        np.array(pivots, np.int32),
        weights,
        np.array(bias, np.float32),
        np.array(spans, np.int32).reshape(-1, 2),
        np.array(errors, np.float32),
    )


def _keep_after_eviction(
    fixed: np.ndarray, retained: np.ndarray, starts: np.ndarray, ends: np.ndarray, n_evict: int
) -> np.ndarray:
    """bool per set: False for the ``n_evict`` sets evicted.

    Sinks and recent cells (``fixed``) stay; the other sets go oldest first, the
    retained cells only after every other set.
    """
    single = ends - starts == 1
    evictable = np.flatnonzero(~(single & fixed[starts]))
    if evictable.size < n_evict:
        raise BudgetError(
            f"the budget leaves no room: {n_evict} more cells must go but only the sinks "
            "and the recent window remain; raise the budget or shrink sinks/recent"
        )
    late = single[evictable] & retained[starts[evictable]]
    order = evictable[np.argsort(late, kind="stable")]
    keep = np.ones(starts.size, np.bool_)
    keep[order[:n_evict]] = False
    return keep
