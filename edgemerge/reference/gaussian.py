"""Gaussian-kernel merge weights relative to a pivot (KVMerger's weighting).

For members ``k_i`` of one merging set (one layer, one head) and its pivot ``k_p``::

    g_i = exp(-||k_p - k_i||^2 / (2 sigma^2)),   w_i = m_i g_i / sum_j m_j g_j

where ``m_i`` is the attention mass a member already stands for (1 for an
original token, ``n`` for a cell that earlier merged ``n`` tokens). The pivot has
``g_p = 1``, so the weights are always defined and the pivot's is the largest
(per unit of mass).

Choosing sigma. KVMerger reports sigma ~ 5 as best, but that number is tied to
raw Llama-2-7B keys: ``g`` depends on ``distance / sigma``, and key distances
scale with key norms, which differ by model, layer and head (QK-norm models
such as Gemma 3 have keys of norm ~ sqrt(d); others run to tens or hundreds).
A fixed sigma therefore means "uniform weights" on one model (sigma >> distances)
and "copy the pivot" on another (sigma << distances). The scale-aware rule used
by default in edgemerge sets, per set, layer and head::

    sigma = sigma_rel * sqrt(mean_{i != p} ||k_p - k_i||^2)

i.e. relative to the RMS distance of the other members to the pivot. A member at
that RMS distance then gets ``g = exp(-1 / (2 sigma_rel^2))`` (0.61 for
``sigma_rel = 1``), whatever the key scale; nearer members get more, farther
members less. When every member equals the pivot the weights are the mass shares.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from edgemerge.reference._checks import csr, float_array, index_array


@njit(cache=True)
def _kernel_weights(
    d2: np.ndarray, mass: np.ndarray, pivot: int, sigma: float, relative: bool, out: np.ndarray
) -> None:
    m = d2.shape[0]
    if relative:
        s2 = 0.0
        if m > 1:
            acc = 0.0
            for i in range(m):
                if i != pivot:
                    acc += d2[i]
            s2 = sigma * sigma * acc / (m - 1)
    else:
        s2 = sigma * sigma
    total = 0.0
    for i in range(m):
        g = 1.0
        if s2 > 0.0:
            g = np.exp(-d2[i] / (2.0 * s2))
        elif d2[i] > 0.0:
            g = 0.0  # only reachable with relative sigma when all distances are 0
        out[i] = mass[i] * g
        total += out[i]
    for i in range(m):
        out[i] = out[i] / total


@njit(parallel=True, cache=True)
def _group_weights_kernel(
    keys: np.ndarray,
    member_index: np.ndarray,
    offsets: np.ndarray,
    pivot_slot: np.ndarray,
    mass: np.ndarray,
    sigma: float,
    relative: bool,
) -> np.ndarray:
    n_layer, n_head, _, d = keys.shape
    n_group = offsets.shape[0] - 1
    out = np.empty((n_layer, n_head, member_index.shape[0]), dtype=np.float32)
    for g in prange(n_group):
        j0 = offsets[g]
        m = offsets[g + 1] - j0
        d2 = np.empty(m, dtype=np.float64)
        gm = np.empty(m, dtype=np.float64)
        w = np.empty(m, dtype=np.float64)
        for i in range(m):
            gm[i] = mass[member_index[j0 + i]]
        p = member_index[j0 + pivot_slot[g]]
        for layer in range(n_layer):
            for head in range(n_head):
                for i in range(m):
                    t = member_index[j0 + i]
                    acc = 0.0
                    for e in range(d):
                        diff = np.float64(keys[layer, head, p, e]) - np.float64(
                            keys[layer, head, t, e]
                        )
                        acc += diff * diff
                    d2[i] = acc
                _kernel_weights(d2, gm, pivot_slot[g], sigma, relative, w)
                for i in range(m):
                    out[layer, head, j0 + i] = w[i]
    return out


def _sigma_args(sigma: float | None, sigma_rel: float | None) -> tuple[float, bool]:
    if (sigma is None) == (sigma_rel is None):
        raise ValueError(
            "give exactly one of sigma (absolute) or sigma_rel (relative to the "
            "RMS distance to the pivot)"
        )
    value = float(sigma if sigma is not None else sigma_rel)
    if not math.isfinite(value) or value <= 0.0:
        name = "sigma" if sigma is not None else "sigma_rel"
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value, sigma_rel is not None


def _mass(mass: np.ndarray | None, n: int, name: str = "mass") -> np.ndarray:
    if mass is None:
        return np.ones(n, dtype=np.float64)
    out = float_array(mass, name, 1, dtype=np.float64)
    if out.shape[0] != n:
        raise ValueError(f"{name} must have {n} entries, got {out.shape[0]}")
    if (out <= 0).any():
        raise ValueError(f"{name} must be positive (attention mass per cell), got min {out.min()}")
    return out


def relative_sigma(keys: np.ndarray, pivot: int, sigma_rel: float = 1.0) -> float:
    """The scale-aware sigma for one set: ``sigma_rel`` times the RMS member-pivot distance.

    Args:
        keys: float32 ``[n_member, d]``.
        pivot: index of the pivot among the members.
        sigma_rel: multiple of the RMS distance.

    Returns:
        sigma (0.0 for a single member or when all members equal the pivot).
    """
    k = float_array(keys, "keys", 2, dtype=np.float64)
    if not 0 <= pivot < k.shape[0]:
        raise ValueError(f"pivot {pivot} is not a member index in [0, {k.shape[0]})")
    if k.shape[0] < 2:
        return 0.0
    d2 = ((k - k[pivot]) ** 2).sum(axis=1)
    return float(sigma_rel * math.sqrt(d2.sum() / (k.shape[0] - 1)))


def gaussian_weights(
    keys: np.ndarray,
    pivot: int,
    *,
    sigma: float | None = None,
    sigma_rel: float | None = None,
    mass: np.ndarray | None = None,
) -> np.ndarray:
    """Normalised Gaussian-kernel weights of one set's members (one layer and head).

    Args:
        keys: float32 ``[n_member, d]``.
        pivot: index of the pivot among the members.
        sigma: absolute kernel width (KVMerger's sigma), or
        sigma_rel: width relative to the RMS distance to the pivot (see module doc).
            Give exactly one.
        mass: float32 ``[n_member]`` attention mass per member (default 1 each).

    Returns:
        float32 ``[n_member]``, non-negative, summing to 1 (float64 inside).

    Raises:
        ValueError: bad shapes, pivot, sigma, mass, or NaN/inf keys.
    """
    k = float_array(keys, "keys", 2)
    n = k.shape[0]
    if n == 0:
        raise ValueError("keys has no members")
    if isinstance(pivot, bool) or not isinstance(pivot, (int, np.integer)) or not 0 <= pivot < n:
        raise ValueError(f"pivot must be a member index in [0, {n}), got {pivot!r}")
    value, relative = _sigma_args(sigma, sigma_rel)
    ms = _mass(mass, n)
    d2 = ((k.astype(np.float64) - k[pivot].astype(np.float64)) ** 2).sum(axis=1)
    out = np.empty(n, dtype=np.float64)
    _kernel_weights(d2, ms, int(pivot), value, relative, out)
    return out.astype(np.float32)


def group_gaussian_weights(
    keys: np.ndarray,
    member_index: np.ndarray,
    offsets: np.ndarray,
    pivots: np.ndarray,
    *,
    sigma: float | None = None,
    sigma_rel: float | None = None,
    mass: np.ndarray | None = None,
) -> np.ndarray:
    """Gaussian weights of many sets at once, per layer and head.

    Args:
        keys: float32 ``[n_layer, n_head, n_tok, d]``.
        member_index: int32 ``[nnz]`` token indices, grouped by ``offsets`` (CSR).
        offsets: int32 ``[n_group + 1]``.
        pivots: int32 ``[n_group]`` token index of each group's pivot (a member of it).
        sigma, sigma_rel: as for :func:`gaussian_weights` (exactly one).
        mass: float32 ``[n_tok]`` attention mass per token (default 1 each).

    Returns:
        float32 ``[n_layer, n_head, nnz]``: weights of each member, summing to 1
        over each group for every layer and head.

    Raises:
        ValueError: bad shapes, CSR, pivots, sigma or mass.
    """
    k = float_array(keys, "keys", 4)
    n_tok = k.shape[2]
    idx, offs = csr(member_index, offsets, n_tok)
    piv = index_array(pivots, "pivots")
    n_group = offs.shape[0] - 1
    if piv.shape[0] != n_group:
        raise ValueError(f"pivots needs one token per group ({n_group}), got {piv.shape[0]}")
    slot = np.empty(n_group, dtype=np.int64)
    for g in range(n_group):
        members = idx[offs[g] : offs[g + 1]]
        hit = np.flatnonzero(members == piv[g])
        if hit.size == 0:
            raise ValueError(
                f"pivot {piv[g]} of group {g} is not one of its members {members.tolist()}"
            )
        slot[g] = hit[0]
    value, relative = _sigma_args(sigma, sigma_rel)
    return _group_weights_kernel(k, idx, offs, slot, _mass(mass, n_tok), value, relative)


def group_uniform_weights(
    n_layer: int,
    n_head: int,
    member_index: np.ndarray,
    offsets: np.ndarray,
    mass: np.ndarray | None = None,
) -> np.ndarray:
    """Mass-share weights (no kernel): ``w_i = m_i / sum_j m_j`` per group.

    Returns:
        float32 ``[n_layer, n_head, nnz]`` (the same for every layer and head).
    """
    idx = index_array(member_index, "member_index")
    offs = index_array(offsets, "offsets")
    n_tok = int(idx.max()) + 1 if idx.size else 0
    ms = _mass(mass, n_tok if mass is None else np.asarray(mass).shape[0])
    idx, offs = csr(idx, offs, ms.shape[0])
    member_mass = ms[idx]
    totals = np.add.reduceat(member_mass, offs[:-1]) if idx.size else np.zeros(0)
    w = member_mass / np.repeat(totals, np.diff(offs))
    return np.broadcast_to(w.astype(np.float32), (n_layer, n_head, idx.shape[0])).copy()
