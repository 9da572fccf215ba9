"""edgemerge.Llama: a bounded cache under a growing context, on the real patched runtime."""

from __future__ import annotations

import dataclasses

import llama_cpp
import numpy as np
import pytest

from edgemerge import Llama, MergeSettings, SettingsError
from edgemerge.merging.planner import BudgetError
from edgemerge.native import kvcells
from tests_support import english_text

N_CTX = 256
SMALL = MergeSettings(budget=160, sinks=4, recent=32, block_size=8, slack=16)
TEXT = english_text().encode()  # real prose, present on every machine


def make(path, merge=SMALL, **kw):
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


def chat_until(llm, logical: int, max_turns: int = 40) -> int:
    """Chat turn after turn until the sequence holds `logical` tokens; returns the turns."""
    messages = []
    words = TEXT.decode().split()
    for turn in range(max_turns):
        chunk = " ".join(words[turn * 60 : (turn + 1) * 60])
        messages.append({"role": "user", "content": chunk})
        out = llm.create_chat_completion(messages=messages, max_tokens=12, temperature=0)
        messages.append(out["choices"][0]["message"])
        if llm.n_tokens >= logical:
            return turn + 1
    raise AssertionError(f"only reached {llm.n_tokens} tokens")


def test_conversation_four_times_the_cache_runs_with_merging(tiny_qwen2_path):
    llm = make(tiny_qwen2_path)
    chat_until(llm, 4 * N_CTX)
    st = llm.merge_stats()
    assert st.logical_tokens >= 4 * N_CTX
    assert st.cells <= N_CTX
    assert st.merges > 0 and st.compressions > 0
    # the stats add up
    assert st.cells == len(kvcells.list_cells(llm))
    assert st.kv_bytes == st.cells * st.bytes_per_cell
    assert st.bytes_saved == st.logical_tokens * st.bytes_per_cell - st.kv_bytes
    assert st.merge_time_s > 0 and st.eval_time_s >= st.merge_time_s
    assert 0.0 <= st.mean_merge_error <= SMALL.max_merge_error


def test_without_merging_the_same_conversation_fails_clearly(tiny_qwen2_path):
    llm = make(tiny_qwen2_path, merge=None)
    with pytest.raises(ValueError, match="exceed context window"):
        chat_until(llm, 4 * N_CTX)


def test_cells_account_for_every_token_after_a_long_eval(tiny_qwen2_path):
    # merging's own accounting: recall would bring cells back and evict others
    llm = make(tiny_qwen2_path, merge=dataclasses.replace(SMALL, recall=False))
    toks = llm.tokenize(TEXT)[:900]
    llm.eval(toks)
    st = llm.merge_stats()
    cells = kvcells.list_cells(llm)
    assert st.logical_tokens == 900
    assert st.cells == len(cells) == 900 - st.cells_merged - st.cells_evicted
    # spans are disjoint and ordered, sinks and the recent window are untouched
    assert np.all(cells.span_min[1:] > cells.span_max[:-1])
    assert list(cells.pos[: SMALL.sinks]) == list(range(SMALL.sinks))
    assert list(cells.pos[-SMALL.recent :]) == list(range(900 - SMALL.recent, 900))
    merged = cells.span_max > cells.span_min
    assert merged.any()
    # a merged cell carries log(tokens it stands for) when nothing inside it was evicted
    width = cells.span_max[merged] - cells.span_min[merged] + 1
    assert np.all(cells.bias[merged] <= np.log(width) + 1e-5)


def test_merge_none_is_byte_identical_to_llama_cpp(tiny_qwen2_path):
    kw = {"n_ctx": N_CTX, "n_threads": 1, "n_threads_batch": 1, "seed": 11, "verbose": False}
    ours = Llama(str(tiny_qwen2_path), merge=None, **kw)
    stock = llama_cpp.Llama(str(tiny_qwen2_path), **kw)
    prompt = "Once upon a time"
    a = ours.create_completion(prompt, max_tokens=24, temperature=0.8, seed=5)
    b = stock.create_completion(prompt, max_tokens=24, temperature=0.8, seed=5)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["usage"] == b["usage"]


def test_prefix_reuse_never_keeps_half_a_merged_cell(tiny_qwen2_path):
    llm = make(tiny_qwen2_path)
    toks = llm.tokenize(TEXT)[:600]
    llm.eval(toks)
    cells = kvcells.list_cells(llm)
    wide = np.flatnonzero(cells.span_max - cells.span_min >= 1)
    assert wide.size, "no merged cell to cut into"
    lo = int(cells.span_min[wide[-1]])
    cut = lo + 1  # a prompt sharing the first `cut` tokens: the reuse cuts the merged cell
    llm.create_completion(
        toks[:cut] + llm.tokenize(b" again", add_bos=False), max_tokens=1, temperature=0
    )
    after = kvcells.list_cells(llm)
    # every position from lo on was evaluated afresh: plain cells, nothing spans past them
    fresh = after.pos >= lo
    assert np.all(after.span_min[fresh] == after.pos[fresh])
    assert np.all(after.bias[fresh] == 0)
    assert np.all(after.span_max[~fresh] < lo)
    assert set(range(lo, cut)) <= set(after.pos.tolist())


