"""Several sequences in one llama.cpp context, sharing identical prefix blocks.

:class:`SharedPrefixPool` holds up to ``n_seq_max`` sequences in one context whose KV
cache is *unified* (one stream), where ``llama_memory_seq_cp`` copies no K/V: it adds
the destination sequence to the source's cells, which then live while any sequence
holds them.

Every sealed block of a sequence is listed once, keyed by its chained prefix hash, as
a shared :class:`~edgemerge.prefix.blocktable.Block`. A block knows its *holders* (sequences
whose cells hold its positions; each holds a chain from block 0) and its ``ref_count``
(how many holders are open). ``open(tokens)`` copies the longest run of the prompt's
leading blocks from one holder (only blocks ending before the last prompt token, which
is always decoded) and decodes the rest; positions are equal, so nothing is shifted.

Merged cells are never shared: a source's chain is cut at its first block that a
multi-position cell reaches into (or that misses a position), so every copied cell
lies wholly inside the shared range.

``close(seq_id)`` releases the blocks; with ``keep=True`` the sequence is *parked*:
its intact blocks stay at ``ref_count`` 0 for later opens, until evicted in the
configured order (that of :class:`~edgemerge.prefix.blockcache.BlockCache`) when a decode
needs cells or ``open`` needs a sequence id. Eviction only removes cells of parked
sequences, so it never frees a cell an open sequence holds.

``docs/blockcache.md`` ("Sharing prefixes between live sequences") gives the rules in
full. Limits: attention-only models with one KV cache (no recurrent, hybrid or
sliding-window models); not thread-safe; a borrowed ``llama_cpp.Llama`` must stay open
while the pool is used.
"""

from __future__ import annotations

import operator
import os
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

from edgemerge.models import resolve_model
from edgemerge.native import kvcells
from edgemerge.prefix.blockcache import DEFAULT_EVICTION, eviction_key, eviction_order
from edgemerge.prefix.blocktable import Block, BlockTable, merged_blocks
from edgemerge.reference.hashing import prefix_block_hashes

LLAMA_MAX_SEQ = 256  # llama.cpp's compile-time limit (src/llama-cparams.h)


class PoolError(ValueError):
    """A request the pool cannot serve (bad input, no free sequence, full cache)."""


@dataclass
class PoolStats:
    """Counters since the pool was created."""

    opened: int = 0  # sequences opened
    hits: int = 0  # opens that shared at least one block
    misses: int = 0  # opens that shared nothing
    tokens_decoded: int = 0  # tokens run through llama_decode (prompts and generation)
    tokens_shared: int = 0  # prompt tokens taken from another sequence, not decoded
    blocks_shared: int = 0  # blocks taken from another sequence
    evicted_blocks: int = 0  # parked blocks removed to make room for a decode
    dropped_sequences: int = 0  # parked sequences dropped to free a sequence id


@dataclass
class _Sequence:
    seq_id: int
    tokens: list[int]
    table: BlockTable  # its listed blocks: the pool's shared Block objects, from block 0
    open: bool = True
    logits: np.ndarray | None = None
    broken: bool = False  # its chain was cut (merged or missing cells): list no more blocks


def _positive(name: str, value: int, hi: int | None = None) -> int:
    try:
        number = operator.index(value)
    except TypeError as err:
        raise PoolError(f"{name} must be an integer, not {type(value).__name__}") from err
    if number < 1 or (hi is not None and number > hi):
        bound = f"in [1, {hi}]" if hi is not None else ">= 1"
        raise PoolError(f"{name} is {number}; it must be {bound}")
    return number


def _free_native(ctx: int, batch: llama_cpp.llama_batch, model: Any, borrowed: Any) -> None:
    """Free what the pool created (a weakref finalizer: holds no reference to the pool).

    ``borrowed`` (a Llama lending its model, or None) is an argument only so that it
    outlives the context built on its model."""
    del borrowed
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    if model is not None:
        llama_cpp.llama_model_free(model)


