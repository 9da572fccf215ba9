"""Long-context tasks of the evaluation suite, built only from real text found offline.

Each task yields :class:`Sample` objects. A sample's ``context`` (BOS first) is prefilled
into the KV cache, which the caller then compresses; each of its :class:`Query` objects
is decoded after that (compressed) context on its own, and the greedy continuation is
scored against the query's answer with :func:`score_answer`. The models are driven as
plain completion models, so every query ends exactly where the answer should begin.

Tasks:

* ``passkey``: the classic pass-key retrieval prompt; a 5-digit key hidden at a depth.
* ``niah``: needle in a haystack (RULER style) on a grid of lengths x depths; the
  needle is "The special magic number for <city> is <7 digits>."
* ``multi_needle``: several such needles (distinct cities and numbers) at evenly spaced
  depths, one query per needle.
* ``lcc``: LongBench-LCC-style code completion on CPython standard-library sources:
  given the code before a line, produce that line (scored by edit similarity).

The haystack is real prose: the documents of :data:`FILLER_DOCS` (or a call's
``filler_docs``) in order (missing ones are skipped), always from their start, cut to
exactly the number of tokens a sample needs. Texts are tokenized piece by piece
(sentences, or lines of overlong sentences), and needles go between pieces, so a needle
never splits a word and sits at a token boundary; its actual depth is the piece
boundary nearest to the requested one (recorded in ``meta``). Everything is
deterministic for a seed: sample ``i`` of a call draws from
``np.random.default_rng(seed + i)``.
"""

from __future__ import annotations

import io
import math
import re
import tokenize as pytokenize
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import numpy as np

from edgemerge.evaluation.texts import (
    Document,
    FidelityInputError,
    Tokenize,
    debian_doc,
    licence,
    missing_note,
    stdlib_file,
)

# Haystack documents, all shipped by a Debian bookworm base system (~230 kB, enough for
# contexts of about 50k tokens). Licences first: they read most like ordinary prose.
# Their folders are looked up when a haystack is built (see ``texts.TextFolder``).
FILLER_DOCS: tuple[Document, ...] = (
    licence("GPL-3"),
    licence("Apache-2.0"),
    licence("LGPL-2.1"),
    licence("Artistic"),
    licence("MPL-2.0"),
    debian_doc("bash/NEWS.gz", "bash NEWS (Debian doc)"),
    debian_doc("bash/COMPAT.gz", "bash COMPAT (Debian doc)"),
)

# Large standard-library modules for ``lcc`` (names that later Pythons turned into
# packages are simply skipped there).
LCC_SOURCES: tuple[Document, ...] = tuple(
    Document(f"{name} (stdlib)", stdlib_file(name))
    for name in (
        "argparse.py subprocess.py typing.py inspect.py tarfile.py pathlib.py enum.py "
        "dataclasses.py shutil.py ast.py"
    ).split()
)

CITIES: tuple[str, ...] = (
    "Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Cairo", "Quito",
    "Seoul", "Vienna", "Accra", "Bogota", "Manila", "Prague", "Dakar", "Havana",
    "Kyoto", "Zurich", "Tunis", "Santiago", "Jakarta", "Helsinki", "Lagos", "Montreal",
    "Mumbai", "Warsaw", "Kampala", "Caracas", "Bangkok", "Athens", "Rabat", "Sydney",
)  # fmt: skip

PASSKEY_INTRO = (
    "There is an important pass key hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the pass key."
)
NEEDLE_INTRO = (
    "Some special magic numbers are hidden within the following text. "
    "Make sure to memorize them. I will quiz you about the numbers afterwards."
)

# Greedy budgets per task: a key of d digits is at most d tokens plus a leading space
# (the slack lets a model that opens with a quote still reach the digits); a code line
# is rarely longer than 48 tokens.
NEW_TOKENS: Mapping[str, int] = MappingProxyType(
    {"passkey": 8, "niah": 12, "multi_needle": 12, "lcc": 48, "repeat": 192}
)


