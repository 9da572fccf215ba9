"""Parse and write llama.cpp's per-sequence state (``llama_state_seq_get_data``).

Layout (all little-endian; verified against llama-context.cpp and
llama-kv-cache.cpp / llama-kv-cache-iswa.cpp of the vendored llama.cpp):

header
    u32 magic 0xAF143CD8, i32 seq_id (the sequence the state was taken from)
then one block per KV cache of the context's memory, in order. A plain model
has one cache; a model with interleaved sliding-window attention (Gemma 2/3)
has two: the full-attention layers' cache first, then the sliding-window
layers' cache. Each cache block is
    u32 n_stream
    per stream:
        u32 cell_count                      (0: nothing else for this stream)
        per cell:    i32 pos, u32 n_seq_id,
                     [i32 x, i32 y, i32 tok  only for M-RoPE / PLE models],
                     i32 seq_id * n_seq_id
        [merge section, edgemerge patch 0004, only when some cell is merged:
                     u32 tag EDGEMERGE_STATE_TAG ("EGM1"), u32 cell_count,
                     per cell: f32 bias, i32 span_min, i32 span_max]
        u32 v_trans, u32 n_layer            (n_layer = layers in THIS cache)
        per layer:   i32 k_type, u64 k_row_bytes, k_row_bytes * cell_count bytes
        V, unless the cache has none (MLA):
          v_trans == 0, per layer: i32 v_type, u64 v_row_bytes, v_row_bytes * cell_count
          v_trans == 1, per layer: i32 v_type, u32 v_el_bytes, u32 n_embd_v_gqa,
                        then for each of the n_embd_v_gqa components the
                        cell_count elements of that component (v_el_bytes each)

K rows (and untransposed V rows) hold the ``n_kv_head`` heads one after another,
``head_dim`` values each, encoded as ggml rows of the cache type. A transposed V
(flash attention off) is stored component-major; quantized V needs flash attention,
so transposed V is always f32/f16/bf16.

The merge section sits where v_trans used to be; its tag can never be a valid
v_trans (0 or 1), which is how a reader tells them apart. llama.cpp validates it
on restore: a finite bias with ``|bias| <= EDGEMERGE_BIAS_MAX`` (65504, the f16 mask range) and
``0 <= span_min <= pos <= span_max``; so does this module.

Cells are written in cache-slot order, so for a sequence decoded from position 0
into a fresh context they come out in position order.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from edgemerge import native
from edgemerge.reference import ggml_quants

STATE_SEQ_MAGIC = 0xAF143CD8
GGML_TYPE_COUNT = 43  # enum ggml_type in ggml.h; ids at or above it are corrupt
CELL_EXT_BYTES = 12  # struct llama_kv_cell_ext: i32 x, i32 y, i32 tok
# Both from edgemerge.h (enum edgemerge_limits), which the native reader and writer use too.
MERGE_SECTION_TAG = native.lib().EDGEMERGE_STATE_TAG  # "EGM1" as little-endian bytes
MERGE_BIAS_MAX = float(native.lib().EDGEMERGE_BIAS_MAX)  # the largest finite f16 (mask type)

# Bounds that only corrupt data can exceed; they keep a bad count from turning
# into a huge allocation before the truncation check can fire.
_MAX_STREAMS = 1 << 16
_MAX_SEQ_PER_CELL = 1 << 16
_MAX_LAYERS = 1 << 16


class KVStateError(ValueError):
    """Sequence-state bytes are truncated, corrupt, or inconsistent with what was asked."""


@dataclass(frozen=True, eq=False)
class LayerKV:
    """One layer's K and V for the cells of one stream, as raw ggml bytes.

    ``k``: uint8 ``[n_cells, k_row_bytes]``. ``v``: uint8 ``[n_cells, v_row_bytes]``
    when the stream's V is not transposed, uint8 ``[n_embd_v_gqa, n_cells, v_el_bytes]``
    when it is, or None for a cache without V (MLA). ``k_type``/``v_type`` are ggml
    type ids.
    """

    k_type: int
    k: np.ndarray
    v_type: int | None = None
    v: np.ndarray | None = None

    def __post_init__(self) -> None:
        _check_type_id(self.k_type, "k_type")
        if self.k.dtype != np.uint8 or self.k.ndim != 2 or self.k.shape[1] == 0:
            raise KVStateError(
                f"k must be uint8 [n_cells, row_bytes], got {self.k.dtype} {self.k.shape}"
            )
        if (self.v is None) != (self.v_type is None):
            raise KVStateError("v and v_type must be given together (or both None for no V)")
        if self.v is not None:
            _check_type_id(self.v_type, "v_type")
            if self.v.dtype != np.uint8 or self.v.ndim not in (2, 3):
                raise KVStateError(
                    f"v must be a uint8 array of 2 or 3 axes, got {self.v.dtype} {self.v.shape}"
                )
            n_cells = self.v.shape[1] if self.v.ndim == 3 else self.v.shape[0]
            if n_cells != self.k.shape[0]:
                raise KVStateError(f"k holds {self.k.shape[0]} cells but v holds {n_cells}")

    @property
    def n_cells(self) -> int:
        return int(self.k.shape[0])

    @property
    def v_trans(self) -> bool | None:
        """True if V is stored transposed, None if there is no V."""
        return None if self.v is None else self.v.ndim == 3

    @property
    def n_embd_k_gqa(self) -> int:
        """Width of a K row in values (n_kv_head * head_dim)."""
        return _row_width(self.k_type, self.k.shape[1], "K")

    @property
    def n_embd_v_gqa(self) -> int | None:
        if self.v is None:
            return None
        if self.v.ndim == 3:
            return int(self.v.shape[0])
        return _row_width(self.v_type, self.v.shape[1], "V")

    def keys(self) -> np.ndarray:
        """K dequantized to float32 ``[n_cells, n_embd_k_gqa]``."""
        return ggml_quants.dequantize_rows(self.k, self.k_type, self.n_embd_k_gqa)

    def values(self) -> np.ndarray:
        """V dequantized to float32 ``[n_cells, n_embd_v_gqa]`` (untransposed)."""
        if self.v is None:
            raise KVStateError("this layer has no V (an MLA cache stores K only)")
        if self.v.ndim == 3:
            e, n, el = self.v.shape
            comps = ggml_quants.dequantize_rows(self.v.reshape(e, n * el), self.v_type, n)
            return np.ascontiguousarray(comps.T)
        return ggml_quants.dequantize_rows(self.v, self.v_type, self.n_embd_v_gqa)


@dataclass(frozen=True, eq=False)
class StreamKV:
    """The cells of one stream that belong to the sequence, with their K/V per layer.

    ``positions``: int32 ``[n_cells]``; ``seq_ids``: one tuple of sequence ids per
    cell; ``ext``: int32 ``[n_cells, 3]`` (x, y, tok) for models whose cells carry
    the M-RoPE/PLE extension, else None. ``bias`` (float32 ``[n_cells]``, the
    attention-logit bias of each cell) and ``spans`` (int32 ``[n_cells, 2]``, the
    first and last position each cell covers) are the merge section: both None
    when the state has none (every cell plain: bias 0, span ``[pos, pos]``).
    """

    positions: np.ndarray
    seq_ids: tuple[tuple[int, ...], ...]
    v_trans: bool
    layers: tuple[LayerKV, ...]
    ext: np.ndarray | None = None
    bias: np.ndarray | None = None
    spans: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.positions.shape[0] if self.positions.ndim == 1 else -1
        if self.positions.dtype != np.int32 or n < 1:
            raise KVStateError(
                f"positions must be int32 [n_cells] with n_cells >= 1, got "
                f"{self.positions.dtype} {self.positions.shape}"
            )
        if len(self.seq_ids) != n:
            raise KVStateError(f"{n} positions but {len(self.seq_ids)} seq id tuples")
        if self.ext is not None and (self.ext.dtype != np.int32 or self.ext.shape != (n, 3)):
            raise KVStateError(f"ext must be int32 [{n}, 3], got {self.ext.dtype} {self.ext.shape}")
        if (self.bias is None) != (self.spans is None):
            raise KVStateError("bias and spans must be given together (or both None)")
        if self.bias is not None:
            problem = _merge_problem(self.positions, self.bias, self.spans)
            if problem:
                raise KVStateError(problem)
        if not self.layers:
            raise KVStateError("a non-empty stream needs at least one layer")
        for il, layer in enumerate(self.layers):
            if layer.n_cells != n:
                raise KVStateError(f"layer {il} holds {layer.n_cells} cells, the stream {n}")
            if layer.v_trans is not None and layer.v_trans != self.v_trans:
                raise KVStateError(
                    f"layer {il} V is {'transposed' if layer.v_trans else 'not transposed'} "
                    f"but the stream says v_trans={self.v_trans}"
                )

    @property
    def n_cells(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    def keys_values(self, n_kv_head: int) -> tuple[np.ndarray, np.ndarray]:
        """K and V as float32 ``[n_layer, n_kv_head, n_cells, head_dim]`` (dequantized).

        Raises:
            KVStateError: layers differ in width, a width does not split into
                ``n_kv_head`` heads, or the cache has no V.
        """
        widths = {(layer.n_embd_k_gqa, layer.n_embd_v_gqa) for layer in self.layers}
        if len(widths) != 1:
            raise KVStateError(
                f"layers have different K/V widths {sorted(widths)}; read them per layer "
                "with LayerKV.keys()/values()"
            )
        keys = np.stack([_split_heads(layer.keys(), n_kv_head, "K") for layer in self.layers])
        values = np.stack([_split_heads(layer.values(), n_kv_head, "V") for layer in self.layers])
        return keys, values


@dataclass(frozen=True, eq=False)
class CacheState:
    """One KV cache's part of the state: one entry per stream, None where it is empty."""

    streams: tuple[StreamKV | None, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.streams) <= _MAX_STREAMS:
            raise KVStateError(f"a cache has 1..{_MAX_STREAMS} streams, got {len(self.streams)}")

    @property
    def n_stream(self) -> int:
        return len(self.streams)

    @property
    def stream(self) -> StreamKV:
        """The only non-empty stream (a sequence lives in one stream).

        Raises:
            KVStateError: no stream or more than one holds cells.
        """
        held = [s for s in self.streams if s is not None]
        if len(held) != 1:
            raise KVStateError(f"expected exactly one stream with cells, found {len(held)}")
        return held[0]


