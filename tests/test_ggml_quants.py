"""edgemerge.reference.ggml_quants against the real libggml, byte for byte."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import edgemerge  # noqa: F401 - sets up the library path
from edgemerge.native._libpath import library_file
from edgemerge.reference import ggml_quants as gq

QTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml.h (leading fields as declared there)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_ROW_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@pytest.fixture(scope="module")
def ggml() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library_file("ggml-base")))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    for name in (
        "ggml_fp32_to_fp16_row",
        "ggml_fp16_to_fp32_row",
        "ggml_fp32_to_bf16_row_ref",
        "ggml_bf16_to_fp32_row",
    ):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def ggml_quantize(lib: ctypes.CDLL, x: np.ndarray, qtype: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    nrows, n = x.reshape(-1, x.shape[-1]).shape
    out = np.zeros((nrows, gq.row_bytes(qtype, n)), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(
        gq.ggml_type(qtype).type_id, x.ctypes.data, out.ctypes.data, 0, nrows, n, None
    )
    assert written == out.nbytes
    return out.reshape(*x.shape[:-1], -1)


def ggml_dequantize(lib: ctypes.CDLL, raw: np.ndarray, qtype: str, n: int) -> np.ndarray:
    traits = lib.ggml_get_type_traits(gq.ggml_type(qtype).type_id).contents
    raw = np.ascontiguousarray(raw)
    if traits.to_float is None:  # f32 rows are their own float values
        assert qtype == "f32"
        return raw.view(np.float32).copy()
    to_float = _ROW_FN(traits.to_float)
    out = np.zeros(raw.size // gq.row_bytes(qtype, n) * n, dtype=np.float32)
    to_float(raw.ctypes.data, out.ctypes.data, out.size)
    return out.reshape(*raw.shape[:-1], n)


def random_rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Rows at a random scale with some exact zeros, outliers and negative zeros."""
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 4)
    x[rng.random(shape) < 0.05] = 0.0
    x[rng.random(shape) < 0.02] *= 50.0
    x = x.astype(np.float32)
    x[rng.random(shape) < 0.02] = np.float32(-0.0)
    return x


def test_type_ids_names_and_sizes_match_ggml(ggml: ctypes.CDLL) -> None:
    assert (gq.GGML_TYPE_F32, gq.GGML_TYPE_F16, gq.GGML_TYPE_Q4_0) == (0, 1, 2)
    assert (gq.GGML_TYPE_Q8_0, gq.GGML_TYPE_BF16) == (8, 30)
    for name in QTYPES:
        t = gq.ggml_type(name)
        assert ggml.ggml_type_name(t.type_id).decode() == name
        traits = ggml.ggml_get_type_traits(t.type_id).contents
        assert (traits.blck_size, traits.type_size) == (t.block_size, t.type_size)
        for n in (32, 64, 896, 4096):
            assert gq.row_bytes(name, n) == ggml.ggml_row_size(t.type_id, n)
        assert gq.ggml_type(t.type_id) is t
        assert gq.type_name(t.type_id) == name


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantize_is_byte_identical_to_ggml(ggml: ctypes.CDLL, qtype: str) -> None:
    rng = np.random.default_rng(1234)
    for _ in range(30):
        x = random_rows(rng, (17, 256))
        np.testing.assert_array_equal(gq.quantize_rows(x, qtype), ggml_quantize(ggml, x, qtype))


def test_q8_0_rounds_halves_away_from_zero_like_ggml(ggml: ctypes.CDLL) -> None:
    # amax = 127 gives d = 1, so every x = k + 0.5 lands exactly on a tie.
    x = np.arange(-63.5, 64.5, 1.0, dtype=np.float32)[:128].reshape(4, 32)
    x[:, 0] = 127.0
    ours = gq.quantize_rows(x, "q8_0")
    np.testing.assert_array_equal(ours, ggml_quantize(ggml, x, "q8_0"))
    codes = ours.reshape(4, 34)[:, 2:].view(np.int8)
    assert codes[0, 1] == -63  # -62.5 -> -63, not -62 (ties to even would give -62)


def test_q4_0_edge_blocks_match_ggml(ggml: ctypes.CDLL) -> None:
    blocks = np.zeros((5, 32), dtype=np.float32)
    blocks[0, 0] = np.float32(-0.0)  # all zero with a leading -0.0: scale is -0.0
    blocks[1, [3, 9]] = [2.0, -2.0]  # tie in magnitude: the first one sets the sign
    blocks[2, [3, 9]] = [-2.0, 2.0]
    blocks[3] = np.linspace(-1, 1, 32, dtype=np.float32)  # max at the end
    blocks[4] = -np.linspace(-1, 1, 32, dtype=np.float32)
    np.testing.assert_array_equal(
        gq.quantize_rows(blocks, "q4_0"), ggml_quantize(ggml, blocks, "q4_0")
    )


def _special_float_bits(rng: np.random.Generator) -> np.ndarray:
    """float32 bit patterns: random ones plus every fp16/bf16 rounding boundary region."""
    random_bits = rng.integers(0, 2**32, size=400_000, dtype=np.uint64).astype(np.uint32)
    # every fp16 value as float32, +-1 ulp around it and around each half-way point
    halves = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    centres = halves.astype(np.float32).view(np.uint32).astype(np.int64)
    offsets = (-1, 0, 1, 0x1000 - 1, 0x1000, 0x1000 + 1)
    near = np.concatenate([(centres + d) & 0xFFFFFFFF for d in offsets])
    specials = np.array(
        [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x00000001],
        dtype=np.uint32,
    )
    return np.concatenate([random_bits, near.astype(np.uint32), specials])


