"""``snapkv``: keep what recent observation queries attend to (SnapKV, Li et al. 2024).

SnapKV scores each earlier cell by the attention it receives from the queries
of the last few tokens (the observation window), pools the scores along the
sequence so that neighbours of a hit survive with it, and keeps the top cells
per head plus the window itself. With shared cells the pooled scores are summed
over layers and heads before the one top-k choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from edgemerge.methods._build import identity, keep_tokens
from edgemerge.methods._scoring import pool_scores, top_indices, window_attention
from edgemerge.methods.base import CompressedKV, CompressionMethod, KVSnapshot
from edgemerge.reference._checks import positive_int


@dataclass(frozen=True)
class SnapKV(CompressionMethod):
    """Top cells by pooled observation-window attention, plus the window.

    Attributes:
        window: latest cells always kept; None: as many as the snapshot has queries
            (capped at the budget).
        pool_kernel: odd pooling width along the sequence (1: no pooling).
        pooling: ``"max"`` or ``"avg"``.
    """

    name: ClassVar[str] = "snapkv"
    window: int | None = None
    pool_kernel: int = 7
    pooling: Literal["max", "avg"] = "max"

    def __post_init__(self) -> None:
        if self.window is not None:
            positive_int(self.window, "window", minimum=0)
        positive_int(self.pool_kernel, "pool_kernel")
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be odd, got {self.pool_kernel}")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")

    def protected_cells(self, n_tok: int) -> int:
        return max(1, self.window or 0)

    def compress(self, kv: KVSnapshot, budget: int) -> CompressedKV:
        """Keep the window and the top ``budget - window`` earlier cells.

        Raises:
            ValueError: ``kv.queries`` is None, or the budget is below the window.
        """
        budget = self.check_budget(kv, budget)
        if kv.n_tok <= budget:
            return identity(kv)
        if kv.queries is None:
            raise ValueError("snapkv needs KVSnapshot.queries (the observation window's queries)")
        window = self.window if self.window is not None else int(kv.queries.shape[2])
        window = min(window, budget)
        prefix = kv.n_tok - window
        attn = window_attention(kv)[:, :, :prefix]
        scores = pool_scores(attn, self.pool_kernel, self.pooling).sum(axis=(0, 1))
        top = top_indices(scores, np.arange(prefix), budget - window)
        keep = np.concatenate([top, np.arange(prefix, kv.n_tok)])
        return keep_tokens(kv, keep, info={"window": window})
