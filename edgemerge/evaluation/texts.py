"""Texts for the fidelity harness: real long documents found on any Debian machine with CPython.

Three sources, as the fidelity issue asks: licences from ``/usr/share/common-licenses``,
Debian documentation under ``/usr/share/doc`` (gzip-compressed files are read through
gzip) and the running Python's standard-library sources.

A :class:`Context` is one evaluation case. Its ``prefix`` is the token sequence whose
KV cache is captured and compressed (cells 0..n-1 at positions 0..n-1); ``feed`` is
what is decoded after the compressed state is loaded: the context's last token, then
the scored tokens, at positions ``len(prefix)``, ``len(prefix) + 1``, ... . The last
context token is fed rather than cached so that the first scored token is predicted
too (a restored state carries no logits).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Tokenize = Callable[[str], Sequence[int]]


class FidelityInputError(ValueError):
    """A text or a setting of the harness cannot produce the requested evaluation."""


def stdlib_file(name: str) -> Path:
    """A source file of the running Python's standard library."""
    return Path(os.__file__).resolve().parent / name


@dataclass(frozen=True)
class Document:
    """A named text file (``.gz`` files are decompressed)."""

    label: str
    path: Path

    def read(self) -> str:
        """The text, decoded as UTF-8 (undecodable bytes replaced).

        Raises:
            FidelityInputError: the file does not exist or cannot be read.
        """
        try:
            raw = self.path.read_bytes()
            if self.path.suffix == ".gz":
                raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            raise FidelityInputError(
                f"cannot read the text {self.label!r} from {self.path}: {err}; pass other "
                "documents (FidelityConfig.plain_docs / recall_pairs)"
            ) from err
        return raw.decode("utf-8", errors="replace")


# Plain-text continuation: one licence, one Debian document, one stdlib module.
PLAIN_DOCS: tuple[Document, ...] = (
    Document("GPL-3 licence", Path("/usr/share/common-licenses/GPL-3")),
    Document("bash COMPAT (Debian doc)", Path("/usr/share/doc/bash/COMPAT.gz")),
    Document("argparse.py (stdlib)", stdlib_file("argparse.py")),
)

# Recall: (passage, filler) pairs from different sources.
RECALL_PAIRS: tuple[tuple[Document, Document], ...] = (
    (
        Document("Apache-2.0 licence", Path("/usr/share/common-licenses/Apache-2.0")),
        Document("subprocess.py (stdlib)", stdlib_file("subprocess.py")),
    ),
    (
        Document("functools.py (stdlib)", stdlib_file("functools.py")),
        Document("bash NEWS (Debian doc)", Path("/usr/share/doc/bash/NEWS.gz")),
    ),
)


@dataclass(frozen=True)
class Context:
    """One evaluation case (see the module doc).

    Attributes:
        kind: ``"plain"`` (continuation of the same document) or ``"recall"``.
        label: the document(s) it was cut from.
        prefix: int32 tokens whose KV is captured and compressed.
        feed: int32 tokens decoded after loading the state: the last context token,
            then the ``n_scored`` scored tokens.
    """

    kind: Literal["plain", "recall"]
    label: str
    prefix: np.ndarray
    feed: np.ndarray

    @property
    def n_scored(self) -> int:
        return int(self.feed.shape[0]) - 1

    @property
    def first_pos(self) -> int:
        """Position of ``feed[0]``: the positions continue after the prefix."""
        return int(self.prefix.shape[0])

    @property
    def tokens(self) -> np.ndarray:
        """The whole sequence, prefix then feed."""
        return np.concatenate([self.prefix, self.feed])


def _tokens_of(doc: Document, tokenize: Tokenize, need: int) -> list[int]:
    tokens = list(tokenize(doc.read()))
    if len(tokens) < need:
        raise FidelityInputError(
            f"{doc.label} ({doc.path}) has {len(tokens)} tokens, fewer than the {need} "
            "needed; choose a longer document or fewer tokens"
        )
    return tokens


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FidelityInputError(f"{name} must be a positive number of tokens, got {value!r}")


def plain_context(
    doc: Document, tokenize: Tokenize, bos: Sequence[int], n_context: int, n_scored: int
) -> Context:
    """The first ``n_context`` tokens of ``doc`` (BOS included), scored on the next ``n_scored``.

    Raises:
        FidelityInputError: the document is too short, or a count is not positive.
    """
    _check_counts(n_context=n_context, n_scored=n_scored)
    if n_context < 2 + len(bos):
        raise FidelityInputError(f"n_context must be at least {2 + len(bos)}, got {n_context}")
    tokens = list(bos) + _tokens_of(doc, tokenize, n_context + n_scored - len(bos))
    context = tokens[:n_context]
    scored = tokens[n_context : n_context + n_scored]
    return Context(
        "plain",
        doc.label,
        np.asarray(context[:-1], dtype=np.int32),
        np.asarray(context[-1:] + scored, dtype=np.int32),
    )


def recall_context(
    passage: Document,
    filler: Document,
    tokenize: Tokenize,
    bos: Sequence[int],
    n_passage: int,
    n_filler: int,
    n_repeat: int,
) -> Context:
    """BOS, ``n_passage`` tokens of ``passage``, ``n_filler`` tokens of ``filler``; scored on
    the first ``n_repeat`` passage tokens repeated.

    Raises:
        FidelityInputError: a document is too short, ``n_repeat > n_passage``, or a
            count is not positive.
    """
    _check_counts(n_passage=n_passage, n_filler=n_filler, n_repeat=n_repeat)
    if n_repeat > n_passage:
        raise FidelityInputError(
            f"n_repeat ({n_repeat}) cannot exceed n_passage ({n_passage}): the repeat is "
            "the start of the passage"
        )
    body = _tokens_of(passage, tokenize, n_passage)[:n_passage]
    other = _tokens_of(filler, tokenize, n_filler)[:n_filler]
    context = list(bos) + body + other
    return Context(
        "recall",
        f"{passage.label} / {filler.label}",
        np.asarray(context[:-1], dtype=np.int32),
        np.asarray(context[-1:] + body[:n_repeat], dtype=np.int32),
    )
