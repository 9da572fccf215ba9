"""Load a compressed KV state into a real llama.cpp context and score the tokens after it.

The harness captures KV with flash attention off (only then does llama.cpp materialise
the attention probabilities that give H2O-style importance), which stores V transposed.
Scoring runs with flash attention on, because on CPU it is about twice as fast, so
every state is rewritten with row-major V first (:func:`row_major_v`; f16 bytes are
only reordered, nothing is rounded). All methods, ``full`` included, are scored the
same way.
"""

from __future__ import annotations

import ctypes
import os

# edgemerge/__init__.py has already run (this is a submodule), so llama_cpp loads
# edgemerge's patched libllama.
import llama_cpp
import numpy as np

from edgemerge.methods.base import CompressedKV
from edgemerge.native import kvstate
from edgemerge.reference import ggml_quants


class ScoringError(RuntimeError):
    """llama.cpp refused a state or a batch."""


def row_major_v(state: kvstate.SeqState) -> kvstate.SeqState:
    """``state`` with every transposed V stored row by row (as flash attention keeps it).

    Raises:
        kvstate.KVStateError: a transposed V of a block type (cannot happen: llama.cpp
            only transposes f32/f16/bf16 V).
    """
    for index, cache in enumerate(state.caches):
        stream = cache.stream
        if not stream.v_trans:
            continue
        layers = []
        for layer in stream.layers:
            width, n_cells, el_bytes = layer.v.shape
            rows = np.ascontiguousarray(layer.v.transpose(1, 0, 2)).reshape(
                n_cells, width * el_bytes
            )
            layers.append(kvstate.LayerKV(layer.k_type, layer.k, layer.v_type, rows))
        flat = kvstate.StreamKV(
            stream.positions,
            stream.seq_ids,
            False,
            tuple(layers),
            stream.ext,
            stream.bias,
            stream.spans,
        )
        state = kvstate.with_stream(state, flat, index)
    return state


def compressed_state(base: kvstate.SeqState, compressed: CompressedKV) -> bytes:
    """``base`` with its full-attention cache (cache 0) replaced by the compressed cells.

    Bias and spans are written only when some cell has them (a merge section needs the
    patched libllama, and a state without one is byte-identical to llama.cpp's own).
    """
    plain = not compressed.bias.any() and np.array_equal(
        compressed.span, np.stack([compressed.positions, compressed.positions], axis=1)
    )
    state = kvstate.with_kv(
        base,
        compressed.keys,
        compressed.values,
        compressed.positions,
        0,
        bias=None if plain else compressed.bias,
        spans=None if plain else compressed.span,
    )
    return kvstate.write_seq_state(state)


def new_context(
    model: llama_cpp.llama_model_p,
    n_ctx: int,
    *,
    n_batch: int,
    n_threads: int | None,
    flash_attn: bool,
    cache_type: str = "f16",
    cb_eval: object | None = None,
) -> llama_cpp.llama_context_p:
    """A one-sequence llama.cpp context (``cb_eval``: a graph eval callback to install,
    which the caller must keep alive as long as the context).

    Raises:
        ScoringError: llama.cpp could not create it.
    """
    params = llama_cpp.llama_context_default_params()
    # states restore only into a cache of their own type
    params.type_k = params.type_v = ggml_quants.ggml_type(cache_type).type_id
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max = 1
    params.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if flash_attn
        else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    threads = n_threads if n_threads is not None else max(1, os.cpu_count() or 1)
    params.n_threads = params.n_threads_batch = threads
    if cb_eval is not None:
        params.cb_eval = cb_eval
        params.cb_eval_user_data = None
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise ScoringError(
            f"llama.cpp could not create a context of {n_ctx} cells ({cache_type} cache, "
            f"flash attention {'on' if flash_attn else 'off'})"
        )
    return ctx


