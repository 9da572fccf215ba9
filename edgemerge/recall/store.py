"""The block store: original K/V rows of cells that merging or eviction took out of the cache.

Rows are kept in the store's ggml type (:class:`RowFormat`, one per store, since a context
has one cache type): by default the cache's own type, raw bytes, so a restore writes back
byte-identical cells; with ``MergeSettings.store_type="q8_0"`` the rows of an f32/f16/bf16
cache are kept as q8_0 (34 bytes per 32 values instead of 64 for f16) and come back as
the cache type's encoding of their q8_0 values. Entries are grouped by block (``position //
block_size``); each position carries the token it was computed for, so a restore can
refuse rows whose token no longer matches the sequence.

Memory: up to ``ram_bytes`` of blocks stay in RAM; beyond that the least recently used
blocks spill to one append-only file under ``spill_dir`` (each record with a CRC32).
A record that is missing or fails its checksum when read back is dropped with a
warning: recall loses those blocks, generation is never fed wrong rows.

Shapes (``n_layer`` cache layers, ``m`` positions of a block), in the store's type:
    k: uint8 ``[n_layer, m, k_row_bytes]``; v: uint8 ``[n_layer, m, v_cell_bytes]``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemerge.reference import ggml_quants

# Cache types whose rows store_type="q8_0" re-encodes; a quantized cache is already at
# least as small, and re-quantizing it would only add error.
FLOAT_TYPES = (ggml_quants.GGML_TYPE_F32, ggml_quants.GGML_TYPE_F16, ggml_quants.GGML_TYPE_BF16)
F16_MAX = 65504.0
# q8_0's scale is an f16, so |x| past 127 * F16_MAX has no finite code
_Q8_MAX = 127.0 * F16_MAX


_EMPTY_ROWS = np.zeros((0, 0, 0), np.uint8)


class StoreWarning(UserWarning):
    """Stored blocks were lost (missing or corrupt spill file); recall degrades."""


@dataclass(frozen=True)
class RowFormat:
    """How one side (K or V) of a cache is kept: cache rows of ``cache_type`` with
    ``width`` values each, stored as rows of ``store_type`` (ggml type ids)."""

    cache_type: int
    store_type: int
    width: int

    def __post_init__(self) -> None:
        # a bad width must fail here, once, not at the first merge of a long chat
        ggml_quants.row_bytes(self.cache_type, self.width)
        ggml_quants.row_bytes(self.store_type, self.width)

    @classmethod
    def choose(cls, cache_type: int, width: int, store_type: str) -> RowFormat:
        """The format ``MergeSettings.store_type`` asks for a cache side: "cache" keeps
        the cache's type; "q8_0" re-encodes float caches only."""
        if store_type == "q8_0" and cache_type in FLOAT_TYPES:
            return cls(cache_type, ggml_quants.GGML_TYPE_Q8_0, width)
        return cls(cache_type, cache_type, width)

    @property
    def identity(self) -> bool:
        return self.store_type == self.cache_type

    def encode(self, rows: np.ndarray) -> np.ndarray:
        """uint8 cache rows ``[..., cache bytes]`` -> uint8 store rows ``[..., store bytes]``."""
        if self.identity:
            return rows
        x = ggml_quants.dequantize_rows(rows, self.cache_type, self.width)
        # the q8_0 encoder refuses non-finite values (an overflowed row); storing must
        # not fail in the middle of a merge, so they, and values past q8_0's range, clip
        x = np.nan_to_num(x, nan=0.0, posinf=_Q8_MAX, neginf=-_Q8_MAX)
        return ggml_quants.quantize_rows(np.clip(x, -_Q8_MAX, _Q8_MAX), self.store_type)

    def decode(self, rows: np.ndarray) -> np.ndarray:
        """uint8 store rows -> uint8 cache rows (the cache type's encoding of the stored
        values: f16 rounds to nearest even, as ggml does)."""
        if self.identity:
            return rows
        x = ggml_quants.dequantize_rows(rows, self.store_type, self.width)
        if self.cache_type == ggml_quants.GGML_TYPE_F16:
            # 127 * the f16-rounded scale can pass F16_MAX (an original near it) and
            # would come back as inf
            x = np.clip(x, -F16_MAX, F16_MAX)
        return ggml_quants.quantize_rows(x, self.cache_type)

    def values(self, rows: np.ndarray) -> np.ndarray:
        """uint8 store rows -> float32 ``[..., width]`` (for scoring)."""
        return ggml_quants.dequantize_rows(rows, self.store_type, self.width)


