"""Smoke test of the fidelity harness (bench/fidelity.py) on a tiny random-weight model."""

from __future__ import annotations

import dataclasses
import gzip
import sys
from pathlib import Path

import llama_cpp  # conftest imported edgemerge first, so this is the patched libllama
import numpy as np
import pytest

from edgemerge.testing.tiny_models import write_tiny_model

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import fidelity  # noqa: E402
from _fidelity_config import FidelityConfig, Row  # noqa: E402
from _fidelity_report import render_markdown  # noqa: E402

from edgemerge.evaluation.scoring import Scorer, compressed_state, row_major_v  # noqa: E402
from edgemerge.evaluation.texts import Document, FidelityInputError, plain_context  # noqa: E402
from edgemerge.methods import get_method  # noqa: E402
from edgemerge.native.capture import capture_kv  # noqa: E402

SMALL_BLOCKMERGE = {"recent": 16, "block_size": 8}
ROWS = (
    Row("full", "full", budgets=(100,)),
    Row("quant q8_0", "quant", {"key_type": "q8_0"}, budgets=(100,)),
    Row("streaming_llm", "streaming_llm"),
    Row("blockmerge", "blockmerge", SMALL_BLOCKMERGE),
    Row("blockmerge, wide window", "blockmerge", {"recent": 200}),
    Row(
        "blockmerge, no bias",
        "blockmerge",
        {**SMALL_BLOCKMERGE, "attention_bias": False},
        group="ablation",
    ),
)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # llama arch: a 32K vocabulary keeps the output layer cheap; head size 32 fits q8_0
    path = tmp_path_factory.mktemp("fidelity") / "tiny-llama.gguf"
    return write_tiny_model(path, "llama", n_embd=128, n_head=4, n_head_kv=2)


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Document, Document]:
    root = tmp_path_factory.mktemp("texts")
    ledger = root / "ledger.txt"
    ledger.write_text(
        " ".join(f"Entry {i} of the ledger records {i * 7 % 13} crates." for i in range(120))
    )
    rivers = root / "rivers.txt.gz"
    rivers.write_bytes(gzip.compress(b"Rivers cut the hills into valleys over time. " * 120))
    return Document("ledger", ledger), Document("rivers", rivers)


@pytest.fixture(scope="module")
def config(docs: tuple[Document, Document]) -> FidelityConfig:
    ledger, rivers = docs
    return FidelityConfig(
        budgets=(100, 50),
        ablation_budgets=(50,),
        n_context=96,
        n_scored=16,
        n_passage=40,
        n_filler=50,
        n_repeat=12,
        n_obs=8,
        n_probe=8,
        plain_docs=(ledger,),
        recall_pairs=((ledger, rivers),),
        rows=ROWS,
        n_threads=2,
        n_batch=32,
    )


@pytest.fixture(scope="module")
def run(model: Path, config: FidelityConfig) -> fidelity.ModelRun:
    return fidelity.run_model(model, config, progress=False)


def test_contexts_continue_at_true_positions(run: fidelity.ModelRun) -> None:
    plain, recall = run.contexts
    assert (plain.kind, recall.kind) == ("plain", "recall")
    assert plain.prefix.shape[0] == 95 and plain.n_scored == 16 and plain.first_pos == 95
    # recall: BOS + 40 passage + 50 filler, the last one fed; the repeat is the passage start
    assert recall.prefix.shape[0] == 90 and recall.n_scored == 12
    assert np.array_equal(recall.feed[1:], recall.prefix[1:13])


def test_full_matches_an_uncompressed_run(model: Path, run: fidelity.ModelRun) -> None:
    """Restoring the full state and scoring the rest gives the NLL of one plain pass."""
    llm = llama_cpp.Llama(str(model), n_ctx=256, n_threads=2, verbose=False)
    with Scorer(llm._model.model, 256, n_batch=32, n_threads=2) as scorer:
        for ci, context in enumerate(run.contexts):
            direct = scorer.nll(None, context.tokens, 0)[-context.n_scored :].mean()
            full = run.results[("full", 100, ci)]
            assert full.n_cells == context.prefix.shape[0]
            assert np.all(full.attn_error == 0.0)
            assert full.nll == pytest.approx(direct, abs=5e-3)


