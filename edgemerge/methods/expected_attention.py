"""``expected_attention``: the attention future queries are expected to pay (after NVIDIA
kvpress's ExpectedAttentionPress; Devoto et al., "Expected Attention", arXiv 2510.00636).

Idea. Future queries are not known at compression time, but recent ones say what they
look like: model the query of each layer and query head as a Gaussian ``q ~ N(mu,
Sigma)`` fitted to the last ``n_window`` queries. For a key ``k`` the attention logit
``s * q.k`` (``s`` the KQ scale) is then Gaussian too, and the expected unnormalised
weight is its moment generating function::

    E[exp(s q.k)] = exp(s k.mu + s^2 k^T Sigma k / 2)

(``s = 1/sqrt(d)`` gives kvpress's ``k.mu/sqrt(d) + k^T Sigma k/(2d)``). A cell's score
is that weight normalised over the cells (a softmax of the exponent), averaged over the
query heads of a GQA group, times ``||v||`` because a cell adds ``weight * v`` to the
output: ``(a + epsilon) * ||v||``.

RoPE. The captured queries are post-RoPE, each at its own position, while the queries
to come sit at positions ``P .. P + n_future - 1`` after the last cell. So each query is
first rotated back to position 0 (``R(-p) q``, using ``KVSnapshot.rope``), the mean and
covariance are taken there, and then moved forward, averaged over the future positions::

    mu_f    = mean_p R(p) mu
    Sigma_f = mean_p R(p) Sigma R(p)^T

kvpress averages the rotation first and uses ``Rbar Sigma Rbar^T`` (``Rbar = mean_p
R(p)``); this module averages the rotated covariance itself, as the issue asked. Both
averages are exact and cheap: ``R(p)`` acts per pair of dimensions, so the averages
need only ``mean_p cos``, ``mean_p sin`` and their pairwise products (see
:func:`future_statistics`). A snapshot without ``rope`` (synthetic ones) skips both
rotations: the statistics are used where the queries were (``info["rope"] == "none"``).

Sinks and window. The first ``n_sink`` cells are always kept and left out of the
normalisation (attention sinks draw large logits that would flatten every other
score; kvpress does the same). The latest ``n_recent`` cells are always kept, as the
other evictors keep theirs. The remaining budget goes to the top-scoring cells between.

Shared cells. One decision per cell for all layers and heads: each (layer, KV head)'s
scores are normalised to sum 1 over the scored cells (so no layer wins by its value
norms) and summed, as SnapKV sums its per-head attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from edgemerge.methods._build import identity, keep_tokens
from edgemerge.methods._scoring import top_indices
from edgemerge.methods.base import CompressedKV, CompressionMethod, KVSnapshot
from edgemerge.reference._checks import positive_int
from edgemerge.reference.rope import Rope, rope_tables, rotate


def query_statistics(
    queries: np.ndarray, positions: np.ndarray | None, rope: Rope | None, covariance: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean and covariance of the queries, position-free when ``rope`` is given.

    Args:
        queries: float ``[n_layer, n_q_head, n_window, d]``, post-RoPE.
        positions: int ``[n_window]`` their positions (needed with ``rope``).
        rope: the rotation they carry, or None to take them as they are.
        covariance: also return the covariance (else None).

    Returns:
        float64 ``[n_layer, n_q_head, d]`` mean, float64 ``[n_layer, n_q_head, d, d]``
        covariance (population: divided by ``n_window``) or None.
    """
    q = queries.astype(np.float64)
    if rope is not None:
        q = rotate(q, -np.asarray(positions, dtype=np.float64), rope)
    mu = q.mean(axis=2)
    if not covariance:
        return mu, None
    centred = q - mu[:, :, None]
    return mu, np.einsum("lhnd,lhne->lhde", centred, centred) / q.shape[2]


