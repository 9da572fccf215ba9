"""Data types shared by every KV compression method.

Shared cells. A llama.cpp cache *cell* is one slot holding a token's K and V
rows for **every** layer and head at once. A compression method therefore frees
memory only by deciding, per cell, which tokens become one cell (or go): that
grouping is the same for all layers and heads. Only the merge *weights* (and so
the merged K/V rows) may differ per layer and head. Methods from the literature
that choose tokens per layer or per head (H2O, SnapKV, KVMerger) are reduced
here to one per-cell decision by aggregating their scores over layers and heads;
each method's docstring says how.

Evictions. Every output cell lists the original tokens it stands for (its
*members*, CSR). A token that is a member of no cell was evicted; each token is a
member of at most one cell. :attr:`CompressedKV.evicted` lists the evicted ones.

Budgets. ``compress(kv, budget)`` returns at most ``budget`` cells. When the
snapshot already fits (``n_tok <= budget``) every method returns it unchanged
(one cell per token). A budget that the method cannot meet (``budget <= 0``, or
below the cells it always keeps) raises ``ValueError``; ``min_budget(n_tok)``
says the smallest budget a method accepts.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

import numpy as np

from edgemerge.reference._checks import csr, float_array, index_array
from edgemerge.reference.rope import Rope


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class KVSnapshot:
    """The KV cache of one sequence, as the methods see it.

    Attributes:
        keys: float32 ``[n_layer, n_kv_head, n_tok, d_k]``, post-RoPE as cached.
        values: float32 ``[n_layer, n_kv_head, n_tok, d_v]``.
        positions: int32 ``[n_tok]``, strictly increasing (cache order = position order).
        importance: float32 ``[n_tok]`` >= 0, accumulated attention mass per cell
            (summed over layers, heads and queries), or None when not tracked.
        queries: float32 ``[n_layer, n_q_head, n_obs, d_k]`` post-RoPE queries of a recent
            observation window (``n_q_head`` a multiple of ``n_kv_head``), or None.
        query_positions: int32 ``[n_obs]`` positions of those queries; when given, a
            query only sees cells at or before it. None: queries see every cell.
        layers: model layer index of each entry of axis 0 (Gemma 3: only its
            full-attention layers are given); default ``0..n_layer-1``.
        mass: float32 ``[n_tok]`` > 0, tokens each cell already stands for (cells
            merged earlier carry their total mass; default 1 each).
        spans: int32 ``[n_tok, 2]`` first and last original position each cell covers
            (default ``[pos, pos]``).
        attn_scale: the model's KQ scale (default ``1 / sqrt(d_k)``).
        rope: the rotation the keys and queries carry (one for all the given layers),
            or None when unknown; methods that move queries to other positions need it.
    """

    keys: np.ndarray
    values: np.ndarray
    positions: np.ndarray
    importance: np.ndarray | None = None
    queries: np.ndarray | None = None
    query_positions: np.ndarray | None = None
    layers: tuple[int, ...] | None = None
    mass: np.ndarray | None = None
    spans: np.ndarray | None = None
    attn_scale: float | None = None
    rope: Rope | None = None

    def __post_init__(self) -> None:
        keys = float_array(self.keys, "KVSnapshot.keys", 4)
        values = float_array(self.values, "KVSnapshot.values", 4)
        n_layer, n_head, n_tok, d_k = keys.shape
        if n_layer == 0 or n_head == 0 or n_tok == 0 or d_k == 0:
            raise ValueError(f"KVSnapshot.keys must be non-empty on every axis, got {keys.shape}")
        if values.shape[:3] != keys.shape[:3] or values.shape[3] == 0:
            raise ValueError(
                f"KVSnapshot.values must have shape (n_layer, n_kv_head, n_tok, d_v)"
                f" = {keys.shape[:3]} + (d_v,), got {values.shape}"
            )
        positions = index_array(self.positions, "KVSnapshot.positions")
        if positions.shape[0] != n_tok:
            raise ValueError(
                f"KVSnapshot.positions needs {n_tok} entries, got {positions.shape[0]}"
            )
        if n_tok > 1 and (np.diff(positions) <= 0).any():
            raise ValueError(
                "KVSnapshot.positions must be strictly increasing (one sequence, "
                "cells in position order)"
            )
        object.__setattr__(self, "keys", _frozen(keys))
        object.__setattr__(self, "values", _frozen(values))
        object.__setattr__(self, "positions", _frozen(positions))
        if self.importance is not None:
            imp = float_array(self.importance, "KVSnapshot.importance", 1)
            if imp.shape[0] != n_tok or (imp < 0).any():
                raise ValueError(f"KVSnapshot.importance must be {n_tok} non-negative values")
            object.__setattr__(self, "importance", _frozen(imp))
        if self.queries is not None:
            q = float_array(self.queries, "KVSnapshot.queries", 4)
            if q.shape[0] != n_layer or q.shape[3] != d_k or q.shape[1] % n_head or q.shape[2] == 0:
                raise ValueError(
                    f"KVSnapshot.queries must have shape (n_layer={n_layer}, a multiple"
                    f" of n_kv_head={n_head}, n_obs >= 1, d_k={d_k}), got {q.shape}"
                )
            object.__setattr__(self, "queries", _frozen(q))
            if self.query_positions is not None:
                qp = index_array(self.query_positions, "KVSnapshot.query_positions")
                if qp.shape[0] != q.shape[2]:
                    raise ValueError(f"KVSnapshot.query_positions needs {q.shape[2]} entries")
                object.__setattr__(self, "query_positions", _frozen(qp))
        elif self.query_positions is not None:
            raise ValueError("KVSnapshot.query_positions given without queries")
        if self.layers is None:
            object.__setattr__(self, "layers", tuple(range(n_layer)))
        else:
            layers = tuple(int(x) for x in self.layers)
            if len(layers) != n_layer or len(set(layers)) != n_layer or min(layers) < 0:
                raise ValueError(
                    f"KVSnapshot.layers must name {n_layer} distinct model layers, got {layers}"
                )
            object.__setattr__(self, "layers", layers)
        if self.mass is not None:
            m = float_array(self.mass, "KVSnapshot.mass", 1)
            if m.shape[0] != n_tok or (m <= 0).any():
                raise ValueError(f"KVSnapshot.mass must be {n_tok} positive values")
            object.__setattr__(self, "mass", _frozen(m))
        if self.spans is None:
            object.__setattr__(self, "spans", _frozen(np.stack([positions, positions], axis=1)))
        else:
            sp = index_array(self.spans, "KVSnapshot.spans", 2)
            if (
                sp.shape != (n_tok, 2)
                or (sp[:, 0] > positions).any()
                or (sp[:, 1] < positions).any()
            ):
                raise ValueError(
                    "KVSnapshot.spans must be [n_tok, 2] with span[i, 0] <= "
                    "positions[i] <= span[i, 1]"
                )
            if n_tok > 1 and (sp[1:, 0] <= sp[:-1, 1]).any():
                raise ValueError("KVSnapshot.spans must not overlap (cells in position order)")
            object.__setattr__(self, "spans", _frozen(sp))
        if self.attn_scale is not None and not np.isfinite(self.attn_scale):
            raise ValueError(f"KVSnapshot.attn_scale must be finite, got {self.attn_scale}")
        if self.rope is not None:
            if not isinstance(self.rope, Rope):
                raise ValueError(f"KVSnapshot.rope must be a Rope or None, got {self.rope!r}")
            if self.rope.n_rot > d_k:
                raise ValueError(
                    f"KVSnapshot.rope rotates {self.rope.n_rot} dimensions, the keys have {d_k}"
                )

    @property
    def n_layer(self) -> int:
        return int(self.keys.shape[0])

    @property
    def n_kv_head(self) -> int:
        return int(self.keys.shape[1])

    @property
    def n_tok(self) -> int:
        return int(self.keys.shape[2])

    @property
    def token_mass(self) -> np.ndarray:
        """float64 ``[n_tok]`` mass per cell (ones unless :attr:`mass` is given)."""
        if self.mass is None:
            return np.ones(self.n_tok, dtype=np.float64)
        return self.mass.astype(np.float64)

    @property
    def scale(self) -> float:
        """The KQ logit scale in use."""
        if self.attn_scale is not None:
            return float(self.attn_scale)
        return 1.0 / float(np.sqrt(self.keys.shape[3]))


@dataclass(frozen=True, eq=False)
class CompressedKV:
    """A compressed cache: ``n_out`` cells, each standing for some original tokens.

    Attributes:
        keys: float32 ``[n_layer, n_kv_head, n_out, d_k]``.
        values: float32 ``[n_layer, n_kv_head, n_out, d_v]``.
        positions: int32 ``[n_out]`` position each cell is stored at (a merged cell: its
            pivot's), strictly increasing.
        span: int32 ``[n_out, 2]`` first and last original position the cell covers;
            spans are disjoint and ordered, and ``span[i, 0] <= positions[i] <= span[i, 1]``.
        bias: float32 ``[n_out]`` additive attention-logit bias (log mass; 0 for a kept token,
            and 0 everywhere when a method runs without the bias).
        mass: float32 ``[n_out]`` total mass of the members (tokens stood for).
        member_offsets: int32 ``[n_out + 1]``; cell c's members are
            ``member_index[member_offsets[c]:member_offsets[c + 1]]`` (non-empty, ascending).
        member_index: int32 ``[nnz]`` indices into the snapshot's tokens; no token twice.
        n_source: number of tokens in the snapshot compressed.
        error: float32 ``[n_out]`` estimated relative key error of each cell (0 for a kept
            token), or None when the method does not estimate it.
        info: method-specific facts about the run (threshold used, evictions, ...).
    """

    keys: np.ndarray
    values: np.ndarray
    positions: np.ndarray
    span: np.ndarray
    bias: np.ndarray
    mass: np.ndarray
    member_offsets: np.ndarray
    member_index: np.ndarray
    n_source: int
    error: np.ndarray | None = None
    info: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        keys = float_array(self.keys, "CompressedKV.keys", 4)
        values = float_array(self.values, "CompressedKV.values", 4)
        n_out = keys.shape[2]
        if values.shape[:3] != keys.shape[:3]:
            raise ValueError(
                f"CompressedKV.values leading shape {values.shape[:3]} differs from "
                f"keys {keys.shape[:3]}"
            )
        positions = index_array(self.positions, "CompressedKV.positions")
        span = index_array(self.span, "CompressedKV.span", 2)
        bias = float_array(self.bias, "CompressedKV.bias", 1)
        mass = float_array(self.mass, "CompressedKV.mass", 1)
        if (
            positions.shape != (n_out,)
            or span.shape != (n_out, 2)
            or bias.shape != (n_out,)
            or mass.shape != (n_out,)
        ):
            raise ValueError(f"CompressedKV: positions, span, bias and mass need {n_out} rows")
        if (span[:, 0] > positions).any() or (span[:, 1] < positions).any():
            raise ValueError("CompressedKV: every position must lie inside its cell's span")
        if n_out > 1 and (span[1:, 0] <= span[:-1, 1]).any():
            raise ValueError("CompressedKV: spans must be disjoint and in position order")
        if (mass <= 0).any():
            raise ValueError("CompressedKV: every cell needs a positive mass")
        idx, offs = csr(self.member_index, self.member_offsets, int(self.n_source))
        if offs.shape[0] != n_out + 1:
            raise ValueError(
                f"CompressedKV.member_offsets needs {n_out + 1} entries, got {offs.shape[0]}"
            )
        for name, arr in (
            ("keys", keys),
            ("values", values),
            ("positions", positions),
            ("span", span),
            ("bias", bias),
            ("mass", mass),
            ("member_offsets", offs),
            ("member_index", idx),
        ):
            object.__setattr__(self, name, _frozen(arr))
        if self.error is not None:
            err = float_array(self.error, "CompressedKV.error", 1, allow_nan=True)
            if err.shape != (n_out,):
                raise ValueError(f"CompressedKV.error needs {n_out} entries")
            object.__setattr__(self, "error", _frozen(err))
        object.__setattr__(self, "info", MappingProxyType(dict(self.info)))

    @property
    def n_cells(self) -> int:
        """Number of cells (``n_out``)."""
        return int(self.keys.shape[2])

    @property
    def evicted(self) -> np.ndarray:
        """int32 indices of snapshot tokens that are members of no cell."""
        covered = np.zeros(self.n_source, dtype=np.bool_)
        covered[self.member_index] = True
        return np.flatnonzero(~covered).astype(np.int32)

    def members(self, cell: int) -> np.ndarray:
        """Token indices (into the snapshot) that cell ``cell`` stands for."""
        return self.member_index[self.member_offsets[cell] : self.member_offsets[cell + 1]]

    def to_snapshot(
        self,
        *,
        importance: np.ndarray | None = None,
        queries: np.ndarray | None = None,
        query_positions: np.ndarray | None = None,
        layers: tuple[int, ...] | None = None,
        attn_scale: float | None = None,
        rope: Rope | None = None,
    ) -> KVSnapshot:
        """These cells as a snapshot to compress again (mass and spans carry over).

        The cells' ``bias`` is not passed on: a snapshot's cells carry ``log(mass)``.
        """
        return KVSnapshot(
            keys=self.keys,
            values=self.values,
            positions=self.positions,
            importance=importance,
            queries=queries,
            query_positions=query_positions,
            layers=layers,
            mass=self.mass,
            spans=self.span,
            attn_scale=attn_scale,
            rope=rope,
        )


class CompressionMethod(abc.ABC):
    """Interface of a method: a frozen dataclass with ``compress(kv, budget)``.

    Subclasses set :attr:`name` (the registry key) and :attr:`reduces_cells`
    (False for methods that keep every cell, e.g. ``full`` and ``quant``).
    """

    name: ClassVar[str]
    reduces_cells: ClassVar[bool] = True

    @abc.abstractmethod
    def compress(self, kv: KVSnapshot, budget: int) -> CompressedKV:
        """Compress ``kv`` into at most ``budget`` cells."""

    def min_budget(self, n_tok: int) -> int:
        """Smallest budget ``compress`` accepts for a snapshot of ``n_tok`` tokens."""
        return n_tok if not self.reduces_cells else max(1, min(n_tok, self.protected_cells(n_tok)))

    def protected_cells(self, n_tok: int) -> int:
        """Cells this method always keeps verbatim (sinks, recent window, ...)."""
        return 1

    def check_budget(self, kv: KVSnapshot, budget: int) -> int:
        """``budget`` as an int after checking it against :meth:`min_budget`.

        Raises:
            ValueError: not a positive integer, or below what the method can meet.
        """
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
            raise ValueError(f"budget must be an integer number of cells, got {budget!r}")
        if budget <= 0:
            raise ValueError(f"budget must be at least 1 cell, got {budget}")
        need = self.min_budget(kv.n_tok)
        if budget < need:
            raise ValueError(
                f"{self.name}: budget {budget} is below the {need} cells it must keep for "
                f"{kv.n_tok} tokens ({self._budget_hint()}); raise the budget or lower those "
                "settings"
            )
        return int(budget)

    def _budget_hint(self) -> str:
        return "it does not reduce cells" if not self.reduces_cells else "its protected cells"
