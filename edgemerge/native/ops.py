"""Native ggml ops of the patch series, run in isolation on a named backend.

These wrap edgemerge's validating C entry points (native/include/edgemerge.h)
so that each native kernel can be compared with its numba reference in
:mod:`edgemerge.reference`, backend by backend ("CPU", "CUDA0", ...).
"""

from __future__ import annotations

import numpy as np

from edgemerge import native
from edgemerge.reference.ggml_quants import QType, ggml_type, row_bytes

# enum edgemerge_merge_flags of edgemerge.h
MERGE_MAGNITUDE = native.lib().EDGEMERGE_MERGE_MAGNITUDE
MERGE_SLERP = native.lib().EDGEMERGE_MERGE_SLERP


def merge_rows(
    rows: np.ndarray,
    qtype: QType,
    n_embd: int,
    idx: np.ndarray,
    weights: np.ndarray,
    offsets: np.ndarray,
    n_head: int,
    *,
    magnitude: bool = True,
    slerp: bool = True,
    backend: str = "CPU",
    _n_iter: int = 0,
    _n_threads: int = 0,
) -> np.ndarray:
    """Run ``GGML_OP_MERGE_ROWS`` once on ``backend``.

    Args:
        rows: uint8[n_rows, row_bytes] raw ggml rows of ``qtype`` (or float32[n_rows, n_embd]
            when ``qtype`` is "f32").
        qtype: "f32", "f16", "bf16", "q8_0" or "q4_0" (or the ggml enum value).
        n_embd: elements per row, ``n_head * head_dim``.
        idx: int32[n_src], the row of each member; groups are stored back to back.
        weights: float32[n_src, n_head], each member's weight per head.
        offsets: int32[n_group + 1], CSR offsets of each group's members.
        n_head: heads per row.
        magnitude: direction/magnitude merge (else the plain weighted mean).
        slerp: spherical interpolation for two-member groups (with ``magnitude``).
        backend: ggml backend name.

    Returns:
        float32[n_group, n_embd], the merged rows.

    Raises:
        edgemerge.native.NativeError: the library rejected the arguments (its message says
            which) or the backend is missing or does not support the op.
    """
    t = ggml_type(qtype)
    raw = np.ascontiguousarray(rows)
    if t.name == "f32":
        raw = np.ascontiguousarray(raw, dtype=np.float32).view(np.uint8).reshape(len(raw), -1)
    if raw.ndim != 2 or raw.shape[1] != row_bytes(t.type_id, n_embd):
        raise ValueError(
            f"rows must be [n_rows, {row_bytes(t.type_id, n_embd)}] bytes of {t.name} "
            f"for n_embd={n_embd}, got shape {rows.shape}"
        )
    idx = np.ascontiguousarray(idx, dtype=np.int32)
    offsets = np.ascontiguousarray(offsets, dtype=np.int32)
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    if weights.shape != (len(idx), n_head):
        raise ValueError(
            f"weights must be [n_src={len(idx)}, n_head={n_head}], got {weights.shape}"
        )
    n_group = len(offsets) - 1
    if n_group < 1:
        raise ValueError("offsets must hold at least two entries (one group)")
    out = np.empty((n_group, n_embd), dtype=np.float32)
    ffi = native.ffi()
    flags = (MERGE_MAGNITUDE if magnitude else 0) | (MERGE_SLERP if slerp else 0)
    return _run(
        native.lib().edgemerge_merge_rows,
        (
            backend.encode(),
            t.type_id,
            ffi.from_buffer(raw),
            n_embd,
            raw.shape[0],
            ffi.from_buffer("int32_t[]", idx),
            len(idx),
            ffi.from_buffer("float[]", weights),
            ffi.from_buffer("int32_t[]", offsets),
            n_group,
            n_head,
            flags,
            ffi.from_buffer("float[]", out, require_writable=True),
        ),
        out,
        _n_iter,
        _n_threads,
    )


def _run(fn, args: tuple, out: np.ndarray, n_iter: int, n_threads: int = 0):  # noqa: ANN001, ANN202
    if n_iter <= 0:
        native.check(fn(*args))
        return out
    secs = native.ffi().new("double *")
    native.check(native.lib().edgemerge_merge_rows_bench(*args, n_iter, n_threads, secs))
    return out, float(secs[0])


def time_merge_rows(  # noqa: ANN002, ANN003
    *args, n_iter: int = 10, n_threads: int = 0, **kwargs
) -> tuple[np.ndarray, float]:
    """:func:`merge_rows` plus the mean seconds of ``n_iter`` further runs of the compute
    alone (inputs already on the backend): the kernel benchmark's measurement.

    ``n_threads``: the backend's threads (0: its default; ggml's CPU backend uses 4)."""
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    if n_threads < 0:
        raise ValueError(f"n_threads must be >= 0, got {n_threads}")
    return merge_rows(*args, _n_iter=n_iter, _n_threads=n_threads, **kwargs)
