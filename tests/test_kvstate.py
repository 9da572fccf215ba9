"""edgemerge.native.kvstate against the state buffers of the real (patched) llama.cpp."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import llama_cpp  # conftest imported edgemerge first, so this is the patched libllama
import numpy as np
import pytest

from edgemerge.native import kvstate
from edgemerge.native.kvstate import (
    CacheState,
    KVStateError,
    LayerKV,
    SeqState,
    StreamKV,
    parse_seq_state,
    write_seq_state,
)
from edgemerge.reference import ggml_quants as gq
from edgemerge.testing.tiny_models import write_tiny_model

N_KV_HEAD = 2
HEAD_DIM = 32  # quantized caches need head_dim divisible by the 32-value block
TEXT = b"The quick brown fox jumps over the lazy dog while the cache keeps every token. " * 3

# (K type, V type, flash attention): quantized V needs flash attention, which
# also stores V untransposed; without it V is transposed.
CACHE_CONFIGS = [
    ("f16", "f16", False),
    ("f16", "f16", True),
    ("q8_0", "q8_0", True),
    ("q4_0", "q4_0", True),
    ("q8_0", "f16", False),
    ("f32", "f32", False),
    ("bf16", "bf16", True),
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(
        tmp_path_factory.mktemp("kvstate") / "qwen2.gguf",
        "qwen2",
        n_layer=2,
        n_embd=N_KV_HEAD * 2 * HEAD_DIM,
        n_head=2 * N_KV_HEAD,
        n_head_kv=N_KV_HEAD,
        n_ff=128,
    )


def make_llm(path: Path, k: str, v: str, fa: bool) -> llama_cpp.Llama:
    return llama_cpp.Llama(
        str(path),
        n_ctx=256,
        n_batch=64,
        type_k=gq.ggml_type(k).type_id,
        type_v=gq.ggml_type(v).type_id,
        flash_attn=fa,
        verbose=False,
    )


def get_state(llm: llama_cpp.Llama, seq_id: int = 0) -> bytes:
    ctx = llm._ctx.ctx
    size = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
    buf = (ctypes.c_uint8 * size)()
    assert llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq_id) == size
    return bytes(buf)


def set_state(llm: llama_cpp.Llama, data: bytes, seq_id: int = 0) -> int:
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    return llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, buf, len(data), seq_id)


def last_logits(llm: llama_cpp.Llama) -> np.ndarray:
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


@pytest.fixture(scope="module")
def captured(model_path: Path) -> dict[tuple[str, str, bool], tuple[list[int], bytes]]:
    """Tokens and the state buffer after evaluating them, per cache config."""
    out = {}
    for config in CACHE_CONFIGS:
        llm = make_llm(model_path, *config)
        tokens = llm.tokenize(TEXT)
        llm.eval(tokens)  # several batches of 64
        out[config] = (tokens, get_state(llm))
        llm.close()
    return out


@pytest.mark.parametrize("config", CACHE_CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}-fa{int(c[2])}")
def test_parse_write_round_trip_is_byte_exact(captured: dict, config: tuple) -> None:
    tokens, data = captured[config]
    k_name, v_name, fa = config
    state = parse_seq_state(data)
    assert write_seq_state(state) == data

    assert state.seq_id == 0 and len(state.caches) == 1 and state.caches[0].n_stream == 1
    stream = state.stream
    np.testing.assert_array_equal(stream.positions, np.arange(len(tokens), dtype=np.int32))
    assert stream.seq_ids == ((0,),) * len(tokens)
    assert stream.v_trans is (not fa)
    assert stream.n_layer == 2
    for layer in stream.layers:
        assert (gq.type_name(layer.k_type), gq.type_name(layer.v_type)) == (k_name, v_name)
        assert layer.n_embd_k_gqa == layer.n_embd_v_gqa == N_KV_HEAD * HEAD_DIM
    keys, values = state.keys_values(N_KV_HEAD)
    assert keys.shape == values.shape == (2, N_KV_HEAD, len(tokens), HEAD_DIM)
    assert keys.dtype == np.float32 and np.isfinite(keys).all() and np.isfinite(values).all()
    assert np.abs(keys).mean() > 0.1 and np.abs(values).mean() > 0.1  # real data, not zeros


def test_transposed_and_plain_v_decode_to_the_same_values(captured: dict) -> None:
    # The first layer's K/V depend only on the tokens, not on the attention kernel,
    # so f16 with and without flash attention must hold the same layer-0 values.
    _, trans = captured[("f16", "f16", False)]
    _, plain = captured[("f16", "f16", True)]
    s_trans, s_plain = parse_seq_state(trans).stream, parse_seq_state(plain).stream
    assert s_trans.v_trans and not s_plain.v_trans
    np.testing.assert_array_equal(s_trans.layers[0].values(), s_plain.layers[0].values())
    np.testing.assert_array_equal(s_trans.layers[0].keys(), s_plain.layers[0].keys())


@pytest.mark.parametrize("config", CACHE_CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}-fa{int(c[2])}")
def test_rebuilding_from_float_arrays_reproduces_the_bytes(captured: dict, config: tuple) -> None:
    # Re-encoding decoded values is exact for every type here: the decoded block
    # maximum reproduces the same fp16 scale, so each code maps back to itself.
    _, data = captured[config]
    state = parse_seq_state(data)
    keys, values = state.keys_values(N_KV_HEAD)
    rebuilt = kvstate.with_kv(state, keys, values, state.positions)
    assert write_seq_state(rebuilt) == data


@pytest.mark.parametrize("config", CACHE_CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}-fa{int(c[2])}")
def test_written_state_restores_identical_next_token_logits(
    model_path: Path, captured: dict, config: tuple
) -> None:
    tokens, data = captured[config]
    original = make_llm(model_path, *config)
    original.eval(tokens)
    assert get_state(original) == data  # the capture is deterministic
    next_token = tokens[5]
    original.eval([next_token])
    expected = last_logits(original)
    original.close()

    written = write_seq_state(parse_seq_state(data))
    fresh = make_llm(model_path, *config)
    assert set_state(fresh, written) == len(written)
    fresh.n_tokens = len(tokens)
    fresh.input_ids[: len(tokens)] = tokens
    fresh.eval([next_token])
    np.testing.assert_array_equal(last_logits(fresh), expected)
    fresh.close()


@pytest.mark.parametrize("config", [CACHE_CONFIGS[0], CACHE_CONFIGS[3]], ids=["f16", "q4_0"])
def test_a_new_cell_list_loads_into_llama_cpp(
    model_path: Path, captured: dict, config: tuple
) -> None:
    tokens, data = captured[config]
    state = parse_seq_state(data)
    keys, values = state.keys_values(N_KV_HEAD)
    keep = np.r_[0:4, len(tokens) - 8 : len(tokens)]  # sinks and a recent window
    pruned = kvstate.with_kv(state, keys[:, :, keep], values[:, :, keep], state.positions[keep])
    written = write_seq_state(pruned)

    llm = make_llm(model_path, *config)
    assert set_state(llm, written) == len(written)
    # llama.cpp places the cells in free slots in order, so it writes them back unchanged.
    assert get_state(llm) == written
    reread = parse_seq_state(get_state(llm))
    np.testing.assert_array_equal(reread.positions, keep.astype(np.int32))
    llm.close()


def test_every_truncation_is_reported_with_its_offset(captured: dict) -> None:
    _, data = captured[("f16", "f16", False)]
    for cut in range(len(data)):
        with pytest.raises(KVStateError, match="offset"):
            parse_seq_state(data[:cut])


def test_corrupt_fields_are_named(captured: dict) -> None:
    _, data = captured[("q8_0", "q8_0", True)]
    n_cells = parse_seq_state(data).stream.n_cells
    cells_end = 16 + 12 * n_cells

    def patched(offset: int, fmt: str, value: int) -> bytes:
        buf = bytearray(data)
        struct.pack_into(fmt, buf, offset, value)
        return bytes(buf)

    with pytest.raises(KVStateError, match=r"offset 0: magic is 0x12345678"):
        parse_seq_state(patched(0, "<I", 0x12345678))
    with pytest.raises(KVStateError, match=r"offset 8: cache 0 claims 0 streams"):
        parse_seq_state(patched(8, "<I", 0))
    with pytest.raises(KVStateError, match=rf"offset {cells_end}: v_trans is 7"):
        parse_seq_state(patched(cells_end, "<I", 7))
    with pytest.raises(KVStateError, match=rf"offset {cells_end + 8}: layer 0 K type .* is 99"):
        parse_seq_state(patched(cells_end + 8, "<i", 99))
    with pytest.raises(KVStateError, match="row size 33 is not a whole number"):
        parse_seq_state(patched(cells_end + 12, "<Q", 33))
    with pytest.raises(KVStateError, match="unexpected bytes after the last cache"):
        parse_seq_state(data + b"\0" * 3, n_caches=1)
    with pytest.raises(KVStateError, match="expected n_stream of cache 1"):
        parse_seq_state(data + b"\0" * 3)  # read as the start of a second cache
    with pytest.raises(KVStateError, match="offset 16: expected 1000000 cell records"):
        parse_seq_state(patched(12, "<I", 1_000_000))  # a huge cell count


def _synthetic_stream(rng: np.random.Generator, n: int, *, v_trans: bool, ext: bool) -> StreamKV:
    layers = []
    for _ in range(3):
        k = gq.quantize_rows(rng.standard_normal((n, 64)), "q8_0")
        if v_trans:
            v = gq.quantize_rows(rng.standard_normal((64, n)), "f16").reshape(64, n, 2)
        else:
            v = gq.quantize_rows(rng.standard_normal((n, 64)), "q4_0")
        layers.append(LayerKV(gq.GGML_TYPE_Q8_0, k, 1 if v_trans else 2, v))
    seq_ids = tuple(((0, 3) if i % 3 == 0 else (3,)) for i in range(n))
    ext_arr = rng.integers(-5, 5, size=(n, 3)).astype(np.int32) if ext else None
    positions = np.arange(10, 10 + n, dtype=np.int32)
    return StreamKV(positions, seq_ids, v_trans, tuple(layers), ext_arr)


@pytest.mark.parametrize("ext", [False, True])
def test_synthetic_multi_cache_multi_stream_round_trip(ext: bool) -> None:
    """Shapes llama.cpp writes for other setups: several sequences per cell, M-RoPE
    cell extensions, empty streams, two caches (sliding-window models)."""
    rng = np.random.default_rng(3)
    state = SeqState(
        seq_id=3,
        caches=(
            CacheState((None, _synthetic_stream(rng, 7, v_trans=True, ext=ext), None)),
            CacheState((_synthetic_stream(rng, 5, v_trans=False, ext=ext),)),
        ),
        cell_ext=ext,
    )
    data = write_seq_state(state)
    parsed = parse_seq_state(data, cell_ext=ext)
    assert write_seq_state(parsed) == data
    assert [c.n_stream for c in parsed.caches] == [3, 1]
    first = parsed.caches[0].stream
    assert first.seq_ids[0] == (0, 3) and first.seq_ids[1] == (3,)
    np.testing.assert_array_equal(first.positions, np.arange(10, 17))
    if ext:
        np.testing.assert_array_equal(first.ext, state.caches[0].streams[1].ext)
    for ours, theirs in zip(
        parsed.caches[1].stream.layers, state.caches[1].stream.layers, strict=True
    ):
        np.testing.assert_array_equal(ours.values(), theirs.values())
    with pytest.raises(KVStateError, match="expected exactly one stream with cells"):
        _ = CacheState((None, None)).stream


def test_k_only_cache_round_trip() -> None:
    rng = np.random.default_rng(4)
    k = gq.quantize_rows(rng.standard_normal((4, 64)), "f16")
    stream = StreamKV(np.arange(4, dtype=np.int32), ((0,),) * 4, False, (LayerKV(1, k),))
    data = write_seq_state(SeqState(0, (CacheState((stream,)),)))
    parsed = parse_seq_state(data, has_v=False)
    assert parsed.stream.layers[0].v is None
    assert write_seq_state(parsed) == data
    with pytest.raises(KVStateError, match="no V"):
        parsed.stream.layers[0].values()


def test_inconsistent_objects_are_rejected() -> None:
    rng = np.random.default_rng(5)
    stream = _synthetic_stream(rng, 4, v_trans=False, ext=False)
    keys, values = np.zeros((3, 2, 4, 32), np.float32), np.zeros((3, 2, 4, 32), np.float32)
    with pytest.raises(KVStateError, match="positions must be 4 integers"):
        kvstate.build_stream(stream, keys, values, [0, 1, 2])
    with pytest.raises(KVStateError, match="template has 3 layers"):
        kvstate.build_stream(stream, keys[:2], values[:2], [0, 1, 2, 3])
    with pytest.raises(KVStateError, match="do not split into 3 heads"):
        stream.keys_values(3)
    with pytest.raises(KVStateError, match="k holds 4 cells but v holds 2"):
        LayerKV(8, stream.layers[0].k, 2, stream.layers[0].v[:2])
    with pytest.raises(KVStateError, match="layer 0 holds 4 cells, the stream 3"):
        StreamKV(np.arange(3, dtype=np.int32), ((0,),) * 3, False, stream.layers)
    with pytest.raises(KVStateError, match="k_type must be a ggml type id"):
        LayerKV(77, stream.layers[0].k)


def _merged(stream: StreamKV) -> StreamKV:
    """``stream`` with cells 1..2 standing for a span each and carrying log-mass bias."""
    n = stream.n_cells
    bias = np.zeros(n, dtype=np.float32)
    bias[1:3] = np.log([3.0, 2.0])
    spans = np.stack([stream.positions, stream.positions], axis=1).astype(np.int32)
    spans[1] = [stream.positions[1] - 1, stream.positions[1] + 1]
    spans[2] = [stream.positions[2], stream.positions[2] + 1]
    return StreamKV(
        stream.positions, stream.seq_ids, stream.v_trans, stream.layers, stream.ext, bias, spans
    )


def test_merge_section_round_trip_and_placement() -> None:
    stream = _merged(_synthetic_stream(np.random.default_rng(6), 5, v_trans=False, ext=False))
    data = write_seq_state(SeqState(3, (CacheState((stream,)),)))
    # header, n_stream, cell_count, then the cells (one or two seq ids each)
    cells_end = 16 + sum(8 + 4 * len(ids) for ids in stream.seq_ids)
    assert struct.unpack_from("<II", data, cells_end) == (kvstate.MERGE_SECTION_TAG, 5)
    assert struct.unpack_from("<fii", data, cells_end + 8 + 12) == (
        pytest.approx(np.log(3.0)),
        10,  # the cell at position 11 covers 10..12
        12,
    )
    parsed = parse_seq_state(data).stream
    np.testing.assert_array_equal(parsed.bias, stream.bias)
    np.testing.assert_array_equal(parsed.spans, stream.spans)
    assert write_seq_state(parse_seq_state(data)) == data


def test_merge_section_is_validated_like_llama_cpp() -> None:
    plain = _synthetic_stream(np.random.default_rng(7), 4, v_trans=True, ext=False)
    merged = _merged(plain)
    data = write_seq_state(SeqState(0, (CacheState((merged,)),)))
    section = 16 + sum(8 + 4 * len(ids) for ids in merged.seq_ids)

    def patched(offset: int, fmt: str, *values: object) -> bytes:
        buf = bytearray(data)
        struct.pack_into(fmt, buf, offset, *values)
        return bytes(buf)

    with pytest.raises(KVStateError, match=rf"offset {section + 4}: the merge section lists 3"):
        parse_seq_state(patched(section + 4, "<I", 3))
    with pytest.raises(KVStateError, match=rf"offset {section + 8}: cell 0 has bias inf"):
        parse_seq_state(patched(section + 8, "<f", np.inf))
    with pytest.raises(KVStateError, match="cell 1 .* span \\[12, 12\\]"):
        parse_seq_state(patched(section + 8 + 12 + 4, "<i", 12))
    with pytest.raises(KVStateError, match="bias and spans must be given together"):
        StreamKV(plain.positions, plain.seq_ids, True, plain.layers, None, merged.bias, None)
    with pytest.raises(KVStateError, match="outside the finite f16 range"):
        StreamKV(
            plain.positions,
            plain.seq_ids,
            True,
            plain.layers,
            None,
            np.full(4, 7e4, np.float32),
            merged.spans,
        )
    keys = np.zeros((3, 2, 4, 32), np.float32)
    rebuilt = kvstate.build_stream(
        plain, keys, keys, plain.positions, bias=merged.bias, spans=merged.spans
    )
    np.testing.assert_array_equal(rebuilt.spans, merged.spans)


def _merge_api() -> ctypes.CDLL | None:
    """libllama's per-cell bias/span setter (edgemerge.h, native patches 0002-0005), if any."""
    lib = llama_cpp.llama_cpp._lib
    if not hasattr(lib, "edgemerge_kv_cell_set"):
        return None
    lib.edgemerge_kv_cell_set.restype = ctypes.c_int32
    lib.edgemerge_kv_cell_set.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int32,
        ctypes.c_uint32,
        ctypes.c_float,
        ctypes.c_int32,
        ctypes.c_int32,
    ]
    return lib


