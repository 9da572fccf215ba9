"""Which stored blocks a turn's queries attend to, and which cells it attends to least.

Pure numpy. For every cache layer, KV head ``h`` and the query heads of its group
(llama.cpp's GQA rule: query head ``g`` reads KV head ``g // (n_head / n_kv_head)``),
each of the window's queries ``q`` gives logits ``attn_scale * q . k`` (+ the cell's
bias for cells in the cache). Normalised by the log-sum-exp over the cells now in the
cache, ``exp(logit - lse)`` is the attention share a key would get next to the cache:

* a stored block's share is ``exp(max over its positions - lse)`` (its best key: a name
  or a number is one token), averaged over the window's queries;
* a cell's share is its own, averaged the same way.

A block or cell scores the largest share of any layer and query head: retrieval lives
in a few heads, and a mean over all of them would drown it. Only the layers past the
first ``recall_skip_layers`` of the model score blocks: an early layer's head matches
tokens and positions, and its large shares for the wrong blocks won the maximum.

Shapes: ``queries`` float32 ``[L, T, n_head, D]``; keys float32 ``[L, n, n_kv_head, D]``,
position-major as the cache keeps its rows (a row is ``n_kv_head * D`` values); ``bias``
float32 ``[n]``. The stored keys may be any sequence of ``L`` such layers: the engine
converts one layer at a time, so a turn never holds the whole store as float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _grouped(q: np.ndarray, n_kv_head: int) -> np.ndarray:
    """[T, n_head, D] -> [n_kv_head, group * T, D] (query heads of one KV head together)."""
    t, n_head, d = q.shape
    if n_head % n_kv_head:
        raise ValueError(f"{n_head} query heads do not split over {n_kv_head} KV heads")
    g = n_head // n_kv_head
    return np.ascontiguousarray(q.reshape(t, n_kv_head, g, d).transpose(1, 2, 0, 3)).reshape(
        n_kv_head, g * t, d
    )


def attention_shares(
    queries: np.ndarray,
    attn_scale: float,
    cache_keys: np.ndarray,
    cache_bias: np.ndarray,
    store_keys: Sequence[np.ndarray],
    block_starts: np.ndarray,
    block_layers: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of stored blocks and of the cache's cells.

    Args:
        queries: float32 [L, T, n_head, D], the window's post-RoPE queries.
        attn_scale: logit = attn_scale * q . k.
        cache_keys: float32 [L, n_cells, n_kv_head, D]; cache_bias float32 [n_cells].
        store_keys: float32 [L, n_stored, n_kv_head, D], stored positions grouped by
            block, or a sequence whose item ``l`` is layer ``l``'s [n_stored, n_kv_head, D]
            (read only for the layers in ``block_layers``).
        block_starts: int [n_blocks], index of each block's first stored position
            (ascending, block_starts[0] == 0).
        block_layers: bool [L], the layers whose heads score stored blocks (every layer
            scores cells); None: all of them.

    Returns:
        (block_score float32 [n_blocks], cell_score float32 [n_cells]), each the best
        layer's and head's window-averaged share.
    """
    n_layer, t, _, _ = queries.shape
    n_kv = cache_keys.shape[2]
    n_blocks = len(block_starts)
    block_score = np.zeros(n_blocks, np.float32)
    cell_score = np.zeros(cache_keys.shape[1], np.float32)
    if t == 0:
        return block_score, cell_score
    bias = cache_bias.astype(np.float32)[None, None, :]
    if block_layers is None:
        block_layers = np.ones(n_layer, bool)
    block_layers = np.asarray(block_layers, bool)
    if block_layers.shape != (n_layer,):
        raise ValueError(f"block_layers has shape {block_layers.shape}, not ({n_layer},)")
    for il in range(n_layer):
        q = _grouped(queries[il].astype(np.float32), n_kv) * np.float32(attn_scale)
        # [n, H, D] -> [H, D, n]: a transposed view, which BLAS reads without a copy
        logits = np.matmul(q, cache_keys[il].transpose(1, 2, 0)) + bias  # [H, G*T, n]
        top = logits.max(axis=-1, keepdims=True)
        share = np.exp(logits - top)
        denom = share.sum(axis=-1, keepdims=True)
        share /= denom
        lse = top + np.log(denom)  # [H, G*T, 1]
        g = q.shape[1] // t
        per_head = share.reshape(n_kv, g, t, -1).mean(axis=2)  # [H, G, n]
        np.maximum(cell_score, per_head.max(axis=(0, 1)), out=cell_score)
        if n_blocks and block_layers[il]:
            s = np.matmul(q, store_keys[il].transpose(1, 2, 0))  # [H, G*T, n_stored]
            best = np.maximum.reduceat(s, block_starts, axis=-1)  # [H, G*T, n_blocks]
            b_share = np.exp(np.minimum(best - lse, 0.0)).reshape(n_kv, g, t, -1).mean(axis=2)
            np.maximum(block_score, b_share.max(axis=(0, 1)), out=block_score)
    return block_score, cell_score


def choose_blocks(
    block_score: np.ndarray,
    max_blocks: int,
    threshold: float,
    block_ids: np.ndarray | None = None,
    following: int = 0,
) -> np.ndarray:
    """Indices of the blocks to restore: blocks scoring at least ``threshold`` (and above
    zero), best first, each followed by the stored blocks among the ``following`` block
    ids after its own; at most ``max_blocks`` in all.

    Args:
        block_score: float [n_blocks].
        block_ids: int [n_blocks], the block id of each score (None: 0..n_blocks-1).
        following: blocks after a chosen one that come with it (when stored).
    """
    ids = np.arange(block_score.size) if block_ids is None else np.asarray(block_ids)
    index_of = {int(b): i for i, b in enumerate(ids.tolist())}
    order = np.argsort(-block_score, kind="stable")
    order = order[(block_score[order] >= threshold) & (block_score[order] > 0)]
    chosen: list[int] = []
    seen: set[int] = set()
    for i in order.tolist():
        if len(chosen) >= max_blocks:
            break
        b = int(ids[i])
        for j in [i] + [index_of.get(b + k, -1) for k in range(1, following + 1)]:
            if j >= 0 and j not in seen and len(chosen) < max_blocks:
                seen.add(j)
                chosen.append(j)
    return np.array(chosen, np.intp)
