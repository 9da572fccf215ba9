"""The long-context task generators, with an invertible word-level fake tokenizer."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edgemerge.evaluation import tasks
from edgemerge.evaluation.tasks import (
    Query,
    edit_similarity,
    lcc_samples,
    multi_needle_samples,
    niah_samples,
    passkey_samples,
    score_answer,
)
from edgemerge.evaluation.texts import Document, FidelityInputError
from tests_support import require_documents

BOS = [1]


class FakeTokenizer:
    """Whitespace-led words, single digits and single punctuation marks, one id each.

    Ids are handed out on first sight (0 and 1 are reserved, 1 is BOS), so any text
    tokenizes and every id sequence decodes back to its text.
    """

    _PIECE = re.compile(r"\s*(?:[^\W\d]+|\d|[^\w\s])|\s+")

    def __init__(self) -> None:
        self.pieces = ["<unk>", "<bos>"]
        self.ids: dict[str, int] = {}

    def __call__(self, text: str) -> list[int]:
        pieces = self._PIECE.findall(text)
        assert "".join(pieces) == text  # the fake must never lose characters
        out = []
        for piece in pieces:
            if piece not in self.ids:
                self.ids[piece] = len(self.pieces)
                self.pieces.append(piece)
            out.append(self.ids[piece])
        return out

    def decode(self, ids: np.ndarray | list[int]) -> str:
        return "".join(self.pieces[int(i)] for i in ids)


@pytest.fixture(scope="module")
def tok() -> FakeTokenizer:
    return FakeTokenizer()


@pytest.fixture
def filler() -> None:
    """The haystack's system texts; skips where they are missing (macOS). The first
    filler document (GPL-3) alone holds more words than any test here asks for."""
    require_documents(tasks.FILLER_DOCS[:1])


def _check_needle_sample(
    tok: FakeTokenizer, sample: tasks.Sample, length: int, intro: str, needles: list[str]
) -> None:
    """Exact length, BOS first, each needle's text at its recorded span and placed depth."""
    assert sample.context.dtype == np.int32
    assert sample.context.shape == (length,)
    assert sample.context[0] == BOS[0]
    n_intro = len(tok(intro))
    assert tok.decode(sample.context[1 : 1 + n_intro]) == intro
    spans = sample.meta["needle_spans"]
    assert len(spans) == len(needles)
    n_filler = length - 1 - n_intro - sum(end - start for start, end in spans)
    needle_before = 0
    for (start, end), needle, placed in zip(
        spans, needles, sample.meta["placed_depths"], strict=True
    ):
        assert tok.decode(sample.context[start:end]) == needle
        assert tok.decode(sample.context).count(needle.strip()) == 1
        filler_before = start - 1 - n_intro - needle_before
        assert filler_before / n_filler == pytest.approx(placed)
        needle_before += end - start
    for query in sample.queries:
        assert query.tokens.dtype == np.int32 and query.tokens.size >= 1


def test_passkey_exact_length_and_depth(tok: FakeTokenizer, filler: None) -> None:
    depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples = passkey_samples(tok, BOS, n_context=3000, depths=depths, seed=3)
    assert [s.task for s in samples] == ["passkey"] * 5
    for sample, depth in zip(samples, depths, strict=True):
        key = sample.queries[0].answer
        assert re.fullmatch(r"[1-9][0-9]{4}", key)
        needle = f" The pass key is {key}. Remember it. {key} is the pass key."
        _check_needle_sample(tok, sample, 3000, tasks.PASSKEY_INTRO, [needle])
        assert sample.meta["placed_depths"][0] == pytest.approx(depth, abs=0.05)
        assert sample.label == f"passkey len=3000 depth={depth:.0%}"
        (query,) = sample.queries
        assert tok.decode(query.tokens) == "\nWhat is the pass key? The pass key is"
        assert query.scorer == "exact" and 5 < query.max_new_tokens <= 16
    # The extremes sit right after the intro and right at the end of the context.
    first_span = samples[0].meta["needle_spans"][0]
    assert first_span[0] == 1 + len(tok(tasks.PASSKEY_INTRO))
    assert samples[-1].meta["needle_spans"][0][1] == 3000


