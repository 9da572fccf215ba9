"""``streaming_llm``: attention sinks plus a recent window (StreamingLLM, Xiao et al. 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from edgemerge.methods._build import identity, keep_tokens
from edgemerge.methods.base import CompressedKV, CompressionMethod, KVSnapshot
from edgemerge.reference._checks import positive_int


@dataclass(frozen=True)
class StreamingLLM(CompressionMethod):
    """Keep the first ``n_sink`` cells and fill the rest of the budget with the latest ones.

    Attributes:
        n_sink: attention-sink cells kept at the start (StreamingLLM uses 4).
    """

    name: ClassVar[str] = "streaming_llm"
    n_sink: int = 4

    def __post_init__(self) -> None:
        positive_int(self.n_sink, "n_sink", minimum=0)

    def protected_cells(self, n_tok: int) -> int:
        return self.n_sink + 1  # the sinks and at least the latest token

    def compress(self, kv: KVSnapshot, budget: int) -> CompressedKV:
        """Keep ``n_sink`` sinks and the latest ``budget - n_sink`` cells; evict the middle."""
        budget = self.check_budget(kv, budget)
        if kv.n_tok <= budget:
            return identity(kv)
        n_recent = budget - self.n_sink
        keep = np.concatenate([np.arange(self.n_sink), np.arange(kv.n_tok - n_recent, kv.n_tok)])
        return keep_tokens(kv, keep, info={"n_recent": n_recent})
