"""``blockmerge``: edgemerge's block-wise adaptive KV merging (DESIGN-NOTES section 4).

One call compresses a snapshot to at most ``budget`` cells:

1. Partition. Blocks are ``block_size`` consecutive cells. Only *sealed* blocks
   (full, and wholly before the recent window) are merge candidates; the first
   ``n_sink_blocks`` blocks (attention sinks) and the last ``n_recent`` cells are
   never merged, and neither is a partial block just before the recent window.
2. Retention (``retention``). The ``retain_fraction`` candidate cells of highest
   importance are kept verbatim. Block value acts softly: every pair's score is
   lowered by ``value_margin * r`` where ``r`` in ``[0, 1]`` is its block's rank by mean
   importance (0: the least valuable block), so as the threshold relaxes the
   lowest-value blocks merge first.
3. Similarity. Adjacent-key cosine per layer and head, centred on the mean key
   (``centre``), averaged over ``layers`` (default the latter half) and all heads; with
   ``layer_thresholds`` (calibrated per layer) each layer's threshold is subtracted
   first, so scores are relative to calibration.
4. Merging sets. Runs of consecutive candidate cells joined by pairs scoring at
   least the threshold (KVMerger's backward scan, optional ``max_set_size``). A run
   may cross a block boundary only when the two blocks' SimHash signatures (64 bits
   of the centred mean key direction over ``layers``) differ in at most
   ``boundary_max_hamming`` bits.
5. Adaptive budget. The threshold is the highest one whose sets fit the budget
   (bisection), never below ``min_threshold``.
6. Error control (``error_check``). For every set of two or more cells the
   merged key's relative reconstruction error and, when the snapshot has
   observation queries, the attention-output error of replacing that set alone
   are estimated before merging. A set over ``key_error_tolerance`` or
   ``attention_error_tolerance`` is cut at its weakest pair (recursively, until
   its parts pass), the cut pairs are barred, and step 5 runs again.
7. Merge. Pivot: the member of highest importance. Weights per layer and head:
   Gaussian kernel around the pivot with ``sigma = sigma_rel * RMS distance``
   (``gaussian``; off: mass shares), times each member's mass. Keys: direction/
   magnitude merge (``magnitude``; SLERP for pairs with ``slerp_pairs``), values:
   ``value_mode``. The cell sits at the pivot's position, spans its members, and
   carries ``log(total mass)`` as attention bias (``bias``).
8. Eviction fallback. If merging down to ``min_threshold`` still leaves too many
   cells, whole cells outside the sinks and recent window are evicted: cells
   without retained tokens first, then the others, oldest first
   (``eviction_order="position"``: a snapshot has no reference counts or LRU
   stamps, which live in the runtime's block table, so position is the key used),
   or least important first (``"importance"``).

The ablation switches ``centre``, ``retention``, ``gaussian``, ``magnitude`` and
``bias`` turn single ingredients off; the rest of the pipeline is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from edgemerge.methods._build import (
    group_pivots,
    identity,
    merge_weights,
    merged_cells,
    ranges_csr,
)
from edgemerge.methods._scoring import ImportanceSource, cell_importance, top_indices
from edgemerge.methods.base import CompressedKV, CompressionMethod, KVSnapshot
from edgemerge.reference._checks import layer_selection, positive_int
from edgemerge.reference.error import key_reconstruction_error, set_attention_error
from edgemerge.reference.hashing import hamming_distance, simhash_signatures
from edgemerge.reference.merge import ValueMode, merge_kv
from edgemerge.reference.merging_sets import merging_sets_for_budget, set_ranges
from edgemerge.reference.similarity import adjacent_similarity, aggregate_similarity


@dataclass(frozen=True)
class _Plan:
    score: np.ndarray  # float32 [n_tok - 1] adjusted pair scores
    protected: np.ndarray  # bool [n_tok]
    allowed: np.ndarray  # bool [n_tok - 1]
    retained: np.ndarray  # bool [n_tok]
    n_sink: int
    recent_from: int  # first token of the recent window


@dataclass(frozen=True)
class BlockMerge(CompressionMethod):
    """Block-wise adaptive merging of similar neighbouring cells (see the module doc).

    Attributes:
        block_size: cells per block (B).
        n_sink_blocks: leading blocks never merged or evicted.
        n_recent: latest cells never merged or evicted.
        layers: indices into the snapshot's layers for similarity and signatures
            (default the latter half).
        layer_thresholds: calibrated threshold per snapshot layer, subtracted before
            averaging (then ``min_threshold`` is relative to calibration).
        min_threshold: lowest (adjusted) pair score ever merged; below it, evict.
        value_margin: score penalty of the most valuable block relative to the least.
        boundary_max_hamming: SimHash bits (of 64) two blocks may differ in for a set
            to cross their boundary.
        retain_fraction: share of candidate cells kept verbatim by importance.
        max_set_size: largest merging set (0: unbounded).
        sigma_rel: Gaussian width as a multiple of the RMS distance to the pivot.
        slerp_pairs: SLERP two-member sets (with ``magnitude``).
        value_mode: ``"mean"`` (weighted mean) or ``"magnitude"`` (the key rule).
        key_error_tolerance: largest relative key reconstruction error of a set.
        attention_error_tolerance: largest relative attention-output error of a set
            (checked only when the snapshot has queries).
        error_check: estimate errors and split sets over tolerance.
        eviction_order: ``"position"`` (oldest first) or ``"importance"`` (least first).
        importance_source: ``"auto"``, ``"importance"``, ``"queries"`` or ``"keydiff"``.
        seed: SimHash projection seed.
        centre, retention, gaussian, magnitude, bias: ablation switches.
    """

    name: ClassVar[str] = "blockmerge"
    block_size: int = 16
    n_sink_blocks: int = 1
    n_recent: int = 256
    layers: tuple[int, ...] | None = None
    layer_thresholds: tuple[float, ...] | None = None
    min_threshold: float = 0.0
    value_margin: float = 0.1
    boundary_max_hamming: int = 16
    retain_fraction: float = 0.02
    max_set_size: int = 0
    sigma_rel: float = 1.0
    slerp_pairs: bool = True
    value_mode: ValueMode = "mean"
    key_error_tolerance: float = 0.35
    attention_error_tolerance: float = 0.1
    error_check: bool = True
    eviction_order: Literal["position", "importance"] = "position"
    importance_source: ImportanceSource = "auto"
    seed: int = 0
    centre: bool = True
    retention: bool = True
    gaussian: bool = True
    magnitude: bool = True
    bias: bool = True

    def __post_init__(self) -> None:
        positive_int(self.block_size, "block_size")
        positive_int(self.n_sink_blocks, "n_sink_blocks", minimum=0)
        positive_int(self.n_recent, "n_recent", minimum=0)
        positive_int(self.max_set_size, "max_set_size", minimum=0)
        positive_int(self.boundary_max_hamming, "boundary_max_hamming", minimum=0)
        for name in (
            "min_threshold",
            "value_margin",
            "sigma_rel",
            "key_error_tolerance",
            "attention_error_tolerance",
        ):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        for name in (
            "value_margin",
            "sigma_rel",
            "key_error_tolerance",
            "attention_error_tolerance",
        ):
            if getattr(self, name) < 0 or (name != "value_margin" and getattr(self, name) == 0):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.retain_fraction <= 1.0:
            raise ValueError(f"retain_fraction must lie in [0, 1], got {self.retain_fraction}")
        if self.value_mode not in ("mean", "magnitude"):
            raise ValueError(f"value_mode must be 'mean' or 'magnitude', got {self.value_mode!r}")
        if self.eviction_order not in ("position", "importance"):
            raise ValueError(
                f"eviction_order must be 'position' or 'importance', got {self.eviction_order!r}"
            )

    def protected_cells(self, n_tok: int) -> int:
        return self.n_sink_blocks * self.block_size + self.n_recent

    def _budget_hint(self) -> str:
        return (
            f"n_sink_blocks * block_size = {self.n_sink_blocks * self.block_size} sink cells "
            f"+ n_recent = {self.n_recent}"
        )

    def compress(self, kv: KVSnapshot, budget: int) -> CompressedKV:
        """Merge (and, if it must, evict) until at most ``budget`` cells remain.

        Raises:
            ValueError: the budget is below the sink block(s) plus the recent window,
                or a setting does not fit the snapshot (layers, layer_thresholds).
        """
        budget = self.check_budget(kv, budget)
        if kv.n_tok <= budget:
            return identity(kv, bias=self.bias, info={"threshold": math.inf})
        importance = cell_importance(kv, self.importance_source)
        plan = self._plan(kv, importance)
        cuts = np.zeros(kv.n_tok - 1, dtype=np.bool_)
        while True:
            sets = merging_sets_for_budget(
                plan.score,
                budget,
                protected=plan.protected,
                allowed=plan.allowed & ~cuts,
                max_size=self.max_set_size,
                floor=self.min_threshold,
            )
            starts, ends = set_ranges(sets.set_ids)
            if not self.error_check:
                break
            new_cuts = self._error_cuts(kv, importance, plan.score, starts, ends)
            if new_cuts.size == 0:
                break
            cuts[new_cuts] = True
        n_sets = starts.size
        if not sets.met:
            keep = self._cells_to_keep(kv, importance, plan, starts, ends, budget)
            starts, ends = starts[keep], ends[keep]
        member_index, offsets = ranges_csr(starts, ends)
        pivots = group_pivots(member_index, offsets, importance)
        weights = merge_weights(
            kv, member_index, offsets, pivots, gaussian=self.gaussian, sigma_rel=self.sigma_rel
        )
        info = {
            "threshold": sets.threshold,
            "met_by_merging": sets.met,
            "n_merged_sets": int(((ends - starts) >= 2).sum()),
            "n_evicted_cells": int(n_sets - starts.size),
            "n_error_cuts": int(cuts.sum()),
            "n_retained": int(plan.retained.sum()),
        }
        return merged_cells(
            kv,
            member_index,
            offsets,
            pivots,
            weights,
            magnitude=self.magnitude,
            slerp_pairs=self.slerp_pairs,
            value_mode=self.value_mode,
            bias=self.bias,
            info=info,
        )

    def _plan(self, kv: KVSnapshot, importance: np.ndarray) -> _Plan:
        n, bs = kv.n_tok, self.block_size
        tok = np.arange(n)
        block = tok // bs
        n_sink = self.n_sink_blocks * bs
        recent_from = n - self.n_recent
        candidate = (tok >= n_sink) & ((block + 1) * bs <= recent_from)
        protected = ~candidate
        retained = np.zeros(n, dtype=np.bool_)
        if self.retention and candidate.any():
            k = math.ceil(self.retain_fraction * int(candidate.sum()))
            retained[top_indices(importance, np.flatnonzero(candidate), k)] = True
            protected |= retained

        sel = layer_selection(self.layers, kv.n_layer)
        offsets = None
        if self.layer_thresholds is not None:
            offsets = np.asarray(self.layer_thresholds, dtype=np.float32)
            if offsets.shape != (kv.n_layer,):
                raise ValueError(
                    f"layer_thresholds needs one value per snapshot layer "
                    f"({kv.n_layer}), got {offsets.shape[0]}"
                )
        sim = adjacent_similarity(kv.keys, centre=self.centre)
        score = aggregate_similarity(sim, sel.tolist(), layer_offsets=offsets).astype(np.float64)

        cand_blocks = np.unique(block[candidate])
        rank = np.zeros(block[-1] + 1, dtype=np.float64)
        if cand_blocks.size > 1:
            value = np.array([importance[b * bs : (b + 1) * bs].mean() for b in cand_blocks])
            order = np.lexsort((cand_blocks, value))
            rank[cand_blocks[order]] = np.arange(cand_blocks.size) / (cand_blocks.size - 1)
        score -= self.value_margin * np.maximum(rank[block[:-1]], rank[block[1:]])

        allowed = np.ones(n - 1, dtype=np.bool_)
        pairs = np.flatnonzero(((tok[:-1] + 1) % bs == 0) & candidate[:-1] & candidate[1:])
        if pairs.size:
            mean = (
                None
                if self.centre
                else np.zeros((kv.n_layer, kv.n_kv_head, kv.keys.shape[3]), np.float32)
            )
            sigs = simhash_signatures(kv.keys, bs, [sel.tolist()], mean=mean, seed=self.seed)
            right = (pairs + 1) // bs
            dist = hamming_distance(sigs[right - 1], sigs[right]).max(axis=1)
            allowed[pairs] = dist <= self.boundary_max_hamming
        return _Plan(
            score=score.astype(np.float32),
            protected=protected,
            allowed=allowed,
            retained=retained,
            n_sink=n_sink,
            recent_from=recent_from,
        )

    def _over_tolerance(
        self, kv: KVSnapshot, importance: np.ndarray, starts: np.ndarray, ends: np.ndarray
    ) -> np.ndarray:
        """bool per range: its merge's estimated error exceeds a tolerance."""
        member_index, offsets = ranges_csr(starts, ends)
        pivots = group_pivots(member_index, offsets, importance)
        weights = merge_weights(
            kv, member_index, offsets, pivots, gaussian=self.gaussian, sigma_rel=self.sigma_rel
        )
        mk, mv = merge_kv(
            kv.keys,
            kv.values,
            member_index,
            offsets,
            weights,
            magnitude=self.magnitude,
            slerp_pairs=self.slerp_pairs,
            value_mode=self.value_mode,
        )
        ratio = key_reconstruction_error(kv.keys, mk, member_index, offsets).astype(np.float64)
        ratio /= self.key_error_tolerance
        if kv.queries is not None:
            mass = kv.token_mass
            token_bias = np.log(mass) if self.bias else np.zeros(kv.n_tok)
            group_bias = (
                np.log(np.add.reduceat(mass[member_index], offsets[:-1]))
                if self.bias
                else np.zeros(starts.size)
            )
            attn = set_attention_error(
                kv.queries,
                kv.keys,
                kv.values,
                member_index,
                offsets,
                mk,
                mv,
                group_bias,
                token_bias=token_bias,
                scale=kv.scale,
                positions=kv.positions,
                merged_positions=kv.positions[pivots],
                query_positions=kv.query_positions,
            )
            ratio = np.maximum(ratio, attn / self.attention_error_tolerance)
        return ratio > 1.0

    def _error_cuts(
        self,
        kv: KVSnapshot,
        importance: np.ndarray,
        score: np.ndarray,
        starts: np.ndarray,
        ends: np.ndarray,
    ) -> np.ndarray:
        """Pairs to bar so that every set's estimated error is within tolerance."""
        multi = (ends - starts) >= 2
        s, e = starts[multi], ends[multi]
        if s.size == 0:
            return np.zeros(0, dtype=np.int64)
        bad = self._over_tolerance(kv, importance, s, e)
        pending = list(zip(s[bad].tolist(), e[bad].tolist(), strict=True))
        cuts: list[int] = []
        while pending:
            halves: list[tuple[int, int]] = []
            for a, b in pending:
                c = a + int(np.argmin(score[a : b - 1]))  # the weakest pair inside [a, b)
                cuts.append(c)
                halves.extend(h for h in ((a, c + 1), (c + 1, b)) if h[1] - h[0] >= 2)
            if not halves:
                break
            halves.sort()
            hs = np.array([h[0] for h in halves])
            he = np.array([h[1] for h in halves])
            bad = self._over_tolerance(kv, importance, hs, he)
            pending = [h for h, over in zip(halves, bad, strict=True) if over]
        return np.array(cuts, dtype=np.int64)

    def _cells_to_keep(
        self,
        kv: KVSnapshot,
        importance: np.ndarray,
        plan: _Plan,
        starts: np.ndarray,
        ends: np.ndarray,
        budget: int,
    ) -> np.ndarray:
        """bool per set: kept after evicting the excess over ``budget``."""
        excess = starts.size - budget
        evictable = np.flatnonzero((starts >= plan.n_sink) & (ends <= plan.recent_from))
        holds_retained = plan.retained[starts[evictable]].astype(np.int64)
        if self.eviction_order == "position":
            order = np.lexsort((starts[evictable], holds_retained))
        else:
            cell_importance = np.add.reduceat(importance, starts)[evictable]
            order = np.lexsort((starts[evictable], cell_importance, holds_retained))
        if order.size < excess:  # cannot happen: check_budget keeps budget >= sinks + recent
            raise RuntimeError(
                f"blockmerge: only {order.size} evictable cells for an excess of "
                f"{excess}; this is a bug"
            )
        keep = np.ones(starts.size, dtype=np.bool_)
        keep[evictable[order[:excess]]] = False
        return keep
