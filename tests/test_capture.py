"""edgemerge.native.capture on tiny qwen2 and gemma3 models run by the real llama.cpp."""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import gguf
import llama_cpp  # conftest imported edgemerge first, so this is the patched libllama
import numpy as np
import pytest

from edgemerge.evaluation.scoring import decode_chunk, new_context
from edgemerge.methods.base import KVSnapshot
from edgemerge.native import kvstate
from edgemerge.native.capture import CaptureError, KVCapture, capture_kv, model_layout
from edgemerge.reference import ggml_quants as gq
from edgemerge.reference.rope import Rope, rotate
from edgemerge.testing.tiny_models import tokenizer_metadata, write_tiny_model

TEXT = b"A capture reads the cache, the queries and the attention of a real model run. " * 2
N_BATCH = 32  # several micro-batches, so the per-chunk bookkeeping is exercised
GEMMA_WINDOW = 8


def write_tiny_gemma3(path: Path, *, n_layer: int = 12, seed: int = 0) -> Path:
    """A random gemma3 model: 4 query heads, 1 KV head of 32, sliding window 8.

    With llama.cpp's default pattern of 6, layers 5 and 11 attend to everything
    and the other ten see a window. edgemerge.testing.tiny_models has no gemma3 (yet).
    """
    n_embd, n_head, n_head_kv, head_dim, n_ff = 64, 4, 1, 32, 128
    rng = np.random.default_rng(seed)
    tokenizer = tokenizer_metadata("llama")
    n_vocab = len(tokenizer["tokenizer.ggml.tokens"][1])
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(4096)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_sliding_window(GEMMA_WINDOW)
    writer.add_rope_freq_base(1_000_000.0)
    for key, (vtype, value, sub_type) in tokenizer.items():
        writer.add_key_value(key, value, vtype, sub_type)

    def matrix(n_out: int, n_in: int, std: float | None = None) -> np.ndarray:
        scale = np.float32(std if std is not None else 1.0 / math.sqrt(n_in))
        return rng.standard_normal((n_out, n_in), dtype=np.float32) * scale

    def gain(n: int) -> np.ndarray:
        return 1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)

    writer.add_tensor("token_embd.weight", matrix(n_vocab, n_embd, 1.0))  # tied output
    writer.add_tensor("output_norm.weight", gain(n_embd))
    for i in range(n_layer):
        for name, tensor in (
            ("attn_norm", gain(n_embd)),
            ("attn_q", matrix(n_head * head_dim, n_embd)),
            ("attn_k", matrix(n_head_kv * head_dim, n_embd)),
            ("attn_v", matrix(n_head_kv * head_dim, n_embd)),
            ("attn_output", matrix(n_embd, n_head * head_dim)),
            ("attn_q_norm", gain(head_dim)),
            ("attn_k_norm", gain(head_dim)),
            ("post_attention_norm", gain(n_embd)),
            ("ffn_norm", gain(n_embd)),
            ("ffn_gate", matrix(n_ff, n_embd)),
            ("ffn_up", matrix(n_ff, n_embd)),
            ("ffn_down", matrix(n_embd, n_ff)),
            ("post_ffw_norm", gain(n_embd)),
        ):
            writer.add_tensor(f"blk.{i}.{name}.weight", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def qwen2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # head_dim 32 so that q8_0/q4_0 caches are allowed
    return write_tiny_model(
        tmp_path_factory.mktemp("capture") / "qwen2.gguf", "qwen2", n_embd=128, n_head=4
    )


@pytest.fixture(scope="module")
def gemma3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gemma3(tmp_path_factory.mktemp("capture") / "gemma3.gguf")


def tokenize(path: Path) -> list[int]:
    llm = llama_cpp.Llama(str(path), n_ctx=64, vocab_only=True, verbose=False)
    tokens = llm.tokenize(TEXT)
    llm.close()
    return tokens


def state_from_llama(path: Path, tokens: list[int], **kwargs: object) -> bytes:
    llm = llama_cpp.Llama(
        str(path), n_ctx=256, n_batch=N_BATCH, n_ubatch=N_BATCH, verbose=False, **kwargs
    )
    llm.eval(tokens)
    ctx = llm._ctx.ctx
    size = llama_cpp.llama_state_seq_get_size(ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    assert llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0) == size
    llm.close()
    return bytes(buf)


def recomputed_mass(cap: KVCapture) -> np.ndarray:
    """Causal softmax(attn_scale * q.k) from the captured queries and keys, summed."""
    n_layer, n_head, n, _ = cap.queries.shape
    group = n_head // cap.n_kv_head
    mass = np.zeros(n)
    for il in range(n_layer):
        for h in range(n_head):
            q = cap.queries[il, h].astype(np.float64)
            k = cap.keys[il, h // group].astype(np.float64)
            logits = cap.attn_scale * q @ k.T
            logits[np.triu_indices(n, 1)] = -np.inf
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            mass += (probs / probs.sum(axis=1, keepdims=True)).sum(axis=0)
    return mass


def test_qwen2_capture_matches_the_cache_and_the_attention(qwen2_path: Path) -> None:
    tokens = tokenize(qwen2_path)
    n = len(tokens)
    cap = capture_kv(qwen2_path, tokens, n_obs=n, n_batch=N_BATCH, n_ctx=256)

    assert cap.layers == (0, 1) and cap.layout.sliding_window_layers == ()
    assert (cap.n_head, cap.n_kv_head, cap.head_dim) == (4, 2, 32)
    assert cap.keys.shape == cap.values.shape == (2, 2, n, 32)
    assert cap.queries.shape == (2, 4, n, 32) and np.isfinite(cap.queries).all()
    np.testing.assert_array_equal(cap.positions, np.arange(n))
    assert cap.attn_scale == pytest.approx(1 / math.sqrt(32))
    snap = cap.snapshot
    assert isinstance(snap, KVSnapshot)
    assert snap.keys is cap.keys and snap.queries is cap.queries and snap.layers == (0, 1)
    assert snap.scale == cap.attn_scale
    np.testing.assert_array_equal(snap.query_positions, np.arange(n))

    # Reading tensors through the callback does not disturb the computation: the
    # cache is byte for byte what a plain llama_cpp.Llama run leaves behind.
    assert cap.state_bytes == state_from_llama(qwen2_path, tokens, flash_attn=False)
    keys, values = kvstate.parse_seq_state(cap.state_bytes).keys_values(2)
    np.testing.assert_array_equal(cap.keys, keys)
    np.testing.assert_array_equal(cap.values, values)

    # Every softmax row sums to one: total mass = layers x heads x query tokens.
    assert cap.importance.shape == (n,) and (cap.importance >= 0).all()
    assert cap.importance.sum() == pytest.approx(2 * 4 * n, rel=1e-3)
    # And the per-cell mass is what the captured post-RoPE queries and the cached
    # keys give, which checks query order, head grouping, scale and slot mapping.
    np.testing.assert_allclose(cap.importance, recomputed_mass(cap), rtol=1e-3, atol=1e-2)
    assert cap.importance[0] > cap.importance[-1]  # early cells are seen by more queries


def test_observation_window_and_flash_attention(qwen2_path: Path) -> None:
    tokens = tokenize(qwen2_path)
    full = capture_kv(qwen2_path, tokens, n_obs=len(tokens), n_batch=N_BATCH)
    window = capture_kv(qwen2_path, tokens, n_obs=5, n_batch=N_BATCH)
    np.testing.assert_array_equal(window.queries, full.queries[:, :, -5:])
    n = len(tokens)
    np.testing.assert_array_equal(window.snapshot.query_positions, np.arange(n - 5, n))
    np.testing.assert_array_equal(window.importance, full.importance)

    fa = capture_kv(qwen2_path, tokens, n_obs=5, n_batch=N_BATCH, flash_attn=True)
    assert fa.importance is None  # probabilities never exist with flash attention
    assert not fa.state.stream.v_trans and window.state.stream.v_trans
    # Layer 0's queries and K/V come before any attention, so they cannot differ.
    np.testing.assert_array_equal(fa.queries[0], window.queries[0])
    np.testing.assert_array_equal(fa.keys[0], window.keys[0])
    np.testing.assert_array_equal(fa.values[0], window.values[0])


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantized_cache_capture(qwen2_path: Path, qtype: str) -> None:
    tokens = tokenize(qwen2_path)
    cap = capture_kv(
        qwen2_path, tokens, n_obs=4, n_batch=N_BATCH, type_k=qtype, type_v=qtype, flash_attn=True
    )
    layer0 = cap.state.stream.layers[0]
    assert gq.type_name(layer0.k_type) == gq.type_name(layer0.v_type) == qtype
    reference = capture_kv(qwen2_path, tokens, n_obs=4, n_batch=N_BATCH, flash_attn=True)
    # layer 0 is computed before attention: only the cache encoding differs
    step = {"q8_0": 1 / 127, "q4_0": 1 / 7}[qtype]
    amax = np.abs(reference.keys[0]).max()
    assert 0 < np.abs(cap.keys[0] - reference.keys[0]).max() <= amax * step
    assert cap.state_bytes == state_from_llama(
        qwen2_path,
        tokens,
        flash_attn=True,
        type_k=gq.ggml_type(qtype).type_id,
        type_v=gq.ggml_type(qtype).type_id,
    )


def test_gemma3_reports_sliding_layers_and_returns_full_attention(gemma3_path: Path) -> None:
    tokens = tokenize(gemma3_path)
    n = len(tokens)
    cap = capture_kv(gemma3_path, tokens, n_obs=n, n_batch=N_BATCH, n_ctx=256)

    assert cap.layout.arch == "gemma3" and cap.layout.n_swa == GEMMA_WINDOW
    assert cap.layout.full_attention_layers == (5, 11)
    assert cap.layout.sliding_window_layers == (0, 1, 2, 3, 4, 6, 7, 8, 9, 10)
    assert cap.layers == (5, 11)
    assert cap.keys.shape == (2, 1, n, 32) and cap.queries.shape == (2, 4, n, 32)

    # Two caches: full attention (2 layers, every cell), then the sliding-window
    # ring (10 layers, only the cells the window still sees).
    full, sliding = cap.state.caches
    assert (full.stream.n_layer, full.stream.n_cells) == (2, n)
    assert sliding.stream.n_layer == 10
    np.testing.assert_array_equal(sliding.stream.positions, np.arange(n - GEMMA_WINDOW, n))
    assert kvstate.write_seq_state(cap.state) == cap.state_bytes
    assert cap.state_bytes == state_from_llama(gemma3_path, tokens, flash_attn=False)

    assert cap.importance.sum() == pytest.approx(2 * 4 * n, rel=1e-3)
    np.testing.assert_allclose(cap.importance, recomputed_mass(cap), rtol=1e-3, atol=1e-2)


def test_layer_selection(gemma3_path: Path) -> None:
    tokens = tokenize(gemma3_path)
    cap = capture_kv(gemma3_path, tokens, n_obs=3, n_batch=N_BATCH, layers=[11])
    both = capture_kv(gemma3_path, tokens, n_obs=3, n_batch=N_BATCH)
    assert cap.layers == (11,)
    np.testing.assert_array_equal(cap.keys[0], both.keys[1])
    np.testing.assert_array_equal(cap.queries[0], both.queries[1])
    assert cap.importance.sum() == pytest.approx(4 * len(tokens), rel=1e-3)
    with pytest.raises(CaptureError, match="full-attention layers of this model .*bad: \\[3\\]"):
        capture_kv(gemma3_path, tokens, layers=[3])


def test_bad_arguments_are_reported(qwen2_path: Path, tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="non-empty"):
        capture_kv(qwen2_path, [])
    with pytest.raises(CaptureError, match="n_obs must be in 0..3"):
        capture_kv(qwen2_path, [1, 2, 3], n_obs=4)
    with pytest.raises(CaptureError, match="needs flash_attn=True"):
        capture_kv(qwen2_path, [1, 2, 3], n_obs=1, type_v="q8_0")
    with pytest.raises(CaptureError, match="does not exist"):
        capture_kv(tmp_path / "missing.gguf", [1, 2, 3], n_obs=1)
    with pytest.raises(CaptureError, match="token ids must be in"):
        capture_kv(qwen2_path, [1, 10**9], n_obs=1)
    with pytest.raises(CaptureError, match="cannot hold"):
        capture_kv(qwen2_path, [1, 2, 3], n_obs=1, n_ctx=2)


def test_capture_reuses_a_loaded_llama(qwen2_path: Path) -> None:
    tokens = tokenize(qwen2_path)
    llm = llama_cpp.Llama(str(qwen2_path), n_ctx=64, verbose=False)
    from_llama = capture_kv(llm, tokens, n_obs=2, n_batch=N_BATCH)
    from_path = capture_kv(qwen2_path, tokens, n_obs=2, n_batch=N_BATCH)
    assert from_llama.state_bytes == from_path.state_bytes
    np.testing.assert_array_equal(from_llama.queries, from_path.queries)
    llm.close()


def keys_decoded_from(path: Path, tokens: list[int], first_pos: int) -> tuple[np.ndarray, Rope]:
    """Full-attention keys (f32 cache) of ``tokens`` decoded at ``first_pos..``, and the RoPE."""
    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False)
    ctx = new_context(
        llm.model, 512, n_batch=N_BATCH, n_threads=2, flash_attn=False, cache_type="f32"
    )
    batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
    try:
        for start in range(0, len(tokens), N_BATCH):
            chunk = np.asarray(tokens[start : start + N_BATCH])
            decode_chunk(ctx, batch, chunk, first_pos + start, all_logits=False)
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        assert llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0) == size
        layout = model_layout(llm.model)
        stream = kvstate.parse_seq_state(bytes(buf)).caches[0].stream
        np.testing.assert_array_equal(stream.positions, first_pos + np.arange(len(tokens)))
        return stream.keys_values(layout.n_kv_head)[0], layout.rope
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llm.close()