def future_statistics(
    mu: np.ndarray, sigma: np.ndarray | None, rope: Rope, first: int, n_future: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """``mean_p R(p) mu`` and ``mean_p R(p) sigma R(p)^T`` over ``p = first .. first+n_future-1``.

    With ``(R x)_i = c_i x_i + g_i x_{pi(i)}`` (``c = cos(p phi)``, ``g = sign sin(p phi)``,
    ``pi`` the pair partner, see :mod:`edgemerge.reference.rope`)::

        (R S R^T)_ij = c_i c_j S_ij + c_i g_j S_i,pi(j) + g_i c_j S_pi(i),j + g_i g_j S_pi(i),pi(j)

    so the average needs only the ``[d, d]`` means of ``c c^T``, ``c g^T``, ``g c^T`` and
    ``g g^T`` over the positions.

    Args:
        mu: float64 ``[..., d]``; sigma: float64 ``[..., d, d]`` or None.

    Returns:
        the averaged mean ``[..., d]`` and covariance ``[..., d, d]`` (or None).
    """
    d = mu.shape[-1]
    phi, partner, sign = rope_tables(rope, d)
    angle = np.arange(first, first + n_future, dtype=np.float64)[:, None] * phi[None, :]
    c, g = np.cos(angle), sign * np.sin(angle)  # [n_future, d]
    mu_f = c.mean(axis=0) * mu + g.mean(axis=0) * mu[..., partner]
    if sigma is None:
        return mu_f, None
    cc, cg = c.T @ c / n_future, c.T @ g / n_future
    gc, gg = g.T @ c / n_future, g.T @ g / n_future
    swap_j = sigma[..., :, partner]
    swap_i = sigma[..., partner, :]
    sigma_f = cc * sigma + cg * swap_j + gc * swap_i + gg * swap_i[..., :, partner]
    return mu_f, sigma_f


def expected_attention_scores(
    kv: KVSnapshot,
    mu: np.ndarray,
    sigma: np.ndarray | None,
    n_sink: int,
    *,
    epsilon: float = 0.0,
    value_norm: bool = True,
) -> np.ndarray:
    """Per-(layer, KV head) expected-attention score of every cell after the sinks.

    Args:
        kv: the snapshot (keys ``[n_layer, n_kv_head, n_tok, d]``, its scale and mass).
        mu: float64 ``[n_layer, n_q_head, d]`` the future query mean.
        sigma: float64 ``[n_layer, n_q_head, d, d]`` its covariance, or None (mean only).
        n_sink: leading cells left out (their scores are not computed).

    Returns:
        float64 ``[n_layer, n_kv_head, n_tok - n_sink]``: softmax over those cells of
        ``s k.mu + s^2 k^T Sigma k / 2 + log(mass)``, averaged over each GQA group, then
        ``(a + epsilon) * ||v||`` (or ``a + epsilon`` without ``value_norm``).
    """
    s = kv.scale
    group = mu.shape[1] // kv.n_kv_head
    log_mass = np.log(kv.token_mass[n_sink:])
    out = np.empty((kv.n_layer, kv.n_kv_head, kv.n_tok - n_sink))
    n, d = kv.n_tok - n_sink, kv.keys.shape[3]
    for layer in range(kv.n_layer):
        a = np.empty((kv.n_kv_head, n))
        for head in range(kv.n_kv_head):
            k = kv.keys[layer, head, n_sink:].astype(np.float64)  # [n, d]
            heads = slice(head * group, (head + 1) * group)  # query heads reading this one
            logits = s * (k @ mu[layer, heads].T) + log_mass[:, None]  # [n, group]
            if sigma is not None:
                # one GEMM against the group's covariances side by side: a stacked
                # [group, n, d] @ [group, d, d] matmul is several times slower in numpy
                side = sigma[layer, heads].transpose(1, 0, 2).reshape(d, group * d)
                ksk = np.einsum("ngd,nd->ng", (k @ side).reshape(n, group, d), k)
                logits += 0.5 * s * s * ksk
            logits -= logits.max(axis=0, keepdims=True)
            p = np.exp(logits)
            a[head] = (p / p.sum(axis=0, keepdims=True)).mean(axis=1) + epsilon
        if value_norm:
            a *= np.linalg.norm(kv.values[layer, :, n_sink:].astype(np.float64), axis=-1)
        out[layer] = a
    return out


@dataclass(frozen=True)
class ExpectedAttention(CompressionMethod):
    """Keep sinks, the recent window and the cells future queries are expected to attend.

    Attributes:
        n_window: latest observation queries the statistics use; None: all the snapshot
            has (the suite captures 32). Fewer in the snapshot: all of them.
        n_future: future positions the RoPE rotation is averaged over (kvpress: 512).
        n_sink: leading cells always kept and left out of the scores.
        n_recent: latest cells always kept.
        covariance: use the query covariance (else the mean alone, ``k^T Sigma k = 0``).
        value_norm: multiply by ``||v||``.
        epsilon: added to the attention before the value norm (kvpress: 0).
    """

    name: ClassVar[str] = "expected_attention"
    n_window: int | None = None
    n_future: int = 512
    n_sink: int = 4
    n_recent: int = 32
    covariance: bool = True
    value_norm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        if self.n_window is not None:
            positive_int(self.n_window, "n_window")
        positive_int(self.n_future, "n_future")
        positive_int(self.n_sink, "n_sink", minimum=0)
        positive_int(self.n_recent, "n_recent", minimum=0)
        for name in ("covariance", "value_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)):
            raise ValueError(f"epsilon must be a number, got {self.epsilon!r}")
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ValueError(f"epsilon must be finite and >= 0, got {self.epsilon}")

    def protected_cells(self, n_tok: int) -> int:
        return max(1, self.n_sink + self.n_recent)

    def _budget_hint(self) -> str:
        return f"n_sink={self.n_sink} + n_recent={self.n_recent}"

    def window(self, kv: KVSnapshot) -> int:
        """Observation queries the statistics use (``n_window``, capped at what there is)."""
        have = 0 if kv.queries is None else int(kv.queries.shape[2])
        return have if self.n_window is None else min(self.n_window, have)

    def scores(self, kv: KVSnapshot) -> np.ndarray:
        """float64 ``[n_tok - n_sink]``: the per-cell score the top-k choice ranks by.

        Raises:
            ValueError: no queries, or a RoPE without query positions.
        """
        if kv.queries is None:
            raise ValueError(
                "expected_attention needs KVSnapshot.queries (recent queries to fit the "
                "query statistics to)"
            )
        if kv.n_tok <= self.n_sink:
            return np.zeros(0)
        n_window = self.window(kv)
        queries = kv.queries[:, :, -n_window:]
        qpos = None if kv.query_positions is None else kv.query_positions[-n_window:]
        if kv.rope is not None and qpos is None:
            raise ValueError(
                "expected_attention: KVSnapshot.rope is given but query_positions is not; "
                "the queries cannot be rotated back without their positions"
            )
        mu, sigma = query_statistics(queries, qpos, kv.rope, self.covariance)
        if kv.rope is not None:
            first = int(max(kv.positions[-1], qpos[-1])) + 1  # the next position to decode
            mu, sigma = future_statistics(mu, sigma, kv.rope, first, self.n_future)
        per_head = expected_attention_scores(
            kv, mu, sigma, self.n_sink, epsilon=self.epsilon, value_norm=self.value_norm
        )
        total = per_head.sum(axis=2, keepdims=True)
        # a head whose scores are all 0 (zero values) has no say rather than NaN
        shares = np.divide(per_head, total, out=np.zeros_like(per_head), where=total > 0)
        return shares.sum(axis=(0, 1))

    def compress(self, kv: KVSnapshot, budget: int) -> CompressedKV:
        """Keep the sinks, the recent window and the top remaining cells by expected attention.

        Raises:
            ValueError: the budget is below ``n_sink + n_recent``, or the snapshot has no
                queries (or a RoPE without query positions).
        """
        budget = self.check_budget(kv, budget)
        if kv.n_tok <= budget:
            return identity(kv)
        score = self.scores(kv)  # cells n_sink .. n_tok - 1
        candidates = np.arange(self.n_sink, kv.n_tok - self.n_recent)
        padded = np.concatenate([np.zeros(self.n_sink), score])
        top = top_indices(padded, candidates, budget - self.n_sink - self.n_recent)
        keep = np.concatenate(
            [np.arange(self.n_sink), top, np.arange(kv.n_tok - self.n_recent, kv.n_tok)]
        )
        return keep_tokens(
            kv,
            keep,
            info={
                "n_window": self.window(kv),
                "rope": "none" if kv.rope is None else kv.rope.style,
                "n_recent": self.n_recent,
            },
        )
