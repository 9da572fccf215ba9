"""Cell scores the methods share: attention from observation queries, and query-free proxies."""

from __future__ import annotations

from typing import Literal

import numpy as np

from edgemerge.methods.base import KVSnapshot
from edgemerge.reference._checks import layer_selection
from edgemerge.reference.attention import attention_probabilities, causal_bias

ImportanceSource = Literal["auto", "importance", "queries", "keydiff"]


def window_attention(kv: KVSnapshot) -> np.ndarray:
    """Attention mass each cell gets from the snapshot's observation queries.

    Softmax over all cells (each carrying its log-mass bias, and the causal mask
    when ``kv.query_positions`` is given), summed over the queries and over the
    query heads that share each KV head.

    Returns:
        float64 ``[n_layer, n_kv_head, n_tok]``.

    Raises:
        ValueError: the snapshot has no queries.
    """
    if kv.queries is None:
        raise ValueError(
            "this score needs KVSnapshot.queries (recent observation-window "
            "queries); capture them or use another importance source"
        )
    bias = np.log(kv.token_mass)
    if kv.query_positions is not None:
        bias = causal_bias(kv.query_positions, kv.positions) + bias[None, :]
    group = kv.queries.shape[1] // kv.n_kv_head
    out = np.empty((kv.n_layer, kv.n_kv_head, kv.n_tok), dtype=np.float64)
    for layer in range(kv.n_layer):
        p = attention_probabilities(kv.queries[layer], kv.keys[layer], bias, kv.scale)
        summed = p.astype(np.float64).sum(axis=1)  # [n_q_head, n_tok]
        out[layer] = summed.reshape(kv.n_kv_head, group, kv.n_tok).sum(axis=1)
    return out


def keydiff_scores(kv: KVSnapshot, layers: np.ndarray | None = None) -> np.ndarray:
    """Query-free importance: how far each key points from the mean key direction.

    KeyDiff's observation: keys that differ from the average key tend to draw
    attention, while keys aligned with it are the common, low-information ones.
    Score = mean over the selected layers (default latter half) and heads of
    ``1 - cos(k_t, mean key)``, in ``[0, 2]``.

    Returns:
        float64 ``[n_tok]``.
    """
    sel = layer_selection(None if layers is None else list(layers), kv.n_layer)
    k = kv.keys[sel].astype(np.float64)
    mu = k.mean(axis=2, keepdims=True)
    kn = np.linalg.norm(k, axis=-1)
    mn = np.linalg.norm(mu, axis=-1)
    denom = kn * mn
    cos = np.divide((k * mu).sum(axis=-1), denom, out=np.zeros_like(kn), where=denom > 0)
    return (1.0 - cos).mean(axis=(0, 1))


def cell_importance(kv: KVSnapshot, source: ImportanceSource = "auto") -> np.ndarray:
    """Importance per cell for pivots and retention.

    ``"importance"``: the snapshot's accumulated attention; ``"queries"``: attention
    from the observation queries summed over layers and heads; ``"keydiff"``:
    :func:`keydiff_scores`; ``"auto"``: the first of these the snapshot can give.

    Returns:
        float64 ``[n_tok]``.

    Raises:
        ValueError: the chosen source is missing from the snapshot, or unknown.
    """
    if source == "auto":
        source = (
            "importance"
            if kv.importance is not None
            else "queries"
            if kv.queries is not None
            else "keydiff"
        )
    if source == "importance":
        if kv.importance is None:
            raise ValueError("importance_source='importance' but KVSnapshot.importance is None")
        return kv.importance.astype(np.float64)
    if source == "queries":
        return window_attention(kv).sum(axis=(0, 1))
    if source == "keydiff":
        return keydiff_scores(kv)
    raise ValueError(
        f"importance source must be auto, importance, queries or keydiff; got {source!r}"
    )


def pool_scores(scores: np.ndarray, kernel: int, mode: Literal["max", "avg"]) -> np.ndarray:
    """1-D pooling along the last axis with an odd ``kernel``, same length ("same" padding).

    SnapKV pools scores so that the neighbours of a strongly attended token survive
    with it (keeping a phrase, not one token of it).
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"pool kernel must be a positive odd number, got {kernel}")
    if kernel == 1:
        return scores.copy()
    half = kernel // 2
    if mode == "max":
        padded = np.pad(
            scores, [(0, 0)] * (scores.ndim - 1) + [(half, half)], constant_values=-np.inf
        )
        windows = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=-1)
        return windows.max(axis=-1)
    if mode == "avg":
        padded = np.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(half, half)])
        windows = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=-1)
        return windows.mean(axis=-1)
    raise ValueError(f"pooling must be 'max' or 'avg', got {mode!r}")


def top_indices(scores: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` candidates of highest score (ties: the earlier token), ascending."""
    if k <= 0 or candidates.size == 0:
        return np.zeros(0, dtype=np.int32)
    order = np.lexsort((candidates, -scores[candidates]))
    return np.sort(candidates[order[:k]]).astype(np.int32)
