"""Recall: the block store, the query capture, scoring, and restores on the real runtime."""

from __future__ import annotations

import dataclasses
import inspect
import textwrap
import warnings

import numpy as np
import pytest

from edgemerge import Llama, MergeSettings, SettingsError
from edgemerge.native import kvcells
from edgemerge.recall import (
    BlockStore,
    QueryCapture,
    RowFormat,
    StoreFileError,
    StoreSnapshot,
    StoreWarning,
    attention_shares,
    choose_blocks,
)
from edgemerge.reference import ggml_quants as gq

N_CTX = 256
RECALL = MergeSettings(
    budget=160,
    sinks=4,
    recent=32,
    block_size=8,
    slack=16,
    recall=True,
    recall_window=8,
    recall_blocks=4,
    recall_reeval=8,
)
Q8 = dataclasses.replace(RECALL, store_type="q8_0")
# Python's own source: on every machine that runs these tests
TEXT = inspect.getsource(textwrap) + inspect.getsource(warnings)


def make(path, merge=RECALL, **kw):
    kw = {
        "n_ctx": N_CTX,
        "n_batch": 32,
        "n_threads": 1,
        "n_threads_batch": 1,
        "seed": 7,
        "verbose": False,
        **kw,
    }
    return Llama(str(path), merge=merge, **kw)


def rows(rng, n_layer, m, width=24):
    return rng.integers(0, 256, (n_layer, m, width), dtype=np.uint8)


# -- the store -------------------------------------------------------------------------


def test_store_keeps_rows_by_block_and_gives_them_back_exact(tmp_path):
    rng = np.random.default_rng(0)
    store = BlockStore(block_size=4, ram_bytes=1 << 20, spill_dir=tmp_path)
    pos = np.array([9, 1, 2, 8, 3], np.int32)
    k, v = rows(rng, 2, 5), rows(rng, 2, 5, 16)
    store.put(pos, pos + 100, k, v)
    assert store.blocks() == [0, 2]
    b0 = store.get(0)
    assert b0.positions.tolist() == [1, 2, 3]
    assert b0.tokens.tolist() == [101, 102, 103]
    np.testing.assert_array_equal(b0.k, k[:, [1, 2, 4]])
    np.testing.assert_array_equal(b0.v, v[:, [1, 2, 4]])
    # a position already stored keeps its first rows
    store.put(np.array([2, 0], np.int32), np.array([7, 100], np.int32), rows(rng, 2, 2), None)
    b0 = store.get(0)
    assert b0.positions.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(b0.k[:, 2], k[:, 2])
    taken = store.take(2)
    assert taken.positions.tolist() == [8, 9]
    assert store.blocks() == [0]
    st = store.stats()
    assert (st.stored, st.restored, st.positions) == (6, 2, 4)


def test_store_forgets_positions_after_a_cut(tmp_path):
    rng = np.random.default_rng(1)
    store = BlockStore(block_size=4, ram_bytes=1 << 20, spill_dir=tmp_path)
    pos = np.arange(0, 12, dtype=np.int32)
    store.put(pos, pos, rows(rng, 1, 12), None)
    store.drop_from(6)
    assert store.blocks() == [0, 1]
    assert store.get(1).positions.tolist() == [4, 5]
    # a block whose stored positions all lie past the cut goes, even if it starts before
    store.put(np.array([14, 15], np.int32), np.array([0, 0], np.int32), rows(rng, 1, 2), None)
    store.drop_from(13)
    assert store.blocks() == [0, 1]


def test_store_spills_to_a_file_and_reads_it_back(tmp_path):
    rng = np.random.default_rng(2)
    store = BlockStore(block_size=4, ram_bytes=200, spill_dir=tmp_path)
    pos = np.arange(0, 16, dtype=np.int32)
    k, v = rows(rng, 2, 16), rows(rng, 2, 16)
    store.put(pos, pos, k, v)
    st = store.stats()
    assert st.disk_bytes > 0 and st.ram_bytes <= 200
    assert len(list(tmp_path.iterdir())) == 1
    for b in range(4):
        e = store.get(b)
        np.testing.assert_array_equal(e.k, k[:, 4 * b : 4 * b + 4])
        np.testing.assert_array_equal(e.v, v[:, 4 * b : 4 * b + 4])
    store.close()
    assert not list(tmp_path.iterdir())


def test_a_corrupt_spill_file_warns_and_loses_only_those_blocks(tmp_path):
    rng = np.random.default_rng(3)
    store = BlockStore(block_size=4, ram_bytes=0, spill_dir=tmp_path)
    pos = np.arange(0, 8, dtype=np.int32)
    store.put(pos, pos, rows(rng, 1, 8), None)
    (spill,) = tmp_path.iterdir()
    data = bytearray(spill.read_bytes())
    data[5] ^= 0xFF  # inside block 0's record
    spill.write_bytes(bytes(data))
    with pytest.warns(StoreWarning, match="block 0 is unreadable"):
        assert store.get(0) is None
    assert store.get(1) is not None
    spill.unlink()
    with pytest.warns(StoreWarning, match="block 1 is unreadable"):
        assert store.get(1) is None
    assert store.blocks() == [] and store.stats().lost == 8