class SharedPrefixPool:
    """Sequences in one unified-KV llama.cpp context sharing prefix blocks (module doc).

    Args:
        model: a ``llama_cpp.Llama`` / ``edgemerge.Llama`` whose model is borrowed, or a
            GGUF path or registry name (loaded here, freed by :meth:`free`).
        n_ctx: cells of the unified cache, shared by all sequences (llama.cpp rounds it
            up to a multiple of 256; :attr:`n_ctx` is the real size). It is also the
            longest sequence.
        n_seq_max: sequences the context holds, open and parked together.
        block_size: tokens per block, the unit of sharing.
        n_batch: tokens per ``llama_decode`` call.
        n_threads: CPU threads (default: all cores).
        flash_attn: force flash attention on or off (default: llama.cpp decides).
        n_gpu_layers: layers to offload when ``model`` is a path.
        namespace: mixed into the prefix hashes (a model id).
        eviction: order of eviction, as ``BlockCache``'s ``eviction``.
        clock: time source of ``last_use`` (tests pass their own).

    Raises:
        PoolError: bad settings, an unsupported model, or a context llama.cpp refuses.
    """

    def __init__(
        self,
        model: llama_cpp.Llama | str | os.PathLike[str],
        *,
        n_ctx: int,
        n_seq_max: int,
        block_size: int = 16,
        n_batch: int = 256,
        n_threads: int | None = None,
        flash_attn: bool | None = None,
        n_gpu_layers: int = 0,
        namespace: bytes | str = b"",
        eviction: Sequence[str] = DEFAULT_EVICTION,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.n_seq_max = _positive("n_seq_max", n_seq_max, LLAMA_MAX_SEQ)
        self.block_size = _positive("block_size", block_size)
        self.n_batch = _positive("n_batch", n_batch)
        n_ctx = _positive("n_ctx", n_ctx)
        self.eviction = eviction_order(eviction)
        self.namespace = namespace.encode() if isinstance(namespace, str) else bytes(namespace)
        self.clock = clock
        self.stats = PoolStats()
        owned = None
        if isinstance(model, llama_cpp.Llama):
            self._borrowed = model  # keeps the model alive as long as the pool
            model_ptr = model.model
        else:
            self._borrowed = None
            mparams = llama_cpp.llama_model_default_params()
            mparams.n_gpu_layers = n_gpu_layers
            path = resolve_model(model)
            model_ptr = owned = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
            if not model_ptr:
                raise PoolError(f"llama.cpp could not load the model {path}")
        reason = self._unsupported(model_ptr)
        if reason:
            if owned:
                llama_cpp.llama_model_free(owned)
            raise PoolError(f"prefix sharing needs one attention KV cache; {reason}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = self.n_seq_max
        params.kv_unified = True  # one stream: seq_cp shares cells instead of copying
        if flash_attn is not None:
            params.flash_attn_type = (
                llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
                if flash_attn
                else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        threads = n_threads if n_threads is not None else max(1, os.cpu_count() or 1)
        params.n_threads = params.n_threads_batch = _positive("n_threads", threads)
        ctx = llama_cpp.llama_init_from_model(model_ptr, params)
        if not ctx:
            if owned:
                llama_cpp.llama_model_free(owned)
            raise PoolError(
                f"llama.cpp could not create a context of {n_ctx} cells for {n_seq_max} sequences"
            )
        self.ctx: int = ctx
        self.n_ctx = int(llama_cpp.llama_n_ctx(ctx))
        self.n_vocab = int(
            llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model_ptr))
        )
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._finalizer = weakref.finalize(
            self, _free_native, ctx, self._batch, owned, self._borrowed
        )
        self._seqs: dict[int, _Sequence] = {}
        self._blocks: dict[bytes, Block] = {}
        self._holders: dict[bytes, set[int]] = {}
        self._parent: dict[bytes, bytes | None] = {}

    @staticmethod
    def _unsupported(model_ptr: Any) -> str | None:
        if llama_cpp.llama_model_is_recurrent(model_ptr):
            return "this model is recurrent"
        if llama_cpp.llama_model_is_hybrid(model_ptr):
            return "this model is hybrid (recurrent and attention layers)"
        if llama_cpp.llama_model_n_swa(model_ptr) > 0:
            # a sliding-window cache drops old cells as its sequence advances, so the
            # source may no longer hold the window the new sequence needs
            return "this model has sliding-window attention layers"
        return None

    # -- lifetime ------------------------------------------------------------------------

    def free(self) -> None:
        """Free the context (and the model when the pool loaded it). Idempotent."""
        self._finalizer()
        for table in (self._seqs, self._blocks, self._holders, self._parent):
            table.clear()

    def __enter__(self) -> SharedPrefixPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    # -- sequences -----------------------------------------------------------------------

    def open(self, tokens: Sequence[int] | np.ndarray) -> int:
        """Start a sequence with prompt ``tokens``; returns its id.

        The longest run of leading blocks that another sequence holds is shared
        (``seq_cp``), the rest is decoded. :meth:`logits` is then the next-token
        distribution after the prompt.

        Raises:
            PoolError: empty or invalid tokens, a prompt longer than :attr:`n_ctx`,
                every sequence open, or a cache too full even after eviction.
        """
        self._check_open_pool()
        ids = self._check_tokens(tokens, 0)
        bs = self.block_size
        hashes = prefix_block_hashes(ids[: (len(ids) - 1) // bs * bs], bs, root=self.namespace)
        n_shared, source = self._find_source(ids, hashes)
        end = n_shared * bs
        # refused before any parked sequence is dropped: a refused open changes nothing
        self._check_room(len(ids) - end, source, end)
        seq_id = self._free_seq_id(protect=source)
        if seq_id == source:
            # every id is taken and the source is the only parked sequence: it becomes
            # the new sequence, cut back to the shared blocks
            seq = self._seqs[source]
            llama_cpp.llama_memory_seq_rm(self._mem, source, end, -1)
            del seq.tokens[end:]
            self._cut_chain(seq, n_shared)
            seq.open, seq.broken = True, False
        else:
            seq = self._seqs[seq_id] = _Sequence(seq_id, [], BlockTable(bs))
            if n_shared:
                llama_cpp.llama_memory_seq_cp(self._mem, source, seq_id, 0, end)
                seq.tokens = ids[:end]
                seq.table.blocks = list(self._seqs[source].table.blocks[:n_shared])
                for block in seq.table.blocks:
                    self._holders[block.prefix_hash].add(seq_id)
        seq.table.hold(now=self.clock())
        try:
            self._decode(seq, ids[end:])
        except BaseException:
            self._free(seq)
            raise
        self.stats.opened += 1
        self.stats.hits += n_shared > 0
        self.stats.misses += n_shared == 0
        self.stats.tokens_shared += end
        self.stats.blocks_shared += n_shared
        return seq_id

    def extend(self, seq_id: int, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Decode ``tokens`` after the open sequence ``seq_id`` (e.g. a user turn).

        Returns:
            the logits after the last of them (a copy, float32 ``[n_vocab]``).

        Raises:
            PoolError: unknown or closed sequence, bad tokens, past :attr:`n_ctx`, or a
                full cache; the sequence is then as it was before the call.
        """
        seq = self._get(seq_id)
        ids = self._check_tokens(tokens, len(seq.tokens))
        self._check_room(len(ids))
        self._decode(seq, ids)
        return seq.logits.copy()

    def generate(self, seq_id: int, n: int) -> list[int]:
        """Greedily generate ``n`` tokens for the open sequence ``seq_id``.

        Each token is decoded into the cache at once, so :meth:`logits` always follows
        the last token and the sequence can be extended or shared right away.

        Raises:
            PoolError: unknown or closed sequence, ``n`` past :attr:`n_ctx`, or a full
                cache (the tokens generated before the failure stay).
        """
        seq = self._get(seq_id)
        n = operator.index(n)
        if n < 0 or len(seq.tokens) + n > self.n_ctx:
            raise PoolError(
                f"cannot generate {n} tokens after {len(seq.tokens)}: a sequence holds at "
                f"most n_ctx={self.n_ctx}"
            )
        out = []
        for _ in range(n):
            token = int(np.argmax(seq.logits))
            self._decode(seq, [token])
            out.append(token)
        return out

    def logits(self, seq_id: int) -> np.ndarray:
        """Logits after the last token of the open sequence (a copy, float32 ``[n_vocab]``)."""
        return self._get(seq_id).logits.copy()

    def tokens(self, seq_id: int) -> list[int]:
        """Tokens whose cells the sequence (open or parked) holds."""
        return list(self._get(seq_id, parked=True).tokens)

    def close(self, seq_id: int, *, keep: bool = True) -> None:
        """Close the open sequence ``seq_id`` and release its blocks.

        With ``keep`` the sequence is parked: its intact sealed blocks stay in the cache
        for later :meth:`open` calls (until evicted); its other cells go now. Without,
        all its cells go, except those another sequence also holds.
        """
        seq = self._get(seq_id)
        self._touch(seq)
        seq.table.release()
        seq.open = False
        seq.logits = None
        valid = self._verify(seq) if keep else 0
        if valid == 0:
            self._free(seq)
            return
        end = valid * self.block_size
        llama_cpp.llama_memory_seq_rm(self._mem, seq_id, end, -1)
        del seq.tokens[end:]

    # -- inspection ----------------------------------------------------------------------

    @property
    def open_ids(self) -> list[int]:
        return sorted(s.seq_id for s in self._seqs.values() if s.open)

    @property
    def parked_ids(self) -> list[int]:
        return sorted(s.seq_id for s in self._seqs.values() if not s.open)

    def table(self, seq_id: int) -> BlockTable:
        """The listed blocks of a sequence (open or parked): the shared ``Block`` objects,
        so ``ref_count`` is the number of open sequences using each."""
        return BlockTable(self.block_size, list(self._get(seq_id, parked=True).table.blocks))

    def blocks(self) -> list[Block]:
        """Every listed (reusable) block, in listing order."""
        return list(self._blocks.values())

    def holders(self, prefix_hash: bytes) -> frozenset[int]:
        """Sequences (open or parked) whose cells hold the block ``prefix_hash``."""
        return frozenset(self._holders.get(prefix_hash, ()))

    def used_cells(self, *, open_only: bool = False) -> int:
        """Cells of the cache that sequences of the pool hold (shared cells once); with
        ``open_only``, those that open sequences hold (what eviction cannot free)."""
        return self._count_cells([s.seq_id for s in self._seqs.values() if s.open or not open_only])

    def _count_cells(self, seq_ids: list[int], source: int | None = None, end: int = 0) -> int:
        """Distinct cells of ``seq_ids``, plus those of ``source`` before position ``end``."""
        parts = [kvcells.list_cells(self.ctx, s).cell for s in seq_ids]
        if source is not None:
            cells = kvcells.list_cells(self.ctx, source)
            parts.append(cells.cell[cells.pos < end])
        return int(np.unique(np.concatenate(parts)).size) if parts else 0

    # -- eviction ------------------------------------------------------------------------

    def evict(self) -> Block | None:
        """Remove one parked block, the first in eviction order among the blocks at
        ``ref_count`` 0 with no listed block after them; returns it, or None when every
        listed block is in use."""
        parents = {self._parent[h] for h in self._blocks}
        candidates = [b for h, b in self._blocks.items() if b.ref_count == 0 and h not in parents]
        if not candidates:
            return None
        victim = min(candidates, key=self._block_key)
        for seq_id in sorted(self._holders[victim.prefix_hash]):
            seq = self._seqs[seq_id]  # parked: the block has no open holder
            llama_cpp.llama_memory_seq_rm(self._mem, seq_id, victim.start, -1)
            del seq.tokens[victim.start :]
            self._cut_chain(seq, victim.index)
            if not seq.table.blocks:
                self._free(seq)
        self.stats.evicted_blocks += 1
        return victim

    def _block_key(self, block: Block) -> tuple:
        # the trailing depth and hash only break ties the configured criteria leave
        b = block
        key = eviction_key(self.eviction, refcount=b.ref_count, last_use=b.last_use, depth=b.depth)
        return (*key, -b.depth, b.prefix_hash)

    def _free_seq_id(self, protect: int | None) -> int:
        """A free sequence id, dropping a parked sequence other than ``protect`` if need
        be; ``protect`` itself when it is the only parked one."""
        for seq_id in range(self.n_seq_max):
            if seq_id not in self._seqs:
                return seq_id
        parked = [s for s in self._seqs.values() if not s.open and s.seq_id != protect]
        if not parked and protect is not None and not self._seqs[protect].open:
            return protect
        if not parked:
            raise PoolError(
                f"all n_seq_max={self.n_seq_max} sequences are open; close one or raise n_seq_max"
            )

        def cost(seq: _Sequence) -> tuple:
            # a holder's chain starts at block 0, so the blocks it alone holds are a tail
            own = [b for b in seq.table.blocks if self._holders[b.prefix_hash] == {seq.seq_id}]
            return (1, *self._block_key(own[0]), seq.seq_id) if own else (0, seq.seq_id)

        victim = min(parked, key=cost)
        self._free(victim)
        self.stats.dropped_sequences += 1
        return victim.seq_id

    # -- internals -----------------------------------------------------------------------

    def _check_open_pool(self) -> None:
        if not self._finalizer.alive:
            raise PoolError("the pool is closed")

    def _get(self, seq_id: int, *, parked: bool = False) -> _Sequence:
        self._check_open_pool()
        try:
            seq = self._seqs.get(operator.index(seq_id))
        except TypeError:
            seq = None
        if seq is None:
            raise PoolError(f"no sequence {seq_id!r} in this pool (open: {self.open_ids})")
        if not seq.open and not parked:
            raise PoolError(f"sequence {seq_id} is closed; open a new one")
        return seq

    def _check_tokens(self, tokens: Sequence[int] | np.ndarray, start: int) -> list[int]:
        ids = np.asarray(tokens)
        if ids.size == 0:
            raise PoolError("no tokens given; a sequence needs at least one")
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise PoolError(f"tokens must be a flat sequence of ints, got {ids.dtype} {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            raise PoolError(f"token ids must lie in [0, {self.n_vocab}) (the model's vocabulary)")
        if start + ids.size > self.n_ctx:
            raise PoolError(
                f"{start + ids.size} tokens do not fit a sequence of at most n_ctx={self.n_ctx}"
            )
        return [int(t) for t in ids]

    def _find_source(self, ids: list[int], hashes: list[bytes]) -> tuple[int, int | None]:
        """(blocks to share, the holder to copy them from), longest first."""
        n = 0
        while n < len(hashes) and self._holders.get(hashes[n]):
            n += 1
        checked: dict[int, int] = {}
        while n:
            # open holders first: a parked one may have to give up its id to this open
            holders = self._holders.get(hashes[n - 1], ())
            for seq_id in sorted(holders, key=lambda s: (not self._seqs[s].open, s)):
                if seq_id not in checked:
                    checked[seq_id] = self._verify(self._seqs[seq_id])
                end = n * self.block_size
                if checked[seq_id] >= n and self._seqs[seq_id].tokens[:end] == ids[:end]:
                    return n, seq_id
            n -= 1
        return 0, None

    def _verify(self, seq: _Sequence) -> int:
        """Cut the sequence's chain at its first block that is merged or misses a position;
        returns the blocks left."""
        n = len(seq.table)
        if n == 0:
            return 0
        bs = self.block_size
        cells = kvcells.list_cells(self.ctx, seq.seq_id)
        inside = (cells.pos >= 0) & (cells.pos < n * bs)
        counts = np.bincount(cells.pos[inside], minlength=n * bs).reshape(n, bs)
        intact = (counts == 1).all(axis=1) & ~merged_blocks(cells.span_min, cells.span_max, n, bs)
        valid = n if intact.all() else int(np.argmin(intact))
        if valid < n:
            self._cut_chain(seq, valid)
            seq.broken = True
        return valid

    def _decode(self, seq: _Sequence, tokens: list[int]) -> None:
        """Decode ``tokens`` after the sequence's last one; on failure undo this call."""
        start_len = len(seq.tokens)
        try:
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start : start + self.n_batch]
                last = start + len(chunk) == len(tokens)
                pos0 = len(seq.tokens)
                for i, token in enumerate(chunk):
                    self._batch.token[i] = token
                    self._batch.pos[i] = pos0 + i
                    self._batch.n_seq_id[i] = 1
                    self._batch.seq_id[i][0] = seq.seq_id
                    self._batch.logits[i] = last and i == len(chunk) - 1
                self._batch.n_tokens = len(chunk)
                self._run_batch()
                seq.tokens.extend(chunk)
                self.stats.tokens_decoded += len(chunk)
                self._list_blocks(seq)
        except BaseException:
            if len(seq.tokens) > start_len:
                llama_cpp.llama_memory_seq_rm(self._mem, seq.seq_id, start_len, -1)
                del seq.tokens[start_len:]
                self._cut_chain(seq, min(len(seq.table), start_len // self.block_size))
            raise
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, len(chunk) - 1)
        seq.logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        self._touch(seq)

    def _check_room(self, n_new: int, source: int | None = None, end: int = 0) -> None:
        """Refuse, before anything is evicted or decoded, ``n_new`` cells that could not
        fit even with every parked block evicted (``source``'s cells before ``end``
        are about to be shared, so they count as held)."""
        held = self._count_cells([s.seq_id for s in self._seqs.values() if s.open], source, end)
        if held + n_new > self.n_ctx:
            raise PoolError(
                f"the KV cache is full: {n_new} new cells do not fit next to the {held} of "
                f"{self.n_ctx} that open sequences hold; close a sequence or raise n_ctx"
            )

    def _run_batch(self) -> None:
        n_tokens = self._batch.n_tokens
        if any(not s.open for s in self._seqs.values()):
            # evict ahead of the decode (llama.cpp logs a warning for every refused batch)
            while self.n_ctx - self.used_cells() < n_tokens and self.evict() is not None:
                pass
        while True:
            status = llama_cpp.llama_decode(self.ctx, self._batch)
            if status == 0:
                return
            # 1: no free cells for the batch; llama.cpp left the cache unchanged
            if status == 1 and self.evict() is not None:
                continue
            if status == 1:
                raise PoolError(
                    f"the KV cache is full: no room for a batch of {n_tokens} tokens, "
                    f"{self.used_cells()} of {self.n_ctx} cells are held and no parked block "
                    "is left to evict; close a sequence or raise n_ctx"
                )
            raise PoolError(f"llama_decode failed with status {status}")

    def _list_blocks(self, seq: _Sequence) -> None:
        """List the blocks the sequence has sealed since the last call, and hold them."""
        n_sealed = len(seq.tokens) // self.block_size
        n_listed = len(seq.table)
        if seq.broken or not seq.open or n_sealed <= n_listed:
            return
        now = self.clock()
        fresh = BlockTable.from_tokens(
            seq.tokens[: n_sealed * self.block_size],
            self.block_size,
            root=self.namespace,
            now=now,
        )
        new = []
        for block in fresh.blocks[n_listed:]:
            h = block.prefix_hash
            shared = self._blocks.setdefault(h, block)
            self._parent.setdefault(
                h, fresh.blocks[block.index - 1].prefix_hash if block.index else None
            )
            self._holders.setdefault(h, set()).add(seq.seq_id)
            new.append(shared)
        BlockTable(self.block_size, new).hold(now=now)
        seq.table.blocks.extend(new)

    def _touch(self, seq: _Sequence) -> None:
        # a whole chain at once: a block is then never more recent than its parent,
        # so eviction in LRU order always takes a chain from its tail
        now = self.clock()
        for block in seq.table.blocks:
            block.last_use = now

    def _cut_chain(self, seq: _Sequence, n_blocks: int) -> None:
        """Stop listing the sequence as a holder of its blocks from ``n_blocks`` on."""
        removed = seq.table.blocks[n_blocks:]
        del seq.table.blocks[n_blocks:]
        if seq.open:
            BlockTable(self.block_size, removed).release()
        for block in removed:
            h = block.prefix_hash
            holders = self._holders[h]
            holders.discard(seq.seq_id)
            if not holders:
                # no sequence holds its cells any more: nothing left to reuse
                del self._holders[h], self._blocks[h], self._parent[h]

    def _free(self, seq: _Sequence) -> None:
        """Remove the sequence's cells (shared ones survive in their other holders)."""
        llama_cpp.llama_memory_seq_rm(self._mem, seq.seq_id, -1, -1)
        self._cut_chain(seq, 0)
        self._seqs.pop(seq.seq_id, None)


__all__ = ["PoolError", "PoolStats", "SharedPrefixPool"]
