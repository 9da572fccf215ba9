"""Per-cell bias and span of the patched KV cache (native/patches/0002-0004, native.kvcells).

The contexts here are built with llama-cpp-python's low-level API, so that tests
control sequences, positions and cells exactly; ``kvcells`` takes the raw context
pointer as ``Llama`` users pass ``Llama._ctx.ctx``.
"""

from __future__ import annotations

import ctypes
import math
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import llama_cpp  # conftest imported edgemerge first, so this is the patched libllama
import numpy as np
import pytest

from edgemerge import native
from edgemerge.native import kvcells

N_CTX = 64
# Any ids work for random-weight models; these are ordinary text tokens in both vocabularies.
PROMPT = [1000, 1234, 2000, 777, 3001, 4321, 555, 6000, 999, 1500]
QUERY = [2500, 3500]
LONG_PROMPT = [int(t) for t in np.random.default_rng(7).integers(1000, 5000, size=44)]
TWIN_POS = 2
# "EGM1", the tag of the merge section that patch 0004 adds to a stream block of a saved state.
MERGE_TAG = b"EGM1"


class Session:
    """A model and one context on the low-level llama.cpp API."""

    def __init__(
        self,
        model_path: Path,
        *,
        flash_attn: bool,
        n_seq_max: int,
        unified: bool,
        n_ctx: int,
        f32_cache: bool,
    ):
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
        assert self.model, f"could not load {model_path}"
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx * (1 if unified else n_seq_max)
        cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_seq_max = n_seq_max
        cparams.kv_unified = unified
        if f32_cache:
            cparams.type_k = cparams.type_v = llama_cpp.GGML_TYPE_F32
        cparams.n_threads = cparams.n_threads_batch = 2
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        assert self.ctx, "could not create the context"
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

    def close(self) -> None:
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    def decode(self, entries: Sequence[tuple[int, int, Sequence[int], bool]]) -> list[np.ndarray]:
        """Decode (token, pos, seq_ids, want_logits) entries as one batch; logits of the wanted."""
        batch = llama_cpp.llama_batch_init(len(entries), 0, 4)
        try:
            for i, (token, pos, seq_ids, want) in enumerate(entries):
                batch.token[i] = token
                batch.pos[i] = pos
                batch.n_seq_id[i] = len(seq_ids)
                for k, s in enumerate(seq_ids):
                    batch.seq_id[i][k] = s
                batch.logits[i] = want
            batch.n_tokens = len(entries)
            assert llama_cpp.llama_decode(self.ctx, batch) == 0
        finally:
            llama_cpp.llama_batch_free(batch)
        out = []
        for i, (_, _, _, want) in enumerate(entries):
            if want:
                ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
                out.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return out

    def prompt(self, tokens: Sequence[int], seq_ids: Sequence[int] = (0,), start: int = 0) -> None:
        self.decode([(t, start + p, seq_ids, False) for p, t in enumerate(tokens)])

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> None:
        assert llama_cpp.llama_memory_seq_rm(self.mem, seq_id, p0, p1)

    def seq_state(self, seq_id: int) -> bytes:
        size = llama_cpp.llama_state_seq_get_size(self.ctx, seq_id)
        buf = (ctypes.c_uint8 * size)()
        assert llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, seq_id) == size
        return bytes(buf)

    def load_seq_state(self, data: bytes, seq_id: int) -> bool:
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return llama_cpp.llama_state_seq_set_data(self.ctx, buf, len(data), seq_id) > 0


@contextmanager
def session(
    model_path: Path,
    *,
    flash_attn: bool = False,
    n_seq_max: int = 1,
    unified: bool = True,
    n_ctx: int = N_CTX,
    f32_cache: bool = False,
) -> Iterator[Session]:
    s = Session(
        model_path,
        flash_attn=flash_attn,
        n_seq_max=n_seq_max,
        unified=unified,
        n_ctx=n_ctx,
        f32_cache=f32_cache,
    )
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(params=["qwen2", "llama"])
def model_path(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}_path")


