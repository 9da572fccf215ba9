"""Plain softmax attention with GQA head mapping (numpy, float64 inside).

Used by the tests, the methods (to score cells from observation queries) and
the fidelity harness. Query head ``h`` reads KV head ``h // (n_q_head // n_kv_head)``,
llama.cpp's grouping (consecutive query heads share a KV head).
"""

from __future__ import annotations

import math

import numpy as np

from edgemerge.reference._checks import float_array


def _check(q: np.ndarray, k: np.ndarray, v: np.ndarray | None) -> tuple[np.ndarray, ...]:
    qs = float_array(q, "q", 3, dtype=np.float64)
    ks = float_array(k, "k", 3, dtype=np.float64)
    n_q_head, _, d_k = qs.shape
    n_kv_head, n_kv, d_k2 = ks.shape
    if d_k != d_k2:
        raise ValueError(f"q and k must share the head size, got {d_k} and {d_k2}")
    if n_kv_head == 0 or n_q_head % n_kv_head:
        raise ValueError(
            f"n_q_head={n_q_head} must be a positive multiple of n_kv_head="
            f"{n_kv_head} (grouped-query attention)"
        )
    if n_kv == 0:
        raise ValueError("k has no cells to attend to")
    out = [qs, ks]
    if v is not None:
        vs = float_array(v, "v", 3, dtype=np.float64)
        if vs.shape[:2] != ks.shape[:2]:
            raise ValueError(
                f"v must have shape (n_kv_head, n_kv, d_v) with "
                f"{ks.shape[:2]} leading, got {vs.shape}"
            )
        out.append(vs)
    return tuple(out)


def attention_probabilities(
    q: np.ndarray,
    k: np.ndarray,
    bias: np.ndarray | None = None,
    scale: float | None = None,
) -> np.ndarray:
    """Softmax attention weights.

    Args:
        q: float32 ``[n_q_head, n_q, d_k]``.
        k: float32 ``[n_kv_head, n_kv, d_k]``.
        bias: float32 ``[n_kv]`` (per cell, e.g. log mass) or ``[n_q, n_kv]``
            added to the scaled logits; ``-inf`` masks a cell.
        scale: logit scale, default ``1 / sqrt(d_k)``.

    Returns:
        float32 ``[n_q_head, n_q, n_kv]``, rows summing to 1.

    Raises:
        ValueError: bad shapes, NaN/inf input (other than ``-inf`` in ``bias``), or
            a query whose every cell is masked.
    """
    qs, ks = _check(q, k, None)
    return _probs(qs, ks, bias, scale).astype(np.float32)


def _probs(
    qs: np.ndarray, ks: np.ndarray, bias: np.ndarray | None, scale: float | None
) -> np.ndarray:
    n_q_head, n_q, d_k = qs.shape
    n_kv_head, n_kv, _ = ks.shape
    s = 1.0 / math.sqrt(d_k) if scale is None else float(scale)
    if not math.isfinite(s):
        raise ValueError(f"scale must be finite, got {scale!r}")
    group = n_q_head // n_kv_head
    kk = np.repeat(ks, group, axis=0)  # [n_q_head, n_kv, d_k]
    logits = np.einsum("hqd,hkd->hqk", qs, kk) * s
    if bias is not None:
        b = float_array(bias, "bias", None, dtype=np.float64, allow_neg_inf=True)
        if b.shape not in ((n_kv,), (n_q, n_kv)):
            raise ValueError(f"bias must have shape ({n_kv},) or ({n_q}, {n_kv}), got {b.shape}")
        logits = logits + b
    top = logits.max(axis=-1, keepdims=True)
    if np.isneginf(top).any():
        raise ValueError("bias masks every cell for some query; attention is undefined there")
    e = np.exp(logits - top)
    return e / e.sum(axis=-1, keepdims=True)


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    bias: np.ndarray | None = None,
    scale: float | None = None,
) -> np.ndarray:
    """Softmax attention output ``softmax(scale * q k^T + bias) v`` with GQA.

    Args:
        q: float32 ``[n_q_head, n_q, d_k]``.
        k: float32 ``[n_kv_head, n_kv, d_k]``.
        v: float32 ``[n_kv_head, n_kv, d_v]``.
        bias, scale: as for :func:`attention_probabilities`.

    Returns:
        float32 ``[n_q_head, n_q, d_v]``.
    """
    qs, ks, vs = _check(q, k, v)
    p = _probs(qs, ks, bias, scale)
    group = qs.shape[0] // ks.shape[0]
    return np.einsum("hqk,hkd->hqd", p, np.repeat(vs, group, axis=0)).astype(np.float32)


def causal_bias(query_positions: np.ndarray, cell_positions: np.ndarray) -> np.ndarray:
    """``[n_q, n_kv]`` bias that masks (``-inf``) cells positioned after each query."""
    qp = np.asarray(query_positions, dtype=np.int64)
    cp = np.asarray(cell_positions, dtype=np.int64)
    return np.where(cp[None, :] <= qp[:, None], 0.0, -np.inf)
