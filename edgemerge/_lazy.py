"""Submodules as attributes of their package, imported on first use.

``import edgemerge; edgemerge.models`` should work as the docs write it, without
``import edgemerge`` importing every submodule (llama_cpp, numba kernels) up front.
A package calls :func:`lazy_submodules` and assigns the two functions it returns to its
module-level ``__getattr__`` and ``__dir__`` (PEP 562).
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from types import ModuleType
from typing import Any


def lazy_submodules(
    namespace: dict[str, Any],
) -> tuple[Callable[[str], ModuleType], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the package whose ``globals()`` is ``namespace``.

    ``__getattr__(name)`` imports ``package.name`` when such a submodule exists (Python
    then also binds it on the package, so the hook runs once per submodule) and raises
    AttributeError otherwise; dunder names are never looked up as modules.
    """
    package: str = namespace["__name__"]
    path = list(namespace["__path__"])

    def __getattr__(name: str) -> ModuleType:
        if name.isidentifier() and not name.startswith("__"):
            full = f"{package}.{name}"
            if importlib.util.find_spec(full) is not None:
                return importlib.import_module(full)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | {m.name for m in pkgutil.iter_modules(path)})

    return __getattr__, __dir__