def test_llama_cpp_writes_and_reads_the_merge_section(model_path: Path, captured: dict) -> None:
    tokens, data = captured[("f16", "f16", False)]
    lib = _merge_api()
    if lib is None:
        pytest.skip("this libllama lacks edgemerge's per-cell bias and span")
    llm = make_llm(model_path, "f16", "f16", False)
    llm.eval(tokens)
    # cell i holds position i in a fresh context
    assert lib.edgemerge_kv_cell_set(llm._ctx.ctx, 0, 5, 1.5, 4, 7) == 0
    written = get_state(llm)
    stream = parse_seq_state(written).stream
    assert (stream.bias[5], *stream.spans[5]) == (1.5, 4, 7)
    assert stream.bias[4] == 0 and tuple(stream.spans[4]) == (4, 4)
    assert write_seq_state(parse_seq_state(written)) == written
    llm.close()

    # and a state we build with merged cells loads and comes back unchanged
    state = parse_seq_state(data)
    keys, values = state.keys_values(N_KV_HEAD)
    keep = np.r_[0:3, 6 : len(tokens)]
    spans = np.stack([keep, keep], axis=1).astype(np.int32)
    spans[2, 1] = 5  # cell at position 2 now stands for positions 2..5
    bias = np.zeros(len(keep), np.float32)
    bias[2] = np.log(4.0)
    ours = write_seq_state(
        kvstate.with_kv(state, keys[:, :, keep], values[:, :, keep], keep, bias=bias, spans=spans)
    )
    fresh = make_llm(model_path, "f16", "f16", False)
    assert set_state(fresh, ours) == len(ours)
    assert get_state(fresh) == ours
    fresh.close()
