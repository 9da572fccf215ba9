"""Streaming compression by any method: the budget holds during prefill, not only after it.

This is the edge mode of the evaluation suite for methods that have no native in-cache
path (BlockMerge has one: ``edgemerge.Llama`` with ``MergeSettings``). The context is
prefilled in chunks of ``n_batch`` tokens into a real llama.cpp context. Whenever the
next chunk would not fit the budget, the cache is read (``llama_state_seq_get_data``),
compressed by the method to ``budget - next chunk`` cells, written back into the state
(K/V, positions, and the bias and spans of merged cells) and restored with
``llama_state_seq_set_data``. So every method sees what it would see on a device: the
cells left by its own earlier decisions, never the full context.

What the methods get at each compression (as a :class:`KVSnapshot`):

* keys/values as the cache holds them (f16, dequantized);
* ``importance``: the attention mass each cell has received from every query decoded
  so far (H2O's accumulated score). It is read per chunk from llama.cpp's
  ``kq_soft_max`` tensors (flash attention off, see :mod:`edgemerge.native.capture`) and
  carried through compressions: a merged cell's importance is its members' sum;
* ``queries``: the post-RoPE queries of the chunk's last ``n_obs`` tokens (SnapKV's
  observation window);
* ``mass`` and ``spans`` of cells merged earlier, so re-merging keeps the bookkeeping;
* ``rope``: the model's RoPE (ExpectedAttention moves its query statistics forward).

Cell order is slot order: after a restore into an empty cache llama.cpp places the
cells in slots ``0..n-1`` in the state's order and appends new tokens after them. The
positions read back are checked against the ones tracked here at every compression,
which would catch any other placement.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass

import llama_cpp
import numpy as np

from edgemerge.evaluation.scoring import (
    ContextSession,
    ScoringError,
    compressed_state,
    decode_chunk,
    new_context,
)
from edgemerge.methods.base import CompressionMethod, KVSnapshot
from edgemerge.native import kvstate
from edgemerge.native.capture import CaptureError, GraphRecorder, ModelLayout, model_layout


@dataclass(frozen=True)
class StreamResult:
    """What a streamed prefill left in the cache, and what it cost.

    Attributes:
        state: the sequence state (``llama_state_seq_get_data`` bytes, V stored as the
            streaming context stores it: transposed, flash attention being off).
        n_cells: cells of the full-attention cache at the end.
        peak_cells: the most cells the full-attention cache held at any time.
        compressions: how many times the method ran.
        compress_s: seconds in the method (planning and merging, in Python/numba).
        io_s: seconds reading, rewriting and restoring states around compressions.
        eval_s: seconds in llama_decode.
    """

    state: bytes
    n_cells: int
    peak_cells: int
    compressions: int
    compress_s: float
    io_s: float
    eval_s: float


class _Callback:
    """The eval callback handed to llama.cpp once; it forwards to the chunk's recorder."""

    def __init__(self) -> None:
        self.recorder: GraphRecorder | None = None

    def __call__(self, t: int, ask: bool, user_data: int) -> bool:
        return self.recorder(t, ask, user_data) if self.recorder is not None else False


