"""The online BlockMerge planner: which cells of a live cache to merge, and how.

It decides from the small per-cell features the patched cache computes on its
own backend (:func:`edgemerge.kvmerge.kv_features`) and the cell list
(:func:`edgemerge.kvcells.list_cells`); the keys never come to the host. The
rule, with the set logic shared with the reference kernels
(:mod:`edgemerge.reference.merging_sets`):

1. Cells are in position order. The sinks and the recent window are protected;
   so are the ``retain_top`` most distinctive candidates (least similar to both
   neighbours: the query-free retention proxy).
2. Each adjacent pair scores its centred key cosine, averaged over the
   similarity layers and all heads. With calibrated thresholds each layer's
   threshold is subtracted first (so 0 means "at threshold"); with a global
   threshold it is subtracted from the mean.
3. Pairs may join only inside one block of ``block_size`` positions, so a set
   never spans more than a block. A pair whose estimated error exceeds
   ``max_merge_error`` never joins: such a set is split at its weakest link.
   Error estimate for unit keys with cosine ``c``: the distance of each to
   their normalised mean, ``sqrt(2 - 2 sqrt((1 + c) / 2))``; a set's error is
   its largest pair error.
4. Every pair scoring at or above the threshold merges; below it, the
   threshold relaxes (bisection) only as far as the budget needs.
5. Within a set the pivot is the member carrying the most mass (a merged cell
   carries ``exp(bias)`` tokens). Weights per layer and head are a Gaussian
   kernel of the chain distance to the pivot (sum of ``2 (1 - c)`` along the
   run, the squared chord length for small angles), with ``sigma`` relative to
   the mean distance, times each member's mass. The destination is the pivot,
   the bias is ``log`` of the total mass, the span the union of spans.
6. If merging alone cannot meet the budget, the oldest unprotected cells are
   evicted (``eviction="position"``), or :class:`BudgetError` is raised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgemerge.kvcells import KVCells
from edgemerge.kvmerge import KVFeatures, KVShape, MergeGroups
from edgemerge.reference.merging_sets import merging_sets_for_budget, set_ranges
from edgemerge.reference.similarity import aggregate_similarity
from edgemerge.settings import CALIBRATED, LATTER_HALF, MergeSettings, SettingsError


class BudgetError(RuntimeError):
    """Merging cannot bring the sequence within its budget and eviction is off."""


@dataclass(frozen=True)
class MergePlan:
    """What to do to one sequence.

    Attributes:
        groups: the merges (empty when none are needed).
        evict_spans: int32 [k, 2] position ranges (inclusive) to evict after merging, oldest
            first; each is one whole set, so removing the range removes exactly its cell.
        threshold: pair score at which the sets were cut (inf: no merge needed).
        errors: float32 [n_group] estimated relative error of each merged set.
        n_before, n_after: cells before and after the plan.
    """

    groups: MergeGroups
    evict_spans: np.ndarray
    threshold: float
    errors: np.ndarray
    n_before: int
    n_after: int


def pair_error(cos: np.ndarray) -> np.ndarray:
    """Distance of two unit vectors with cosine ``cos`` to their normalised mean."""
    c = np.clip(cos, -1.0, 1.0)
    return np.sqrt(np.maximum(0.0, 2.0 - 2.0 * np.sqrt((1.0 + c) / 2.0)))


@dataclass(frozen=True)
class BlockMergePlanner:
    """Plans merges for a cache of the given shape under ``settings``.

    Attributes:
        settings: the merge policy.
        shape: the mergeable cache (from :func:`edgemerge.kvmerge.kv_shape`).
        layer_thresholds: float32 [n_layer] calibrated thresholds of the cache layers
            (required when ``settings.threshold == "calibrated"``).
    """

    settings: MergeSettings
    shape: KVShape
    layer_thresholds: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.settings.threshold == CALIBRATED:
            if self.layer_thresholds is None:
                raise ValueError(
                    "threshold: 'calibrated' needs per-layer thresholds; run `edgemerge calibrate` "
                    "on the model, or give a number"
                )
            if len(self.layer_thresholds) != self.shape.n_layer:
                raise ValueError(
                    f"calibration has {len(self.layer_thresholds)} layer thresholds, the cache "
                    f"has {self.shape.n_layer} layers"
                )
        self.similarity_layers()  # an index beyond the cache fails now, not mid-chat

    def similarity_layers(self) -> list[int] | None:
        layers = self.settings.similarity_layers
        if layers == LATTER_HALF:
            return None
        bad = [i for i in layers if i >= self.shape.n_layer]
        if bad:
            raise SettingsError(
                f"similarity_layers {bad} are beyond the cache's {self.shape.n_layer} layers"
            )
        return list(layers)

    def plan(self, cells: KVCells, feats: KVFeatures, n_logical: int, target: int) -> MergePlan:
        """Plan merges (and evictions) so that ``cells`` fit in ``target`` cells.

        Args:
            cells: the sequence's cells in position order.
            feats: :func:`edgemerge.kvmerge.kv_features` of exactly those cells.
            n_logical: logical tokens of the sequence (defines the recent window).
            target: the most cells wanted after the plan (>= 1).
        """
        s = self.settings
        n = len(cells)
        pos = cells.pos.astype(np.int64)
        mass = np.exp(cells.bias.astype(np.float64)) if s.attention_bias else np.ones(n)

        protected = (pos < s.sinks) | (pos >= n_logical - s.recent)
        layers = self.similarity_layers()
        raw = aggregate_similarity(feats.k_sim, layers)  # [n-1]
        if s.threshold == CALIBRATED:
            score = aggregate_similarity(feats.k_sim, layers, layer_offsets=self.layer_thresholds)
            ceiling = 0.0
        else:
            score = raw - np.float32(s.threshold)
            ceiling = 0.0

        if s.retain_top > 0 and n > 2:
            left = np.concatenate([[-np.inf], raw])
            right = np.concatenate([raw, [-np.inf]])
            distinct = 1.0 - np.maximum(left, right)
            cand = np.flatnonzero(~protected)
            k = int(math.floor(s.retain_top * cand.size))
            if k > 0:
                protected[cand[np.argsort(-distinct[cand], kind="stable")[:k]]] = True

        blocks = pos // s.block_size
        allowed = (blocks[:-1] == blocks[1:]) & (pair_error(raw) <= s.max_merge_error)
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
        groups, errors = self._groups(cells, feats, raw, mass, starts[multi], ends[multi])

        n_after = sets.n_cells
        evict = np.zeros((0, 2), np.int32)
        if n_after > target:
            if s.eviction == "none":
                raise BudgetError(
                    f"merging can bring this sequence to {n_after} cells at best, over its budget "
                    f"of {target}; raise the budget, lower max_merge_error's strictness, or allow "
                    "eviction (eviction='position')"
                )
            evict = self._evictions(cells, protected, starts, ends, n_after - target)
            n_after -= len(evict)
        return MergePlan(
            groups,
            evict,
            sets.threshold + (0.0 if s.threshold == CALIBRATED else float(s.threshold)),
            errors,
            n,
            n_after,
        )

    def _groups(self, cells, feats, raw, mass, starts, ends) -> tuple[MergeGroups, np.ndarray]:
        s = self.settings
        L, H = self.shape.n_layer, self.shape.n_head_kv
        dst, offs, bias, span, errors = [], [0], [], [], []
        src_all: list[int] = []
        wk_cols: list[np.ndarray] = []
        # squared chord length between adjacent cells, per layer and head: [L, H, n-1]
        step = 2.0 * (1.0 - np.clip(feats.k_sim.astype(np.float64), -1.0, 1.0))
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            idx = np.arange(a, b)
            m = mass[idx]
            p = int(np.argmax(m + 1e-6 * feats.k_norm[:, :, idx].mean(axis=(0, 1))))
            # chain distance of every member to the pivot: cumulative steps along the run
            cum = np.concatenate(
                [np.zeros((L, H, 1)), np.cumsum(step[:, :, a : b - 1], axis=2)], axis=2
            )
            d2 = np.abs(cum - cum[:, :, p : p + 1])
            if s.sigma > 0 and d2.shape[2] > 1:
                mean_d2 = d2.sum(axis=2, keepdims=True) / (d2.shape[2] - 1)
                sig2 = (s.sigma**2) * np.where(mean_d2 > 0, mean_d2, 1.0)
                g = np.exp(-d2 / (2.0 * sig2)) * m[None, None, :]
            else:
                g = np.broadcast_to(m[None, None, :], d2.shape).copy()
            w = g / g.sum(axis=2, keepdims=True)
            wk_cols.append(w)
            src_all.extend(int(c) for c in cells.cell[idx])
            offs.append(len(src_all))
            dst.append(int(cells.cell[a + p]))
            bias.append(math.log(m.sum()) if s.attention_bias else 0.0)
            span.append((int(cells.span_min[idx].min()), int(cells.span_max[idx].max())))
            errors.append(float(pair_error(raw[a : b - 1]).max()))
        if wk_cols:
            w = np.concatenate(wk_cols, axis=2).transpose(0, 2, 1).astype(np.float32)  # [L,n_src,H]
            w = np.ascontiguousarray(w)
        else:
            w = np.zeros((L, 0, H), np.float32)
        groups = MergeGroups(
            dst=np.array(dst, np.uint32),
            offsets=np.array(offs, np.int32),
            src=np.array(src_all, np.uint32),
            bias=np.array(bias, np.float32),
            span=np.array(span, np.int32).reshape(-1, 2),
            w_k=w,
            w_v=w,
        )
        return groups, np.array(errors, np.float32)

    @staticmethod
    def _evictions(cells, protected, starts, ends, n_evict) -> np.ndarray:
        """Spans of the oldest unprotected sets left after merging."""
        out: list[tuple[int, int]] = []
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            if len(out) == n_evict:
                break
            if b - a == 1 and protected[a]:
                continue
            out.append((int(cells.span_min[a:b].min()), int(cells.span_max[a:b].max())))
        if len(out) < n_evict:
            raise BudgetError(
                f"the budget leaves no room: {n_evict} more cells must go but only the sinks "
                "and the recent window remain; raise the budget or shrink sinks/recent"
            )
        return np.array(out, np.int32).reshape(-1, 2)
