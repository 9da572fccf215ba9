"""Centred cosine similarity of adjacent keys, and its aggregation into one score per pair.

Raw key cosines are dominated by a component every key of a layer/head shares
(about 0.9 between adjacent keys and still high between random ones on Qwen), so
a threshold on them means nothing across models. Subtracting the per-layer/head
mean key first leaves the part that tells neighbours apart: adjacent keys stay
similar (about 0.78) while random pairs drop to about 0. All merge thresholds in
edgemerge are therefore thresholds on *centred* similarity unless stated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from numba import njit, prange

from edgemerge.reference._checks import float_array, layer_selection


@njit(parallel=True, cache=True)
def _adjacent_cosine_kernel(keys: np.ndarray, mean: np.ndarray) -> np.ndarray:
    n_layer, n_head, n_tok, d = keys.shape
    n_pair = max(n_tok - 1, 0)
    out = np.zeros((n_layer, n_head, n_pair), dtype=np.float32)
    for lh in prange(n_layer * n_head):
        layer = lh // n_head
        head = lh % n_head
        for i in range(n_pair):
            dot = 0.0
            na = 0.0
            nb = 0.0
            for e in range(d):
                a = np.float64(keys[layer, head, i, e]) - mean[layer, head, e]
                b = np.float64(keys[layer, head, i + 1, e]) - mean[layer, head, e]
                dot += a * b
                na += a * a
                nb += b * b
            denom = np.sqrt(na * nb)
            if denom > 0.0:
                c = dot / denom
                out[layer, head, i] = min(1.0, max(-1.0, c))
    return out


def mean_keys(keys: np.ndarray) -> np.ndarray:
    """Per-layer/head mean key over tokens (the default centring vector).

    Args:
        keys: float32 ``[n_layer, n_head, n_tok, d]``.

    Returns:
        float32 ``[n_layer, n_head, d]``, accumulated in float64.
    """
    k = float_array(keys, "keys", 4)
    if k.shape[2] == 0:
        raise ValueError("keys has no tokens (axis 2 is empty); the mean key is undefined")
    return k.mean(axis=2, dtype=np.float64).astype(np.float32)


def adjacent_similarity(
    keys: np.ndarray, mean: np.ndarray | None = None, *, centre: bool = True
) -> np.ndarray:
    """Cosine similarity of each key with the next one, per layer and head.

    Args:
        keys: float32 ``[n_layer, n_head, n_tok, d]`` (post-RoPE keys as cached).
        mean: float32 ``[n_layer, n_head, d]`` centring vector; default the mean
            over the tokens given (:func:`mean_keys`). Ignored when ``centre`` is False.
        centre: subtract ``mean`` before the cosine (False gives the raw cosine).

    Returns:
        float32 ``[n_layer, n_head, n_tok - 1]``: ``out[l, h, i] = cos(k_i - mu, k_{i+1} - mu)``
        in ``[-1, 1]``, computed in float64. A pair where either centred key is
        exactly zero has no direction and scores 0.

    Raises:
        ValueError: wrong shapes, no tokens, or NaN/inf in the input.
    """
    k = float_array(keys, "keys", 4)
    n_layer, n_head, n_tok, d = k.shape
    if n_tok == 0:
        raise ValueError("keys has no tokens (axis 2 is empty)")
    if not centre:
        mu = np.zeros((n_layer, n_head, d), dtype=np.float64)
    elif mean is None:
        mu = k.mean(axis=2, dtype=np.float64)
    else:
        mu = float_array(mean, "mean", 3, dtype=np.float64)
        if mu.shape != (n_layer, n_head, d):
            raise ValueError(
                f"mean must have shape (n_layer, n_head, d) = {(n_layer, n_head, d)}, "
                f"got {mu.shape}"
            )
    return _adjacent_cosine_kernel(k, mu)


def aggregate_similarity(
    similarity: np.ndarray,
    layers: Sequence[int] | None = None,
    *,
    reduce: Literal["mean", "min"] = "mean",
    layer_offsets: np.ndarray | None = None,
) -> np.ndarray:
    """One score per adjacent pair from per-layer/head similarities.

    llama.cpp cells hold every layer at once, so a merge decision is one
    decision per pair of cells; this reduces the selected layers and all heads to it.

    Args:
        similarity: float32 ``[n_layer, n_head, n_pair]`` from :func:`adjacent_similarity`.
        layers: indices into axis 0 to use; default the latter half,
            ``range(n_layer // 2, n_layer)``.
        reduce: ``"mean"`` over the selected layers and heads, or ``"min"`` (a pair
            scores as its least similar layer/head, a stricter rule).
        layer_offsets: float32 ``[n_layer]`` calibrated per-layer thresholds,
            subtracted from each layer before reducing; a score of 0 then means
            "at the calibrated threshold" (on average, or in every layer for ``"min"``).

    Returns:
        float32 ``[n_pair]``.

    Raises:
        ValueError: bad shapes, layer indices, ``reduce`` or non-finite values.
    """
    sim = float_array(similarity, "similarity", 3, dtype=np.float64)
    sel = layer_selection(layers, sim.shape[0])
    if layer_offsets is not None:
        off = float_array(layer_offsets, "layer_offsets", 1, dtype=np.float64)
        if off.shape[0] != sim.shape[0]:
            raise ValueError(
                f"layer_offsets needs one threshold per layer ({sim.shape[0]}), got {off.shape[0]}"
            )
        sim = sim - off[:, None, None]
    part = sim[sel]
    if reduce == "mean":
        out = part.mean(axis=(0, 1))
    elif reduce == "min":
        out = part.min(axis=(0, 1))
    else:
        raise ValueError(f"reduce must be 'mean' or 'min', got {reduce!r}")
    return out.astype(np.float32)
