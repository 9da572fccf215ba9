"""The one BlockMerge policy: its rules on synthetic features, and the online and the
offline path planning the same thing from the same cache."""

from __future__ import annotations

import dataclasses
import math

import llama_cpp
import numpy as np
import pytest

from edgemerge.merging import policy
from edgemerge.merging.planner import BlockMergePlanner
from edgemerge.merging.policy import BudgetError, PlanningFeatures
from edgemerge.methods import BlockMerge
from edgemerge.methods.blockmerge import snapshot_features
from edgemerge.native import kvcells, kvmerge
from edgemerge.native.capture import capture_kv
from edgemerge.reference.similarity import aggregate_similarity
from edgemerge.settings import MergeSettings, SettingsError

N_TOK = 120
SMALL = MergeSettings(sinks=4, recent=16, block_size=8, threshold=0.3)


def features(n: int = 96, seed: int = 0, n_layer: int = 2, n_head: int = 2) -> PlanningFeatures:
    """Features with runs of similar neighbours (k_sim near 1) between jumps."""
    rng = np.random.default_rng(seed)
    sim = np.where(rng.random((1, 1, n - 1)) < 0.7, 0.9, -0.2) + 0.05 * rng.standard_normal(
        (n_layer, n_head, n - 1)
    )
    pos = np.arange(n, dtype=np.int32)
    return PlanningFeatures(
        k_sim=np.clip(sim, -1, 1).astype(np.float32),
        k_norm=(1 + rng.random((n_layer, n_head, n))).astype(np.float32),
        v_norm=(1 + rng.random((n_layer, n_head, n))).astype(np.float32),
        positions=pos,
        spans=np.stack([pos, pos], axis=1),
        bias=np.zeros(n, np.float32),
        n_logical=n,
    )


