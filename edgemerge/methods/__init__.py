"""KV cache compression methods, one per module, behind one registry (in kvpress's spirit).

Every method is a frozen dataclass of its settings with one entry point::

    method = get_method("blockmerge", recent=64)  # blockmerge: MergeSettings names
    compressed = method.compress(snapshot, budget)   # KVSnapshot -> CompressedKV

See :mod:`edgemerge.methods.base` for the data types and the shared-cells rule.
"""

from __future__ import annotations

import dataclasses

from edgemerge._lazy import lazy_submodules
from edgemerge.methods.base import CompressedKV, CompressionMethod, KVSnapshot
from edgemerge.methods.blockmerge import BlockMerge
from edgemerge.methods.cam import CaM
from edgemerge.methods.expected_attention import ExpectedAttention
from edgemerge.methods.full import Full
from edgemerge.methods.h2o import H2O
from edgemerge.methods.keydiff import KeyDiff
from edgemerge.methods.kv_quant import KVQuant
from edgemerge.methods.kvmerger import KVMerger
from edgemerge.methods.snapkv import SnapKV
from edgemerge.methods.streaming_llm import StreamingLLM

METHODS: dict[str, type[CompressionMethod]] = {
    cls.name: cls
    for cls in (
        Full,
        StreamingLLM,
        H2O,
        SnapKV,
        ExpectedAttention,
        KeyDiff,
        CaM,
        KVMerger,
        BlockMerge,
        KVQuant,
    )
}


def get_method(name: str, **settings: object) -> CompressionMethod:
    """An instance of the method registered as ``name`` with ``settings``.

    Raises:
        ValueError: unknown name, or a setting the method does not have.
    """
    cls = METHODS.get(name)
    if cls is None:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    from_options = getattr(cls, "from_options", None)
    if from_options is not None:  # blockmerge takes MergeSettings field names
        return from_options(**settings)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ValueError(
            f"method {name!r} has no setting(s) {', '.join(unknown)}; its settings: "
            f"{', '.join(sorted(fields)) or '(none)'}"
        )
    return cls(**settings)


__all__ = [
    "METHODS",
    "BlockMerge",
    "CaM",
    "CompressedKV",
    "CompressionMethod",
    "ExpectedAttention",
    "Full",
    "H2O",
    "KVMerger",
    "KVQuant",
    "KVSnapshot",
    "KeyDiff",
    "SnapKV",
    "StreamingLLM",
    "get_method",
]

__getattr__, __dir__ = lazy_submodules(globals())
