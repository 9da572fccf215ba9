"""Merging sets: KVMerger's rule of runs of consecutive, similar cells.

A *pair* ``i`` joins cell ``i`` and cell ``i + 1``. It is *active* when

* its score is ``>= threshold``,
* ``allowed[i]`` is True (callers use this for block-boundary and similar rules), and
* neither cell is protected (sinks, recent window, retained high-importance cells);

so a protected cell always forms a set of its own. The scan runs backward, from
the last cell to the first, as in KVMerger: a set grows towards the past while
the pair to the previous cell is active and (with ``max_size``) the set is not
full. Without a size cap the sets are exactly the maximal runs joined by active
pairs; with one, a long run is cut into full sets from its recent end, leaving
the short remainder at its old end.

Sets are returned as set ids (``int32[n_tok]``, numbered 0.. in position order)
or as ``(starts, ends)`` with ``ends`` exclusive (``range(starts[s], ends[s])``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from edgemerge.reference._checks import bool_array, float_array, index_array, positive_int


@njit(cache=True)
def _set_ids_kernel(active: np.ndarray, max_size: int) -> np.ndarray:
    n_tok = active.shape[0] + 1
    rev = np.empty(n_tok, dtype=np.int32)
    current = 0
    size = 1
    rev[n_tok - 1] = 0
    for i in range(n_tok - 2, -1, -1):
        if active[i] and (max_size == 0 or size < max_size):
            size += 1
        else:
            current += 1
            size = 1
        rev[i] = current
    ids = np.empty(n_tok, dtype=np.int32)
    for i in range(n_tok):
        ids[i] = current - rev[i]
    return ids


@njit(cache=True)
def _count_sets_kernel(
    score: np.ndarray, threshold: float, eligible: np.ndarray, max_size: int
) -> int:
    n_tok = score.shape[0] + 1
    count = 1
    size = 1
    for i in range(n_tok - 2, -1, -1):
        if eligible[i] and score[i] >= threshold and (max_size == 0 or size < max_size):
            size += 1
        else:
            count += 1
            size = 1
    return count


def _inputs(
    pair_score: np.ndarray, protected: np.ndarray | None, allowed: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    score = float_array(pair_score, "pair_score", 1)
    n_pair = score.shape[0]
    eligible = np.ones(n_pair, dtype=np.bool_)
    if allowed is not None:
        eligible &= bool_array(allowed, "allowed", n_pair)
    if protected is not None:
        prot = bool_array(protected, "protected", n_pair + 1)
        eligible &= ~prot[:-1] & ~prot[1:]
    return score, eligible


def active_pairs(
    pair_score: np.ndarray,
    threshold: float,
    *,
    protected: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """Which pairs may join their two cells at ``threshold``.

    Args:
        pair_score: float32 ``[n_tok - 1]``; ``pair_score[i]`` scores cells ``i`` and ``i + 1``.
        threshold: a pair is active when its score is ``>=`` this.
        protected: bool ``[n_tok]``, cells that never share a set.
        allowed: bool ``[n_tok - 1]``, pairs the caller permits at all.

    Returns:
        bool ``[n_tok - 1]``.
    """
    score, eligible = _inputs(pair_score, protected, allowed)
    return eligible & (score >= np.float32(threshold))


def merging_sets(
    pair_score: np.ndarray,
    threshold: float,
    *,
    protected: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
    max_size: int = 0,
) -> np.ndarray:
    """Set id of every cell under KVMerger's backward greedy scan.

    Args:
        pair_score: float32 ``[n_tok - 1]`` adjacent-pair scores (e.g.
            :func:`~edgemerge.reference.similarity.aggregate_similarity`).
        threshold: pairs scoring ``>=`` this may join.
        protected: bool ``[n_tok]``; a protected cell is a set of its own.
        allowed: bool ``[n_tok - 1]``; pairs set False never join.
        max_size: largest set (0: unbounded).

    Returns:
        int32 ``[n_tok]``: non-decreasing set ids 0..n_set-1; consecutive cells with the
        same id form one set.

    Raises:
        ValueError: bad shapes, NaN scores or a negative ``max_size``.
    """
    score, eligible = _inputs(pair_score, protected, allowed)
    cap = positive_int(max_size, "max_size", minimum=0)
    if math.isnan(threshold):
        raise ValueError("threshold is NaN; pass a number (use math.inf to merge nothing)")
    active = eligible & (score >= np.float32(threshold))
    return _set_ids_kernel(active, cap)


def count_sets(
    pair_score: np.ndarray,
    threshold: float,
    *,
    protected: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
    max_size: int = 0,
) -> int:
    """Number of sets (cells after merging) that :func:`merging_sets` would return."""
    score, eligible = _inputs(pair_score, protected, allowed)
    cap = positive_int(max_size, "max_size", minimum=0)
    return int(_count_sets_kernel(score, np.float32(threshold), eligible, cap))


def set_ranges(set_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)`` of each set, ``ends`` exclusive, from non-decreasing set ids.

    Raises:
        ValueError: the ids are not 0, 1, ... in runs (each step is +0 or +1).
    """
    ids = index_array(set_ids, "set_ids")
    if ids.size == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    steps = np.diff(ids)
    if ids[0] != 0 or ((steps != 0) & (steps != 1)).any():
        raise ValueError("set_ids must start at 0 and increase by 0 or 1 from cell to cell")
    starts = np.flatnonzero(np.concatenate(([True], steps == 1))).astype(np.int32)
    ends = np.append(starts[1:], ids.size).astype(np.int32)
    return starts, ends