def test_fresh_cells_are_plain(model_path):
    with session(model_path) as s:
        s.prompt(PROMPT)
        cells = kvcells.list_cells(s.ctx, 0)
    n = len(PROMPT)
    assert len(cells) == n
    np.testing.assert_array_equal(cells.pos, np.arange(n))
    np.testing.assert_array_equal(cells.span_min, cells.pos)
    np.testing.assert_array_equal(cells.span_max, cells.pos)
    np.testing.assert_array_equal(cells.bias, np.zeros(n, np.float32))
    assert len(set(cells.cell.tolist())) == n


def test_set_cell_is_listed_and_empty_sequence_lists_nothing(tiny_qwen2_path):
    with session(tiny_qwen2_path, n_seq_max=2) as s:
        s.prompt(PROMPT)
        cell = kvcells.list_cells(s.ctx, 0).index_of_pos(4)
        kvcells.set_cell(s.ctx, 0, cell, bias=1.5, span_min=2, span_max=6)
        cells = kvcells.list_cells(s.ctx, 0)
        assert len(kvcells.list_cells(s.ctx, 1)) == 0
    row = int(np.flatnonzero(cells.pos == 4)[0])
    assert (cells.bias[row], cells.span_min[row], cells.span_max[row]) == (1.5, 2, 6)
    others = cells.pos != 4
    np.testing.assert_array_equal(cells.bias[others], 0)
    np.testing.assert_array_equal(cells.span_min[others], cells.pos[others])


def _twin_or_bias_logits(model_path: Path, flash_attn: bool, bias: float) -> list[np.ndarray]:
    """Logits of two queries in sequence 0 (cell TWIN_POS twice) and 1 (once, with ``bias``).

    The cache is f32: in f16 the rounding of the two sequences' later K/V rows would
    turn float-level differences into f16-level ones.
    """
    j = TWIN_POS
    with session(model_path, flash_attn=flash_attn, n_seq_max=3, n_ctx=128, f32_cache=True) as s:
        s.prompt(LONG_PROMPT[:j], seq_ids=(0, 1, 2))
        s.decode([(LONG_PROMPT[j], j, (seq,), False) for seq in (0, 1, 2)])
        twin = kvcells.list_cells(s.ctx, 2).index_of_pos(j)
        llama_cpp.llama_memory_seq_cp(s.mem, 2, 0, j, j + 1)
        s.seq_rm(2, -1, -1)
        assert twin in kvcells.list_cells(s.ctx, 0).cell
        single = kvcells.list_cells(s.ctx, 1).index_of_pos(j)
        kvcells.set_cell(s.ctx, 1, single, bias=bias, span_min=j, span_max=j)
        rest = LONG_PROMPT[j + 1 :]
        s.decode([(t, j + 1 + k, (seq,), False) for seq in (0, 1) for k, t in enumerate(rest)])
        n = len(LONG_PROMPT)
        assert len(kvcells.list_cells(s.ctx, 0)) == n + 1
        return s.decode([(t, n + k, (seq,), True) for seq in (0, 1) for k, t in enumerate(QUERY)])


