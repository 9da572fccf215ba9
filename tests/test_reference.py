"""Reference kernels: similarity, merging sets, hashing and attention.

Each kernel is checked against a plain numpy/Python restatement on random data.
Tolerances: similarities and attention are computed in float64 and returned as
float32, so they must match the float64 restatement to float32 rounding
(rtol/atol 1e-6); set ids, hashes and signatures must match exactly.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemerge.reference.attention import attention, attention_probabilities, causal_bias
from edgemerge.reference.hashing import (
    block_directions,
    hamming_distance,
    prefix_block_hashes,
    projection_signs,
    simhash_signatures,
    splitmix64,
)
from edgemerge.reference.merging_sets import (
    active_pairs,
    count_sets,
    merging_sets,
    merging_sets_for_budget,
    ranges_to_set_ids,
    set_ranges,
)
from edgemerge.reference.similarity import adjacent_similarity, aggregate_similarity, mean_keys

RNG = np.random.default_rng(1234)


def random_keys(n_layer=3, n_head=2, n_tok=40, d=16, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((n_layer, n_head, 1, d)) * 2.0
    return (shared + rng.standard_normal((n_layer, n_head, n_tok, d))).astype(np.float32)


# --- similarity --------------------------------------------------------------------------


def numpy_adjacent_similarity(keys: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    k = keys.astype(np.float64)
    mu = k.mean(axis=2, keepdims=True) if mean is None else mean[:, :, None, :].astype(np.float64)
    c = k - mu
    a, b = c[:, :, :-1], c[:, :, 1:]
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_adjacent_similarity_matches_numpy() -> None:
    keys = random_keys()
    np.testing.assert_allclose(
        adjacent_similarity(keys), numpy_adjacent_similarity(keys, None), rtol=1e-6, atol=1e-6
    )
    mean = RNG.standard_normal((3, 2, 16)).astype(np.float32)
    np.testing.assert_allclose(
        adjacent_similarity(keys, mean), numpy_adjacent_similarity(keys, mean), atol=1e-6
    )
    raw = adjacent_similarity(keys, centre=False)
    np.testing.assert_allclose(
        raw, numpy_adjacent_similarity(keys, np.zeros((3, 2, 16))), atol=1e-6
    )


def test_centring_removes_the_shared_component() -> None:
    keys = random_keys(n_tok=400, seed=3)
    raw = adjacent_similarity(keys, centre=False).mean()
    centred = adjacent_similarity(keys).mean()
    assert raw > 0.6  # dominated by the shared component
    assert abs(centred) < 0.1  # independent tokens: no similarity left


def test_mean_keys_and_zero_centred_pairs() -> None:
    keys = np.ones((1, 1, 3, 4), np.float32)
    np.testing.assert_array_equal(mean_keys(keys), np.ones((1, 1, 4)))
    # every centred key is 0: no direction, score 0 rather than NaN
    np.testing.assert_array_equal(adjacent_similarity(keys), np.zeros((1, 1, 2)))


def test_similarity_of_identical_and_orthogonal_keys() -> None:
    eye = np.eye(8, dtype=np.float32)[None, None]  # 8 orthogonal keys
    assert np.all(adjacent_similarity(eye, centre=False) == 0.0)
    same = np.tile(RNG.standard_normal(8).astype(np.float32), (1, 1, 5, 1))
    np.testing.assert_allclose(adjacent_similarity(same, centre=False), 1.0, atol=1e-6)


def test_aggregate_similarity_layers_reduce_offsets() -> None:
    sim = RNG.uniform(-1, 1, (4, 2, 9)).astype(np.float32)
    np.testing.assert_allclose(aggregate_similarity(sim), sim[2:].mean(axis=(0, 1)), atol=1e-6)
    np.testing.assert_allclose(
        aggregate_similarity(sim, [0, 3], reduce="min"), sim[[0, 3]].min(axis=(0, 1)), atol=1e-6
    )
    off = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    np.testing.assert_allclose(
        aggregate_similarity(sim, layer_offsets=off),
        (sim - off[:, None, None])[2:].mean(axis=(0, 1)),
        atol=1e-6,
    )
    single = aggregate_similarity(sim[:1])  # one layer: the latter half is that layer
    np.testing.assert_allclose(single, sim[0].mean(axis=0), atol=1e-6)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: adjacent_similarity(np.full((1, 1, 3, 2), np.nan, np.float32)), "non-finite"),
        (lambda: adjacent_similarity(np.zeros((1, 3, 2), np.float32)), "4 axes"),
        (lambda: adjacent_similarity(np.zeros((1, 1, 0, 2), np.float32)), "no tokens"),
        (lambda: adjacent_similarity(np.zeros((1, 1, 3, 2)), np.zeros((1, 2, 2))), "mean"),
        (lambda: aggregate_similarity(np.zeros((2, 1, 3)), [5]), "indices"),
        (lambda: aggregate_similarity(np.zeros((2, 1, 3)), reduce="max"), "reduce"),
        (lambda: aggregate_similarity(np.zeros((2, 1, 3)), layer_offsets=[0.1]), "per layer"),
    ],
)
def test_similarity_rejects_bad_input(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# --- merging sets ------------------------------------------------------------------------


def python_sets(score, threshold, protected, allowed, max_size) -> list[int]:
    """KVMerger's backward scan, restated in plain Python."""
    n = len(score) + 1
    ids_rev = [0] * n
    current, size = 0, 1
    for i in range(n - 2, -1, -1):
        ok = (
            score[i] >= threshold
            and allowed[i]
            and not protected[i]
            and not protected[i + 1]
            and (max_size == 0 or size < max_size)
        )
        if ok:
            size += 1
        else:
            current, size = current + 1, 1
        ids_rev[i] = current
    return [current - r for r in ids_rev]