def decode_chunk(
    ctx: llama_cpp.llama_context_p,
    batch: llama_cpp.llama_batch,
    tokens: np.ndarray,
    first_pos: int,
    *,
    all_logits: bool,
) -> None:
    """Decode ``tokens`` (at most the batch's size) as sequence 0 from ``first_pos`` on,
    asking for the logits of every token or of the last one only.

    Raises:
        ScoringError: llama_decode failed (e.g. the context is full).
    """
    for i, tok in enumerate(tokens):
        batch.token[i] = int(tok)
        batch.pos[i] = first_pos + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = int(all_logits or i == len(tokens) - 1)
    batch.n_tokens = len(tokens)
    status = llama_cpp.llama_decode(ctx, batch)
    if status != 0:
        raise ScoringError(
            f"llama_decode failed with status {status} at position {first_pos} (1: the "
            "context has no room for the batch)"
        )


class ContextSession:
    """A llama.cpp context and batch owned by this object: closing, ``with``, restoring.

    Subclasses set ``self.ctx`` (from :func:`new_context`) and ``self.batch``.
    """

    ctx: llama_cpp.llama_context_p
    batch: llama_cpp.llama_batch

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> ContextSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load(self, state: bytes) -> None:
        """Empty the context and restore ``state`` as sequence 0.

        Raises:
            ScoringError: llama.cpp rejected the state (its log says why).
        """
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if llama_cpp.llama_state_seq_set_data(self.ctx, buf, len(state), 0) != len(state):
            raise ScoringError(
                "llama_state_seq_set_data rejected the state (run with verbose llama.cpp "
                "logging to see why; the context may be too small for its cells)"
            )


