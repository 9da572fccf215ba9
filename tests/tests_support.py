"""Helpers shared by tests (not fixtures)."""

from __future__ import annotations

import os
from pathlib import Path

import edgemerge


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