def ranges_to_set_ids(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Inverse of :func:`set_ranges`: the ranges must tile ``[0, ends[-1])`` in order.

    Raises:
        ValueError: the ranges are empty, overlap, leave gaps or do not start at 0.
    """
    s = index_array(starts, "starts")
    e = index_array(ends, "ends")
    if s.shape != e.shape or s.size == 0:
        raise ValueError("starts and ends must be equally long and non-empty")
    if s[0] != 0 or (e <= s).any() or (s[1:] != e[:-1]).any():
        raise ValueError(
            "ranges must tile [0, n_tok): starts[0] == 0, ends[i] == starts[i+1], "
            "and every range non-empty"
        )
    return np.repeat(np.arange(s.size, dtype=np.int32), e - s)


@dataclass(frozen=True)
class BudgetSets:
    """Result of :func:`merging_sets_for_budget`.

    Attributes:
        set_ids: int32 ``[n_tok]`` as from :func:`merging_sets` at ``threshold``.
        threshold: the threshold used (``math.inf`` when nothing had to merge).
        n_cells: number of sets.
        met: whether ``n_cells <= budget``; False when merging every eligible pair
            scoring at least ``floor`` still leaves too many cells.
    """

    set_ids: np.ndarray
    threshold: float
    n_cells: int
    met: bool


def merging_sets_for_budget(
    pair_score: np.ndarray,
    budget: int,
    *,
    protected: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
    max_size: int = 0,
    floor: float = -math.inf,
    ceiling: float | None = None,
) -> BudgetSets:
    """Relax the threshold until the sets fit in ``budget`` cells.

    The threshold is the highest score ``t`` among eligible pairs (``t >= floor``)
    for which the number of sets is ``<= budget``, found by bisection over the
    sorted distinct scores: lowering the threshold only activates pairs, and the
    set count never grows when a pair activates (also with ``max_size``), so the
    count is monotone in ``t``. Ties at ``t`` all activate, so the result may hold
    fewer cells than the budget.

    Args:
        pair_score, protected, allowed, max_size: as for :func:`merging_sets`.
        budget: most cells wanted (>= 1).
        floor: never merge pairs scoring below this.
        ceiling: if given, merge at least every pair scoring ``>= ceiling`` (KVMerger
            merges everything above its epsilon even when the budget needs less).

    Returns:
        :class:`BudgetSets`; ``met`` is False when the budget cannot be reached by
        merging alone (the sets are then those at the lowest usable threshold).

    Raises:
        ValueError: bad shapes, NaN scores, or ``budget < 1``.
    """
    score, eligible = _inputs(pair_score, protected, allowed)
    cap = positive_int(max_size, "max_size", minimum=0)
    positive_int(budget, "budget")
    n_tok = score.shape[0] + 1
    if math.isnan(floor) or (ceiling is not None and math.isnan(ceiling)):
        raise ValueError("floor and ceiling must be numbers, not NaN")

    cand = np.unique(score[eligible & (score >= np.float32(floor))])[::-1]  # descending
    if n_tok <= budget or cand.size == 0:
        threshold = math.inf
    else:
        # smallest k with count(cand[k]) <= budget; count is non-increasing in k
        lo, hi = 0, cand.size - 1
        if _count_sets_kernel(score, cand[hi], eligible, cap) > budget:
            lo = hi
        else:
            while lo < hi:
                mid = (lo + hi) // 2
                if _count_sets_kernel(score, cand[mid], eligible, cap) <= budget:
                    hi = mid
                else:
                    lo = mid + 1
        threshold = float(cand[lo])
    if ceiling is not None:
        threshold = min(threshold, max(float(ceiling), float(floor)))
    active = eligible & (score >= np.float32(threshold))
    ids = _set_ids_kernel(active, cap)
    n_cells = int(ids[-1]) + 1
    return BudgetSets(set_ids=ids, threshold=threshold, n_cells=n_cells, met=n_cells <= budget)