@dataclass(frozen=True, eq=False)
class SeqState:
    """A parsed ``llama_state_seq_get_data`` buffer.

    ``caches[0]`` is the only cache of a plain model; for interleaved sliding-window
    models it holds the full-attention layers and ``caches[1]`` the sliding-window ones.
    """

    seq_id: int
    caches: tuple[CacheState, ...]
    cell_ext: bool = False

    @property
    def stream(self) -> StreamKV:
        """The sequence's cells in the first (full-attention) cache."""
        return self.caches[0].stream

    @property
    def positions(self) -> np.ndarray:
        return self.stream.positions

    def keys_values(self, n_kv_head: int, cache: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """float32 K, V ``[n_layer, n_kv_head, n_cells, head_dim]`` of one cache."""
        return self.caches[cache].stream.keys_values(n_kv_head)


# ---------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        if isinstance(data, np.ndarray):
            data = data.tobytes()
        self.buf = memoryview(data).cast("B")
        self.off = 0

    def remaining(self) -> int:
        return len(self.buf) - self.off

    def need(self, n: int, what: str) -> None:
        if n > self.remaining():
            raise KVStateError(
                f"truncated state at offset {self.off}: expected {what} ({n} bytes), "
                f"but only {self.remaining()} bytes remain"
            )

    def scalar(self, fmt: str, what: str) -> int:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.off)
        self.off += size
        return value

    def array(self, nbytes: int, what: str) -> np.ndarray:
        self.need(nbytes, what)
        out = np.frombuffer(self.buf, dtype=np.uint8, count=nbytes, offset=self.off)
        self.off += nbytes
        return out

    def fail(self, offset: int, message: str) -> KVStateError:
        return KVStateError(f"corrupt state at offset {offset}: {message}")


