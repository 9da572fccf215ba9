"""Capture a model's real KV cache, queries and attention mass over a token sequence.

The fidelity harness needs, for one sequence run through the real llama.cpp:

* K and V of every cell, per layer and KV head, as the cache holds them;
* the post-RoPE queries of the last ``n_obs`` tokens, per layer and query head;
* the attention mass each cell received (H2O-style importance).

How each is obtained:

K/V and positions
    After decoding, the sequence's state is read with ``llama_state_seq_get_data``,
    parsed by :mod:`edgemerge.native.kvstate` and dequantized to float32, so the arrays are
    exactly what the cache holds (f16/q8_0/q4_0 rounding included).

Queries and attention mass
    llama.cpp's graph evaluation callback (``cb_eval`` in ``llama_context_params``)
    is called for every graph node: first with ``ask=true`` ("do you want this
    tensor?"), then, for the nodes we want, with ``ask=false`` once the node is
    computed, when its data can be read with ``ggml_backend_tensor_get``. The model
    graphs name tensors ``<name>-<layer>`` (``llama_context::graph_get_cb``):

    * ``Qcur-<il>`` is given to several nodes of a layer (projection, bias add,
      reshape, RoPE); the RoPE node (``ggml_op_desc == "ROPE"``) is the post-RoPE
      query, f32 ``[head_dim, n_head, n_tokens]``.
    * ``kq_soft_max-<il>`` exists only with flash attention off: the attention
      probabilities, f32 ``[n_kv, n_tokens, n_head, 1]``, one column per cache slot
      ``0..n_kv-1``. Each row sums to one; masked slots get zero.

    Because the context is fresh and holds one sequence decoded from position 0,
    cache slot ``i`` holds position ``i``; this is checked against the parsed state.
    With flash attention on, probabilities are never materialised and
    ``importance`` is None.

Sliding-window models (Gemma 3)
    Their memory is two caches: the full-attention layers' and a small ring cache for
    the sliding-window layers, which is never merged. The capture reports which
    layers are which and returns only full-attention layers. The layer split follows
    llama.cpp's rule (``sliding_window_pattern`` from the GGUF, else the arch's
    default) and is cross-checked against the layer counts of the two caches.

The result carries an ``edgemerge.methods.base.KVSnapshot`` built from these
arrays (``KVCapture.snapshot``), ready for the compression methods.

The scale of the attention logits for the returned queries is ``attn_scale``
(``logit = attn_scale * q . k``): ``1/sqrt(head_dim)`` for llama/qwen2; Gemma 3 scales
its queries after RoPE by ``f_attention_scale`` and uses a KQ scale of 1.

The rotation the keys and queries carry is ``ModelLayout.rope`` (and ``snapshot.rope``):
llama.cpp's rope type (norm or neox), ``rope.dimension_count``, ``rope.freq_base`` and
the trained linear frequency scale, for the full-attention layers; None for YaRN,
LongRoPE and multi-section types, which :class:`edgemerge.reference.rope.Rope` does not
describe. Per-frequency factor tensors (``rope_freqs``, Llama 3.1) are not read.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# edgemerge/__init__.py has already run (this is a submodule), so llama_cpp loads
# edgemerge's patched libllama.
import llama_cpp
import numpy as np

from edgemerge.methods.base import KVSnapshot
from edgemerge.native import _llamalog, kvstate
from edgemerge.native._libpath import library_file
from edgemerge.reference import ggml_quants
from edgemerge.reference.rope import Rope

# Archs whose query scaling is known (see attn_scale above).
SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3")
# llama.cpp's default sliding-window pattern per arch (llama-model / models/*.cpp):
# layer il slides iff il % pattern < pattern - 1.
_DEFAULT_SWA_PATTERN = {"gemma3": 6}

_NAME_RE = re.compile(r"^(Qcur|kq_soft_max)-(\d+)$")


class CaptureError(RuntimeError):
    """The model could not be run or its tensors were not what the capture expects."""


@dataclass(frozen=True)
class ModelLayout:
    """Attention geometry of a model, as llama.cpp loaded it."""

    arch: str
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    n_swa: int
    sliding_window_layers: tuple[int, ...]
    full_attention_layers: tuple[int, ...]
    attn_scale: float
    # the full-attention layers' RoPE; None for rotations Rope does not describe
    rope: Rope | None = None


@dataclass(frozen=True, eq=False)
class KVCapture:
    """Real KV of one sequence: a ready :class:`KVSnapshot` plus what produced it.

    keys, values: float32 ``[n_layer, n_kv_head, n_tok, head_dim]`` for ``layers``.
    positions: int32 ``[n_tok]``.
    importance: float32 ``[n_tok]``, attention mass summed over ``layers``, all query
        heads and all query tokens; None with flash attention.
    queries: float32 ``[n_layer, n_head, n_obs, head_dim]``, post-RoPE, last n_obs
        tokens (positions ``query_positions``); None when ``n_obs == 0``.
    layers: model layer index of each first-axis entry.
    snapshot: the same arrays as an ``edgemerge.methods.base.KVSnapshot`` (with
        ``query_positions`` and ``attn_scale`` set), for the compression methods.
    state / state_bytes: the parsed and raw ``llama_state_seq_get_data`` buffer.
    """

    keys: np.ndarray
    values: np.ndarray
    positions: np.ndarray
    importance: np.ndarray | None
    queries: np.ndarray | None
    query_positions: np.ndarray | None
    layers: tuple[int, ...]
    head_dim: int
    n_kv_head: int
    n_head: int
    tokens: np.ndarray
    layout: ModelLayout
    snapshot: KVSnapshot
    state: kvstate.SeqState
    state_bytes: bytes

    @property
    def attn_scale(self) -> float:
        return self.layout.attn_scale


class _Ggml:
    """The few libggml-base functions the callback needs."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(str(library_file("ggml-base")))
        lib.ggml_get_name.restype = ctypes.c_char_p
        lib.ggml_get_name.argtypes = [ctypes.c_void_p]
        lib.ggml_op_desc.restype = ctypes.c_char_p
        lib.ggml_op_desc.argtypes = [ctypes.c_void_p]
        lib.ggml_nbytes.restype = ctypes.c_size_t
        lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
        lib.ggml_is_contiguous.restype = ctypes.c_bool
        lib.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_tensor_get.restype = None
        lib.ggml_backend_tensor_get.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_size_t,
        ]
        self.lib = lib

    def read_f32(self, t: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """A computed f32 tensor's data and its ggml shape (ne0..ne3)."""
        header = _TensorHeader.from_address(t)
        name = self.lib.ggml_get_name(t).decode(errors="replace")
        if header.type != ggml_quants.GGML_TYPE_F32 or not self.lib.ggml_is_contiguous(t):
            raise CaptureError(f"graph tensor {name} is not a contiguous f32 tensor")
        nbytes = self.lib.ggml_nbytes(t)
        out = np.empty(nbytes // 4, dtype=np.float32)
        self.lib.ggml_backend_tensor_get(t, out.ctypes.data, 0, nbytes)
        return out, tuple(int(x) for x in header.ne)


class _TensorHeader(ctypes.Structure):
    # Leading fields of struct ggml_tensor (ggml.h): type, buffer, ne[4], nb[4].
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
    ]


@functools.cache
def _shared_ggml() -> _Ggml:
    return _Ggml()


class GraphRecorder:
    """What llama.cpp's eval callback (``cb_eval``) reads from one decode: the post-RoPE
    queries of the observed tokens and the attention mass per cache slot (see the module
    doc). Pass it, wrapped in ``llama_cpp.ggml_backend_sched_eval_callback``, as a
    context's ``cb_eval``, or call it from such a callback.

    Args:
        layers: model layers to record (full-attention ones).
        n_total: tokens of the sequence being decoded; the queries of the last ``n_obs``
            are kept.
        n_obs: observed tokens (0: no queries).
        n_head, head_dim: query heads and head size (:class:`ModelLayout`).
        kv_size: cache slots (the context's ``n_ctx``), the length of :attr:`mass`.
        want_mass: read ``kq_soft_max`` (flash attention off only).

    Attributes:
        queries: layer -> float32 ``[n_head, n_obs, head_dim]`` (NaN until recorded).
        mass: float64 ``[kv_size]``, attention probability summed per slot.
        mass_rows: attention rows summed into ``mass`` (layers x heads x tokens).
        chunk_start, chunk_len: the decode call's first token and length, set by the
            caller before each ``llama_decode``.
        error: the first exception the callback met (it cannot raise into C);
            :meth:`raise_error` re-raises it once ``llama_decode`` has returned.
    """

    def __init__(
        self,
        layers: Sequence[int],
        n_total: int,
        n_obs: int,
        n_head: int,
        head_dim: int,
        kv_size: int,
        want_mass: bool,
    ) -> None:
        self.ggml = _shared_ggml()
        self.layers = set(layers)
        self.obs_start = n_total - n_obs
        self.n_obs = n_obs
        self.n_head = n_head
        self.head_dim = head_dim
        self.want_mass = want_mass
        self.queries = {il: np.full((n_head, n_obs, head_dim), np.nan, np.float32) for il in layers}
        self.mass = np.zeros(kv_size, dtype=np.float64)
        self.mass_rows = 0
        self.chunk_start = 0
        self.chunk_len = 0
        self.error: BaseException | None = None

    def raise_error(self) -> None:
        """Raise :class:`CaptureError` if reading a graph tensor failed."""
        if self.error is not None:
            raise CaptureError(f"reading graph tensors failed: {self.error}") from self.error

    def wanted(self, t: int) -> tuple[str, int] | None:
        match = _NAME_RE.match(self.ggml.lib.ggml_get_name(t).decode(errors="replace"))
        if match is None or int(match.group(2)) not in self.layers:
            return None
        kind, il = match.group(1), int(match.group(2))
        if kind == "Qcur":
            if self.chunk_start + self.chunk_len <= self.obs_start or self.n_obs == 0:
                return None
            if self.ggml.lib.ggml_op_desc(t) != b"ROPE":
                return None
        elif not self.want_mass:
            return None
        return kind, il

    def __call__(self, t: int, ask: bool, _user_data: int) -> bool:
        try:
            found = self.wanted(t)
            if ask or found is None:
                return found is not None
            kind, il = found
            data, ne = self.ggml.read_f32(t)
            if kind == "Qcur":
                self._take_queries(il, data, ne)
            else:
                self._take_mass(data, ne)
            return True
        except Exception as err:  # re-raised as CaptureError once llama_decode returns
            self.error = self.error or err
            return False

    def _take_queries(self, il: int, data: np.ndarray, ne: tuple[int, ...]) -> None:
        d, h, n = ne[0], ne[1], ne[2]
        if (d, h, n) != (self.head_dim, self.n_head, self.chunk_len):
            raise CaptureError(
                f"Qcur-{il} has shape {ne[:3]}, expected "
                f"({self.head_dim}, {self.n_head}, {self.chunk_len})"
            )
        q = data.reshape(n, h, d)
        lo = max(self.obs_start, self.chunk_start)
        hi = self.chunk_start + n
        self.queries[il][:, lo - self.obs_start : hi - self.obs_start] = q[
            lo - self.chunk_start : hi - self.chunk_start
        ].transpose(1, 0, 2)

    def _take_mass(self, data: np.ndarray, ne: tuple[int, ...]) -> None:
        n_kv, n_tok, n_head, n_stream = ne
        if n_tok != self.chunk_len or n_head != self.n_head or n_stream != 1:
            raise CaptureError(
                f"kq_soft_max has shape {ne}, expected (n_kv, {self.chunk_len}, {self.n_head}, 1)"
            )
        probs = data.reshape(n_head * n_tok, n_kv)
        self.mass[:n_kv] += probs.sum(axis=0, dtype=np.float64)
        self.mass_rows += n_head * n_tok


def model_layout(model: llama_cpp.llama_model_p) -> ModelLayout:
    """Attention geometry of a loaded model; which layers slide and the logit scale.

    Raises:
        CaptureError: the arch is not one whose query scaling this module knows.
    """
    arch = _meta(model, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise CaptureError(
            f"model arch {arch!r} is not supported by capture; "
            f"supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    n_layer = llama_cpp.llama_model_n_layer(model)
    n_head = llama_cpp.llama_model_n_head(model)
    n_kv_head = llama_cpp.llama_model_n_head_kv(model)
    n_embd = llama_cpp.llama_model_n_embd(model)
    key_length = _meta(model, f"{arch}.attention.key_length")
    head_dim = int(key_length) if key_length is not None else n_embd // n_head
    n_swa = llama_cpp.llama_model_n_swa(model)
    sliding = _sliding_layers(model, arch, n_layer, n_swa)
    full = tuple(il for il in range(n_layer) if il not in sliding)
    if arch == "gemma3":
        # llama.cpp: f_attention_scale, the 27B (62 layers) using n_embd / n_head
        base = n_embd / n_head if n_layer == 62 else head_dim
        scale = float(np.float32(1.0) / np.sqrt(np.float32(base)))
    else:
        scale = 1.0 / math.sqrt(head_dim)
    return ModelLayout(
        arch,
        n_layer,
        n_head,
        n_kv_head,
        head_dim,
        n_swa,
        sliding,
        full,
        scale,
        _rope(model, arch, head_dim),
    )


# llama.cpp's enum llama_rope_type values that Rope describes
_ROPE_STYLES = {llama_cpp.LLAMA_ROPE_TYPE_NORM: "norm", llama_cpp.LLAMA_ROPE_TYPE_NEOX: "neox"}


def _rope(model: llama_cpp.llama_model_p, arch: str, head_dim: int) -> Rope | None:
    """The full-attention layers' RoPE as llama.cpp loads it, or None when Rope cannot say.

    The sliding-window layers of Gemma 3 use another base (``rope.freq_base_swa``); they are
    never in a snapshot, so only the full-attention rotation is read. YaRN and LongRoPE
    scaling change the angles and magnitudes in ways Rope does not model: None.
    """
    style = _ROPE_STYLES.get(llama_cpp.llama_model_rope_type(model))
    scaling = _meta(model, f"{arch}.rope.scaling.type")
    if style is None or scaling not in (None, "none", "linear"):
        return None
    n_rot = _meta(model, f"{arch}.rope.dimension_count")
    base = _meta(model, f"{arch}.rope.freq_base")
    return Rope(
        style,
        int(n_rot) if n_rot is not None else head_dim,
        float(base) if base is not None else 10_000.0,  # llama.cpp's default
        float(llama_cpp.llama_model_rope_freq_scale_train(model)),
    )


def _sliding_layers(
    model: llama_cpp.llama_model_p, arch: str, n_layer: int, n_swa: int
) -> tuple[int, ...]:
    if n_swa <= 0:
        return ()
    raw = _meta(model, f"{arch}.attention.sliding_window_pattern")
    if raw is not None and raw.startswith("["):
        flags = [s.strip() == "true" for s in raw.strip("[]").split(",")]
        if len(flags) != n_layer:
            raise CaptureError(
                f"sliding_window_pattern lists {len(flags)} layers, the model has {n_layer}"
            )
        return tuple(il for il, slides in enumerate(flags) if slides)
    pattern = int(raw) if raw is not None else _DEFAULT_SWA_PATTERN.get(arch)
    if pattern is None:
        raise CaptureError(f"{arch} has a sliding window but no known layer pattern")
    if pattern == 0:
        return tuple(range(n_layer))
    return tuple(il for il in range(n_layer) if il % pattern < pattern - 1)


def _meta(model: llama_cpp.llama_model_p, key: str) -> str | None:
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    if n < 0:
        return None
    if n >= len(buf):
        buf = ctypes.create_string_buffer(n + 1)
        llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode()


def capture_kv(
    model: str | os.PathLike[str] | llama_cpp.Llama,
    tokens: Sequence[int] | np.ndarray,
    *,
    n_obs: int = 32,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: bool = False,
    layers: Sequence[int] | None = None,
    n_ctx: int | None = None,
    n_batch: int = 256,
    n_threads: int | None = None,
    verbose: bool = False,
) -> KVCapture:
    """Run ``tokens`` through the model in a fresh context and capture its KV state.

    Args:
        model: GGUF path, or a loaded ``llama_cpp.Llama`` whose model is reused (its
            own context is not touched).
        tokens: the sequence, decoded from position 0 as sequence 0.
        n_obs: how many of the last tokens' queries to keep (0: none).
        type_k, type_v: cache types ("f16", "q8_0", "q4_0", ...); quantized V needs
            ``flash_attn=True``.
        flash_attn: with it, attention probabilities do not exist and
            ``importance`` is None.
        layers: model layers to return; default all full-attention layers. Layers
            with a sliding window cannot be selected.
        n_ctx: cache size; default the token count rounded up to 256.
        n_batch: tokens per decode call (one micro-batch each).
        n_threads: CPU threads; default half the logical cores, as llama_cpp.Llama.

    Raises:
        CaptureError: bad arguments, llama.cpp failures, or tensors that do not
            look as documented above.
    """
    toks = np.asarray(tokens, dtype=np.int64)
    n_tok = int(toks.shape[0]) if toks.ndim == 1 else 0
    if n_tok == 0:
        raise CaptureError("tokens must be a non-empty 1-D sequence of token ids")
    if not 0 <= n_obs <= n_tok:
        raise CaptureError(f"n_obs must be in 0..{n_tok} (the token count), got {n_obs}")
    if n_batch < 1:
        raise CaptureError(f"n_batch must be positive, got {n_batch}")
    n_ctx = n_ctx if n_ctx is not None else -(-n_tok // 256) * 256
    if n_ctx < n_tok:
        raise CaptureError(f"n_ctx={n_ctx} cannot hold {n_tok} tokens")
    k_id, v_id = ggml_quants.ggml_type(type_k).type_id, ggml_quants.ggml_type(type_v).type_id
    if not flash_attn and ggml_quants.ggml_type(type_v).block_size != 1:
        raise CaptureError(f"a {type_v} V cache needs flash_attn=True (llama.cpp's rule)")

    _llamalog.set_verbose(verbose)
    owned_model = None
    if isinstance(model, llama_cpp.Llama):
        model_ptr = model.model  # llama_cpp.Llama's public llama_model pointer
    else:
        path = Path(model)
        if not path.is_file():
            raise CaptureError(f"model file {path} does not exist")
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        owned_model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not owned_model:
            raise CaptureError(f"llama.cpp could not load {path}")
        model_ptr = owned_model
    try:
        layout = model_layout(model_ptr)
        vocab = llama_cpp.llama_model_get_vocab(model_ptr)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        if toks.min() < 0 or toks.max() >= n_vocab:
            raise CaptureError(f"token ids must be in 0..{n_vocab - 1}")
        selected = _select_layers(layout, layers)
        recorder = GraphRecorder(
            selected,
            n_tok,
            n_obs,
            layout.n_head,
            layout.head_dim,
            n_ctx,
            want_mass=not flash_attn,
        )
        state_bytes = _run(
            model_ptr, toks, recorder, n_ctx, n_batch, n_threads, k_id, v_id, flash_attn
        )
    finally:
        if owned_model is not None:
            llama_cpp.llama_model_free(owned_model)
    return _assemble(toks, layout, selected, recorder, state_bytes, n_obs, flash_attn)


def _select_layers(layout: ModelLayout, layers: Sequence[int] | None) -> tuple[int, ...]:
    if layers is None:
        return layout.full_attention_layers
    chosen = tuple(int(il) for il in layers)
    bad = [il for il in chosen if il not in layout.full_attention_layers]
    if bad or not chosen or len(set(chosen)) != len(chosen):
        raise CaptureError(
            f"layers must be distinct full-attention layers of this model "
            f"{list(layout.full_attention_layers)}; bad: {bad or list(chosen)}"
        )
    return tuple(sorted(chosen))


def _run(
    model: llama_cpp.llama_model_p,
    toks: np.ndarray,
    recorder: GraphRecorder,
    n_ctx: int,
    n_batch: int,
    n_threads: int | None,
    k_id: int,
    v_id: int,
    flash_attn: bool,
) -> bytes:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max = 1
    params.type_k, params.type_v = k_id, v_id
    params.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if flash_attn
        else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    # llama_cpp.Llama's default: half the logical cores
    threads = n_threads if n_threads is not None else max(1, (os.cpu_count() or 2) // 2)
    params.n_threads = params.n_threads_batch = threads
    callback = llama_cpp.ggml_backend_sched_eval_callback(recorder)
    params.cb_eval = callback
    params.cb_eval_user_data = None
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise CaptureError(
            f"llama.cpp could not create a context (n_ctx={n_ctx}, type_k={k_id}, type_v={v_id}, "
            f"flash_attn={flash_attn}); quantized caches need head sizes divisible by 32"
        )
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    try:
        n_tok = toks.shape[0]
        for start in range(0, n_tok, n_batch):
            chunk = toks[start : start + n_batch]
            for i, tok in enumerate(chunk):
                batch.token[i] = int(tok)
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = int(start + i == n_tok - 1)
            batch.n_tokens = len(chunk)
            recorder.chunk_start, recorder.chunk_len = start, len(chunk)
            status = llama_cpp.llama_decode(ctx, batch)
            recorder.raise_error()
            if status != 0:
                raise CaptureError(f"llama_decode failed with status {status} at token {start}")
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0) != size:
            raise CaptureError("llama_state_seq_get_data did not return the whole state")
        return bytes(buf)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def _assemble(
    toks: np.ndarray,
    layout: ModelLayout,
    selected: tuple[int, ...],
    recorder: GraphRecorder,
    state_bytes: bytes,
    n_obs: int,
    flash_attn: bool,
) -> KVCapture:
    n_tok = toks.shape[0]
    state = kvstate.parse_seq_state(state_bytes)
    expected_caches = 2 if layout.sliding_window_layers and layout.full_attention_layers else 1
    if len(state.caches) != expected_caches:
        raise CaptureError(
            f"the state holds {len(state.caches)} caches, expected {expected_caches}"
        )
    full = state.caches[0].stream
    if full.n_layer != len(layout.full_attention_layers):
        raise CaptureError(
            f"the full-attention cache holds {full.n_layer} layers but the layer pattern "
            f"gives {len(layout.full_attention_layers)}: the sliding-window split is wrong"
        )
    if not np.array_equal(full.positions, np.arange(n_tok, dtype=np.int32)):
        raise CaptureError(
            "cache cells are not positions 0..n-1 in order; cannot map slots to positions"
        )
    keys, values = full.keys_values(layout.n_kv_head)
    index = [layout.full_attention_layers.index(il) for il in selected]
    keys, values = keys[index], values[index]

    queries = None
    if n_obs:
        queries = np.stack([recorder.queries[il] for il in selected])
        if not np.isfinite(queries).all():
            raise CaptureError("some observed queries were not captured (no Qcur ROPE node seen)")
    importance = None
    if not flash_attn:
        expected_rows = len(selected) * layout.n_head * n_tok
        if recorder.mass_rows != expected_rows:
            raise CaptureError(
                f"saw {recorder.mass_rows} attention rows, expected {expected_rows} "
                "(kq_soft_max tensors missing)"
            )
        importance = recorder.mass[:n_tok].astype(np.float32)
    positions = full.positions.copy()
    query_positions = positions[n_tok - n_obs :].copy() if n_obs else None
    snapshot = KVSnapshot(
        keys=keys,
        values=values,
        positions=positions,
        importance=importance,
        queries=queries,
        query_positions=query_positions,
        layers=selected,
        attn_scale=layout.attn_scale,
        rope=layout.rope,
    )
    return KVCapture(
        keys=snapshot.keys,
        values=snapshot.values,
        positions=snapshot.positions,
        importance=snapshot.importance,
        queries=snapshot.queries,
        query_positions=snapshot.query_positions,
        layers=selected,
        head_dim=layout.head_dim,
        n_kv_head=layout.n_kv_head,
        n_head=layout.n_head,
        tokens=toks.astype(np.int32),
        layout=layout,
        snapshot=snapshot,
        state=state,
        state_bytes=state_bytes,
    )