@pytest.mark.parametrize(
    ("arch", "rope"),
    [
        ("qwen2", Rope("neox", 32, 1_000_000.0)),
        ("llama", Rope("norm", 16, 10_000.0)),
        ("gemma3", Rope("neox", 32, 1_000_000.0)),
    ],
)
def test_layout_rope_is_the_rotation_llama_cpp_applies(
    arch: str, rope: Rope, request: pytest.FixtureRequest
) -> None:
    """Attention sees relative positions only, so the same tokens decoded 300 positions
    later leave pre-RoPE keys unchanged: the cached keys differ by exactly R(300). A wrong
    pairing style, base or rotated width would leave errors of the keys' own size."""
    path = request.getfixturevalue({"llama": "tiny_llama_path"}.get(arch, f"{arch}_path"))
    tokens = tokenize(path)[:40]
    at_zero, layout_rope = keys_decoded_from(path, tokens, 0)
    later, _ = keys_decoded_from(path, tokens, 300)
    assert layout_rope == rope
    expect = rotate(at_zero, np.full(len(tokens), 300), rope)
    scale = np.abs(at_zero).max()
    assert np.abs(later - expect).max() < 1e-3 * scale  # observed: below 1e-4
    # and not by accident: the other pairing is far off
    other = Rope("norm" if rope.style == "neox" else "neox", rope.n_rot, rope.freq_base)
    assert np.abs(later - rotate(at_zero, np.full(len(tokens), 300), other)).max() > 0.1 * scale
    cap = capture_kv(path, tokens, n_obs=2, n_batch=N_BATCH)
    assert cap.snapshot.rope == rope


