"""Recall for one sequence of a live context: store originals, bring back what a turn needs.

:class:`RecallEngine` is owned by :class:`edgemerge.Llama` (``MergeSettings.recall``):

* before a merge or an eviction, :meth:`RecallEngine.save_originals` copies the rows of
  every exact cell about to leave the cache into the :class:`~edgemerge.recall.store.
  BlockStore` (so every position is either exact in the cache or in the store);
* while a prompt's last ``recall_window`` tokens are evaluated, the query capture
  (native/src/query_capture.c) keeps their post-RoPE queries;
* :meth:`RecallEngine.recall` then scores the stored blocks with those queries
  (:mod:`edgemerge.recall.scoring`), and rewrites the sequence's full-attention cache
  through ``llama_state_seq_set_data``: the chosen blocks' original rows come back at
  their positions (bias 0, their own spans), the merged cells that stood for them leave,
  and the least-attended unprotected cells are evicted into the store until the budget
  holds. A restore that llama.cpp refuses puts the old state back.

The sequence state is read and written whole (``llama_state_seq_get_data``/``_set_data``:
every layer's K/V rows of the sequence, a copy proportional to the cells, not to the
history), so the rows restored are byte-identical to those stored, for every cache type.
With ``store_type="q8_0"`` a float cache's rows are stored as q8_0; a restore writes the
cache type's encoding of their q8_0 values instead (within half a q8_0 step of the
originals), and scoring reads the stored keys from q8_0.
"""

from __future__ import annotations

import ctypes
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
from threadpoolctl import ThreadpoolController

from edgemerge import native
from edgemerge.native import kvstate
from edgemerge.recall.scoring import attention_shares, choose_blocks
from edgemerge.recall.store import (
    FLOAT_TYPES,
    BlockStore,
    RowFormat,
    StoredBlock,
    StoreFileError,
    StoreSnapshot,
)
from edgemerge.reference import ggml_quants
from edgemerge.settings import MergeSettings, SettingsError

_F16 = ggml_quants.GGML_TYPE_F16


class RecallError(RuntimeError):
    """The model or context cannot do recall (unsupported architecture, bad geometry)."""


@dataclass(frozen=True)
class RecallResult:
    """What one :meth:`RecallEngine.recall` did."""

    blocks: int  # blocks brought back
    cells_restored: int
    cells_dropped: int  # merged cells that stood for the restored blocks
    cells_evicted: int  # cells moved to the store to make room
    best_score: float  # share of the best stored block (0: nothing scored)


class QueryCapture:
    """The native ring of post-RoPE queries (``edgemerge_qcapture_*``).

    ``read()`` returns float32 ``[n_layer, window, n_head, head_dim]`` and int32
    ``[n_layer]`` tokens captured per layer (rows past that count are zero).
    """

    def __init__(self, ctx: int, n_layer: int, n_head: int, head_dim: int, window: int) -> None:
        self._qc = None  # close() and __del__ work even if the native call below fails
        self.armed = False
        ffi, lib = native.ffi(), native.lib()
        out = ffi.new("edgemerge_qcapture **")
        native.check(
            lib.edgemerge_qcapture_new(
                ffi.cast("void *", ctx), n_layer, n_head, head_dim, window, out
            )
        )
        # freed by close() only, never by an ffi.gc finaliser: in a reference cycle the
        # garbage collector may run that finaliser first and then Llama.__del__ -> close(),
        # which freed the same pointer twice ("double free" when a chat exited)
        self._qc = out[0]
        self.shape = (n_layer, window, n_head, head_dim)
        self.armed = False

    def arm(self) -> None:
        native.check(native.lib().edgemerge_qcapture_arm(self._qc, 1))
        self.armed = True

    def disarm(self) -> None:
        native.check(native.lib().edgemerge_qcapture_arm(self._qc, 0))
        self.armed = False

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        ffi = native.ffi()
        q = np.zeros(self.shape, np.float32)
        n = np.zeros(self.shape[0], np.int32)
        native.check(
            native.lib().edgemerge_qcapture_read(
                self._qc, ffi.from_buffer("float[]", q), ffi.from_buffer("int32_t[]", n)
            )
        )
        return q, n

    def close(self) -> None:
        if self.armed:
            self.disarm()
        if self._qc is not None:
            qc, self._qc = self._qc, None
            native.lib().edgemerge_qcapture_free(qc)

    def __del__(self) -> None:
        self.close()


