"""Retrieval on the product's path: the cases of both splits, questions asked of an
edgemerge.Llama (recall on), and the bench's per-task tables.

On the tiny model the answers are noise; these tests check the machinery: splits draw
from other documents and seeds, each of a case's questions is answered from the state
the context left (as a fresh run asking only that question answers it), the budget
holds, and the bench caches, keys and tables its jobs per task.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

import edgemerge
from edgemerge.evaluation import bench_cli, retrieval, tasks
from edgemerge.evaluation import chat_bench as cb
from edgemerge.evaluation.texts import FidelityInputError
from edgemerge.settings import MergeSettings
from tests_support import require_documents


@pytest.fixture(scope="module")
def vocab(tiny_qwen2_path: Path):  # noqa: ANN201
    llm = llama_cpp.Llama(str(tiny_qwen2_path), vocab_only=True, verbose=False)
    tokenize = lambda text: llm.tokenize(text.encode(), add_bos=False, special=False)  # noqa: E731
    return tokenize, llm.tokenize(b"", add_bos=True, special=False)


@pytest.fixture(autouse=True)
def _documents() -> None:
    require_documents(
        retrieval._FILLER["dev"][:1]
        + retrieval._FILLER["confirm"][:1]
        + retrieval._PASSAGES["dev"]
        + retrieval._PASSAGES["confirm"]
    )


def _cases(vocab, split: str = "dev", **kw: object) -> list[retrieval.RetrievalCase]:  # noqa: ANN001
    tokenize, bos = vocab
    args = {"n": 2, "lengths": [768], **kw}
    return retrieval.cases(split, tokenize=tokenize, bos=bos, **args)  # type: ignore[arg-type]


def test_cases_per_task_and_split(vocab) -> None:  # noqa: ANN001
    dev = _cases(vocab)
    tasks = ["passkey"] * 2 + ["niah"] * 2 + ["multi_needle"] * 2 + ["repeat"] * 2
    assert [c.task for c in dev] == tasks
    assert all(c.context.shape == (768,) and c.n_tokens == 768 for c in dev)
    assert [len(c.queries) for c in dev] == [1, 1, 1, 1, 4, 4, 1, 1]
    assert len({c.label for c in dev}) == len(dev)
    again = _cases(vocab)
    assert all(np.array_equal(a.context, b.context) for a, b in zip(dev, again, strict=True))
    confirm = _cases(vocab, "confirm")
    assert not {c.seed for c in dev} & {c.seed for c in confirm}
    # other documents: the haystacks share no 32-token run
    runs = {tuple(c.context[i : i + 32]) for c in dev for i in range(40, 700, 16)}
    assert not any(tuple(c.context[i : i + 32]) in runs for c in confirm for i in range(40, 700, 7))
    assert [c.task for c in _cases(vocab, task_names=["niah"])] == ["niah"] * 2


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"task_names": ["lcc"]}, "retrieval tasks"),
        ({"n": 0}, "n must be"),
        ({"seed": -1}, "seed must be"),
    ],
)
def test_bad_arguments_are_named(vocab, kw: dict, match: str) -> None:  # noqa: ANN001
    with pytest.raises(FidelityInputError, match=match):
        _cases(vocab, **kw)
    with pytest.raises(FidelityInputError, match="split"):
        _cases(vocab, "test")


def test_a_repeat_case_asks_for_its_passage_back(vocab) -> None:  # noqa: ANN001
    for split in ("dev", "confirm"):
        for case in _cases(vocab, split, task_names=["repeat"]):
            (query,) = case.queries
            n, n_cue = tasks.NEW_TOKENS["repeat"], tasks.REPEAT_CUE
            assert query.scorer == "tokens" and query.answer_tokens.shape == (n,)
            cue = query.tokens[-n_cue:]
            # the cue and the answer are the passage as the context holds it, in order
            starts = [
                i
                for i in range(case.n_tokens - n - n_cue)
                if np.array_equal(case.context[i : i + n_cue], cue)
            ]
            assert starts, case.label
            i = starts[0] + n_cue
            np.testing.assert_array_equal(case.context[i : i + n], query.answer_tokens)
            assert query.answer.endswith("(stdlib)")  # the passage's document


def _llm(path: Path, merge: MergeSettings | None, n_ctx: int) -> edgemerge.Llama:
    return edgemerge.Llama(
        str(path), n_ctx=n_ctx, n_batch=64, n_ubatch=64, n_threads=2, merge=merge, verbose=False
    )


def test_each_question_is_asked_of_the_state_the_context_left(tiny_qwen2_path: Path, vocab) -> None:  # noqa: ANN001
    case = next(c for c in _cases(vocab, n=1) if c.task == "multi_needle")
    merge = MergeSettings(budget=300, recent=64, sinks=4, recall=True)
    llm = _llm(tiny_qwen2_path, merge, 512)
    try:
        result = retrieval.run_retrieval(llm, case)
        stats = llm.merge_stats()
    finally:
        llm.close()
    assert stats.store_positions > 0 and stats.recall_turns >= len(case.queries)
    assert result.peak_cells <= 300 + merge.slack
    assert result.prompt_tokens == case.n_tokens + case.queries[0].tokens.shape[0]
    assert 0.0 <= result.correct <= 1.0 and np.isfinite(result.answer_nll)
    # asking one question of a fresh run gives what the four-question run gave it
    replies, nlls = [], []
    for query in case.queries:
        alone = _llm(tiny_qwen2_path, merge, 512)
        try:
            one = retrieval.run_retrieval(alone, dataclasses.replace(case, queries=(query,)))
        finally:
            alone.close()
        replies.append(one.reply)
        nlls.append(one.answer_nll)
    assert result.reply.split(" | ") == replies
    assert result.answer_nll == pytest.approx(float(np.mean(nlls)), abs=1e-4)


def test_the_full_cache_keeps_every_token(tiny_qwen2_path: Path, vocab) -> None:  # noqa: ANN001
    case = _cases(vocab, n=1)[0]
    llm = _llm(tiny_qwen2_path, None, 1024)
    try:
        result = retrieval.run_retrieval(llm, case)
    finally:
        llm.close()
    assert result.final_cells == result.prompt_tokens  # rewound to the question's end
    assert result.kv_bytes > 0 and result.correct in (0.0, 1.0)


def test_the_bench_runs_caches_and_tables_per_task(
    tiny_qwen2_path: Path, vocab, tmp_path: Path
) -> None:  # noqa: ANN001
    tokenize, bos = vocab
    config = cb.ChatBenchConfig(
        task="retrieval",
        model=str(tiny_qwen2_path),
        n=1,
        lengths=(640,),
        budgets=(50,),
        retrieval_tasks=("passkey", "multi_needle"),
        rows=tuple(r for r in cb.ROWS if r.label in ("full", "blockmerge+recall")),
        merge=(("recent", 64), ("sinks", 4)),
        n_batch=64,
        n_threads=2,
    )
    path = tmp_path / "r.jsonl"
    cases, jobs = cb.run(config, cb.ResultCache(path), tokenize=tokenize, bos=bos)
    assert len(cases) == 2 and len(jobs) == 4
    assert len(path.read_text().splitlines()) == 4
    cb.run(config, cb.ResultCache(path), tokenize=tokenize, bos=bos)
    assert len(path.read_text().splitlines()) == 4  # all from the cache
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["row"] for r in records} == {"full", "blockmerge+recall"}
    cache = cb.ResultCache(path)
    mine = [j for j in jobs if j.case.task == "multi_needle"]
    text = cb.render(config, cb.summarise(config, mine, cache), "cmd", "m", "multi_needle")
    assert "### Retrieval, multi_needle" in text and "4 needles at 4 evenly spaced" in text
    assert "| blockmerge+recall @50% |" in text
    # another context (same label) is another job
    moved = dataclasses.replace(cases[0], context=cases[0].context[::-1].copy())
    a, b = (cb.jobs(config, [c])[0].key(config) for c in (cases[0], moved))
    assert a != b
    assert cb.default_cache(config).name.startswith("retrieval-")


def _parse(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    bench_cli.add_arguments(ap)
    return ap.parse_args(list(argv))


def test_cli_flags() -> None:
    config = cb.config_from_args(_parse("--task", "retrieval", "--retrieval-tasks", "niah"), ())
    assert config.task == "retrieval" and config.retrieval_tasks == ("niah",)
    assert config.budgets == (25, 35, 50) and config.lengths == (2048,)
    with pytest.raises(ValueError, match="goes with --task retrieval"):
        cb.config_from_args(_parse("--task", "chat-memory", "--retrieval-tasks", "niah"), ())