def test_plan_keeps_its_promises() -> None:
    f = features()
    s = dataclasses.replace(SMALL, retain_top=0.1)
    p = policy.plan(f, s, 50)
    assert p.n_after <= 50 and p.n_after == int(p.keep.sum())
    assert p.n_before == f.n and p.starts[0] == 0 and p.ends[-1] == f.n
    n_cand = f.n - 4 - 16
    assert p.retained.sum() == math.floor(0.1 * n_cand)
    for g in range(p.n_group):
        m = p.members[p.offsets[g] : p.offsets[g + 1]]
        assert m.size >= 2 and np.all(np.diff(m) == 1)
        assert not p.protected[m].any()
        assert len(set((f.positions[m] // s.block_size).tolist())) == 1  # one block
        assert p.pivots[g] in m
        assert p.spans[g].tolist() == [m[0], m[-1]]
        assert p.bias[g] == pytest.approx(math.log(m.size))
        w = p.weights[:, :, p.offsets[g] : p.offsets[g + 1]]
        np.testing.assert_allclose(w.sum(axis=2), 1.0, rtol=1e-6)
        # the pivot weighs most: the kernel peaks at distance 0
        assert np.all(w[:, :, p.pivots[g] - m[0]] >= w.max(axis=2) - 1e-7)
        raw = aggregate_similarity(f.k_sim)[m[0] : m[-1]]
        assert p.errors[g] == pytest.approx(float(policy.pair_error(raw).max()), rel=1e-6)
        assert p.errors[g] <= s.max_merge_error


def test_threshold_one_merges_only_what_the_target_needs() -> None:
    f = features()
    eager = policy.plan(f, dataclasses.replace(SMALL, threshold=0.0, retain_top=0.0), 80)
    lazy = policy.plan(f, dataclasses.replace(SMALL, threshold=1.0, retain_top=0.0), 80)
    assert eager.n_after < 75  # every pair above 0 merged, far below the target
    assert 78 <= lazy.n_after <= 80  # ties at the cut may take a cell or two more


def test_mass_sets_pivot_and_bias() -> None:
    f = features()
    heavy = np.zeros(f.n, np.float32)
    heavy[30] = math.log(5.0)
    f = dataclasses.replace(f, bias=heavy)
    s = dataclasses.replace(SMALL, retain_top=0.0, threshold=-1.0)
    p = policy.plan(f, s, 60)
    g = next(g for g in range(p.n_group) if 30 in p.members[p.offsets[g] : p.offsets[g + 1]])
    size = p.offsets[g + 1] - p.offsets[g]
    assert p.pivots[g] == 30 and p.bias[g] == pytest.approx(math.log(4 + size), rel=1e-6)
    flat = policy.plan(f, dataclasses.replace(s, attention_bias=False), 60)
    assert np.all(flat.bias == 0)


def test_eviction_order_and_errors() -> None:
    f = features()
    s = dataclasses.replace(SMALL, retain_top=0.1, max_merge_error=1e-9)  # nothing merges
    p = policy.plan(f, s, 4 + 16 + 3)
    assert p.n_group == 0 and p.n_after == 23
    kept_middle = [a for a, k in zip(p.starts, p.keep, strict=True) if k and 4 <= a < f.n - 16]
    assert kept_middle == np.flatnonzero(p.retained)[-3:].tolist()  # retained go last
    assert p.evict_spans[0].tolist() == [4, 4]  # then oldest first
    with pytest.raises(BudgetError, match="eviction"):
        policy.plan(f, dataclasses.replace(s, eviction="none"), 30)
    with pytest.raises(BudgetError, match="no room"):
        policy.plan(f, s, 10)
    with pytest.raises(SettingsError, match="calibrate"):
        policy.plan(f, dataclasses.replace(s, threshold="calibrated"), 30)
    with pytest.raises(SettingsError, match="beyond"):
        policy.plan(f, dataclasses.replace(s, similarity_layers=(5,)), 30)
    with pytest.raises(ValueError, match="k_sim"):
        dataclasses.replace(f, k_sim=f.k_sim[:, :, :-1])
    with pytest.raises(ValueError, match="target"):
        policy.plan(f, s, 0)


def test_a_given_score_replaces_the_similarity_rule() -> None:
    f = features()
    s = dataclasses.replace(SMALL, retain_top=0.0)
    same = policy.plan(f, s, 60, score=aggregate_similarity(f.k_sim) - np.float32(0.3))
    ref = policy.plan(f, s, 60)
    np.testing.assert_array_equal(same.members, ref.members)
    np.testing.assert_allclose(same.weights, ref.weights)


# --- the online and the offline path on one cache -----------------------------------------


def online_plan(path, tokens, settings: MergeSettings, target: int, type_k: str = "f16"):
    """Plan on the live cache: device features, the planner adapter."""
    from edgemerge.reference.ggml_quants import ggml_type

    llm = llama_cpp.Llama(
        str(path),
        n_ctx=256,
        n_batch=64,
        type_k=ggml_type(type_k).type_id,
        type_v=ggml_type(type_k).type_id,
        flash_attn=True,
        n_threads=1,
        n_threads_batch=1,
        verbose=False,
    )
    try:
        llm.eval(tokens)
        cells = kvcells.list_cells(llm)
        planner = BlockMergePlanner(settings, kvmerge.kv_shape(llm))
        feats = planner.features(llm, cells)
        return cells, feats, planner.plan(cells, feats, len(tokens), target)
    finally:
        llm.close()


@pytest.mark.parametrize("centre", [True, False])
@pytest.mark.parametrize("target", [70, 30])  # merging; merging and eviction
def test_online_and_offline_plan_the_same(tiny_qwen2_path, centre: bool, target: int) -> None:
    tokens = np.random.default_rng(3).integers(100, 5000, N_TOK).tolist()
    # a wide error tolerance: the random model's neighbours are not very similar
    s = dataclasses.replace(SMALL, centre=centre, retain_top=0.05, max_merge_error=1.2)
    cells, feats, online = online_plan(tiny_qwen2_path, tokens, s, target)
    # the same batches as the online context, so that the cached rows are the same
    cap = capture_kv(tiny_qwen2_path, tokens, n_obs=0, flash_attn=True, n_ctx=256, n_batch=64)
    offline_feats = snapshot_features(cap.snapshot, centre=centre)
    # the features agree (device float32 against host float64)
    np.testing.assert_allclose(feats.k_sim, offline_feats.k_sim, atol=2e-5)
    np.testing.assert_allclose(feats.k_norm, offline_feats.k_norm, rtol=1e-5)
    np.testing.assert_allclose(feats.v_norm, offline_feats.v_norm, rtol=1e-5)
    offline = BlockMerge(s).plan(cap.snapshot, target)
    p = online.policy
    assert np.array_equal(cells.pos, cap.positions)
    for name in ("starts", "ends", "keep", "members", "offsets", "pivots", "spans", "evict_spans"):
        np.testing.assert_array_equal(getattr(p, name), getattr(offline, name), err_msg=name)
    assert p.n_group > 0 or len(p.evict_spans) > 0
    np.testing.assert_allclose(p.weights, offline.weights, atol=1e-4)
    np.testing.assert_allclose(p.bias, offline.bias, rtol=1e-6)
    np.testing.assert_allclose(p.errors, offline.errors, atol=1e-4)
    # the adapter names cache cells: destination = the pivot's cell
    np.testing.assert_array_equal(online.groups.dst, cells.cell[p.pivots])
    np.testing.assert_array_equal(online.groups.src, cells.cell[p.members])
    assert online.groups.w_k.shape == (feats.k_norm.shape[0], p.members.size, feats.k_norm.shape[1])
    # and the offline method applies exactly that plan
    out = BlockMerge(s).compress(cap.snapshot, target)
    assert out.n_cells == p.n_after
    merged = [c for c in range(out.n_cells) if out.members(c).size > 1]
    assert [out.members(c).tolist() for c in merged] == [
        p.members[p.offsets[g] : p.offsets[g + 1]].tolist() for g in range(p.n_group)
    ]
    np.testing.assert_array_equal(out.positions[merged], cap.positions[p.pivots])
