"""Merging KV cells inside edgemerge's patched llama.cpp cache (native/src/kv_merge.cpp).

Three calls, each on the backend that holds the cache:

- :func:`kv_shape`: layers, heads and head sizes of the mergeable (full-attention) cache;
- :func:`kv_features`: what a planner decides from, per layer and head: centred
  adjacent-key cosine similarity and key/value norms of a run of cells;
- :func:`kv_merge`: merge groups of cells in place (``GGML_OP_MERGE_ROWS`` per layer,
  written back with ``set_rows``), free the other members, and give each destination
  its attention-mass bias and position span.

``ctx`` accepts a ``llama_cpp.Llama``, its ``LlamaContext`` or a raw pointer, as in
:mod:`edgemerge.native.kvcells`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemerge import native
from edgemerge.native.kvcells import _context_pointer

# enum edgemerge_merge_flags of edgemerge.h
MERGE_MAGNITUDE = native.lib().EDGEMERGE_MERGE_MAGNITUDE
MERGE_SLERP = native.lib().EDGEMERGE_MERGE_SLERP


@dataclass(frozen=True)
class KVShape:
    """Shape of the mergeable cache. ``layer_ids``: model layer of each cache layer."""

    n_layer: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_cells: int
    layer_ids: tuple[int, ...]


@dataclass(frozen=True)
class KVFeatures:
    """Planning features of ``n`` cells.

    Attributes:
        k_sim: float32 [n_layer, n_head_kv, n - 1], cosine of adjacent (centred) keys.
        k_norm: float32 [n_layer, n_head_kv, n], key norm per cell.
        v_norm: float32 [n_layer, n_head_kv, n], value norm per cell.
    """

    k_sim: np.ndarray
    k_norm: np.ndarray
    v_norm: np.ndarray


@dataclass(frozen=True)
class MergeGroups:
    """Groups of cells to merge, in CSR form.

    Attributes:
        dst: uint32 [n_group], destination cell of each group (one of its members).
        offsets: int32 [n_group + 1], group g is ``src[offsets[g]:offsets[g+1]]``.
        src: uint32 [n_src], member cells.
        bias: float32 [n_group], attention bias of each merged cell (log of its mass).
        span: int32 [n_group, 2], first and last position each merged cell covers.
        w_k, w_v: float32 [n_layer, n_src, n_head_kv] merge weights, or None for equal
            weights within each group.
    """

    dst: np.ndarray
    offsets: np.ndarray
    src: np.ndarray
    bias: np.ndarray
    span: np.ndarray
    w_k: np.ndarray | None = None
    w_v: np.ndarray | None = None

    @property
    def n_group(self) -> int:
        return len(self.dst)


def kv_shape(ctx: object) -> KVShape:
    """Shape of the mergeable cache of ``ctx``."""
    ffi, lib = native.ffi(), native.lib()
    out = ffi.new("int32_t[5]")
    ids = ffi.new("int32_t[1024]")
    native.check(
        lib.edgemerge_kv_shape(
            _context_pointer(ctx), out, out + 1, out + 2, out + 3, out + 4, ids, 1024
        )
    )
    return KVShape(out[0], out[1], out[2], out[3], out[4], tuple(ids[i] for i in range(out[0])))


def kv_features(
    ctx: object, cells: np.ndarray, *, seq_id: int = 0, centre: bool = True
) -> KVFeatures:
    """Planning features of ``cells`` (uint32 [n], n >= 2, normally in position order)."""
    ffi = native.ffi()
    shape = kv_shape(ctx)
    c = np.ascontiguousarray(cells, dtype=np.uint32)
    n = len(c)
    dims = (shape.n_layer, shape.n_head_kv)
    k_sim = np.empty((*dims, max(n - 1, 0)), np.float32)
    k_norm = np.empty((*dims, n), np.float32)
    v_norm = np.empty((*dims, n), np.float32)
    native.check(
        native.lib().edgemerge_kv_features(
            _context_pointer(ctx),
            seq_id,
            n,
            ffi.from_buffer("uint32_t[]", c),
            int(centre),
            ffi.from_buffer("float[]", k_sim, require_writable=True),
            ffi.from_buffer("float[]", k_norm, require_writable=True),
            ffi.from_buffer("float[]", v_norm, require_writable=True),
        )
    )
    return KVFeatures(k_sim, k_norm, v_norm)


def kv_merge(
    ctx: object,
    groups: MergeGroups,
    *,
    seq_id: int = 0,
    magnitude: bool = True,
    slerp: bool = True,
    value_magnitude: bool = False,
) -> None:
    """Merge ``groups`` of cells of ``seq_id`` in place.

    Keys use the direction/magnitude merge (``magnitude``, ``slerp``); values the plain
    weighted mean unless ``value_magnitude``. Raises :class:`edgemerge.native.NativeError`
    with the library's message when the groups are invalid; the cache is then unchanged.
    """
    ffi = native.ffi()
    shape = kv_shape(ctx)
    dst = np.ascontiguousarray(groups.dst, dtype=np.uint32)
    offs = np.ascontiguousarray(groups.offsets, dtype=np.int32)
    src = np.ascontiguousarray(groups.src, dtype=np.uint32)
    bias = np.ascontiguousarray(groups.bias, dtype=np.float32)
    span = np.ascontiguousarray(groups.span, dtype=np.int32)
    n_group = len(dst)
    if len(offs) != n_group + 1 or len(bias) != n_group or span.shape != (n_group, 2):
        raise ValueError(
            f"groups: need offsets [{n_group + 1}], bias [{n_group}] and span [{n_group}, 2] for "
            f"{n_group} groups; got {offs.shape}, {bias.shape}, {span.shape}"
        )
    if n_group and (offs[-1] != len(src)):
        raise ValueError(f"groups: offsets end at {offs[-1]} but there are {len(src)} members")

    def weights(w: np.ndarray | None, name: str):  # noqa: ANN202 - a cffi pointer or NULL
        if w is None:
            return ffi.NULL
        arr = np.ascontiguousarray(w, dtype=np.float32)
        want = (shape.n_layer, len(src), shape.n_head_kv)
        if arr.shape != want:
            raise ValueError(f"groups.{name} must have shape {want}, got {arr.shape}")
        return ffi.from_buffer("float[]", arr)

    flags_k = (MERGE_MAGNITUDE if magnitude else 0) | (MERGE_SLERP if slerp else 0)
    flags_v = (MERGE_MAGNITUDE | (MERGE_SLERP if slerp else 0)) if value_magnitude else 0
    native.check(
        native.lib().edgemerge_kv_merge(
            _context_pointer(ctx),
            seq_id,
            n_group,
            ffi.from_buffer("uint32_t[]", dst),
            ffi.from_buffer("int32_t[]", offs),
            ffi.from_buffer("uint32_t[]", src),
            weights(groups.w_k, "w_k"),
            weights(groups.w_v, "w_v"),
            ffi.from_buffer("float[]", bias),
            ffi.from_buffer("int32_t[]", span),
            flags_k,
            flags_v,
        )
    )