def test_saved_state_restores_the_merged_cache(tiny_qwen2_path):
    llm = make(tiny_qwen2_path)
    toks = llm.tokenize(TEXT)[:500]
    llm.eval(toks)
    state = llm.save_state()
    cells = kvcells.list_cells(llm)
    first = llm.create_completion(toks[-20:], max_tokens=8, temperature=0)["choices"][0]["text"]
    llm.load_state(state)
    again = kvcells.list_cells(llm)
    np.testing.assert_array_equal(cells.pos, again.pos)
    np.testing.assert_array_equal(cells.bias, again.bias)
    llm.eval([])  # nothing to do, but the bookkeeping must accept the restored state
    second = llm.create_completion(toks[-20:], max_tokens=8, temperature=0)["choices"][0]["text"]
    assert first == second


@pytest.mark.parametrize(
    "merge,kw,message",
    [
        (MergeSettings(budget=1000), {}, "do not fit the physical cache"),
        (MergeSettings(budget=64, recent=32, sinks=4), {}, "fewer than sinks \\+ recent"),
        (SMALL, {"logits_all": True}, "logits_all"),
        (
            MergeSettings(budget=160, threshold="calibrated", recent=32, sinks=4),
            {},
            "carries no edgemerge calibration",
        ),
    ],
)
def test_impossible_settings_fail_at_construction(tiny_qwen2_path, merge, kw, message):
    with pytest.raises(SettingsError, match=message):
        make(tiny_qwen2_path, merge=merge, **kw)


def test_no_eviction_raises_when_merging_cannot_meet_the_budget(tiny_qwen2_path):
    strict = MergeSettings(
        budget=160,
        sinks=4,
        recent=32,
        block_size=8,
        slack=16,
        max_merge_error=1e-6,
        eviction="none",
    )
    llm = make(tiny_qwen2_path, merge=strict)
    with pytest.raises(BudgetError, match="over its budget"):
        llm.eval(llm.tokenize(TEXT)[:400])


def test_merge_stats_need_merging(tiny_qwen2_path):
    with pytest.raises(SettingsError, match="merge_stats"):
        make(tiny_qwen2_path, merge=None).merge_stats()


def test_a_rewind_into_an_evicted_stretch_evaluates_it_again(tiny_qwen2_path):
    """A new prompt sharing only a few leading tokens with a context whose middle was
    evicted: the cut leaves the sinks, and the positions between them and the cut are
    evaluated again (llama.cpp refuses a batch that skips positions)."""
    llm = make(tiny_qwen2_path)
    toks = llm.tokenize(TEXT)[:700]
    llm.eval(toks)
    assert llm.merge_stats().cells_evicted > 0
    shared = SMALL.sinks + 6  # past the sinks, inside the evicted stretch
    other = toks[:shared] + llm.tokenize(TEXT)[2000:2020]
    llm.create_completion(other, max_tokens=1, temperature=0)
    after = kvcells.list_cells(llm)
    assert set(range(SMALL.sinks, shared)) <= set(after.pos.tolist())
    assert llm.input_ids[: len(other)].tolist() == other


def test_a_long_reply_recalls_every_recall_every_decoded_tokens(tiny_qwen2_path):
    every, window = 24, 8
    merge = dataclasses.replace(
        SMALL,
        recall=True,
        recall_window=window,
        recall_blocks=4,
        recall_reeval=8,
        recall_every=every,
    )
    llm = make(tiny_qwen2_path, merge=merge)
    tokens = llm.tokenize(TEXT[:8000], add_bos=True)
    prompt, reply = tokens[:400], tokens[400 : 400 + 3 * every + 5]
    try:
        llm.eval(prompt)
        assert llm.merge_stats().recall_turns == 1 and llm.merge_stats().reply_recalls == 0
        armed = []
        for token in reply[: 3 * every]:
            llm.eval([token])
            armed.append(llm._recall.capture.armed)
            assert len(kvcells.list_cells(llm)) <= merge.budget + merge.slack
        st = llm.merge_stats()
        assert st.reply_recalls == 3 and st.recall_turns == 4
        # the capture holds the last `window` decodes before each recall, and only those
        want = [every - window <= k % every < every - 1 for k in range(3 * every)]
        assert armed == want
        # a rewind starts the count again: 5 decodes then recall nothing new
        llm.n_tokens -= 3
        for token in reply[3 * every - 3 : 3 * every + 2]:
            llm.eval([token])
        assert llm.merge_stats().reply_recalls == 3
        # a new prompt starts it again too and runs its own recall
        llm.eval(reply[3 * every + 2 :] + tokens[600:620])
        assert llm.merge_stats().recall_turns == 5 and not llm._recall.capture.armed
    finally:
        llm.close()


def test_recall_every_is_checked_against_the_window():
    with pytest.raises(SettingsError, match="recall_every"):
        MergeSettings(recall_window=16, recall_every=8)
    assert MergeSettings(recall_window=16, recall_every=16).recall_every == 16
    assert MergeSettings().recall_every == 0
