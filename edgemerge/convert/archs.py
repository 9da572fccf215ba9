"""What each supported architecture is in GGUF: hyper-parameters, tensor names, transforms.

Facts that the GGUF runtime relies on (checked against llama.cpp's model loaders):

- Tensor names follow ``gguf.TENSOR_NAMES`` (``blk.N.attn_q.weight``...). A numpy
  array of shape (rows, cols) is a ggml tensor {cols, rows}: HF's (out, in) Linear
  layout is already what llama.cpp multiplies with.
- llama uses "normal" RoPE, which rotates adjacent pairs (2i, 2i+1) of a head, while HF
  Llama checkpoints rotate halves (i, i + d/2). The rows of q_proj and k_proj (and
  their biases) are therefore interleaved per head: new row 2i is old row i, new row
  2i + 1 is old row i + d/2. Qwen2 and Gemma 3 use NEOX RoPE (halves) in llama.cpp
  too and are written as they are.
- Gemma 3's RMSNorm multiplies by ``1 + w``; llama.cpp multiplies by the stored
  weight, so every Gemma 3 norm weight is written as ``w + 1``. Its embedding is
  scaled by sqrt(n_embd) in the graph, the output head is the tied embedding, and
  the query scale is 1/sqrt(head_dim) (n_embd/n_head for the 62-layer 27B); a
  ``query_pre_attn_scalar`` that disagrees cannot be represented and is rejected.
  Embedding rows past the tokenizer's vocabulary are dropped, as llama.cpp does.
- Llama 3 "llama3" RoPE scaling is stored as a ``rope_freqs`` tensor of per-frequency
  divisors; "linear" and "yarn" scaling as ``rope.scaling.*`` keys.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

from edgemerge.convert.errors import CheckpointError, TensorMismatchError, UnsupportedModelError
from edgemerge.convert.hf import FLOAT_DTYPES, Checkpoint

T = gguf.MODEL_TENSOR

# HF class -> GGUF architecture.
HF_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",
}
_MULTIMODAL_PREFIXES = ("vision_tower.", "multi_modal_projector.")
_ALWAYS_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: where it comes from and how it is changed on the way.

    ``source`` is the HF tensor name (None for a generated tensor, whose ``data`` is
    given); ``transform`` maps the float32 HF array to the GGUF array of
    ``out_shape``; ``matrix`` tensors take the output type, the rest stay float32.
    """

    name: str
    source: str | None
    out_shape: tuple[int, ...]
    matrix: bool
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    data: np.ndarray | None = None