# -- q8_0 rows ---------------------------------------------------------------------------


def float_rows(rng, qtype, n_layer, m, width, scale=1.0):
    """Rows of ``qtype`` encoding normal values with a few outliers (real K has them)."""
    x = rng.standard_normal((n_layer, m, width)).astype(np.float32) * scale
    x[..., ::17] *= 40
    return gq.quantize_rows(x, qtype)


def q8_round_trip(rows, qtype, width):
    """The cache ``qtype``'s encoding of the q8_0 values of ``rows``, by ggml_quants alone."""
    q8 = gq.quantize_rows(gq.dequantize_rows(rows, qtype, width), gq.GGML_TYPE_Q8_0)
    return gq.quantize_rows(gq.dequantize_rows(q8, gq.GGML_TYPE_Q8_0, width), qtype)


def assert_within_q8_step(restored, original, qtype, width):
    """|x - x'| <= half a q8_0 step (amax / 127 / 2, amax of the 32-value block) plus the
    f16 rounding of the block's scale (127 codes times half an f16 ulp of it) and the
    rounding of the restored value to the cache type (half its ulp)."""
    x = gq.dequantize_rows(original, qtype, width)
    y = gq.dequantize_rows(restored, qtype, width)
    assert np.all(np.isfinite(y))
    amax = np.abs(x.reshape(*x.shape[:-1], -1, 32)).max(-1, keepdims=True)
    f16_eps = 2.0**-11  # half an ulp, relative
    out_eps = {"f32": 2.0**-24, "f16": f16_eps, "bf16": 2.0**-8}[gq.type_name(qtype)]
    bound = amax / 127 / 2 + 127 * (amax / 127) * f16_eps + amax * out_eps + 2.0**-24
    err = np.abs(x - y).reshape(bound.shape[:-1] + (32,))
    assert np.all(err <= bound * (1 + 1e-6)), float((err / bound).max())
    return float((err / (amax / 127)).max())  # the worst error in q8_0 steps


@pytest.mark.parametrize("qtype", ["f16", "bf16", "f32"])
def test_q8_store_restores_the_q8_values_of_float_rows(tmp_path, qtype):
    rng = np.random.default_rng(5)
    t, width = gq.ggml_type(qtype).type_id, 64
    fmt = RowFormat.choose(t, width, "q8_0")
    assert fmt.store_type == gq.GGML_TYPE_Q8_0
    store = BlockStore(4, 1 << 20, tmp_path, fmt, fmt)
    k, v = float_rows(rng, t, 2, 6, width), float_rows(rng, t, 2, 6, width, 0.01)
    pos = np.arange(6, dtype=np.int32)
    store.put(pos, pos, k, v)
    e = store.get(0)
    assert e.k.shape == (2, 4, 2 * 34)  # two q8_0 blocks of 34 bytes per row
    back_k, back_v = store.cache_rows(e)
    np.testing.assert_array_equal(back_k, q8_round_trip(k[:, :4], t, width))
    np.testing.assert_array_equal(back_v, q8_round_trip(v[:, :4], t, width))
    steps = assert_within_q8_step(back_k, k[:, :4], t, width)
    assert 0.1 < steps <= 0.6  # it did quantize: not byte-identical, within half a step
    assert_within_q8_step(back_v, v[:, :4], t, width)
    # scoring reads the stored keys as their q8_0 values (before the cache type's rounding)
    values = fmt.values(e.k)
    np.testing.assert_array_equal(values, gq.dequantize_rows(e.k, gq.GGML_TYPE_Q8_0, width))
    np.testing.assert_allclose(values, gq.dequantize_rows(back_k, t, width), rtol=2.0**-8)


def test_q8_store_keeps_a_quantized_cache_and_the_default_as_they_are():
    for t in (gq.GGML_TYPE_Q8_0, gq.GGML_TYPE_Q4_0):
        assert RowFormat.choose(t, 64, "q8_0").identity
    assert RowFormat.choose(gq.GGML_TYPE_F16, 64, "cache").identity
    with pytest.raises(ValueError, match="multiple of the q8_0 block size"):
        RowFormat(gq.GGML_TYPE_F16, gq.GGML_TYPE_Q8_0, 48)