@dataclass(frozen=True)
class Query:
    """One question decoded after a sample's context.

    Attributes:
        tokens: int32 ``[n]``, ``n >= 1``: the question's tokens, fed after the context.
        answer: the expected answer text (digits for the needle tasks, a stripped code
            line for ``lcc``).
        max_new_tokens: how many tokens to generate greedily for it.
        scorer: ``"exact"`` or ``"edit"`` (see :func:`score_answer`), or ``"tokens"``
            (see :func:`score_tokens`).
        answer_tokens: int32 ``[m]``, the answer as the context holds it, for a query
            scored in token space (``"tokens"``); None for the others, whose answer text
            is tokenized where it is needed.
    """

    tokens: np.ndarray
    answer: str
    max_new_tokens: int
    scorer: Literal["exact", "edit", "tokens"]
    answer_tokens: np.ndarray | None = None


@dataclass(frozen=True)
class Sample:
    """One task instance.

    Attributes:
        task: ``"passkey"``, ``"niah"``, ``"multi_needle"`` or ``"lcc"``.
        label: human-readable, e.g. ``"niah len=2000 depth=25%"``.
        context: int32 ``[n_context]``, BOS first: what is prefilled and compressed.
        queries: the questions asked after the context, each decoded independently.
        meta: task details: ``length`` always; the needle tasks add the requested
            ``depth``/``depths``, the ``placed_depths`` (fractions of the filler),
            ``needle_spans`` (``(start, end)`` token indices into ``context``) and the
            keys; ``lcc`` adds the source ``file``, ``path`` and 1-based target ``line``.
    """

    task: str
    label: str
    context: np.ndarray
    queries: tuple[Query, ...]
    meta: Mapping[str, object]


# ---------------------------------------------------------------------------- scoring

_DIGITS = re.compile(r"[0-9]+")


def _levenshtein(a: Sequence[object], b: Sequence[object]) -> int:
    """Minimum number of single-character insertions, deletions and substitutions."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b))
            )
        previous = current
    return previous[-1]


def edit_similarity(a: str, b: str) -> float:
    """``1 - levenshtein(a, b) / max(len(a), len(b))`` in [0, 1]; 1.0 for two empty strings."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    return 1.0 - _levenshtein(a, b) / longest


def _first_line(text: str) -> str:
    # Leading blank lines are skipped: a model often opens with a newline.
    return text.strip().split("\n", 1)[0].strip()


def score_answer(query: Query, generated: str) -> float:
    """Score generated text for ``query`` in [0, 1].

    ``"exact"``: for an all-digit answer, 1.0 when the first run of digits anywhere in
    ``generated`` equals it (so "48213." and " is 48213" pass, "482130" and "4821" fail);
    for another answer, 1.0 when it occurs in the first non-blank line of ``generated``
    (stripped); else 0.0. ``"edit"``: :func:`edit_similarity` between that first
    non-blank line (stripped) and the answer.

    Raises:
        FidelityInputError: an unknown scorer.
    """
    if query.scorer == "edit":
        return edit_similarity(_first_line(generated), query.answer)
    if query.scorer == "tokens":
        raise FidelityInputError("a 'tokens' query is scored on token ids: use score_tokens")
    if query.scorer != "exact":
        raise FidelityInputError(f"unknown scorer {query.scorer!r}; use 'exact' or 'edit'")
    if _DIGITS.fullmatch(query.answer):
        run = _DIGITS.search(generated)
        return float(run is not None and run.group() == query.answer)
    return float(query.answer in _first_line(generated))


def score_tokens(query: Query, generated: Sequence[int]) -> float:
    """A ``"tokens"`` query's score in [0, 1]: ``1 - levenshtein / len(answer)`` between
    the answer's token ids and the first ``len(answer)`` generated ones (a reply cut short
    counts its missing tokens as deletions).

    Raises:
        FidelityInputError: the query has no answer tokens.
    """
    if query.answer_tokens is None or query.answer_tokens.size == 0:
        raise FidelityInputError("score_tokens needs a query with answer_tokens")
    want = [int(t) for t in query.answer_tokens]
    got = [int(t) for t in generated[: len(want)]]
    return 1.0 - _levenshtein(got, want) / len(want)


# ------------------------------------------------------------------------- validation


