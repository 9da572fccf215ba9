"""cffi (ABI mode) bindings to edgemerge's C API, compiled into the patched libllama.

The cdef is read from the installed ``edgemerge.h`` itself (the block between
its CDEF markers), so the header stays the single source of truth, for the
functions and for the constants (``lib().EDGEMERGE_BIAS_MAX`` and the like).

The wrappers over the bindings and over llama.cpp's state are its submodules
(attributes, imported on first use):

- :mod:`~edgemerge.native.ops`: the ggml ops of the patch series, run in isolation.
- :mod:`~edgemerge.native.kvcells`: per-cell bias, span and positions of a live cache.
- :mod:`~edgemerge.native.kvmerge`: merge features and merges inside a live cache.
- :mod:`~edgemerge.native.kvstate`: llama.cpp's per-sequence state, parsed and written.
- :mod:`~edgemerge.native.capture`: a real model's KV cache, queries and attention mass.
- ``_libpath`` (where the built libraries are; pointing llama-cpp-python at them) and
  ``_llamalog`` (llama.cpp's log, filtered by the right levels).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING

from edgemerge._lazy import lazy_submodules
from edgemerge.native._libpath import INCLUDE_DIR, library_file

if TYPE_CHECKING:
    import cffi

__getattr__, __dir__ = lazy_submodules(globals())

HEADER = INCLUDE_DIR / "edgemerge.h"
_CDEF_RE = re.compile(r"/\* EDGEMERGE_CDEF_BEGIN \*/(.*?)/\* EDGEMERGE_CDEF_END \*/", re.S)


class NativeError(RuntimeError):
    """An edgemerge C call failed; the message is the library's own."""


def cdef_from_header(path: Path = HEADER) -> str:
    """The declarations cffi needs, taken from the CDEF block of ``path``."""
    match = _CDEF_RE.search(path.read_text())
    if match is None:
        raise NativeError(f"{path} has no EDGEMERGE_CDEF_BEGIN/END block")
    return match.group(1).replace("EDGEMERGE_API ", "")


@functools.cache
def _ffi_lib() -> tuple[cffi.FFI, object]:
    # cffi is imported here: `import edgemerge` imports this package (for _libpath).
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(cdef_from_header())
    # The same file llama-cpp-python loads (LLAMA_CPP_LIB_PATH), so both share one
    # copy of the library and its state.
    lib = ffi.dlopen(str(library_file("llama")))
    return ffi, lib


def ffi() -> cffi.FFI:
    return _ffi_lib()[0]


def lib():  # noqa: ANN201 - a cffi library object
    return _ffi_lib()[1]


def _str(ptr) -> str:  # noqa: ANN001
    return ffi().string(ptr).decode()


def version() -> str:
    """edgemerge's version as compiled into the patched libllama."""
    return _str(lib().edgemerge_version())


def check(status: int) -> None:
    """Raise :class:`NativeError` with the library's message if ``status`` is an error."""
    if status < 0:
        raise NativeError(_str(lib().edgemerge_last_error()) or f"edgemerge native error {status}")
