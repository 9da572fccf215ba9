"""Texts for the fidelity harness: real long documents found on any Debian machine with CPython.

Three sources, as the fidelity issue asks: licences from ``/usr/share/common-licenses``,
Debian documentation under ``/usr/share/doc`` (gzip-compressed files are read through
gzip) and the running Python's standard-library sources.

The two system folders are not everywhere (macOS has neither), so a document names its
folder rather than a fixed path, and the folder is looked up when the text is read:
``EDGEMERGE_LICENSES_DIR`` and ``EDGEMERGE_DOC_DIR`` replace the Debian defaults, and
importing this module never touches the file system. A missing file is a
:class:`FidelityInputError` that names the file and the variable to set.

A :class:`Context` is one evaluation case. Its ``prefix`` is the token sequence whose
KV cache is captured and compressed (cells 0..n-1 at positions 0..n-1); ``feed`` is
what is decoded after the compressed state is loaded: the context's last token, then
the scored tokens, at positions ``len(prefix)``, ``len(prefix) + 1``, ... . The last
context token is fed rather than cached so that the first scored token is predicted
too (a restored state carries no logits).
"""

from __future__ import annotations

import ast
import gzip
import os
from collections.abc import Callable, Iterable, Sequence
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
class TextFolder:
    """A system folder of texts whose place an environment variable can override.

    Attributes:
        env: the variable; when set (and not empty) its value is the folder.
        default: the folder otherwise (where Debian keeps these texts).
    """

    env: str
    default: Path

    def path(self) -> Path:
        """The folder now: read at every call, so a variable set after import counts."""
        value = os.environ.get(self.env)
        return Path(value).expanduser() if value else self.default

    def hint(self) -> str:
        """What to do when a file is missing from it."""
        return f"set {self.env} to a folder that has it (default {self.default})"


LICENCES = TextFolder("EDGEMERGE_LICENSES_DIR", Path("/usr/share/common-licenses"))
DEBIAN_DOCS = TextFolder("EDGEMERGE_DOC_DIR", Path("/usr/share/doc"))


@dataclass(frozen=True)
class Document:
    """A named text file (``.gz`` files are decompressed).

    Attributes:
        label: how reports name it.
        file: the file; relative to ``folder`` when one is given.
        folder: the system folder it lives in (resolved when read), or None when
            ``file`` is a path of its own.
    """

    label: str
    file: Path
    folder: TextFolder | None = None

    @property
    def path(self) -> Path:
        """Where the file is now (the folder's variable is read on every access)."""
        return self.folder.path() / self.file if self.folder is not None else Path(self.file)

    def exists(self) -> bool:
        return self.path.is_file()

    def where(self) -> str:
        """The path, with the variable that moves it: for messages about a missing file."""
        if self.folder is None:
            return str(self.path)
        return f"{self.path} ({self.folder.hint()})"

    def read(self) -> str:
        """The text, decoded as UTF-8 (undecodable bytes replaced).

        Raises:
            FidelityInputError: the file does not exist or cannot be read.
        """
        path = self.path
        if not path.is_file() and self.folder is not None:
            raise FidelityInputError(
                f"the text {self.label!r} needs {path}, which does not exist; "
                f"{self.folder.hint()}, or pass other documents "
                "(FidelityConfig.plain_docs / recall_pairs)"
            )
        try:
            raw = path.read_bytes()
            if path.suffix == ".gz":
                raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            raise FidelityInputError(
                f"cannot read the text {self.label!r} from {path}: {err}; pass other "
                "documents (FidelityConfig.plain_docs / recall_pairs)"
            ) from err
        return raw.decode("utf-8", errors="replace")


def licence(name: str, label: str | None = None) -> Document:
    """The licence text ``name`` (e.g. ``"GPL-3"``) of :data:`LICENCES`."""
    return Document(label or f"{name} licence", Path(name), LICENCES)


def debian_doc(name: str, label: str) -> Document:
    """A file under :data:`DEBIAN_DOCS`, e.g. ``"bash/NEWS.gz"``."""
    return Document(label, Path(name), DEBIAN_DOCS)


def missing_note(docs: Iterable[Document]) -> str:
    """``"; missing: A, B"`` for the documents whose files do not exist now (else ``""``),
    with the variables that would move them."""
    docs = list(docs)
    missing = [str(doc.path) for doc in docs if not doc.exists()]
    if not missing:
        return ""
    hints = dict.fromkeys(
        doc.folder.hint() for doc in docs if doc.folder is not None and not doc.exists()
    )
    return f"; missing: {', '.join(missing)}" + "".join(f"; {hint}" for hint in hints)


def docstring_prose(path: Path) -> str:
    """Every docstring of a Python module, one paragraph each, in source order.

    English prose that exists wherever CPython's sources do.
    """
    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 80:
                parts.append(doc.strip())
    return "\n\n".join(parts)


# Plain-text continuation: one licence, one Debian document, one stdlib module.
PLAIN_DOCS: tuple[Document, ...] = (
    licence("GPL-3"),
    debian_doc("bash/COMPAT.gz", "bash COMPAT (Debian doc)"),
    Document("argparse.py (stdlib)", stdlib_file("argparse.py")),
)

# Recall: (passage, filler) pairs from different sources.
RECALL_PAIRS: tuple[tuple[Document, Document], ...] = (
    (
        licence("Apache-2.0"),
        Document("subprocess.py (stdlib)", stdlib_file("subprocess.py")),
    ),
    (
        Document("functools.py (stdlib)", stdlib_file("functools.py")),
        debian_doc("bash/NEWS.gz", "bash NEWS (Debian doc)"),
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
