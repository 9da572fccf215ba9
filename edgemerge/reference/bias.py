"""Attention-mass bias of merged cells (proportional attention).

A cell that stands for members of total attention mass ``M`` (``M = n`` for
``n`` original tokens) gets ``log(M)`` added to its attention logit (in
llama.cpp: to its column of the KQ mask). Then ``exp(q.k_c + log M) = M exp(q.k_c)``,
which is exactly the members' summed softmax numerator when their keys equal
``k_c``: merging identical keys changes no attention output. Without the bias,
a merged cell gets the weight of one token however many it replaced, so a long
merged run loses attention to its unmerged neighbours.
"""

from __future__ import annotations

import numpy as np

from edgemerge.reference._checks import csr, float_array


def log_mass_bias(mass: np.ndarray) -> np.ndarray:
    """``log(mass)`` per cell.

    Args:
        mass: float ``[n_cell]`` positive total mass of each cell.

    Returns:
        float32 ``[n_cell]`` (0 for a cell of mass 1).

    Raises:
        ValueError: a mass is not positive and finite.
    """
    m = float_array(mass, "mass", 1, dtype=np.float64)
    if (m <= 0).any():
        raise ValueError(
            f"mass must be positive, got min {m.min()}; a cell stands for at "
            "least part of one token"
        )
    return np.log(m).astype(np.float32)


def group_mass(
    member_index: np.ndarray,
    offsets: np.ndarray,
    token_mass: np.ndarray | None = None,
    n_tok: int | None = None,
) -> np.ndarray:
    """Total mass of each group (CSR): the member count when ``token_mass`` is None.

    Args:
        member_index: int32 ``[nnz]`` token indices.
        offsets: int32 ``[n_group + 1]``.
        token_mass: float32 ``[n_tok]`` mass per token (default 1 each).
        n_tok: number of tokens (default ``len(token_mass)``, else ``max(member_index)+1``).

    Returns:
        float32 ``[n_group]``.
    """
    if token_mass is not None:
        tm = float_array(token_mass, "token_mass", 1, dtype=np.float64)
        n = tm.shape[0]
    else:
        tm = None
        n = n_tok if n_tok is not None else int(np.max(member_index, initial=-1)) + 1
    idx, offs = csr(member_index, offsets, n)
    if tm is None:
        return np.diff(offs).astype(np.float32)
    if (tm <= 0).any():
        raise ValueError(f"token_mass must be positive, got min {tm.min()}")
    return np.add.reduceat(tm[idx], offs[:-1]).astype(np.float32)


def proportional_bias(
    member_index: np.ndarray, offsets: np.ndarray, token_mass: np.ndarray | None = None
) -> np.ndarray:
    """``log`` of each group's total mass: the bias its merged cell carries.

    Returns:
        float32 ``[n_group]``.
    """
    return log_mass_bias(group_mass(member_index, offsets, token_mass))