@dataclass
class StoredBlock:
    """Originals of some positions of one block, sorted by position; rows in the
    store's type (:meth:`BlockStore.cache_rows` gives them in the cache's)."""

    positions: np.ndarray  # int32 [m]
    tokens: np.ndarray  # int32 [m]
    k: np.ndarray  # uint8 [n_layer, m, k_row_bytes]
    v: np.ndarray | None  # uint8 [n_layer, m, v_cell_bytes], None for a K-only cache

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + (self.v.nbytes if self.v is not None else 0))

    def merged_with(self, other: StoredBlock) -> StoredBlock:
        """This block's rows plus ``other``'s positions it lacks (rows are immutable)."""
        new = ~np.isin(other.positions, self.positions)
        if not new.any():
            return self
        pos = np.concatenate([self.positions, other.positions[new]])
        order = np.argsort(pos, kind="stable")

        def cat(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            if a is None or b is None:
                return None
            return np.ascontiguousarray(np.concatenate([a, b[:, new]], axis=1)[:, order])

        return StoredBlock(
            pos[order],
            np.concatenate([self.tokens, other.tokens[new]])[order],
            cat(self.k, other.k),
            cat(self.v, other.v),
        )

    def select(self, keep: np.ndarray) -> StoredBlock:
        return StoredBlock(
            self.positions[keep],
            self.tokens[keep],
            np.ascontiguousarray(self.k[:, keep]),
            None if self.v is None else np.ascontiguousarray(self.v[:, keep]),
        )


class StoreFileError(ValueError):
    """A saved store (:class:`StoreSnapshot` arrays) is inconsistent or does not fit."""


_NO_FORMAT = (-1, -1, -1)


def _format_tuple(fmt: RowFormat | None) -> tuple[int, int, int]:
    return _NO_FORMAT if fmt is None else (fmt.cache_type, fmt.store_type, fmt.width)


@dataclass(frozen=True)
class StoreSnapshot:
    """Every position a :class:`BlockStore` holds, as flat arrays: what a saved chat
    keeps so that, loaded again, it can still recall what had left its cache.

    ``N`` positions in ascending order, rows in the store's type:
    positions, tokens: int32 ``[N]``; k: uint8 ``[n_layer, N, k_row_bytes]``;
    v: uint8 ``[n_layer, N, v_row_bytes]`` or None (a K-only cache).
    ``formats``: ``(cache_type, store_type, width)`` of K and of V, ``(-1, -1, -1)`` for
    a side kept as given.
    """

    block_size: int
    formats: tuple[tuple[int, int, int], tuple[int, int, int]]
    positions: np.ndarray
    tokens: np.ndarray
    k: np.ndarray
    v: np.ndarray | None

    def __post_init__(self) -> None:
        n = self.positions.shape[0] if self.positions.ndim == 1 else -1
        if self.block_size < 1:
            raise StoreFileError(f"block size {self.block_size} is not positive")
        if n < 0 or self.tokens.shape != (n,):
            raise StoreFileError(
                f"positions {self.positions.shape} and tokens {self.tokens.shape} "
                "are not two vectors of one length"
            )
        if self.positions.dtype != np.int32 or self.tokens.dtype != np.int32:
            raise StoreFileError("positions and tokens must be int32")
        if n and (self.positions[0] < 0 or np.any(np.diff(self.positions) <= 0)):
            raise StoreFileError("positions must be non-negative and strictly increasing")
        for side, rows, fmt in (("k", self.k, self.formats[0]), ("v", self.v, self.formats[1])):
            if rows is None:
                continue
            if rows.dtype != np.uint8 or rows.ndim != 3 or rows.shape[1] != n:
                raise StoreFileError(
                    f"{side} rows must be uint8 [n_layer, {n}, bytes], got {rows.dtype} "
                    f"{rows.shape}"
                )
            if fmt != _NO_FORMAT and n:
                want = ggml_quants.row_bytes(fmt[1], fmt[2])
                if rows.shape[2] != want:
                    raise StoreFileError(
                        f"{side} rows hold {rows.shape[2]} bytes, their format {fmt} needs {want}"
                    )
        if self.v is not None and self.v.shape[0] != self.k.shape[0]:
            raise StoreFileError(f"k has {self.k.shape[0]} layers, v {self.v.shape[0]}")

    def to_arrays(self, prefix: str = "store_") -> dict[str, np.ndarray]:
        """Named arrays for ``np.savez`` (no pickles); :meth:`from_arrays` reads them."""
        out = {
            "block_size": np.int64(self.block_size),
            "formats": np.asarray(self.formats, np.int64),
            "positions": self.positions,
            "tokens": self.tokens,
            "k": self.k,
        }
        if self.v is not None:
            out["v"] = self.v
        return {prefix + name: value for name, value in out.items()}

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], prefix: str = "store_"
    ) -> StoreSnapshot | None:
        """The snapshot saved by :meth:`to_arrays`; None when ``arrays`` holds none.
        Raises :class:`StoreFileError` naming what is missing or inconsistent."""
        names = ("block_size", "formats", "positions", "tokens", "k")
        present = [n for n in names if prefix + n in arrays]
        if not present:
            return None
        if len(present) != len(names):
            missing = sorted(set(names) - set(present))
            raise StoreFileError(f"the saved store lacks {', '.join(prefix + m for m in missing)}")
        formats = np.asarray(arrays[prefix + "formats"])
        if formats.shape != (2, 3):
            raise StoreFileError(f"formats must be 2 x 3, got {formats.shape}")
        k_fmt, v_fmt = (tuple(int(x) for x in row) for row in formats)
        try:
            return cls(
                int(arrays[prefix + "block_size"]),
                (k_fmt, v_fmt),  # type: ignore[arg-type]
                np.asarray(arrays[prefix + "positions"]),
                np.asarray(arrays[prefix + "tokens"]),
                np.asarray(arrays[prefix + "k"]),
                np.asarray(arrays[prefix + "v"]) if prefix + "v" in arrays else None,
            )
        except StoreFileError:
            raise
        except (TypeError, ValueError) as err:
            raise StoreFileError(f"the saved store cannot be read ({err})") from err