def test_q8_store_never_fails_or_restores_inf_on_extreme_values():
    x = np.zeros((1, 1, 64), np.float32)
    x[..., 0], x[..., 1], x[..., 2], x[..., 33] = np.inf, np.nan, -np.inf, 65504.0
    rows = gq.quantize_rows(x, "f16")
    fmt = RowFormat.choose(gq.GGML_TYPE_F16, 64, "q8_0")
    back = gq.dequantize_rows(fmt.decode(fmt.encode(rows)), "f16", 64)
    assert np.all(np.isfinite(back))
    assert back[0, 0, 1] == 0  # NaN has no code: 0
    assert back[0, 0, 0] == -back[0, 0, 2] == 65504.0  # +-inf: the largest finite f16
    assert back[0, 0, 33] == 65504.0  # 127 * f16(65504 / 127) = 65532 would be inf in f16


def test_q8_spill_file_round_trips_and_detects_corruption(tmp_path):
    rng = np.random.default_rng(6)
    fmt = RowFormat.choose(gq.GGML_TYPE_F16, 32, "q8_0")
    ram = BlockStore(4, 1 << 20, tmp_path / "ram", fmt, fmt)
    disk = BlockStore(4, 0, tmp_path / "disk", fmt, fmt)
    pos = np.arange(8, dtype=np.int32)
    k, v = float_rows(rng, gq.GGML_TYPE_F16, 2, 8, 32), float_rows(rng, gq.GGML_TYPE_F16, 2, 8, 32)
    for s in (ram, disk):
        s.put(pos, pos, k, v)
    st = disk.stats()
    assert st.ram_bytes == 0 and st.disk_bytes == 2 * (4 * 4 * 2 + 2 * 2 * 4 * 34)
    for b in (0, 1):
        a, d = ram.get(b), disk.get(b)
        np.testing.assert_array_equal(a.k, d.k)
        np.testing.assert_array_equal(a.v, d.v)
    (spill,) = (tmp_path / "disk").iterdir()
    data = bytearray(spill.read_bytes())
    data[-3] ^= 0xFF  # inside block 1's V rows
    spill.write_bytes(bytes(data))
    with pytest.warns(StoreWarning, match="block 1 is unreadable"):
        assert disk.get(1) is None
    assert disk.get(0) is not None


def test_a_snapshot_round_trips_ram_and_spilled_blocks_through_savez(tmp_path):
    rng = np.random.default_rng(5)
    fmt = RowFormat(gq.GGML_TYPE_F16, gq.GGML_TYPE_F16, 8)
    store = BlockStore(4, ram_bytes=150, spill_dir=tmp_path / "a", k_format=fmt, v_format=fmt)
    pos = np.array([0, 1, 2, 5, 6, 9, 12, 13, 14, 15], np.int32)
    k, v = rows(rng, 2, pos.size, 16), rows(rng, 2, pos.size, 16)
    store.put(pos, pos + 50, k, v)
    assert store.stats().disk_bytes > 0  # some blocks come from the spill file
    snap = store.snapshot()
    np.testing.assert_array_equal(snap.positions, pos)
    np.testing.assert_array_equal(snap.k, k)
    np.testing.assert_array_equal(snap.v, v)
    np.savez(tmp_path / "s.npz", other=np.int64(3), **snap.to_arrays())
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:
        back = StoreSnapshot.from_arrays({n: z[n] for n in z.files})
    other = BlockStore(4, ram_bytes=150, spill_dir=tmp_path / "b", k_format=fmt, v_format=fmt)
    keep = back.positions != 6
    assert other.load(back, keep) == pos.size - 1
    assert other.blocks() == store.blocks()
    for b in store.blocks():
        want, got = store.get(b), other.get(b)
        sel = want.positions != 6
        np.testing.assert_array_equal(got.positions, want.positions[sel])
        np.testing.assert_array_equal(got.tokens, want.tokens[sel])
        np.testing.assert_array_equal(got.k, want.k[:, sel])
        np.testing.assert_array_equal(got.v, want.v[:, sel])
    # the empty store saves and loads too, and a file without a store has none
    empty = BlockStore(4, 1 << 20, tmp_path / "c", fmt, fmt).snapshot()
    assert StoreSnapshot.from_arrays(empty.to_arrays()).positions.size == 0
    assert StoreSnapshot.from_arrays({"other": np.int64(3)}) is None


def test_a_snapshot_loads_into_a_q8_store_as_its_q8_values(tmp_path):
    rng = np.random.default_rng(6)
    f16 = RowFormat(gq.GGML_TYPE_F16, gq.GGML_TYPE_F16, 32)
    q8 = RowFormat(gq.GGML_TYPE_F16, gq.GGML_TYPE_Q8_0, 32)
    x = rng.standard_normal((2, 6, 32)).astype(np.float32)
    raw = gq.quantize_rows(x, gq.GGML_TYPE_F16)
    plain = BlockStore(4, 1 << 20, tmp_path, f16, f16)
    pos = np.arange(6, dtype=np.int32)
    plain.put(pos, pos, raw, raw)
    small = BlockStore(4, 1 << 20, tmp_path, q8, q8)
    small.load(plain.snapshot())
    back, _ = small.cache_rows(small.get(0))
    want = q8.decode(q8.encode(raw[:, :4]))
    np.testing.assert_array_equal(back, want)
    assert small.stats().ram_bytes < plain.stats().ram_bytes