def parse_seq_state(
    data: bytes | bytearray | memoryview | np.ndarray,
    *,
    cell_ext: bool = False,
    has_v: bool = True,
    n_caches: int | None = None,
) -> SeqState:
    """Parse the bytes of ``llama_state_seq_get_data`` for one sequence.

    Args:
        data: the state buffer.
        cell_ext: the model's cells carry the 12-byte M-RoPE/PLE extension
            (qwen2-vl style M-RoPE models); the format does not say so itself.
        has_v: False for caches that store no V (MLA).
        n_caches: how many caches to expect; None reads caches until the data ends
            (two for an interleaved sliding-window model).

    Returns:
        The parsed state. Its K/V arrays are read-only views into ``data`` (into a
        copy of it unless it is ``bytes``), so parsing a large state is cheap.

    Raises:
        KVStateError: the data is truncated or corrupt; the message names the
            offset and what was expected there.
    """
    r = _Reader(bytes(data) if not isinstance(data, bytes) else data)
    magic = r.scalar("<I", "the state magic (u32)")
    if magic != STATE_SEQ_MAGIC:
        raise r.fail(
            0,
            f"magic is 0x{magic:08X}, expected 0x{STATE_SEQ_MAGIC:08X}; "
            "this is not a llama_state_seq_get_data buffer",
        )
    seq_id = r.scalar("<i", "the source sequence id (i32)")
    caches: list[CacheState] = []
    while (n_caches is None and r.remaining() > 0) or (
        n_caches is not None and len(caches) < n_caches
    ):
        caches.append(_parse_cache(r, cell_ext, has_v, len(caches)))
    if not caches:
        raise KVStateError(
            f"the state ends at offset {r.off} right after its header: it holds no KV cache"
        )
    if r.remaining():
        raise KVStateError(
            f"{r.remaining()} unexpected bytes after the last cache at offset {r.off} "
            f"(read {len(caches)} caches)"
        )
    return SeqState(seq_id=seq_id, caches=tuple(caches), cell_ext=cell_ext)