class StreamingPrefill(ContextSession):
    """A flash-attention-off llama.cpp context that prefills under a cell budget.

    Args:
        model: a loaded ``llama_cpp.Llama`` (only its model is used).
        n_ctx: cache cells of the streaming context; must hold ``budget + n_batch``.
        n_batch: tokens per chunk (and per decode call).
        n_obs: queries kept per chunk for methods that look at an observation window.
        n_threads: CPU threads (default: all logical cores).
    """

    def __init__(
        self,
        model: llama_cpp.Llama,
        n_ctx: int,
        *,
        n_batch: int = 256,
        n_obs: int = 32,
        n_threads: int | None = None,
    ) -> None:
        if n_batch < 1 or n_obs < 0 or n_ctx < n_batch:
            raise ValueError(
                f"need n_ctx >= n_batch >= 1 and n_obs >= 0, got n_ctx={n_ctx}, "
                f"n_batch={n_batch}, n_obs={n_obs}"
            )
        self.layout: ModelLayout = model_layout(model.model)
        self.layers = self.layout.full_attention_layers
        self.n_ctx, self.n_batch, self.n_obs = n_ctx, n_batch, n_obs
        self._callback = _Callback()
        # kept alive as long as the context: llama.cpp holds a raw pointer to it
        self._c_callback = llama_cpp.ggml_backend_sched_eval_callback(self._callback)
        self.ctx = new_context(
            model.model,
            n_ctx,
            n_batch=n_batch,
            n_threads=n_threads,
            flash_attn=False,
            cb_eval=self._c_callback,
        )
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def prefill(self, tokens: np.ndarray, method: CompressionMethod, budget: int) -> StreamResult:
        """Decode ``tokens`` from position 0, keeping at most ``budget`` cells between chunks.

        Args:
            tokens: int ``[n]`` token ids.
            method: the compression method; it runs whenever the next chunk would not fit.
            budget: cells the full-attention cache may hold once a chunk is decoded.

        Raises:
            ValueError: the budget cannot take a chunk, or is below the method's minimum.
            CaptureError, ScoringError: llama.cpp failed or returned unexpected tensors.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        if budget > self.n_ctx:
            raise ValueError(f"budget {budget} exceeds the streaming context ({self.n_ctx})")
        need = method.min_budget(min(tokens.shape[0], budget + self.n_batch))
        if budget - self.n_batch < need and tokens.shape[0] > budget:
            raise ValueError(
                f"budget {budget} leaves {budget - self.n_batch} cells after room for a "
                f"{self.n_batch}-token chunk; {type(method).__name__} needs {need}: raise the "
                "budget or lower n_batch"
            )
        mem = llama_cpp.llama_get_memory(self.ctx)
        llama_cpp.llama_memory_clear(mem, True)
        positions = np.zeros(0, np.int32)
        importance = np.zeros(0, np.float64)
        mass = np.zeros(0, np.float32)
        spans = np.zeros((0, 2), np.int32)
        compressions, compress_s, io_s, eval_s, peak = 0, 0.0, 0.0, 0.0, 0
        n_tok = tokens.shape[0]
        for start in range(0, n_tok, self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            n_obs = min(self.n_obs, len(chunk))
            recorder = GraphRecorder(
                self.layers,
                len(chunk),
                n_obs,
                self.layout.n_head,
                self.layout.head_dim,
                self.n_ctx,
                want_mass=True,
            )
            recorder.chunk_start, recorder.chunk_len = 0, len(chunk)
            t0 = time.perf_counter()
            self._decode(chunk, start, recorder)
            eval_s += time.perf_counter() - t0
            new_pos = np.arange(start, start + len(chunk), dtype=np.int32)
            positions = np.concatenate([positions, new_pos])
            n_cells = positions.shape[0]
            importance = np.concatenate([importance, np.zeros(len(chunk))])
            importance += recorder.mass[:n_cells]
            mass = np.concatenate([mass, np.ones(len(chunk), np.float32)])
            spans = np.concatenate([spans, np.stack([new_pos, new_pos], axis=1)])
            peak = max(peak, n_cells)
            next_len = min(self.n_batch, n_tok - start - len(chunk))
            if n_cells + next_len <= budget:
                continue
            t0 = time.perf_counter()
            state = self._read_state()
            stream = state.caches[0].stream
            if not np.array_equal(stream.positions, positions):
                raise ScoringError(
                    "the cache's cells are not in the order they were restored and decoded; "
                    "cannot map attention mass to cells"
                )
            keys, values = stream.keys_values(self.layout.n_kv_head)
            queries = None
            if n_obs:
                queries = np.stack([recorder.queries[il] for il in self.layers])
            snapshot = KVSnapshot(
                keys=keys,
                values=values,
                positions=positions,
                importance=importance.astype(np.float32),
                queries=queries,
                query_positions=new_pos[len(chunk) - n_obs :] if n_obs else None,
                layers=self.layers,
                mass=mass,
                spans=spans,
                attn_scale=self.layout.attn_scale,
                rope=self.layout.rope,
            )
            io_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            out = method.compress(snapshot, budget - next_len)
            compress_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            self.load(compressed_state(state, out))
            io_s += time.perf_counter() - t0
            member_sum = np.add.reduceat(
                importance[out.member_index], out.member_offsets[:-1].astype(np.int64)
            )
            positions, importance = out.positions.copy(), member_sum
            mass, spans = out.mass.copy(), out.span.copy()
            compressions += 1
        t0 = time.perf_counter()
        final = self._get_state_bytes()
        io_s += time.perf_counter() - t0
        return StreamResult(
            final, int(positions.shape[0]), peak, compressions, compress_s, io_s, eval_s
        )

    def _decode(self, chunk: np.ndarray, start: int, recorder: GraphRecorder) -> None:
        self._callback.recorder = recorder
        try:
            decode_chunk(self.ctx, self.batch, chunk, start, all_logits=False)
        finally:
            self._callback.recorder = None
        recorder.raise_error()
        expected = len(self.layers) * self.layout.n_head * len(chunk)
        if recorder.mass_rows != expected:
            raise CaptureError(
                f"saw {recorder.mass_rows} attention rows, expected {expected} "
                "(kq_soft_max tensors missing)"
            )

    def _get_state_bytes(self) -> bytes:
        size = llama_cpp.llama_state_seq_get_size(self.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, 0) != size:
            raise ScoringError("llama_state_seq_get_data did not return the whole state")
        return bytes(buf)

    def _read_state(self) -> kvstate.SeqState:
        return kvstate.parse_seq_state(self._get_state_bytes())