def test_fp16_conversions_match_ggml_bit_for_bit(ggml: ctypes.CDLL) -> None:
    rng = np.random.default_rng(7)
    x = _special_float_bits(rng).view(np.float32)
    ref = np.zeros(x.size, dtype=np.uint16)
    ggml.ggml_fp32_to_fp16_row(x.ctypes.data, ref.ctypes.data, x.size)
    np.testing.assert_array_equal(gq.fp32_to_fp16_bits(x), ref)

    every_half = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    back = np.zeros(every_half.size, dtype=np.float32)
    ggml.ggml_fp16_to_fp32_row(every_half.ctypes.data, back.ctypes.data, every_half.size)
    np.testing.assert_array_equal(
        gq.fp16_bits_to_fp32(every_half).view(np.uint32), back.view(np.uint32)
    )


def test_bf16_conversions_match_ggml_bit_for_bit(ggml: ctypes.CDLL) -> None:
    rng = np.random.default_rng(8)
    x = _special_float_bits(rng).view(np.float32)
    ref = np.zeros(x.size, dtype=np.uint16)
    ggml.ggml_fp32_to_bf16_row_ref(x.ctypes.data, ref.ctypes.data, x.size)
    ours = gq.fp32_to_bf16_bits(x)
    np.testing.assert_array_equal(ours, ref)
    assert ours[x.view(np.uint32) == 0x7F800001][0] & 0x40  # signalling NaN made quiet

    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    back = np.zeros(every.size, dtype=np.float32)
    ggml.ggml_bf16_to_fp32_row(every.ctypes.data, back.ctypes.data, every.size)
    np.testing.assert_array_equal(gq.bf16_bits_to_fp32(every).view(np.uint32), back.view(np.uint32))


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_matches_ggml_to_float(ggml: ctypes.CDLL, qtype: str) -> None:
    rng = np.random.default_rng(99)
    n = 128
    encoded = gq.quantize_rows(random_rows(rng, (9, n)), qtype)
    if qtype in ("q8_0", "q4_0"):
        # arbitrary codes with arbitrary finite scales, not only what our encoder emits
        t = gq.ggml_type(qtype)
        blocks = rng.integers(0, 256, size=(9 * n // t.block_size, t.type_size), dtype=np.uint8)
        scales = (rng.standard_normal(blocks.shape[0]) * 0.01).astype(np.float16)
        blocks[:, :2] = scales.view(np.uint8).reshape(-1, 2)
        encoded = blocks.reshape(9, -1)
    ours = gq.dequantize_rows(encoded, qtype, n)
    np.testing.assert_array_equal(
        ours.view(np.uint32), ggml_dequantize(ggml, encoded, qtype, n).view(np.uint32)
    )


@pytest.mark.parametrize("qtype", QTYPES)
def test_round_trip_error_is_within_the_format_bound(qtype: str) -> None:
    rng = np.random.default_rng(5)
    x = random_rows(rng, (3, 7, 256))
    back = gq.dequantize_rows(gq.quantize_rows(x, qtype), qtype, 256)
    assert back.shape == x.shape and back.dtype == np.float32
    err = np.abs(back - x)
    if qtype == "f32":
        np.testing.assert_array_equal(back, x)
    elif qtype in ("f16", "bf16"):
        rel = 2.0**-11 if qtype == "f16" else 2.0**-8
        tiny = 6.1e-5 * 2.0**-11 if qtype == "f16" else 0.0  # fp16 subnormal spacing
        assert np.all(err <= np.abs(x) * rel + tiny)
    else:
        amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
        # q8_0: half a step of amax/127; q4_0: one clipped step of amax/8 at worst.
        # Both plus the fp16 rounding of the scale.
        bound = amax * (1 / 254 + 2.0**-10) if qtype == "q8_0" else amax * (1 / 8 + 2.0**-9)
        assert np.all(err.reshape(-1, 32) <= bound)
        if qtype == "q8_0":
            assert err.max() > 0  # it does quantize


def test_leading_axes_and_single_rows() -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 64)).astype(np.float32)
    raw = gq.quantize_rows(x, "q8_0")
    assert raw.shape == (2, 3, 68) and raw.dtype == np.uint8
    np.testing.assert_array_equal(gq.quantize_rows(x[1, 2], "q8_0"), raw[1, 2])
    back_from_bytes = gq.dequantize_rows(raw[1, 2].tobytes(), "q8_0", 64)
    np.testing.assert_array_equal(back_from_bytes, gq.dequantize_rows(raw, "q8_0", 64)[1, 2])
    assert gq.quantize_rows(x, gq.GGML_TYPE_F16).shape == (2, 3, 128)


def test_bad_input_is_rejected_with_a_clear_message() -> None:
    x = np.ones((2, 64), dtype=np.float32)
    with pytest.raises(ValueError, match="not supported"):
        gq.quantize_rows(x, "q5_k")
    with pytest.raises(ValueError, match="not supported"):
        gq.row_bytes(3, 64)
    with pytest.raises(ValueError, match="multiple of the q4_0 block size 32"):
        gq.quantize_rows(np.ones((2, 40), dtype=np.float32), "q4_0")
    with pytest.raises(ValueError, match="positive integer"):
        gq.row_bytes("f16", 0)
    bad = x.copy()
    bad[1, 5] = np.inf
    with pytest.raises(ValueError, match="non-finite values .*row 1, column 5"):
        gq.quantize_rows(bad, "q8_0")
    with pytest.raises(ValueError, match="68 bytes"):
        gq.dequantize_rows(np.zeros((2, 67), dtype=np.uint8), "q8_0", 64)
    with pytest.raises(ValueError, match="uint8"):
        gq.dequantize_rows(np.zeros((2, 68), dtype=np.int16), "q8_0", 64)
    with pytest.raises(ValueError, match="real numbers"):
        gq.quantize_rows(np.array(["a"] * 32), "f16")
