"""``cam``: Cache Merging (CaM; Zhang et al., "CaM: Cache Merging for Memory-efficient
LLMs Inference", ICML 2024).

What CaM does. CaM sits on top of an eviction policy (the paper pairs it with
StreamingLLM and H2O). When a token leaves the cache, its *value* is not thrown
away: with probability ``p = min(1, a_i / mean_{t in T} a_t)`` (its attention
``a_i`` relative to the mean attention of the next ``m`` tokens ``T``, per head) it
is added, divided by ``m``, to the values of those ``m`` following tokens. Keys are
never changed. In the authors' streaming code the decision is a Bernoulli draw
with probability ``p``, and the evicted token is always the oldest one of the
recent window, so its value flows into the tokens just after it, which may
themselves be evicted later and pass it on.

What this implementation does, as one-shot compression of a snapshot:

* eviction policy: StreamingLLM's (``n_sink`` sinks and the latest
  ``budget - n_sink`` cells); the middle cells are evicted in position order, as
  the streaming cache would evict them one by one;
* each evicted token ``i`` merges its current value (including what earlier
  evictions passed to it) into tokens ``i+1 .. i+m`` (fewer near the end; the
  share is ``1 / (number of targets)``, so no merged value is lost);
* attention ``a``: per layer and KV head from the observation queries when the
  snapshot has them, else the per-cell ``importance`` (the same for every head);
* the Bernoulli draw is replaced by its expectation, ``p`` itself, unless
  ``sample=True`` (then seeded by ``seed``), so results are deterministic.

Evicted tokens are members of no cell (their values live on only as mixed into
the kept cells' values); kept cells keep their keys and their bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from edgemerge.methods._build import identity, keep_tokens
from edgemerge.methods._scoring import window_attention
from edgemerge.methods.base import CompressedKV, CompressionMethod, KVSnapshot
from edgemerge.reference._checks import positive_int


@dataclass(frozen=True)
class CaM(CompressionMethod):
    """StreamingLLM eviction whose evicted values are merged into the following cells.

    Attributes:
        n_sink: attention-sink cells kept at the start.
        merge_span: ``m``, the following cells each evicted value is spread over.
        sample: draw CaM's Bernoulli merge mask (else use its expectation).
        seed: seed of the draw when ``sample``.
    """

    name: ClassVar[str] = "cam"
    n_sink: int = 4
    merge_span: int = 16
    sample: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        positive_int(self.n_sink, "n_sink", minimum=0)
        positive_int(self.merge_span, "merge_span")

    def protected_cells(self, n_tok: int) -> int:
        return self.n_sink + 1

    def compress(self, kv: KVSnapshot, budget: int) -> CompressedKV:
        """Evict the middle cells in order, merging each one's value forward.

        Raises:
            ValueError: the snapshot has neither queries nor importance, or the
                budget is below ``n_sink + 1``.
        """
        budget = self.check_budget(kv, budget)
        if kv.n_tok <= budget:
            return identity(kv)
        if kv.queries is not None:
            attn = window_attention(kv)  # [n_layer, n_head, n_tok]
        elif kv.importance is not None:
            attn = np.broadcast_to(
                kv.importance.astype(np.float64), (kv.n_layer, kv.n_kv_head, kv.n_tok)
            )
        else:
            raise ValueError("cam needs attention scores: KVSnapshot.queries or .importance")
        n_recent = budget - self.n_sink
        evict = np.arange(self.n_sink, kv.n_tok - n_recent)
        values = kv.values.astype(np.float64)
        rng = np.random.default_rng(self.seed) if self.sample else None
        for i in evict:
            targets = slice(i + 1, min(i + 1 + self.merge_span, kv.n_tok))
            n_target = targets.stop - targets.start
            mean = attn[:, :, targets].mean(axis=2)
            with np.errstate(divide="ignore", invalid="ignore"):
                p = np.where(mean > 0, attn[:, :, i] / mean, np.where(attn[:, :, i] > 0, 1.0, 0.0))
            p = np.clip(p, 0.0, 1.0)
            if rng is not None:
                p = (rng.random(p.shape) < p).astype(np.float64)
            values[:, :, targets] += (p / n_target)[:, :, None, None] * values[:, :, i][:, :, None]
        keep = np.concatenate([np.arange(self.n_sink), np.arange(kv.n_tok - n_recent, kv.n_tok)])
        return keep_tokens(
            kv,
            keep,
            values=values.astype(np.float32),
            info={"n_recent": n_recent, "n_evicted": int(evict.size)},
        )
