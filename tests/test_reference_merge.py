"""Reference kernels: Gaussian weights, the merge rule, the log-mass bias and error estimates.

Tolerances: the kernels compute in float64 and return float32, so results are
compared with float64 numpy restatements at rtol 1e-5 / atol 1e-6 (float32
rounding of values of order 1-10); errors built from float32 attention outputs
at rtol 1e-4.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemerge.reference.attention import attention, causal_bias
from edgemerge.reference.bias import group_mass, log_mass_bias, proportional_bias
from edgemerge.reference.error import (
    compressed_attention_error,
    key_reconstruction_error,
    set_attention_error,
)
from edgemerge.reference.gaussian import (
    gaussian_weights,
    group_gaussian_weights,
    group_uniform_weights,
    relative_sigma,
)
from edgemerge.reference.merge import (
    MERGE_MAGNITUDE,
    MERGE_SLERP,
    merge_flags,
    merge_groups,
    merge_kv,
    merge_rows,
    merge_rows_grouped,
    merge_states,
)

RNG = np.random.default_rng(99)


def numpy_merge(x: np.ndarray, w: np.ndarray, magnitude: bool, slerp: bool) -> np.ndarray:
    """The merge rule restated with numpy in float64."""
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    if not magnitude:
        return (w[:, None] * x).sum(0)
    n = np.linalg.norm(x, axis=1)
    mag = float((w * n).sum())
    live = n > 0
    if slerp and x.shape[0] == 2 and live.all():
        u0, u1 = x[0] / n[0], x[1] / n[1]
        t = w[1] / w.sum() if w.sum() > 0 else 0.5
        om = math.acos(float(np.clip(u0 @ u1, -1, 1)))
        if math.sin(om) < 1e-6:
            e = (1 - t) * u0 + t * u1
        else:
            e = (math.sin((1 - t) * om) * u0 + math.sin(t * om) * u1) / math.sin(om)
    else:
        e = (w[live, None] * x[live] / n[live, None]).sum(0)
    ne = np.linalg.norm(e)
    return e / ne * mag if ne > 0 else np.zeros_like(e)


# --- merge rule ---------------------------------------------------------------------------


@pytest.mark.parametrize("magnitude", [False, True])
@pytest.mark.parametrize("slerp", [False, True])
@pytest.mark.parametrize("m", [1, 2, 3, 7])
def test_merge_states_matches_numpy(magnitude, slerp, m) -> None:
    for _ in range(5):
        x = (RNG.standard_normal((m, 16)) * RNG.uniform(0.1, 10)).astype(np.float32)
        w = RNG.dirichlet(np.ones(m)).astype(np.float32)
        got = merge_states(x, w, magnitude=magnitude, slerp_pairs=slerp)
        np.testing.assert_allclose(got, numpy_merge(x, w, magnitude, slerp), rtol=1e-5, atol=1e-5)


def test_slerp_result_lies_on_the_great_circle_at_t() -> None:
    for _ in range(20):
        x = RNG.standard_normal((2, 8)).astype(np.float32)
        w = RNG.dirichlet([1, 1]).astype(np.float32)
        out = merge_states(x, w).astype(np.float64)
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        om = math.acos(float(u[0] @ u[1]))
        ang0 = math.acos(float(np.clip(out @ u[0] / np.linalg.norm(out), -1, 1)))
        ang1 = math.acos(float(np.clip(out @ u[1] / np.linalg.norm(out), -1, 1)))
        t = float(w[1]) / float(w.sum())
        assert ang0 == pytest.approx(t * om, abs=1e-5)
        assert ang1 == pytest.approx((1 - t) * om, abs=1e-5)
        mag = float(w @ np.linalg.norm(x.astype(np.float64), axis=1))
        assert np.linalg.norm(out) == pytest.approx(mag, rel=1e-6)


def test_identical_states_merge_to_themselves() -> None:
    row = RNG.standard_normal(32).astype(np.float32)
    x = np.tile(row, (5, 1))
    w = RNG.dirichlet(np.ones(5)).astype(np.float32)
    for magnitude in (False, True):
        np.testing.assert_allclose(merge_states(x, w, magnitude=magnitude), row, rtol=1e-6)
    np.testing.assert_allclose(merge_states(x[:2], w[:2] / w[:2].sum()), row, rtol=1e-6)


@settings(max_examples=60, deadline=None, database=None)
@given(st.integers(2, 9), st.floats(0.01, 100.0), st.integers(0, 2**31 - 1))
def test_magnitude_is_kept_when_all_norms_are_equal(m, radius, seed) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, 24))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True) * radius).astype(np.float32)
    w = rng.dirichlet(np.ones(m)).astype(np.float32)
    out = merge_states(x, w)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    assert np.linalg.norm(out.astype(np.float64)) == pytest.approx(float(w @ norms), rel=2e-6)
    # a plain weighted mean of directions that differ is shorter
    assert np.linalg.norm(merge_states(x, w, magnitude=False)) < radius


def test_merge_edge_cases_stay_finite() -> None:
    v = RNG.standard_normal(8).astype(np.float32)
    zero = np.zeros(8, np.float32)
    w = np.array([0.5, 0.5], np.float32)
    np.testing.assert_allclose(merge_states(np.stack([v, zero]), w), v / 2, rtol=1e-6)
    np.testing.assert_array_equal(merge_states(np.stack([zero, zero]), w), zero)
    anti = merge_states(np.stack([v, -v]), w)  # opposite directions cancel
    assert np.all(np.isfinite(anti)) and np.linalg.norm(anti) < 1e-5
    np.testing.assert_allclose(merge_states(np.stack([v, v * 1.0000001]), w), v, rtol=1e-5)
    big = RNG.standard_normal((6, 64)).astype(np.float32) * 1e3
    big[2] = 0.0
    for magnitude in (False, True):
        out = merge_states(big, RNG.dirichlet(np.ones(6)).astype(np.float32), magnitude=magnitude)
        assert np.all(np.isfinite(out))


def test_merge_rows_forms_agree() -> None:
    n_layer, n_head, n_tok, d = 2, 3, 20, 8
    x = RNG.standard_normal((n_layer, n_head, n_tok, d)).astype(np.float32)
    offsets = np.array([0, 1, 3, 7, 8, 20], np.int32)
    member_index = np.arange(20, dtype=np.int32)
    w = RNG.random((n_layer, n_head, 20)).astype(np.float32)
    for magnitude, slerp in [(False, False), (True, False), (True, True)]:
        grouped = merge_groups(x, member_index, offsets, w, magnitude=magnitude, slerp_pairs=slerp)
        for layer in range(n_layer):
            # the native layout: rows [n_tok, n_head * d], weights [n_src, n_head]
            rows = x[layer].transpose(1, 0, 2).reshape(n_tok, n_head * d)
            native = merge_rows_grouped(
                rows,
                member_index,
                np.ascontiguousarray(w[layer].T),
                offsets,
                n_head,
                magnitude=magnitude,
                slerp_pairs=slerp,
            )
            for g in range(5):
                members = member_index[offsets[g] : offsets[g + 1]]
                one = merge_rows(
                    x[layer][:, members].transpose(1, 0, 2),
                    w[layer][:, members],
                    magnitude=magnitude,
                    slerp_pairs=slerp,
                )
                np.testing.assert_allclose(native[g].reshape(n_head, d), one, rtol=1e-6)
                for h in range(n_head):
                    expect = numpy_merge(
                        x[layer, h, members], w[layer, h, members], magnitude, slerp
                    )
                    np.testing.assert_allclose(grouped[layer, h, g], expect, rtol=1e-5, atol=1e-5)
                    np.testing.assert_allclose(one[h], expect, rtol=1e-5, atol=1e-5)


def test_merge_rows_grouped_allows_shared_rows_and_flags() -> None:
    rows = RNG.standard_normal((4, 8)).astype(np.float32)
    out = merge_rows_grouped(
        rows,
        np.array([0, 1, 1, 2]),
        np.full((4, 2), 0.5, np.float32),
        np.array([0, 2, 4]),
        2,
        magnitude=False,
    )
    np.testing.assert_allclose(out[0], (rows[0] + rows[1]) / 2, rtol=1e-6)
    np.testing.assert_allclose(out[1], (rows[1] + rows[2]) / 2, rtol=1e-6)
    assert merge_flags(True, True) == MERGE_MAGNITUDE | MERGE_SLERP == 3
    assert merge_flags(False, False) == 0


def test_merge_kv_value_modes() -> None:
    keys = RNG.standard_normal((1, 1, 4, 8)).astype(np.float32)
    values = RNG.standard_normal((1, 1, 4, 8)).astype(np.float32)
    w = np.full((1, 1, 4), 0.25, np.float32)
    idx, offs = np.arange(4, dtype=np.int32), np.array([0, 4], np.int32)
    mk, mv = merge_kv(keys, values, idx, offs, w)
    np.testing.assert_allclose(mv[0, 0, 0], values[0, 0].mean(0), rtol=1e-5, atol=1e-6)
    _, mv2 = merge_kv(keys, values, idx, offs, w, value_mode="magnitude")
    np.testing.assert_allclose(
        mv2[0, 0, 0], numpy_merge(values[0, 0], w[0, 0], True, True), rtol=1e-5
    )
    with pytest.raises(ValueError, match="value_mode"):
        merge_kv(keys, values, idx, offs, w, value_mode="max")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: merge_states(np.array([[np.nan, 1.0]]), np.ones(1)), "non-finite"),
        (lambda: merge_states(np.ones((2, 3)), np.array([1.0, np.inf])), "non-finite"),
        (lambda: merge_states(np.ones((2, 3)), np.ones(3)), "one weight per member"),
        (lambda: merge_rows(np.ones((2, 2, 4)), np.ones((2, 3))), "n_head, n_src"),
        (
            lambda: merge_rows_grouped(np.ones((3, 8)), [0, 5], np.ones((2, 2)), [0, 2], 2),
            r"\[0, 3\)",
        ),
        (
            lambda: merge_rows_grouped(np.ones((3, 8)), [0, 1], np.ones((2, 2)), [0, 0, 2], 2),
            "empty",
        ),
        (
            lambda: merge_rows_grouped(np.ones((3, 8)), [0, 1], np.ones((2, 3)), [0, 2], 3),
            "multiple",
        ),
        (lambda: merge_groups(np.ones((1, 1, 3, 2)), [0, 0], [0, 2], np.ones((1, 1, 2))), "twice"),
    ],
)
def test_merge_rejects_bad_input(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# --- Gaussian weights ---------------------------------------------------------------------


def test_gaussian_weights_match_the_formula() -> None:
    keys = RNG.standard_normal((6, 8)).astype(np.float32)
    mass = RNG.uniform(0.5, 3, 6).astype(np.float32)
    d2 = ((keys.astype(np.float64) - keys[2]) ** 2).sum(1)
    g = np.exp(-d2 / (2 * 5.0**2))
    np.testing.assert_allclose(gaussian_weights(keys, 2, sigma=5.0), g / g.sum(), rtol=1e-6)
    np.testing.assert_allclose(
        gaussian_weights(keys, 2, sigma=5.0, mass=mass), mass * g / (mass * g).sum(), rtol=1e-6
    )
    sigma = relative_sigma(keys, 2, 0.7)
    assert sigma == pytest.approx(0.7 * math.sqrt(d2.sum() / 5))
    g = np.exp(-d2 / (2 * sigma**2))
    np.testing.assert_allclose(gaussian_weights(keys, 2, sigma_rel=0.7), g / g.sum(), rtol=1e-6)


def test_relative_sigma_known_answer_and_scale_invariance() -> None:
    keys = np.array([[0.0, 0.0], [3.0, 4.0]], np.float32)  # distance 5 = the RMS distance
    w = gaussian_weights(keys, 0, sigma_rel=1.0)
    np.testing.assert_allclose(w, np.array([1, math.exp(-0.5)]) / (1 + math.exp(-0.5)), rtol=1e-6)
    many = RNG.standard_normal((7, 16)).astype(np.float32)
    np.testing.assert_allclose(
        gaussian_weights(many, 3, sigma_rel=1.0),
        gaussian_weights(many * 40, 3, sigma_rel=1.0),
        rtol=1e-5,
    )
    tiny = gaussian_weights(many * 40, 3, sigma=5.0)  # absolute sigma: collapses on the pivot
    assert tiny[3] > 0.999


@settings(max_examples=60, deadline=None, database=None)
@given(st.integers(1, 8), st.integers(0, 2**31 - 1), st.floats(0.05, 50.0), st.booleans())
def test_gaussian_weights_sum_to_one_and_favour_the_pivot(m, seed, sigma, relative) -> None:
    rng = np.random.default_rng(seed)
    keys = (rng.standard_normal((m, 12)) * rng.uniform(0.01, 100)).astype(np.float32)
    pivot = int(rng.integers(m))
    kw = {"sigma_rel": sigma} if relative else {"sigma": sigma}
    w = gaussian_weights(keys, pivot, **kw)
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    assert w.sum() == pytest.approx(1.0, abs=1e-6)
    assert w[pivot] == w.max()
    assert np.allclose(gaussian_weights(np.tile(keys[:1], (m, 1)), 0, **kw), 1.0 / m)


def test_group_weights_match_single_sets() -> None:
    keys = RNG.standard_normal((2, 3, 15, 8)).astype(np.float32)
    mass = RNG.uniform(1, 4, 15).astype(np.float32)
    idx = np.arange(15, dtype=np.int32)
    offs = np.array([0, 1, 5, 6, 15], np.int32)
    pivots = np.array([0, 3, 5, 9], np.int32)
    got = group_gaussian_weights(keys, idx, offs, pivots, sigma_rel=1.2, mass=mass)
    for layer in range(2):
        for h in range(3):
            for g in range(4):
                sl = slice(offs[g], offs[g + 1])
                expect = gaussian_weights(
                    keys[layer, h, sl], int(pivots[g] - offs[g]), sigma_rel=1.2, mass=mass[sl]
                )
                np.testing.assert_allclose(got[layer, h, sl], expect, rtol=1e-6)
    uni = group_uniform_weights(2, 3, idx, offs, mass=mass)
    np.testing.assert_allclose(uni[1, 2, 1:5], mass[1:5] / mass[1:5].sum(), rtol=1e-6)
    with pytest.raises(ValueError, match="not one of its members"):
        group_gaussian_weights(keys, idx, offs, np.array([0, 0, 5, 9]), sigma=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        group_gaussian_weights(keys, idx, offs, pivots)
    with pytest.raises(ValueError, match="positive"):
        gaussian_weights(keys[0, 0], 0, sigma=0.0)
    with pytest.raises(ValueError, match="positive"):
        gaussian_weights(keys[0, 0], 0, sigma=1.0, mass=-mass)


# --- bias ---------------------------------------------------------------------------------


def test_log_mass_bias() -> None:
    idx = np.arange(6, dtype=np.int32)
    offs = np.array([0, 1, 4, 6], np.int32)
    np.testing.assert_array_equal(group_mass(idx, offs), [1, 3, 2])
    np.testing.assert_allclose(proportional_bias(idx, offs), np.log([1, 3, 2]), rtol=1e-7)
    tm = np.array([1, 2, 3, 4, 5, 6], np.float32)
    np.testing.assert_allclose(proportional_bias(idx, offs, tm), np.log([1, 9, 11]), rtol=1e-7)
    with pytest.raises(ValueError, match="positive"):
        log_mass_bias(np.array([1.0, 0.0]))


def test_identical_keys_with_log_mass_bias_leave_attention_unchanged() -> None:
    n_tok, d = 12, 16
    keys = RNG.standard_normal((1, 2, n_tok, d)).astype(np.float32)
    values = RNG.standard_normal((1, 2, n_tok, d)).astype(np.float32)
    keys[:, :, 3:8] = keys[:, :, 3:4]  # a run of five identical keys
    idx = np.arange(n_tok, dtype=np.int32)
    offs = np.array([0, 1, 2, 3, 8, 9, 10, 11, 12], np.int32)
    w = group_uniform_weights(1, 2, idx, offs)
    mk, mv = merge_kv(keys, values, idx, offs, w)
    np.testing.assert_allclose(mk[:, :, 3], keys[:, :, 3], rtol=1e-6)  # merged to itself
    bias = proportional_bias(idx, offs)
    assert bias[3] == pytest.approx(math.log(5))
    queries = RNG.standard_normal((1, 4, 6, d)).astype(np.float32)
    with_bias = compressed_attention_error(queries, keys, values, mk, mv, bias)
    without = compressed_attention_error(queries, keys, values, mk, mv, np.zeros_like(bias))
    assert with_bias[0] < 1e-5 < without[0]
    assert key_reconstruction_error(keys, mk, idx, offs)[3] < 1e-6


# --- error estimates ----------------------------------------------------------------------


def brute_set_error(q, k, v, idx, offs, mk, mv, mb, tb, scale, pos=None, mpos=None, qpos=None):
    """Replace one set at a time and rerun full attention."""
    n_group = offs.size - 1
    num = np.zeros(n_group)
    den = 0.0
    for layer in range(q.shape[0]):
        mask = None if qpos is None else causal_bias(qpos, pos)
        b = tb if mask is None else mask + tb
        base = attention(q[layer], k[layer], v[layer], b, scale).astype(np.float64)
        den += (base**2).sum()
        for g in range(n_group):
            members = idx[offs[g] : offs[g + 1]]
            keep = np.setdiff1d(np.arange(k.shape[2]), members)
            k2 = np.concatenate([k[layer][:, keep], mk[layer][:, g : g + 1]], axis=1)
            v2 = np.concatenate([v[layer][:, keep], mv[layer][:, g : g + 1]], axis=1)
            b2 = np.append(tb[keep], mb[g])
            if qpos is not None:
                b2 = causal_bias(qpos, np.append(pos[keep], mpos[g])) + b2
            out = attention(q[layer], k2, v2, b2, scale).astype(np.float64)
            num[g] += ((out - base) ** 2).sum()
    return np.sqrt(num / den)


@pytest.mark.parametrize("causal", [False, True])
def test_set_attention_error_matches_brute_force(causal) -> None:
    n_layer, n_head, n_tok, d = 2, 2, 14, 8
    rng = np.random.default_rng(7)
    k = rng.standard_normal((n_layer, n_head, n_tok, d)).astype(np.float32)
    v = rng.standard_normal((n_layer, n_head, n_tok, d)).astype(np.float32)
    q = rng.standard_normal((n_layer, 4, 3, d)).astype(np.float32)
    idx = np.array([0, 1, 2, 5, 6, 9, 10, 11, 12], np.int32)  # sets need not tile the tokens
    offs = np.array([0, 3, 5, 9], np.int32)
    w = group_uniform_weights(n_layer, n_head, idx, offs)
    mk, mv = merge_kv(k, v, idx, offs, w)
    mb = proportional_bias(idx, offs)
    tb = rng.uniform(0, 1, n_tok).astype(np.float32)
    kw = {}
    pos = np.arange(n_tok, dtype=np.int32) * 2
    mpos = pos[[1, 5, 12]]
    qpos = np.array([9, 20, 30], np.int32)
    if causal:
        kw = dict(positions=pos, merged_positions=mpos, query_positions=qpos)
    got = set_attention_error(q, k, v, idx, offs, mk, mv, mb, token_bias=tb, scale=0.4, **kw)
    expect = brute_set_error(
        q, k, v, idx, offs, mk, mv, mb, tb, 0.4, *((pos, mpos, qpos) if causal else ())
    )
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-6)
    assert np.all(got > 0)


def test_key_reconstruction_error_matches_numpy() -> None:
    k = RNG.standard_normal((2, 2, 9, 4)).astype(np.float32)
    idx = np.arange(9, dtype=np.int32)
    offs = np.array([0, 4, 9], np.int32)
    mk = RNG.standard_normal((2, 2, 2, 4)).astype(np.float32)
    got = key_reconstruction_error(k, mk, idx, offs)
    for g, sl in enumerate([slice(0, 4), slice(4, 9)]):
        diff = k[:, :, sl].astype(np.float64) - mk[:, :, g : g + 1]
        expect = np.linalg.norm(diff) / np.linalg.norm(k[:, :, sl].astype(np.float64))
        assert got[g] == pytest.approx(expect, rel=1e-6)


def test_error_functions_reject_bad_input() -> None:
    k = np.ones((1, 1, 4, 2), np.float32)
    idx, offs = np.arange(4, dtype=np.int32), np.array([0, 4], np.int32)
    with pytest.raises(ValueError, match="merged_keys"):
        key_reconstruction_error(k, np.ones((1, 1, 2, 2)), idx, offs)
    with pytest.raises(ValueError, match="queries"):
        set_attention_error(
            np.ones((1, 1, 1, 3)), k, k, idx, offs, k[:, :, :1], k[:, :, :1], np.zeros(1)
        )
    with pytest.raises(ValueError, match="needs positions"):
        set_attention_error(
            np.ones((1, 1, 1, 2)),
            k,
            k,
            idx,
            offs,
            k[:, :, :1],
            k[:, :, :1],
            np.zeros(1),
            query_positions=[3],
        )
    with pytest.raises(ValueError, match="non-finite"):
        set_attention_error(
            np.full((1, 1, 1, 2), np.nan), k, k, idx, offs, k[:, :, :1], k[:, :, :1], np.zeros(1)
        )
