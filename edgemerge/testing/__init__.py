"""Helpers for tests: :mod:`~edgemerge.testing.tiny_models` writes tiny random-weight GGUF
models with real tokenizers."""

from edgemerge._lazy import lazy_submodules

__getattr__, __dir__ = lazy_submodules(globals())
