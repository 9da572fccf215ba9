"""Merging the members of a set into one state: direction/magnitude merge or weighted mean.

This module is the oracle of the native ``GGML_OP_MERGE_ROWS`` kernels (CPU:
``native/src/ggml-merge-rows-cpu.cpp``; CUDA later). The rule, per head, for
members ``x_i`` (rows of ``d`` values) with weights ``w_i``:

* magnitude retention off: ``out = sum_i w_i x_i`` (plain weighted mean when the
  weights sum to 1).
* magnitude retention on (MiniCache's reparameterisation): with ``n_i = ||x_i||``
  and ``u_i = x_i / n_i``::

      direction = normalize(sum_{i: n_i > 0} w_i u_i)
      magnitude = sum_i w_i n_i
      out       = direction * magnitude        (0 when the direction sum is 0)

  Averaging vectors that point apart shortens them, which flattens attention
  logits ``q . k``; keeping the weighted mean *norm* avoids that.
* two members with ``slerp_pairs``: spherical interpolation of the unit
  directions with ``t = w_1 / (w_0 + w_1)`` (``t = 1/2`` if that sum is not
  positive)::

      W = arccos(clip(u_0 . u_1, -1, 1))
      e = [sin((1 - t) W) u_0 + sin(t W) u_1] / sin W    if sin W >= 1e-6
      e = (1 - t) u_0 + t u_1                             otherwise (nearly (anti)parallel)
      out = magnitude * e / ||e||                          (0 when ||e|| == 0)

  A member with ``n_i == 0`` has no direction: with one zero row of two, the
  other row's direction is used; with magnitude retention on, zero rows add
  nothing to the direction sum.

Weights are taken as given (finite; normally non-negative and summing to 1 per
head); nothing renormalises them. Everything is computed in float64 and
returned as float32. The native kernel accumulates some sums in float32, so it
matches this oracle to about 1e-5 relative, not bit for bit.

Values. Attention mixes values *linearly*: a merged cell with log-mass bias
stands in for its members' attention weight ``sum p_i`` and should carry
``sum p_i v_i / sum p_i``, a weighted mean. So values default to the plain
weighted mean with the keys' weights (``value_mode="mean"``);
``value_mode="magnitude"`` applies the key rule to values as well, for ablation.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numba import njit, prange

from edgemerge import native
from edgemerge.reference._checks import csr, float_array, positive_int

#: Flag bits of the native op (``enum edgemerge_merge_flags`` in edgemerge.h, the values of
#: ``GGML_MERGE_ROWS_*``): the oracle speaks the same flag word as the kernels.
MERGE_MAGNITUDE = native.lib().EDGEMERGE_MERGE_MAGNITUDE
MERGE_SLERP = native.lib().EDGEMERGE_MERGE_SLERP

#: Below this ``sin(W)`` two directions count as (anti)parallel and SLERP falls back to lerp.
SLERP_LINEAR_BELOW = 1e-6

ValueMode = Literal["mean", "magnitude"]


def merge_flags(magnitude: bool, slerp_pairs: bool) -> int:
    """The native op's flag word for these switches."""
    return (MERGE_MAGNITUDE if magnitude else 0) | (MERGE_SLERP if slerp_pairs else 0)


@njit(cache=True)
def _norm(x: np.ndarray) -> float:
    acc = 0.0
    for e in range(x.shape[0]):
        acc += x[e] * x[e]
    return np.sqrt(acc)


@njit(cache=True)
def _merge_core(
    x: np.ndarray, w: np.ndarray, magnitude: bool, slerp_pairs: bool, out: np.ndarray
) -> None:
    """x float64[m, d], w float64[m] -> out float64[d] (see the module docstring)."""
    m, d = x.shape
    for e in range(d):
        out[e] = 0.0
    if not magnitude:
        for i in range(m):
            for e in range(d):
                out[e] += w[i] * x[i, e]
        return
    if slerp_pairs and m == 2:
        n0 = _norm(x[0])
        n1 = _norm(x[1])
        mag = w[0] * n0 + w[1] * n1
        if n0 > 0.0 and n1 > 0.0:
            wsum = w[0] + w[1]
            t = w[1] / wsum if wsum > 0.0 else 0.5
            c = 0.0
            for e in range(d):
                c += x[0, e] * x[1, e]
            c = min(1.0, max(-1.0, c / (n0 * n1)))
            omega = np.arccos(c)
            s = np.sin(omega)
            if s < SLERP_LINEAR_BELOW:
                c0 = 1.0 - t
                c1 = t
            else:
                c0 = np.sin((1.0 - t) * omega) / s
                c1 = np.sin(t * omega) / s
            for e in range(d):
                out[e] = c0 * x[0, e] / n0 + c1 * x[1, e] / n1
            ne = _norm(out)
            scale = mag / ne if ne > 0.0 else 0.0
            for e in range(d):
                out[e] *= scale
        elif n0 > 0.0 or n1 > 0.0:
            k = 0 if n0 > 0.0 else 1
            n = n0 if n0 > 0.0 else n1
            for e in range(d):
                out[e] = x[k, e] / n * mag
        return
    mag = 0.0
    for i in range(m):
        n = _norm(x[i])
        if n <= 0.0:
            continue
        mag += w[i] * n
        for e in range(d):
            out[e] += w[i] / n * x[i, e]
    ne = _norm(out)
    scale = mag / ne if ne > 0.0 else 0.0
    for e in range(d):
        out[e] *= scale


