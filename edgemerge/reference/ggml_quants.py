"""Bit-exact numpy encode/decode of the ggml row types a llama.cpp KV cache can hold.

The conversions follow ggml's CPU *reference* code (``ggml-quants.c``
``quantize_row_q8_0_ref`` / ``quantize_row_q4_0_ref`` / ``dequantize_row_*``,
and the fp16/bf16 helpers of ``ggml-impl.h``), which is what
``ggml_quantize_chunk`` runs. The tests compare our bytes with the real libggml's
for random data, so any drift in either shows up as a failure.

Types and their rows (``n`` values per row, ``n`` a multiple of the block size):

=======  =====  ==========  ===============================================
name     id     block size  block layout
=======  =====  ==========  ===============================================
f32      0      1           float32
f16      1      1           IEEE binary16 (round to nearest even, NaN -> quiet)
q4_0     2      32          fp16 scale d, 16 bytes of 4-bit codes (q - 8) * d;
                            low nibbles hold values 0..15, high nibbles 16..31
q8_0     8      32          fp16 scale d, 32 int8 codes q * d
bf16     30     1           top 16 bits of float32, round to nearest even,
                            NaN forced quiet
=======  =====  ==========  ===============================================

The quantized encoders reject non-finite input: ggml's reference turns it into
undefined float-to-int conversions, so no byte pattern would be "the" answer.
Scales below about 1e-37 (subnormal float32) are likewise outside what ggml
defines and are not guaranteed to match it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Values of enum ggml_type in ggml/include/ggml.h.
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_Q4_0 = 2
GGML_TYPE_Q8_0 = 8
GGML_TYPE_BF16 = 30

QK4_0 = 32
QK8_0 = 32


@dataclass(frozen=True)
class GgmlType:
    """One ggml row type: its name, enum value, values per block and bytes per block."""

    name: str
    type_id: int
    block_size: int
    type_size: int


GGML_TYPES: dict[str, GgmlType] = {
    "f32": GgmlType("f32", GGML_TYPE_F32, 1, 4),
    "f16": GgmlType("f16", GGML_TYPE_F16, 1, 2),
    "q4_0": GgmlType("q4_0", GGML_TYPE_Q4_0, QK4_0, 2 + QK4_0 // 2),
    "q8_0": GgmlType("q8_0", GGML_TYPE_Q8_0, QK8_0, 2 + QK8_0),
    "bf16": GgmlType("bf16", GGML_TYPE_BF16, 1, 2),
}
_BY_ID: dict[int, GgmlType] = {t.type_id: t for t in GGML_TYPES.values()}

QType = str | int


def ggml_type(qtype: QType) -> GgmlType:
    """The :class:`GgmlType` for a name ("q8_0") or a ggml enum value (8).

    Raises:
        ValueError: the type is not one this module implements.
    """
    if isinstance(qtype, str):
        found = GGML_TYPES.get(qtype.lower())
    elif isinstance(qtype, (int, np.integer)) and not isinstance(qtype, bool):
        found = _BY_ID.get(int(qtype))
    else:
        found = None
    if found is None:
        supported = ", ".join(f"{t.name} ({t.type_id})" for t in GGML_TYPES.values())
        raise ValueError(f"ggml type {qtype!r} is not supported; supported: {supported}")
    return found


def type_name(type_id: int) -> str:
    """Name of a ggml enum value, e.g. ``type_name(8) == "q8_0"``."""
    return ggml_type(type_id).name


def row_bytes(qtype: QType, n: int) -> int:
    """Bytes of one row of ``n`` values of ``qtype`` (ggml_row_size).

    Raises:
        ValueError: ``n`` is not a positive multiple of the type's block size.
    """
    t = ggml_type(qtype)
    _check_row_length(t, n)
    return n // t.block_size * t.type_size


def _check_row_length(t: GgmlType, n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"row length must be a positive integer, got {n!r}")
    if n % t.block_size != 0:
        raise ValueError(
            f"row length {n} is not a multiple of the {t.name} block size {t.block_size}; "
            f"{t.name} rows hold whole blocks"
        )


# ---------------------------------------------------------------------------
# fp16 / bf16 scalars
# ---------------------------------------------------------------------------


def fp32_to_fp16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> IEEE half bits (uint16), as ggml_compute_fp32_to_fp16.

    ggml's converter rounds to nearest even, saturates to infinity and maps every
    NaN to the quiet NaN 0x7E00 with the input's sign; numpy's cast agrees except
    that it keeps NaN payloads, so NaNs are rewritten.
    """
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        bits = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        sign = (x.view(np.uint32) >> 16).astype(np.uint16) & np.uint16(0x8000)
        bits = np.where(nan, sign | np.uint16(0x7E00), bits)
    return bits


