"""Merging KV cells inside the patched llama.cpp cache, checked against the numba oracle.

Each test runs a real (tiny, random-weight) model through the patched libllama,
merges cells with ``edgemerge_kv_merge`` and reads the cache back through
the sequence state. Tolerances, as normalised mean squared error of the merged
rows against the oracle requantized to the cache type (the native op and the
oracle differ by float32 vs float64 accumulation, which can flip a rounding):

    f32 1e-12, f16 1e-7, bf16 1e-5, q8_0 1e-4, q4_0 1e-2
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
import pytest

from edgemerge import native
from edgemerge.native import kvcells, kvmerge
from edgemerge.native.kvstate import parse_seq_state
from edgemerge.reference import ggml_quants as gq
from edgemerge.reference.merge import merge_rows_grouped
from edgemerge.testing.tiny_models import write_tiny_model

NMSE_TOL = {"f32": 1e-12, "f16": 1e-7, "bf16": 1e-5, "q8_0": 1e-4, "q4_0": 1e-2}
N_TOKENS = 40
# (k type, v type, flash attention): quantized V needs flash attention (no transposed V)
CACHES = [
    ("f32", "f32", False),
    ("f16", "f16", False),
    ("f16", "f16", True),
    ("bf16", "bf16", True),
    ("q8_0", "q8_0", True),
    ("q4_0", "q4_0", True),
    ("q8_0", "f16", False),
]


@pytest.fixture(scope="module")
def tiny_qwen2_hd32(tmp_path_factory):
    """A tiny qwen2 with 32-wide heads: q8_0/q4_0 caches need the block size 32."""
    path = tmp_path_factory.mktemp("kvmerge") / "tiny-qwen2-hd32.gguf"
    return write_tiny_model(path, "qwen2", n_embd=128, n_head=4, n_head_kv=2, n_ff=256)


def make_llm(path, k="f16", v="f16", fa=False, n_ctx=128):
    return llama_cpp.Llama(
        str(path),
        n_ctx=n_ctx,
        n_batch=64,
        type_k=gq.ggml_type(k).type_id,
        type_v=gq.ggml_type(v).type_id,
        flash_attn=fa,
        n_threads=1,
        n_threads_batch=1,
        verbose=False,
        seed=1,
    )


def seq_state(llm, seq_id=0) -> bytes:
    ctx = llm._ctx.ctx
    size = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
    buf = (ctypes.c_uint8 * size)()
    assert llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq_id) == size
    return bytes(buf)


def kv_by_position(llm):
    """{pos: (K [n_layer, n_head, d], V [n_layer, n_head, d])} read back from the state."""
    shape = kvmerge.kv_shape(llm)
    st = parse_seq_state(seq_state(llm)).stream
    k, v = st.keys_values(shape.n_head_kv)
    return {int(p): (k[:, :, i], v[:, :, i]) for i, p in enumerate(st.positions)}


def prompt_tokens(llm, n=N_TOKENS):
    text = b"The quick brown fox jumps over the lazy dog while the cat sleeps. " * 8
    return llm.tokenize(text)[:n]


def groups_for(cells: kvcells.KVCells, runs: list[tuple[int, int]], rng, n_layer, n_head):
    """MergeGroups for runs of positions [a, b] (inclusive), pivot = middle member."""
    dst, src, offs, span = [], [], [0], []
    for a, b in runs:
        members = [int(cells.cell[cells.index_of_pos(p)]) for p in range(a, b + 1)]
        src += members
        offs.append(len(src))
        dst.append(members[len(members) // 2])
        span.append((a, b))
    n_src = len(src)
    w = rng.random((n_layer, n_src, n_head)).astype(np.float32) + 0.1
    wv = rng.random((n_layer, n_src, n_head)).astype(np.float32) + 0.1
    for g in range(len(runs)):
        sl = slice(offs[g], offs[g + 1])
        w[:, sl] /= w[:, sl].sum(axis=1, keepdims=True)
        wv[:, sl] /= wv[:, sl].sum(axis=1, keepdims=True)
    sizes = np.diff(offs)
    return kvmerge.MergeGroups(
        dst=np.array(dst, np.uint32),
        offsets=np.array(offs, np.int32),
        src=np.array(src, np.uint32),
        bias=np.log(sizes).astype(np.float32),
        span=np.array(span, np.int32),
        w_k=w,
        w_v=wv,
    )


def requantized(x: np.ndarray, qtype: str) -> np.ndarray:
    if qtype == "f32":
        return x.astype(np.float32)
    return gq.dequantize_rows(gq.quantize_rows(x.astype(np.float32), qtype), qtype, x.shape[-1])


def nmse(got, want) -> float:
    return float(np.sum((got - want) ** 2) / np.sum(want.astype(np.float64) ** 2))


RUNS = [(3, 4), (6, 9), (12, 16), (20, 21)]


@pytest.mark.parametrize("k,v,fa", CACHES)
def test_merge_matches_reference(tiny_qwen2_hd32, k, v, fa):
    llm = make_llm(tiny_qwen2_hd32, k, v, fa)
    llm.eval(prompt_tokens(llm))
    shape = kvmerge.kv_shape(llm)
    before = kv_by_position(llm)
    cells = kvcells.list_cells(llm)
    groups = groups_for(cells, RUNS, np.random.default_rng(0), shape.n_layer, shape.n_head_kv)

    kvmerge.kv_merge(llm, groups)
    after = kv_by_position(llm)

    merged_pos = {int(cells.pos[cells.index_of_pos(p)]) for a, b in RUNS for p in range(a, b + 1)}
    dst_pos = {int(cells.pos[list(cells.cell).index(d)]) for d in groups.dst}
    # members other than the destination are gone; everything else is byte-identical
    assert set(after) == (set(before) - merged_pos) | dst_pos
    for p in set(after) - dst_pos:
        np.testing.assert_array_equal(after[p][0], before[p][0])
        np.testing.assert_array_equal(after[p][1], before[p][1])

    for g, (a, b) in enumerate(RUNS):
        sl = slice(groups.offsets[g], groups.offsets[g + 1])
        members = range(a, b + 1)
        for il in range(shape.n_layer):
            for which, (wts, qtype, kwargs) in enumerate(
                [
                    (groups.w_k, k, dict(magnitude=True, slerp_pairs=True)),
                    (groups.w_v, v, dict(magnitude=False, slerp_pairs=False)),
                ]
            ):
                rows = np.stack([before[p][which][il].reshape(-1) for p in members])
                want = merge_rows_grouped(
                    rows,
                    np.arange(len(rows), dtype=np.int32),
                    wts[il, sl],
                    np.array([0, len(rows)], np.int32),
                    shape.n_head_kv,
                    **kwargs,
                )[0]
                got = after[_dst_pos(groups, cells, g)][which][il].reshape(-1)
                assert np.all(np.isfinite(got))
                assert nmse(got, requantized(want[None], qtype)[0]) < NMSE_TOL[qtype], (
                    g,
                    il,
                    which,
                )

    listed = kvcells.list_cells(llm)
    assert len(listed) == N_TOKENS - sum(b - a for a, b in RUNS)
    for g, d in enumerate(groups.dst):
        i = list(listed.cell).index(d)
        assert listed.bias[i] == pytest.approx(float(groups.bias[g]))
        assert (listed.span_min[i], listed.span_max[i]) == tuple(groups.span[g])


@pytest.mark.parametrize(
    "k,v,fa", [("f16", "f16", False), ("q8_0", "q8_0", True), ("q4_0", "f32", True)]
)
def test_gathered_merge_matches_reference(tiny_qwen2_hd32, k, v, fa, monkeypatch):
    """The graph for backends without MERGE_ROWS (get_rows of the members, then the op over
    those rows only), forced on the CPU: same rows, same tolerances."""
    monkeypatch.setenv("EDGEMERGE_MERGE_GATHER", "1")
    test_merge_matches_reference(tiny_qwen2_hd32, k, v, fa)


def _dst_pos(groups, cells, g) -> int:
    return int(cells.pos[list(cells.cell).index(groups.dst[g])])


def test_equal_weights_when_none_given(tiny_qwen2_hd32):
    llm = make_llm(tiny_qwen2_hd32, "f32", "f32")
    llm.eval(prompt_tokens(llm))
    shape = kvmerge.kv_shape(llm)
    before = kv_by_position(llm)
    cells = kvcells.list_cells(llm)
    g = groups_for(cells, [(5, 8)], np.random.default_rng(0), shape.n_layer, shape.n_head_kv)
    g = kvmerge.MergeGroups(g.dst, g.offsets, g.src, g.bias, g.span)
    kvmerge.kv_merge(llm, g, magnitude=False)
    got = kv_by_position(llm)[_dst_pos(g, cells, 0)]
    for which in (0, 1):
        want = np.mean([before[p][which] for p in range(5, 9)], axis=0)
        np.testing.assert_allclose(got[which], want, rtol=1e-5, atol=1e-6)


def test_merged_context_survives_state_round_trip_and_generates_identically(tiny_qwen2_hd32):
    llm = make_llm(tiny_qwen2_hd32)
    toks = prompt_tokens(llm)
    llm.eval(toks)
    shape = kvmerge.kv_shape(llm)
    g = groups_for(
        kvcells.list_cells(llm), RUNS, np.random.default_rng(3), shape.n_layer, shape.n_head_kv
    )
    kvmerge.kv_merge(llm, g)
    state = seq_state(llm)

    other = make_llm(tiny_qwen2_hd32)
    buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
    assert llama_cpp.llama_state_seq_set_data(other._ctx.ctx, buf, len(state), 0) == len(state)
    a, b = kvcells.list_cells(llm), kvcells.list_cells(other)
    np.testing.assert_array_equal(a.pos, b.pos)
    np.testing.assert_array_equal(a.bias, b.bias)
    np.testing.assert_array_equal(a.span_min, b.span_min)
    np.testing.assert_array_equal(a.span_max, b.span_max)

    def greedy(model, n=8):
        out, tok, pos = [], toks[-1], len(toks)
        for _ in range(n):
            batch = llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(tok), 1)
            batch.pos = (llama_cpp.llama_pos * 1)(pos)
            assert llama_cpp.llama_decode(model._ctx.ctx, batch) == 0
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(model._ctx.ctx, -1), shape=(model.n_vocab(),)
            )
            tok = int(np.argmax(logits))
            out.append(tok)
            pos += 1
        return out

    assert greedy(llm) == greedy(other)


def test_seq_rm_removes_a_merged_cell_whose_span_reaches_the_cut(tiny_qwen2_hd32):
    llm = make_llm(tiny_qwen2_hd32)
    llm.eval(prompt_tokens(llm))
    shape = kvmerge.kv_shape(llm)
    cells = kvcells.list_cells(llm)
    g = groups_for(cells, [(10, 14)], np.random.default_rng(0), shape.n_layer, shape.n_head_kv)
    kvmerge.kv_merge(llm, g)
    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
    # the merged cell sits at position 12 but covers 10..14: cutting at 13 removes it
    assert llama_cpp.llama_memory_seq_rm(mem, 0, 13, -1)
    left = kvcells.list_cells(llm)
    assert list(left.pos) == list(range(10))


def test_freed_cells_are_reused_by_later_tokens(tiny_qwen2_hd32):
    n_ctx = 64
    llm = make_llm(tiny_qwen2_hd32, n_ctx=n_ctx)
    toks = prompt_tokens(llm, 60)
    llm.eval(toks)
    shape = kvmerge.kv_shape(llm)
    g = groups_for(
        kvcells.list_cells(llm),
        [(4, 19), (20, 35)],
        np.random.default_rng(0),
        shape.n_layer,
        shape.n_head_kv,
    )
    kvmerge.kv_merge(llm, g)
    assert len(kvcells.list_cells(llm)) == 60 - 30
    # 30 more tokens than the physical cache would hold without the merge
    extra = prompt_tokens(llm, 30)
    for i, t in enumerate(extra):
        batch = llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(t), 1)
        batch.pos = (llama_cpp.llama_pos * 1)(60 + i)
        assert llama_cpp.llama_decode(llm._ctx.ctx, batch) == 0
    assert len(kvcells.list_cells(llm)) == 60
    assert kvcells.list_cells(llm).pos.max() == 89


@pytest.mark.parametrize("fa", [False, True])
def test_features_match_numpy(tiny_qwen2_hd32, fa):
    llm = make_llm(tiny_qwen2_hd32, "f32", "f32", fa)
    llm.eval(prompt_tokens(llm))
    shape = kvmerge.kv_shape(llm)
    cells = kvcells.list_cells(llm)
    sel = cells.cell[5:30]
    feats = kvmerge.kv_features(llm, sel)
    raw = kvmerge.kv_features(llm, sel, centre=False)
    kv = kv_by_position(llm)
    pos = cells.pos[5:30]
    K = np.stack([kv[int(p)][0] for p in pos], axis=2)  # [L, H, n, d]
    V = np.stack([kv[int(p)][1] for p in pos], axis=2)

    def cos_adjacent(x):
        u = x / np.linalg.norm(x, axis=-1, keepdims=True)
        return np.sum(u[:, :, :-1] * u[:, :, 1:], axis=-1)

    np.testing.assert_allclose(
        feats.k_sim, cos_adjacent(K - K.mean(axis=2, keepdims=True)), atol=1e-4
    )
    np.testing.assert_allclose(raw.k_sim, cos_adjacent(K), atol=1e-4)
    np.testing.assert_allclose(feats.k_norm, np.linalg.norm(K, axis=-1), rtol=1e-4)
    np.testing.assert_allclose(feats.v_norm, np.linalg.norm(V, axis=-1), rtol=1e-4)
    assert feats.k_sim.shape == (shape.n_layer, shape.n_head_kv, len(sel) - 1)


def test_shape_reports_the_cache(tiny_qwen2_hd32):
    llm = make_llm(tiny_qwen2_hd32)
    s = kvmerge.kv_shape(llm)
    assert (s.n_layer, s.n_head_kv, s.head_dim_k, s.head_dim_v) == (2, 2, 32, 32)
    assert s.layer_ids == (0, 1)
    assert s.n_cells >= 128


def _bad(cells, **over):
    base = dict(
        dst=[cells.cell[5]],
        offsets=[0, 2],
        src=[cells.cell[5], cells.cell[6]],
        bias=[np.log(2)],
        span=[[5, 6]],
    )
    base.update(over)
    return kvmerge.MergeGroups(
        dst=np.array(base["dst"], np.uint32),
        offsets=np.array(base["offsets"], np.int32),
        src=np.array(base["src"], np.uint32),
        bias=np.array(base["bias"], np.float32),
        span=np.array(base["span"], np.int32),
        w_k=base.get("w_k"),
    )


@pytest.mark.parametrize(
    "over,message",
    [
        (lambda c: dict(src=[c[5], 100000]), "outside the cache"),
        (lambda c: dict(offsets=[0, 0], src=[]), "empty"),
        (lambda c: dict(dst=[c[7]]), "not a member"),
        (lambda c: dict(bias=[np.nan]), "bias"),
        (lambda c: dict(span=[[6, 6]]), "span"),
        (lambda c: dict(w_k=np.full((2, 2, 2), np.nan, np.float32)), "not finite"),
    ],
)
def test_invalid_merges_are_errors_and_change_nothing(tiny_qwen2_hd32, over, message):
    llm = make_llm(tiny_qwen2_hd32)
    llm.eval(prompt_tokens(llm))
    cells = kvcells.list_cells(llm)
    before = seq_state(llm)
    with pytest.raises(native.NativeError, match=message):
        kvmerge.kv_merge(llm, _bad(cells, **over([int(x) for x in cells.cell])))
    assert seq_state(llm) == before


def test_unknown_sequence_and_overlapping_groups(tiny_qwen2_hd32):
    llm = make_llm(tiny_qwen2_hd32)
    llm.eval(prompt_tokens(llm))
    cells = kvcells.list_cells(llm)
    with pytest.raises(native.NativeError, match="seq_id"):
        kvmerge.kv_merge(llm, _bad(cells), seq_id=3)
    c = [int(x) for x in cells.cell[5:8]]
    overlapping = _bad(
        cells,
        dst=[c[0], c[1]],
        offsets=[0, 2, 4],
        src=[c[0], c[1], c[1], c[2]],
        bias=[0.7, 0.7],
        span=[[5, 6], [6, 7]],
    )
    with pytest.raises(native.NativeError, match="more than one group"):
        kvmerge.kv_merge(llm, overlapping)
    with pytest.raises(native.NativeError, match="at least 2 cells"):
        kvmerge.kv_features(llm, cells.cell[:1])