def test_a_snapshot_that_does_not_fit_is_refused_naming_why(tmp_path):
    f16 = RowFormat(gq.GGML_TYPE_F16, gq.GGML_TYPE_F16, 8)
    f32 = RowFormat(gq.GGML_TYPE_F32, gq.GGML_TYPE_F32, 8)
    rng = np.random.default_rng(7)
    store = BlockStore(4, 1 << 20, tmp_path, f16, f16)
    three = np.arange(3, dtype=np.int32)
    store.put(three, three, rows(rng, 1, 3, 16), rows(rng, 1, 3, 16))
    snap = store.snapshot()
    with pytest.raises(StoreFileError, match="blocks of 4 positions, this one of 8"):
        BlockStore(8, 1 << 20, tmp_path, f16, f16).load(snap)
    with pytest.raises(StoreFileError, match="cache type 1 with 8 values, this cache is of type 0"):
        BlockStore(4, 1 << 20, tmp_path, f32, f32).load(snap)
    arrays = snap.to_arrays()
    with pytest.raises(StoreFileError, match="lacks store_tokens"):
        StoreSnapshot.from_arrays({n: a for n, a in arrays.items() if n != "store_tokens"})
    bad = dict(arrays, store_k=arrays["store_k"][:, :, :-1])  # a truncated row
    with pytest.raises(StoreFileError, match="hold 15 bytes"):
        StoreSnapshot.from_arrays(bad)
    with pytest.raises(StoreFileError, match="strictly increasing"):
        StoreSnapshot.from_arrays(dict(arrays, store_positions=arrays["store_positions"][::-1]))
    with pytest.raises(StoreFileError, match="one length"):
        StoreSnapshot.from_arrays(dict(arrays, store_tokens=arrays["store_tokens"][:2]))


def test_recode_converts_held_blocks_ram_and_spilled(tmp_path):
    rng = np.random.default_rng(7)
    t = gq.GGML_TYPE_F16
    plain, q8 = RowFormat.choose(t, 32, "cache"), RowFormat.choose(t, 32, "q8_0")
    store = BlockStore(4, 600, tmp_path, plain, plain)  # one 512-byte block fits in RAM
    pos = np.arange(12, dtype=np.int32)
    k, v = float_rows(rng, t, 1, 12, 32), float_rows(rng, t, 1, 12, 32)
    store.put(pos, pos, k, v)
    st = store.stats()
    assert st.disk_bytes > 0 and st.ram_bytes > 0
    store.recode(q8, q8)
    for b in range(3):
        e = store.get(b)
        assert e.k.shape[-1] == 34
        back_k, back_v = store.cache_rows(e)
        np.testing.assert_array_equal(back_k, q8_round_trip(k[:, 4 * b : 4 * b + 4], t, 32))
        np.testing.assert_array_equal(back_v, q8_round_trip(v[:, 4 * b : 4 * b + 4], t, 32))
    store.recode(plain, plain)  # back to the cache's type: the q8_0 values, as f16
    e = store.get(2)
    np.testing.assert_array_equal(e.k, q8_round_trip(k[:, 8:12], t, 32))


# -- scoring ---------------------------------------------------------------------------


def _shares_by_loops(q, scale, ck, cb, sk, starts):
    """The rule of edgemerge.recall.scoring, one query head and query at a time (keys
    head-major here, [L, n_kv_head, n, D])."""
    n_layer, t, n_head, _ = q.shape
    n_kv = ck.shape[1]
    group = n_head // n_kv
    ends = list(starts[1:]) + [sk.shape[2]]
    blocks = np.zeros(len(starts))
    cells = np.zeros(ck.shape[2])
    for il in range(n_layer):
        for g in range(n_head):
            h = g // group
            bs, cs = np.zeros(len(starts)), np.zeros(ck.shape[2])
            for i in range(t):
                logit = scale * ck[il, h] @ q[il, i, g] + cb
                lse = np.log(np.exp(logit - logit.max()).sum()) + logit.max()
                cs += np.exp(logit - lse) / t
                s = scale * sk[il, h] @ q[il, i, g]
                for j, (a, b) in enumerate(zip(starts, ends, strict=True)):
                    bs[j] += min(1.0, np.exp(s[a:b].max() - lse)) / t
            blocks = np.maximum(blocks, bs)
            cells = np.maximum(cells, cs)
    return blocks, cells