def _positive(name: str, value: int, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise FidelityInputError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)


def _positives(name: str, values: Sequence[int]) -> tuple[int, ...]:
    if isinstance(values, (int, np.integer)) or len(values) == 0:
        raise FidelityInputError(f"{name} must be a non-empty sequence, got {values!r}")
    return tuple(_positive(f"each of {name}", value) for value in values)


def _depths(depths: Sequence[float]) -> tuple[float, ...]:
    if isinstance(depths, (int, float)) or len(depths) == 0:
        raise FidelityInputError(f"depths must be a non-empty sequence, got {depths!r}")
    checked = []
    for depth in depths:
        if isinstance(depth, bool) or not isinstance(depth, (int, float, np.number)):
            raise FidelityInputError(f"each depth must be a number in [0, 1], got {depth!r}")
        if math.isnan(depth) or not 0.0 <= depth <= 1.0:
            raise FidelityInputError(
                f"each depth must lie in [0, 1] (0 = right after the intro, 1 = just before "
                f"the question), got {depth!r}"
            )
        checked.append(float(depth))
    return tuple(checked)


def _ids(tokenize: Tokenize, text: str) -> list[int]:
    return [int(token) for token in tokenize(text)]


def _frozen(tokens: list[int]) -> np.ndarray:
    array = np.asarray(tokens, dtype=np.int32)
    array.setflags(write=False)  # samples are frozen; so are their token arrays
    return array


def _query(tokenize: Tokenize, task: str, text: str, answer: str) -> Query:
    """The query ``text`` for ``task``: code lines are scored by edit similarity."""
    tokens = _ids(tokenize, text)
    if not tokens:
        raise FidelityInputError(f"the tokenizer returned no tokens for the query {text!r}")
    return Query(_frozen(tokens), answer, NEW_TOKENS[task], "edit" if task == "lcc" else "exact")


# ---------------------------------------------------------------------- needle tasks

# Pieces end after a sentence's final punctuation or before a blank line, so needles
# land between sentences or paragraphs; the rare overlong piece (a boxed table, a long
# list) is cut at line breaks to keep the depth resolution fine.
_PIECE_BREAK = re.compile(r"(?<=[.!?])(?=\s)|(?=\n[ \t]*\n)")
_LINE_BREAK = re.compile(r"(?=\n)")
_MAX_PIECE_CHARS = 800
_BLANK_RUN = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")


def _pieces(text: str) -> Iterator[str]:
    for piece in _PIECE_BREAK.split(text):
        yield from _LINE_BREAK.split(piece) if len(piece) > _MAX_PIECE_CHARS else (piece,)


def _nearest(bounds: list[int], target: float) -> int:
    """The bound closest to ``target``, the earlier one on ties."""
    return min(bounds, key=lambda bound: (abs(bound - target), bound))