def test_niah_grid(tok: FakeTokenizer, filler: None) -> None:
    lengths, depths = (600, 2500), (0.1, 0.5, 0.9)
    samples = niah_samples(tok, BOS, lengths=lengths, depths=depths, seed=0)
    grid = [(length, depth) for length in lengths for depth in depths]
    assert len(samples) == len(grid)
    for sample, (length, depth) in zip(samples, grid, strict=True):
        assert sample.task == "niah"
        assert sample.label == f"niah len={length} depth={depth:.0%}"
        assert (sample.meta["length"], sample.meta["depth"]) == (length, depth)
        (city,), (number,) = sample.meta["cities"], sample.meta["keys"]
        assert city in tasks.CITIES and re.fullmatch(r"[0-9]{7}", number)
        needle = f" The special magic number for {city} is {number}."
        _check_needle_sample(tok, sample, length, tasks.NEEDLE_INTRO, [needle])
        # Sentence-sized pieces: the depth is within a few percent even at 600 tokens.
        assert sample.meta["placed_depths"][0] == pytest.approx(depth, abs=0.08)
        (query,) = sample.queries
        assert query.answer == number
        assert tok.decode(query.tokens) == (
            f"\nWhat is the special magic number for {city}? The special magic number for {city} is"
        )


def test_multi_needle_distinct_keys_one_query_each(tok: FakeTokenizer, filler: None) -> None:
    samples = multi_needle_samples(tok, BOS, n_context=4000, n_needles=5, n_samples=3, seed=7)
    assert len(samples) == 3
    for sample in samples:
        cities, keys = sample.meta["cities"], sample.meta["keys"]
        assert len(set(cities)) == 5 and len(set(keys)) == 5
        needles = [
            f" The special magic number for {city} is {key}."
            for city, key in zip(cities, keys, strict=True)
        ]
        _check_needle_sample(tok, sample, 4000, tasks.NEEDLE_INTRO, needles)
        assert [q.answer for q in sample.queries] == list(keys)
        for query, city in zip(sample.queries, cities, strict=True):
            assert f"magic number for {city}?" in tok.decode(query.tokens)
        placed = sample.meta["placed_depths"]
        assert all(0.0 < p < 1.0 for p in placed) and list(placed) == sorted(placed)
        for j, p in enumerate(placed):
            assert p == pytest.approx((j + 1) / 6, abs=0.05)
    assert len({s.meta["keys"] for s in samples}) == 3


def test_multi_needle_uses_every_city_once(tok: FakeTokenizer, filler: None) -> None:
    n = len(tasks.CITIES)
    (sample,) = multi_needle_samples(tok, BOS, n_context=3000, n_needles=n, seed=5)
    assert sorted(sample.meta["cities"]) == sorted(tasks.CITIES)
    assert len(set(sample.meta["keys"])) == n == len(sample.queries)


def test_needle_tasks_are_deterministic_per_seed(tok: FakeTokenizer, filler: None) -> None:
    def make(seed: int) -> list[tasks.Sample]:
        return [
            *passkey_samples(tok, BOS, n_context=800, depths=(0.3, 0.6), seed=seed),
            *niah_samples(tok, BOS, lengths=(700,), depths=(0.4,), seed=seed),
            *multi_needle_samples(tok, BOS, n_context=900, n_samples=2, seed=seed),
        ]

    first, again, other = make(11), make(11), make(12)
    for a, b, c in zip(first, again, other, strict=True):
        assert np.array_equal(a.context, b.context)
        assert [q.answer for q in a.queries] == [q.answer for q in b.queries]
        assert dict(a.meta) == dict(b.meta)
        assert [q.answer for q in a.queries] != [q.answer for q in c.queries]
        assert not np.array_equal(a.context, c.context)


def test_lcc_answer_is_the_source_line_after_the_query(tok: FakeTokenizer) -> None:
    samples = lcc_samples(tok, [1, 1], n_context=1500, n_samples=5, seed=2)
    targets = set()
    for sample in samples:
        assert sample.task == "lcc"
        assert sample.context.shape == (1500,) and list(sample.context[:2]) == [1, 1]
        path, line_no = Path(sample.meta["path"]), sample.meta["line"]
        lines = path.read_text(encoding="utf-8").split("\n")
        target = lines[line_no - 1]
        (query,) = sample.queries
        assert query.scorer == "edit" and query.max_new_tokens >= 32
        assert query.answer == target.strip() and len(query.answer) >= 12
        assert not query.answer.startswith("#")
        indent = target[: len(target) - len(target.lstrip())]
        assert tok.decode(query.tokens) == lines[line_no - 2] + "\n" + indent
        before = "\n".join(lines[: line_no - 2]) + "\n"
        assert before.endswith(tok.decode(sample.context[2:]))
        targets.add((path, line_no))
    assert len(targets) == 5
    again = lcc_samples(tok, [1, 1], n_context=1500, n_samples=5, seed=2)
    assert [s.label for s in again] == [s.label for s in samples]
    assert all(np.array_equal(a.context, b.context) for a, b in zip(again, samples, strict=True))
    other = lcc_samples(tok, [1, 1], n_context=1500, n_samples=5, seed=3)
    assert [s.label for s in other] != [s.label for s in samples]