def test_compressed_rows_are_measured(run: fidelity.ModelRun) -> None:
    for ci, context in enumerate(run.contexts):
        full = run.results[("full", 100, ci)]
        quant = run.results[("quant q8_0", 100, ci)]
        assert quant.n_cells == full.n_cells and 0 < quant.attn_error.max() < 0.05
        for label in ("streaming_llm", "blockmerge"):
            same = run.results[(label, 100, ci)]
            assert same.nll == full.nll  # at 100% every method keeps the cache as it is
            half = run.results[(label, 50, ci)]
            assert half.n_cells <= half.budget_cells == round(context.prefix.shape[0] / 2)
            assert half.attn_error.shape == (len(run.layers),)
            assert (half.attn_error > 0).all() and np.isfinite(half.nll)
        reason = run.results[("blockmerge, wide window", 50, ci)]
        assert isinstance(reason, str) and "needs at least" in reason
        assert isinstance(run.results[("blockmerge, no bias", 50, ci)], fidelity.Measurement)
        assert ("blockmerge, no bias", 100, ci) not in run.results


def test_bias_reaches_the_scored_model(model: Path, run: fidelity.ModelRun) -> None:
    """A state's per-cell bias changes what the restored model predicts."""
    context = run.contexts[0]
    llm = llama_cpp.Llama(str(model), n_ctx=256, n_threads=2, verbose=False)
    capture = capture_kv(llm, context.prefix, n_obs=4, n_batch=32, n_threads=2)
    base = row_major_v(capture.state)
    kept = get_method("full").compress(capture.snapshot, capture.snapshot.n_tok)
    bias = np.zeros(kept.n_cells, np.float32)
    bias[: kept.n_cells // 2] = 3.0  # the older half of the cells draws more attention
    weighted = dataclasses.replace(kept, bias=bias)
    with Scorer(llm._model.model, 256, n_batch=32, n_threads=2) as scorer:
        plain = scorer.nll(compressed_state(base, kept), context.feed, context.first_pos)
        biased = scorer.nll(compressed_state(base, weighted), context.feed, context.first_pos)
    assert plain.mean() == pytest.approx(run.results[("full", 100, 0)].nll, abs=1e-9)
    assert np.abs(biased - plain).max() > 1e-3


def test_report_has_every_table(run: fidelity.ModelRun, config: FidelityConfig) -> None:
    text = render_markdown(
        [run], config, command="python bench/fidelity.py x", machine="m", elapsed_s=3
    )
    assert "`python bench/fidelity.py x`" in text
    for title in ("(c) Recall NLL", "(b) Continuation NLL", "(a) Attention-output", "Ablations"):
        assert title in text
    full_recall = run.results[("full", 100, 1)].nll
    assert f"| full | {full_recall:.3f} | · |" in text
    assert "| blockmerge, wide window | " in text and "n/a: blockmerge, wide window at 50%" in text
    assert "recall NLL at 50%: blockmerge" in text  # the generated summary


def test_bad_inputs_are_named(tmp_path: Path, docs: tuple[Document, Document]) -> None:
    with pytest.raises(FidelityInputError, match="ledger.*fewer than"):
        plain_context(docs[0], str.split, [], 5000, 10)
    with pytest.raises(FidelityInputError, match="cannot read"):
        Document("missing", tmp_path / "nope.txt").read()
    with pytest.raises(FidelityInputError, match="percentages"):
        FidelityConfig(budgets=(0, 50))
    with pytest.raises(FidelityInputError, match="unique"):
        FidelityConfig(rows=(Row("a", "full"), Row("a", "h2o")))


def test_cli_flags_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    args = fidelity._parser().parse_args(["--quick", "--budgets", "100", "40", "--repeat", "99"])
    config = fidelity.config_from_args(args)
    assert config.budgets == (100, 40) and config.n_repeat == 99 and config.n_context == 1000
    assert fidelity.main(["--budgets", "150", "--no-progress"]) == 2
    assert "percentages in 1..100" in capsys.readouterr().err