@njit(parallel=True, cache=True)
def _merge_groups_kernel(
    x: np.ndarray,
    member_index: np.ndarray,
    offsets: np.ndarray,
    w: np.ndarray,
    magnitude: bool,
    slerp_pairs: bool,
) -> np.ndarray:
    n_layer, n_head, _, d = x.shape
    n_group = offsets.shape[0] - 1
    out = np.empty((n_layer, n_head, n_group, d), dtype=np.float32)
    for g in prange(n_group):
        j0 = offsets[g]
        m = offsets[g + 1] - j0
        buf = np.empty((m, d), dtype=np.float64)
        wb = np.empty(m, dtype=np.float64)
        res = np.empty(d, dtype=np.float64)
        for layer in range(n_layer):
            for head in range(n_head):
                for i in range(m):
                    t = member_index[j0 + i]
                    wb[i] = w[layer, head, j0 + i]
                    for e in range(d):
                        buf[i, e] = x[layer, head, t, e]
                _merge_core(buf, wb, magnitude, slerp_pairs, res)
                for e in range(d):
                    out[layer, head, g, e] = res[e]
    return out


@njit(parallel=True, cache=True)
def _merge_rows_grouped_kernel(
    rows: np.ndarray,
    idx: np.ndarray,
    w: np.ndarray,
    offsets: np.ndarray,
    n_head: int,
    magnitude: bool,
    slerp_pairs: bool,
) -> np.ndarray:
    n_embd = rows.shape[1]
    hd = n_embd // n_head
    n_group = offsets.shape[0] - 1
    out = np.empty((n_group, n_embd), dtype=np.float32)
    for g in prange(n_group):
        j0 = offsets[g]
        m = offsets[g + 1] - j0
        buf = np.empty((m, hd), dtype=np.float64)
        wb = np.empty(m, dtype=np.float64)
        res = np.empty(hd, dtype=np.float64)
        for head in range(n_head):
            for i in range(m):
                r = idx[j0 + i]
                wb[i] = w[j0 + i, head]
                for e in range(hd):
                    buf[i, e] = rows[r, head * hd + e]
            _merge_core(buf, wb, magnitude, slerp_pairs, res)
            for e in range(hd):
                out[g, head * hd + e] = res[e]
    return out


def merge_states(
    x: np.ndarray, w: np.ndarray, *, magnitude: bool = True, slerp_pairs: bool = True
) -> np.ndarray:
    """Merge one set of states (one layer and head).

    Args:
        x: float32 ``[n_member, d]``.
        w: float32 ``[n_member]`` weights.
        magnitude: direction/magnitude merge (else weighted sum).
        slerp_pairs: SLERP when there are exactly two members (with ``magnitude``).

    Returns:
        float32 ``[d]``.
    """
    xs = float_array(x, "x", 2, dtype=np.float64)
    ws = float_array(w, "w", 1, dtype=np.float64)
    if xs.shape[0] == 0 or ws.shape[0] != xs.shape[0]:
        raise ValueError(
            f"need one weight per member and at least one member; got x {xs.shape}, w {ws.shape}"
        )
    out = np.empty(xs.shape[1], dtype=np.float64)
    _merge_core(xs, ws, bool(magnitude), bool(slerp_pairs), out)
    return out.astype(np.float32)


def merge_rows(
    x: np.ndarray, w: np.ndarray, magnitude: bool = True, slerp_pairs: bool = True
) -> np.ndarray:
    """Merge one group of cells, every head at once.

    Args:
        x: float32 ``[n_src, n_head, d]`` member rows split into heads.
        w: float32 ``[n_head, n_src]`` weight of each member for each head.
        magnitude, slerp_pairs: as for :func:`merge_states`.

    Returns:
        float32 ``[n_head, d]``.
    """
    xs = float_array(x, "x", 3)
    ws = float_array(w, "w", 2)
    n_src, n_head, d = xs.shape
    if n_src == 0 or ws.shape != (n_head, n_src):
        raise ValueError(
            f"w must have shape (n_head, n_src) = {(n_head, n_src)} with n_src >= 1, got {ws.shape}"
        )
    rows = xs.reshape(n_src, n_head * d)
    out = _merge_rows_grouped_kernel(
        rows,
        np.arange(n_src, dtype=np.int32),
        np.ascontiguousarray(ws.T),
        np.array([0, n_src], dtype=np.int32),
        n_head,
        bool(magnitude),
        bool(slerp_pairs),
    )
    return out.reshape(n_head, d)


