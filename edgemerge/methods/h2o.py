"""``h2o``: heavy hitters plus a recent window (H2O, Zhang et al. 2023).

H2O keeps, per layer and head, the tokens with the largest accumulated attention
("heavy hitters") plus the most recent ones. Cells are shared by all layers and
heads here, so the heavy hitters are chosen once, from the snapshot's
``importance`` (attention mass summed over layers, heads and queries).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from edgemerge.methods._build import identity, keep_tokens
from edgemerge.methods._scoring import top_indices
from edgemerge.methods.base import CompressedKV, CompressionMethod, KVSnapshot
from edgemerge.reference._checks import positive_int


@dataclass(frozen=True)
class H2O(CompressionMethod):
    """Keep the latest cells and the cells of highest accumulated attention.

    Attributes:
        n_recent: recent cells kept; None: ``round(recent_fraction * budget)`` (at least 1).
        recent_fraction: share of the budget for the recent window when ``n_recent``
            is None (H2O splits its budget evenly).
    """

    name: ClassVar[str] = "h2o"
    n_recent: int | None = None
    recent_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.n_recent is not None:
            positive_int(self.n_recent, "n_recent", minimum=0)
        if not 0.0 <= self.recent_fraction <= 1.0:
            raise ValueError(f"recent_fraction must lie in [0, 1], got {self.recent_fraction}")

    def protected_cells(self, n_tok: int) -> int:
        return max(1, self.n_recent or 0)

    def recent_cells(self, budget: int) -> int:
        """Recent cells kept under ``budget``."""
        if self.n_recent is not None:
            return self.n_recent
        return min(budget, max(1, round(self.recent_fraction * budget)))

    def compress(self, kv: KVSnapshot, budget: int) -> CompressedKV:
        """Keep the recent window and the top ``budget - window`` cells by ``kv.importance``.

        Raises:
            ValueError: ``kv.importance`` is None, or the budget is below ``n_recent``.
        """
        budget = self.check_budget(kv, budget)
        if kv.n_tok <= budget:
            return identity(kv)
        if kv.importance is None:
            raise ValueError(
                "h2o needs KVSnapshot.importance (accumulated attention mass per "
                "cell); track it or use snapkv with observation queries"
            )
        n_recent = self.recent_cells(budget)
        older = np.arange(kv.n_tok - n_recent)
        heavy = top_indices(kv.importance.astype(np.float64), older, budget - n_recent)
        keep = np.concatenate([heavy, np.arange(kv.n_tok - n_recent, kv.n_tok)])
        return keep_tokens(kv, keep, info={"n_recent": n_recent, "n_heavy": int(heavy.size)})