def _parse_cache(r: _Reader, cell_ext: bool, has_v: bool, index: int) -> CacheState:
    at = r.off
    n_stream = r.scalar("<I", f"n_stream of cache {index} (u32)")
    if not 1 <= n_stream <= _MAX_STREAMS:
        raise r.fail(at, f"cache {index} claims {n_stream} streams (expected 1..{_MAX_STREAMS})")
    streams = []
    for s in range(n_stream):
        count = r.scalar("<I", f"cell_count of cache {index} stream {s} (u32)")
        streams.append(_parse_stream(r, count, cell_ext, has_v) if count else None)
    return CacheState(streams=tuple(streams))


def _parse_stream(r: _Reader, n: int, cell_ext: bool, has_v: bool) -> StreamKV:
    positions, seq_ids, ext = _parse_cells(r, n, cell_ext)
    bias = spans = None
    at = r.off
    v_trans = r.scalar("<I", "v_trans (u32) or the merge section tag")
    if v_trans == MERGE_SECTION_TAG:
        bias, spans = _parse_merge(r, n, positions)
        at = r.off
        v_trans = r.scalar("<I", "v_trans (u32)")
    if v_trans not in (0, 1):
        raise r.fail(at, f"v_trans is {v_trans}, expected 0 or 1")
    at = r.off
    n_layer = r.scalar("<I", "n_layer (u32)")
    if not 1 <= n_layer <= _MAX_LAYERS:
        raise r.fail(at, f"n_layer is {n_layer}, expected 1..{_MAX_LAYERS}")
    ks = []
    for il in range(n_layer):
        k_type = _read_type(r, f"layer {il} K type (i32)")
        at = r.off
        row = r.scalar("<Q", f"layer {il} K row size (u64)")
        _check_row_size(r, at, k_type, row, f"layer {il} K")
        ks.append((k_type, r.array(row * n, f"layer {il} K rows ({n} x {row})").reshape(n, row)))
    vs: list[tuple[int | None, np.ndarray | None]] = [(None, None)] * n_layer
    if has_v:
        vs = [_parse_v(r, il, n, bool(v_trans)) for il in range(n_layer)]
    layers = tuple(LayerKV(kt, k, vt, v) for (kt, k), (vt, v) in zip(ks, vs, strict=True))
    return StreamKV(positions, seq_ids, bool(v_trans), layers, ext, bias, spans)