@dataclass(frozen=True)
class Hparams:
    """The hyper-parameters read from config.json, validated."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    vocab_size: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    tie_embeddings: bool
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    # gemma3
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = field(default_factory=tuple)
    rope_theta_swa: float | None = None
    final_logit_softcapping: float | None = None


def architecture_of(ckpt: Checkpoint) -> str:
    """The GGUF architecture of ``ckpt``; UnsupportedModelError when there is none."""
    arch = HF_ARCHITECTURES.get(ckpt.architecture)
    if arch is None:
        supported = ", ".join(f"{hf} ({gg})" for hf, gg in HF_ARCHITECTURES.items())
        raise UnsupportedModelError(
            f"{ckpt.directory / 'config.json'}: architecture {ckpt.architecture or '(none)'!r} "
            f"is not supported; edgemerge convert supports {supported}"
        )
    return arch


def read_hparams(arch: str, config: dict[str, Any]) -> Hparams:
    """Hyper-parameters of ``arch`` from ``config``; errors name the key at fault."""
    if config.get("quantization_config"):
        method = config["quantization_config"]
        method = method.get("quant_method", "?") if isinstance(method, dict) else method
        raise UnsupportedModelError(
            f"config.json: the checkpoint is quantized ({method}); convert the unquantized "
            "model and use --quantize instead"
        )
    try:
        return _read_hparams(arch, config)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"config.json has a malformed value ({type(exc).__name__}: {exc})"
        ) from exc


def _read_hparams(arch: str, config: dict[str, Any]) -> Hparams:
    get = _ConfigReader(config)
    n_embd = get.int("hidden_size")
    n_head = get.int("num_attention_heads")
    n_head_kv = get.int("num_key_value_heads", n_head)
    if n_head % n_head_kv:
        raise CheckpointError(
            f"config.json: num_key_value_heads={n_head_kv} does not divide "
            f"num_attention_heads={n_head}"
        )
    default_head_dim = 256 if arch == "gemma3" else n_embd // n_head
    head_dim = get.int("head_dim", default_head_dim)
    if head_dim % 2:
        raise CheckpointError(f"config.json: head_dim={head_dim} must be even for RoPE")
    if get.float("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("config.json: partial_rotary_factor != 1 is not supported")
    rope_params = config.get("rope_parameters")
    if isinstance(rope_params, dict) and "full_attention" in rope_params:
        full, local = rope_params["full_attention"], rope_params.get("sliding_attention", {})
    elif isinstance(rope_params, dict):
        full, local = rope_params, {}
    else:
        full, local = {}, {}
    rope_theta = float(full.get("rope_theta", get.float("rope_theta", _ROPE_THETA[arch])))
    scaling = config.get("rope_scaling")
    if scaling is None and full.get("rope_type") not in (None, "default"):
        scaling = full
    hp = dict(
        arch=arch,
        n_layer=get.int("num_hidden_layers"),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ff=get.int("intermediate_size"),
        vocab_size=get.int("vocab_size"),
        n_ctx=get.int("max_position_embeddings", 131072 if arch == "gemma3" else 4096),
        rms_eps=get.float("rms_norm_eps", 1e-6 if arch != "llama" else 1e-5),
        rope_theta=rope_theta,
        tie_embeddings=get.bool("tie_word_embeddings", arch == "gemma3"),
        rope_scaling=_rope_scaling(scaling),
    )
    activation = config.get("hidden_activation", config.get("hidden_act"))
    if arch in ("llama", "qwen2"):
        if activation not in (None, "silu"):
            raise UnsupportedModelError(
                f"config.json: hidden_act={activation!r}; {arch} needs silu"
            )
        if arch == "llama":
            hp["attention_bias"] = get.bool("attention_bias", False)
            if get.bool("mlp_bias", False):
                raise UnsupportedModelError("config.json: mlp_bias=true is not supported")
        if arch == "qwen2" and get.bool("use_sliding_window", False):
            raise UnsupportedModelError(
                "config.json: use_sliding_window=true; llama.cpp's qwen2 has no sliding window"
            )
        return Hparams(**hp)
    # gemma3
    if activation not in (None, "gelu_pytorch_tanh"):
        raise UnsupportedModelError(
            f"config.json: hidden_activation={activation!r}; gemma3 needs gelu_pytorch_tanh"
        )
    if config.get("attn_logit_softcapping") is not None:
        raise UnsupportedModelError("config.json: attn_logit_softcapping is not used by Gemma 3")
    scalar = get.float("query_pre_attn_scalar", float(head_dim))
    llama_cpp_base = n_embd / n_head if hp["n_layer"] == 62 else head_dim
    if not math.isclose(scalar, llama_cpp_base):
        raise UnsupportedModelError(
            f"config.json: query_pre_attn_scalar={scalar:g}, but llama.cpp scales Gemma 3 "
            f"queries by 1/sqrt({llama_cpp_base:g}); this model cannot be represented"
        )
    window = config.get("sliding_window")
    hp["sliding_window"] = int(window) if window else None
    hp["sliding_layers"] = _gemma3_sliding_layers(config, hp["n_layer"], hp["sliding_window"])
    hp["rope_theta_swa"] = float(
        local.get("rope_theta", get.float("rope_local_base_freq", 10000.0))
    )
    cap = config.get("final_logit_softcapping")
    hp["final_logit_softcapping"] = float(cap) if cap else None
    return Hparams(**hp)


_ROPE_THETA = {"llama": 10000.0, "qwen2": 10000.0, "gemma3": 1_000_000.0}


class _ConfigReader:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def _value(self, key: str, default: Any) -> Any:
        if key in self.config and self.config[key] is not None:
            return self.config[key]
        if default is _MISSING:
            raise CheckpointError(
                f"config.json has no {key}; the checkpoint's config is incomplete"
            )
        return default

    def int(self, key: str, default: Any = None) -> int:
        value = self._value(key, _MISSING if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"config.json: {key}={value!r} must be a positive integer")
        return value

    def float(self, key: str, default: float) -> float:
        value = self._value(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"config.json: {key}={value!r} must be a number")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self._value(key, default)
        if not isinstance(value, bool):
            raise CheckpointError(f"config.json: {key}={value!r} must be true or false")
        return value


_MISSING = object()


def _rope_scaling(scaling: Any) -> dict[str, Any] | None:
    if not isinstance(scaling, dict):
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ("linear", "yarn", "llama3"):
        raise UnsupportedModelError(
            f"config.json: rope_scaling type {kind!r} is not supported (linear, yarn, llama3 are)"
        )
    if not isinstance(scaling.get("factor"), (int, float)):
        raise CheckpointError(f"config.json: rope_scaling {kind} needs a numeric factor")
    return dict(scaling, rope_type=kind)


def _gemma3_sliding_layers(config: dict[str, Any], n_layer: int, window: int | None) -> tuple:
    if window is None:
        return (False,) * n_layer
    types = config.get("layer_types")
    if isinstance(types, list):
        if len(types) != n_layer or not set(types) <= {"sliding_attention", "full_attention"}:
            raise CheckpointError(
                f"config.json: layer_types must list {n_layer} entries of sliding_attention / "
                "full_attention"
            )
        return tuple(t == "sliding_attention" for t in types)
    pattern = int(config.get("sliding_window_pattern") or 6)
    return tuple((il + 1) % pattern != 0 for il in range(n_layer))


def default_sliding_layers(n_layer: int) -> tuple[bool, ...]:
    """llama.cpp's Gemma 3 layout when the GGUF lists none: 5 sliding layers, then 1 full."""
    return tuple(il % 6 < 5 for il in range(n_layer))