set_case = st.integers(min_value=1, max_value=60).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=n - 1, max_size=n - 1),
        st.lists(st.booleans(), min_size=n, max_size=n),
        st.lists(st.booleans(), min_size=n - 1, max_size=n - 1),
        st.floats(-1, 1, allow_nan=False, width=32),
        st.integers(min_value=0, max_value=6),
    )
)


@settings(max_examples=200, deadline=None, database=None)
@given(set_case)
def test_merging_sets_properties(case) -> None:
    score_l, prot_l, allowed_l, threshold, max_size = case
    score = np.array(score_l, np.float32)
    protected = np.array(prot_l, bool)
    allowed = np.array(allowed_l, bool)
    ids = merging_sets(score, threshold, protected=protected, allowed=allowed, max_size=max_size)
    n = len(prot_l)
    assert ids.shape == (n,) and ids.dtype == np.int32
    assert ids.tolist() == python_sets(score_l, np.float32(threshold), prot_l, allowed_l, max_size)
    starts, ends = set_ranges(ids)
    # disjoint, consecutive, covering: the ranges tile [0, n) in order
    assert starts[0] == 0 and ends[-1] == n and np.all(starts[1:] == ends[:-1])
    np.testing.assert_array_equal(ranges_to_set_ids(starts, ends), ids)
    active = active_pairs(score, threshold, protected=protected, allowed=allowed)
    for s, e in zip(starts, ends, strict=True):
        assert max_size == 0 or e - s <= max_size
        assert np.all(active[s : e - 1])  # every pair inside a set may join
        if e - s > 1:
            assert not protected[s:e].any()  # protected cells are sets of their own
    if max_size == 0:
        assert not active[ends[:-1] - 1].any()  # maximal: neighbouring sets may not join
    assert (
        count_sets(score, threshold, protected=protected, allowed=allowed, max_size=max_size)
        == starts.size
    )


@settings(max_examples=150, deadline=None, database=None)
@given(set_case, st.integers(min_value=1, max_value=60))
def test_budget_sets_meet_the_budget_with_the_highest_threshold(case, budget) -> None:
    score_l, prot_l, allowed_l, _, max_size = case
    score = np.array(score_l, np.float32)
    protected = np.array(prot_l, bool)
    allowed = np.array(allowed_l, bool)
    kw = dict(protected=protected, allowed=allowed, max_size=max_size)
    res = merging_sets_for_budget(score, budget, **kw)
    assert res.n_cells == int(res.set_ids[-1]) + 1
    np.testing.assert_array_equal(res.set_ids, merging_sets(score, res.threshold, **kw))
    n = len(prot_l)
    lowest = count_sets(score, -math.inf, **kw)
    if n <= budget:
        assert res.met and res.threshold == math.inf and res.n_cells == n
    elif lowest > budget:
        assert not res.met and res.n_cells == lowest  # merging alone cannot meet it
    else:
        assert res.met and res.n_cells <= budget
        higher = np.unique(score)[np.unique(score) > res.threshold]
        if higher.size:  # the next stricter threshold would not fit the budget
            assert count_sets(score, float(higher.min()), **kw) > budget
    protected_cells = set(np.flatnonzero(protected).tolist())
    starts, ends = set_ranges(res.set_ids)
    for s, e in zip(starts, ends, strict=True):
        assert e - s == 1 or not protected_cells.intersection(range(s, e))