def _cell_rows(stream: kvstate.StreamKV) -> tuple[np.ndarray, np.ndarray | None]:
    """K and V bytes per cell: uint8 [n_layer, n_cells, bytes] (a transposed V's
    components of one cell become one row)."""
    k = np.stack([layer.k for layer in stream.layers])
    if stream.layers[0].v is None:
        return k, None
    if stream.v_trans:
        v = np.stack(
            [layer.v.transpose(1, 0, 2).reshape(layer.v.shape[1], -1) for layer in stream.layers]
        )
    else:
        v = np.stack([layer.v for layer in stream.layers])
    return k, v


def _stream_from_rows(
    template: kvstate.StreamKV,
    positions: np.ndarray,
    bias: np.ndarray,
    spans: np.ndarray,
    k: np.ndarray,
    v: np.ndarray | None,
) -> kvstate.StreamKV:
    layers = []
    n = positions.size
    for il, t in enumerate(template.layers):
        lv = None
        if v is not None:
            lv = v[il]
            if template.v_trans:
                e, _, el = t.v.shape
                lv = np.ascontiguousarray(lv.reshape(n, e, el).transpose(1, 0, 2))
        layers.append(kvstate.LayerKV(t.k_type, np.ascontiguousarray(k[il]), t.v_type, lv))
    return kvstate.StreamKV(
        positions.astype(np.int32),
        (template.seq_ids[0],) * n,
        template.v_trans,
        tuple(layers),
        None,
        bias.astype(np.float32),
        spans.astype(np.int32),
    )


