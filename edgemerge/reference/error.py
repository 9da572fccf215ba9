"""Error estimates of a merge, per merging set, before it is committed.

* :func:`key_reconstruction_error`: how far the merged key is from its members,
  ``||K_set - k_merged||_F / ||K_set||_F`` over the set's members and every layer
  and head given.
* :func:`set_attention_error`: how much the attention output of recent queries
  moves when *only this set* is replaced by its merged cell (with its bias), relative
  to the output norm: ``sqrt(sum ||o' - o||^2 / sum ||o||^2)`` over layers, query
  heads and queries. Replacing one set changes the softmax numerator and
  denominator by that set's terms only, so every set is scored in
  ``O(|set| * d)`` per query on top of one full pass.
* :func:`compressed_attention_error`: the same relative error for a whole
  compressed cache against the original, per layer (what the fidelity harness
  reports).

No causal mask is applied unless positions are given; then a query sees the
cells positioned at or before it (a merged cell sits at its stored position).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from edgemerge.reference._checks import csr, float_array, index_array
from edgemerge.reference.attention import attention, causal_bias

_NO_POSITION = np.iinfo(np.int64).max


@njit(cache=True)
def _key_error_kernel(
    keys: np.ndarray, merged: np.ndarray, member_index: np.ndarray, offsets: np.ndarray
) -> np.ndarray:
    n_layer, n_head, _, d = keys.shape
    n_group = offsets.shape[0] - 1
    out = np.zeros(n_group, dtype=np.float32)
    for g in range(n_group):
        num = 0.0
        den = 0.0
        for layer in range(n_layer):
            for head in range(n_head):
                for j in range(offsets[g], offsets[g + 1]):
                    t = member_index[j]
                    for e in range(d):
                        k = np.float64(keys[layer, head, t, e])
                        diff = k - np.float64(merged[layer, head, g, e])
                        num += diff * diff
                        den += k * k
        if den > 0.0:
            out[g] = np.sqrt(num / den)
        elif num > 0.0:
            out[g] = np.inf
    return out


@njit(parallel=True, cache=True)
def _set_delta_kernel(
    p: np.ndarray,
    z: np.ndarray,
    out: np.ndarray,
    ec: np.ndarray,
    values: np.ndarray,
    mvalues: np.ndarray,
    member_index: np.ndarray,
    offsets: np.ndarray,
    group: int,
    num: np.ndarray,
) -> None:
    """Add, per set g, sum over queries of ||o'_g - o||^2 to num[g] (one layer).

    p [n_q_head, n_obs, n_tok] softmax numerators (0 where not visible), z their sums,
    out [n_q_head, n_obs, d_v] the outputs o, ec [n_q_head, n_obs, n_group] the merged
    cells' numerators, values [n_kv_head, n_tok, d_v], mvalues [n_kv_head, n_group, d_v].
    """
    n_q_head, n_obs, _ = p.shape
    d_v = values.shape[2]
    n_group = offsets.shape[0] - 1
    for g in prange(n_group):
        delta = np.empty(d_v, dtype=np.float64)
        acc = 0.0
        for hq in range(n_q_head):
            h = hq // group
            for o in range(n_obs):
                if z[hq, o] <= 0.0:
                    continue  # this query sees no cell
                zs = 0.0
                for e in range(d_v):
                    delta[e] = ec[hq, o, g] * mvalues[h, g, e]
                for j in range(offsets[g], offsets[g + 1]):
                    t = member_index[j]
                    pt = p[hq, o, t]
                    zs += pt
                    for e in range(d_v):
                        delta[e] -= pt * values[h, t, e]
                # replacing the set: o' = (z o + delta) / (z - zs + ec)
                z2 = max(z[hq, o] - zs + ec[hq, o, g], 0.0)
                for e in range(d_v):
                    o2 = (z[hq, o] * out[hq, o, e] + delta[e]) / z2 if z2 > 0.0 else 0.0
                    acc += (o2 - out[hq, o, e]) ** 2
        num[g] += acc


def _numerators(logits: np.ndarray, visible: np.ndarray, top: np.ndarray) -> np.ndarray:
    """exp(logits - top) where visible, else 0 (top: the per-query max of visible logits)."""
    return np.exp(np.where(visible, logits - top[..., None], -np.inf))


def key_reconstruction_error(
    keys: np.ndarray, merged_keys: np.ndarray, member_index: np.ndarray, offsets: np.ndarray
) -> np.ndarray:
    """Relative Frobenius error of each merged key against its members.

    Args:
        keys: float32 ``[n_layer, n_head, n_tok, d]``.
        merged_keys: float32 ``[n_layer, n_head, n_group, d]``.
        member_index, offsets: the groups (CSR).

    Returns:
        float32 ``[n_group]``: ``||K_set - k_merged||_F / ||K_set||_F`` over all layers and
        heads (0 for an exact merge; inf if the members are all zero but the merge is not).
    """
    k = float_array(keys, "keys", 4)
    mk = float_array(merged_keys, "merged_keys", 4)
    idx, offs = csr(member_index, offsets, k.shape[2])
    n_group = offs.shape[0] - 1
    if mk.shape != (k.shape[0], k.shape[1], n_group, k.shape[3]):
        raise ValueError(
            f"merged_keys must have shape {(k.shape[0], k.shape[1], n_group, k.shape[3])}"
            f", got {mk.shape}"
        )
    return _key_error_kernel(k, mk, idx, offs)


def _positions(pos: np.ndarray | None, n: int, name: str, default: int) -> np.ndarray:
    if pos is None:
        return np.full(n, default, dtype=np.int64)
    p = index_array(pos, name).astype(np.int64)
    if p.shape[0] != n:
        raise ValueError(f"{name} must have {n} entries, got {p.shape[0]}")
    return p


def set_attention_error(
    queries: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    member_index: np.ndarray,
    offsets: np.ndarray,
    merged_keys: np.ndarray,
    merged_values: np.ndarray,
    merged_bias: np.ndarray,
    *,
    token_bias: np.ndarray | None = None,
    scale: float | None = None,
    positions: np.ndarray | None = None,
    merged_positions: np.ndarray | None = None,
    query_positions: np.ndarray | None = None,
) -> np.ndarray:
    """Attention-output error of replacing each set, alone, by its merged cell.

    Args:
        queries: float32 ``[n_layer, n_q_head, n_obs, d_k]`` (post-RoPE, recent tokens).
        keys: float32 ``[n_layer, n_kv_head, n_tok, d_k]``.
        values: float32 ``[n_layer, n_kv_head, n_tok, d_v]``.
        member_index, offsets: the sets (CSR over tokens).
        merged_keys: float32 ``[n_layer, n_kv_head, n_group, d_k]``.
        merged_values: float32 ``[n_layer, n_kv_head, n_group, d_v]``.
        merged_bias: float32 ``[n_group]`` logit bias of each merged cell (log mass).
        token_bias: float32 ``[n_tok]`` bias the original cells already carry (default 0).
        scale: logit scale (default ``1 / sqrt(d_k)``).
        positions, merged_positions, query_positions: int32 positions of the
            tokens, merged cells and queries; with ``query_positions`` a query only
            sees cells at or before it. ``positions`` and ``merged_positions`` are
            required when ``query_positions`` is given.

    Returns:
        float32 ``[n_group]``: ``sqrt(sum ||o'_g - o||^2 / sum ||o||^2)``, summed over
        layers, query heads and queries.
    """
    q = float_array(queries, "queries", 4)
    k = float_array(keys, "keys", 4)
    v = float_array(values, "values", 4)
    n_layer, n_kv_head, n_tok, d_k = k.shape
    if q.shape[0] != n_layer or q.shape[3] != d_k or q.shape[1] % n_kv_head:
        raise ValueError(
            f"queries must have shape (n_layer={n_layer}, a multiple of "
            f"n_kv_head={n_kv_head}, n_obs, d_k={d_k}), got {q.shape}"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"values must share (n_layer, n_kv_head, n_tok) = {k.shape[:3]} with "
            f"keys, got {v.shape}"
        )
    idx, offs = csr(member_index, offsets, n_tok)
    n_group = offs.shape[0] - 1
    mk = float_array(merged_keys, "merged_keys", 4)
    mv = float_array(merged_values, "merged_values", 4)
    if mk.shape != (n_layer, n_kv_head, n_group, d_k) or mv.shape != (
        n_layer,
        n_kv_head,
        n_group,
        v.shape[3],
    ):
        raise ValueError(
            "merged_keys/merged_values must have shape (n_layer, n_kv_head, "
            f"n_group={n_group}, d); got {mk.shape} and {mv.shape}"
        )
    mb = float_array(merged_bias, "merged_bias", 1, dtype=np.float64)
    if mb.shape[0] != n_group:
        raise ValueError(f"merged_bias needs {n_group} entries, got {mb.shape[0]}")
    tb = (
        np.zeros(n_tok)
        if token_bias is None
        else float_array(token_bias, "token_bias", 1, dtype=np.float64)
    )
    if tb.shape[0] != n_tok:
        raise ValueError(f"token_bias needs {n_tok} entries, got {tb.shape[0]}")
    if query_positions is not None and (positions is None or merged_positions is None):
        raise ValueError("query_positions needs positions and merged_positions too")
    tp = _positions(positions, n_tok, "positions", 0)
    mp = _positions(merged_positions, n_group, "merged_positions", 0)
    qp = _positions(query_positions, q.shape[2], "query_positions", _NO_POSITION)
    s = 1.0 / math.sqrt(d_k) if scale is None else float(scale)
    group = q.shape[1] // n_kv_head
    seen = tp[None, :] <= qp[:, None]  # [n_obs, n_tok]
    seen_merged = mp[None, :] <= qp[:, None]  # [n_obs, n_group]
    num = np.zeros(n_group, dtype=np.float64)
    den = 0.0
    for layer in range(n_layer):
        ql = q[layer].astype(np.float64)  # [n_q_head, n_obs, d_k]
        kl = np.repeat(k[layer].astype(np.float64), group, axis=0)
        logits = ql @ kl.transpose(0, 2, 1) * s + tb  # [n_q_head, n_obs, n_tok]
        mlog = ql @ np.repeat(mk[layer].astype(np.float64), group, axis=0).transpose(0, 2, 1)
        mlog = mlog * s + mb
        top = np.where(seen, logits, -np.inf).max(axis=-1)
        top = np.where(np.isfinite(top), top, 0.0)  # no visible cell: numerators all 0
        p = _numerators(logits, seen[None], top)
        ec = _numerators(mlog, seen_merged[None], top)
        z = p.sum(axis=-1)
        vl = v[layer].astype(np.float64)
        out = np.einsum("hot,hte->hoe", p, np.repeat(vl, group, axis=0))
        out = np.divide(out, z[..., None], out=np.zeros_like(out), where=z[..., None] > 0)
        den += float((out**2).sum())
        _set_delta_kernel(p, z, out, ec, vl, mv[layer].astype(np.float64), idx, offs, group, num)
    return (np.sqrt(num / den) if den > 0 else np.zeros(n_group)).astype(np.float32)


def compressed_attention_error(
    queries: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    compressed_keys: np.ndarray,
    compressed_values: np.ndarray,
    compressed_bias: np.ndarray | None = None,
    *,
    bias: np.ndarray | None = None,
    scale: float | None = None,
    positions: np.ndarray | None = None,
    compressed_positions: np.ndarray | None = None,
    query_positions: np.ndarray | None = None,
) -> np.ndarray:
    """Relative attention-output error of a whole compressed cache, per layer.

    Args:
        queries: float32 ``[n_layer, n_q_head, n_obs, d_k]``.
        keys, values: the original cache, ``[n_layer, n_kv_head, n_tok, d]``.
        compressed_keys, compressed_values: ``[n_layer, n_kv_head, n_out, d]``.
        compressed_bias: float32 ``[n_out]`` bias of the compressed cells (default 0).
        bias: float32 ``[n_tok]`` bias of the original cells (default 0).
        scale: logit scale (default ``1 / sqrt(d_k)``).
        positions, compressed_positions, query_positions: optional causal masking.

    Returns:
        float32 ``[n_layer]``: ``||O' - O||_F / ||O||_F`` over query heads and queries.
    """
    q = float_array(queries, "queries", 4)
    n_layer = q.shape[0]
    out = np.zeros(n_layer, dtype=np.float32)
    mask_a = mask_b = None
    if query_positions is not None:
        if positions is None or compressed_positions is None:
            raise ValueError("query_positions needs positions and compressed_positions too")
        mask_a = causal_bias(query_positions, positions)
        mask_b = causal_bias(query_positions, compressed_positions)
    for layer in range(n_layer):
        ba = _combine(bias, mask_a)
        bb = _combine(compressed_bias, mask_b)
        oa = attention(q[layer], keys[layer], values[layer], ba, scale).astype(np.float64)
        ob = attention(
            q[layer], compressed_keys[layer], compressed_values[layer], bb, scale
        ).astype(np.float64)
        den = np.linalg.norm(oa)
        out[layer] = np.linalg.norm(ob - oa) / den if den > 0 else np.linalg.norm(ob)
    return out


def _combine(bias: np.ndarray | None, mask: np.ndarray | None) -> np.ndarray | None:
    if bias is None:
        return mask
    b = np.asarray(bias, dtype=np.float64)
    return b if mask is None else mask + b[None, :]
