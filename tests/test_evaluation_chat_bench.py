"""The chat-memory bench: rows through edgemerge.Llama, the resumable cache, the table.

On the tiny model the answers are noise; these tests check the machinery: every row
runs on the same cases, a rerun takes every result from the cache, a changed setting
is a new job, a torn cache line is skipped, and the table pairs each row with full.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import llama_cpp
import pytest

from edgemerge.evaluation import bench_cli
from edgemerge.evaluation import chat_bench as cb
from edgemerge.evaluation import chat_memory as cm


def _rows(*labels: str) -> tuple[cb.ChatRow, ...]:
    return tuple(r for r in cb.ROWS if r.label in labels)


@pytest.fixture(scope="module")
def config(tiny_qwen2_path: Path) -> cb.ChatBenchConfig:
    return cb.ChatBenchConfig(
        model=str(tiny_qwen2_path),
        split="dev",
        n=2,
        lengths=(1024,),
        budgets=(40,),
        rows=_rows("full", "evict", "blockmerge+recall"),
        merge=(("recent", 64), ("sinks", 4)),
        n_batch=64,
        n_threads=2,
    )


@pytest.fixture(scope="module")
def tokenize(tiny_qwen2_path: Path):  # noqa: ANN201
    llm = llama_cpp.Llama(str(tiny_qwen2_path), vocab_only=True, verbose=False)
    return lambda text: llm.tokenize(text.encode(), add_bos=False, special=False)


def test_run_resume_and_table(config: cb.ChatBenchConfig, tokenize, tmp_path: Path) -> None:  # noqa: ANN001
    path = tmp_path / "results.jsonl"
    seen: list[tuple[int, int]] = []
    cases, jobs = cb.run(
        config,
        cb.ResultCache(path),
        tokenize=tokenize,
        progress=lambda d, t, _: seen.append((d, t)),
    )
    assert len(cases) == 2 and len(jobs) == 2 * 3
    assert seen[-1] == (6, 6)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 6
    by_row = {}
    for r in records:
        by_row.setdefault(r["row"], []).append(r)
    for r in by_row["full"]:
        assert r["budget"] is None and r["final_cells"] == r["prompt_tokens"]
    for r in by_row["evict"] + by_row["blockmerge+recall"]:
        cells = cb.budget_cells(40, next(c for c in cases if c.label == r["case"]))
        # the budget plus its slack (64 cells) holds after every turn
        assert r["budget"] == 40 and r["peak_cells"] <= cells + 64 < r["prompt_tokens"]
        assert r["peak_kv_bytes"] == r["peak_cells"] * r["kv_bytes"] // r["final_cells"]
    assert all(r["merges"] == 0 for r in by_row["evict"])
    assert all(r["cells_evicted"] > 0 for r in by_row["evict"])
    assert all(r["store_positions"] > 0 for r in by_row["blockmerge+recall"])

    # a rerun finds everything in the cache: nothing is appended
    cb.run(config, cb.ResultCache(path), tokenize=tokenize)
    assert len(path.read_text().splitlines()) == 6

    cache = cb.ResultCache(path)
    summaries = cb.summarise(config, jobs, cache)
    assert [s.name for s in summaries] == ["full", "evict @40%", "blockmerge+recall @40%"]
    assert all(s.correct.size == 2 for s in summaries)
    text = cb.render(config, summaries, "cmd", "machine")
    assert "| full | " in text and "blockmerge+recall @40%" in text
    # the product row is paired with the equal-cells baseline, with a verdict
    assert re.search(r"\| (beats|ties|loses) evict @40%: [+-]\d", text)
    assert "Equal bytes" in text and "MiB per 1K tokens" in text

    # a torn last line (a killed run) is skipped, and that job runs again
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    assert len(cb.ResultCache(path).records) == 5
    # only the cases every row finished are tabled
    partial = cb.summarise(config, jobs, cb.ResultCache(path))
    assert all(s.correct.size == 1 for s in partial)


def test_a_changed_setting_is_a_new_job(config: cb.ChatBenchConfig, tokenize) -> None:  # noqa: ANN001
    cases = cm.cases("dev", 1, [1024], tokenize=tokenize)
    a = cb.jobs(config, cases)
    b = cb.jobs(dataclasses.replace(config, merge=(("recent", 96), ("sinks", 4))), cases)
    full_a = [j.key(config) for j in a if j.row.full]
    full_b = [j.key(config) for j in b if j.row.full]
    assert full_a == full_b  # the full row does not merge, so its key ignores merge fields
    assert {j.key(config) for j in a if not j.row.full}.isdisjoint(
        j.key(config) for j in b if not j.row.full
    )


def _args(**kw: object) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    bench_cli.add_arguments(ap)
    argv = ["--task", "chat-memory"]
    for k, v in kw.items():
        argv += [f"--{k}", *map(str, v if isinstance(v, (list, tuple)) else [v])]
    return ap.parse_args(argv)


def test_cli_flags_build_the_config() -> None:
    config = cb.config_from_args(_args(cases=3, lengths=[2048, 8192], budgets=[25]), ())
    assert (config.n, config.lengths, config.budgets) == (3, (2048, 8192), (25,))
    quick = cb.config_from_args(_quick(), ())
    assert quick.n == 2 and {r.label for r in quick.rows} == set(cb.QUICK_ROWS)
    with pytest.raises(ValueError, match="no row nope"):
        cb.config_from_args(_args(rows=["full", "nope"]), ())
    with pytest.raises(ValueError, match="keep it"):
        cb.config_from_args(_args(rows=["evict"]), ())
    with pytest.raises(ValueError, match="one model"):
        cb.config_from_args(_args(models=["a", "b"]), ())


def _quick() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    bench_cli.add_arguments(ap)
    return ap.parse_args(["--task", "chat-memory", "--quick"])


def test_bench_cli_rejects_a_bad_merge_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_cli.main(["--task", "chat-memory", "--merge", "nope=1"]) == 2
    assert "nope" in capsys.readouterr().err


def test_cell_budgets_and_decode_speed(
    config: cb.ChatBenchConfig, tokenize, tmp_path: Path
) -> None:  # noqa: ANN001
    cells = dataclasses.replace(
        config,
        n=1,
        budgets=(300, 100),
        budget_unit="cells",
        decode_steps=4,
        rows=_rows("full", "blockmerge"),
    )
    cache = cb.ResultCache(tmp_path / "cells.jsonl")
    _, jobs = cb.run(cells, cache, tokenize=tokenize)
    merged = next(
        r for r in cache.records.values() if r["row"] == "blockmerge" and r["budget"] == 300
    )
    assert merged["budget"] == 300 and merged["peak_cells"] <= 300 + 64
    assert all(r["decode_tok_s"] > 0 for r in cache.records.values() if "error" not in r)
    summaries = cb.summarise(cells, jobs, cache)
    text = cb.render(cells, summaries, "cmd", "machine")
    assert "blockmerge @300 cells" in text and "budgets in cells" in text
    # 100 cells cannot hold a 64-token batch on top of sinks + recent: recorded, left out
    assert [s.name for s in summaries] == ["full", "blockmerge @300 cells"]
    (line,) = cb.infeasible(cells, jobs, cache)
    assert line.startswith("- blockmerge @100 cells: not run (budget: 100 leaves")


def test_every_merging_row_says_whether_it_recalls() -> None:
    # a row's meaning (and its cached results) must not follow a changed default
    for row in cb.ROWS:
        if row.merge is not None:
            assert isinstance(row.merge.get("recall"), bool), row.label
            assert row.merge["recall"] == ("recall" in row.label), row.label


def test_cache_file_names_keep_the_model_name_whole() -> None:
    # "qwen2.5-coder-0.5b" once lost ".5b" to Path.stem, so two such names would share one file
    a = cb.default_cache(cb.ChatBenchConfig(model="qwen2.5-coder-0.5b"))
    b = cb.default_cache(
        cb.ChatBenchConfig(model="/models/qwen2.5-coder-0.5b.gguf", split="confirm")
    )
    assert a.name == "chat_memory-qwen2.5-coder-0.5b-dev.jsonl"
    assert b.name == "chat_memory-qwen2.5-coder-0.5b-confirm.jsonl"


def test_the_default_row_runs_the_default_settings() -> None:
    from edgemerge.settings import MergeSettings

    (row,) = _rows(cb.DEFAULT_ROW)
    assert row.product and row.merge is not None
    assert MergeSettings.from_dict({**row.merge, "budget": 512}) == MergeSettings(budget=512)


def _summary(label: str, budget: int | None, correct: list[float], nll: list[float]):  # noqa: ANN202
    import numpy as np

    (row,) = _rows(label)
    return cb.RowSummary(row, budget, np.array(correct), np.array(nll), 1.0, 1.0, ())


def test_product_rows_are_paired_with_the_default_at_their_budget() -> None:
    summaries = [
        _summary("full", None, [1, 1, 1, 1], [0.1, 0.1, 0.2, 0.1]),
        _summary("evict", 25, [0, 0, 1, 0], [3.0, 3.1, 0.4, 2.9]),
        _summary("evict+recall", 25, [1, 1, 1, 1], [0.1, 0.2, 0.1, 0.1]),
        _summary("evict+recall", 40, [1, 1, 1, 1], [0.1, 0.2, 0.1, 0.1]),
        _summary(cb.DEFAULT_ROW, 25, [1, 0, 1, 0], [0.9, 1.2, 1.0, 1.1]),
    ]
    lines = cb.against_default(summaries, seed=0)
    # only the product row with a default at its budget; the baseline and full are not paired
    (pair,) = [line for line in lines if line.startswith("- ")]
    assert pair.startswith("- evict+recall @25%: Δacc +0.50 [")
    assert pair.endswith(f"by NLL it beats {cb.DEFAULT_ROW} @25%")
    assert cb.against_default(summaries[:4], seed=0) == []


def test_a_job_key_holds_the_resolved_settings(config: cb.ChatBenchConfig, tokenize) -> None:  # noqa: ANN001
    from edgemerge.settings import MergeSettings

    (case,) = cm.cases("dev", 1, [1024], tokenize=tokenize)
    (row,) = _rows("blockmerge+recall")
    default_window = MergeSettings().recall_window

    def key(**fields: object) -> str:
        return cb.Job(case, row, 25, {"recall": True, "budget": 300, **fields}).key(config)

    # naming a field at its default is the same job; another value is a new one, so a
    # changed default can never reuse results measured under the old one
    assert key() == key(recall_window=default_window)
    assert key() != key(recall_window=default_window + 8)