REAL_TEXT = (
    b"Merging neighbouring key/value states keeps a long conversation inside a fixed "
    b"cache budget. Each block of sixteen positions is hashed, compared with its "
    b"neighbours and, when similar enough, folded into one cell that remembers how "
    b"much attention mass it stands for. "
)


def _real_model(name: str) -> Path:
    from edgemerge.models import ModelError, resolve_model

    try:
        return resolve_model(name, pull_missing=False, progress=False)
    except ModelError as err:
        pytest.skip(f"{name} is not available: {err}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "geometry", "full_layers"),
    [
        ("qwen2.5-coder-0.5b", (14, 2, 64), tuple(range(24))),
        ("gemma-3-270m", (4, 1, 256), (5, 11, 17)),
    ],
)
def test_real_model_capture(name: str, geometry: tuple, full_layers: tuple) -> None:
    path = _real_model(name)
    llm = llama_cpp.Llama(str(path), n_ctx=64, vocab_only=True, verbose=False)
    tokens = llm.tokenize(REAL_TEXT * 20)[:600]
    llm.close()
    n = len(tokens)
    assert n == 600  # longer than Gemma's 512-token window
    cap = capture_kv(path, tokens, n_obs=n, n_batch=256)

    assert (cap.n_head, cap.n_kv_head, cap.head_dim) == geometry
    assert cap.layers == cap.layout.full_attention_layers == full_layers
    assert cap.keys.shape == (len(full_layers), geometry[1], n, geometry[2])
    assert kvstate.write_seq_state(cap.state) == cap.state_bytes
    if name.startswith("gemma"):
        # the 512-token ring of the sliding-window layers keeps only the last window
        assert [c.stream.n_layer for c in cap.state.caches] == [3, 15]
        assert cap.state.caches[1].stream.n_cells == cap.layout.n_swa == 512
    total = len(full_layers) * geometry[0] * n
    assert cap.importance.sum() == pytest.approx(total, rel=1e-3)
    np.testing.assert_allclose(cap.importance, recomputed_mass(cap), rtol=1e-3, atol=1e-2)
