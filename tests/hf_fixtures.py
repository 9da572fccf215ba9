"""Tiny random Hugging Face checkpoints, and a numpy forward pass with HF's semantics.

Each fixture is a folder such as ``transformers`` would save: ``config.json``,
safetensors weights (single or sharded with an index), a tokenizer and
``tokenizer_config.json``. The tokenizers are rebuilt from the real vocab GGUFs
shipped in ``edgemerge/data/vocab``: Qwen2's byte-level BPE as ``tokenizer.json``,
LLaMA's SentencePiece vocabulary as a ``tokenizer.model`` protobuf.

``reference_logits`` runs the model as transformers defines it (RoPE on halves of a
head, Gemma's ``1 + w`` norms, query/key norms, sliding windows, soft-capping), in
float64 on the weights exactly as stored, so a converter that forgets a permutation or
a norm shift is caught by comparing logits.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemerge.merging.gguf_meta import read_header
from edgemerge.testing.tiny_models import vocab_path

QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class HFFixture:
    """A written checkpoint folder and the float32 weights its files hold."""

    path: Path
    arch: str
    config: dict[str, Any]
    weights: dict[str, np.ndarray]
    n_tokens: int  # tokens the tokenizer defines (before any [PAD] padding)


# -- configurations ----------------------------------------------------------------------


def llama_config(**overrides: Any) -> dict[str, Any]:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        # Llama 3 style scaling with a short original context, so that all three
        # frequency bands (kept, blended, slowed) occur in a 16-dim head.
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "attention_bias": True,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "vocab_size": 32000,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    config.update(overrides)
    return config


def qwen2_config(**overrides: Any) -> dict[str, Any]:
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "hidden_act": "silu",
        "vocab_size": 151936,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }
    config.update(overrides)
    return config


def gemma3_config(**overrides: Any) -> dict[str, Any]:
    config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,  # not hidden_size / heads: key_length must be written
        "query_pre_attn_scalar": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "final_logit_softcapping": 10.0,
        "hidden_activation": "gelu_pytorch_tanh",
        # Larger than the tokenizer: the converter drops the extra embedding rows.
        "vocab_size": 32008,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    config.update(overrides)
    return config


CONFIGS = {"llama": llama_config, "qwen2": qwen2_config, "gemma3": gemma3_config}


# -- weights -----------------------------------------------------------------------------


def random_weights(config: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 weights for ``config``, fan-in scaled so every layer matters."""
    rng = np.random.default_rng(seed)
    arch = _arch(config)
    d, n_ff, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim", d // n_head)

    def mat(rows: int, cols: int, std: float | None = None) -> np.ndarray:
        scale = std if std is not None else 1.0 / math.sqrt(cols)
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def vec(n: int, centre: float, std: float) -> np.ndarray:
        return (centre + rng.standard_normal(n) * std).astype(np.float32)

    # Gemma stores norm weights as offsets from 1.
    gain = 0.0 if arch == "gemma3" else 1.0
    w = {"model.embed_tokens.weight": mat(v, d, 1.0), "model.norm.weight": vec(d, gain, 0.1)}
    if not config.get("tie_word_embeddings", arch == "gemma3"):
        w["lm_head.weight"] = mat(v, d, 2.0 / math.sqrt(d))
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = vec(d, gain, 0.1)
        w[p + "self_attn.q_proj.weight"] = mat(n_head * hd, d)
        w[p + "self_attn.k_proj.weight"] = mat(n_kv * hd, d)
        w[p + "self_attn.v_proj.weight"] = mat(n_kv * hd, d)
        w[p + "self_attn.o_proj.weight"] = mat(d, n_head * hd)
        if arch == "qwen2" or config.get("attention_bias"):
            w[p + "self_attn.q_proj.bias"] = vec(n_head * hd, 0.0, 0.2)
            w[p + "self_attn.k_proj.bias"] = vec(n_kv * hd, 0.0, 0.2)
            w[p + "self_attn.v_proj.bias"] = vec(n_kv * hd, 0.0, 0.2)
        if config.get("attention_bias"):
            w[p + "self_attn.o_proj.bias"] = vec(d, 0.0, 0.2)
        if arch == "gemma3":
            w[p + "self_attn.q_norm.weight"] = vec(hd, 0.0, 0.1)
            w[p + "self_attn.k_norm.weight"] = vec(hd, 0.0, 0.1)
            w[p + "pre_feedforward_layernorm.weight"] = vec(d, 0.0, 0.1)
            w[p + "post_feedforward_layernorm.weight"] = vec(d, 0.0, 0.1)
        w[p + "post_attention_layernorm.weight"] = vec(d, gain, 0.1)
        w[p + "mlp.gate_proj.weight"] = mat(n_ff, d)
        w[p + "mlp.up_proj.weight"] = mat(n_ff, d)
        w[p + "mlp.down_proj.weight"] = mat(d, n_ff)
    return w


