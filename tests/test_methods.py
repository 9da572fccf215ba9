"""KV compression methods: the registry contract for every method, then each method's rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemerge.merging.policy import BudgetError
from edgemerge.methods import (
    H2O,
    METHODS,
    BlockMerge,
    CaM,
    CompressedKV,
    KVMerger,
    KVQuant,
    KVSnapshot,
    SnapKV,
    StreamingLLM,
    get_method,
)
from edgemerge.methods.kvmerger import paper_layers
from edgemerge.reference.error import compressed_attention_error
from edgemerge.reference.ggml_quants import dequantize_rows, quantize_rows
from edgemerge.settings import MergeSettings

N_TOK = 160

# settings that fit a 160-token snapshot (blockmerge's default recent window is 256)
SMALL = {"blockmerge": {"recent": 32}, "kvmerger": {"n_recent": 8}}


def make_snapshot(
    n_tok: int = N_TOK,
    n_layer: int = 4,
    n_head: int = 2,
    d: int = 32,
    seed: int = 0,
    importance: bool = True,
    queries: bool = True,
) -> KVSnapshot:
    """Keys that drift slowly within segments and jump between them, like real ones."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((n_layer, n_head, 1, d)) * 3.0
    jumps = rng.random(n_tok) < 0.08
    seg = np.cumsum(jumps)
    centres = rng.standard_normal((n_layer, n_head, seg[-1] + 1, d)) * 2.0
    keys = shared + centres[:, :, seg] + 0.3 * rng.standard_normal((n_layer, n_head, n_tok, d))
    values = rng.standard_normal((n_layer, n_head, n_tok, d))
    return KVSnapshot(
        keys=keys.astype(np.float32),
        values=values.astype(np.float32),
        positions=np.arange(n_tok, dtype=np.int32) + 3,
        importance=rng.gamma(1.0, 1.0, n_tok).astype(np.float32) if importance else None,
        queries=(
            rng.standard_normal((n_layer, 2 * n_head, 8, d)).astype(np.float32) if queries else None
        ),
    )


def check_compressed(kv: KVSnapshot, out: CompressedKV, budget: int) -> None:
    """Everything a CompressedKV promises about its relation to the snapshot."""
    assert isinstance(out, CompressedKV)
    assert out.n_cells <= budget
    assert out.n_source == kv.n_tok
    assert out.keys.shape == (kv.n_layer, kv.n_kv_head, out.n_cells, kv.keys.shape[3])
    assert out.values.shape == (kv.n_layer, kv.n_kv_head, out.n_cells, kv.values.shape[3])
    for arr in (out.keys, out.values, out.bias, out.mass):
        assert np.all(np.isfinite(arr))
    covered = out.member_index.tolist()
    assert len(covered) == len(set(covered))  # a token belongs to at most one cell
    assert sorted(covered + out.evicted.tolist()) == list(range(kv.n_tok))
    mass = kv.token_mass
    logs = []
    for c in range(out.n_cells):
        members = out.members(c)
        assert members.size >= 1
        assert np.all(np.diff(members) == 1)  # cells cover runs of consecutive tokens
        assert out.positions[c] in kv.positions[members]
        assert out.span[c].tolist() == [kv.spans[members[0], 0], kv.spans[members[-1], 1]]
        assert out.mass[c] == pytest.approx(mass[members].sum(), rel=1e-6)
        logs.append(math.log(mass[members].sum()))
    if out.n_cells:
        assert np.all(np.diff(out.positions) > 0)
    assert np.allclose(out.bias, logs, atol=1e-6) or np.all(out.bias == 0.0)