@dataclass(frozen=True)
class _Haystack:
    """What the samples of one needle-task call share: BOS, intro and filler tokens.

    ``filler`` holds at least as many tokens as the longest sample needs; ``starts``
    are the token offsets where its pieces start (0 first).
    """

    tokenize: Tokenize
    bos: list[int]
    intro: list[int]
    filler: list[int]
    starts: list[int]

    @classmethod
    def load(
        cls,
        tokenize: Tokenize,
        bos: Sequence[int],
        intro: str,
        longest: int,
        filler_docs: Sequence[Document] = FILLER_DOCS,
    ) -> _Haystack:
        """Tokenize ``filler_docs`` (missing files skipped) until ``longest`` fits.

        Raises:
            FidelityInputError: the available documents hold too few tokens.
        """
        bos_ids = [int(token) for token in bos]
        intro_ids = _ids(tokenize, intro)
        need = max(1, longest - len(bos_ids) - len(intro_ids))
        filler: list[int] = []
        starts: list[int] = []
        for doc in filler_docs:
            if not doc.exists():
                continue
            text = doc.read().replace("\r\n", "\n").replace("\f", "").strip()
            # Each document opens a new paragraph after the intro or the previous one.
            for piece in _pieces("\n\n" + _BLANK_RUN.sub("\n\n", text)):
                ids = _ids(tokenize, piece) if piece else []
                if ids:
                    starts.append(len(filler))
                    filler.extend(ids)
                if len(filler) >= need:
                    return cls(tokenize, bos_ids, intro_ids, filler, starts)
        raise FidelityInputError(
            f"the filler documents hold {len(filler)} tokens, fewer than the {need} needed"
            f"{missing_note(filler_docs)}; lower n_context/lengths or provide the missing files"
        )

    def sample(
        self,
        task: str,
        label: str,
        length: int,
        needles: Sequence[tuple[float, str]],
        questions: Sequence[tuple[str, str]],
        meta: dict[str, object],
    ) -> Sample:
        """A sample of exactly ``length`` tokens: BOS, intro, filler with the needles.

        ``needles`` are ``(depth, text)`` in non-decreasing depth; each goes to the piece
        boundary nearest ``depth`` times the filler length. ``questions`` are
        ``(text, answer)`` pairs, scored "exact".

        Raises:
            FidelityInputError: ``length`` leaves no token for the filler.
        """
        needle_ids = [(depth, _ids(self.tokenize, text)) for depth, text in needles]
        fixed = len(self.bos) + len(self.intro) + sum(len(ids) for _, ids in needle_ids)
        n_filler = length - fixed
        if n_filler < 1:
            raise FidelityInputError(
                f"{task}: a context of {length} tokens is too short, BOS, intro and needles "
                f"take {fixed}; use n_context/lengths >= {fixed + 1}"
            )
        bounds = [start for start in self.starts if start < n_filler] + [n_filler]
        context = self.bos + self.intro
        spans: list[tuple[int, int]] = []
        placed: list[float] = []
        done = 0
        for depth, ids in needle_ids:
            # Never before an earlier needle (the nearest boundary is monotone anyway).
            at = max(done, _nearest(bounds, depth * n_filler))
            context += self.filler[done:at]
            spans.append((len(context), len(context) + len(ids)))
            context += ids
            placed.append(at / n_filler)
            done = at
        context += self.filler[done:n_filler]
        queries = tuple(_query(self.tokenize, task, text, answer) for text, answer in questions)
        meta = {
            "length": length,
            **meta,
            "placed_depths": tuple(placed),
            "needle_spans": tuple(spans),
        }
        return Sample(task, label, _frozen(context), queries, MappingProxyType(meta))


def _magic_needle(city: str, number: str) -> str:
    return f" The special magic number for {city} is {number}."


def _magic_question(city: str) -> str:
    return f"\nWhat is the special magic number for {city}? The special magic number for {city} is"


def passkey_samples(
    tokenize: Tokenize,
    bos: Sequence[int],
    *,
    n_context: int,
    depths: Sequence[float],
    seed: int = 0,
    filler_docs: Sequence[Document] = FILLER_DOCS,
) -> list[Sample]:
    """One pass-key sample of exactly ``n_context`` tokens per depth (in order).

    The context is BOS, :data:`PASSKEY_INTRO`, filler with "The pass key is K. Remember
    it. K is the pass key." at ``depth``; the query asks for the 5-digit key K.

    Raises:
        FidelityInputError: a bad argument (non-positive length, depth outside [0, 1],
            ``n_context`` too short for BOS + intro + needle), or too little filler text.
    """
    n_context = _positive("n_context", n_context)
    depths = _depths(depths)
    seed = _positive("seed", seed, least=0)
    haystack = _Haystack.load(tokenize, bos, PASSKEY_INTRO, n_context, filler_docs)
    samples = []
    for index, depth in enumerate(depths):
        key = str(int(np.random.default_rng(seed + index).integers(10_000, 100_000)))
        needle = f" The pass key is {key}. Remember it. {key} is the pass key."
        questions = [("\nWhat is the pass key? The pass key is", key)]
        label = f"passkey len={n_context} depth={depth:.0%}"
        meta = {"depth": depth, "keys": (key,)}
        samples.append(
            haystack.sample("passkey", label, n_context, [(depth, needle)], questions, meta)
        )
    return samples