class RecallEngine:
    """Block store, query capture and restore for sequence 0 of a live context.

    Args:
        ctx: the ``llama_context *`` (an int address).
        model: the ``llama_model *``.
        settings: the merge policy (``recall`` fields).
        layer_ids: model layer of each cache layer (``kvmerge.kv_shape(...).layer_ids``).
        spill_dir: where the store's spill file goes.
        cache_types: ggml types of the cache's K and V (the context's ``type_k``/``type_v``).
        row_widths: values per cell of one layer's K and V rows (``n_head_kv * head_dim``);
            None: the model's ``n_kv_head * head_dim`` for both.

    Raises:
        RecallError: the architecture's query scaling is unknown, or the cache carries
            M-RoPE cell extensions.
        SettingsError: ``store_type="q8_0"`` for a float cache whose row widths are not a
            multiple of 32 (q8_0's block size).
    """

    def __init__(
        self,
        ctx: int,
        model: int,
        settings: MergeSettings,
        layer_ids: tuple[int, ...],
        spill_dir: Path,
        *,
        cache_types: tuple[int, int] = (_F16, _F16),
        row_widths: tuple[int, int] | None = None,
    ) -> None:
        from edgemerge.native.capture import CaptureError, model_layout

        try:
            layout = model_layout(model)
        except CaptureError as err:
            raise RecallError(f"recall: {err}; use recall=False for this model") from err
        self.ctx = ctx
        self.cache_types = (int(cache_types[0]), int(cache_types[1]))
        width = layout.n_kv_head * layout.head_dim
        self.row_widths = (width, width) if row_widths is None else tuple(map(int, row_widths))
        formats = self._formats(settings.store_type)  # fails before anything is allocated
        self._settings = settings
        self._blas = ThreadpoolController()  # scans the loaded libraries once
        self.layer_ids = tuple(int(i) for i in layer_ids)
        self.attn_scale = layout.attn_scale
        self.n_head = layout.n_head
        self.n_kv_head = layout.n_kv_head
        self.head_dim = layout.head_dim
        self.n_layer = layout.n_layer
        self.capture = QueryCapture(
            ctx, layout.n_layer, layout.n_head, layout.head_dim, settings.recall_window
        )
        self.store = BlockStore(
            settings.block_size, settings.store_ram_mb * (1 << 20), Path(spill_dir), *formats
        )
        self.turns = 0
        self.hits = 0  # turns that brought something back
        self.blocks_restored = 0
        self.time_s = 0.0

    @property
    def settings(self) -> MergeSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: MergeSettings) -> None:
        """New settings for a live engine; a new ``store_type`` re-encodes the stored
        blocks (from q8_0 back to "cache" they stay at their q8_0 values)."""
        formats = self._formats(settings.store_type)
        self.store.recode(*formats)
        self._settings = settings

    def _formats(self, store_type: str) -> tuple[RowFormat, RowFormat]:
        """The store's K and V formats for ``store_type``."""
        if store_type == "q8_0":
            for side, t, w in zip("KV", self.cache_types, self.row_widths, strict=True):
                if t in FLOAT_TYPES and w % ggml_quants.QK8_0 != 0:
                    raise SettingsError(
                        f"store_type: 'q8_0' needs rows whose width is a multiple of "
                        f"{ggml_quants.QK8_0}, but this model's {side} rows hold {w} values; "
                        "use store_type='cache' for it"
                    )
        return tuple(
            RowFormat.choose(t, w, store_type)
            for t, w in zip(self.cache_types, self.row_widths, strict=True)
        )

    # -- state I/O -----------------------------------------------------------------------

    def read_state(self) -> tuple[bytes, kvstate.SeqState]:
        size = llama_cpp.llama_state_seq_get_size(self.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, 0) != size:
            raise RecallError("llama_state_seq_get_data did not return the whole state")
        raw = bytes(buf)
        return raw, kvstate.parse_seq_state(raw)

    def _write_state(self, raw: bytes) -> bool:
        buf = (ctypes.c_uint8 * len(raw)).from_buffer_copy(raw)
        return llama_cpp.llama_state_seq_set_data(self.ctx, buf, len(raw), 0) == len(raw)

    # -- storing -------------------------------------------------------------------------

    def save_originals(self, positions: np.ndarray, tokens: np.ndarray) -> None:
        """Store the rows of the exact cells at ``positions`` (about to be merged or
        evicted); ``tokens`` is the sequence's token ids by position."""
        positions = np.unique(np.asarray(positions, np.int64))
        if positions.size == 0:
            return
        _, state = self.read_state()
        stream = state.stream
        self._check_types(stream)
        idx = _indices_of(stream.positions, positions)
        k, v = _cell_rows(stream)
        self.store.put(
            positions.astype(np.int32),
            tokens[positions].astype(np.int32),
            k[:, idx],
            None if v is None else v[:, idx],
        )

    def _check_types(self, stream: kvstate.StreamKV) -> None:
        # the store converts rows by the types it was built with; rows of another type
        # would come back as garbage, so a mismatch must stop here
        layer = stream.layers[0]
        got = (layer.k_type, layer.v_type if layer.v is not None else self.cache_types[1])
        if got != self.cache_types:
            raise RecallError(
                f"recall: the cache holds K/V of ggml types {got}, but the store was set up "
                f"for {self.cache_types}; pass the context's type_k/type_v as cache_types"
            )

    def load_store(self, snap: StoreSnapshot, tokens: np.ndarray, n_tokens: int) -> int:
        """Fill the store from a saved one (after the state it was saved with was loaded),
        keeping the positions that still belong to the sequence: before ``n_tokens``, the
        same token, and not an exact cell of the cache now. Returns how many were kept;
        raises :class:`StoreFileError` when the rows cannot be this cache's."""
        positions = snap.positions.astype(np.int64)
        keep = positions < n_tokens
        if keep.any():
            _, state = self.read_state()
            stream = state.stream
            self._check_types(stream)
            if snap.k.shape[0] != len(stream.layers):
                raise StoreFileError(
                    f"the saved store has rows of {snap.k.shape[0]} layers, this cache "
                    f"{len(stream.layers)}"
                )
            spans = stream.spans
            exact = stream.positions if spans is None else spans[spans[:, 0] == spans[:, 1], 0]
            at = np.minimum(positions, max(0, n_tokens - 1))
            keep &= np.asarray(tokens)[at] == snap.tokens
            keep &= ~np.isin(positions, exact)
        return self.store.load(snap, keep)

    def forget_from(self, pos: int) -> None:
        """The sequence was cut at ``pos``: stored positions from there on are stale."""
        self.store.drop_from(pos)

    # -- recall --------------------------------------------------------------------------

    def queries(self) -> np.ndarray:
        """Captured queries of the cache layers: float32 [n_cache_layer, T, n_head, D]."""
        q, n = self.capture.read()
        sel = list(self.layer_ids)
        t = int(n[sel].min()) if sel else 0
        return q[sel, :t]

    def _block_layers(self) -> np.ndarray:
        """bool [n_cache_layer]: cache layers whose queries score stored blocks."""
        first = self.settings.recall_skip_layers * self.n_layer
        vote = np.array([layer >= first for layer in self.layer_ids], bool)
        if vote.size and not vote.any():
            vote[-1] = True  # a model whose cached layers are all early still recalls
        return vote

    def recall(self, tokens: np.ndarray, n_tokens: int, budget: int) -> RecallResult:
        """Score the store with the captured queries and restore the best blocks.

        Args:
            tokens: token ids by position (``Llama.input_ids``).
            n_tokens: logical tokens of the sequence.
            budget: the most cells the sequence may hold afterwards.
        """
        s = self.settings
        self.turns += 1
        nothing = RecallResult(0, 0, 0, 0, 0.0)
        q = self.queries()
        block_ids = self.store.blocks()
        if q.shape[1] == 0 or not block_ids:
            return nothing
        raw, state = self.read_state()
        stream = state.stream
        n = stream.n_cells
        pos = stream.positions.astype(np.int64)
        bias = stream.bias if stream.bias is not None else np.zeros(n, np.float32)
        spans = stream.spans if stream.spans is not None else np.stack([pos, pos], 1)
        self._check_types(stream)
        k_rows, v_rows = _cell_rows(stream)
        k_type = stream.layers[0].k_type
        cache_keys = self._keys(ggml_quants.dequantize_rows(k_rows, k_type, self.row_widths[0]))

        entries: dict[int, StoredBlock] = {}
        for b in block_ids:
            e = self.store.get(b)
            if e is None or e.positions.size == 0:
                continue
            if np.any(e.positions >= n_tokens) or not np.array_equal(tokens[e.positions], e.tokens):
                self.store.take(b)  # stale: the sequence changed under it
                continue
            entries[b] = e
        if not entries:
            return nothing
        order = sorted(entries)
        sizes = np.array([entries[b].positions.size for b in order])
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.intp)
        # BLAS gets the context's thread count: its own default (every core) fights the
        # llama.cpp threadpool for the same cores and made scoring several times slower under load
        threads = max(1, int(llama_cpp.llama_n_threads_batch(self.ctx)))
        with self._blas.limit(limits=threads, user_api="blas"):
            block_score, cell_score = attention_shares(
                q,
                self.attn_scale,
                cache_keys,
                bias,
                _StoredKeys([entries[b].k for b in order], self.store.k_format, self._keys),
                starts,
                self._block_layers(),
            )
        best = float(block_score.max()) if block_score.size else 0.0
        picked = choose_blocks(
            block_score, s.recall_blocks, s.recall_threshold, np.array(order), s.recall_following
        )
        chosen = [order[i] for i in picked]
        if not chosen:
            return RecallResult(0, 0, 0, 0, best)

        bs = s.block_size
        protected = (pos < s.sinks) | (pos >= n_tokens - s.recent)
        # a chosen block's followers that are already exact stay: they hold the value
        # the question is after as much as the restored ones do
        near = np.array([b + k for b in chosen for k in range(1, s.recall_following + 1)], np.int64)
        protected |= (spans[:, 0] == spans[:, 1]) & np.isin(pos // bs, near)
        while chosen:
            lo = np.array([b * bs for b in chosen])
            in_chosen = np.zeros(n, bool)
            for b0 in lo.tolist():
                in_chosen |= (spans[:, 0] >= b0) & (spans[:, 1] < b0 + bs)
            drop = in_chosen & (spans[:, 1] > spans[:, 0])
            fresh = [entries[b].select(~np.isin(entries[b].positions, pos[~drop])) for b in chosen]
            added = sum(e.positions.size for e in fresh)
            n_new = n - int(drop.sum()) + added
            evictable = np.flatnonzero(~protected & ~in_chosen)
            need = max(0, n_new - budget)
            if need <= evictable.size:
                break
            chosen.pop()  # the weakest block does not fit; try with fewer
        if not chosen:
            return RecallResult(0, 0, 0, 0, best)
        evict = evictable[np.argsort(cell_score[evictable], kind="stable")[:need]]
        keep = ~drop
        keep[evict] = False

        new_pos = np.concatenate([pos[keep]] + [e.positions.astype(np.int64) for e in fresh])
        new_bias = np.concatenate([bias[keep], np.zeros(added, np.float32)])
        new_spans = np.concatenate([spans[keep], np.stack([new_pos[keep.sum() :]] * 2, 1)])
        back = [self.store.cache_rows(e) for e in fresh]  # in the cache's type again
        new_k = np.concatenate([k_rows[:, keep]] + [k for k, _ in back], axis=1)
        new_v = (
            None
            if v_rows is None
            else np.concatenate([v_rows[:, keep]] + [v for _, v in back], axis=1)
        )
        o = np.argsort(new_pos, kind="stable")
        new_stream = _stream_from_rows(
            stream,
            new_pos[o],
            new_bias[o],
            new_spans[o],
            new_k[:, o],
            None if new_v is None else new_v[:, o],
        )
        out = kvstate.write_seq_state(kvstate.with_stream(state, new_stream))
        if not self._write_state(out):
            if not self._write_state(raw):
                raise RecallError("llama.cpp refused both the restored and the original state")
            warnings.warn(
                "recall: llama.cpp refused the restored cache; the turn goes on without recall",
                RuntimeWarning,
                stacklevel=2,
            )
            return RecallResult(0, 0, 0, 0, best)
        for b in chosen:
            self.store.take(b)
        exact_evicted = evict[spans[evict, 0] == spans[evict, 1]]
        if exact_evicted.size:
            p = pos[exact_evicted]
            self.store.put(
                p.astype(np.int32),
                tokens[p].astype(np.int32),
                k_rows[:, exact_evicted],
                None if v_rows is None else v_rows[:, exact_evicted],
            )
        self.hits += 1
        self.blocks_restored += len(chosen)
        return RecallResult(len(chosen), added, int(drop.sum()), int(evict.size), best)

    def _keys(self, x: np.ndarray) -> np.ndarray:
        """float32 [..., n, width] -> float32 [..., n, n_kv_head, head_dim] (a view)."""
        return x.reshape(*x.shape[:-1], self.n_kv_head, self.head_dim)

    def close(self) -> None:
        self.capture.close()
        self.store.close()


class _StoredKeys(Sequence):
    """Stored keys one layer at a time, as :func:`attention_shares` reads them: item
    ``l`` is float32 [n, n_kv_head, head_dim], the blocks' layer-``l`` rows in order.
    Converting a layer when it is scored, not the whole store at once, keeps a turn's
    temporaries to one layer's keys (at 22K stored positions: 11 MiB, not 270)."""

    def __init__(
        self, k_rows: list[np.ndarray], fmt: RowFormat, shape: Callable[[np.ndarray], np.ndarray]
    ) -> None:
        self._k = k_rows  # uint8 [n_layer, m, row bytes] per block
        self._fmt = fmt
        self._shape = shape

    def __len__(self) -> int:
        return self._k[0].shape[0] if self._k else 0

    def __getitem__(self, layer: int) -> np.ndarray:  # type: ignore[override]
        raw = np.concatenate([k[layer] for k in self._k], axis=0)
        return self._shape(self._fmt.values(raw))


def _indices_of(stream_positions: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Index in the stream of each wanted position (each must be present)."""
    order = np.argsort(stream_positions, kind="stable")
    sorted_pos = stream_positions[order]
    at = np.searchsorted(sorted_pos, wanted)
    at = np.minimum(at, sorted_pos.size - 1)
    if not np.array_equal(sorted_pos[at], wanted):
        missing = wanted[sorted_pos[at] != wanted][:5].tolist()
        raise RecallError(f"positions {missing} are not cells of the sequence")
    return order[at]
