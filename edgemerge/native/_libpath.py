"""Point llama-cpp-python at edgemerge's patched libllama before it loads.

llama-cpp-python reads ``LLAMA_CPP_LIB_PATH`` once, when ``llama_cpp`` is first
imported, and loads ``libllama`` from there. edgemerge therefore has to set it
before anything imports ``llama_cpp``; if ``llama_cpp`` is already loaded with
another library, every edgemerge feature would silently run on the wrong code,
so that is an error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The package root (edgemerge/), which the build installs lib/, include/ and data/ into.
PACKAGE_DIR = Path(__file__).resolve().parents[1]

# Developer override: EDGEMERGE_LIB_DIR names a folder of native libraries built
# outside the package (e.g. a scratch build of a new patch), laid out like the
# installed package: the libraries in it, the matching edgemerge.h in ../include.
# Unset, the package's own build is used.
_LIB_DIR_OVERRIDE = os.environ.get("EDGEMERGE_LIB_DIR")
LIB_DIR = (
    Path(_LIB_DIR_OVERRIDE).expanduser().resolve() if _LIB_DIR_OVERRIDE else PACKAGE_DIR / "lib"
)
INCLUDE_DIR = LIB_DIR.parent / "include"


class LibraryMismatchError(ImportError):
    """``llama_cpp`` was imported with a libllama that is not edgemerge's."""


def _loaded_llama_path() -> Path | None:
    mod = sys.modules.get("llama_cpp.llama_cpp")
    if mod is None:
        return None
    base = getattr(mod, "_base_path", None)
    return Path(base).resolve() if base is not None else None


def install_library_path() -> Path:
    """Make ``llama_cpp`` load edgemerge's libraries; return their folder.

    Raises:
        FileNotFoundError: the native build is missing from the package.
        LibraryMismatchError: ``llama_cpp`` was imported first, from elsewhere.
    """
    if not (LIB_DIR / _libname("llama")).exists():
        if _LIB_DIR_OVERRIDE:
            raise FileNotFoundError(
                f"EDGEMERGE_LIB_DIR={LIB_DIR} holds no {_libname('llama')}. Point it at a folder "
                "with edgemerge's native libraries, or unset it to use the installed build."
            )
        raise FileNotFoundError(
            f"edgemerge's native libraries are missing from {LIB_DIR}. "
            "Install edgemerge with `pip install .` (not an editable or source-tree import) "
            "so that the patched llama.cpp is built."
        )
    loaded = _loaded_llama_path()
    if loaded is not None and loaded != LIB_DIR.resolve():
        raise LibraryMismatchError(
            f"llama_cpp was imported before edgemerge and loaded libllama from {loaded}, "
            f"not edgemerge's patched build in {LIB_DIR}. Import edgemerge before llama_cpp "
            f"(or set LLAMA_CPP_LIB_PATH={LIB_DIR}) and restart Python."
        )
    os.environ["LLAMA_CPP_LIB_PATH"] = str(LIB_DIR)
    return LIB_DIR


def _libname(stem: str) -> str:
    if sys.platform == "darwin":
        return f"lib{stem}.dylib"
    if sys.platform == "win32":
        return f"{stem}.dll"
    return f"lib{stem}.so"


def library_file(stem: str) -> Path:
    """Path of one of edgemerge's shared libraries, e.g. ``library_file("llama")``."""
    return LIB_DIR / _libname(stem)