def niah_samples(
    tokenize: Tokenize,
    bos: Sequence[int],
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    seed: int = 0,
    filler_docs: Sequence[Document] = FILLER_DOCS,
) -> list[Sample]:
    """The needle-in-a-haystack grid: one sample per (length, depth), lengths outermost.

    The context is BOS, :data:`NEEDLE_INTRO`, filler with "The special magic number for
    <city> is <7 digits>." at ``depth``; the query asks for that city's number.

    Raises:
        FidelityInputError: a bad argument or too little filler text.
    """
    lengths = _positives("lengths", lengths)
    depths = _depths(depths)
    seed = _positive("seed", seed, least=0)
    haystack = _Haystack.load(tokenize, bos, NEEDLE_INTRO, max(lengths), filler_docs)
    samples = []
    for index, (length, depth) in enumerate((ln, dp) for ln in lengths for dp in depths):
        rng = np.random.default_rng(seed + index)
        city = CITIES[int(rng.integers(len(CITIES)))]
        number = str(int(rng.integers(1_000_000, 10_000_000)))
        needles = [(depth, _magic_needle(city, number))]
        questions = [(_magic_question(city), number)]
        label = f"niah len={length} depth={depth:.0%}"
        meta = {"depth": depth, "keys": (number,), "cities": (city,)}
        samples.append(haystack.sample("niah", label, length, needles, questions, meta))
    return samples


def multi_needle_samples(
    tokenize: Tokenize,
    bos: Sequence[int],
    *,
    n_context: int,
    n_needles: int = 4,
    n_samples: int = 1,
    seed: int = 0,
    filler_docs: Sequence[Document] = FILLER_DOCS,
) -> list[Sample]:
    """``n_samples`` contexts, each with ``n_needles`` magic-number needles.

    Needle ``j`` (0-based) sits at depth ``(j + 1) / (n_needles + 1)``; cities and
    numbers are distinct within a sample. One query per needle, in depth order.

    Raises:
        FidelityInputError: a bad argument (``n_needles`` above ``len(CITIES)``, a
            context too short for all needles) or too little filler text.
    """
    n_context = _positive("n_context", n_context)
    n_needles = _positive("n_needles", n_needles)
    n_samples = _positive("n_samples", n_samples)
    seed = _positive("seed", seed, least=0)
    if n_needles > len(CITIES):
        raise FidelityInputError(
            f"n_needles={n_needles} exceeds the {len(CITIES)} distinct cities; use fewer needles"
        )
    haystack = _Haystack.load(tokenize, bos, NEEDLE_INTRO, n_context, filler_docs)
    depths = tuple((j + 1) / (n_needles + 1) for j in range(n_needles))
    samples = []
    for index in range(n_samples):
        rng = np.random.default_rng(seed + index)
        cities = [CITIES[int(i)] for i in rng.choice(len(CITIES), n_needles, replace=False)]
        numbers = [str(int(n) + 1_000_000) for n in rng.choice(9_000_000, n_needles, replace=False)]
        pairs = list(zip(cities, numbers, strict=True))
        needles = [(depth, _magic_needle(*pair)) for depth, pair in zip(depths, pairs, strict=True)]
        questions = [(_magic_question(city), number) for city, number in pairs]
        label = f"multi_needle len={n_context} needles={n_needles} #{index}"
        meta = {"depths": depths, "keys": tuple(numbers), "cities": tuple(cities)}
        samples.append(haystack.sample("multi_needle", label, n_context, needles, questions, meta))
    return samples


# ------------------------------------------------------------------------------ repeat

REPEAT_CUE = 16  # passage tokens that start the query: what points back at the passage


