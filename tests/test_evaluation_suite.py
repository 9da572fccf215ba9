"""The evaluation suite (``edgemerge bench``) on a tiny random-weight model, end to end.

The tiny model's answers are noise, so these tests check the machinery: every row runs
in both modes through the real patched llama.cpp, budgets hold during streaming
prefill, restored states generate what an uncompressed run generates, and the report
and plots are written. The real models run in tests/test_evaluation_quick.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import llama_cpp  # conftest imported edgemerge first, so this is the patched libllama
import numpy as np
import pytest

from edgemerge.evaluation import memprobe, report, suite
from edgemerge.evaluation.scoring import Scorer, row_major_v
from edgemerge.evaluation.streaming import StreamingPrefill
from edgemerge.methods import CompressedKV, ExpectedAttention, KVSnapshot, get_method
from edgemerge.native.capture import capture_kv, model_layout
from edgemerge.native.kvstate import parse_seq_state, write_seq_state
from edgemerge.reference.rope import Rope
from edgemerge.testing.tiny_models import write_tiny_model
from tests_support import require_suite_texts

N_BATCH = 32
SMALL_RECENT = 24
ROWS = (
    suite.Row("full", "full", streaming="native", full_budget=True),
    suite.Row("q8_0 cache", "quant", {"key_type": "q8_0"}, "native", "q8_0", full_budget=True),
    suite.Row("streaming_llm", "streaming_llm"),
    suite.Row("h2o", "h2o"),
    suite.Row("snapkv", "snapkv"),
    suite.Row("expected_attention", "expected_attention", {"n_future": 64}),
    suite.Row("keydiff", "keydiff"),
    suite.Row(
        "blockmerge",
        "blockmerge",
        {"recent": SMALL_RECENT, "block_size": 8},
        "native",
        merge=True,
    ),
    suite.Row("blockmerge + q8_0", None, streaming="native", cache_type="q8_0", merge=True),
)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # head size 32 so that q8_0 caches work
    path = tmp_path_factory.mktemp("suite") / "tiny-llama.gguf"
    return write_tiny_model(path, "llama", n_embd=128, n_head=4, n_head_kv=2)


@pytest.fixture(scope="module")
def llm(model: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(model), n_ctx=256, n_threads=2, verbose=False)


@pytest.fixture(scope="module")
def config(model: Path) -> suite.SuiteConfig:
    return suite.SuiteConfig(
        models=(str(model),),
        budgets=(50,),
        rows=ROWS,
        n_context=320,
        passkey_depths=(0.5,),
        niah_lengths=(256,),
        niah_depths=(0.0, 1.0),
        n_multi_needle=1,
        n_lcc=1,
        n_recall=1,
        n_continuation=1,
        n_scored=16,
        n_batch=N_BATCH,
        n_obs=8,
        n_decode_probe=4,
        streaming_cases_per_task=1,
        streaming_rows=None,
        n_threads=2,
        rss=False,
        merge_recent=SMALL_RECENT,
    )


@pytest.fixture(scope="module")
def run(config: suite.SuiteConfig) -> suite.ModelResults:
    # the continuation, recall and needle cases read system texts (absent on macOS)
    require_suite_texts(config)
    calls = []
    out = suite.run_model(config.models[0], config, progress=lambda *a: calls.append(a))
    assert calls[-1][0] == calls[-1][1]  # the progress callback saw the end
    return out


def _prefix(llm: llama_cpp.Llama, n: int) -> np.ndarray:
    text = " ".join(f"Item {i} weighs {i * 3 % 17} grams." for i in range(200))
    return np.asarray(llm.tokenize(text.encode())[:n], np.int32)


def test_streaming_prefill_without_compression_is_the_capture(llm: llama_cpp.Llama) -> None:
    tokens = _prefix(llm, 100)
    capture = capture_kv(llm, tokens, n_obs=4, n_batch=N_BATCH, n_threads=2)
    with StreamingPrefill(llm, 256, n_batch=N_BATCH, n_obs=4, n_threads=2) as stream:
        res = stream.prefill(tokens, get_method("h2o"), budget=200)
    assert res.compressions == 0 and res.n_cells == 100 == res.peak_cells
    keys, values = parse_seq_state(res.state).keys_values(2)
    np.testing.assert_array_equal(keys, capture.keys)
    np.testing.assert_array_equal(values, capture.values)


@pytest.mark.parametrize(
    "name", ["streaming_llm", "h2o", "snapkv", "expected_attention", "keydiff", "kvmerger"]
)
def test_streaming_prefill_holds_the_budget(llm: llama_cpp.Llama, name: str) -> None:
    tokens = _prefix(llm, 230)
    budget = 96
    settings = {"threshold": 1.01} if name == "kvmerger" else {}
    with StreamingPrefill(llm, 256, n_batch=N_BATCH, n_obs=4, n_threads=2) as stream:
        res = stream.prefill(tokens, get_method(name, **settings), budget=budget)
    assert res.compressions >= 3
    assert res.n_cells <= budget and res.peak_cells <= budget
    state = parse_seq_state(res.state)
    positions = state.caches[0].stream.positions
    assert positions[-1] == 229 and np.all(np.diff(positions) > 0)
    if name == "streaming_llm":
        n_sink = get_method(name).n_sink
        assert positions[:n_sink].tolist() == list(range(n_sink))
        recent = positions[n_sink:]
        assert recent.tolist() == list(range(230 - recent.shape[0], 230))


def test_streaming_snapshots_carry_the_models_rope(llm: llama_cpp.Llama) -> None:
    """ExpectedAttention moves its query statistics with the model's RoPE: the streaming
    snapshots must carry it, and their last query must be the newest cell."""
    seen = []

    class Recording(ExpectedAttention):
        def compress(self, kv: KVSnapshot, budget: int) -> CompressedKV:
            seen.append((kv.rope, int(kv.query_positions[-1]), int(kv.positions[-1])))
            return super().compress(kv, budget)

    with StreamingPrefill(llm, 256, n_batch=N_BATCH, n_obs=4, n_threads=2) as stream:
        stream.prefill(_prefix(llm, 200), Recording(n_future=64, n_recent=8), budget=96)
    assert len(seen) >= 3
    for rope, last_query, last_cell in seen:
        assert rope == model_layout(llm.model).rope == Rope("norm", 32, 10_000.0)
        assert last_query == last_cell


def test_streaming_prefill_rejects_a_budget_that_cannot_take_a_chunk(llm: llama_cpp.Llama) -> None:
    with StreamingPrefill(llm, 256, n_batch=N_BATCH, n_threads=2) as stream:
        with pytest.raises(ValueError, match="raise the budget or lower n_batch"):
            stream.prefill(_prefix(llm, 200), get_method("streaming_llm"), budget=N_BATCH + 2)


def test_restored_state_generates_what_a_plain_run_generates(llm: llama_cpp.Llama) -> None:
    tokens = _prefix(llm, 120)
    context, query = tokens[:100], tokens[100:]
    capture = capture_kv(llm, context, n_obs=4, n_batch=N_BATCH, n_threads=2)
    state = write_seq_state(row_major_v(capture.state))
    with Scorer(llm._model.model, 256, n_batch=N_BATCH, n_threads=2) as scorer:
        restored = scorer.generate(state, query, 100, 12)
        plain = scorer.generate(None, tokens, 0, 12)
        stopped = scorer.generate(None, tokens, 0, 12, stop=frozenset([plain[3]]))
    assert restored == plain and len(plain) == 12
    assert stopped == plain[: plain.index(plain[3])]


def test_generate_and_force_scores_the_answer_after_the_prompt(llm: llama_cpp.Llama) -> None:
    tokens = _prefix(llm, 120)
    context, query, answer = tokens[:100], tokens[100:110], tokens[110:116]
    capture = capture_kv(llm, context, n_obs=4, n_batch=N_BATCH, n_threads=2)
    state = write_seq_state(row_major_v(capture.state))
    with Scorer(llm._model.model, 256, n_batch=N_BATCH, n_threads=2) as scorer:
        out, nll = scorer.generate_and_force(state, query, 100, 8, answer)
        greedy = scorer.generate(state, query, 100, 8)
        # the last query token and the answer, scored in one forward pass
        reference = scorer.nll(state, np.concatenate([query, answer]), 100)[-len(answer) :]
        one, one_nll = scorer.generate_and_force(state, query, 100, 8, answer[:1])
    assert out == greedy == one and len(out) == 8
    np.testing.assert_allclose(nll, reference, atol=2e-3)
    np.testing.assert_allclose(one_nll, reference[:1], atol=2e-3)


def test_every_row_runs_in_both_modes(run: suite.ModelResults, config: suite.SuiteConfig) -> None:
    have = {(r.row, r.mode, r.budget, r.case) for r in run.results}
    streamed = suite.streaming_cases(run.cases, config)
    assert sorted(run.cases[ci].task for ci in streamed) == sorted(set(suite.TASKS) - {"niah"})
    for ci, case in enumerate(run.cases):
        for row in ROWS:
            pcts = (100,) if row.full_budget else config.budgets
            for pct in pcts:
                if row.method is not None:
                    assert (row.label, "offline", pct, ci) in have
                in_streaming = (row.label, "streaming", pct, ci) in have
                assert in_streaming == (ci in streamed), (row.label, case.task)
    for r in run.results:
        assert math.isfinite(r.score) and r.kv_bytes > 0
        n = run.cases[r.case].prefix.shape[0]
        if r.budget < 100:
            # streaming rows may hold up to a chunk less than the budget, never more
            assert r.n_cells <= suite._budget_cells(r.budget, n)
        else:
            assert r.n_cells == n
    assert {c.task for c in run.cases} == set(suite.TASKS)


def test_full_rows_agree_across_modes(run: suite.ModelResults) -> None:
    """Offline full (captured without flash attention) and streaming full (native) cache
    the same tokens, so their NLLs differ only by attention-kernel rounding."""
    by_key = {(r.row, r.mode, r.case): r for r in run.results}
    for ci, case in enumerate(run.cases):
        if case.feed is None or ("full", "streaming", ci) not in by_key:
            continue
        off, on = by_key[("full", "offline", ci)], by_key[("full", "streaming", ci)]
        assert on.score == pytest.approx(off.score, rel=2e-3)


def test_q8_0_rows_use_fewer_bytes(run: suite.ModelResults, config: suite.SuiteConfig) -> None:
    by_key = {(r.row, r.mode, r.case): r for r in run.results if r.budget in (100, 50)}
    for ci in suite.streaming_cases(run.cases, config):
        full = by_key[("full", "streaming", ci)].kv_bytes
        assert by_key[("q8_0 cache", "streaming", ci)].kv_bytes == pytest.approx(
            full * 34 / 64, rel=1e-6
        )
        assert by_key[("blockmerge + q8_0", "streaming", ci)].kv_bytes < full * 0.3


def test_speed_rows(run: suite.ModelResults) -> None:
    labels = {(s.row, s.budget) for s in run.speeds}
    assert labels == {
        ("full", 100),
        ("q8_0 cache", 100),
        ("blockmerge", 50),
        ("blockmerge + q8_0", 50),
    }
    for s in run.speeds:
        assert s.prefill_tok_s > 0 and s.decode_tok_s > 0 and 0 <= s.merge_share < 1
        assert 0 < s.kv_bytes <= s.kv_allocated and s.peak_rss is None
    merging = [s for s in run.speeds if s.row == "blockmerge"][0]
    assert merging.merge_share > 0


def test_memory_probe_in_a_child(model: Path, llm: llama_cpp.Llama) -> None:
    probe = memprobe.Probe(
        str(model), "f16", 256, N_BATCH, 2, None, _prefix(llm, 100).tolist(), 3, SMALL_RECENT
    )
    measured = memprobe.run_in_child(probe)
    assert measured.cells == 103 and measured.peak_rss > 10 << 20
    bad = memprobe.Probe(
        str(model) + ".missing", "f16", 256, N_BATCH, 2, None, [1, 2], 1, SMALL_RECENT
    )
    with pytest.raises(RuntimeError, match="memory probe failed"):
        memprobe.run_in_child(bad)


def test_report_and_plots(
    run: suite.ModelResults, config: suite.SuiteConfig, tmp_path: Path
) -> None:
    plots = report.plot_model(run, config, tmp_path)
    assert set(plots) == {"offline", "streaming", "niah"}
    for name in plots.values():
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    text = report.render(
        [run], config, command="edgemerge bench", machine="m", plots={run.model: plots}
    )
    for heading in (
        "offline: mean score relative to full",
        "streaming: score per task",
        "Equal bytes",
        "Speed and memory",
    ):
        assert heading in text
    scores = report.task_scores(run)
    for task in suite.TASKS:
        rel = report.relative(scores, "full", "offline", 100, task)
        assert math.isnan(rel) or rel == pytest.approx(1.0)
    assert any("blockmerge" in line for line in report.verdicts(run, config))


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="budgets"):
        suite.SuiteConfig(budgets=(0,))
    with pytest.raises(ValueError, match="modes"):
        suite.SuiteConfig(modes=("online",))
    with pytest.raises(ValueError, match="model"):
        suite.SuiteConfig(models=())
