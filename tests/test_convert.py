"""`edgemerge convert`: tiny random HF checkpoints -> GGUF -> llama.cpp logits vs numpy."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from hf_fixtures import (
    CHAT_TEMPLATE,
    HFFixture,
    llama_config,
    reference_logits,
    write_checkpoint,
    write_safetensors,
)

import edgemerge  # noqa: F401  (our libllama before llama_cpp)
from edgemerge.convert import (
    CheckpointError,
    ConvertError,
    QuantizeError,
    TensorMismatchError,
    TokenizerError,
    UnsupportedModelError,
    add_convert_parser,
    archs,
    convert,
    quantize,
    writer,
)
from edgemerge.merging.gguf_meta import read_header
from edgemerge.testing.tiny_models import vocab_path

ARCHS = ("llama", "qwen2", "gemma3")
N_TOKENS = 24  # longer than Gemma's 4-token test window, so sliding layers matter
# f32 weights and an f32 KV cache leave only float32 rounding and summation order
# between llama.cpp and the float64 reference (whose GELU mimics ggml's fp16 table):
# observed max |diff| is below 1e-5 x the logits' standard deviation.
REL_TOL = 1e-4

_CACHE: dict[str, HFFixture] = {}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """arch -> a tiny checkpoint, written once per module."""

    def get(arch: str) -> HFFixture:
        if arch not in _CACHE:
            _CACHE[arch] = write_checkpoint(tmp_path_factory.mktemp("hf") / arch, arch)
        return _CACHE[arch]

    yield get
    _CACHE.clear()


def llama_logits(path: Path, tokens: list[int], f32_cache: bool = True) -> np.ndarray:
    import llama_cpp

    kv = {"type_k": 0, "type_v": 0} if f32_cache else {}
    llm = llama_cpp.Llama(
        str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False, **kv
    )
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float64)


def tensor_types(path: Path) -> dict[str, str]:
    """Tensor name -> GGML type name, from the tensor infos (GGUFReader is slow on big vocabs)."""
    head = read_header(path)
    data = path.read_bytes()[head.info_range[0] : head.info_range[1]]
    out, pos = {}, 0
    for _ in range(head.n_tensors):
        (length,) = struct.unpack_from("<Q", data, pos)
        name = data[pos + 8 : pos + 8 + length].decode()
        pos += 8 + length
        (n_dims,) = struct.unpack_from("<I", data, pos)
        pos += 4 + 8 * n_dims
        (kind,) = struct.unpack_from("<I", data, pos)
        out[name] = gguf.GGMLQuantizationType(kind).name
        pos += 4 + 8
    return out


def sample_tokens(fx: HFFixture, seed: int = 1) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(3, fx.n_tokens, N_TOKENS)]


def compare(fx: HFFixture, path: Path) -> tuple[float, float]:
    """(max |llama.cpp - reference| over the tokenizer's vocab, reference std)."""
    tokens = sample_tokens(fx)
    got = llama_logits(path, tokens)
    ref = reference_logits(fx, tokens, ggml_gelu_table=True)[:, : got.shape[1]]
    return float(np.abs(got - ref).max()), float(ref.std())


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_a_numpy_forward_pass(checkpoint, tmp_path, arch):
    fx = checkpoint(arch)
    result = convert(fx.path, tmp_path / "m.gguf", outtype="f32", progress=False)
    assert result.arch == arch and result.outtype == "f32"
    diff, std = compare(fx, result.path)
    assert diff <= REL_TOL * std, f"{arch}: max |diff| {diff:.3g} vs logit std {std:.3g}"


@pytest.mark.parametrize(
    ("arch", "sabotage"),
    [("llama", "_rope_interleave"), ("gemma3", "_plus_one")],
)
def test_the_comparison_catches_a_missing_permutation_or_norm_shift(
    checkpoint, tmp_path, monkeypatch, arch, sabotage
):
    fx = checkpoint(arch)
    if sabotage == "_rope_interleave":
        monkeypatch.setattr(archs, sabotage, lambda n_head: None)
    else:
        monkeypatch.setattr(archs, sabotage, lambda a: a)
    result = convert(fx.path, tmp_path / "bad.gguf", outtype="f32", progress=False)
    diff, std = compare(fx, result.path)
    assert diff > 100 * REL_TOL * std


def test_gemma3_metadata_matches_config(checkpoint, tmp_path):
    fx = checkpoint("gemma3")
    path = convert(fx.path, tmp_path / "g.gguf", outtype="f32", progress=False).path
    kv = {k: v[1] for k, v in read_header(path).kvs.items()}
    assert kv["gemma3.attention.key_length"] == kv["gemma3.attention.value_length"] == 32
    assert kv["gemma3.attention.sliding_window"] == 4
    assert kv["gemma3.attention.sliding_window_pattern"] == (True, False, True)
    assert kv["gemma3.rope.freq_base_swa"] == 10000.0
    assert kv["gemma3.final_logit_softcapping"] == 10.0
    assert kv["tokenizer.ggml.add_space_prefix"] is False
    # embedding rows past the tokenizer's 32000 tokens are dropped
    reader = gguf.GGUFReader(path)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert list(embd.shape) == [64, fx.n_tokens]
    assert "output.weight" not in {t.name for t in reader.tensors}


def test_llama3_rope_factors_are_written_as_rope_freqs(checkpoint, tmp_path):
    fx = checkpoint("llama")
    path = convert(fx.path, tmp_path / "l.gguf", outtype="f32", progress=False).path
    reader = gguf.GGUFReader(path)
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    factors = np.asarray(freqs.data)
    # the three bands: kept (1), blended, slowed by the full factor (8)
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(8.0)
    assert np.any((factors > 1.0) & (factors < 8.0))
    assert np.all(np.diff(factors) >= 0)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tokenizer_reproduces_the_vocab_it_was_built_from(checkpoint, tmp_path, arch):
    import llama_cpp

    fx = checkpoint(arch)
    path = convert(fx.path, tmp_path / "t.gguf", outtype="f16", progress=False).path
    got = {k: v[1] for k, v in read_header(path).kvs.items()}
    want = {k: v[1] for k, v in read_header(vocab_path(arch)).kvs.items()}
    n = fx.n_tokens
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
        assert got[key] == want[key]
    assert got["tokenizer.ggml.tokens"][:n] == want["tokenizer.ggml.tokens"][:n]
    assert got["tokenizer.ggml.token_type"][:n] == want["tokenizer.ggml.token_type"][:n]
    for key in ("tokenizer.ggml.merges", "tokenizer.ggml.scores"):
        assert got.get(key) == want.get(key)
    # ids the tokenizer leaves undefined, up to config.json vocab_size, are unused padding
    padding = got["tokenizer.ggml.tokens"][n:]
    assert len(got["tokenizer.ggml.tokens"]) == fx.config["vocab_size"]
    assert padding == tuple(f"[PAD{i}]".encode() for i in range(n, fx.config["vocab_size"]))
    assert set(got["tokenizer.ggml.token_type"][n:]) <= {gguf.TokenType.UNUSED}
    assert got["tokenizer.chat_template"] == CHAT_TEMPLATE.encode()
    assert got["tokenizer.ggml.eos_token_id"] == (151645 if arch == "qwen2" else 2)
    assert got["tokenizer.ggml.add_bos_token"] is (arch == "llama")
    text = b"Hello world! def f(x):\n    return x**2  # \xc3\xbcn\xc3\xafc\xc3\xb6d\xc3\xa9 123456"
    ours = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    ref = llama_cpp.Llama(str(vocab_path(arch)), vocab_only=True, verbose=False)
    assert ours.tokenize(text, special=True) == ref.tokenize(text, special=True)


@pytest.mark.parametrize(
    ("outtype", "stored", "file_type"),
    [("f16", "F16", 1), ("bf16", "BF16", 32), ("q8_0", "Q8_0", 7)],
)
def test_outtypes(checkpoint, tmp_path, outtype, stored, file_type):
    fx = checkpoint("llama")
    path = convert(fx.path, tmp_path / "o.gguf", outtype=outtype, progress=False).path
    kinds = tensor_types(path)
    assert kinds["blk.0.attn_q.weight"] == kinds["token_embd.weight"] == stored
    assert kinds["blk.0.attn_norm.weight"] == kinds["blk.0.attn_q.bias"] == "F32"
    assert read_header(path).kvs["general.file_type"][1] == file_type
    tokens = sample_tokens(fx)
    got = llama_logits(path, tokens)
    ref = reference_logits(fx, tokens)
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.999


@pytest.mark.parametrize(("arch", "stored"), [("qwen2", "F16"), ("gemma3", "BF16")])
def test_auto_outtype_keeps_the_checkpoint_dtype(checkpoint, tmp_path, arch, stored):
    fx = checkpoint(arch)
    result = convert(fx.path, tmp_path / "a.gguf", progress=False)
    assert set(tensor_types(result.path).values()) == {stored, "F32"}


def test_q8_0_falls_back_to_f16_for_rows_that_do_not_fit_its_blocks():
    assert quantize.tensor_qtype("q8_0", (8, 64), True) == gguf.GGMLQuantizationType.Q8_0
    assert quantize.tensor_qtype("q8_0", (8, 48), True) == gguf.GGMLQuantizationType.F16
    assert quantize.tensor_qtype("q8_0", (64,), False) == gguf.GGMLQuantizationType.F32


def test_k_quant_through_libllama(tmp_path):
    config = llama_config(hidden_size=256, intermediate_size=512, num_hidden_layers=1)
    fx = write_checkpoint(tmp_path / "hf", "llama", config=config, shards=1)
    out = tmp_path / "out" / "q.gguf"
    out.parent.mkdir()
    result = convert(fx.path, out, quantize_to="q4_k_m", progress=False)
    assert result.quantize == "Q4_K_M"
    assert read_header(out).kvs["general.file_type"][1] == 15
    assert "Q4_K" in set(tensor_types(out).values())
    assert [p.name for p in out.parent.iterdir()] == ["q.gguf"]
    tokens = sample_tokens(fx)
    got = llama_logits(out, tokens, f32_cache=False)
    assert np.corrcoef(got.ravel(), reference_logits(fx, tokens).ravel())[0, 1] > 0.98


def _stock_lib() -> Path | None:
    base = os.environ.get("EDGEMERGE_CACHE_DIR") or str(Path.home() / ".cache" / "edgemerge")
    lib = Path(base) / "stock-llama-cpp-python-0.3.36" / "lib"
    return lib if (lib / "libllama.so").exists() else None


@pytest.mark.skipif(
    _stock_lib() is None,
    reason="stock llama-cpp-python not built; run `python bench/stock_llama.py`",
)
@pytest.mark.parametrize("arch", ARCHS)
def test_stock_llama_cpp_gives_the_same_logits(checkpoint, tmp_path, arch):
    """The output is plain GGUF: stock llama.cpp (no edgemerge import) computes the same."""
    fx = checkpoint(arch)
    path = convert(fx.path, tmp_path / "s.gguf", outtype="f32", progress=False).path
    tokens = sample_tokens(fx)
    code = (
        "import sys, numpy, llama_cpp\n"
        f"llm = llama_cpp.Llama({str(path)!r}, n_ctx=64, logits_all=True, type_k=0, type_v=0, "
        "n_threads=2, verbose=False)\n"
        f"llm.eval({tokens!r})\n"
        f"numpy.save(sys.argv[1], numpy.array(llm.scores[:{len(tokens)}]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["LLAMA_CPP_LIB_PATH"] = str(_stock_lib())
    out = tmp_path / "stock.npy"
    run = subprocess.run(
        [sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, cwd="/"
    )
    assert run.returncode == 0, run.stderr
    np.testing.assert_allclose(np.load(out), llama_logits(path, tokens), rtol=0, atol=1e-4)


def test_cli_functions(checkpoint, tmp_path, capsys):
    fx = checkpoint("qwen2")
    parser = argparse.ArgumentParser(prog="edgemerge")
    add_convert_parser(parser.add_subparsers())
    out = tmp_path / "cli.gguf"
    args = parser.parse_args(["convert", str(fx.path), "-o", str(out), "--no-progress"])
    assert args.func(args) == 0
    assert f"{out}: qwen2, 26 tensors, f16, 151936 tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", str(fx.path), "-o", str(out), "--quantize", "IQ9"])


# -- bad input: a clear error and no output file ------------------------------------------


def fails_cleanly(hf_dir: Path, tmp_path: Path, error: type[ConvertError], match: str, **kw):
    """Convert must raise ``error`` and leave a pre-existing output file untouched."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / "model.gguf"
    out.write_bytes(b"previous file")
    with pytest.raises(error, match=match) as info:
        convert(hf_dir, out, progress=False, **kw)
    assert out.read_bytes() == b"previous file"
    assert [p.name for p in out_dir.iterdir()] == ["model.gguf"]
    return info.value


@pytest.fixture
def small_llama(tmp_path) -> HFFixture:
    config = llama_config(rope_scaling=None, attention_bias=False)
    return write_checkpoint(tmp_path / "hf", "llama", config=config, shards=1)


def test_missing_tensor(small_llama, tmp_path):
    weights = dict(small_llama.weights)
    del weights["model.layers.1.mlp.up_proj.weight"]
    write_safetensors(small_llama.path / "model.safetensors", weights, "F32")
    fails_cleanly(
        small_llama.path, tmp_path, TensorMismatchError, r"model\.layers\.1\.mlp\.up_proj"
    )


def test_unknown_architecture(small_llama, tmp_path):
    config = dict(small_llama.config, architectures=["GPT2LMHeadModel"])
    (small_llama.path / "config.json").write_text(json.dumps(config))
    err = fails_cleanly(small_llama.path, tmp_path, UnsupportedModelError, "GPT2LMHeadModel")
    assert "Qwen2ForCausalLM" in str(err)


def test_shape_mismatch(small_llama, tmp_path):
    config = dict(small_llama.config, intermediate_size=80)
    (small_llama.path / "config.json").write_text(json.dumps(config))
    fails_cleanly(
        small_llama.path, tmp_path, TensorMismatchError, r"gate_proj.*\[96, 64\].*\[80, 64\]"
    )


def test_truncated_safetensors(small_llama, tmp_path):
    path = small_llama.path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    fails_cleanly(small_llama.path, tmp_path, CheckpointError, "truncated")
    path.write_bytes(data[:5])
    fails_cleanly(small_llama.path, tmp_path, CheckpointError, "truncated")


def test_missing_shard_and_tokenizer(checkpoint, tmp_path):
    src = checkpoint("llama").path
    hf = tmp_path / "hf"
    shutil.copytree(src, hf)
    (hf / "model-00002-of-00002.safetensors").unlink()
    fails_cleanly(hf, tmp_path, CheckpointError, "model-00002-of-00002")
    shutil.copy(src / "model-00002-of-00002.safetensors", hf)
    (hf / "tokenizer.model").unlink()
    fails_cleanly(hf, tmp_path, TokenizerError, "no tokenizer")


def test_unknown_pre_tokenizer_is_refused(checkpoint, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(checkpoint("qwen2").path, hf)
    data = json.loads((hf / "tokenizer.json").read_text(encoding="utf-8"))
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+"
    (hf / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    fails_cleanly(hf, tmp_path, TokenizerError, "pre-tokenizer")


def test_unknown_quant_type_fails_before_any_work(small_llama, tmp_path):
    fails_cleanly(small_llama.path, tmp_path, QuantizeError, "IQ2_XXS", quantize_to="IQ2_XXS")


def test_an_interrupted_conversion_leaves_nothing(small_llama, tmp_path, monkeypatch):
    calls = []
    real = quantize.encode

    def interrupt_on_fifth(name, array, qtype):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(name, array, qtype)

    monkeypatch.setattr(writer.quantize, "encode", interrupt_on_fifth)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        convert(small_llama.path, out, progress=False)
    assert list(out.parent.iterdir()) == []


def test_a_failing_quantizer_reports_llama_cpp_and_leaves_nothing(tmp_path):
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(QuantizeError, match="Q4_K_M") as info:
        quantize.quantize_file(bad, tmp_path / "never.gguf", "Q4_K_M")
    assert "no message from llama.cpp" not in str(info.value)
    assert not (tmp_path / "never.gguf").exists()


def test_quantize_failure_inside_convert_leaves_nothing(small_llama, tmp_path, monkeypatch):
    def fail(src, dst, name, n_threads=None):
        Path(dst).write_bytes(b"half a model")
        raise QuantizeError("simulated")

    monkeypatch.setattr(writer.quantize, "quantize_file", fail)
    fails_cleanly(small_llama.path, tmp_path, QuantizeError, "simulated", quantize_to="Q4_K_M")


def test_the_text_model_of_a_multimodal_gemma3(checkpoint, tmp_path):
    """Gemma3ForConditionalGeneration: text_config, language_model.* names, vision left out."""
    fx = checkpoint("gemma3")
    hf = tmp_path / "hf"
    shutil.copytree(fx.path, hf)
    text_config = {k: v for k, v in fx.config.items() if k != "architectures"}
    config = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text_config,
        "vision_config": {"hidden_size": 8},
    }
    (hf / "config.json").write_text(json.dumps(config))
    weights = {"language_model." + k: v for k, v in fx.weights.items()}
    vision = ["multi_modal_projector.mm_input_projection_weight", "vision_tower.patch.weight"]
    for name in vision:
        weights[name] = np.ones((8, 8), np.float32)
    write_safetensors(hf / "model.safetensors", weights, "BF16")
    result = convert(hf, tmp_path / "mm.gguf", outtype="f32", progress=False)
    assert sorted(result.ignored) == vision
    diff, std = compare(fx, result.path)
    assert diff <= REL_TOL * std


def test_a_quantized_checkpoint_is_refused(small_llama, tmp_path):
    config = dict(small_llama.config, quantization_config={"quant_method": "awq", "bits": 4})
    (small_llama.path / "config.json").write_text(json.dumps(config))
    fails_cleanly(small_llama.path, tmp_path, UnsupportedModelError, "quantized .awq.")