@pytest.fixture(scope="module")
def snapshot() -> KVSnapshot:
    return make_snapshot()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_respects_the_budget(name: str, snapshot: KVSnapshot) -> None:
    method = get_method(name, **SMALL.get(name, {}))
    low = method.min_budget(N_TOK)
    budgets = [low, (low + N_TOK) // 2, N_TOK - 1, N_TOK, N_TOK + 7]
    for budget in budgets:
        if budget < low:
            continue
        out = method.compress(snapshot, budget)
        check_compressed(snapshot, out, budget)
        if budget >= N_TOK and method.name != "quant":
            assert out.n_cells == N_TOK  # a snapshot that fits is returned unchanged
            np.testing.assert_array_equal(out.keys, snapshot.keys)
            np.testing.assert_array_equal(out.values, snapshot.values)
    if low > 1:
        with pytest.raises(ValueError, match="budget"):
            method.compress(snapshot, low - 1)
    for bad in (0, -3, 10.5, "100", True):
        with pytest.raises(ValueError, match="budget"):
            method.compress(snapshot, bad)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_kept_tokens_are_verbatim_and_evictions_recorded(name: str, snapshot: KVSnapshot) -> None:
    method = get_method(name, **SMALL.get(name, {}))
    budget = max(method.min_budget(N_TOK), N_TOK // 2)
    out = method.compress(snapshot, budget if method.reduces_cells else N_TOK)
    sizes = np.diff(out.member_offsets)
    single = np.flatnonzero(sizes == 1)
    tokens = out.member_index[out.member_offsets[single]]
    if name != "quant":  # quant rounds every key; every other method keeps single keys as they are
        np.testing.assert_array_equal(out.keys[:, :, single], snapshot.keys[:, :, tokens])
    if name not in ("quant", "cam"):  # cam mixes evicted values into kept ones
        np.testing.assert_array_equal(out.values[:, :, single], snapshot.values[:, :, tokens])
    n_members = int(out.member_offsets[-1])
    assert out.evicted.size == N_TOK - n_members
    if name in ("kvmerger",):
        assert out.evicted.size == 0  # merging methods lose no token unless they must evict


def test_registry_and_get_method_errors() -> None:
    assert set(METHODS) == {
        "full",
        "streaming_llm",
        "h2o",
        "snapkv",
        "expected_attention",
        "keydiff",
        "cam",
        "kvmerger",
        "blockmerge",
        "quant",
    }
    assert isinstance(get_method("blockmerge", recent=8), BlockMerge)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(ValueError, match="no setting"):
        get_method("h2o", window=3)
    with pytest.raises(Exception, match="frozen|cannot assign"):
        get_method("full").name = "x"  # type: ignore[misc]
    with pytest.raises(Exception, match="frozen|cannot assign"):
        BlockMerge().settings = MergeSettings()  # type: ignore[misc]


# --- data types ---------------------------------------------------------------------------


def test_snapshot_validation(snapshot: KVSnapshot) -> None:
    k, v, p = snapshot.keys, snapshot.values, snapshot.positions
    bad_keys = k.copy()
    bad_keys[0, 0, 3, 1] = np.nan
    cases = [
        (dict(keys=bad_keys, values=v, positions=p), "non-finite"),
        (dict(keys=k[0], values=v, positions=p), "4 axes"),
        (dict(keys=k, values=v[:, :, :5], positions=p), "values"),
        (dict(keys=k, values=v, positions=p[::-1]), "strictly increasing"),
        (dict(keys=k, values=v, positions=p[:5]), "positions"),
        (dict(keys=k, values=v, positions=p, importance=-np.ones(N_TOK)), "importance"),
        (dict(keys=k, values=v, positions=p, queries=np.ones((4, 3, 2, 32))), "queries"),
        (dict(keys=k, values=v, positions=p, query_positions=[1]), "without queries"),
        (dict(keys=k, values=v, positions=p, layers=(1, 1, 2, 3)), "distinct"),
        (dict(keys=k, values=v, positions=p, mass=np.zeros(N_TOK)), "mass"),
        (dict(keys=k, values=v, positions=p, spans=np.stack([p, p - 1], 1)), "spans"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            KVSnapshot(**kwargs)
    assert snapshot.layers == (0, 1, 2, 3)
    assert snapshot.scale == pytest.approx(1 / math.sqrt(32))
    assert not snapshot.keys.flags.writeable


def test_compressed_validation() -> None:
    base = dict(
        keys=np.zeros((1, 1, 2, 4), np.float32),
        values=np.zeros((1, 1, 2, 4), np.float32),
        positions=np.array([0, 5]),
        span=np.array([[0, 2], [3, 5]]),
        bias=np.zeros(2),
        mass=np.array([3.0, 3.0]),
        member_offsets=np.array([0, 3, 6]),
        member_index=np.arange(6),
        n_source=6,
    )
    assert CompressedKV(**base).n_cells == 2
    for change, match in [
        (dict(span=np.array([[0, 3], [3, 5]])), "disjoint"),
        (dict(positions=np.array([0, 6])), "inside"),
        (dict(member_index=np.array([0, 1, 2, 3, 4, 4])), "twice"),
        (dict(member_offsets=np.array([0, 6])), "member_offsets"),
        (dict(n_source=5), r"\[0, 5\)"),
        (dict(mass=np.array([3.0, 0.0])), "positive mass"),
    ]:
        with pytest.raises(ValueError, match=match):
            CompressedKV(**{**base, **change})


# --- eviction baselines -------------------------------------------------------------------


def test_streaming_llm_keeps_sinks_and_the_latest(snapshot: KVSnapshot) -> None:
    out = StreamingLLM(n_sink=4).compress(snapshot, 40)
    assert out.member_index.tolist() == list(range(4)) + list(range(N_TOK - 36, N_TOK))


def test_h2o_keeps_heavy_hitters_and_recent(snapshot: KVSnapshot) -> None:
    imp = np.zeros(N_TOK, np.float32)
    imp[[7, 30, 31, 90]] = [5, 4, 3, 2]
    kv = KVSnapshot(snapshot.keys, snapshot.values, snapshot.positions, importance=imp)
    out = H2O(n_recent=10).compress(kv, 14)
    assert out.member_index.tolist() == [7, 30, 31, 90] + list(range(N_TOK - 10, N_TOK))
    assert H2O().recent_cells(14) == 7
    with pytest.raises(ValueError, match="importance"):
        H2O().compress(make_snapshot(importance=False), 50)


def test_snapkv_keeps_what_the_window_attends_to(snapshot: KVSnapshot) -> None:
    keys = snapshot.keys.copy()
    u = np.random.default_rng(2).standard_normal(32).astype(np.float32)
    keys[:, :, 40] = 10.0 * u  # a key that the window's queries single out
    queries = np.broadcast_to(u, snapshot.queries.shape).copy()
    kv = KVSnapshot(keys, snapshot.values, snapshot.positions, queries=queries)
    kept = SnapKV(pool_kernel=1).compress(kv, 9).member_index.tolist()
    assert 40 in kept and kept[-8:] == list(range(N_TOK - 8, N_TOK))
    pooled = SnapKV(pool_kernel=5).compress(kv, 13).member_index.tolist()
    assert 40 in pooled and len(pooled) == 13
    with pytest.raises(ValueError, match="queries"):
        SnapKV().compress(make_snapshot(queries=False), 50)
    with pytest.raises(ValueError, match="odd"):
        SnapKV(pool_kernel=4)


def test_cam_merges_evicted_values_forward(snapshot: KVSnapshot) -> None:
    kv = KVSnapshot(
        snapshot.keys, snapshot.values, snapshot.positions, importance=np.ones(N_TOK, np.float32)
    )
    out = CaM(n_sink=4, merge_span=8).compress(kv, 40)
    np.testing.assert_array_equal(out.keys, kv.keys[:, :, out.member_index])
    # equal attention everywhere: every evicted value passes on in full, so nothing is lost
    np.testing.assert_allclose(
        out.values.astype(np.float64).sum(2),
        kv.values.astype(np.float64).sum(2),
        rtol=1e-4,
        atol=1e-4,
    )
    np.testing.assert_array_equal(out.values[:, :, :4], kv.values[:, :, :4])  # sinks untouched
    # cells more than merge_span after the last evicted token are untouched
    np.testing.assert_array_equal(out.values[:, :, -20:], kv.values[:, :, -20:])
    a = CaM(sample=True, seed=3).compress(snapshot, 40)
    b = CaM(sample=True, seed=3).compress(snapshot, 40)
    np.testing.assert_array_equal(a.values, b.values)
    with pytest.raises(ValueError, match="attention scores"):
        CaM().compress(make_snapshot(importance=False, queries=False), 40)


# --- merging methods ----------------------------------------------------------------------


def block_snapshot(n_blocks: int = 8, bs: int = 16, seed: int = 1) -> KVSnapshot:
    """Blocks whose keys (and values) are identical inside and unrelated between blocks."""
    rng = np.random.default_rng(seed)
    keys = np.repeat(rng.standard_normal((2, 2, n_blocks, 32)) * 2, bs, axis=2)
    values = np.repeat(rng.standard_normal((2, 2, n_blocks, 32)), bs, axis=2)
    n = n_blocks * bs
    return KVSnapshot(
        keys.astype(np.float32),
        values.astype(np.float32),
        np.arange(n, dtype=np.int32),
        importance=np.ones(n, np.float32),
        queries=rng.standard_normal((2, 4, 4, 32)).astype(np.float32),
    )


def test_kvmerger_merges_runs_of_identical_keys() -> None:
    kv = block_snapshot()
    out = KVMerger(n_recent=16, protect_fraction=0.0).compress(kv, 23)
    assert out.n_cells == 7 + 16  # seven blocks of one cell each, then the recent window
    assert out.info["threshold"] == 0.75  # everything above epsilon merges, no more
    sizes = np.diff(out.member_offsets)
    assert sizes[:7].tolist() == [16] * 7
    np.testing.assert_allclose(out.keys[:, :, :7], kv.keys[:, :, :112:16], rtol=1e-6)
    assert np.all(out.bias == 0)  # the paper merges without a bias
    # the pivot is the member of highest importance, the later one on ties (all equal here)
    np.testing.assert_array_equal(out.positions[:7], kv.positions[15:112:16])
    peaked = np.ones(128, np.float32)
    peaked[5:112:16] = 2.0
    kv_peaked = KVSnapshot(kv.keys, kv.values, kv.positions, importance=peaked)
    moved = KVMerger(n_recent=16, protect_fraction=0.0).compress(kv_peaked, 23)
    np.testing.assert_array_equal(moved.positions[:7], kv.positions[5:112:16])
    tighter = KVMerger(n_recent=16, protect_fraction=0.0).compress(kv, 20)
    assert tighter.n_cells <= 20 and tighter.info["threshold"] < 0.75
    biased = KVMerger(n_recent=16, protect_fraction=0.0, bias=True).compress(kv, 23)
    np.testing.assert_allclose(biased.bias[:7], math.log(16), rtol=1e-6)
    assert paper_layers(24) == list(range(2, 23)) and paper_layers(3) == [0, 1, 2]


def test_kvmerger_relaxes_its_threshold_to_meet_the_budget(snapshot: KVSnapshot) -> None:
    strict = KVMerger(n_recent=8, threshold=0.999)
    out = strict.compress(snapshot, 30)
    assert out.n_cells <= 30 and out.info["threshold"] < 0.999
    recent = out.member_index[-8:]
    assert recent.tolist() == list(range(N_TOK - 8, N_TOK))
    assert np.all(np.diff(out.member_offsets)[-8:] == 1)
    assert out.info["n_protected_top"] == min(8, (30 - 8 - 1) // 2)


def merged_sets(out: CompressedKV) -> list[np.ndarray]:
    return [out.members(c) for c in range(out.n_cells) if out.members(c).size > 1]


def test_blockmerge_protects_sinks_recent_and_retained(snapshot: KVSnapshot) -> None:
    method = get_method("blockmerge", recent=32, retain_top=0.05)
    assert method.settings == MergeSettings(recent=32, retain_top=0.05)
    out = method.compress(snapshot, 70)
    check_compressed(snapshot, out, 70)
    # positions are 3..162: sinks are positions < 16 (13 cells), recent >= 163 - 32
    n_cand = N_TOK - 13 - 32
    assert out.info["n_retained"] == math.floor(0.05 * n_cand)
    pos = snapshot.positions
    for members in merged_sets(out):
        assert members[0] >= 13 and members[-1] < N_TOK - 32
        assert len(set((pos[members] // 16).tolist())) == 1  # never across a block
    plan = method.plan(snapshot, 70)
    for t in np.flatnonzero(plan.retained):
        assert [t] in [out.members(c).tolist() for c in range(out.n_cells)]


def test_blockmerge_merges_identical_blocks_exactly() -> None:
    kv = block_snapshot()
    method = get_method("blockmerge", sinks=16, recent=16, retain_top=0.0)
    out = method.compress(kv, 6 + 16 + 16)  # sink block + 6 candidate blocks + recent
    assert out.n_cells == 38 and out.info["met_by_merging"]
    sizes = np.diff(out.member_offsets)
    assert sizes.tolist() == [1] * 16 + [16] * 6 + [1] * 16
    np.testing.assert_allclose(out.keys[:, :, 16:22], kv.keys[:, :, 16:112:16], rtol=1e-6)
    np.testing.assert_allclose(out.bias[16:22], math.log(16), rtol=1e-6)
    assert np.all(out.error < 1e-6)
    err = compressed_attention_error(kv.queries, kv.keys, kv.values, out.keys, out.values, out.bias)
    assert np.all(err < 1e-5)  # identical keys + log-mass bias: attention is unchanged
    no_bias = get_method("blockmerge", sinks=16, recent=16, retain_top=0.0, attention_bias=False)
    no_bias_out = no_bias.compress(kv, 38)
    assert np.all(no_bias_out.bias == 0)
    err2 = compressed_attention_error(
        kv.queries, kv.keys, kv.values, no_bias_out.keys, no_bias_out.values, no_bias_out.bias
    )
    assert np.all(err2 > 10 * err + 1e-3)


def test_blockmerge_error_tolerance_bars_pairs(snapshot: KVSnapshot) -> None:
    loose = get_method("blockmerge", recent=32, max_merge_error=2.0).compress(snapshot, 60)
    assert loose.info["met_by_merging"]
    tight = get_method("blockmerge", recent=32, max_merge_error=0.2)
    plan = tight.plan(snapshot, 60)
    assert plan.n_group and np.all(plan.errors <= 0.2)
    out = tight.compress(snapshot, 60)
    assert out.n_cells <= 60 and out.evicted.size > 0  # fewer pairs may join: evictions


def test_blockmerge_eviction_fallback_order(snapshot: KVSnapshot) -> None:
    kw = dict(recent=32, max_merge_error=1e-9)  # no pair of these keys can merge
    # 13 sink cells (positions 3..15) and 32 recent ones stay: 3 cells of the middle fit
    out = get_method("blockmerge", retain_top=0.0, **kw).compress(snapshot, 48)
    assert not out.info["met_by_merging"] and out.info["n_merged_sets"] == 0
    assert out.member_index[13:-32].tolist() == [125, 126, 127]  # the oldest go first
    method = get_method("blockmerge", retain_top=0.05, **kw)
    retained = np.flatnonzero(method.plan(snapshot, 48).retained)
    assert retained.size == 5
    out = method.compress(snapshot, 48)
    # non-retained cells go first, then the oldest retained ones
    assert out.member_index[13:-32].tolist() == retained[-3:].tolist()
    with pytest.raises(BudgetError, match="eviction"):
        get_method("blockmerge", eviction="none", **kw).compress(snapshot, 60)


def test_blockmerge_settings_switches(snapshot: KVSnapshot) -> None:
    base = dict(recent=32)
    ref = get_method("blockmerge", **base).compress(snapshot, 60)
    uniform = get_method("blockmerge", sigma=1e6, magnitude=False, **base).compress(snapshot, 60)
    for c in range(uniform.n_cells):
        members = uniform.members(c)
        if members.size > 1:
            np.testing.assert_allclose(
                uniform.values[:, :, c], snapshot.values[:, :, members].mean(2), atol=1e-5
            )
            np.testing.assert_allclose(
                uniform.keys[:, :, c], snapshot.keys[:, :, members].mean(2), atol=1e-5
            )
    assert (
        get_method("blockmerge", retain_top=0.0, **base).compress(snapshot, 60).info["n_retained"]
        == 0
    )
    raw = get_method("blockmerge", centre=False, **base).plan(snapshot, 60)
    centred = get_method("blockmerge", centre=True, **base).plan(snapshot, 60)
    assert not np.array_equal(raw.members, centred.members)
    with pytest.raises(ValueError, match="layer_thresholds"):
        BlockMerge(MergeSettings(threshold="calibrated", recent=32), (0.1, 0.2)).compress(
            snapshot, 60
        )
    with pytest.raises(ValueError, match="calibrate"):
        get_method("blockmerge", threshold="calibrated", **base).compress(snapshot, 60)
    # per-layer thresholds of 0.5 on the similarity layers (the latter half) = threshold 0.5
    calibrated = get_method(
        "blockmerge", threshold="calibrated", layer_thresholds=(0.0, 0.0, 0.5, 0.5), **base
    )
    shifted = calibrated.compress(snapshot, 60)
    assert shifted.info["threshold"] == pytest.approx(ref.info["threshold"] - 0.5, abs=1e-5)
    np.testing.assert_array_equal(shifted.member_offsets, ref.member_offsets)
    for bad in (dict(block_size=0), dict(retain_top=1.5), dict(sigma=0.0), dict(centre="yes")):
        with pytest.raises(ValueError):
            get_method("blockmerge", **bad)
    with pytest.raises(ValueError, match="no setting.*n_recent"):
        get_method("blockmerge", n_recent=8)


def test_blockmerge_ignores_importance_and_queries(snapshot: KVSnapshot) -> None:
    """The offline rule is the online one: it decides from the keys alone."""
    bare = make_snapshot(importance=False, queries=False)
    method = get_method("blockmerge", recent=32)
    out, ref = method.compress(bare, 64), method.compress(snapshot, 64)
    check_compressed(bare, out, 64)
    np.testing.assert_array_equal(out.member_offsets, ref.member_offsets)
    np.testing.assert_array_equal(out.keys, ref.keys)


def test_compressing_again_accumulates_mass(snapshot: KVSnapshot) -> None:
    method = get_method("blockmerge", recent=32)
    first = method.compress(snapshot, 100)
    again_kv = first.to_snapshot()
    second = method.compress(again_kv, 60)
    check_compressed(again_kv, second, 60)
    assert second.mass.sum() == pytest.approx(
        N_TOK - first.evicted.size - sum(first.mass[second.evicted])
    )
    np.testing.assert_allclose(second.bias, np.log(second.mass), rtol=1e-6)
    assert second.span[0, 0] == snapshot.positions[0]


def test_gemma_like_snapshot_with_few_layers() -> None:
    kv = make_snapshot(n_layer=3, n_head=1)
    kv = KVSnapshot(kv.keys, kv.values, kv.positions, importance=kv.importance, layers=(5, 11, 17))
    for name in ("blockmerge", "kvmerger"):
        out = get_method(name, **SMALL[name]).compress(kv, 80)
        check_compressed(kv, out, 80)


@settings(max_examples=25, deadline=None, database=None)
@given(
    st.integers(20, 120),
    st.integers(0, 2**31 - 1),
    st.sampled_from(
        [
            "blockmerge",
            "kvmerger",
            "cam",
            "h2o",
            "snapkv",
            "expected_attention",
            "keydiff",
            "streaming_llm",
        ]
    ),
    st.data(),
)
def test_random_snapshots_and_budgets(n_tok, seed, name, data) -> None:
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((2, 1, n_tok, 32))
    runs = rng.integers(0, n_tok, 4)
    keys[:, :, runs] = 0.0  # zero keys have no direction
    keys[:, :, runs[0] : runs[0] + 6] = keys[:, :, runs[0] : runs[0] + 1]  # a run of equal keys
    kv = KVSnapshot(
        keys.astype(np.float32),
        rng.standard_normal((2, 1, n_tok, 32)).astype(np.float32),
        np.cumsum(rng.integers(1, 4, n_tok)).astype(np.int32),
        importance=rng.random(n_tok).astype(np.float32),
        queries=rng.standard_normal((2, 2, 4, 32)).astype(np.float32),
        query_positions=np.full(4, 10**6, np.int32),
    )
    settings_ = {
        "blockmerge": {"recent": 8, "block_size": 4},
        "kvmerger": {"n_recent": 4},
        "expected_attention": {"n_recent": 4},
        "keydiff": {"n_recent": 4},
    }
    method = get_method(name, **settings_.get(name, {}))
    budget = data.draw(st.integers(method.min_budget(n_tok), n_tok + 2))
    out = method.compress(kv, budget)
    check_compressed(kv, out, budget)


# --- quantized reference point ------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "f16"])
def test_quant_round_trips_through_ggml_types(qtype: str, snapshot: KVSnapshot) -> None:
    out = KVQuant(key_type=qtype).compress(snapshot, N_TOK)
    expect = dequantize_rows(quantize_rows(snapshot.keys, qtype), qtype, 32)
    np.testing.assert_array_equal(out.keys, expect)
    rel = np.linalg.norm(out.keys - snapshot.keys) / np.linalg.norm(snapshot.keys)
    assert 0 < rel < {"q8_0": 0.01, "q4_0": 0.15, "f16": 1e-3}[qtype]
    assert out.n_cells == N_TOK and out.evicted.size == 0


def test_quant_errors(snapshot: KVSnapshot) -> None:
    with pytest.raises(ValueError, match="not supported"):
        KVQuant(key_type="q5_k")
    with pytest.raises(ValueError, match="budget"):
        KVQuant().compress(snapshot, N_TOK - 1)
    odd = make_snapshot(d=20, queries=False)
    with pytest.raises(ValueError, match="block size"):
        KVQuant().compress(odd, N_TOK)
