"""ExpectedAttention and KeyDiff against plain numpy-loop references, and their rules.

The references below follow the definitions term by term (explicit rotation matrices,
loops over layers, heads, cells and future positions); the implementations vectorise
them. Both run in float64 from the same float32 inputs, so they agree to rounding:
rtol 1e-8 (the observed relative differences are below 1e-15).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgemerge.methods import ExpectedAttention, KeyDiff, KVSnapshot, get_method
from edgemerge.methods.expected_attention import future_statistics
from edgemerge.reference.rope import Rope, rope_tables, rotate

RTOL = 1e-8
N_TOK = 48
D = 8
NEOX = Rope("neox", D, 100.0)


def rope_matrix(p: float, rope: Rope, d: int) -> np.ndarray:
    """``R(p)`` as a ``[d, d]`` matrix, straight from the definition."""
    m = np.eye(d)
    half = rope.n_rot // 2
    for k in range(half):
        theta = rope.freq_scale * rope.freq_base ** (-2.0 * k / rope.n_rot)
        a, b = (2 * k, 2 * k + 1) if rope.style == "norm" else (k, k + half)
        c, s = math.cos(p * theta), math.sin(p * theta)
        m[a, a], m[a, b], m[b, a], m[b, b] = c, -s, s, c
    return m


def small_snapshot(
    rope: Rope | None = NEOX,
    *,
    seed: int = 0,
    n_layer: int = 2,
    n_kv_head: int = 2,
    group: int = 2,
    n_obs: int = 6,
    mass: bool = False,
) -> KVSnapshot:
    rng = np.random.default_rng(seed)
    positions = np.cumsum(rng.integers(1, 3, N_TOK)).astype(np.int32)
    return KVSnapshot(
        keys=rng.standard_normal((n_layer, n_kv_head, N_TOK, D)).astype(np.float32),
        values=rng.standard_normal((n_layer, n_kv_head, N_TOK, D)).astype(np.float32),
        positions=positions,
        queries=rng.standard_normal((n_layer, n_kv_head * group, n_obs, D)).astype(np.float32),
        query_positions=positions[-n_obs:],
        mass=rng.integers(1, 4, N_TOK).astype(np.float32) if mass else None,
        attn_scale=0.3,
        rope=rope,
    )


def reference_expected_attention(
    kv: KVSnapshot,
    *,
    n_window: int,
    n_future: int,
    n_sink: int,
    covariance: bool = True,
    value_norm: bool = True,
    epsilon: float = 0.0,
) -> np.ndarray:
    """``[n_tok - n_sink]`` scores, one loop per definition."""
    n_layer, n_q_head = kv.queries.shape[:2]
    group = n_q_head // kv.n_kv_head
    n = kv.n_tok - n_sink
    s = kv.scale
    qpos = kv.query_positions[-n_window:]
    first = int(max(kv.positions[-1], qpos[-1])) + 1
    total = np.zeros(n)
    for layer in range(n_layer):
        per_head = np.zeros((kv.n_kv_head, n))
        for hq in range(n_q_head):
            window = kv.queries[layer, hq, -n_window:].astype(np.float64)
            if kv.rope is not None:
                window = np.stack(
                    [rope_matrix(p, kv.rope, D).T @ q for p, q in zip(qpos, window, strict=True)]
                )
            mu = window.mean(axis=0)
            sigma = np.zeros((D, D))
            if covariance:
                for q in window:
                    sigma += np.outer(q - mu, q - mu) / n_window
            if kv.rope is not None:
                mu_f, sigma_f = np.zeros(D), np.zeros((D, D))
                for p in range(first, first + n_future):
                    r = rope_matrix(p, kv.rope, D)
                    mu_f += r @ mu / n_future
                    sigma_f += r @ sigma @ r.T / n_future
                mu, sigma = mu_f, sigma_f
            logits = np.zeros(n)
            for t in range(n):
                k = kv.keys[layer, hq // group, n_sink + t].astype(np.float64)
                logits[t] = (
                    s * k @ mu + 0.5 * s * s * k @ sigma @ k + math.log(kv.token_mass[n_sink + t])
                )
            weights = np.exp(logits - logits.max())
            per_head[hq // group] += weights / weights.sum() / group
        for h in range(kv.n_kv_head):
            score = per_head[h] + epsilon
            if value_norm:
                values = kv.values[layer, h, n_sink:].astype(np.float64)
                score = score * np.sqrt((values**2).sum(axis=1))
            total += score / score.sum()
    return total


def reference_keydiff(kv: KVSnapshot, layers: list[int], *, unit_anchor: bool = True) -> np.ndarray:
    mass = kv.token_mass
    out = np.zeros(kv.n_tok)
    for layer in layers:
        for h in range(kv.n_kv_head):
            keys = kv.keys[layer, h].astype(np.float64)
            anchor = np.zeros(D)
            for t in range(kv.n_tok):
                k = keys[t] / np.linalg.norm(keys[t]) if unit_anchor else keys[t]
                anchor += mass[t] * k / mass.sum()
            for t in range(kv.n_tok):
                cos = keys[t] @ anchor / (np.linalg.norm(keys[t]) * np.linalg.norm(anchor))
                out[t] -= cos / (len(layers) * kv.n_kv_head)
    return out


# --- RoPE ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rope", [Rope("neox", 8, 100.0), Rope("norm", 8, 1e4, 0.5), Rope("neox", 4)]
)
def test_rotate_is_the_rope_matrix(rope: Rope) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, D))
    pos = np.array([0, 1, 7, 300, 2047])
    out = rotate(x, pos, rope)
    for i, p in enumerate(pos):
        np.testing.assert_allclose(out[:, i], x[:, i] @ rope_matrix(p, rope, D).T, rtol=1e-12)
    np.testing.assert_allclose(rotate(out, -pos, rope), x, atol=1e-12)  # R(-p) undoes R(p)
    phi, partner, sign = rope_tables(rope, D)
    assert np.all(phi[rope.n_rot :] == 0) and np.all(sign[rope.n_rot :] == 0)
    assert np.all(partner[partner] == np.arange(D))


def test_future_statistics_average_the_rotated_moments() -> None:
    rope = Rope("norm", 6, 50.0)
    rng = np.random.default_rng(2)
    mu = rng.standard_normal((2, D))
    a = rng.standard_normal((2, D, D))
    sigma = a @ a.transpose(0, 2, 1)
    mu_f, sigma_f = future_statistics(mu, sigma, rope, 40, 9)
    mats = [rope_matrix(p, rope, D) for p in range(40, 49)]
    np.testing.assert_allclose(mu_f, np.mean([mu @ r.T for r in mats], axis=0), rtol=1e-10)
    expect = np.mean([r @ sigma @ r.T for r in mats], axis=0)
    np.testing.assert_allclose(sigma_f, expect, rtol=1e-10, atol=1e-12)
    assert future_statistics(mu, None, rope, 40, 9)[1] is None


def test_rope_validation() -> None:
    for kwargs, match in [
        (dict(style="gptj", n_rot=8), "style"),
        (dict(style="neox", n_rot=7), "even"),
        (dict(style="neox", n_rot=8, freq_base=0.0), "freq_base"),
        (dict(style="neox", n_rot=8, freq_scale=float("inf")), "freq_scale"),
        (dict(style="neox", n_rot=8, freq_base="1e4"), "number"),
    ]:
        with pytest.raises(ValueError, match=match):
            Rope(**kwargs)
    kv = small_snapshot(None)
    with pytest.raises(ValueError, match="rotates 16 dimensions"):
        KVSnapshot(kv.keys, kv.values, kv.positions, rope=Rope("neox", 16))
    with pytest.raises(ValueError, match="must be a Rope"):
        KVSnapshot(kv.keys, kv.values, kv.positions, rope=("neox", 8))  # type: ignore[arg-type]


# --- ExpectedAttention --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rope", "settings", "mass"),
    [
        (Rope("neox", D, 100.0), {}, False),
        (Rope("norm", 6, 1e4, 0.25), {"n_window": 4, "n_future": 7}, True),
        (None, {"epsilon": 0.01}, False),
        (Rope("neox", D, 100.0), {"covariance": False, "value_norm": False}, False),
    ],
)
def test_expected_attention_matches_the_loop_reference(
    rope: Rope | None, settings: dict[str, object], mass: bool
) -> None:
    kv = small_snapshot(rope, mass=mass)
    method = ExpectedAttention(n_sink=3, n_recent=5, **{"n_future": 16, **settings})
    expect = reference_expected_attention(
        kv,
        n_window=int(settings.get("n_window", 6)),
        n_future=int(settings.get("n_future", 16)),
        n_sink=3,
        covariance=bool(settings.get("covariance", True)),
        value_norm=bool(settings.get("value_norm", True)),
        epsilon=float(settings.get("epsilon", 0.0)),
    )
    np.testing.assert_allclose(method.scores(kv), expect, rtol=RTOL)
    out = method.compress(kv, 20)
    assert out.n_cells == 20
    kept = out.member_index.tolist()
    assert kept[:3] == [0, 1, 2] and kept[-5:] == list(range(N_TOK - 5, N_TOK))
    top = np.sort(3 + np.lexsort((np.arange(expect.size - 5), -expect[:-5]))[:12])
    assert kept[3:-5] == top.tolist()
    assert out.info["rope"] == ("none" if rope is None else rope.style)


def test_expected_attention_is_shift_invariant_and_deterministic() -> None:
    """RoPE is relative: moving every key, query and position by the same offset (and so
    the future positions too) leaves the scores unchanged."""
    kv = small_snapshot()
    shift = 1000
    moved = KVSnapshot(
        rotate(kv.keys, np.full(N_TOK, shift), kv.rope).astype(np.float32),
        kv.values,
        kv.positions + shift,
        queries=rotate(kv.queries, np.full(6, shift), kv.rope).astype(np.float32),
        query_positions=kv.query_positions + shift,
        attn_scale=kv.attn_scale,
        rope=kv.rope,
    )
    method = ExpectedAttention(n_future=32)
    np.testing.assert_allclose(method.scores(moved), method.scores(kv), rtol=1e-4)
    a, b = method.compress(kv, 40), method.compress(kv, 40)
    np.testing.assert_array_equal(a.member_index, b.member_index)
    np.testing.assert_array_equal(a.keys, b.keys)


def test_expected_attention_keeps_what_the_queries_point_at() -> None:
    kv = small_snapshot(None, n_obs=4)
    keys = kv.keys.copy()
    u = np.random.default_rng(3).standard_normal(D).astype(np.float32)
    keys[:, :, 20] = 6.0 * u
    queries = np.broadcast_to(u, kv.queries.shape).copy()
    planted = KVSnapshot(keys, kv.values, kv.positions, queries=queries, attn_scale=0.3)
    assert 20 in ExpectedAttention(n_recent=4).compress(planted, 9).member_index.tolist()


def test_expected_attention_errors() -> None:
    kv = small_snapshot()
    for bad, match in [
        (dict(n_future=0), "n_future"),
        (dict(n_window=0), "n_window"),
        (dict(n_sink=-1), "n_sink"),
        (dict(n_recent=1.5), "n_recent"),
        (dict(epsilon=-0.1), "epsilon"),
        (dict(epsilon=float("nan")), "epsilon"),
        (dict(covariance="yes"), "covariance"),
    ]:
        with pytest.raises(ValueError, match=match):
            ExpectedAttention(**bad)
    with pytest.raises(ValueError, match=r"n_sink=4 \+ n_recent=32"):
        ExpectedAttention().compress(kv, 30)
    bare = KVSnapshot(kv.keys, kv.values, kv.positions)
    with pytest.raises(ValueError, match="needs KVSnapshot.queries"):
        ExpectedAttention(n_recent=4).compress(bare, 20)
    no_pos = KVSnapshot(kv.keys, kv.values, kv.positions, queries=kv.queries, rope=kv.rope)
    with pytest.raises(ValueError, match="query_positions"):
        ExpectedAttention(n_recent=4).compress(no_pos, 20)
    with pytest.raises(ValueError, match="no setting"):
        get_method("expected_attention", window=8)
    # more queries asked for than captured: all of them are used
    assert ExpectedAttention(n_window=100, n_recent=4).compress(kv, 20).info["n_window"] == 6


# --- KeyDiff ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "mass"),
    [({}, False), ({"layers": (1,)}, True), ({"unit_anchor": False}, True)],
)
def test_keydiff_matches_the_loop_reference(settings: dict[str, object], mass: bool) -> None:
    kv = small_snapshot(mass=mass)
    method = KeyDiff(n_sink=2, n_recent=6, **settings)
    layers = list(settings.get("layers", (0, 1)))
    expect = reference_keydiff(kv, layers, unit_anchor=bool(settings.get("unit_anchor", True)))
    np.testing.assert_allclose(method.scores(kv), expect, rtol=RTOL)
    out = method.compress(kv, 18)
    kept = out.member_index.tolist()
    assert out.n_cells == 18
    assert kept[:2] == [0, 1] and kept[-6:] == list(range(N_TOK - 6, N_TOK))
    middle = np.arange(2, N_TOK - 6)
    top = np.sort(middle[np.lexsort((middle, -expect[middle]))[:10]])
    assert kept[2:-6] == top.tolist()


def test_keydiff_keeps_the_odd_keys_out() -> None:
    rng = np.random.default_rng(4)
    common = rng.standard_normal(D)
    keys = common + 0.05 * rng.standard_normal((1, 1, N_TOK, D))
    odd = [10, 25, 30]
    keys[:, :, odd] = -common + 0.05 * rng.standard_normal((1, 1, 3, D))
    keys[:, :, 15] = 0.0  # no direction: cosine 0, between the common and the odd keys
    kv = KVSnapshot(
        keys.astype(np.float32),
        rng.standard_normal((1, 1, N_TOK, D)).astype(np.float32),
        np.arange(N_TOK),
    )
    out = KeyDiff(n_sink=1, n_recent=1).compress(kv, 6)
    assert out.member_index.tolist() == [0, 10, 15, 25, 30, N_TOK - 1]
    again = KeyDiff(n_sink=1, n_recent=1).compress(kv, 6)
    np.testing.assert_array_equal(again.member_index, out.member_index)


def test_keydiff_errors() -> None:
    kv = small_snapshot()
    for bad, match in [
        (dict(n_sink=-1), "n_sink"),
        (dict(n_recent=True), "n_recent"),
        (dict(layers=()), "at least one"),
        (dict(layers=(1, 1)), "twice"),
        (dict(unit_anchor=1), "unit_anchor"),
    ]:
        with pytest.raises(ValueError, match=match):
            KeyDiff(**bad)
    with pytest.raises(ValueError, match="indices into the 2 given layers"):
        KeyDiff(layers=(2,), n_recent=4).compress(kv, 20)
    with pytest.raises(ValueError, match=r"n_sink=4 \+ n_recent=32"):
        KeyDiff().compress(kv, 35)
    assert KeyDiff().compress(kv, 36).n_cells == 36  # exactly the protected cells
