"""edgemerge: a llama.cpp edge runtime with a KV cache that stays inside a memory budget.

Importing edgemerge points llama-cpp-python at edgemerge's patched libllama
(``LLAMA_CPP_LIB_PATH``); import it before ``llama_cpp``.
"""

from edgemerge._libpath import LibraryMismatchError, install_library_path

__version__ = "0.1.0"

install_library_path()

__all__ = ["LibraryMismatchError", "__version__"]
