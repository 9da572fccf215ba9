"""edgemerge: a llama.cpp edge runtime with a KV cache that stays inside a memory budget.

Importing edgemerge points llama-cpp-python at edgemerge's patched libllama
(``LLAMA_CPP_LIB_PATH``); import it before ``llama_cpp``.
"""

from edgemerge._libpath import LibraryMismatchError, install_library_path

__version__ = "0.1.0"

install_library_path()

from edgemerge.settings import MergeSettings, SettingsError  # noqa: E402

__all__ = [
    "Llama",
    "LibraryMismatchError",
    "MergeSettings",
    "MergeStats",
    "SettingsError",
    "__version__",
]


def __getattr__(name: str):  # noqa: ANN202
    # Llama pulls in llama_cpp (and loads libllama): only when asked for.
    if name in ("Llama", "MergeStats"):
        from edgemerge import llama

        return getattr(llama, name)
    raise AttributeError(f"module 'edgemerge' has no attribute {name!r}")
