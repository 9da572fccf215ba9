"""Building :class:`CompressedKV` results: kept tokens, or merged runs of tokens."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edgemerge.methods.base import CompressedKV, KVSnapshot
from edgemerge.reference.error import key_reconstruction_error
from edgemerge.reference.gaussian import group_gaussian_weights, group_uniform_weights
from edgemerge.reference.merge import ValueMode, merge_kv


def identity(
    kv: KVSnapshot, *, bias: bool = True, info: Mapping[str, object] | None = None
) -> CompressedKV:
    """One cell per token, unchanged (``bias``: keep each cell's log mass, else 0)."""
    return keep_tokens(kv, np.arange(kv.n_tok, dtype=np.int32), bias=bias, info=info)


def keep_tokens(
    kv: KVSnapshot,
    keep: np.ndarray,
    *,
    values: np.ndarray | None = None,
    bias: bool = True,
    info: Mapping[str, object] | None = None,
) -> CompressedKV:
    """Keep the tokens ``keep`` (ascending indices) as they are; evict the rest.

    ``values`` replaces the snapshot's values (all tokens, e.g. CaM's merged values).
    """
    keep = np.asarray(keep, dtype=np.int32)
    if keep.size and (np.diff(keep) <= 0).any():
        raise ValueError("keep must be strictly increasing token indices")
    vals = kv.values if values is None else values
    mass = kv.token_mass[keep]
    return CompressedKV(
        keys=kv.keys[:, :, keep],
        values=vals[:, :, keep],
        positions=kv.positions[keep],
        span=kv.spans[keep],
        bias=np.log(mass).astype(np.float32) if bias else np.zeros(keep.size, np.float32),
        mass=mass.astype(np.float32),
        member_offsets=np.arange(keep.size + 1, dtype=np.int32),
        member_index=keep,
        n_source=kv.n_tok,
        error=np.zeros(keep.size, np.float32),
        info=dict(info or {}),
    )


def ranges_csr(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR ``(member_index, offsets)`` of disjoint ascending token ranges (``ends`` exclusive)."""
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    sizes = ends - starts
    offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int32)
    if sizes.size == 0:
        return np.zeros(0, np.int32), offsets
    member_index = (
        np.arange(offsets[-1]) - np.repeat(offsets[:-1], sizes) + np.repeat(starts, sizes)
    ).astype(np.int32)
    return member_index, offsets


def group_pivots(
    member_index: np.ndarray, offsets: np.ndarray, importance: np.ndarray
) -> np.ndarray:
    """Pivot of each group: its member of highest importance (ties: the later token)."""
    pivots = np.empty(offsets.shape[0] - 1, dtype=np.int32)
    for g in range(pivots.shape[0]):
        members = member_index[offsets[g] : offsets[g + 1]]
        scores = importance[members]
        pivots[g] = members[members.size - 1 - int(np.argmax(scores[::-1]))]
    return pivots


def merge_weights(
    kv: KVSnapshot,
    member_index: np.ndarray,
    offsets: np.ndarray,
    pivots: np.ndarray,
    *,
    gaussian: bool,
    sigma: float | None = None,
    sigma_rel: float | None = None,
) -> np.ndarray:
    """float32 ``[n_layer, n_head, nnz]`` weights: Gaussian around the pivot, or mass shares."""
    if gaussian:
        return group_gaussian_weights(
            kv.keys,
            member_index,
            offsets,
            pivots,
            sigma=sigma,
            sigma_rel=sigma_rel,
            mass=kv.token_mass,
        )
    return group_uniform_weights(
        kv.n_layer, kv.n_kv_head, member_index, offsets, mass=kv.token_mass
    )


def merged_cells(
    kv: KVSnapshot,
    member_index: np.ndarray,
    offsets: np.ndarray,
    pivots: np.ndarray,
    weights: np.ndarray,
    *,
    magnitude: bool,
    slerp_pairs: bool,
    value_mode: ValueMode,
    bias: bool,
    info: Mapping[str, object] | None = None,
) -> CompressedKV:
    """One cell per group (CSR over consecutive tokens; groups in position order).

    Groups of one token are copied verbatim; larger groups are merged with
    ``weights`` (keys by the direction/magnitude rule when ``magnitude``, values by
    ``value_mode``). Each cell is stored at its pivot's position, spans its
    members' spans, carries their total mass and, with ``bias``, ``log`` of it.
    """
    mk, mv = merge_kv(
        kv.keys,
        kv.values,
        member_index,
        offsets,
        weights,
        magnitude=magnitude,
        slerp_pairs=slerp_pairs,
        value_mode=value_mode,
    )
    sizes = np.diff(offsets)
    single = np.flatnonzero(sizes == 1)
    tok = member_index[offsets[single]]
    mk[:, :, single] = kv.keys[:, :, tok]
    mv[:, :, single] = kv.values[:, :, tok]
    mass = np.add.reduceat(kv.token_mass[member_index], offsets[:-1]) if sizes.size else np.zeros(0)
    first = member_index[offsets[:-1]]
    last = member_index[offsets[1:] - 1]
    span = np.stack([kv.spans[first, 0], kv.spans[last, 1]], axis=1)
    err = key_reconstruction_error(kv.keys, mk, member_index, offsets)
    err[single] = 0.0
    return CompressedKV(
        keys=mk,
        values=mv,
        positions=kv.positions[pivots],
        span=span,
        bias=np.log(mass).astype(np.float32) if bias else np.zeros(sizes.size, np.float32),
        mass=mass.astype(np.float32),
        member_offsets=offsets,
        member_index=member_index,
        n_source=kv.n_tok,
        error=err,
        info=dict(info or {}),
    )
