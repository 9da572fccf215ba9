"""``kvmerger``: KVMerger (Wang et al., "Model Tells You Where to Merge", arXiv 2407.08454).

The paper, as implemented here:

* merging sets: a backward scan from the last token groups *consecutive* tokens
  whose key cosine similarity is at least epsilon (0.75 in its experiments);
* the most recent tokens and the top attention-score tokens are never merged;
* pivot: the member with the highest aggregated attention;
* weights: ``g_i = exp(-||k_p - k_i||^2 / (2 sigma^2))``, ``w = g / sum g``, sigma = 5;
  merged key ``sum w_i k_i``; values with the same weights;
* no attention bias, no magnitude retention.

Shared-cells constraint. The paper finds merging sets per layer (and merges per
head); llama.cpp cells are shared by every layer and head, so here one set of
pairs is chosen per cell: the adjacent-key cosine is averaged over the chosen
layers and all KV heads, and epsilon applies to that average. Layers default to
all but the first two and the last, which the paper reports as bad places to
merge. The merge weights stay per layer and head.

Budget. The paper merges everything above epsilon. When that leaves more
cells than the budget, the threshold is relaxed (bisection over the pair
scores) until the budget is met. So that relaxation can always succeed, the
protected top tokens are capped at ``(budget - n_recent - 1) // 2``.

sigma. ``sigma=5`` is the paper's value for raw Llama-2 keys; ``sigma_relative=True``
reads ``sigma`` as a multiple of the RMS distance to the pivot instead (see
:mod:`edgemerge.reference.gaussian`), which is scale-free across models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

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
from edgemerge.reference.merging_sets import merging_sets_for_budget, set_ranges
from edgemerge.reference.similarity import adjacent_similarity, aggregate_similarity


def paper_layers(n_layer: int) -> list[int]:
    """All layers but the first two and the last (all of them when fewer than 4)."""
    return list(range(2, n_layer - 1)) if n_layer >= 4 else list(range(n_layer))


@dataclass(frozen=True)
class KVMerger(CompressionMethod):
    """KVMerger's merging sets and Gaussian-kernel merge, one grouping per cell.

    Attributes:
        threshold: epsilon on the layer/head-averaged adjacent key cosine.
        centre: centre keys before the cosine (the paper uses raw keys).
        layers: indices into the snapshot's layers used for similarity
            (default :func:`paper_layers`).
        n_recent: latest cells never merged.
        protect_fraction: share of cells with the highest importance never merged.
        sigma: Gaussian kernel width (absolute, or relative with ``sigma_relative``).
        sigma_relative: read ``sigma`` as a multiple of the RMS distance to the pivot.
        importance_source: where pivots and protected tokens come from (see
            :func:`edgemerge.methods._scoring.cell_importance`).
        bias: add ``log(mass)`` to merged cells (off in the paper).
        magnitude: direction/magnitude merge of keys (off in the paper).
    """

    name: ClassVar[str] = "kvmerger"
    threshold: float = 0.75
    centre: bool = False
    layers: tuple[int, ...] | None = None
    n_recent: int = 32
    protect_fraction: float = 0.05
    sigma: float = 5.0
    sigma_relative: bool = False
    importance_source: ImportanceSource = "auto"
    bias: bool = False
    magnitude: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be finite, got {self.threshold}")
        positive_int(self.n_recent, "n_recent", minimum=0)
        if not 0.0 <= self.protect_fraction <= 1.0:
            raise ValueError(f"protect_fraction must lie in [0, 1], got {self.protect_fraction}")
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be positive and finite, got {self.sigma}")

    def protected_cells(self, n_tok: int) -> int:
        return self.n_recent + 1  # the recent window and one cell for all the rest

    def compress(self, kv: KVSnapshot, budget: int) -> CompressedKV:
        """Merge runs of similar cells until at most ``budget`` remain.

        Raises:
            ValueError: the budget is below ``n_recent + 1`` (for more tokens than that).
        """
        budget = self.check_budget(kv, budget)
        if kv.n_tok <= budget:
            return identity(kv, bias=True)
        layers = layer_selection(
            self.layers if self.layers is not None else paper_layers(kv.n_layer), kv.n_layer
        )
        score = aggregate_similarity(
            adjacent_similarity(kv.keys, centre=self.centre), layers.tolist()
        )
        importance = cell_importance(kv, self.importance_source)
        n = kv.n_tok
        protected = np.zeros(n, dtype=np.bool_)
        protected[n - self.n_recent :] = self.n_recent > 0
        n_top = min(math.ceil(self.protect_fraction * n), max(0, (budget - self.n_recent - 1) // 2))
        top = top_indices(importance, np.arange(n - self.n_recent), n_top)
        protected[top] = True
        sets = merging_sets_for_budget(score, budget, protected=protected, ceiling=self.threshold)
        if not sets.met:  # cannot happen: protected cells are capped so that budget is reachable
            raise RuntimeError(
                f"kvmerger: {sets.n_cells} cells left at any threshold, budget "
                f"{budget}; this is a bug"
            )
        starts, ends = set_ranges(sets.set_ids)
        member_index, offsets = ranges_csr(starts, ends)
        pivots = group_pivots(member_index, offsets, importance)
        weights = merge_weights(
            kv,
            member_index,
            offsets,
            pivots,
            gaussian=True,
            sigma=None if self.sigma_relative else self.sigma,
            sigma_rel=self.sigma if self.sigma_relative else None,
        )
        return merged_cells(
            kv,
            member_index,
            offsets,
            pivots,
            weights,
            magnitude=self.magnitude,
            slerp_pairs=self.magnitude,
            value_mode="mean",
            bias=self.bias,
            info={"threshold": sets.threshold, "n_protected_top": int(top.size)},
        )