def _arch(config: dict[str, Any]) -> str:
    return {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}.get(
        config["architectures"][0], "gemma3"
    )


def to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> dict[str, Any]:
    """Write ``tensors`` in ``dtype`` (F32, F16, BF16); returns the header."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, array in tensors.items():
        if dtype == "BF16":
            raw = to_bf16(array).tobytes()
        else:
            raw = array.astype({"F32": "<f4", "F16": "<f2"}[dtype]).tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * ((-len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    return header


def stored(array: np.ndarray, dtype: str) -> np.ndarray:
    """``array`` as float32 after a round trip through ``dtype``."""
    if dtype == "BF16":
        return from_bf16(to_bf16(array))
    if dtype == "F16":
        return array.astype(np.float16).astype(np.float32)
    return array.astype(np.float32)


# -- tokenizers --------------------------------------------------------------------------


def _vocab(arch: str) -> dict[str, Any]:
    return {k: v[1] for k, v in read_header(vocab_path(arch)).kvs.items()}


def write_qwen2_tokenizer(folder: Path) -> int:
    """tokenizer.json (byte-level BPE) + tokenizer_config.json from Qwen2's vocab GGUF."""
    meta = _vocab("qwen2")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab, added = {}, []
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind == 1:
            vocab[tok.decode()] = i
        elif kind == 3:
            added.append({"id": i, "content": tok.decode(), "special": True, "normalized": False})
    data = {
        "version": "1.0",
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN2_REGEX},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": False,
                    "use_regex": False,
                },
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
        "decoder": {"type": "ByteLevel"},
        "model": {
            "type": "BPE",
            "vocab": vocab,
            "merges": [m.decode() for m in meta["tokenizer.ggml.merges"]],
        },
    }
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    _write_json(
        folder / "tokenizer_config.json",
        {
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "chat_template": CHAT_TEMPLATE,
        },
    )
    return len(vocab) + len(added)


def spm_model_bytes(add_dummy_prefix: bool = True) -> bytes:
    """A SentencePiece ModelProto (BPE) holding LLaMA's pieces, scores and types."""
    meta = _vocab("llama")
    pieces = b""
    for tok, score, kind in zip(
        meta["tokenizer.ggml.tokens"],
        meta["tokenizer.ggml.scores"],
        meta["tokenizer.ggml.token_type"],
        strict=True,
    ):
        body = _pb_bytes(1, tok) + _pb_key(2, 5) + struct.pack("<f", score)
        if kind != 1:
            body += _pb_key(3, 0) + _pb_varint(kind)
        pieces += _pb_bytes(1, body)
    trainer = b"".join(
        _pb_key(n, 0) + _pb_varint(v & ((1 << 64) - 1))
        for n, v in ((3, 2), (40, 0), (41, 1), (42, 2), (43, -1))
    )
    normalizer = _pb_bytes(1, b"identity") + _pb_key(3, 0) + _pb_varint(int(add_dummy_prefix))
    return pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)


def write_spm_tokenizer(folder: Path, add_dummy_prefix: bool = True) -> int:
    (folder / "tokenizer.model").write_bytes(spm_model_bytes(add_dummy_prefix))
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": {"content": "<s>", "special": True},
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "chat_template": CHAT_TEMPLATE,
        },
    )
    return len(_vocab("llama")["tokenizer.ggml.tokens"])


def _pb_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        byte = v & 0x7F
        v >>= 7
        if v:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _pb_key(number: int, wire: int) -> bytes:
    return _pb_varint((number << 3) | wire)


def _pb_bytes(number: int, payload: bytes) -> bytes:
    return _pb_key(number, 2) + _pb_varint(len(payload)) + payload


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


# -- whole checkpoints -------------------------------------------------------------------

# Storage dtype and shard count per arch: each reading path is exercised once.
_LAYOUT = {"llama": ("F32", 2), "qwen2": ("F16", 1), "gemma3": ("BF16", 1)}


