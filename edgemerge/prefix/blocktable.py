"""Block table of one sequence: identity, content signature, use and merge state per block.

A *block* is ``block_size`` consecutive positions of a sequence; only sealed (full)
blocks are listed. Each carries

- ``prefix_hash``: the chained blake2b of :func:`edgemerge.reference.hashing.prefix_block_hashes`
  (equal hashes mean equal token prefixes), the key of prefix reuse;
- ``signature``: a 64-bit SimHash of the block's content. From keys when they are at
  hand (the centred mean key direction, :func:`~edgemerge.reference.hashing.simhash_signatures`),
  otherwise from the block's token ids (see :func:`token_signatures`), which finds blocks
  that share most of their tokens, in any order;
- ``ref_count`` and ``last_use``: how many active holders use the block, and when it was
  last used (a caller-chosen clock), for eviction;
- ``start``: its first position; ``merged``: whether a cell reaching into it stands for
  more than one position (its keys are no longer the ones the tokens would produce).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from edgemerge.reference.hashing import prefix_block_hashes, simhash_signatures, splitmix64

_TOKEN_SIGNATURE_SEED = 0x5EED_B10C


@dataclass
class Block:
    """One sealed block of a sequence (mutable use counters, fixed identity)."""

    index: int
    start: int
    prefix_hash: bytes
    signature: int
    merged: bool = False
    ref_count: int = 0
    last_use: float = 0.0

    @property
    def depth(self) -> int:
        """Blocks before and including this one (the position score of eviction)."""
        return self.index + 1


def token_signatures(tokens: Sequence[int] | np.ndarray, block_size: int) -> np.ndarray:
    """64-bit SimHash of each full block's bag of token ids.

    Every token id maps to 64 pseudo-random signs (``splitmix64`` of the id); a bit of
    the signature is the sign of the block's sum of those signs. Blocks sharing most
    tokens get close signatures (small Hamming distance), whatever their order.

    Returns:
        uint64 ``[len(tokens) // block_size]``.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    ids = np.asarray(tokens, dtype=np.int64)
    n_block = ids.size // block_size
    if n_block == 0:
        return np.zeros(0, dtype=np.uint64)
    ids = ids[: n_block * block_size].reshape(n_block, block_size)
    words = splitmix64(_TOKEN_SIGNATURE_SEED, ids.astype(np.uint64))  # [block, tok]
    bit = np.arange(64, dtype=np.uint64)
    signs = ((words[..., None] >> bit) & np.uint64(1)).astype(np.int64) * 2 - 1
    votes = signs.sum(axis=1)  # [block, 64]
    # ties (an even split) go to 0: deterministic, and rare for realistic block sizes
    bits = (votes > 0).astype(np.uint64)
    return np.bitwise_or.reduce(bits << bit, axis=1)


def merged_blocks(span_min: np.ndarray, span_max: np.ndarray, n_block: int, block_size: int):
    """Which of the first ``n_block`` blocks a multi-position cell reaches into.

    Returns:
        bool ``[n_block]``.
    """
    out = np.zeros(n_block, dtype=bool)
    lo = np.asarray(span_min, dtype=np.int64)
    hi = np.asarray(span_max, dtype=np.int64)
    wide = hi > lo
    for a, b in zip(lo[wide] // block_size, hi[wide] // block_size, strict=True):
        if a < n_block:
            out[a : min(b, n_block - 1) + 1] = True
    return out


@dataclass
class BlockTable:
    """The sealed blocks of one sequence (see module doc)."""

    block_size: int
    blocks: list[Block] = field(default_factory=list)
    signature_source: str = "tokens"

    @classmethod
    def from_tokens(
        cls,
        tokens: Sequence[int] | np.ndarray,
        block_size: int,
        *,
        root: bytes = b"",
        spans: np.ndarray | None = None,
        keys: np.ndarray | None = None,
        key_layers: Sequence[int] | None = None,
        now: float = 0.0,
    ) -> BlockTable:
        """Build the table of ``tokens``.

        Args:
            tokens: the sequence's token ids.
            block_size: tokens per block.
            root: namespace of the prefix hashes (e.g. a model id).
            spans: int ``[n_cells, 2]`` first/last position of each cell, to flag merged
                blocks; None when nothing is merged.
            keys: float ``[n_layer, n_head, n_tok, d]`` keys of the tokens, one per
                position (an unmerged cache); the signature then comes from them.
            key_layers: layers of ``keys`` for the signature (default: latter half).
            now: the ``last_use`` of every block.
        """
        hashes = prefix_block_hashes(tokens, block_size, root=root)
        n_block = len(hashes)
        if keys is not None:
            k = np.asarray(keys)
            if k.ndim != 4 or k.shape[2] < n_block * block_size:
                raise ValueError(
                    f"keys must be [n_layer, n_head, n_tok >= {n_block * block_size}, d], "
                    f"got shape {k.shape}"
                )
            groups = None if key_layers is None else [list(key_layers)]
            sig = simhash_signatures(k[:, :, : n_block * block_size], block_size, groups)[:, 0]
            source = "keys"
        else:
            sig = token_signatures(tokens, block_size)
            source = "tokens"
        merged = (
            merged_blocks(spans[:, 0], spans[:, 1], n_block, block_size)
            if spans is not None and len(spans)
            else np.zeros(n_block, dtype=bool)
        )
        blocks = [
            Block(i, i * block_size, h, int(sig[i]), bool(merged[i]), 0, now)
            for i, h in enumerate(hashes)
        ]
        return cls(block_size, blocks, source)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def hashes(self) -> list[bytes]:
        return [b.prefix_hash for b in self.blocks]

    @property
    def n_tokens(self) -> int:
        """Tokens covered by sealed blocks."""
        return len(self.blocks) * self.block_size

    def hold(self, n_blocks: int | None = None, now: float | None = None) -> None:
        """An active sequence starts using the first ``n_blocks`` blocks (default all)."""
        for b in self.blocks[: len(self.blocks) if n_blocks is None else n_blocks]:
            b.ref_count += 1
            if now is not None:
                b.last_use = now

    def release(self, n_blocks: int | None = None) -> None:
        """Undo :meth:`hold`; a count never goes below 0 (that would be a caller bug)."""
        for b in self.blocks[: len(self.blocks) if n_blocks is None else n_blocks]:
            if b.ref_count == 0:
                raise ValueError(f"block {b.index} is not held; release() without hold()")
            b.ref_count -= 1

    @property
    def ref_count(self) -> int:
        """Most holders of any block (0: nothing of this sequence is in use)."""
        return max((b.ref_count for b in self.blocks), default=0)

    @property
    def last_use(self) -> float:
        return max((b.last_use for b in self.blocks), default=0.0)
