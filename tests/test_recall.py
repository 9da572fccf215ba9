"""Recall: the block store, the query capture, scoring, and restores on the real runtime."""

from __future__ import annotations

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
    StoreWarning,
    attention_shares,
    choose_blocks,
)

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


# -- scoring ---------------------------------------------------------------------------


def _shares_by_loops(q, scale, ck, cb, sk, starts):
    """The rule of edgemerge.recall.scoring, one query head and query at a time."""
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
    blocks, cells = attention_shares(q, 0.35, ck, cb, sk, starts)
    want_b, want_c = _shares_by_loops(q, 0.35, ck, cb, sk, starts)
    assert np.all(np.isfinite(blocks)) and np.all(np.isfinite(cells))
    np.testing.assert_allclose(blocks, want_b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cells, want_c, rtol=1e-4, atol=1e-6)


def test_choose_blocks_takes_the_best_above_threshold():
    score = np.array([0.1, 0.5, 0.0, 0.3, 0.2])
    assert choose_blocks(score, 2, 0.0).tolist() == [1, 3]
    assert choose_blocks(score, 10, 0.25).tolist() == [1, 3]
    assert choose_blocks(np.zeros(3), 2, 0.0).tolist() == []


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
    assert MergeSettings.from_dict(RECALL.to_dict()) == RECALL


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
    words = TEXT.split()
    messages = []
    for turn in range(turns):
        messages.append({"role": "user", "content": " ".join(words[turn * 50 : turn * 50 + 50])})
        out = llm.create_chat_completion(messages=messages, max_tokens=6, temperature=0)
        messages.append(out["choices"][0]["message"])
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

    result = _restore_block(engine, llm, b)
    assert result.blocks == 1
    _, state = engine.read_state()
    k, v = _cell_rows(state.stream)
    idx = [int(np.flatnonzero(state.stream.positions == p)[0]) for p in before.positions]
    np.testing.assert_array_equal(k[:, idx], before.k)
    np.testing.assert_array_equal(v[:, idx], before.v)
    assert len(kvcells.list_cells(llm)) <= RECALL.budget_cells(llm.n_tokens)
    llm.close()


def _restore_block(engine, llm, block):
    """Recall with scores rigged so that exactly ``block`` wins."""
    import edgemerge.recall.engine as eng

    real = eng.attention_shares

    def rigged(q, scale, ck, cb, sk, starts):
        bscore, cscore = real(q, scale, ck, cb, sk, starts)
        order = engine.store.blocks()
        bscore = np.where(np.array(order) == block, 1.0, 0.0).astype(np.float32)
        return bscore, cscore

    eng.attention_shares = rigged
    try:
        return engine.recall(llm.input_ids, llm.n_tokens, RECALL.budget_cells(llm.n_tokens))
    finally:
        eng.attention_shares = real


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


def test_recall_off_has_no_store_and_the_same_stats_fields(tiny_qwen2_path):
    off = MergeSettings(**{**RECALL.to_dict(), "recall": False})
    llm = make(tiny_qwen2_path, merge=off)
    llm.eval(llm.tokenize(TEXT.encode())[:400])
    st = llm.merge_stats()
    assert llm._recall is None and st.store_positions == 0 and st.recall_turns == 0
    llm.set_merge_settings(RECALL)
    assert llm._recall is not None
    llm.close()