def write_checkpoint(
    folder: Path,
    arch: str,
    *,
    config: dict[str, Any] | None = None,
    dtype: str | None = None,
    shards: int | None = None,
    seed: int = 0,
) -> HFFixture:
    """Write a tiny random ``arch`` checkpoint into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = config or CONFIGS[arch]()
    default_dtype, default_shards = _LAYOUT[arch]
    dtype, shards = dtype or default_dtype, shards or default_shards
    weights = {k: stored(v, dtype) for k, v in random_weights(config, seed).items()}
    _write_json(folder / "config.json", config)
    if arch == "qwen2":
        n_tokens = write_qwen2_tokenizer(folder)
    else:
        n_tokens = write_spm_tokenizer(folder, add_dummy_prefix=arch != "gemma3")
    names = list(weights)
    if shards == 1:
        write_safetensors(folder / "model.safetensors", weights, dtype)
    else:
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: weights[n] for n in names[s::shards]}
            write_safetensors(folder / file, part, dtype)
            weight_map.update(dict.fromkeys(part, file))
        _write_json(
            folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map}
        )
    return HFFixture(folder, arch, config, weights, n_tokens)


# -- reference forward pass --------------------------------------------------------------


def reference_logits(
    fx: HFFixture, tokens: list[int], *, ggml_gelu_table: bool = False
) -> np.ndarray:
    """float64 logits [n_tokens, vocab_size] of ``fx`` over ``tokens`` (positions 0..n-1).

    ``ggml_gelu_table`` rounds GELU's input and output to float16, as ggml's CPU GELU
    does (it looks values up in a float16 table); everything else stays float64.
    """
    c, arch = fx.config, fx.arch
    w = {k: v.astype(np.float64) for k, v in fx.weights.items()}
    d, n_head, n_kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim", d // n_head)
    eps = c["rms_norm_eps"]
    gemma = arch == "gemma3"
    pos = np.arange(len(tokens))

    def norm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        scale = (1.0 + weight) if gemma else weight
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale

    x = w["model.embed_tokens.weight"][tokens]
    if gemma:
        x = x * math.sqrt(d)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])

        def proj(name: str, h: np.ndarray = h, p: str = p) -> np.ndarray:
            out = h @ w[p + f"self_attn.{name}.weight"].T
            bias = w.get(p + f"self_attn.{name}.bias")
            return out + bias if bias is not None else out

        q = proj("q_proj").reshape(len(tokens), n_head, hd)
        k = proj("k_proj").reshape(len(tokens), n_kv, hd)
        v = proj("v_proj").reshape(len(tokens), n_kv, hd)
        sliding = gemma and c["layer_types"][i] == "sliding_attention"
        if gemma:
            q = norm(q, w[p + "self_attn.q_norm.weight"])
            k = norm(k, w[p + "self_attn.k_norm.weight"])
            theta = c["rope_local_base_freq"] if sliding else c["rope_theta"]
            inv_freq = _inv_freq(theta, hd, None if sliding else c.get("rope_scaling"))
            scale = c["query_pre_attn_scalar"] ** -0.5
        else:
            inv_freq = _inv_freq(c["rope_theta"], hd, c.get("rope_scaling"))
            scale = hd**-0.5
        q, k = _rope(q, pos, inv_freq), _rope(k, pos, inv_freq)
        group = n_head // n_kv
        att = np.einsum("ihd,jhd->hij", q, np.repeat(k, group, axis=1)) * scale
        allowed = pos[None, :] <= pos[:, None]
        if sliding:
            allowed &= pos[:, None] - pos[None, :] < c["sliding_window"]
        att = np.where(allowed[None], att, -np.inf)
        att = np.exp(att - att.max(axis=-1, keepdims=True))
        att /= att.sum(axis=-1, keepdims=True)
        o = np.einsum("hij,jhd->ihd", att, np.repeat(v, group, axis=1)).reshape(len(tokens), -1)
        o = o @ w[p + "self_attn.o_proj.weight"].T
        if p + "self_attn.o_proj.bias" in w:
            o = o + w[p + "self_attn.o_proj.bias"]
        if gemma:
            x = x + norm(o, w[p + "post_attention_layernorm.weight"])
            h = norm(x, w[p + "pre_feedforward_layernorm.weight"])
            gate = h @ w[p + "mlp.gate_proj.weight"].T
            if ggml_gelu_table:
                gate = gate.astype(np.float16).astype(np.float64)
            act = 0.5 * gate * (1 + np.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)))
            if ggml_gelu_table:
                act = np.where(np.abs(gate) < 10, act.astype(np.float16), act).astype(np.float64)
            m = (act * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
            x = x + norm(m, w[p + "post_feedforward_layernorm.weight"])
        else:
            x = x + o
            h = norm(x, w[p + "post_attention_layernorm.weight"])
            gate = h @ w[p + "mlp.gate_proj.weight"].T
            act = gate / (1 + np.exp(-gate))
            x = x + (act * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    x = norm(x, w["model.norm.weight"])
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    logits = x @ head.T
    cap = c.get("final_logit_softcapping")
    if cap:
        logits = cap * np.tanh(logits / cap)
    return logits


def _inv_freq(theta: float, hd: int, scaling: dict[str, Any] | None) -> np.ndarray:
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv / scaling["factor"]
    assert kind == "llama3", kind
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    out = np.empty_like(inv)
    for j, (f, wl) in enumerate(zip(inv, wavelen, strict=True)):
        if wl < original / high:
            out[j] = f
        elif wl > original / low:
            out[j] = f / factor
        else:
            s = (original / wl - low) / (high - low)
            out[j] = (1 - s) * f / factor + s * f
    return out


def _rope(x: np.ndarray, pos: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """HF RoPE: dimension i rotates with i + d/2 (``rotate_half``)."""
    angles = pos[:, None] * inv_freq[None, :]
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1)[:, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