@dataclass(frozen=True)
class _Spilled:
    offset: int
    length: int
    crc: int
    shapes: tuple[tuple[int, ...], tuple[int, ...] | None]
    m: int


@dataclass(frozen=True)
class StoreStats:
    """Counters of a :class:`BlockStore`."""

    blocks: int
    positions: int
    ram_bytes: int
    disk_bytes: int
    stored: int  # positions ever put in
    restored: int  # positions taken back out for a restore
    lost: int  # positions dropped because a spill record was missing or corrupt


class BlockStore:
    """Originals of merged or evicted cells, by block, in RAM then a spill file.

    Args:
        block_size: positions per block (``MergeSettings.block_size``).
        ram_bytes: bytes of blocks kept in RAM before spilling.
        spill_dir: directory of the spill file (created on first spill).
        k_format, v_format: how K and V rows are stored; None keeps the bytes given, as
            they are (rows of any width, no type known).
    """

    def __init__(
        self,
        block_size: int,
        ram_bytes: int,
        spill_dir: Path,
        k_format: RowFormat | None = None,
        v_format: RowFormat | None = None,
    ) -> None:
        self.block_size = block_size
        self.k_format = k_format
        self.v_format = v_format
        self.ram_limit = ram_bytes
        self.spill_dir = Path(spill_dir)
        self._ram: OrderedDict[int, StoredBlock] = OrderedDict()  # LRU order, oldest first
        self._disk: dict[int, _Spilled] = {}
        self._ram_bytes = 0
        self._file: Path | None = None
        self._file_end = 0
        self._stored = self._restored = self._lost = 0

    # -- filling -------------------------------------------------------------------------

    def put(
        self, positions: np.ndarray, tokens: np.ndarray, k: np.ndarray, v: np.ndarray | None
    ) -> None:
        """Store rows of ``positions`` (any order, any blocks); positions already stored
        keep their first rows (the cache never rewrites an original). ``k``/``v`` are cache
        rows ``[n_layer, len(positions), bytes]``; they are encoded to the store's type."""
        positions = np.asarray(positions, np.int32)
        if positions.size == 0:
            return
        k = _encode(self.k_format, k)
        v = None if v is None else _encode(self.v_format, v)
        blocks = positions // self.block_size
        for b in np.unique(blocks).tolist():
            sel = np.flatnonzero(blocks == b)
            sel = sel[np.argsort(positions[sel], kind="stable")]
            entry = StoredBlock(
                positions[sel],
                np.asarray(tokens, np.int32)[sel],
                np.ascontiguousarray(k[:, sel]),
                None if v is None else np.ascontiguousarray(v[:, sel]),
            )
            old = self._get(b)
            if old is not None:
                n_old = old.positions.size
                entry = old.merged_with(entry)
                self._stored += entry.positions.size - n_old
            else:
                self._stored += entry.positions.size
            self._set(b, entry)
        self._spill()

    # -- reading -------------------------------------------------------------------------

    def blocks(self) -> list[int]:
        """Block ids held, ascending."""
        return sorted(set(self._ram) | set(self._disk))

    def get(self, block: int) -> StoredBlock | None:
        """The block's rows (from RAM or the spill file), or None if it is not held or
        was lost."""
        return self._get(block)

    def cache_rows(self, entry: StoredBlock) -> tuple[np.ndarray, np.ndarray | None]:
        """``entry``'s K and V rows in the cache's type, ready to be written back."""
        k = _decode(self.k_format, entry.k)
        return k, None if entry.v is None else _decode(self.v_format, entry.v)

    def recode(self, k_format: RowFormat | None, v_format: RowFormat | None) -> None:
        """Keep every block, and those to come, in new formats (``store_type`` changed on
        a live context). Blocks are converted one at a time, so a spilled store is not
        read into RAM whole; a rewritten spilled block is appended to the spill file."""
        old_k, old_v = self.k_format, self.v_format
        if (old_k, old_v) == (k_format, v_format):
            return
        self.k_format, self.v_format = k_format, v_format
        for b in self.blocks():
            entry = self._get(b)  # raw bytes: reading does not depend on the format
            if entry is None:  # lost (already counted and warned about)
                continue
            k = _convert(entry.k, old_k, k_format)
            v = None if entry.v is None else _convert(entry.v, old_v, v_format)
            self._set(b, StoredBlock(entry.positions, entry.tokens, k, v))
            self._spill()

    def snapshot(self) -> StoreSnapshot:
        """Every held position (spilled blocks read back one at a time; a lost one is
        left out, with the warning reading it gives)."""
        entries = [e for e in (self._get(b) for b in self.blocks()) if e is not None]
        formats = (_format_tuple(self.k_format), _format_tuple(self.v_format))
        if not entries:
            empty = np.zeros(0, np.int32)
            return StoreSnapshot(self.block_size, formats, empty, empty, _EMPTY_ROWS, None)

        def cat(rows: list[np.ndarray]) -> np.ndarray:
            return np.ascontiguousarray(np.concatenate(rows, axis=1))

        return StoreSnapshot(
            self.block_size,
            formats,
            np.concatenate([e.positions for e in entries]),
            np.concatenate([e.tokens for e in entries]),
            cat([e.k for e in entries]),
            None if entries[0].v is None else cat([e.v for e in entries]),  # type: ignore[misc]
        )

    def load(self, snap: StoreSnapshot, keep: np.ndarray | None = None) -> int:
        """Replace the store's contents with ``snap``'s positions (those where ``keep``,
        bool ``[N]``, is true); returns how many. Rows in another format of the same
        cache type are converted. Raises :class:`StoreFileError` when the snapshot cannot
        be this store's (another block size, cache type or row width)."""
        if snap.block_size != self.block_size:
            raise StoreFileError(
                f"the saved store has blocks of {snap.block_size} positions, this one of "
                f"{self.block_size}"
            )
        mine = (self.k_format, self.v_format)
        for side, theirs, fmt in zip("KV", snap.formats, mine, strict=True):
            if fmt is None or theirs == _NO_FORMAT:
                if _format_tuple(fmt) != theirs:
                    raise StoreFileError(f"{side}: saved as {theirs}, this store keeps {fmt}")
            elif (theirs[0], theirs[2]) != (fmt.cache_type, fmt.width):
                raise StoreFileError(
                    f"{side}: the saved rows are of cache type {theirs[0]} with {theirs[2]} "
                    f"values, this cache is of type {fmt.cache_type} with {fmt.width}"
                )
        self.clear()
        sel = np.ones(snap.positions.size, bool) if keep is None else np.asarray(keep, bool)
        if not sel.any():
            return 0
        saved = [None if t == _NO_FORMAT else RowFormat(*t) for t in snap.formats]
        k = _convert(snap.k[:, sel], saved[0], self.k_format)
        v = None if snap.v is None else _convert(snap.v[:, sel], saved[1], self.v_format)
        positions, tokens = snap.positions[sel], snap.tokens[sel]
        blocks = positions // self.block_size
        # positions ascend, so each block is one contiguous run
        bounds = np.flatnonzero(np.diff(blocks)) + 1
        for lo, hi in zip(
            np.concatenate([[0], bounds]).tolist(),
            np.concatenate([bounds, [positions.size]]).tolist(),
            strict=True,
        ):
            entry = StoredBlock(
                positions[lo:hi].copy(),
                tokens[lo:hi].copy(),
                np.ascontiguousarray(k[:, lo:hi]),
                None if v is None else np.ascontiguousarray(v[:, lo:hi]),
            )
            self._set(int(blocks[lo]), entry)
            self._spill()
        self._stored += int(positions.size)
        return int(positions.size)

    def take(self, block: int) -> StoredBlock | None:
        """Remove and return the block (its rows go back into the cache)."""
        entry = self._get(block)
        if entry is not None:
            self._drop(block)
            self._restored += entry.positions.size
        return entry

    def drop_from(self, pos: int) -> None:
        """Forget every position ``>= pos`` (the sequence was cut there)."""
        for b in self.blocks():
            if (b + 1) * self.block_size <= pos:
                continue
            entry = self._get(b)
            self._drop(b)
            if entry is not None and b * self.block_size < pos:
                kept = entry.select(entry.positions < pos)
                if kept.positions.size:  # a block with nothing left must not stay listed
                    self._set(b, kept)

    def clear(self) -> None:
        self._ram.clear()
        self._disk.clear()
        self._ram_bytes = 0
        self.close()

    def close(self) -> None:
        """Delete the spill file."""
        if self._file is not None:
            self._file.unlink(missing_ok=True)
            self._file = None
            self._file_end = 0
        self._disk.clear()

    def stats(self) -> StoreStats:
        positions = sum(e.positions.size for e in self._ram.values()) + sum(
            s.m for s in self._disk.values()
        )
        return StoreStats(
            blocks=len(self._ram) + len(self._disk),
            positions=positions,
            ram_bytes=self._ram_bytes,
            disk_bytes=sum(s.length for s in self._disk.values()),
            stored=self._stored,
            restored=self._restored,
            lost=self._lost,
        )

    # -- internals -----------------------------------------------------------------------

    def _get(self, block: int) -> StoredBlock | None:
        entry = self._ram.get(block)
        if entry is not None:
            self._ram.move_to_end(block)
            return entry
        rec = self._disk.get(block)
        if rec is None:
            return None
        return self._read(block, rec)

    def _set(self, block: int, entry: StoredBlock) -> None:
        self._drop(block)
        self._ram[block] = entry
        self._ram_bytes += entry.nbytes

    def _drop(self, block: int) -> None:
        entry = self._ram.pop(block, None)
        if entry is not None:
            self._ram_bytes -= entry.nbytes
        self._disk.pop(block, None)

    def _spill(self) -> None:
        while self._ram_bytes > self.ram_limit and self._ram:
            block, entry = self._ram.popitem(last=False)
            self._ram_bytes -= entry.nbytes
            try:
                self._disk[block] = self._write(entry)
            except OSError as err:
                warnings.warn(
                    f"recall store: cannot spill to {self.spill_dir} ({err}); the oldest "
                    "blocks are dropped and cannot be recalled",
                    StoreWarning,
                    stacklevel=3,
                )
                self._lost += entry.positions.size

    def _write(self, entry: StoredBlock) -> _Spilled:
        if self._file is None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="store-", suffix=".bin", dir=self.spill_dir)
            os.close(fd)
            self._file = Path(name)
            self._file_end = 0
        parts = [entry.positions.tobytes(), entry.tokens.tobytes(), entry.k.tobytes()]
        if entry.v is not None:
            parts.append(entry.v.tobytes())
        blob = b"".join(parts)
        with open(self._file, "r+b") as f:
            f.seek(self._file_end)
            f.write(blob)
        rec = _Spilled(
            self._file_end,
            len(blob),
            zlib.crc32(blob),
            (entry.k.shape, None if entry.v is None else entry.v.shape),
            int(entry.positions.size),
        )
        self._file_end += len(blob)
        return rec

    def _read(self, block: int, rec: _Spilled) -> StoredBlock | None:
        try:
            if self._file is None:
                raise OSError("the spill file was closed")
            with open(self._file, "rb") as f:
                f.seek(rec.offset)
                blob = f.read(rec.length)
            if len(blob) != rec.length or zlib.crc32(blob) != rec.crc:
                raise OSError("its checksum does not match (truncated or overwritten)")
        except OSError as err:
            warnings.warn(
                f"recall store: block {block} is unreadable in {self._file} ({err}); it is "
                "dropped and will not be recalled",
                StoreWarning,
                stacklevel=3,
            )
            self._disk.pop(block, None)
            self._lost += rec.m
            return None
        m = rec.m
        buf = np.frombuffer(blob, np.uint8)
        positions = buf[: 4 * m].view(np.int32).copy()
        tokens = buf[4 * m : 8 * m].view(np.int32).copy()
        k_shape, v_shape = rec.shapes
        k_n = int(np.prod(k_shape))
        k = buf[8 * m : 8 * m + k_n].reshape(k_shape).copy()
        v = None if v_shape is None else buf[8 * m + k_n :].reshape(v_shape).copy()
        return StoredBlock(positions, tokens, k, v)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _encode(fmt: RowFormat | None, rows: np.ndarray) -> np.ndarray:
    return rows if fmt is None else fmt.encode(rows)


def _decode(fmt: RowFormat | None, rows: np.ndarray) -> np.ndarray:
    return rows if fmt is None else fmt.decode(rows)


def _convert(rows: np.ndarray, old: RowFormat | None, new: RowFormat | None) -> np.ndarray:
    """Store rows kept as ``old`` -> the same values kept as ``new``."""
    return rows if old == new else _encode(new, _decode(old, rows))