# -- tensor plans ------------------------------------------------------------------------


def normalise_name(name: str) -> str:
    """HF tensor name with a multimodal wrapper's prefix removed."""
    if name.startswith("language_model.model."):
        return "model." + name[len("language_model.model.") :]
    if name.startswith("language_model.lm_head."):
        return name[len("language_model.") :]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    return name


def plan_tensors(
    ckpt: Checkpoint, hp: Hparams, n_vocab_out: int
) -> tuple[list[PlannedTensor], list[str]]:
    """Every GGUF tensor of the model, checked against the checkpoint.

    Returns the plan and the checkpoint tensors deliberately left out. Raises
    TensorMismatchError for a missing tensor, a shape that disagrees with config.json,
    or a tensor this architecture does not have.
    """
    names = {normalise_name(n): n for n in ckpt.tensors}
    multimodal = ckpt.architecture.endswith("ForConditionalGeneration")
    plan: list[PlannedTensor] = []
    expected: dict[str, tuple[int, ...]] = {}

    def gname(kind: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = "weight") -> str:
        base = gguf.TENSOR_NAMES[kind]
        return (base.format(bid=bid) if bid is not None else base) + "." + suffix

    def add(
        kind: gguf.MODEL_TENSOR,
        hf: str,
        shape: tuple[int, ...],
        bid: int | None = None,
        suffix: str = "weight",
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        out_shape: tuple[int, ...] | None = None,
    ) -> None:
        expected[hf] = shape
        plan.append(
            PlannedTensor(
                name=gname(kind, bid, suffix),
                source=names.get(hf, hf),
                out_shape=out_shape or shape,
                matrix=len(shape) == 2,
                transform=transform,
            )
        )

    gemma = hp.arch == "gemma3"
    norm = _plus_one if gemma else None
    q_rows, kv_rows = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    permute_q = permute_k = None
    if hp.arch == "llama":
        permute_q = _rope_interleave(hp.n_head)
        permute_k = _rope_interleave(hp.n_head_kv)

    embd_shape = (hp.vocab_size, hp.n_embd)
    if n_vocab_out < hp.vocab_size:
        add(
            T.TOKEN_EMBD,
            "model.embed_tokens.weight",
            embd_shape,
            transform=lambda a: a[:n_vocab_out],
            out_shape=(n_vocab_out, hp.n_embd),
        )
    else:
        add(T.TOKEN_EMBD, "model.embed_tokens.weight", embd_shape)
    add(T.OUTPUT_NORM, "model.norm.weight", (hp.n_embd,), transform=norm)
    if not hp.tie_embeddings:
        add(T.OUTPUT, "lm_head.weight", embd_shape)
    for i in range(hp.n_layer):
        p = f"model.layers.{i}."
        add(T.ATTN_NORM, p + "input_layernorm.weight", (hp.n_embd,), i, transform=norm)
        add(T.ATTN_Q, p + "self_attn.q_proj.weight", (q_rows, hp.n_embd), i, transform=permute_q)
        add(T.ATTN_K, p + "self_attn.k_proj.weight", (kv_rows, hp.n_embd), i, transform=permute_k)
        add(T.ATTN_V, p + "self_attn.v_proj.weight", (kv_rows, hp.n_embd), i)
        add(T.ATTN_OUT, p + "self_attn.o_proj.weight", (hp.n_embd, q_rows), i)
        if hp.arch == "qwen2" or hp.attention_bias:
            add(T.ATTN_Q, p + "self_attn.q_proj.bias", (q_rows,), i, "bias", permute_q)
            add(T.ATTN_K, p + "self_attn.k_proj.bias", (kv_rows,), i, "bias", permute_k)
            add(T.ATTN_V, p + "self_attn.v_proj.bias", (kv_rows,), i, "bias")
        if hp.attention_bias:
            add(T.ATTN_OUT, p + "self_attn.o_proj.bias", (hp.n_embd,), i, "bias")
        if gemma:
            add(T.ATTN_Q_NORM, p + "self_attn.q_norm.weight", (hp.head_dim,), i, transform=norm)
            add(T.ATTN_K_NORM, p + "self_attn.k_norm.weight", (hp.head_dim,), i, transform=norm)
            add(
                T.ATTN_POST_NORM,
                p + "post_attention_layernorm.weight",
                (hp.n_embd,),
                i,
                transform=norm,
            )
            add(T.FFN_NORM, p + "pre_feedforward_layernorm.weight", (hp.n_embd,), i, transform=norm)
            add(
                T.FFN_POST_NORM,
                p + "post_feedforward_layernorm.weight",
                (hp.n_embd,),
                i,
                transform=norm,
            )
        else:
            add(T.FFN_NORM, p + "post_attention_layernorm.weight", (hp.n_embd,), i)
        add(T.FFN_GATE, p + "mlp.gate_proj.weight", (hp.n_ff, hp.n_embd), i)
        add(T.FFN_UP, p + "mlp.up_proj.weight", (hp.n_ff, hp.n_embd), i)
        add(T.FFN_DOWN, p + "mlp.down_proj.weight", (hp.n_embd, hp.n_ff), i)
    if hp.rope_scaling is not None and hp.rope_scaling["rope_type"] == "llama3":
        factors = llama3_rope_factors(hp.rope_theta, hp.head_dim, hp.rope_scaling)
        plan.append(PlannedTensor(gname(T.ROPE_FREQS), None, factors.shape, False, data=factors))

    missing = [hf for hf in expected if hf not in names]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise TensorMismatchError(
            f"{ckpt.directory}: tensor(s) missing from the safetensors files: "
            f"{', '.join(missing[:5])}{more}; the checkpoint is incomplete or not a "
            f"{ckpt.architecture}"
        )
    for hf, shape in expected.items():
        source = ckpt.tensors[names[hf]]
        if source.dtype not in FLOAT_DTYPES:
            raise UnsupportedModelError(
                f"tensor {names[hf]} is stored as {source.dtype}; only float weights "
                f"({', '.join(FLOAT_DTYPES)}) are converted"
            )
        actual = source.shape
        if actual != shape:
            raise TensorMismatchError(
                f"tensor {names[hf]} has shape {list(actual)} but config.json implies "
                f"{list(shape)} ({_shape_hint(hp)}); the weights and config.json disagree"
            )
    ignored, unexpected = [], []
    for norm_name, original in names.items():
        if norm_name in expected:
            continue
        if (
            _ALWAYS_IGNORED.search(norm_name)
            or (norm_name == "lm_head.weight" and hp.tie_embeddings)
            or (multimodal and _is_multimodal_extra(norm_name))
        ):
            ignored.append(original)
        else:
            unexpected.append(original)
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise TensorMismatchError(
            f"{ckpt.directory}: tensor(s) that a {ckpt.architecture} does not have: "
            f"{', '.join(sorted(unexpected)[:5])}{more}; the model is a variant this converter "
            "does not write"
        )
    return plan, ignored


