"""``full``: the uncompressed cache (the reference every method is measured against)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from edgemerge.methods._build import identity
from edgemerge.methods.base import CompressedKV, CompressionMethod, KVSnapshot


@dataclass(frozen=True)
class Full(CompressionMethod):
    """Keep every cell as it is; the budget must hold all of them."""

    name: ClassVar[str] = "full"
    reduces_cells: ClassVar[bool] = False

    def compress(self, kv: KVSnapshot, budget: int) -> CompressedKV:
        """Return ``kv`` unchanged, one cell per token.

        Raises:
            ValueError: ``budget < kv.n_tok``.
        """
        self.check_budget(kv, budget)
        return identity(kv)