@pytest.mark.parametrize("flash_attn", [False, True], ids=["softmax", "flash_attn"])
def test_log2_bias_equals_the_cell_present_twice(model_path, flash_attn):
    # Attention weighs cell i by exp(s_i + b_i) / sum_k exp(s_k + b_k), so a cell with
    # bias log 2 counts exactly like two cells with its K, V and position. Sequence 0
    # gets such a twin, sequence 1 the single cell with bias log 2; the twin's K/V equal
    # the original's because both come from the same token, position and (shared)
    # prefix in one batch. Every later token of the two sequences, in every layer, then
    # sees the same attention, up to float rounding. The cell is more than 32 positions
    # before the queries, so the second query's mask row is the copy that llama.cpp
    # makes of the first one's, and that path is covered too.
    twin_0, twin_1, single_0, single_1 = _twin_or_bias_logits(model_path, flash_attn, math.log(2))
    # Tolerances, measured on the tiny models with an f32 cache: the plain softmax path
    # agrees to 2.4e-6. Flash attention on the CPU rounds through f16 (its mask too: log 2
    # becomes 0.69336), which alone moves these logits by up to 4e-3 between the two
    # attention paths; twin and bias agree to 1.8e-3 there.
    tol = 5e-3 if flash_attn else 5e-5
    np.testing.assert_allclose(single_0, twin_0, rtol=0, atol=tol)
    np.testing.assert_allclose(single_1, twin_1, rtol=0, atol=tol)
    # without the bias the twin makes a difference far beyond the tolerance
    plain = _twin_or_bias_logits(model_path, flash_attn, 0.0)
    assert np.abs(plain[2] - plain[0]).max() > 20 * tol
    # and the bias acts on its own cell's sequence only
    np.testing.assert_allclose(plain[0], twin_0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("flash_attn", [False, True], ids=["softmax", "flash_attn"])
def test_very_negative_bias_hides_the_cell(tiny_qwen2_path, flash_attn):
    # exp(s - 30000) is exactly 0 in float, so the cell must contribute nothing: the
    # logits equal those of the same cache with the cell removed. The freed cell is
    # then taken by a token of another sequence, so that the query lands in the same
    # cell in both runs and the attention sums run in the same order (flash attention
    # accumulates in f16, where order alone moves the logits by about 1e-3).
    hidden_pos = 3
    n = len(PROMPT)
    with session(tiny_qwen2_path, flash_attn=flash_attn, n_seq_max=2) as s:
        s.prompt(PROMPT)
        cell = kvcells.list_cells(s.ctx, 0).index_of_pos(hidden_pos)
        (reference,) = s.decode([(QUERY[0], n, (0,), True)])
        s.seq_rm(0, n, -1)
        kvcells.set_cell(s.ctx, 0, cell, bias=-30000.0, span_min=hidden_pos, span_max=hidden_pos)
        (hidden,) = s.decode([(QUERY[0], n, (0,), True)])
        s.seq_rm(0, n, -1)
        s.seq_rm(0, hidden_pos, hidden_pos + 1)
        s.prompt(QUERY[1:], seq_ids=(1,))
        assert kvcells.list_cells(s.ctx, 1).cell.tolist() == [cell]
        (removed,) = s.decode([(QUERY[0], n, (0,), True)])
    np.testing.assert_allclose(hidden, removed, rtol=0, atol=1e-6)
    assert np.abs(hidden - reference).max() > 1e-2


def _merge_state(s: Session) -> None:
    """Give two cells of sequence 0 a bias and a span."""
    cells = kvcells.list_cells(s.ctx, 0)
    kvcells.set_cell(s.ctx, 0, cells.index_of_pos(2), bias=0.75, span_min=1, span_max=3)
    kvcells.set_cell(s.ctx, 0, cells.index_of_pos(7), bias=-1.25, span_min=7, span_max=9)


def _metadata(cells: kvcells.KVCells) -> list[tuple[int, int, int, float]]:
    return list(
        zip(
            cells.pos.tolist(),
            cells.span_min.tolist(),
            cells.span_max.tolist(),
            cells.bias.tolist(),
            strict=True,
        )
    )


def _strip_merge_section(state: bytes, n_cells: int) -> bytes:
    """The same state as a writer without patch 0004 would have produced it."""
    head = MERGE_TAG + struct.pack("<I", n_cells)
    at = state.find(head)
    assert at >= 0 and state.find(head, at + 1) == -1
    return state[:at] + state[at + len(head) + 12 * n_cells :]


@pytest.mark.parametrize("flash_attn", [False, True], ids=["softmax", "flash_attn"])
def test_state_round_trip_keeps_bias_and_span(model_path, flash_attn):
    n = len(PROMPT)
    with session(model_path, flash_attn=flash_attn, n_seq_max=2) as s:
        s.prompt(PROMPT)
        plain_state = s.seq_state(0)
        _merge_state(s)
        before = _metadata(kvcells.list_cells(s.ctx, 0))
        (logits_before,) = s.decode([(QUERY[0], n, (0,), True)])
        s.seq_rm(0, n, -1)
        state = s.seq_state(0)

        s.seq_rm(0, -1, -1)
        assert s.load_seq_state(state, 1)
        assert _metadata(kvcells.list_cells(s.ctx, 1)) == before
        (logits_after,) = s.decode([(QUERY[0], n, (1,), True)])
    np.testing.assert_array_equal(logits_after, logits_before)
    # a state without merged cells keeps the stock format; the section adds 8 + 12/cell bytes
    assert MERGE_TAG not in plain_state
    assert len(state) == len(plain_state) + 8 + 12 * n


def test_state_of_unpatched_format_loads_with_plain_cells(model_path):
    n = len(PROMPT)
    with session(model_path, n_seq_max=2) as s:
        s.prompt(PROMPT)
        (plain_logits,) = s.decode([(QUERY[0], n, (0,), True)])
        s.seq_rm(0, n, -1)
        _merge_state(s)
        old_format = _strip_merge_section(s.seq_state(0), n)
        s.seq_rm(0, -1, -1)
        assert s.load_seq_state(old_format, 1)
        cells = kvcells.list_cells(s.ctx, 1)
        (logits,) = s.decode([(QUERY[0], n, (1,), True)])
    np.testing.assert_array_equal(cells.pos, np.arange(n))
    np.testing.assert_array_equal(cells.span_min, cells.pos)
    np.testing.assert_array_equal(cells.span_max, cells.pos)
    np.testing.assert_array_equal(cells.bias, 0)
    np.testing.assert_array_equal(logits, plain_logits)


def test_whole_context_state_keeps_bias_and_span(tiny_llama_path):
    with session(tiny_llama_path) as s:
        s.prompt(PROMPT)
        _merge_state(s)
        before = _metadata(kvcells.list_cells(s.ctx, 0))
        size = llama_cpp.llama_state_get_size(s.ctx)
        buf = (ctypes.c_uint8 * size)()
        assert llama_cpp.llama_state_get_data(s.ctx, buf, size) == size
        s.seq_rm(0, -1, -1)
        assert llama_cpp.llama_state_set_data(s.ctx, buf, size) == size
        assert _metadata(kvcells.list_cells(s.ctx, 0)) == before


def test_corrupt_merge_section_fails_the_restore_cleanly(tiny_qwen2_path):
    n = len(PROMPT)
    with session(tiny_qwen2_path) as s:
        s.prompt(PROMPT)
        _merge_state(s)
        state = bytearray(s.seq_state(0))
        first_bias = state.find(MERGE_TAG + struct.pack("<I", n)) + 8
        state[first_bias : first_bias + 4] = struct.pack("<f", float("nan"))
        s.seq_rm(0, -1, -1)
        assert not s.load_seq_state(bytes(state), 0)
        assert len(kvcells.list_cells(s.ctx, 0)) == 0


def test_seq_rm_removes_every_cell_whose_span_reaches_the_range(tiny_qwen2_path):
    with session(tiny_qwen2_path) as s:
        s.prompt(PROMPT)
        merged = kvcells.list_cells(s.ctx, 0).index_of_pos(5)
        kvcells.set_cell(s.ctx, 0, merged, bias=math.log(5), span_min=3, span_max=7)
        s.seq_rm(0, 6, -1)
        assert kvcells.list_cells(s.ctx, 0).pos.tolist() == [0, 1, 2, 3, 4]

        s.prompt(PROMPT[5:], start=5)
        merged = kvcells.list_cells(s.ctx, 0).index_of_pos(5)
        kvcells.set_cell(s.ctx, 0, merged, bias=math.log(5), span_min=3, span_max=7)
        s.seq_rm(0, 0, 3)  # ends just before the span: the merged cell stays
        assert kvcells.list_cells(s.ctx, 0).pos.tolist() == [3, 4, 5, 6, 7, 8, 9]
        s.seq_rm(0, 8, 9)  # starts just after the span
        assert 5 in kvcells.list_cells(s.ctx, 0).pos
        s.seq_rm(0, 0, 4)  # reaches its first position
        assert kvcells.list_cells(s.ctx, 0).pos.tolist() == [4, 6, 7, 9]


def test_plain_cells_are_removed_by_position_only(tiny_qwen2_path):
    with session(tiny_qwen2_path) as s:
        s.prompt(PROMPT)
        s.seq_rm(0, 6, -1)
        assert kvcells.list_cells(s.ctx, 0).pos.tolist() == [0, 1, 2, 3, 4, 5]


def test_a_removed_cell_comes_back_plain(tiny_qwen2_path):
    n = len(PROMPT)
    with session(tiny_qwen2_path) as s:
        s.prompt(PROMPT)
        last = kvcells.list_cells(s.ctx, 0).index_of_pos(n - 1)
        kvcells.set_cell(s.ctx, 0, last, bias=2.0, span_min=n - 3, span_max=n - 1)
        s.seq_rm(0, n - 1, -1)
        s.prompt(PROMPT[-1:], start=n - 1)
        cells = kvcells.list_cells(s.ctx, 0)
    assert last in cells.cell  # the freed cell was reused ...
    assert cells.bias.tolist() == [0.0] * n  # ... without the old metadata
    np.testing.assert_array_equal(cells.span_min, cells.pos)


@pytest.mark.parametrize("unified", [True, False], ids=["same_stream", "across_streams"])
def test_seq_cp_copies_bias_and_span(tiny_qwen2_path, unified):
    with session(tiny_qwen2_path, n_seq_max=2, unified=unified) as s:
        s.prompt(PROMPT)
        _merge_state(s)
        llama_cpp.llama_memory_seq_cp(s.mem, 0, 1, -1, -1)
        assert _metadata(kvcells.list_cells(s.ctx, 1)) == _metadata(kvcells.list_cells(s.ctx, 0))
        # the copy is a full sequence: it decodes like the original
        n = len(PROMPT)
        logits = s.decode([(QUERY[0], n, (0,), True), (QUERY[0], n, (1,), True)])
    np.testing.assert_allclose(logits[1], logits[0], rtol=0, atol=1e-5)


def test_position_shifts_move_the_span(tiny_qwen2_path):
    with session(tiny_qwen2_path) as s:
        s.prompt(PROMPT)
        cell = kvcells.list_cells(s.ctx, 0).index_of_pos(5)
        kvcells.set_cell(s.ctx, 0, cell, bias=0.5, span_min=3, span_max=7)
        llama_cpp.llama_memory_seq_add(s.mem, 0, 0, -1, 10)
        cells = kvcells.list_cells(s.ctx, 0)
        row = int(np.flatnonzero(cells.cell == cell)[0])
        assert (cells.pos[row], cells.span_min[row], cells.span_max[row]) == (15, 13, 17)
        llama_cpp.llama_memory_seq_div(s.mem, 0, 0, -1, 2)
        cells = kvcells.list_cells(s.ctx, 0)
        row = int(np.flatnonzero(cells.cell == cell)[0])
        assert (cells.pos[row], cells.span_min[row], cells.span_max[row]) == (7, 6, 8)
        assert cells.bias[row] == 0.5
        # the shifted cache still decodes (the K-shift runs on the next decode)
        s.decode([(QUERY[0], int(cells.pos.max()) + 1, (0,), True)])


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"seq_id": 3}, native.NativeError, r"sequence 3 does not exist.*ids 0\.\.1"),
        ({"seq_id": -1}, native.NativeError, "sequence -1 does not exist"),
        ({"cell": 100_000}, native.NativeError, "cell index 100000 is outside the KV cache"),
        ({"cell": 40}, native.NativeError, "cell 40 is not part of sequence 0"),
        ({"seq_id": 1}, native.NativeError, "is not part of sequence 1"),
        ({"bias": float("nan")}, native.NativeError, "bias nan is not allowed"),
        ({"bias": float("inf")}, native.NativeError, "bias inf is not allowed"),
        ({"bias": 1e5}, native.NativeError, "within \\+-65504"),
        ({"span_min": 5, "span_max": 6}, native.NativeError, "the cell's pos is 4"),
        ({"span_min": 2, "span_max": 3}, native.NativeError, "span \\[2, 3\\]"),
        ({"span_min": -1}, native.NativeError, "0 <= span_min"),
        ({"cell": -1}, ValueError, "cell is -1"),
        ({"seq_id": 2**31}, ValueError, "seq_id is 2147483648"),
        ({"span_max": 4.0}, TypeError, "span_max must be an integer"),
    ],
)
def test_invalid_cell_set_is_reported_and_changes_nothing(tiny_qwen2_path, change, error, message):
    with session(tiny_qwen2_path, n_seq_max=2) as s:
        s.prompt(PROMPT)
        before = _metadata(kvcells.list_cells(s.ctx, 0))
        args = {"seq_id": 0, "cell": kvcells.list_cells(s.ctx, 0).index_of_pos(4)}
        args |= {"bias": 1.0, "span_min": 3, "span_max": 5}
        args |= change
        with pytest.raises(error, match=message):
            kvcells.set_cell(s.ctx, **args)
        assert _metadata(kvcells.list_cells(s.ctx, 0)) == before