def test_lcc_skips_docstrings_comments_and_brackets(
    tok: FakeTokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = "\n".join(f"    value_{i} = compute_something({i})" for i in range(40))
    source = (
        f"def first():\n{body}\n"
        "    call_with_arguments(\n"
        "        '''also a string that is long''',\n"
        "    )  # ])))))))))))\n"
        '    message_text = """Start of a long string\n'
        '    ending of the string""" + suffix_value\n'
        '    """A one-line docstring that is long enough."""\n'
        "    # a_comment_that_is_long_enough = 1\n"
    )
    path = tmp_path / "module.py"
    path.write_text(source)
    monkeypatch.setattr(tasks, "LCC_SOURCES", (Document("fake", path),))
    # The context is exactly the tokens before the line preceding "call_with_arguments(",
    # so every earlier line is too early; every later one is part of a string, a
    # comment or brackets.
    lines = [line + "\n" for line in source.split("\n")[:-1]]
    call = lines.index("    call_with_arguments(\n")
    n_before = sum(len(tok(line)) for line in lines[: call - 1])
    (sample,) = lcc_samples(tok, BOS, n_context=1 + n_before, n_samples=1)
    assert sample.queries[0].answer == "call_with_arguments("
    assert sample.meta["line"] == call + 1
    with pytest.raises(FidelityInputError, match="lower n_context or n_samples"):
        lcc_samples(tok, BOS, n_context=1 + n_before, n_samples=2)


def test_edit_similarity_known_values() -> None:
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert edit_similarity("sitting", "kitten") == pytest.approx(1 - 3 / 7)
    assert edit_similarity("flaw", "lawn") == pytest.approx(0.5)
    assert edit_similarity("", "") == 1.0
    assert edit_similarity("abc", "") == 0.0
    assert edit_similarity("same line", "same line") == 1.0
    assert edit_similarity("abc", "xyz") == 0.0


def _query(answer: str, scorer: str) -> Query:
    return Query(np.array([5], dtype=np.int32), answer, 8, scorer)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        (" 48213. Remember it.", 1.0),
        ("The pass key is 48213", 1.0),
        ("\n48213\n", 1.0),
        (" 48214.", 0.0),
        (" 482130", 0.0),
        (" 4821", 0.0),
        (" 12 and 48213", 0.0),
        ("no digits at all", 0.0),
        ("", 0.0),
    ],
)
def test_exact_digit_scoring(generated: str, expected: float) -> None:
    assert score_answer(_query("48213", "exact"), generated) == expected


def test_exact_text_and_edit_scoring() -> None:
    assert score_answer(_query("Lisbon", "exact"), "\n  Lisbon, of course\nOslo") == 1.0
    assert score_answer(_query("Lisbon", "exact"), "Oslo\nLisbon") == 0.0
    code = _query("return x + 1", "edit")
    assert score_answer(code, "return x + 1\n    y = 2") == 1.0
    assert score_answer(code, "\n  return x + 2  \nmore") == pytest.approx(1 - 1 / 12)
    assert score_answer(code, "") == 0.0
    with pytest.raises(FidelityInputError, match="unknown scorer"):
        score_answer(_query("x", "fuzzy"), "x")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: passkey_samples(t, BOS, n_context=0, depths=(0.5,)), "n_context"),
        (lambda t: passkey_samples(t, BOS, n_context=500, depths=(1.5,)), r"\[0, 1\]"),
        (lambda t: passkey_samples(t, BOS, n_context=500, depths=(float("nan"),)), "depth"),
        (lambda t: passkey_samples(t, BOS, n_context=500, depths=()), "non-empty"),
        (lambda t: passkey_samples(t, BOS, n_context=500, depths=(0.5,), seed=-1), "seed"),
        (lambda t: niah_samples(t, BOS, lengths=(500, -1), depths=(0.5,)), "lengths"),
        (lambda t: multi_needle_samples(t, BOS, n_context=500, n_needles=99), "n_needles"),
        (lambda t: multi_needle_samples(t, BOS, n_context=500, n_samples=0), "n_samples"),
        (lambda t: lcc_samples(t, BOS, n_context=1, n_samples=1), "n_context >= 2"),
        (lambda t: lcc_samples(t, BOS, n_context=10**7, n_samples=1), "lower n_context"),
        (lambda t: passkey_samples(t, BOS, n_context=10**7, depths=(0.5,)), "fewer than"),
    ],
)
def test_bad_arguments_raise(
    tok: FakeTokenizer, make: Callable[[FakeTokenizer], object], message: str
) -> None:
    with pytest.raises(FidelityInputError, match=message):
        make(tok)