def test_attention_shares_match_the_rule_computed_by_loops():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 3, 4, 8)).astype(np.float32)
    ck = rng.standard_normal((2, 2, 10, 8)).astype(np.float32)
    cb = rng.uniform(0, 1.5, 10).astype(np.float32)
    sk = rng.standard_normal((2, 2, 9, 8)).astype(np.float32) * 2
    starts = np.array([0, 4, 5], np.intp)
    want_b, want_c = _shares_by_loops(q, 0.35, ck, cb, sk, starts)
    # position-major keys, as the cache keeps its rows; the stored ones also as one
    # array per layer, as the engine hands them over
    ck_rows, sk_rows = ck.transpose(0, 2, 1, 3), sk.transpose(0, 2, 1, 3)
    for stored in (sk_rows, [np.ascontiguousarray(layer) for layer in sk_rows]):
        blocks, cells = attention_shares(q, 0.35, ck_rows, cb, stored, starts)
        assert np.all(np.isfinite(blocks)) and np.all(np.isfinite(cells))
        np.testing.assert_allclose(blocks, want_b, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(cells, want_c, rtol=1e-4, atol=1e-6)


def test_only_the_voting_layers_score_blocks():
    rng = np.random.default_rng(6)
    q = rng.standard_normal((3, 2, 4, 8)).astype(np.float32)
    ck = rng.standard_normal((3, 2, 6, 8)).astype(np.float32)
    cb = np.zeros(6, np.float32)
    sk = rng.standard_normal((3, 2, 5, 8)).astype(np.float32)
    starts = np.array([0, 2], np.intp)
    vote = np.array([False, True, True])
    blocks, cells = attention_shares(
        q, 0.35, ck.transpose(0, 2, 1, 3), cb, sk.transpose(0, 2, 1, 3), starts, vote
    )
    want_b, _ = _shares_by_loops(q[1:], 0.35, ck[1:], cb, sk[1:], starts)
    _, want_c = _shares_by_loops(q, 0.35, ck, cb, sk, starts)
    np.testing.assert_allclose(blocks, want_b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cells, want_c, rtol=1e-4, atol=1e-6)  # cells: every layer
    with pytest.raises(ValueError, match="block_layers"):
        attention_shares(
            q, 0.35, ck.transpose(0, 2, 1, 3), cb, sk.transpose(0, 2, 1, 3), starts, vote[:2]
        )


def test_the_first_quarter_of_the_model_does_not_vote():
    from types import SimpleNamespace

    from edgemerge.recall.engine import RecallEngine

    def vote(layer_ids, n_layer, skip=0.25):
        engine = SimpleNamespace(
            settings=MergeSettings(recall_skip_layers=skip), n_layer=n_layer, layer_ids=layer_ids
        )
        return RecallEngine._block_layers(engine).tolist()

    assert vote(tuple(range(8)), 8) == [False, False] + [True] * 6
    assert vote(tuple(range(8)), 8, 0.0) == [True] * 8
    assert vote((5, 11, 17), 18) == [True, True, True]  # Gemma's full-attention layers
    assert vote((0, 1), 18) == [False, True]  # the last cache layer votes at least


def test_choose_blocks_takes_the_best_above_threshold():
    score = np.array([0.1, 0.5, 0.0, 0.3, 0.2])
    assert choose_blocks(score, 2, 0.0).tolist() == [1, 3]
    assert choose_blocks(score, 10, 0.25).tolist() == [1, 3]
    assert choose_blocks(np.zeros(3), 2, 0.0).tolist() == []


def test_choose_blocks_brings_the_following_blocks_with_a_chosen_one():
    # stored blocks 3, 4, 7, 9 (block 8 is not stored: it is exact in the cache)
    ids = np.array([3, 4, 7, 9])
    score = np.array([0.1, 0.0, 0.5, 0.3])
    assert choose_blocks(score, 8, 0.0, ids, following=1).tolist() == [2, 3, 0, 1]
    assert choose_blocks(score, 3, 0.0, ids, following=1).tolist() == [2, 3, 0]
    assert choose_blocks(score, 8, 0.0, ids, following=2).tolist() == [2, 3, 0, 1]
    assert choose_blocks(score, 8, 0.0, ids, following=0).tolist() == [2, 3, 0]
    # a block below the threshold still comes as a follower, but never leads
    assert choose_blocks(score, 8, 0.2, ids, following=1).tolist() == [2, 3]


# -- settings --------------------------------------------------------------------------


def test_recall_settings_are_validated():
    assert MergeSettings().recall  # on by default (docs/chat_memory.md)
    # a re-evaluation longer than the recent window is capped by it, not an error: a
    # small recent window must not fail on a recall knob the user never set
    assert MergeSettings(recent=16).recall_reeval == 32
    with pytest.raises(SettingsError, match="recall_window"):
        MergeSettings(recall_window=0)
    with pytest.raises(SettingsError, match="recall_threshold"):
        MergeSettings(recall_threshold=1.0)
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(SettingsError, match="recall_skip_layers"):
            MergeSettings(recall_skip_layers=bad)
    assert MergeSettings.from_dict(RECALL.to_dict()) == RECALL
    assert MergeSettings().store_type == "cache"  # byte-identical restores unless asked
    assert MergeSettings.from_dict(Q8.to_dict()) == Q8
    for bad in ("q4_0", "Q8_0", "f16", None, 8):
        with pytest.raises(SettingsError, match=r"store_type: .* is not one of 'cache', 'q8_0'"):
            MergeSettings(store_type=bad)


# -- on the real runtime ---------------------------------------------------------------


def test_query_capture_matches_the_python_capture(tiny_qwen2_path):
    """The native ring holds the same post-RoPE queries as edgemerge.native.capture's."""
    from edgemerge.native.capture import capture_kv

    llm = make(tiny_qwen2_path, merge=None)
    toks = llm.tokenize(TEXT.encode())[:70]
    ref = capture_kv(tiny_qwen2_path, toks, n_obs=5)
    layout_heads, head_dim = ref.n_head, ref.head_dim
    qc = QueryCapture(llm._ctx.ctx, len(ref.layers), layout_heads, head_dim, window=5)
    qc.arm()
    llm.eval(toks[:40])
    llm.eval(toks[40:])
    qc.disarm()
    q, n = qc.read()
    assert n.tolist() == [5] * len(ref.layers)
    # ref.queries: [n_layer, n_head, n_obs, head_dim]
    want = ref.queries.transpose(0, 2, 1, 3)
    assert np.all(np.isfinite(q))
    np.testing.assert_allclose(q, want, rtol=1e-4, atol=1e-4)
    qc.close()
    llm.close()


def _conversation(llm, turns: int):
    messages: list[dict[str, str]] = []
    for turn, message in enumerate(_turns(turns)):
        messages.append(message)
        messages.append({"role": "assistant", "content": _chat(llm, messages)})
        yield turn


def test_budget_holds_and_stored_rows_come_back_byte_identical(tiny_qwen2_path):
    llm = make(tiny_qwen2_path)
    engine = llm._recall
    seen_restore = False
    for _ in _conversation(llm, 14):
        cells = kvcells.list_cells(llm)
        assert len(cells) <= RECALL.budget + RECALL.slack
        # every logical position is exact in the cache or held by the store
        exact = set(cells.pos[cells.span_min == cells.span_max].tolist())
        stored = set()
        for b in engine.store.blocks():
            stored |= set(engine.store.get(b).positions.tolist())
        assert exact.isdisjoint(stored)
        assert exact | stored == set(range(llm.n_tokens))
        seen_restore |= llm.merge_stats().blocks_restored > 0
    st = llm.merge_stats()
    assert st.recall_turns >= 14 and st.store_positions > 0 and st.store_ram_bytes > 0
    assert seen_restore, "no turn brought a block back"
    # each turn that restored re-evaluated the prompt's last min(reeval, recent - 1) tokens
    assert (
        st.tokens_reevaluated >= st.recall_hits * min(RECALL.recall_reeval, RECALL.recent - 1) > 0
    )

    # force one restore of a known block and compare bytes with what was stored
    b = engine.store.blocks()[0]
    before = engine.store.get(b)
    from edgemerge.recall.engine import _cell_rows

    result = _restore_block(engine, llm, b, following=0)
    assert result.blocks == 1
    _, state = engine.read_state()
    k, v = _cell_rows(state.stream)
    idx = [int(np.flatnonzero(state.stream.positions == p)[0]) for p in before.positions]
    np.testing.assert_array_equal(k[:, idx], before.k)
    np.testing.assert_array_equal(v[:, idx], before.v)
    assert len(kvcells.list_cells(llm)) <= RECALL.budget_cells(llm.n_tokens)

    # with recall_following=1 a block whose follower is stored brings it
    held = engine.store.blocks()
    b = next(x for x in held if x + 1 in held)
    follower = engine.store.get(b + 1)
    assert _restore_block(engine, llm, b, following=1).blocks == 2
    assert b not in engine.store.blocks() and b + 1 not in engine.store.blocks()
    _, state = engine.read_state()
    k, _ = _cell_rows(state.stream)
    idx = [int(np.flatnonzero(state.stream.positions == p)[0]) for p in follower.positions]
    np.testing.assert_array_equal(k[:, idx], follower.k)
    assert len(kvcells.list_cells(llm)) <= RECALL.budget_cells(llm.n_tokens)
    llm.close()


def _restore_block(engine, llm, block, following=0):
    """Recall with scores rigged so that exactly ``block`` wins, bringing ``following``
    blocks after it (``recall_following``)."""
    import edgemerge.recall.engine as eng

    real = eng.attention_shares

    def rigged(*args):
        bscore, cscore = real(*args)
        order = engine.store.blocks()
        bscore = np.where(np.array(order) == block, 1.0, 0.0).astype(np.float32)
        return bscore, cscore

    settings = engine.settings
    eng.attention_shares = rigged
    engine.settings = dataclasses.replace(settings, recall_following=following)
    try:
        return engine.recall(llm.input_ids, llm.n_tokens, RECALL.budget_cells(llm.n_tokens))
    finally:
        eng.attention_shares = real
        engine.settings = settings


def test_rewind_forgets_stored_positions_beyond_the_cut(tiny_qwen2_path):
    llm = make(tiny_qwen2_path)
    toks = llm.tokenize(TEXT.encode())[:600]
    llm.eval(toks)
    assert llm._recall.store.blocks()
    cut = 300
    llm.n_tokens = cut
    llm.eval(toks[cut : cut + 10])
    for b in llm._recall.store.blocks():
        assert llm._recall.store.get(b).positions.max() < cut
    llm.close()


def _turns(n: int, start: int = 0) -> list[dict[str, str]]:
    words = TEXT.split()
    return [
        {"role": "user", "content": " ".join(words[t * 50 : t * 50 + 50])}
        for t in range(start, start + n)
    ]


def _chat(llm, messages: list[dict[str, str]]) -> str:
    out = llm.create_chat_completion(messages=messages, max_tokens=6, temperature=0)
    return out["choices"][0]["message"]["content"]


def test_a_state_saved_with_its_store_recalls_as_the_uninterrupted_run(tiny_qwen2_path):
    a = make(tiny_qwen2_path)
    messages: list[dict[str, str]] = []
    for turn in _turns(10):
        messages.append(turn)
        messages.append({"role": "assistant", "content": _chat(a, messages)})
    state, snap = a.save_state(), a.recall_store()
    assert snap.positions.size == a.merge_stats().store_positions > 0

    b = make(tiny_qwen2_path)
    b.load_state(state)
    assert b.merge_stats().store_positions == 0  # a state alone brings no store
    assert b.load_recall_store(snap) == snap.positions.size
    np.testing.assert_array_equal(b.recall_store().k, snap.k)
    c = make(tiny_qwen2_path)
    c.load_state(state)

    restored_before = a.merge_stats().blocks_restored
    for turn in _turns(3, start=10):
        messages.append(turn)
        reply = _chat(a, messages)
        assert _chat(b, messages) == reply
        _chat(c, messages)
        messages.append({"role": "assistant", "content": reply})
    # the turns after the save recalled the same blocks in both runs, some stored before it
    assert b.merge_stats().blocks_restored == a.merge_stats().blocks_restored - restored_before
    assert b.merge_stats().recall_hits > 0
    np.testing.assert_array_equal(a.recall_store().positions, b.recall_store().positions)
    np.testing.assert_array_equal(a.recall_store().k, b.recall_store().k)
    assert np.setdiff1d(snap.positions, b.recall_store().positions).size > 0
    # the run loaded without its store could bring back only what left after the load
    assert np.isin(snap.positions, c.recall_store().positions).sum() == 0
    for x in (a, b, c):
        x.close()


def test_a_store_is_kept_only_where_it_still_fits_the_sequence(tiny_qwen2_path):
    a = make(tiny_qwen2_path)
    toks = a.tokenize(TEXT.encode())[:500]
    a.eval(toks)
    snap = a.recall_store()
    b = make(tiny_qwen2_path)
    other = list(toks)
    other[snap.positions[0]] = (other[snap.positions[0]] + 1) % 1000  # another token there
    b.eval(other[:400])
    kept = b.load_recall_store(snap)
    held = b.recall_store().positions
    assert 0 < kept == held.size < snap.positions.size
    assert snap.positions[0] not in held and held.max() < 400
    cells = kvcells.list_cells(b)
    assert not np.isin(held, cells.pos[cells.span_min == cells.span_max]).any()
    # rows of another geometry are refused and leave the store empty
    wide = StoreSnapshot(
        snap.block_size,
        snap.formats,
        snap.positions,
        snap.tokens,
        np.concatenate([snap.k, snap.k]),
        None if snap.v is None else np.concatenate([snap.v] * 2),
    )
    with pytest.raises(StoreFileError, match="layers"):
        b.load_recall_store(wide)
    assert b.merge_stats().store_positions == 0
    off = make(tiny_qwen2_path, merge=dataclasses.replace(RECALL, recall=False))
    with pytest.raises(SettingsError, match="needs recall on"):
        off.load_recall_store(snap)
    assert off.recall_store() is None
    for x in (a, b, off):
        x.close()


def test_recall_off_has_no_store_and_the_same_stats_fields(tiny_qwen2_path):
    off = MergeSettings(**{**RECALL.to_dict(), "recall": False})
    llm = make(tiny_qwen2_path, merge=off)
    llm.eval(llm.tokenize(TEXT.encode())[:400])
    st = llm.merge_stats()
    assert llm._recall is None and st.store_positions == 0 and st.recall_turns == 0
    llm.set_merge_settings(RECALL)
    assert llm._recall is not None
    llm.close()


@pytest.mark.parametrize("qtype", ["f16", "f32"])
def test_q8_store_restores_q8_values_and_stores_fewer_bytes(tiny_qwen2_path, qtype):
    """store_type="q8_0" on a live float cache (transposed V: flash attention is off)."""
    t = gq.ggml_type(qtype).type_id
    llm = make(tiny_qwen2_path, merge=Q8, type_k=t, type_v=t)
    engine = llm._recall
    assert engine.store.k_format.store_type == gq.GGML_TYPE_Q8_0
    originals: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    real_put = engine.store.put

    def recording_put(positions, tokens, k, v):
        held = {int(p) for b in engine.store.blocks() for p in engine.store.get(b).positions}
        for i, p in enumerate(positions.tolist()):
            if p not in held:  # a position already held keeps its first rows
                originals[p] = (k[:, i].copy(), v[:, i].copy())
        real_put(positions, tokens, k, v)

    engine.store.put = recording_put
    toks = llm.tokenize(TEXT.encode())[:600]
    llm.eval(toks)
    q8_stats = llm.merge_stats()
    assert q8_stats.store_positions > 0

    b = engine.store.blocks()[0]
    before = engine.store.get(b)
    assert before.k.shape[-1] == 34 and before.v.shape[-1] == 34  # 32 values per cell row
    from edgemerge.recall.engine import _cell_rows

    assert _restore_block(engine, llm, b).blocks == 1
    _, state = engine.read_state()
    k, v = _cell_rows(state.stream)
    assert state.stream.v_trans and state.stream.layers[0].k_type == t
    idx = [int(np.flatnonzero(state.stream.positions == p)[0]) for p in before.positions]
    orig_k = np.stack([originals[p][0] for p in before.positions.tolist()], axis=1)
    orig_v = np.stack([originals[p][1] for p in before.positions.tolist()], axis=1)
    np.testing.assert_array_equal(k[:, idx], q8_round_trip(orig_k, t, 32))
    np.testing.assert_array_equal(v[:, idx], q8_round_trip(orig_v, t, 32))
    assert 0 < assert_within_q8_step(k[:, idx], orig_k, t, 32) <= 0.6
    assert_within_q8_step(v[:, idx], orig_v, t, 32)
    llm.eval(toks[:1] * 4)  # llama.cpp decodes on the restored cache
    import llama_cpp

    last = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    assert np.all(np.isfinite(np.ctypeslib.as_array(last, (llm.n_vocab(),))))

    # a new store_type on the live Llama re-encodes what is held
    llm.set_merge_settings(RECALL)
    row = gq.row_bytes(t, 32)
    assert all(engine.store.get(x).k.shape[-1] == row for x in engine.store.blocks())
    llm.close()

    plain = make(tiny_qwen2_path, type_k=t, type_v=t)
    plain.eval(toks)
    cache_stats = plain.merge_stats()
    plain.close()
    per_pos = [
        (st.store_ram_bytes + st.store_disk_bytes) / st.store_positions
        for st in (cache_stats, q8_stats)
    ]
    # 2 layers x (K + V) x 32 values: 64 bytes a row in f16 (128 in f32), 34 in q8_0
    assert per_pos == [2 * 2 * row, 2 * 2 * 34]
    assert per_pos[0] / per_pos[1] == pytest.approx(row / 34)


def test_q8_store_needs_rows_of_whole_q8_blocks(tmp_path_factory):
    from edgemerge.testing.tiny_models import write_tiny_model

    # one KV head of 16 values: K and V rows of 16, not a multiple of 32
    path = write_tiny_model(tmp_path_factory.mktemp("narrow") / "narrow.gguf", n_head_kv=1)
    with pytest.raises(SettingsError, match=r"store_type: 'q8_0' needs .* K rows hold 16 values"):
        make(path, merge=Q8)
    llm = make(path)  # the cache's own type has no such limit
    with pytest.raises(SettingsError, match="store_type"):
        llm.set_merge_settings(Q8)
    assert llm.merge_settings == RECALL and llm._recall.settings == RECALL
    llm.close()