def test_budget_sets_floor_and_ceiling() -> None:
    score = np.array([0.9, 0.2, 0.8, 0.1, 0.95], np.float32)
    res = merging_sets_for_budget(score, 4)
    assert res.met and res.n_cells == 4 and res.threshold == pytest.approx(0.9)
    res = merging_sets_for_budget(score, 4, ceiling=0.5)  # merge everything >= 0.5 anyway
    assert res.n_cells == 3 and res.threshold == pytest.approx(0.5)
    res = merging_sets_for_budget(score, 1, floor=0.5)
    assert not res.met and res.n_cells == 3  # pairs below the floor never merge
    res = merging_sets_for_budget(score, 10)
    assert res.met and res.n_cells == 6 and res.threshold == math.inf


def test_merging_sets_known_answer() -> None:
    score = np.array([0.9, 0.9, 0.1, 0.9, 0.9, 0.9], np.float32)
    assert merging_sets(score, 0.5).tolist() == [0, 0, 0, 1, 1, 1, 1]
    # the backward scan fills sets from the recent end
    assert merging_sets(score, 0.5, max_size=3).tolist() == [0, 0, 0, 1, 2, 2, 2]
    protected = np.zeros(7, bool)
    protected[4] = True
    assert merging_sets(score, 0.5, protected=protected).tolist() == [0, 0, 0, 1, 2, 3, 3]