def repeat_samples(
    tokenize: Tokenize,
    bos: Sequence[int],
    *,
    n_context: int,
    depths: Sequence[float],
    passage_docs: Sequence[Document],
    seed: int = 0,
    filler_docs: Sequence[Document] = FILLER_DOCS,
    n_repeat: int = NEW_TOKENS["repeat"],
) -> list[Sample]:
    """Contexts holding a passage from ``passage_docs`` at each depth; the query is the
    passage's first :data:`REPEAT_CUE` tokens after a blank line, the answer its next
    ``n_repeat`` tokens, scored in token space (:func:`score_tokens`) and teacher forced:
    a pasted text quoted back many tokens later.

    The passage starts at a random paragraph of a random document, token for token as
    the context holds it, so the cue and the answer are the context's own tokens.

    Raises:
        FidelityInputError: a bad argument, no passage document found, or too little
            filler text.
    """
    n_context = _positive("n_context", n_context)
    n_repeat = _positive("n_repeat", n_repeat)
    seed = _positive("seed", seed, least=0)
    depths = _depths(depths)
    docs = [d for d in passage_docs if d.exists()]
    if not docs:
        raise FidelityInputError(f"repeat: no passage document found{missing_note(passage_docs)}")
    haystack = _Haystack.load(tokenize, bos, "", n_context, filler_docs)
    gap = _ids(tokenize, "\n\n")
    n_passage = REPEAT_CUE + n_repeat
    samples = []
    for index, depth in enumerate(depths):
        rng = np.random.default_rng(seed + index)
        doc = docs[int(rng.integers(len(docs)))]
        paragraphs = [p for p in _BLANK_RUN.sub("\n\n", doc.read()).split("\n\n") if p.strip()]
        first = int(rng.integers(len(paragraphs)))
        passage = _ids(tokenize, "\n\n".join(paragraphs[first:] + paragraphs[:first]))
        if len(passage) < n_passage:
            raise FidelityInputError(
                f"repeat: {doc.label} holds {len(passage)} tokens, fewer than the {n_passage} "
                "a passage needs; lower n_repeat"
            )
        passage = passage[:n_passage]
        n_filler = n_context - len(haystack.bos) - n_passage
        if n_filler < 1:
            raise FidelityInputError(
                f"repeat: a context of {n_context} tokens cannot hold BOS and a passage of "
                f"{n_passage}; use n_context >= {len(haystack.bos) + n_passage + 1}"
            )
        bounds = [start for start in haystack.starts if start < n_filler] + [n_filler]
        at = _nearest(bounds, depth * n_filler)
        context = haystack.bos + haystack.filler[:at]
        span = (len(context), len(context) + n_passage)
        context += passage + haystack.filler[at:n_filler]
        answer = _frozen(passage[REPEAT_CUE:])
        query = Query(_frozen(gap + passage[:REPEAT_CUE]), doc.label, n_repeat, "tokens", answer)
        meta = {
            "length": n_context,
            "depth": depth,
            "placed_depths": (at / n_filler,),
            "needle_spans": (span,),
            "passage": doc.label,
        }
        label = f"repeat len={n_context} depth={depth:.0%} #{index}"
        samples.append(Sample("repeat", label, _frozen(context), (query,), MappingProxyType(meta)))
    return samples


# --------------------------------------------------------------------------------- lcc

_NOT_CODE = {getattr(pytokenize, name) for name in "NL NEWLINE INDENT DEDENT COMMENT".split()}
# String-like token types: STRING, plus the f-string parts of Python >= 3.12.
_STRINGS = {
    getattr(pytokenize, name)
    for name in "STRING FSTRING_START FSTRING_MIDDLE FSTRING_END".split()
    if hasattr(pytokenize, name)
}
_NOT_A_CODE_START = _STRINGS | {None}  # a row led by a string, or with no code at all
_ALNUM = re.compile(r"[A-Za-z0-9]")


