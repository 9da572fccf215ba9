"""Helpers shared by tests (not fixtures)."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import edgemerge
from edgemerge.evaluation.texts import (
    Document,
    docstring_prose,
    licence,
    missing_note,
    stdlib_file,
)

if TYPE_CHECKING:
    from edgemerge.evaluation.suite import SuiteConfig


def package_env() -> dict[str, str]:
    """Environment for a child Python that must import the same edgemerge as the tests.

    Tests run against the installed package in CI and against the source tree
    in development; a child started from another folder would otherwise pick
    whichever comes first on its own path.
    """
    env = dict(os.environ)
    root = str(Path(edgemerge.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # `python -m edgemerge` run from a checkout would import the source tree (the current
    # folder comes first on sys.path), which has no native build in CI
    env["PYTHONSAFEPATH"] = "1"
    env.pop("LLAMA_CPP_LIB_PATH", None)
    return env


# Modules whose docstrings make the English test text: long, prose-heavy, and part of
# every CPython, so tests that only need "some real text" never skip.
_PROSE_MODULES = ("subprocess.py", "threading.py", "logging/__init__.py")


@functools.cache
def english_text() -> str:
    """About 50 kB of English prose (stdlib docstrings; some 10k tokens), on any machine."""
    return "\n\n".join(docstring_prose(stdlib_file(name)) for name in _PROSE_MODULES)


def licence_text(name: str) -> str:
    """The licence text ``name`` (e.g. ``"GPL-3"``) from the licence folder; the test is
    skipped, naming the file and ``EDGEMERGE_LICENSES_DIR``, where it is missing."""
    require_documents([licence(name)])
    return licence(name).read()


def require_documents(docs: Iterable[Document]) -> None:
    """Skip the calling test unless every document's file exists (system texts such as
    the Debian licences are absent on macOS)."""
    note = missing_note(docs)
    if note:
        pytest.skip(f"needs system texts{note}")


def require_suite_texts(config: SuiteConfig) -> None:
    """Skip unless the system texts that ``edgemerge bench`` reads for ``config`` exist:
    its continuation and recall documents and the first haystack document (which alone
    holds enough for the test presets)."""
    from edgemerge.evaluation import tasks, texts

    pairs = texts.RECALL_PAIRS[: config.n_recall]
    require_documents(
        [
            *texts.PLAIN_DOCS[: config.n_continuation],
            *(doc for pair in pairs for doc in pair),
            tasks.FILLER_DOCS[0],
        ]
    )