@pytest.mark.parametrize(
    "make",
    [
        lambda t: passkey_samples(t, BOS, n_context=40, depths=(0.5,)),
        lambda t: niah_samples(t, BOS, lengths=(30,), depths=(0.5,)),
        lambda t: multi_needle_samples(t, BOS, n_context=120, n_needles=8),
    ],
)
def test_lengths_too_short_for_the_needles_raise(
    tok: FakeTokenizer, filler: None, make: Callable[[FakeTokenizer], object]
) -> None:
    # the shortest length is known once the haystack is tokenized, so these need it
    with pytest.raises(FidelityInputError, match=r"lengths >= \d+"):
        make(tok)


def test_missing_filler_files_are_named(tok: FakeTokenizer, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here. Not nearly enough.")
    missing = tmp_path / "gone.txt"
    docs = (Document("gone", missing), Document("short", short))
    with pytest.raises(FidelityInputError, match=f"missing: {re.escape(str(missing))}"):
        niah_samples(tok, BOS, lengths=(500,), depths=(0.5,), filler_docs=docs)


def test_a_missing_filler_file_is_skipped_when_the_others_suffice(
    tok: FakeTokenizer, tmp_path: Path, filler: None
) -> None:
    missing = tmp_path / "gone.txt"
    docs = (Document("gone", missing), *tasks.FILLER_DOCS)
    (sample,) = niah_samples(tok, BOS, lengths=(500,), depths=(0.5,), filler_docs=docs)
    assert sample.context.shape == (500,)


def _passage_doc(tmp_path: Path) -> Document:
    path = tmp_path / "passage.py"
    path.write_text(
        "\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}" for i in range(60)) + "\n"
    )
    return Document("passage.py", path)


def test_repeat_places_the_passage_and_asks_from_its_cue(
    tok: FakeTokenizer, filler: None, tmp_path: Path
) -> None:
    doc = _passage_doc(tmp_path)
    samples = tasks.repeat_samples(
        tok, BOS, n_context=600, depths=(0.2, 0.8), passage_docs=(doc,), seed=3
    )
    for sample, depth in zip(samples, (0.2, 0.8), strict=True):
        assert sample.task == "repeat" and sample.context.shape == (600,)
        ((start, end),) = sample.meta["needle_spans"]
        (query,) = sample.queries
        cue, n = tasks.REPEAT_CUE, tasks.NEW_TOKENS["repeat"]
        assert end - start == cue + n and query.max_new_tokens == n
        # the query is a blank line and the passage's cue; the answer what follows it
        assert tok.decode(query.tokens) == "\n\n" + tok.decode(sample.context[start : start + cue])
        np.testing.assert_array_equal(query.answer_tokens, sample.context[start + cue : end])
        assert "def f" in tok.decode(sample.context[start:end])
        assert sample.meta["placed_depths"][0] == pytest.approx(depth, abs=0.1)
    assert not np.array_equal(samples[0].context, samples[1].context)
    with pytest.raises(FidelityInputError, match="no passage document"):
        tasks.repeat_samples(
            tok, BOS, n_context=600, depths=(0.5,), passage_docs=(Document("x", tmp_path / "x"),)
        )
    with pytest.raises(FidelityInputError, match="n_context >="):
        tasks.repeat_samples(tok, BOS, n_context=60, depths=(0.5,), passage_docs=(doc,))


def test_token_scoring() -> None:
    answer = np.arange(10, 20, dtype=np.int32)
    query = Query(np.array([1], np.int32), "passage", 10, "tokens", answer)
    assert tasks.score_tokens(query, list(range(10, 20)) + [99]) == 1.0
    assert tasks.score_tokens(query, [10, 11, 99, *range(13, 20)]) == pytest.approx(0.9)
    assert tasks.score_tokens(query, list(range(11, 20))) == pytest.approx(0.9)  # one lost
    assert tasks.score_tokens(query, []) == 0.0
    with pytest.raises(FidelityInputError, match="score_tokens"):
        score_answer(query, "text")
    with pytest.raises(FidelityInputError, match="answer_tokens"):
        tasks.score_tokens(_query("x", "exact"), [1])
