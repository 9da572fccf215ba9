"""``keydiff``: keep the keys that differ most from the average key (KeyDiff; Park et al.,
"KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments", arXiv 2504.15364).

KeyDiff's observation: keys that point the way most keys point are the common,
low-information ones, while distinctive keys tend to draw attention. It needs no
queries and no attention scores, so it works with flash attention and in any order.
Per layer and KV head the score of cell ``t`` is ``-cos(k_t, anchor)``, the anchor
being the mean of the unit keys (as the paper and kvpress compute it; ``unit_anchor=
False`` takes the mean of the raw keys instead). Merged cells count by their mass in
the mean.

The paper evicts block by block as the prompt arrives; the suite's streaming mode
(compress whenever the next chunk would not fit) is that schedule.

Shared cells. The cosines are averaged over the chosen layers (default all) and the KV
heads before the one top-k choice; the first ``n_sink`` and the latest ``n_recent``
cells are always kept, as the other evictors keep theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from edgemerge.methods._build import identity, keep_tokens
from edgemerge.methods._scoring import top_indices
from edgemerge.methods.base import CompressedKV, CompressionMethod, KVSnapshot
from edgemerge.reference._checks import layer_selection, positive_int


def anchor_cosines(keys: np.ndarray, mass: np.ndarray, *, unit_anchor: bool = True) -> np.ndarray:
    """Cosine of every key with its layer/head's anchor (mass-weighted mean key).

    Args:
        keys: float ``[n_layer, n_kv_head, n_tok, d]``.
        mass: float ``[n_tok]`` > 0, the tokens each cell stands for.
        unit_anchor: average unit keys (KeyDiff) rather than raw ones.

    Returns:
        float64 ``[n_layer, n_kv_head, n_tok]`` in ``[-1, 1]``; 0 for a zero key or a
        zero anchor (no direction to compare).
    """
    k = keys.astype(np.float64)
    norm = np.linalg.norm(k, axis=-1, keepdims=True)
    unit = np.divide(k, norm, out=np.zeros_like(k), where=norm > 0)
    w = np.asarray(mass, dtype=np.float64) / float(np.sum(mass))
    anchor = np.einsum("lhtd,t->lhd", unit if unit_anchor else k, w)
    a_norm = np.linalg.norm(anchor, axis=-1, keepdims=True)
    a_unit = np.divide(anchor, a_norm, out=np.zeros_like(anchor), where=a_norm > 0)
    return np.einsum("lhtd,lhd->lht", unit, a_unit)


@dataclass(frozen=True)
class KeyDiff(CompressionMethod):
    """Keep sinks, the recent window and the cells whose keys are least like the anchor.

    Attributes:
        n_sink: leading cells always kept.
        n_recent: latest cells always kept.
        layers: indices into the snapshot's layers averaged over (None: all).
        unit_anchor: anchor = mean of unit keys (KeyDiff), else of raw keys.
    """

    name: ClassVar[str] = "keydiff"
    n_sink: int = 4
    n_recent: int = 32
    layers: tuple[int, ...] | None = None
    unit_anchor: bool = True

    def __post_init__(self) -> None:
        positive_int(self.n_sink, "n_sink", minimum=0)
        positive_int(self.n_recent, "n_recent", minimum=0)
        if self.layers is not None:
            layer_selection(self.layers, max(self.layers, default=0) + 1)  # empty, repeats
        if not isinstance(self.unit_anchor, bool):
            raise ValueError(f"unit_anchor must be True or False, got {self.unit_anchor!r}")

    def protected_cells(self, n_tok: int) -> int:
        return max(1, self.n_sink + self.n_recent)

    def _budget_hint(self) -> str:
        return f"n_sink={self.n_sink} + n_recent={self.n_recent}"

    def scores(self, kv: KVSnapshot) -> np.ndarray:
        """float64 ``[n_tok]``: ``-cos(k, anchor)`` averaged over the layers and KV heads.

        Raises:
            ValueError: ``layers`` names a layer the snapshot does not have.
        """
        sel = layer_selection(
            list(range(kv.n_layer)) if self.layers is None else self.layers, kv.n_layer
        )
        cos = anchor_cosines(kv.keys[sel], kv.token_mass, unit_anchor=self.unit_anchor)
        return -cos.mean(axis=(0, 1))

    def compress(self, kv: KVSnapshot, budget: int) -> CompressedKV:
        """Keep the sinks, the recent window and the top remaining cells by ``-cos``.

        Raises:
            ValueError: the budget is below ``n_sink + n_recent``, or ``layers`` is out
                of range for the snapshot.
        """
        budget = self.check_budget(kv, budget)
        if kv.n_tok <= budget:
            return identity(kv)
        candidates = np.arange(self.n_sink, kv.n_tok - self.n_recent)
        top = top_indices(self.scores(kv), candidates, budget - self.n_sink - self.n_recent)
        keep = np.concatenate(
            [np.arange(self.n_sink), top, np.arange(kv.n_tok - self.n_recent, kv.n_tok)]
        )
        return keep_tokens(kv, keep, info={"n_recent": self.n_recent})