def fp16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """IEEE half bits (uint16) -> float32, as ggml_compute_fp16_to_fp32.

    Exact for every non-NaN value. ggml builds a NaN through a float multiply,
    which makes it quiet, so the quiet bit is set here too (numpy keeps a
    signalling NaN signalling).
    """
    out = np.asarray(bits, dtype=np.uint16).view(np.float16).astype(np.float32)
    nan = np.isnan(out)
    if nan.any():
        as_bits = out.view(np.uint32)
        as_bits[nan] |= np.uint32(0x00400000)
    return out


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), as ggml_compute_fp32_to_bf16 (RNE, NaN made quiet)."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    # Adding 0x7FFF plus the lowest kept bit rounds to nearest with ties to even;
    # uint32 wrap-around for values near 0xFFFFFFFF is what the C code does too.
    rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16
    quiet_nan = (u >> 16) | np.uint32(64)
    return np.where(nan, quiet_nan, rounded).astype(np.uint16)


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> float32 (exact: the bits become the top half)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------


def quantize_rows(x: np.ndarray, qtype: QType) -> np.ndarray:
    """Encode rows of float32 values into ggml ``qtype`` bytes.

    Args:
        x: float array ``[..., n]``; each last-axis row is encoded independently.
        qtype: type name or ggml enum value.

    Returns:
        uint8 array ``[..., row_bytes(qtype, n)]``, byte-identical to ggml_quantize_chunk.

    Raises:
        ValueError: unsupported type, bad row length, or non-finite input to a
            quantized type.
    """
    t = ggml_type(qtype)
    x = _as_float32_rows(x, "x")
    n = x.shape[-1]
    _check_row_length(t, n)
    lead = x.shape[:-1]
    flat = np.ascontiguousarray(x).reshape(-1, n)
    if t.type_id == GGML_TYPE_F32:
        out = flat.view(np.uint8)
    elif t.type_id == GGML_TYPE_F16:
        out = fp32_to_fp16_bits(flat).view(np.uint8)
    elif t.type_id == GGML_TYPE_BF16:
        out = fp32_to_bf16_bits(flat).view(np.uint8)
    else:
        if not np.isfinite(flat).all():
            bad = np.argwhere(~np.isfinite(flat))[0]
            raise ValueError(
                f"{t.name} cannot encode non-finite values (first at row {bad[0]}, "
                f"column {bad[1]}): ggml's quantizer has no defined result for them"
            )
        blocks = flat.reshape(-1, t.block_size)
        if t.type_id == GGML_TYPE_Q8_0:
            out = _quantize_q8_0(blocks)
        else:
            out = _quantize_q4_0(blocks)
    return np.ascontiguousarray(out).reshape(*lead, n // t.block_size * t.type_size)


def dequantize_rows(raw: np.ndarray, qtype: QType, n: int) -> np.ndarray:
    """Decode ggml ``qtype`` rows of ``n`` values back to float32.

    Args:
        raw: uint8 array ``[..., row_bytes(qtype, n)]`` (any bytes-like is accepted
            for a single row).
        qtype: type name or ggml enum value.
        n: values per row.

    Returns:
        float32 array ``[..., n]``, equal to ggml's ``to_float`` for the type.

    Raises:
        ValueError: unsupported type, bad row length, or ``raw``'s last axis is not
            ``row_bytes(qtype, n)`` long.
    """
    t = ggml_type(qtype)
    _check_row_length(t, n)
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(raw, dtype=np.uint8)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise ValueError(f"raw must be a uint8 array of encoded rows, got dtype {raw.dtype}")
    expected = n // t.block_size * t.type_size
    if raw.ndim == 0 or raw.shape[-1] != expected:
        raise ValueError(
            f"a {t.name} row of {n} values is {expected} bytes, but raw has shape {raw.shape}"
        )
    lead = raw.shape[:-1]
    flat = np.ascontiguousarray(raw).reshape(-1, expected)
    if t.type_id == GGML_TYPE_F32:
        out = flat.view(np.float32)
    elif t.type_id == GGML_TYPE_F16:
        out = fp16_bits_to_fp32(flat.view(np.uint16))
    elif t.type_id == GGML_TYPE_BF16:
        out = bf16_bits_to_fp32(flat.view(np.uint16))
    else:
        blocks = flat.reshape(-1, t.type_size)
        if t.type_id == GGML_TYPE_Q8_0:
            out = _dequantize_q8_0(blocks)
        else:
            out = _dequantize_q4_0(blocks)
    return np.ascontiguousarray(out, dtype=np.float32).reshape(*lead, n)


def _as_float32_rows(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"{what} must have at least one axis (the row), got a scalar")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{what} must hold real numbers, got dtype {x.dtype}")
    return x.astype(np.float32, copy=False)


def _c_roundf(x: np.ndarray) -> np.ndarray:
    """C roundf (halves away from zero) of float32 values.

    |x| + 0.5 is exact in float64 for every float32 x, so floor of it is exactly
    roundf; numpy's own rounding would send halves to even.
    """
    wide = x.astype(np.float64)
    return np.copysign(np.floor(np.abs(wide) + 0.5), wide)


def _safe_reciprocal(d: np.ndarray) -> np.ndarray:
    out = np.zeros_like(d)
    np.divide(np.float32(1.0), d, out=out, where=d != 0)
    return out


def _quantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    amax = np.abs(blocks).max(axis=1)
    d = amax / np.float32(127)
    inv = _safe_reciprocal(d)
    codes = _c_roundf(blocks * inv[:, None]).astype(np.int8)
    out = np.empty((blocks.shape[0], 2 + QK8_0), dtype=np.uint8)
    out[:, :2] = fp32_to_fp16_bits(d).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = codes.view(np.uint8)
    return out


def _quantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    absval = np.abs(blocks)
    # ggml keeps the first element of largest magnitude (strict '<' while scanning)
    # and starts from +0.0, so an all-zero block gets max = +0.0 whatever its signs.
    first = np.argmax(absval, axis=1)
    peak = blocks[np.arange(blocks.shape[0]), first]
    peak = np.where(absval.max(axis=1) > 0, peak, np.float32(0.0)).astype(np.float32)
    d = peak / np.float32(-8)
    inv = _safe_reciprocal(d)
    scaled = blocks * inv[:, None]
    # (int8_t)(x + 8.5f) truncates toward zero; MIN(15, .) clips the top code.
    codes = np.minimum(np.trunc(scaled + np.float32(8.5)), 15).astype(np.uint8)
    half = QK4_0 // 2
    out = np.empty((blocks.shape[0], 2 + half), dtype=np.uint8)
    out[:, :2] = fp32_to_fp16_bits(d).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = codes[:, :half] | (codes[:, half:] << 4)
    return out


def _block_scales(blocks: np.ndarray) -> np.ndarray:
    return fp16_bits_to_fp32(np.ascontiguousarray(blocks[:, :2]).view(np.uint16)[:, 0])


def _dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    d = _block_scales(blocks)
    codes = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).astype(np.float32)
    return codes * d[:, None]


def _dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    d = _block_scales(blocks)
    packed = blocks[:, 2:]
    low = (packed & 0x0F).astype(np.int8) - 8
    high = (packed >> 4).astype(np.int8) - 8
    codes = np.concatenate([low, high], axis=1).astype(np.float32)
    return codes * d[:, None]