def test_orthogonal_keys_never_merge_above_zero() -> None:
    keys = np.eye(12, dtype=np.float32)[None, None]
    score = aggregate_similarity(adjacent_similarity(keys, centre=False), [0])
    assert merging_sets(score, 1e-6).tolist() == list(range(12))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: merging_sets(np.array([np.nan], np.float32), 0.5), "non-finite"),
        (lambda: merging_sets(np.zeros(3, np.float32), math.nan), "NaN"),
        (lambda: merging_sets(np.zeros(3), 0.5, protected=np.zeros(3, bool)), r"\(4,\)"),
        (lambda: merging_sets(np.zeros(3), 0.5, allowed=np.zeros(3, int)), "boolean"),
        (lambda: merging_sets(np.zeros(3), 0.5, max_size=-1), ">= 0"),
        (lambda: merging_sets_for_budget(np.zeros(3), 0), ">= 1"),
        (lambda: set_ranges(np.array([0, 2, 2])), "increase"),
    ],
)
def test_merging_sets_rejects_bad_input(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# --- hashing ------------------------------------------------------------------------------


def test_prefix_block_hashes_chain() -> None:
    tokens = list(range(100, 150))
    hashes = prefix_block_hashes(tokens, 16)
    assert len(hashes) == 3 and all(len(h) == 16 for h in hashes)  # the partial block has none
    parent = b""
    for i, h in enumerate(hashes):
        raw = np.array(tokens[i * 16 : (i + 1) * 16], "<i4").tobytes()
        expect = hashlib.blake2b(parent + raw, digest_size=16).digest()
        assert h == expect
        parent = expect
    assert [len(h) for h in prefix_block_hashes(tokens, 16, digest_size=32)] == [32] * 3
    # a change in block 0 changes every later hash; a change in block 2 only that one
    changed = tokens.copy()
    changed[40] += 1
    other = prefix_block_hashes(changed, 16)
    assert other[:2] == hashes[:2] and other[2] != hashes[2]
    changed[0] += 1
    assert all(a != b for a, b in zip(prefix_block_hashes(changed, 16), hashes, strict=True))
    assert prefix_block_hashes(tokens, 16, root=b"model-a") != hashes
    assert prefix_block_hashes([], 16) == []


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(tokens=[-1] * 16), r"\[0, 2\^31\)"),
        (dict(tokens=[1] * 16, digest_size=20), "16 or 32"),
        (dict(tokens=[1] * 16, block_size=0), ">= 1"),
        (dict(tokens=[1.5] * 16), "integer"),
    ],
)
def test_prefix_block_hashes_rejects_bad_input(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        prefix_block_hashes(**kw)


def python_splitmix64(seed: int, c: int) -> int:
    mask = (1 << 64) - 1
    z = (seed + (c + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_splitmix64_and_projection_match_python_integers() -> None:
    counters = np.array([0, 1, 2, 1000, 2**40 + 7], dtype=np.uint64)
    for seed in (0, 1, 2**63 + 5):
        got = splitmix64(seed, counters)
        assert [int(x) for x in got] == [python_splitmix64(seed, int(c)) for c in counters]
    signs = projection_signs(3, 5, seed=9)
    expect = [
        [-1.0 if python_splitmix64(9, j * 5 + i) >> 63 else 1.0 for i in range(5)] for j in range(3)
    ]
    np.testing.assert_array_equal(signs, expect)


def test_simhash_matches_a_plain_restatement() -> None:
    keys = random_keys(n_layer=4, n_head=2, n_tok=50, d=8, seed=5)
    sig = simhash_signatures(keys, 16, [[2, 3], [0]], seed=3)
    assert sig.shape == (3, 2) and sig.dtype == np.uint64
    k = keys.astype(np.float64)
    mu = k.mean(axis=2)
    for gi, group in enumerate([[2, 3], [0]]):
        for b in range(3):
            parts = []
            for layer in group:
                for h in range(2):
                    c = k[layer, h, b * 16 : (b + 1) * 16].mean(axis=0) - mu[layer, h]
                    parts.append(c / np.linalg.norm(c))
            v = np.concatenate(parts)
            bits = 0
            for j in range(64):
                proj = sum(
                    (-1.0 if python_splitmix64(3, j * v.size + i) >> 63 else 1.0) * v[i]
                    for i in range(v.size)
                )
                bits |= int(proj > 0) << j
            assert int(sig[b, gi]) == bits
    np.testing.assert_allclose(
        np.linalg.norm(block_directions(keys, 16, [2, 3]), axis=1), math.sqrt(4)
    )


def test_simhash_of_similar_blocks_is_close() -> None:
    rng = np.random.default_rng(11)
    base = rng.standard_normal((2, 2, 1, 32))
    # blocks 0 and 1 share a direction; block 2 points elsewhere
    dirs = rng.standard_normal((2, 2, 3, 32)) * 3.0
    dirs[:, :, 1] = dirs[:, :, 0]
    keys = base + np.repeat(dirs, 16, axis=2) + 0.3 * rng.standard_normal((2, 2, 48, 32))
    keys = np.concatenate([keys, -np.repeat(dirs, 16, axis=2)], axis=2).astype(np.float32)
    sig = simhash_signatures(keys, 16, [[0, 1]])
    near = hamming_distance(sig[0], sig[1])[0]
    far = hamming_distance(sig[0], sig[2])[0]
    assert near < 12 < far


def test_hamming_distance() -> None:
    a = RNG.integers(0, 2**63, 20, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = RNG.integers(0, 2**63, 20, dtype=np.uint64)
    got = hamming_distance(a, b)
    assert got.tolist() == [bin(int(x) ^ int(y)).count("1") for x, y in zip(a, b, strict=True)]
    assert int(hamming_distance(np.uint64(2**64 - 1), np.uint64(0))) == 64
    assert hamming_distance(a[:, None], b[None, :]).shape == (20, 20)


# --- attention ----------------------------------------------------------------------------


def test_attention_matches_a_plain_softmax_with_gqa() -> None:
    q = RNG.standard_normal((4, 3, 8)).astype(np.float32)
    k = RNG.standard_normal((2, 6, 8)).astype(np.float32)
    v = RNG.standard_normal((2, 6, 5)).astype(np.float32)
    bias = RNG.standard_normal(6).astype(np.float32)
    out = attention(q, k, v, bias)
    for h in range(4):
        kv = h // 2  # consecutive query heads share a KV head
        logits = q[h].astype(np.float64) @ k[kv].T / math.sqrt(8) + bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        np.testing.assert_allclose(out[h], p @ v[kv], rtol=1e-5, atol=1e-6)
    probs = attention_probabilities(q, k, bias, scale=0.5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)


def test_attention_causal_mask_and_errors() -> None:
    q = RNG.standard_normal((1, 2, 4)).astype(np.float32)
    k = RNG.standard_normal((1, 3, 4)).astype(np.float32)
    mask = causal_bias(np.array([0, 2]), np.array([0, 1, 2]))
    p = attention_probabilities(q, k, mask)
    np.testing.assert_allclose(p[0, 0], [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="masks every cell"):
        attention_probabilities(q, k, causal_bias(np.array([-1, 0]), np.array([0, 1, 2])))
    with pytest.raises(ValueError, match="multiple"):
        attention_probabilities(np.zeros((3, 1, 4)), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        attention(q, k, np.full((1, 3, 2), np.inf))
