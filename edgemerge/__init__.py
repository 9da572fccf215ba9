"""edgemerge: a llama.cpp edge runtime with a KV cache that stays inside a memory budget.

Importing edgemerge points llama-cpp-python at edgemerge's patched libllama
(``LLAMA_CPP_LIB_PATH``); import it before ``llama_cpp``. Submodules are attributes
imported on first use (``edgemerge.models``, ``edgemerge.evaluation.suite``), so
``import edgemerge`` itself stays light.
"""

from edgemerge._lazy import lazy_submodules
from edgemerge.native._libpath import LibraryMismatchError, install_library_path

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


_submodule, __dir__ = lazy_submodules(globals())


def __getattr__(name: str):  # noqa: ANN202
    # Llama pulls in llama_cpp (and loads libllama): only when asked for.
    if name in ("Llama", "MergeStats"):
        from edgemerge import llama

        return getattr(llama, name)
    return _submodule(name)
