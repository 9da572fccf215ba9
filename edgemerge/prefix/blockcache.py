"""A block-granular prompt cache for ``llama_cpp.Llama`` and ``edgemerge.Llama``.

Plug it in the way llama-cpp-python's own caches plug in::

    llm.set_cache(BlockCache.in_ram(capacity_bytes=2 << 30, block_size=16))
    llm.set_cache(BlockCache.on_disk("~/.cache/edgemerge", capacity_bytes=8 << 30))

``Llama.create_completion`` then asks ``cache[prompt_tokens]`` before evaluating a
prompt and stores ``cache[prompt + completion] = llm.save_state()`` after it.

Storing: the saved context is cut back to its last full block boundary ``b`` and kept
as one entry, keyed by the prefix hash of its last block and indexed under the hash of
every block it holds. A merged cell whose span reaches ``b`` goes with the cut, so the
entry restores ``valid <= b`` tokens: the tokens whose cells are all in the state.

Lookup: the prompt's block hashes are walked from the longest prefix down (only
blocks that end before the prompt does, so at least one prompt token is always
evaluated and the logits come from a live decode). The first entry holding that hash
is cut back to that block and restored: its merged cells (bias, span) included.

Eviction: when the backend passes its byte limit, entries are dropped in a
configurable order, by default: reference count 0 first (held entries are never
dropped), then least recently used, then the deeper prefix first (as vLLM frees the
tail blocks of a finished request first).

Limits: one sequence per context (seq 0) and models with one KV cache (not
interleaved sliding-window models such as Gemma 3); anything else is not stored, with
a warning. Entries are only valid for the model that made them: give each model its
own ``namespace`` (or directory).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp.llama_cache import BaseLlamaCache

from edgemerge.native import kvstate
from edgemerge.prefix.blocktable import Block, BlockTable
from edgemerge.reference.hashing import prefix_block_hashes

EVICTION_CRITERIA = ("refcount", "lru", "position")
DEFAULT_EVICTION = EVICTION_CRITERIA
FILE_MAGIC = b"EMBLOCK1"
FILE_SUFFIX = ".kvblock"
_FORMAT_VERSION = 1


def eviction_order(eviction: Sequence[str]) -> tuple[str, ...]:
    """``eviction`` as a tuple, checked: distinct criteria from :data:`EVICTION_CRITERIA`.

    Raises:
        ValueError: empty, repeated or unknown criteria.
    """
    order = tuple(eviction)
    bad = [c for c in order if c not in EVICTION_CRITERIA]
    if not order or bad or len(set(order)) != len(order):
        raise ValueError(
            f"eviction must be distinct criteria from {EVICTION_CRITERIA}, got {eviction!r}"
        )
    return order


def eviction_key(order: Sequence[str], *, refcount: int, last_use: float, depth: int) -> tuple:
    """Sort key of one eviction candidate under ``order``: the smallest goes first.

    Shared by :class:`BlockCache` (entries) and :mod:`edgemerge.prefix.sequences` (blocks).
    """
    parts = {
        "refcount": refcount,
        "lru": last_use,
        "position": -depth,  # deeper (longer) prefixes first
    }
    return tuple(parts[c] for c in order)


class BlockCacheError(ValueError):
    """A cache entry or a context state cannot be used; the message says why."""


class BlockCacheWarning(UserWarning):
    """Something was skipped (an entry rejected or not stored); the context is recomputed."""


@dataclass
class CacheStats:
    """Counters since the cache object was created."""

    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0
    rejected: int = 0
    restored_tokens: int = 0


# ---------------------------------------------------------------------------
# cutting a whole-context state (llama_state_get_data) back to a block boundary
# ---------------------------------------------------------------------------


def _split_context_state(data: bytes) -> tuple[bytes, kvstate.SeqState]:
    """The model-info head of a whole-context state and its parsed KV cells."""
    if len(data) < 4:
        raise BlockCacheError(f"a context state of {len(data)} bytes has no header")
    (arch_len,) = struct.unpack_from("<I", data, 0)
    if arch_len > 256 or 4 + arch_len > len(data):
        raise BlockCacheError(f"context state header claims a {arch_len}-byte model name")
    head = data[: 4 + arch_len]
    # the memory part has the layout of a sequence state without its 8-byte header
    fake = struct.pack("<Ii", kvstate.STATE_SEQ_MAGIC, -1) + data[4 + arch_len :]
    try:
        parsed = kvstate.parse_seq_state(fake, n_caches=None)
    except kvstate.KVStateError as err:
        raise BlockCacheError(f"the context state cannot be read: {err}") from err
    if len(parsed.caches) != 1:
        raise BlockCacheError(
            f"the model has {len(parsed.caches)} KV caches (interleaved sliding window); "
            "the block cache handles models with one"
        )
    return head, parsed


def _subset_stream(stream: kvstate.StreamKV, idx: np.ndarray) -> kvstate.StreamKV | None:
    if idx.size == 0:
        return None
    layers = tuple(
        kvstate.LayerKV(
            layer.k_type,
            layer.k[idx],
            layer.v_type,
            None if layer.v is None else (layer.v[:, idx] if layer.v.ndim == 3 else layer.v[idx]),
        )
        for layer in stream.layers
    )
    return kvstate.StreamKV(
        stream.positions[idx],
        tuple(stream.seq_ids[i] for i in idx),
        stream.v_trans,
        layers,
        None if stream.ext is None else stream.ext[idx],
        None if stream.bias is None else stream.bias[idx],
        None if stream.spans is None else stream.spans[idx],
    )


def _spans(stream: kvstate.StreamKV) -> np.ndarray:
    if stream.spans is not None:
        return stream.spans
    return np.stack([stream.positions, stream.positions], axis=1)


def cut_context_state(data: bytes, boundary: int) -> tuple[bytes, int, np.ndarray]:
    """Cut a whole-context state of one sequence back to the positions before ``boundary``.

    A merged cell whose span reaches ``boundary`` is dropped with everything after the
    start of its span, so the result holds all cells of its first ``valid`` positions.

    Returns:
        (state bytes, ``valid``, the kept cells' spans ``[n, 2]``).

    Raises:
        BlockCacheError: unreadable state, several KV caches, or cells shared by
            several sequences.
    """
    head, parsed = _split_context_state(data)
    cache = parsed.caches[0]
    valid = boundary
    for stream in cache.streams:
        if stream is None:
            continue
        if any(ids != (0,) for ids in stream.seq_ids):
            raise BlockCacheError(
                "the context holds cells of sequences other than 0; the block cache stores "
                "single-sequence contexts"
            )
        sp = _spans(stream)
        straddle = (sp[:, 0] < boundary) & (sp[:, 1] >= boundary)
        if straddle.any():
            valid = min(valid, int(sp[straddle, 0].min()))
    streams, kept = [], []
    for stream in cache.streams:
        if stream is None:
            streams.append(None)
            continue
        sp = _spans(stream)
        idx = np.flatnonzero(sp[:, 1] < valid)
        streams.append(_subset_stream(stream, idx))
        kept.append(sp[idx])
    out = kvstate.SeqState(-1, (kvstate.CacheState(tuple(streams)),), parsed.cell_ext)
    body = kvstate.write_seq_state(out)[8:]
    spans = np.concatenate(kept) if kept else np.zeros((0, 2), np.int32)
    return head + body, valid, spans


# ---------------------------------------------------------------------------
# entries and backends
# ---------------------------------------------------------------------------


@dataclass
class Entry:
    """What the cache knows about one stored prefix without reading its state."""

    key: bytes  # prefix hash of the last block
    table: BlockTable
    valid: int  # tokens the stored state restores (<= table.n_tokens)
    n_ids: int  # length of the Llama's input_ids array
    seed: int
    state_bytes: int
    digest: str  # blake2b of the body
    nbytes: int  # bytes the backend holds for it
    last_use: float = 0.0

    @property
    def refcount(self) -> int:
        return self.table.ref_count

    @property
    def depth(self) -> int:
        return len(self.table)

    @property
    def body_bytes(self) -> int:
        """The stored tokens (int32) and the context state."""
        return 4 * self.table.n_tokens + self.state_bytes

    def header(self) -> dict:
        return {
            "version": _FORMAT_VERSION,
            "block_size": self.table.block_size,
            "hashes": [h.hex() for h in self.table.hashes],
            "signatures": [b.signature for b in self.table.blocks],
            "merged": [b.merged for b in self.table.blocks],
            "valid": self.valid,
            "n_ids": self.n_ids,
            "seed": self.seed,
            "state_bytes": self.state_bytes,
            "digest": self.digest,
        }

    @classmethod
    def from_header(cls, h: dict, nbytes: int, last_use: float) -> Entry:
        try:
            if h["version"] != _FORMAT_VERSION:
                raise BlockCacheError(f"format version {h['version']}, expected {_FORMAT_VERSION}")
            hashes = [bytes.fromhex(x) for x in h["hashes"]]
            table = BlockTable(int(h["block_size"]))
            for i, (hsh, sig, merged) in enumerate(
                zip(hashes, h["signatures"], h["merged"], strict=True)
            ):
                table.blocks.append(
                    Block(i, i * table.block_size, hsh, int(sig), bool(merged), 0, last_use)
                )
            if not hashes or int(h["valid"]) > table.n_tokens:
                raise BlockCacheError("the header lists no blocks or more tokens than blocks")
            return cls(
                hashes[-1],
                table,
                int(h["valid"]),
                int(h["n_ids"]),
                int(h["seed"]),
                int(h["state_bytes"]),
                str(h["digest"]),
                nbytes,
                last_use,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise BlockCacheError(f"bad entry header: {err}") from err


def _body_digest(body: bytes | memoryview) -> str:
    return hashlib.blake2b(body, digest_size=16).hexdigest()


class RamBackend:
    """Entries in process memory, up to ``capacity_bytes``."""

    def __init__(self, capacity_bytes: int = 2 << 30) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes < 1:
            raise ValueError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self._bodies: dict[bytes, bytes] = {}

    def scan(self) -> list[Entry]:
        return []

    def put(self, entry: Entry, body: bytes) -> None:
        self._bodies[entry.key] = body
        entry.nbytes = len(body)

    def read(self, entry: Entry) -> bytes:
        return self._bodies[entry.key]

    def touch(self, entry: Entry) -> None:
        pass

    def delete(self, entry: Entry) -> None:
        self._bodies.pop(entry.key, None)

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self._bodies.values())


class DiskBackend:
    """One file per entry in ``directory``, up to ``capacity_bytes``; survives restarts.

    File layout: ``EMBLOCK1``, u32 header length, a JSON header (block hashes,
    restored tokens, blake2b digest of the body), then the body. A file whose size or
    digest disagrees with its header is rejected when read.
    """

    def __init__(self, directory: str | os.PathLike[str], capacity_bytes: int = 8 << 30) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes < 1:
            raise ValueError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self.directory = Path(directory).expanduser()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise BlockCacheError(
                f"cannot create the cache directory {self.directory}: {err}; pick a writable path"
            ) from err
        self._offsets: dict[bytes, int] = {}
        self._sizes: dict[bytes, int] = {}

    def _path(self, key: bytes) -> Path:
        return self.directory / (key.hex() + FILE_SUFFIX)

    def scan(self) -> list[Entry]:
        """Entries of the files already in the directory (a restart); bad ones are removed."""
        entries = []
        for path in sorted(self.directory.glob("*" + FILE_SUFFIX)):
            try:
                entry, offset = self._read_header(path)
            except (BlockCacheError, OSError) as err:
                _warn(f"rejected cache file {path}: {err}; it is removed")
                path.unlink(missing_ok=True)
                continue
            self._offsets[entry.key] = offset
            self._sizes[entry.key] = entry.nbytes
            entries.append(entry)
        return entries

    def _read_header(self, path: Path) -> tuple[Entry, int]:
        size = path.stat().st_size
        with path.open("rb") as f:
            lead = f.read(12)
            if len(lead) < 12 or lead[:8] != FILE_MAGIC:
                raise BlockCacheError("not an edgemerge block-cache file (bad magic or truncated)")
            (hlen,) = struct.unpack("<I", lead[8:])
            raw = f.read(hlen)
        if len(raw) != hlen:
            raise BlockCacheError(f"truncated header: {len(raw)} of {hlen} bytes")
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BlockCacheError(f"corrupt header: {err}") from err
        entry = Entry.from_header(header, size, path.stat().st_mtime_ns / 1e9)
        expected = 12 + hlen + entry.body_bytes
        if size != expected:
            raise BlockCacheError(
                f"truncated or overlong: {size} bytes, its header promises {expected}"
            )
        if path.name != entry.key.hex() + FILE_SUFFIX:
            raise BlockCacheError("the file name does not match the hash of its last block")
        return entry, 12 + hlen

    def put(self, entry: Entry, body: bytes) -> None:
        raw = json.dumps(entry.header()).encode()
        path = self._path(entry.key)
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            f.write(FILE_MAGIC + struct.pack("<I", len(raw)) + raw)
            f.write(body)
        os.replace(tmp, path)  # a crash mid-write never leaves a half entry under the name
        self.touch(entry)
        self._offsets[entry.key] = 12 + len(raw)
        entry.nbytes = self._sizes[entry.key] = 12 + len(raw) + len(body)

    def read(self, entry: Entry) -> bytes:
        path = self._path(entry.key)
        try:
            with path.open("rb") as f:
                f.seek(self._offsets[entry.key])
                body = f.read()
        except OSError as err:
            raise BlockCacheError(f"cannot read {path}: {err}") from err
        expected = entry.body_bytes
        if len(body) != expected:
            raise BlockCacheError(
                f"{path} is truncated or grew: body of {len(body)} bytes, header says {expected}"
            )
        if _body_digest(body) != entry.digest:
            raise BlockCacheError(f"{path} is corrupt: its digest does not match its header")
        return body

    def touch(self, entry: Entry) -> None:
        ns = int(entry.last_use * 1e9)
        try:
            os.utime(self._path(entry.key), ns=(ns, ns))
        except OSError:
            pass  # recency is advisory; a missing file is caught when it is read

    def delete(self, entry: Entry) -> None:
        self._path(entry.key).unlink(missing_ok=True)
        self._offsets.pop(entry.key, None)
        self._sizes.pop(entry.key, None)

    @property
    def nbytes(self) -> int:
        return sum(self._sizes.values())


def _warn(message: str) -> None:
    warnings.warn(message, BlockCacheWarning, stacklevel=3)


# ---------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------


class BlockCache(BaseLlamaCache):
    """A block-granular prompt cache (see module doc) for ``llm.set_cache(...)``.

    Args:
        backend: a :class:`RamBackend` or :class:`DiskBackend` (holds the byte limit).
        block_size: tokens per block.
        namespace: bytes or str mixed into the prefix hashes; give each model its own.
        eviction: the order entries are dropped in, a tuple of ``"refcount"``,
            ``"lru"``, ``"position"`` (see module doc). Held entries are never dropped.
        clock: seconds for ``last_use`` (default ``time.time``; tests pass their own).
    """

    def __init__(
        self,
        backend: RamBackend | DiskBackend,
        *,
        block_size: int = 16,
        namespace: bytes | str = b"",
        eviction: Sequence[str] = DEFAULT_EVICTION,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        order = eviction_order(eviction)
        super().__init__(backend.capacity_bytes)
        self.backend = backend
        self.block_size = block_size
        self.namespace = namespace.encode() if isinstance(namespace, str) else bytes(namespace)
        self.eviction = order
        self.clock = clock
        self.stats = CacheStats()
        self._entries: dict[bytes, Entry] = {}
        self._by_hash: dict[bytes, dict[bytes, int]] = {}
        self._holds: dict[bytes, list[int]] = {}
        for entry in backend.scan():
            if entry.table.block_size != block_size:
                _warn(
                    f"cache entry {entry.key.hex()} uses block_size {entry.table.block_size}, "
                    f"this cache {block_size}; it is ignored"
                )
                continue
            self._add(entry)

    @classmethod
    def in_ram(cls, capacity_bytes: int = 2 << 30, **kwargs) -> BlockCache:
        return cls(RamBackend(capacity_bytes), **kwargs)

    @classmethod
    def on_disk(
        cls, directory: str | os.PathLike[str], capacity_bytes: int = 8 << 30, **kwargs
    ) -> BlockCache:
        return cls(DiskBackend(directory, capacity_bytes), **kwargs)

    # -- llama-cpp-python's cache interface ----------------------------------------------

    @property
    def cache_size(self) -> int:
        return self.backend.nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        # llama-cpp-python tests `if self.cache:`; an empty cache must still be used
        return True

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def _candidates(self, tokens: Sequence[int]) -> Iterator[tuple[Entry, int]]:
        """(entry, block index) pairs for the prompt, longest shared prefix first."""
        ids = np.asarray(tokens, dtype=np.int64)
        # only blocks ending before the prompt does: one token is always left to evaluate
        n_full = max(0, (len(ids) - 1) // self.block_size)
        hashes = self._hashes(ids[: n_full * self.block_size])
        for i in range(len(hashes) - 1, -1, -1):
            holders = self._by_hash.get(hashes[i], {})
            for key in sorted(holders, key=lambda k: -self._entries[k].last_use):
                yield self._entries[key], i

    def _hashes(self, ids: np.ndarray) -> list[bytes]:
        if ids.size and (ids.min() < 0 or ids.max() >= 2**31):
            return []
        return prefix_block_hashes(ids, self.block_size, root=self.namespace)

    def _find_longest_prefix_key(self, key: Sequence[int]) -> tuple[int, ...] | None:
        for _, i in self._candidates(key):
            return tuple(int(t) for t in key[: (i + 1) * self.block_size])
        return None

    def __contains__(self, key: Sequence[int]) -> bool:
        return self._find_longest_prefix_key(key) is not None

    def __getitem__(self, key: Sequence[int]) -> llama_cpp.LlamaState:
        tokens = [int(t) for t in key]
        for entry, i in self._candidates(tokens):
            try:
                state = self._restore(entry, i, tokens)
            except BlockCacheError as err:
                _warn(f"rejected cache entry {entry.key.hex()}: {err}; recomputing instead")
                self.stats.rejected += 1
                self._drop(entry)
                continue
            if state is None:
                continue
            self.stats.hits += 1
            self.stats.restored_tokens += state.n_tokens
            entry.last_use = self.clock()
            for b in entry.table.blocks[: i + 1]:
                b.last_use = entry.last_use
            self.backend.touch(entry)
            return state
        self.stats.misses += 1
        raise KeyError("no cached prefix of this prompt")

    def __setitem__(self, key: Sequence[int], value: llama_cpp.LlamaState) -> None:
        try:
            self._store(key, value)
        except BlockCacheError as err:
            _warn(f"prompt state not cached: {err}")

    # -- holding entries (active sequences) ----------------------------------------------

    def hold(self, tokens: Sequence[int]) -> bytes | None:
        """Mark the entry of the longest cached prefix of ``tokens`` as in use (never
        evicted until :meth:`release`). Returns its key, or None when nothing matches."""
        for entry, i in self._candidates([int(t) for t in tokens] + [0]):
            entry.table.hold(i + 1, now=self.clock())
            self._holds.setdefault(entry.key, []).append(i + 1)
            return entry.key
        return None

    def release(self, key: bytes) -> None:
        """Undo the latest :meth:`hold` that returned ``key``."""
        held = self._holds.get(key)
        if not held:
            raise KeyError(f"cache entry {key.hex()} is not held; release() needs hold() first")
        self._entries[key].table.release(held.pop())

    # -- internals -----------------------------------------------------------------------

    def _add(self, entry: Entry) -> None:
        self._entries[entry.key] = entry
        for i, h in enumerate(entry.table.hashes):
            self._by_hash.setdefault(h, {})[entry.key] = i

    def _drop(self, entry: Entry) -> None:
        self._entries.pop(entry.key, None)
        for h in entry.table.hashes:
            holders = self._by_hash.get(h)
            if holders is not None:
                holders.pop(entry.key, None)
                if not holders:
                    del self._by_hash[h]
        self.backend.delete(entry)

    def _store(self, key: Sequence[int], value: llama_cpp.LlamaState) -> None:
        n = min(len(key), int(value.n_tokens))
        boundary = n // self.block_size * self.block_size
        if boundary == 0:
            return
        ids = np.asarray(value.input_ids[:boundary], dtype=np.int32)
        if list(ids) != [int(t) for t in key[:boundary]]:
            raise BlockCacheError("the state's tokens differ from the key's")
        now = self.clock()
        hashes = self._hashes(ids)
        existing = self._entries.get(hashes[-1])
        if existing is not None:
            existing.last_use = now
            self.backend.touch(existing)
            return
        state, valid, spans = cut_context_state(bytes(value.llama_state), boundary)
        if valid == 0:
            return
        table = BlockTable.from_tokens(
            ids, self.block_size, root=self.namespace, spans=spans, now=now
        )
        body = ids.tobytes() + state
        entry = Entry(
            table.hashes[-1],
            table,
            valid,
            len(value.input_ids),
            int(value.seed),
            len(state),
            _body_digest(body),
            len(body),
            now,
        )
        if entry.nbytes > self.backend.capacity_bytes:
            raise BlockCacheError(
                f"one entry needs {entry.nbytes} bytes, more than the cache's limit of "
                f"{self.backend.capacity_bytes}; raise capacity_bytes"
            )
        self.backend.put(entry, body)
        self._add(entry)
        self.stats.stores += 1
        self.evict_to_fit(protect=entry.key)

    def _restore(self, entry: Entry, block: int, prompt: list[int]) -> llama_cpp.LlamaState | None:
        body = self.backend.read(entry)
        n_ids = entry.table.n_tokens
        if len(body) != entry.body_bytes:
            raise BlockCacheError(f"body of {len(body)} bytes, expected {entry.body_bytes}")
        ids = np.frombuffer(body, dtype=np.int32, count=n_ids)
        state = bytes(body[4 * n_ids :])
        boundary = (block + 1) * self.block_size
        if [int(t) for t in ids[:boundary]] != prompt[:boundary]:
            raise BlockCacheError("its tokens do not match the block hashes it is indexed by")
        if boundary == n_ids:
            valid = entry.valid
        else:
            state, valid, _ = cut_context_state(state, boundary)
        if valid == 0:
            return None
        input_ids = np.full(entry.n_ids, -1, dtype=np.intc)
        input_ids[:valid] = ids[:valid]
        # logits of a restored prefix are never read: the prompt always has a token left
        # to evaluate (see _candidates), and that decode writes fresh ones
        return llama_cpp.LlamaState(
            input_ids=input_ids,
            scores=np.zeros((1, 1), dtype=np.single),
            n_tokens=valid,
            llama_state=state,
            llama_state_size=len(state),
            seed=entry.seed,
        )

    def _eviction_key(self, entry: Entry) -> tuple:
        return eviction_key(
            self.eviction, refcount=entry.refcount, last_use=entry.last_use, depth=entry.depth
        )

    def evict_to_fit(self, protect: bytes | None = None) -> list[bytes]:
        """Drop entries in eviction order until the backend is within its byte limit.

        Held entries (refcount > 0) and ``protect`` (the entry just stored) stay.
        Returns the dropped keys.
        """
        dropped = []
        while self.backend.nbytes > self.backend.capacity_bytes:
            candidates = [e for e in self._entries.values() if e.refcount == 0 and e.key != protect]
            if not candidates:
                _warn(
                    f"the cache holds {self.backend.nbytes} bytes, over its limit of "
                    f"{self.backend.capacity_bytes}, but every other entry is held"
                )
                break
            victim = min(candidates, key=self._eviction_key)
            self._drop(victim)
            dropped.append(victim.key)
            self.stats.evictions += 1
        return dropped
