"""Tiny random-weight GGUF models with real tokenizers, for tests.

The runtime is tested end to end (load, tokenize, decode, chat) without a real
checkpoint: ``write_tiny_model`` writes a small ``llama`` or ``qwen2`` model whose
weights are seeded Gaussian noise and whose tokenizer metadata is copied verbatim
from the vocab-only GGUFs shipped in ``edgemerge/data/vocab``. The same seed and
shape always give the same bytes.

Weight scales follow fan-in initialisation (std ``1/sqrt(fan_in)``) rather than a
trained model's tiny values: with 0.02-scale matrices every layer would add almost
nothing to the residual stream, attention would be near uniform and the model would
only echo its last token, which makes cache and attention tests blind.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edgemerge.merging.gguf_meta import read_header

VOCAB_DIR = Path(__file__).resolve().parents[1] / "data" / "vocab"  # edgemerge/data/vocab

# Vocab-only GGUF (from llama.cpp's model collection) whose tokenizer each arch copies.
VOCAB_FILES: dict[str, str] = {
    "qwen2": "ggml-vocab-qwen2.gguf",
    "llama": "ggml-vocab-llama-spm.gguf",
}
ARCHITECTURES: tuple[str, ...] = tuple(VOCAB_FILES)
DTYPES: tuple[str, ...] = ("f32", "f16")

# Values of the real model families, so RoPE behaves as in the models we ship.
_ROPE_FREQ_BASE = {"qwen2": 1_000_000.0, "llama": 10_000.0}
_RMS_NORM_EPS = {"qwen2": 1e-6, "llama": 1e-5}

# Used only when the vocab file carries no template, so that chat-completion paths
# (which need one) work on every tiny model.
_FALLBACK_CHAT_TEMPLATES = {
    "qwen2": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}"
        "{{ '[INST] <<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}"
        "{% elif message['role'] == 'user' %}"
        "{% if loop.first or messages[loop.index0 - 1]['role'] != 'system' %}"
        "{{ '[INST] ' }}{% endif %}"
        "{{ message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ ' ' + message['content'] + ' ' + eos_token }}"
        "{% endif %}"
        "{% endfor %}"
    ),
}

# Standard deviations of the non-fan-in parameters.
_NORM_WEIGHT_STD = 0.1  # norm gains are 1 + this much noise
_QKV_BIAS_STD = 0.2
_TOKEN_EMBD_STD = 1.0
# Output head scaled so that logits have a standard deviation of about this much:
# peaked enough for greedy decoding to be stable, flat enough for sampling to vary.
_LOGIT_STD = 2.0


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape and seed of a tiny model; validated on construction.

    ``dtype`` is the storage type of the 2-D weight matrices ("f32" or "f16");
    norm gains and biases are always f32, as in llama.cpp's own conversions.
    ``chat_template=False`` writes no ``tokenizer.chat_template``, as a base model's
    GGUF has none (Gemma 3 270M as shipped).
    """

    arch: str = "qwen2"
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx_train: int = 4096
    seed: int = 0
    dtype: str = "f32"
    chat_template: bool = True

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(
                f"arch={self.arch!r} is not supported; choose one of {', '.join(ARCHITECTURES)}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; choose one of {DTYPES}")
        for field in ("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_ctx_train"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.chat_template, bool):
            raise ValueError(f"chat_template must be True or False, got {self.chat_template!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                "the head size is n_embd / n_head"
            )
        if self.n_head % self.n_head_kv != 0:
            raise ValueError(
                f"n_head_kv ({self.n_head_kv}) must divide n_head ({self.n_head}): "
                "each KV head serves a whole group of query heads"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"n_embd / n_head = {self.head_dim} must be even: RoPE rotates pairs of "
                "head dimensions; change n_embd or n_head"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_embd_kv(self) -> int:
        """Width of one layer's K (and V) rows: n_head_kv * head_dim."""
        return self.n_head_kv * self.head_dim


def write_tiny_model(
    path: str | os.PathLike[str],
    arch: str = "qwen2",
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 4096,
    seed: int = 0,
    dtype: str = "f32",
    chat_template: bool = True,
) -> Path:
    """Write a random-weight ``arch`` GGUF with a real tokenizer to ``path``; return it.

    Raises:
        ValueError: an argument is out of range (the message names it).
    """
    config = TinyModelConfig(
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        n_ctx_train=n_ctx_train,
        seed=seed,
        dtype=dtype,
        chat_template=chat_template,
    )
    return write_tiny_model_from_config(path, config)


def write_tiny_model_from_config(path: str | os.PathLike[str], config: TinyModelConfig) -> Path:
    """Write the model that ``config`` describes to ``path`` (parents created); return it.

    The file appears atomically: a reader never sees a half-written model.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_metadata(config.arch)
    n_vocab = len(tokenizer["tokenizer.ggml.tokens"][1])
    fd, partial_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    partial = Path(partial_name)
    writer = gguf.GGUFWriter(partial, config.arch)
    try:
        _add_model_metadata(writer, config, n_vocab)
        if not config.chat_template:
            tokenizer.pop("tokenizer.chat_template", None)
        for key, (vtype, value, sub_type) in tokenizer.items():
            writer.add_key_value(key, value, vtype, sub_type)
        if config.chat_template and "tokenizer.chat_template" not in tokenizer:
            writer.add_chat_template(_FALLBACK_CHAT_TEMPLATES[config.arch])
        for name, tensor in _random_tensors(config, n_vocab):
            writer.add_tensor(name, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(partial, path)
    return path


def vocab_path(arch: str) -> Path:
    """The vocab-only GGUF whose tokenizer ``arch`` models copy."""
    if arch not in VOCAB_FILES:
        raise ValueError(
            f"arch={arch!r} is not supported; choose one of {', '.join(ARCHITECTURES)}"
        )
    path = VOCAB_DIR / VOCAB_FILES[arch]
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {path} is missing; reinstall edgemerge (it ships as package data)"
        )
    return path


def tokenizer_metadata(arch: str) -> dict[str, tuple[gguf.GGUFValueType, Any, Any]]:
    """Every ``tokenizer.*`` key of ``arch``'s vocab GGUF: key -> (type, value, item type).

    Strings are returned as raw bytes so that they are copied byte for byte.
    """
    return dict(_read_tokenizer_metadata(vocab_path(arch)))


@lru_cache(maxsize=len(VOCAB_FILES))
def _read_tokenizer_metadata(
    path: Path,
) -> tuple[tuple[str, tuple[gguf.GGUFValueType, Any, Any]], ...]:
    return tuple(
        (key, entry) for key, entry in _read_gguf_metadata(path) if key.startswith("tokenizer.")
    )


def _add_model_metadata(writer: gguf.GGUFWriter, config: TinyModelConfig, n_vocab: int) -> None:
    writer.add_name(f"edgemerge-tiny-{config.arch}")
    writer.add_description(
        f"random weights (seed {config.seed}) for tests; "
        + ", ".join(f"{k}={v}" for k, v in asdict(config).items())
    )
    writer.add_file_type(
        gguf.LlamaFileType.ALL_F32 if config.dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    )
    writer.add_context_length(config.n_ctx_train)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.n_ff)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_head_kv)
    writer.add_rope_freq_base(_ROPE_FREQ_BASE[config.arch])
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(_RMS_NORM_EPS[config.arch])
    writer.add_vocab_size(n_vocab)


def _random_tensors(config: TinyModelConfig, n_vocab: int) -> list[tuple[str, np.ndarray]]:
    """All tensors in file order. numpy shapes are (rows, cols) = ggml's {cols, rows}."""
    rng = np.random.default_rng(config.seed)
    matrix_dtype = np.float32 if config.dtype == "f32" else np.float16

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    def matrix(n_out: int, n_in: int, std: float | None = None) -> np.ndarray:
        scale = std if std is not None else 1.0 / math.sqrt(n_in)
        return normal((n_out, n_in), scale).astype(matrix_dtype)

    def norm_gain(n: int) -> np.ndarray:
        return 1.0 + normal((n,), _NORM_WEIGHT_STD)

    def name(tensor: gguf.MODEL_TENSOR, suffix: str, block: int | None = None) -> str:
        base = gguf.TENSOR_NAMES[tensor]
        return (base.format(bid=block) if block is not None else base) + "." + suffix

    c = config
    T = gguf.MODEL_TENSOR
    tensors = [
        (name(T.TOKEN_EMBD, "weight"), matrix(n_vocab, c.n_embd, _TOKEN_EMBD_STD)),
        (name(T.OUTPUT_NORM, "weight"), norm_gain(c.n_embd)),
        # A separate head rather than tied embeddings: tied logits favour the
        # current token's own embedding, so the model would mostly repeat itself.
        (name(T.OUTPUT, "weight"), matrix(n_vocab, c.n_embd, _LOGIT_STD / math.sqrt(c.n_embd))),
    ]
    for i in range(c.n_layer):
        tensors += [
            (name(T.ATTN_NORM, "weight", i), norm_gain(c.n_embd)),
            (name(T.ATTN_Q, "weight", i), matrix(c.n_embd, c.n_embd)),
            (name(T.ATTN_K, "weight", i), matrix(c.n_embd_kv, c.n_embd)),
            (name(T.ATTN_V, "weight", i), matrix(c.n_embd_kv, c.n_embd)),
        ]
        if c.arch == "qwen2":
            tensors += [
                (name(T.ATTN_Q, "bias", i), normal((c.n_embd,), _QKV_BIAS_STD)),
                (name(T.ATTN_K, "bias", i), normal((c.n_embd_kv,), _QKV_BIAS_STD)),
                (name(T.ATTN_V, "bias", i), normal((c.n_embd_kv,), _QKV_BIAS_STD)),
            ]
        tensors += [
            (name(T.ATTN_OUT, "weight", i), matrix(c.n_embd, c.n_embd)),
            (name(T.FFN_NORM, "weight", i), norm_gain(c.n_embd)),
            (name(T.FFN_GATE, "weight", i), matrix(c.n_ff, c.n_embd)),
            (name(T.FFN_UP, "weight", i), matrix(c.n_ff, c.n_embd)),
            (name(T.FFN_DOWN, "weight", i), matrix(c.n_embd, c.n_ff)),
        ]
    return tensors


def _read_gguf_metadata(path: Path) -> list[tuple[str, tuple[gguf.GGUFValueType, Any, Any]]]:
    """All key/value pairs of a GGUF file, strings as bytes (:mod:`edgemerge.merging.gguf_meta`)."""
    return list(read_header(path).kvs.items())
