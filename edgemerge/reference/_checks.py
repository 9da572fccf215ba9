"""Input checks shared by the reference kernels.

The numba kernels assume contiguous arrays of one dtype with finite values;
these helpers turn anything else into a ``ValueError`` that names the argument,
what was wrong and what to pass instead, before a kernel sees it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def float_array(
    x: object,
    name: str,
    ndim: int | None = None,
    *,
    dtype: type = np.float32,
    allow_nan: bool = False,
    allow_neg_inf: bool = False,
) -> np.ndarray:
    """``x`` as a C-contiguous float array of ``dtype``, checked for shape rank and finiteness.

    Raises:
        ValueError: wrong rank, a non-numeric dtype, or a NaN/inf value.
    """
    arr = np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be a float array, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} axes, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=dtype)
    if not allow_nan:
        bad = ~np.isfinite(arr)
        if allow_neg_inf:
            bad &= ~np.isneginf(arr)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{name} holds a non-finite value ({arr[where]!r} at index {where}); "
                "the reference kernels take finite inputs only"
            )
    return arr


def index_array(x: object, name: str, ndim: int = 1) -> np.ndarray:
    """``x`` as a C-contiguous int32 array.

    Raises:
        ValueError: wrong rank, a non-integer dtype, or a value outside int32.
    """
    arr = np.asarray(x)
    if arr.size == 0 and arr.dtype == np.float64:
        arr = arr.astype(np.int64)  # np.asarray([]) is float64; an empty list is a valid index list
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} axes, got shape {arr.shape}")
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{name} has values outside the int32 range")
    return np.ascontiguousarray(arr, dtype=np.int32)


def bool_array(x: object, name: str, length: int) -> np.ndarray:
    """``x`` as a C-contiguous bool vector of ``length``.

    Raises:
        ValueError: not one axis of ``length`` entries, or not boolean.
    """
    arr = np.asarray(x)
    if arr.dtype != np.bool_:
        raise ValueError(f"{name} must be a boolean array, got dtype {arr.dtype}")
    if arr.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {arr.shape}")
    return np.ascontiguousarray(arr)


def csr(
    member_index: object, offsets: object, n_items: int, *, disjoint: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Validated CSR groups: ``member_index[offsets[g]:offsets[g+1]]`` are group g's items.

    Args:
        member_index: int array ``[nnz]`` of item indices in ``[0, n_items)``.
        offsets: int array ``[n_group + 1]``, starting at 0, ending at nnz, every group non-empty.
        n_items: number of items the indices point into.
        disjoint: also require that no item appears twice.

    Returns:
        ``(member_index, offsets)`` as int32 arrays.

    Raises:
        ValueError: any of the rules above is broken.
    """
    idx = index_array(member_index, "member_index")
    offs = index_array(offsets, "offsets")
    if offs.shape[0] < 1 or offs[0] != 0 or offs[-1] != idx.shape[0]:
        raise ValueError(
            f"offsets must start at 0 and end at len(member_index)={idx.shape[0]}, got "
            f"{offs[:1].tolist()}...{offs[-1:].tolist()}"
        )
    sizes = np.diff(offs)
    if (sizes <= 0).any():
        g = int(np.argmax(sizes <= 0))
        raise ValueError(
            f"group {g} is empty (offsets[{g}]={offs[g]}, offsets[{g + 1}]="
            f"{offs[g + 1]}); every group needs at least one member"
        )
    if idx.size and (idx.min() < 0 or idx.max() >= n_items):
        raise ValueError(
            f"member_index values must lie in [0, {n_items}), got range [{idx.min()}, {idx.max()}]"
        )
    if disjoint and np.unique(idx).shape[0] != idx.shape[0]:
        raise ValueError("member_index lists an item twice; groups must be disjoint")
    return idx, offs


def positive_int(value: object, name: str, *, minimum: int = 1) -> int:
    """``value`` as a Python int ``>= minimum``.

    Raises:
        ValueError: not an integer or below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def layer_selection(layers: Sequence[int] | None, n_layer: int, name: str = "layers") -> np.ndarray:
    """Indices into a layer axis of ``n_layer``; ``None`` means the latter half.

    The latter half is ``range(n_layer // 2, n_layer)`` (all of a single layer).

    Raises:
        ValueError: empty, repeated, or out-of-range indices.
    """
    if layers is None:
        return np.arange(n_layer // 2, n_layer, dtype=np.int64)
    sel = np.asarray(list(layers), dtype=np.int64)
    if sel.ndim != 1 or sel.size == 0:
        raise ValueError(f"{name} must list at least one layer index")
    if sel.min() < 0 or sel.max() >= n_layer:
        raise ValueError(f"{name} must be indices into the {n_layer} given layers, got {sel}")
    if np.unique(sel).size != sel.size:
        raise ValueError(f"{name} lists a layer twice: {sel}")
    return sel
