"""llama.cpp's log on stderr, filtered by level with ggml's current level numbers.

llama-cpp-python 0.3 installs a log callback whose table has ggml's old level order
(INFO=1, WARN=2, ERROR=3, DEBUG=4), while the ggml it runs on numbers them DEBUG=1,
INFO=2, WARN=3, ERROR=4. Its quiet mode (``verbose=False``: the ``llama-cpp-python``
logger at ERROR) therefore prints llama.cpp's *warnings* and drops its *errors*. Model
loading hides this (llama-cpp-python redirects stderr around it), but context creation
does not, so ``Llama(verbose=False)`` on Gemma 3 still writes ``llama_kv_cache_iswa:
using full-size SWA cache ...`` into the terminal, and a failed decode's reason
(``invalid token[0] = ...``) never appears.

:func:`install` replaces that callback with one that reads the same switch (the
``llama-cpp-python`` logger's level, which ``llama_cpp.Llama(verbose=...)`` sets for the
whole process) and the right numbers: quiet prints llama.cpp's errors only, verbose
everything.
"""

from __future__ import annotations

import ctypes
import logging
import sys

import llama_cpp

# enum ggml_log_level (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_LEVELS = {
    0: logging.CRITICAL,
    1: logging.DEBUG,
    2: logging.INFO,
    3: logging.WARNING,
    4: logging.ERROR,
}
_CONT = 5
_LOGGER = logging.getLogger("llama-cpp-python")  # llama_cpp.Llama(verbose=) sets its level
_last_shown = False  # whether the message a CONT piece continues was printed


@llama_cpp.llama_log_callback
def _print_filtered(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    global _last_shown
    if level != _CONT:
        _last_shown = _LOGGER.getEffectiveLevel() <= _LEVELS.get(level, logging.ERROR)
    if _last_shown:
        print(text.decode("utf-8", errors="replace"), end="", flush=True, file=sys.stderr)


def set_verbose(verbose: bool) -> None:
    """What ``llama_cpp.Llama(verbose=...)`` does to the log, for code that drives llama.cpp
    without a ``Llama`` (edgemerge.native.capture)."""
    _LOGGER.setLevel(logging.DEBUG if verbose else logging.ERROR)


def install() -> None:
    """Make llama.cpp (and ggml) log through the filter above; safe to call again."""
    llama_cpp.llama_log_set(_print_filtered, ctypes.c_void_p(0))


install()