def test_listing_an_unknown_sequence_is_an_error(tiny_qwen2_path):
    with session(tiny_qwen2_path) as s:
        with pytest.raises(native.NativeError, match=r"sequence 1 does not exist.*ids 0\.\.0"):
            kvcells.list_cells(s.ctx, 1)


def test_c_api_rejects_null_arguments():
    ffi, lib = native.ffi(), native.lib()
    n = ffi.new("int32_t *")
    null = ffi.NULL
    rc = lib.edgemerge_kv_cells_list(null, 0, 0, null, null, null, null, null, n)
    assert rc == lib.EDGEMERGE_EINVAL
    assert "ctx is NULL" in ffi.string(lib.edgemerge_last_error()).decode()
    assert lib.edgemerge_kv_cell_set(null, 0, 0, 0.0, 0, 0) == lib.EDGEMERGE_EINVAL


def test_c_api_rejects_bad_capacity_and_count(tiny_qwen2_path):
    ffi, lib = native.ffi(), native.lib()
    null = ffi.NULL
    with session(tiny_qwen2_path) as s:
        ctx = ffi.cast("void *", ctypes.cast(s.ctx, ctypes.c_void_p).value)
        n = ffi.new("int32_t *")
        assert lib.edgemerge_kv_cells_list(ctx, 0, -1, null, null, null, null, null, n) < 0
        assert "capacity is -1" in ffi.string(lib.edgemerge_last_error()).decode()
        assert lib.edgemerge_kv_cells_list(ctx, 0, 0, null, null, null, null, null, null) < 0
        assert "n_cells is NULL" in ffi.string(lib.edgemerge_last_error()).decode()


def test_context_argument_forms(tiny_qwen2_path):
    with session(tiny_qwen2_path) as s:
        s.prompt(PROMPT[:3])
        address = ctypes.cast(s.ctx, ctypes.c_void_p).value
        assert len(kvcells.list_cells(address, 0)) == 3
        assert len(kvcells.list_cells(ctypes.c_void_p(address), 0)) == 3
    with pytest.raises(TypeError, match="ctx must be"):
        kvcells.list_cells("not a context", 0)
    with pytest.raises(ValueError, match="NULL"):
        kvcells.list_cells(0, 0)


def test_works_through_llama_cpp_llama(tiny_llama_path):
    llm = llama_cpp.Llama(str(tiny_llama_path), n_ctx=N_CTX, verbose=False)
    try:
        llm.eval(PROMPT[:5])
        cells = kvcells.list_cells(llm, 0)
        assert cells.pos.tolist() == [0, 1, 2, 3, 4]
        kvcells.set_cell(llm, 0, int(cells.cell[2]), bias=0.5, span_min=1, span_max=3)
        assert kvcells.list_cells(llm._ctx, 0).bias[2] == 0.5
    finally:
        llm.close()
    with pytest.raises(ValueError, match="closed"):
        kvcells.list_cells(llm, 0)