def merge_rows_grouped(
    rows: np.ndarray,
    idx: np.ndarray,
    w: np.ndarray,
    offsets: np.ndarray,
    n_head: int,
    magnitude: bool = True,
    slerp_pairs: bool = True,
) -> np.ndarray:
    """The native op's contract (``edgemerge_merge_rows``) on float rows.

    Args:
        rows: float32 ``[n_rows, n_embd]``, ``n_embd = n_head * head_dim`` (dequantize
            quantized rows first with :mod:`edgemerge.reference.ggml_quants`).
        idx: int32 ``[n_src]`` row of each member; groups stored back to back.
        w: float32 ``[n_src, n_head]`` weight of each member for each head.
        offsets: int32 ``[n_group + 1]``; group g is members ``offsets[g]:offsets[g+1]``
            (non-empty). A row may appear in several groups.
        n_head: heads per row.
        magnitude, slerp_pairs: as for :func:`merge_states` (flags
            :data:`MERGE_MAGNITUDE`, :data:`MERGE_SLERP`).

    Returns:
        float32 ``[n_group, n_embd]``.
    """
    r = float_array(rows, "rows", 2)
    n_rows, n_embd = r.shape
    heads = positive_int(n_head, "n_head")
    if n_embd == 0 or n_embd % heads:
        raise ValueError(f"n_embd={n_embd} must be a positive multiple of n_head={heads}")
    ix, offs = csr(idx, offsets, n_rows, disjoint=False)
    ws = float_array(w, "w", 2)
    if ws.shape != (ix.shape[0], heads):
        raise ValueError(
            f"w must have shape (n_src, n_head) = {(ix.shape[0], heads)}, got {ws.shape}"
        )
    return _merge_rows_grouped_kernel(r, ix, ws, offs, heads, bool(magnitude), bool(slerp_pairs))


def merge_groups(
    x: np.ndarray,
    member_index: np.ndarray,
    offsets: np.ndarray,
    w: np.ndarray,
    *,
    magnitude: bool = True,
    slerp_pairs: bool = True,
) -> np.ndarray:
    """Merge many disjoint groups of tokens in every layer and head.

    Args:
        x: float32 ``[n_layer, n_head, n_tok, d]`` (keys or values).
        member_index: int32 ``[nnz]`` token indices (CSR with ``offsets``).
        offsets: int32 ``[n_group + 1]``.
        w: float32 ``[n_layer, n_head, nnz]`` weights.
        magnitude, slerp_pairs: as for :func:`merge_states`.

    Returns:
        float32 ``[n_layer, n_head, n_group, d]``.
    """
    xs = float_array(x, "x", 4)
    idx, offs = csr(member_index, offsets, xs.shape[2])
    ws = float_array(w, "w", 3)
    if ws.shape != (xs.shape[0], xs.shape[1], idx.shape[0]):
        raise ValueError(
            f"w must have shape (n_layer, n_head, nnz) = "
            f"{(xs.shape[0], xs.shape[1], idx.shape[0])}, got {ws.shape}"
        )
    return _merge_groups_kernel(xs, idx, offs, ws, bool(magnitude), bool(slerp_pairs))


def merge_kv(
    keys: np.ndarray,
    values: np.ndarray,
    member_index: np.ndarray,
    offsets: np.ndarray,
    w: np.ndarray,
    *,
    magnitude: bool = True,
    slerp_pairs: bool = True,
    value_mode: ValueMode = "mean",
) -> tuple[np.ndarray, np.ndarray]:
    """Merge keys and values of the same groups with the same weights.

    Keys use the direction/magnitude rule when ``magnitude`` is on; values use
    the plain weighted mean (``value_mode="mean"``) or the key rule
    (``"magnitude"``, SLERP for pairs as the keys).

    Returns:
        ``(keys [n_layer, n_head, n_group, d_k], values [n_layer, n_head, n_group, d_v])``.
    """
    if value_mode not in ("mean", "magnitude"):
        raise ValueError(f"value_mode must be 'mean' or 'magnitude', got {value_mode!r}")
    mk = merge_groups(keys, member_index, offsets, w, magnitude=magnitude, slerp_pairs=slerp_pairs)
    mv = merge_groups(
        values,
        member_index,
        offsets,
        w,
        magnitude=value_mode == "magnitude",
        slerp_pairs=slerp_pairs,
    )
    return mk, mv