def _is_multimodal_extra(name: str) -> bool:
    bare = name[len("model.") :] if name.startswith("model.") else name
    return bare.startswith(_MULTIMODAL_PREFIXES)


def _shape_hint(hp: Hparams) -> str:
    return (
        f"hidden_size={hp.n_embd}, num_attention_heads={hp.n_head}, "
        f"num_key_value_heads={hp.n_head_kv}, head_dim={hp.head_dim}, "
        f"intermediate_size={hp.n_ff}, vocab_size={hp.vocab_size}"
    )


def _plus_one(a: np.ndarray) -> np.ndarray:
    return a + np.float32(1.0)


def _rope_interleave(n_head: int) -> Callable[[np.ndarray], np.ndarray]:
    """Rows of each head from HF's halves order (i, i + d/2) to adjacent pairs (2i, 2i+1)."""

    def permute(a: np.ndarray) -> np.ndarray:
        rows = a.shape[0]
        return (
            a.reshape(n_head, 2, rows // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        )

    return permute


def llama3_rope_factors(theta: float, head_dim: int, scaling: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors of Llama 3 RoPE scaling (HF's "llama3" rope type).

    Long wavelengths are slowed by ``factor``, short ones kept, and the band between
    ``original / low_freq_factor`` and ``original / high_freq_factor`` blended smoothly.
    """
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2.0 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    scaled = np.where(
        wavelen > original / low,
        inv_freq / factor,
        np.where(
            wavelen < original / high,
            inv_freq,
            (1 - smooth) * inv_freq / factor + smooth * inv_freq,
        ),
    )
    return (inv_freq / scaled).astype(np.float32)


# -- metadata ----------------------------------------------------------------------------


def add_model_metadata(writer: gguf.GGUFWriter, hp: Hparams, n_vocab: int) -> None:
    """The ``<arch>.*`` hyper-parameter keys."""
    a = hp.arch
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_vocab_size(n_vocab)
    if a == "gemma3" or hp.head_dim != hp.n_embd // hp.n_head:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    scaling = hp.rope_scaling
    if scaling is not None and scaling["rope_type"] in ("linear", "yarn"):
        writer.add_string(f"{a}.rope.scaling.type", scaling["rope_type"])
        writer.add_float32(f"{a}.rope.scaling.factor", float(scaling["factor"]))
        if scaling["rope_type"] == "yarn":
            original = scaling.get("original_max_position_embeddings")
            if not isinstance(original, int):
                raise CheckpointError(
                    "config.json: yarn rope_scaling needs original_max_position_embeddings"
                )
            writer.add_uint32(f"{a}.rope.scaling.original_context_length", original)
    if a == "gemma3":
        if hp.sliding_window is not None:
            writer.add_uint32(f"{a}.attention.sliding_window", hp.sliding_window)
            if hp.sliding_layers != default_sliding_layers(hp.n_layer):
                writer.add_array(f"{a}.attention.sliding_window_pattern", list(hp.sliding_layers))
        if hp.rope_theta_swa is not None:
            writer.add_float32(f"{a}.rope.freq_base_swa", hp.rope_theta_swa)
        if hp.final_logit_softcapping is not None:
            writer.add_float32(f"{a}.final_logit_softcapping", hp.final_logit_softcapping)