class Scorer(ContextSession):
    """A flash-attention context that restores states and scores or generates after them.

    ``cache_type``: the KV cache type (``"f16"``, ``"q8_0"``, ...) of the states it loads.
    """

    def __init__(
        self,
        model: llama_cpp.llama_model_p,
        n_ctx: int,
        *,
        n_batch: int = 256,
        n_threads: int | None = None,
        cache_type: str = "f16",
    ) -> None:
        self.ctx = new_context(
            model,
            n_ctx,
            n_batch=n_batch,
            n_threads=n_threads,
            flash_attn=True,
            cache_type=cache_type,
        )
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def nll(self, state: bytes | None, feed: np.ndarray, first_pos: int) -> np.ndarray:
        """Negative log-likelihood of ``feed[1:]``, each predicted after the tokens before it.

        Args:
            state: a sequence state to restore first; None: start from an empty cache.
            feed: int tokens decoded at positions ``first_pos, first_pos + 1, ...``.
            first_pos: must be one past the last position the state holds.

        Returns:
            float64 ``[len(feed) - 1]`` in nats.

        Raises:
            ScoringError: the state is rejected, the tokens do not fit the context, or
                a decode fails (llama.cpp also fails when ``first_pos`` does not follow
                the state's last position).
        """
        feed = np.asarray(feed, dtype=np.int64)
        if feed.ndim != 1 or feed.shape[0] < 2:
            raise ScoringError("feed needs at least two tokens (one context token, one scored)")
        if state is None:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        else:
            self.load(state)
        out = np.empty(feed.shape[0] - 1, dtype=np.float64)
        for start in range(0, feed.shape[0] - 1, self.n_batch):
            chunk = feed[start : min(start + self.n_batch, feed.shape[0] - 1)]
            decode_chunk(self.ctx, self.batch, chunk, first_pos + start, all_logits=True)
            ptr = llama_cpp.llama_get_logits(self.ctx)
            logits = np.ctypeslib.as_array(ptr, shape=(len(chunk), self.n_vocab))
            targets = feed[start + 1 : start + 1 + len(chunk)]
            out[start : start + len(chunk)] = _nll_rows(logits, targets)
        return out

    def _decode(self, tokens: np.ndarray, first_pos: int, *, all_logits: bool) -> np.ndarray:
        """Decode ``tokens`` from ``first_pos`` on; the logits of every token or of the last.

        Returns:
            float32 ``[n, n_vocab]`` (a view into llama.cpp's buffer: copy before the next
            decode) with ``n = len(tokens)`` or 1.
        """
        rows = 0
        for start in range(0, tokens.shape[0], self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            decode_chunk(self.ctx, self.batch, chunk, first_pos + start, all_logits=all_logits)
            rows = len(chunk) if all_logits else 1
        ptr = llama_cpp.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(rows, self.n_vocab))

    def generate(
        self,
        state: bytes | None,
        prompt: np.ndarray,
        first_pos: int,
        max_new_tokens: int,
        *,
        stop: frozenset[int] = frozenset(),
    ) -> list[int]:
        """Greedy continuation of ``prompt`` decoded after ``state``.

        Args:
            state: a sequence state to restore first; None: start from an empty cache.
            prompt: int tokens (at least one) decoded at ``first_pos, first_pos + 1, ...``.
            first_pos: one past the last position the state holds.
            max_new_tokens: how many tokens to generate at most.
            stop: token ids that end the generation (not included in the result).

        Returns:
            the generated token ids (greedy: argmax of the logits, ties to the lowest id).

        Raises:
            ScoringError: the state is rejected or a decode fails (for instance when the
                state, the prompt and the new tokens do not fit the context).
        """
        return self._greedy(state, prompt, first_pos, max_new_tokens, stop)[0]

    def _greedy(
        self,
        state: bytes | None,
        prompt: np.ndarray,
        first_pos: int,
        max_new_tokens: int,
        stop: frozenset[int],
    ) -> tuple[list[int], np.ndarray]:
        """Restore ``state``, decode ``prompt``, generate greedily; returns the tokens and
        the prompt's last logits ``[1, n_vocab]``."""
        prompt = np.asarray(prompt, dtype=np.int64)
        if prompt.ndim != 1 or prompt.shape[0] < 1:
            raise ScoringError("prompt needs at least one token (the logits come from it)")
        if state is None:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        else:
            self.load(state)
        out: list[int] = []
        logits = self._decode(prompt, first_pos, all_logits=False)
        prompt_logits = logits[-1:].copy()  # later decodes may reuse the buffer
        pos = first_pos + prompt.shape[0]
        while len(out) < max_new_tokens:
            token = int(np.argmax(logits[-1]))
            if token in stop:
                break
            out.append(token)
            if len(out) == max_new_tokens:
                break
            logits = self._decode(np.asarray([token]), pos, all_logits=False)
            pos += 1
        return out, prompt_logits

    def generate_and_force(
        self,
        state: bytes | None,
        prompt: np.ndarray,
        first_pos: int,
        max_new_tokens: int,
        answer: np.ndarray,
        *,
        stop: frozenset[int] = frozenset(),
    ) -> tuple[list[int], np.ndarray]:
        """:meth:`generate`, then the answer teacher-forced after the prompt: one restore.

        After the greedy tokens the cache is cut back to the end of the prompt and
        ``answer[:-1]`` is decoded there; ``answer[0]`` is scored on the prompt's
        logits, kept from the first decode.

        Returns:
            the generated token ids, and float64 ``[len(answer)]``: each answer token's
            NLL in nats.

        Raises:
            ScoringError: as :meth:`generate`, or an empty ``answer``.
        """
        answer = np.asarray(answer, dtype=np.int64)
        if answer.ndim != 1 or answer.shape[0] < 1:
            raise ScoringError("answer needs at least one token to score")
        out, prompt_logits = self._greedy(state, prompt, first_pos, max_new_tokens, stop)
        first = _nll_rows(prompt_logits, answer[:1])
        end = first_pos + len(prompt)
        if answer.shape[0] == 1:
            return out, first
        # rewind: drop the generated tokens, then force the answer after the prompt
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ctx), 0, end, -1)
        rest = self._decode(answer[:-1], end, all_logits=True)
        return out, np.concatenate([first, _nll_rows(rest, answer[1:])])


def _nll_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64."""
    rows = logits.astype(np.float64)
    top = rows.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0]
    return log_z - rows[np.arange(rows.shape[0]), targets]
