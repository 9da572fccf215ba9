"""The online BlockMerge planner: the policy (:mod:`edgemerge.merging.policy`) on a live cache.

It reads the small per-cell features the patched cache computes on its own backend
(:func:`edgemerge.native.kvmerge.kv_features`, centred or not as the settings say) and the
cell list (:func:`edgemerge.native.kvcells.list_cells`); the keys never come to the host.
:func:`edgemerge.merging.policy.plan` decides; this module only translates its cell
indices into cache cells (:class:`edgemerge.native.kvmerge.MergeGroups`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemerge.merging import policy
from edgemerge.merging.policy import BudgetError, pair_error
from edgemerge.native.kvcells import KVCells
from edgemerge.native.kvmerge import KVFeatures, KVShape, MergeGroups, kv_features
from edgemerge.settings import MergeSettings

__all__ = ["BlockMergePlanner", "BudgetError", "MergePlan", "pair_error"]


@dataclass(frozen=True)
class MergePlan:
    """What to do to one sequence's cache.

    Attributes:
        groups: the merges (empty when none are needed).
        evict_spans: int32 [k, 2] position ranges (inclusive) to evict, oldest first; each
            is one cell's span, so removing the range removes exactly that cell.
        threshold: pair score at which the sets were cut (inf: no merge needed).
        errors: float32 [n_group] estimated relative error of each merged set.
        n_before: cells before the plan.
        n_after: cells after the plan.
        policy: the plan in cell indices (:class:`edgemerge.merging.policy.Plan`).
    """

    groups: MergeGroups
    evict_spans: np.ndarray
    threshold: float
    errors: np.ndarray
    n_before: int
    n_after: int
    policy: policy.Plan


@dataclass(frozen=True)
class BlockMergePlanner:
    """Plans merges for a cache of the given shape under ``settings``.

    Attributes:
        settings: the merge policy.
        shape: the mergeable cache (from :func:`edgemerge.native.kvmerge.kv_shape`).
        layer_thresholds: float32 [n_layer] calibrated thresholds of the cache layers
            (required when ``settings.threshold == "calibrated"``).
    """

    settings: MergeSettings
    shape: KVShape
    layer_thresholds: np.ndarray | None = None

    def __post_init__(self) -> None:
        # a setting that does not fit the cache fails now, not mid-chat
        policy.check_settings(self.settings, self.shape.n_layer, self.layer_thresholds)

    def features(self, ctx: object, cells: KVCells, seq_id: int = 0) -> KVFeatures:
        """The device's planning features of ``cells``, centred as the settings say."""
        return kv_features(ctx, cells.cell, seq_id=seq_id, centre=self.settings.centre)

    def plan(self, cells: KVCells, feats: KVFeatures, n_logical: int, target: int) -> MergePlan:
        """Plan merges (and evictions) so that ``cells`` fit in ``target`` cells.

        Args:
            cells: the sequence's cells in position order.
            feats: :meth:`features` of exactly those cells.
            n_logical: logical tokens of the sequence (defines the recent window).
            target: the most cells wanted after the plan (>= 1).
        """
        spans = np.stack([cells.span_min, cells.span_max], axis=1)
        pf = policy.PlanningFeatures(
            feats.k_sim, feats.k_norm, feats.v_norm, cells.pos, spans, cells.bias, n_logical
        )
        p = policy.plan(pf, self.settings, target, layer_thresholds=self.layer_thresholds)
        # the native merge takes weights [n_layer, n_src, n_head_kv]
        w = np.ascontiguousarray(p.weights.transpose(0, 2, 1))
        groups = MergeGroups(
            dst=cells.cell[p.pivots].astype(np.uint32),
            offsets=p.offsets,
            src=cells.cell[p.members].astype(np.uint32),
            bias=p.bias,
            span=p.spans,
            w_k=w,
            w_v=w,
        )
        return MergePlan(groups, p.evict_spans, p.threshold, p.errors, p.n_before, p.n_after, p)