@dataclass
class _Source:
    """A stdlib file split into lines (each with its ``\\n``), tokenized line by line."""

    doc: Document
    lines: list[str]
    targets: list[int]  # 0-based indices of lines that make good answers
    before: list[int]  # before[i]: tokens in lines[:i]
    line_tokens: list[list[int]]

    @classmethod
    def load(cls, doc: Document, tokenize: Tokenize) -> _Source:
        text = doc.read().replace("\r\n", "\n")
        parts = text.split("\n")
        lines = [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
        line_tokens = [_ids(tokenize, line) for line in lines]
        before = [0]
        for tokens in line_tokens:
            before.append(before[-1] + len(tokens))
        return cls(doc, lines, _target_lines(text, lines), before, line_tokens)


def _target_lines(text: str, lines: list[str]) -> list[int]:
    """Lines worth predicting: real code, not comments, strings, blanks or lone brackets."""
    in_string: set[int] = set()
    first_type: dict[int, int] = {}
    try:
        for token in pytokenize.generate_tokens(io.StringIO(text).readline):
            if token.type in _NOT_CODE:
                continue
            first_type.setdefault(token.start[0], token.type)
            if token.type in _STRINGS and token.end[0] > token.start[0]:
                in_string.update(range(token.start[0], token.end[0] + 1))
    except (pytokenize.TokenError, SyntaxError):
        return []  # not valid Python for this interpreter: no targets rather than bad ones
    targets = []
    for row in range(2, len(lines) + 1):  # 1-based rows; row 1 has no preceding line
        stripped = lines[row - 1].strip()
        if (
            len(stripped) >= 12
            and not stripped.startswith("#")
            and _ALNUM.search(stripped)
            and row not in in_string
            and first_type.get(row) not in _NOT_A_CODE_START
        ):
            targets.append(row - 1)
    return targets


def lcc_samples(
    tokenize: Tokenize, bos: Sequence[int], *, n_context: int, n_samples: int, seed: int = 0
) -> list[Sample]:
    """``n_samples`` code-completion samples from :data:`LCC_SOURCES` (missing files skipped).

    For a target line ``t``: the query is line ``t - 1`` with its newline plus line
    ``t``'s indentation, so the continuation starts with the target code; the context
    is BOS and the last ``n_context - len(bos)`` tokens before the query; the answer is
    line ``t`` stripped, scored by edit similarity. Targets are distinct within a call.

    Raises:
        FidelityInputError: a bad argument, or no available file has a usable line with
            enough tokens before it.
    """
    n_context = _positive("n_context", n_context)
    n_samples = _positive("n_samples", n_samples)
    seed = _positive("seed", seed, least=0)
    bos_ids = [int(token) for token in bos]
    n_before = n_context - len(bos_ids)
    if n_before < 1:
        raise FidelityInputError(
            f"n_context={n_context} leaves no token after BOS; use n_context >= {len(bos_ids) + 1}"
        )
    available = [doc for doc in LCC_SOURCES if doc.exists()]
    if not available:
        raise FidelityInputError(
            "none of the lcc source files exist: " + ", ".join(str(doc.path) for doc in LCC_SOURCES)
        )
    sources: dict[int, _Source] = {}  # tokenized lazily: only the files samples draw from
    used: set[tuple[int, int]] = set()
    samples = []
    for index in range(n_samples):
        rng = np.random.default_rng(seed + index)
        picked: tuple[_Source, int] | None = None
        for file_index in rng.permutation(len(available)):
            file_index = int(file_index)
            if file_index not in sources:
                sources[file_index] = _Source.load(available[file_index], tokenize)
            source = sources[file_index]
            # The query holds line t - 1, so the context ends where that line starts.
            eligible = [
                t
                for t in source.targets
                if source.before[t - 1] >= n_before and (file_index, t) not in used
            ]
            if eligible:
                picked = source, eligible[int(rng.integers(len(eligible)))]
                used.add((file_index, picked[1]))
                break
        if picked is None:
            longest = max(source.before[-1] for source in sources.values())
            raise FidelityInputError(
                f"no unused code line in the lcc sources has {n_before} tokens before it "
                f"(the longest file has {longest}); lower n_context or n_samples"
            )
        source, target = picked
        line = source.lines[target]
        indent = line[: len(line) - len(line.lstrip())]
        prefix = [token for tokens in source.line_tokens[: target - 1] for token in tokens]
        context = _frozen(bos_ids + prefix[len(prefix) - n_before :])
        query = _query(tokenize, "lcc", source.lines[target - 1] + indent, line.strip())
        meta = {
            "length": n_context,
            "file": source.doc.label,
            "path": str(source.doc.path),
            "line": target + 1,
        }
        label = f"lcc len={n_context} {source.doc.path.name}:{target + 1}"
        samples.append(Sample("lcc", label, context, (query,), MappingProxyType(meta)))
    return samples