def _parse_merge(r: _Reader, n: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    at = r.off
    count = r.scalar("<I", "merge section cell count (u32)")
    if count != n:
        raise r.fail(at, f"the merge section lists {count} cells, the stream {n}")
    at = r.off
    raw = r.array(12 * n, f"merge section ({n} x f32 bias, i32 span_min, i32 span_max)")
    records = raw.view(np.dtype([("bias", "<f4"), ("lo", "<i4"), ("hi", "<i4")]))
    bias = records["bias"].astype(np.float32)
    spans = np.stack([records["lo"], records["hi"]], axis=1).astype(np.int32)
    problem = _merge_problem(positions, bias, spans)
    if problem:
        raise r.fail(at, problem)
    return bias, spans


def _merge_problem(positions: np.ndarray, bias: np.ndarray, spans: np.ndarray) -> str | None:
    """Why llama.cpp would refuse these cells' bias/span, or None if it accepts them."""
    n = positions.shape[0]
    if bias.dtype != np.float32 or bias.shape != (n,):
        return f"bias must be float32 [{n}], got {bias.dtype} {bias.shape}"
    if spans.dtype != np.int32 or spans.shape != (n, 2):
        return f"spans must be int32 [{n}, 2], got {spans.dtype} {spans.shape}"
    bad_bias = ~np.isfinite(bias) | (np.abs(bias) > MERGE_BIAS_MAX)
    if bad_bias.any():
        i = int(np.argmax(bad_bias))
        return f"cell {i} has bias {bias[i]}, outside the finite f16 range +-{MERGE_BIAS_MAX:g}"
    bad_span = (spans[:, 0] < 0) | (spans[:, 0] > positions) | (spans[:, 1] < positions)
    if bad_span.any():
        i = int(np.argmax(bad_span))
        return (
            f"cell {i} at position {positions[i]} has span [{spans[i, 0]}, {spans[i, 1]}], "
            "which must satisfy 0 <= span_min <= position <= span_max"
        )
    return None


def _parse_cells(
    r: _Reader, n: int, cell_ext: bool
) -> tuple[np.ndarray, tuple[tuple[int, ...], ...], np.ndarray | None]:
    head = 8 + (CELL_EXT_BYTES if cell_ext else 0)
    r.need(n * (head + 4), f"{n} cell records (at least {head + 4} bytes each)")
    # Fast path: every cell of a one-sequence state lists exactly one sequence,
    # so the records are fixed-size and can be read as one int32 table.
    words = (head + 4) // 4
    table = np.frombuffer(r.buf, dtype="<i4", count=n * words, offset=r.off).reshape(n, words)
    if np.all(table[:, 1] == 1):
        r.off += n * (head + 4)
        positions = table[:, 0].astype(np.int32)
        seq_col = table[:, words - 1]
        seq_ids = tuple((int(s),) for s in seq_col)
        ext = table[:, 2:5].astype(np.int32) if cell_ext else None
        return positions, seq_ids, ext
    positions = np.empty(n, dtype=np.int32)
    ext = np.empty((n, 3), dtype=np.int32) if cell_ext else None
    ids: list[tuple[int, ...]] = []
    for i in range(n):
        positions[i] = r.scalar("<i", f"cell {i} position (i32)")
        at = r.off
        n_seq = r.scalar("<I", f"cell {i} n_seq_id (u32)")
        if n_seq > _MAX_SEQ_PER_CELL:
            raise r.fail(at, f"cell {i} claims {n_seq} sequence ids")
        if ext is not None:
            ext[i] = struct.unpack_from("<3i", r.array(CELL_EXT_BYTES, f"cell {i} ext (12 bytes)"))
        raw = r.array(4 * n_seq, f"cell {i} sequence ids ({n_seq} x i32)")
        ids.append(tuple(int(s) for s in raw.view("<i4")))
    return positions, tuple(ids), ext


def _parse_v(r: _Reader, il: int, n: int, v_trans: bool) -> tuple[int, np.ndarray]:
    v_type = _read_type(r, f"layer {il} V type (i32)")
    if not v_trans:
        at = r.off
        row = r.scalar("<Q", f"layer {il} V row size (u64)")
        _check_row_size(r, at, v_type, row, f"layer {il} V")
        return v_type, r.array(row * n, f"layer {il} V rows ({n} x {row})").reshape(n, row)
    at = r.off
    el = r.scalar("<I", f"layer {il} V element size (u32)")
    known = _known_type(v_type)
    if el == 0 or (known is not None and (known.block_size != 1 or el != known.type_size)):
        raise r.fail(at, f"layer {il} transposed V has element size {el} for ggml type {v_type}")
    at = r.off
    width = r.scalar("<I", f"layer {il} V n_embd_v_gqa (u32)")
    if width == 0:
        raise r.fail(at, f"layer {il} V n_embd_v_gqa is 0")
    block = r.array(width * n * el, f"layer {il} transposed V ({width} x {n} x {el})")
    return v_type, block.reshape(width, n, el)


def _read_type(r: _Reader, what: str) -> int:
    at = r.off
    type_id = r.scalar("<i", what)
    if not 0 <= type_id < GGML_TYPE_COUNT:
        raise r.fail(at, f"{what} is {type_id}, not a ggml type id (0..{GGML_TYPE_COUNT - 1})")
    return type_id


def _check_row_size(r: _Reader, at: int, type_id: int, row: int, what: str) -> None:
    known = _known_type(type_id)
    if row == 0 or (known is not None and row % known.type_size != 0):
        raise r.fail(
            at, f"{what} row size {row} is not a whole number of ggml type {type_id} blocks"
        )


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------


def write_seq_state(state: SeqState) -> bytes:
    """Serialise ``state`` in the ``llama_state_seq_set_data`` format.

    ``write_seq_state(parse_seq_state(b)) == b`` for every buffer llama.cpp writes.
    """
    out: list[bytes] = [struct.pack("<Ii", STATE_SEQ_MAGIC, state.seq_id)]
    for cache in state.caches:
        out.append(struct.pack("<I", cache.n_stream))
        for stream in cache.streams:
            if stream is None:
                out.append(struct.pack("<I", 0))
                continue
            if (stream.ext is not None) != state.cell_ext:
                raise KVStateError(
                    f"state.cell_ext={state.cell_ext} but a stream "
                    f"{'has' if stream.ext is not None else 'lacks'} cell extensions"
                )
            out.append(struct.pack("<I", stream.n_cells))
            out.append(_cells_bytes(stream))
            if stream.bias is not None:
                out.append(struct.pack("<II", MERGE_SECTION_TAG, stream.n_cells))
                records = np.empty(
                    stream.n_cells, np.dtype([("bias", "<f4"), ("lo", "<i4"), ("hi", "<i4")])
                )
                records["bias"], records["lo"], records["hi"] = (
                    stream.bias,
                    stream.spans[:, 0],
                    stream.spans[:, 1],
                )
                out.append(records.tobytes())
            out.append(struct.pack("<II", int(stream.v_trans), stream.n_layer))
            for layer in stream.layers:
                out.append(struct.pack("<iQ", layer.k_type, layer.k.shape[1]))
                out.append(np.ascontiguousarray(layer.k).tobytes())
            has_v = [layer.v is not None for layer in stream.layers]
            if any(has_v) and not all(has_v):
                raise KVStateError("either every layer of a stream has V or none does")
            for layer in stream.layers if all(has_v) else ():
                if stream.v_trans:
                    e, _, el = layer.v.shape
                    out.append(struct.pack("<iII", layer.v_type, el, e))
                else:
                    out.append(struct.pack("<iQ", layer.v_type, layer.v.shape[1]))
                out.append(np.ascontiguousarray(layer.v).tobytes())
    return b"".join(out)


def _cells_bytes(stream: StreamKV) -> bytes:
    n = stream.n_cells
    if all(len(ids) == 1 for ids in stream.seq_ids):
        cols = [stream.positions, np.ones(n, dtype=np.int32)]
        if stream.ext is not None:
            cols += [stream.ext[:, 0], stream.ext[:, 1], stream.ext[:, 2]]
        cols.append(np.array([ids[0] for ids in stream.seq_ids], dtype=np.int32))
        return np.stack(cols, axis=1).astype("<i4").tobytes()
    parts = []
    for i, ids in enumerate(stream.seq_ids):
        parts.append(struct.pack("<iI", int(stream.positions[i]), len(ids)))
        if stream.ext is not None:
            parts.append(stream.ext[i].astype("<i4").tobytes())
        parts.append(struct.pack(f"<{len(ids)}i", *ids))
    return b"".join(parts)


# ---------------------------------------------------------------------------
# building new states from float arrays
# ---------------------------------------------------------------------------


def build_stream(
    template: StreamKV,
    keys: np.ndarray,
    values: np.ndarray,
    positions: Sequence[int] | np.ndarray,
    seq_ids: Sequence[tuple[int, ...]] | None = None,
    ext: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    spans: np.ndarray | None = None,
) -> StreamKV:
    """A stream with new cells, K/V requantized to ``template``'s per-layer types.

    Args:
        template: supplies each layer's K/V ggml type and the V transposition.
        keys, values: float ``[n_layer, n_kv_head, n_cells, head_dim]``.
        positions: the new cells' positions (``n_cells`` of them).
        seq_ids: per-cell sequence ids; default: the template's first cell's ids.
        ext: int32 ``[n_cells, 3]`` cell extensions, required iff the template has them.
        bias, spans: per-cell attention bias ``[n_cells]`` and covered positions
            ``[n_cells, 2]`` of merged cells (written as the merge section; needs
            the patched libllama to load); None for plain cells.

    Raises:
        KVStateError: shapes disagree with the template or with each other.
        ValueError: a value cannot be encoded (non-finite input to a quantized type).
    """
    keys = np.asarray(keys, dtype=np.float32)
    values = np.asarray(values, dtype=np.float32)
    if keys.ndim != 4 or values.shape != keys.shape:
        raise KVStateError(
            f"keys and values must both be [n_layer, n_kv_head, n_cells, head_dim], "
            f"got {keys.shape} and {values.shape}"
        )
    n_layer, n_kv_head, n, head_dim = keys.shape
    if n_layer != template.n_layer:
        raise KVStateError(f"template has {template.n_layer} layers, keys have {n_layer}")
    pos = np.asarray(positions)
    if pos.shape != (n,) or not np.issubdtype(pos.dtype, np.integer):
        raise KVStateError(f"positions must be {n} integers, got {pos.dtype} {pos.shape}")
    if seq_ids is None:
        seq_ids = (template.seq_ids[0],) * n
    seq_ids = tuple(tuple(int(s) for s in ids) for ids in seq_ids)
    if (ext is None) != (template.ext is None):
        raise KVStateError("ext must be given exactly when the template's cells have extensions")
    width = n_kv_head * head_dim
    layers = []
    for il, layer in enumerate(template.layers):
        if layer.n_embd_k_gqa != width or layer.n_embd_v_gqa not in (width, None):
            raise KVStateError(
                f"layer {il} of the template is {layer.n_embd_k_gqa} values wide, "
                f"the new K/V {width} ({n_kv_head} heads x {head_dim})"
            )
        k_rows = ggml_quants.quantize_rows(_join_heads(keys[il]), layer.k_type)
        v = None
        if layer.v is not None:
            v_flat = _join_heads(values[il])
            if template.v_trans:
                t = ggml_quants.ggml_type(layer.v_type)
                if t.block_size != 1:
                    raise KVStateError(f"transposed V cannot hold block type {t.name}")
                v = ggml_quants.quantize_rows(np.ascontiguousarray(v_flat.T), t.type_id)
                v = v.reshape(width, n, t.type_size)
            else:
                v = ggml_quants.quantize_rows(v_flat, layer.v_type)
        layers.append(LayerKV(layer.k_type, k_rows, layer.v_type, v))
    ext_arr = None if ext is None else np.asarray(ext, dtype=np.int32)
    bias_arr = None if bias is None else np.asarray(bias, dtype=np.float32)
    spans_arr = None if spans is None else np.asarray(spans, dtype=np.int32)
    return StreamKV(
        pos.astype(np.int32),
        seq_ids,
        template.v_trans,
        tuple(layers),
        ext_arr,
        bias_arr,
        spans_arr,
    )


def with_stream(state: SeqState, stream: StreamKV, cache: int = 0) -> SeqState:
    """``state`` with the non-empty stream of ``caches[cache]`` replaced by ``stream``."""
    old = state.caches[cache]
    held = [i for i, s in enumerate(old.streams) if s is not None]
    if len(held) != 1:
        raise KVStateError(f"cache {cache} has {len(held)} non-empty streams, expected 1")
    streams = list(old.streams)
    streams[held[0]] = stream
    caches = list(state.caches)
    caches[cache] = CacheState(tuple(streams))
    return replace(state, caches=tuple(caches))


def with_kv(
    state: SeqState,
    keys: np.ndarray,
    values: np.ndarray,
    positions: Sequence[int] | np.ndarray,
    cache: int = 0,
    *,
    bias: np.ndarray | None = None,
    spans: np.ndarray | None = None,
) -> SeqState:
    """``state`` with one cache's cells replaced by new float K/V (requantized).

    ``bias``/``spans`` describe merged cells (see :func:`build_stream`).
    """
    template = state.caches[cache].stream
    stream = build_stream(template, keys, values, positions, bias=bias, spans=spans)
    return with_stream(state, stream, cache)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _known_type(type_id: int) -> ggml_quants.GgmlType | None:
    try:
        return ggml_quants.ggml_type(type_id)
    except ValueError:
        return None


def _check_type_id(type_id: int | None, what: str) -> None:
    if not isinstance(type_id, (int, np.integer)) or not 0 <= type_id < GGML_TYPE_COUNT:
        raise KVStateError(
            f"{what} must be a ggml type id (0..{GGML_TYPE_COUNT - 1}), got {type_id!r}"
        )


def _row_width(type_id: int, nbytes: int, what: str) -> int:
    t = _known_type(type_id)
    if t is None:
        raise KVStateError(
            f"{what} uses ggml type {type_id}, which edgemerge cannot decode; supported: "
            + ", ".join(ggml_quants.GGML_TYPES)
        )
    return nbytes // t.type_size * t.block_size


def _split_heads(rows: np.ndarray, n_kv_head: int, what: str) -> np.ndarray:
    n, width = rows.shape
    if n_kv_head < 1 or width % n_kv_head:
        raise KVStateError(f"{what} rows of {width} values do not split into {n_kv_head} heads")
    return np.ascontiguousarray(rows.reshape(n, n_kv_head, width // n_kv_head).transpose(1, 0, 2))


def _join_heads(per_head: np.ndarray) -> np.ndarray:
    h, n, d = per_head.shape
    return np.ascontiguousarray(per_head.transpose(1, 0, 2).reshape(n, h * d))
