"""Per-cell metadata of edgemerge's patched KV cache: attention bias and position span.

Every cell of the llama.cpp KV cache (one token's K and V in every layer) carries two
extra facts once native/patches/0002-0004 are applied:

- ``bias``: added to the cell's KQ-mask entry, i.e. to its attention score for every
  query that sees it. A merged cell standing for ``m`` tokens' worth of attention mass
  gets ``log(m)``: ``exp(score + log m) = m * exp(score)``. Default 0.
- ``span_min``/``span_max``: the positions the cell covers. Removing any of them
  (``llama_memory_seq_rm``) removes the cell. Default: the cell's own position.

Both are saved and restored with the sequence state, move with position shifts
(``seq_add``/``seq_div``) and are shared by every sequence that holds the cell.

``ctx`` arguments accept a ``llama_cpp.Llama``, llama-cpp-python's internal
``LlamaContext``, or the raw ``llama_context`` pointer (a ctypes pointer or an int).
"""

from __future__ import annotations

import ctypes
import operator
from dataclasses import dataclass

import numpy as np

from edgemerge import native

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1
_UINT32_MAX = 2**32 - 1


@dataclass(frozen=True, eq=False)
class KVCells:
    """The cells of one sequence, ordered by position (then cell index)."""

    cell: np.ndarray  # uint32, index of the cell in the cache
    pos: np.ndarray  # int32
    span_min: np.ndarray  # int32
    span_max: np.ndarray  # int32
    bias: np.ndarray  # float32

    def __len__(self) -> int:
        return len(self.cell)

    def index_of_pos(self, pos: int) -> int:
        """Cache index of the (first) cell at position ``pos``."""
        hits = np.flatnonzero(self.pos == pos)
        if len(hits) == 0:
            raise KeyError(f"no cell of this sequence is at position {pos}")
        return int(self.cell[hits[0]])


def _context_address(ctx: object) -> int:
    """Address of the ``llama_context`` behind ``ctx``."""
    holder = getattr(ctx, "_ctx", ctx)  # llama_cpp.Llama keeps its LlamaContext in _ctx
    raw = getattr(holder, "ctx", holder)  # LlamaContext.ctx is the ctypes pointer
    if raw is None:
        raise ValueError("the llama context is closed (its pointer is None); use an open model")
    if isinstance(raw, int) and not isinstance(raw, bool):
        address = raw
    elif isinstance(raw, ctypes.c_void_p | ctypes._Pointer):
        address = ctypes.cast(raw, ctypes.c_void_p).value
    else:
        # ctypes.cast would also take a str or bytes and hand over its buffer, so only
        # pointer types get this far
        raise TypeError(
            "ctx must be a llama_cpp.Llama, a llama_cpp LlamaContext or a llama_context "
            f"pointer, not {type(ctx).__name__}"
        )
    if not address:
        raise ValueError("the llama context pointer is NULL; use an open model")
    return address


def _context_pointer(ctx: object):  # noqa: ANN202 - a cffi pointer
    return native.ffi().cast("void *", _context_address(ctx))


def _integer(name: str, value: int, lo: int, hi: int) -> int:
    try:
        number = operator.index(value)
    except TypeError as err:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from err
    if not lo <= number <= hi:
        raise ValueError(f"{name} is {number}; it must be in [{lo}, {hi}]")
    return number


def list_cells(ctx: object, seq_id: int = 0) -> KVCells:
    """The KV cells of sequence ``seq_id`` with their position, span and bias.

    Raises:
        NativeError: unknown sequence, or a context without a KV cache.
    """
    seq_id = _integer("seq_id", seq_id, _INT32_MIN, _INT32_MAX)
    ffi, lib = native.ffi(), native.lib()
    ptr = _context_pointer(ctx)
    count = ffi.new("int32_t *")
    null = ffi.NULL
    native.check(lib.edgemerge_kv_cells_list(ptr, seq_id, 0, null, null, null, null, null, count))
    # A second pass fills the arrays; it loops only if the sequence grew in between
    # (another thread decoding into the same context).
    while True:
        capacity = count[0]
        out = KVCells(
            cell=np.empty(capacity, np.uint32),
            pos=np.empty(capacity, np.int32),
            span_min=np.empty(capacity, np.int32),
            span_max=np.empty(capacity, np.int32),
            bias=np.empty(capacity, np.float32),
        )
        native.check(
            lib.edgemerge_kv_cells_list(
                ptr,
                seq_id,
                capacity,
                ffi.from_buffer("uint32_t[]", out.cell),
                ffi.from_buffer("int32_t[]", out.pos),
                ffi.from_buffer("int32_t[]", out.span_min),
                ffi.from_buffer("int32_t[]", out.span_max),
                ffi.from_buffer("float[]", out.bias),
                count,
            )
        )
        if count[0] <= capacity:
            n = count[0]
            return KVCells(
                out.cell[:n], out.pos[:n], out.span_min[:n], out.span_max[:n], out.bias[:n]
            )


def set_cell(
    ctx: object, seq_id: int, cell: int, *, bias: float, span_min: int, span_max: int
) -> None:
    """Set the attention bias and position span of cache cell ``cell`` of ``seq_id``.

    The span must contain the cell's position (``0 <= span_min <= pos <= span_max``)
    and the bias must be finite with ``|bias| <= EDGEMERGE_BIAS_MAX`` (65504: the
    flash-attention mask is f16).

    Raises:
        NativeError: unknown sequence, cell outside the cache or not in the sequence,
            bad bias or span; the cell is left unchanged.
    """
    seq_id = _integer("seq_id", seq_id, _INT32_MIN, _INT32_MAX)
    cell = _integer("cell", cell, 0, _UINT32_MAX)
    span_min = _integer("span_min", span_min, _INT32_MIN, _INT32_MAX)
    span_max = _integer("span_max", span_max, _INT32_MIN, _INT32_MAX)
    ptr = _context_pointer(ctx)
    native.check(
        native.lib().edgemerge_kv_cell_set(ptr, seq_id, cell, float(bias), span_min, span_max)
    )
