"""Tiny random-weight models load and run in the patched llama.cpp like real ones."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import llama_cpp  # conftest imported edgemerge first, so this is the patched libllama
import numpy as np
import pytest

from edgemerge.merging.gguf_meta import read_header
from edgemerge.testing.tiny_models import (
    TinyModelConfig,
    tokenizer_metadata,
    vocab_path,
    write_tiny_model,
)

N_CTX = 256
PROMPT = "Once upon a time, a small model dreamt of long contexts."
# Multi-byte UTF-8, leading/doubled spaces, digits and punctuation, so that a
# tokenizer that drops or rewrites anything fails the round trip.
ROUND_TRIP_TEXT = "Hello  world! Grüße, 東京 → 42 tokens;\n\tdone."
ARCHES = ("qwen2", "llama")


def _load(path: Path, **kwargs: object) -> llama_cpp.Llama:
    # One thread: these models are too small to gain from more, and OpenMP barriers
    # stall badly when the test machine's cores are busy with something else.
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=N_CTX,
        n_threads=1,
        n_threads_batch=1,
        verbose=False,
        seed=1234,
        **kwargs,
    )


@pytest.fixture(params=ARCHES)
def arch_and_path(request: pytest.FixtureRequest) -> tuple[str, Path]:
    return request.param, request.getfixturevalue(f"tiny_{request.param}_path")


@pytest.fixture
def tiny_llm(arch_and_path: tuple[str, Path]) -> Iterator[llama_cpp.Llama]:
    llm = _load(arch_and_path[1])
    yield llm
    llm.close()


def _greedy(llm: llama_cpp.Llama, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(prompt, temp=0.0):
        out.append(token)
        if len(out) == n:
            break
    return out


def test_loads_with_configured_shape(arch_and_path: tuple[str, Path], tiny_llm) -> None:
    arch, _ = arch_and_path
    expected = TinyModelConfig(arch=arch)
    n_tokens_in_vocab = len(tokenizer_metadata(arch)["tokenizer.ggml.tokens"][1])
    model = tiny_llm.model
    assert llama_cpp.llama_model_n_layer(model) == expected.n_layer
    assert tiny_llm.n_embd() == expected.n_embd
    assert llama_cpp.llama_model_n_head(model) == expected.n_head
    assert llama_cpp.llama_model_n_head_kv(model) == expected.n_head_kv
    assert llama_cpp.llama_model_n_ctx_train(model) == expected.n_ctx_train
    assert tiny_llm.n_vocab() == n_tokens_in_vocab
    assert tiny_llm.metadata["general.architecture"] == arch


def test_tokenizer_matches_source_vocab_and_round_trips(
    arch_and_path: tuple[str, Path], tiny_llm
) -> None:
    arch, _ = arch_and_path
    reference = llama_cpp.Llama(model_path=str(vocab_path(arch)), vocab_only=True, verbose=False)
    try:
        text = ROUND_TRIP_TEXT.encode()
        # With the model's own BOS rule, as chat and completion calls tokenize; an
        # SPM vocab's leading-space marker is dropped again after BOS.
        tokens = tiny_llm.tokenize(text)
        assert tokens == reference.tokenize(text)
        assert tiny_llm.detokenize(tokens) == text
        assert len(tokens) < len(text)  # a real vocabulary merges bytes into words
        assert tiny_llm.token_bos() == reference.token_bos()
        assert tiny_llm.token_eos() == reference.token_eos()
    finally:
        reference.close()


def test_chat_completion_runs(arch_and_path: tuple[str, Path], tiny_llm) -> None:
    arch, _ = arch_and_path
    template = tiny_llm.metadata["tokenizer.chat_template"]
    source = tokenizer_metadata(arch).get("tokenizer.chat_template")
    if arch == "qwen2":  # Qwen2's vocab ships its ChatML template: copied as is
        assert template == source[1].decode()
    else:  # the LLaMA SPM vocab has none: a llama-2 style one is supplied
        assert source is None
        assert "[INST]" in template
    reply = tiny_llm.create_chat_completion(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say something."},
        ],
        max_tokens=6,
        temperature=0.0,
    )
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert reply["usage"]["completion_tokens"] >= 1


def test_greedy_generation_is_deterministic(arch_and_path: tuple[str, Path], tiny_llm) -> None:
    prompt = tiny_llm.tokenize(PROMPT.encode())
    first = _greedy(tiny_llm, prompt, 12)
    again = _greedy(tiny_llm, prompt, 12)
    other = _load(arch_and_path[1])
    try:
        from_other_instance = _greedy(other, prompt, 12)
    finally:
        other.close()
    assert len(first) == 12
    assert first == again == from_other_instance
    # Random weights at fan-in scale give varied output, not one token repeated.
    assert len(set(first)) > 3


def test_logits_are_finite_spread_and_context_dependent(
    arch_and_path: tuple[str, Path],
) -> None:
    llm = _load(arch_and_path[1], logits_all=True)
    try:
        prompt = llm.tokenize(PROMPT.encode())
        llm.eval(prompt)
        scores = np.array(llm._scores)
        assert scores.shape == (len(prompt), llm.n_vocab())
        assert np.isfinite(scores).all()
        per_row_std = scores.std(axis=1)
        assert (per_row_std > 0.5).all() and (per_row_std < 20).all()
        # The greedy token is the arg-max of the last row.
        assert _greedy(llm, prompt, 1)[0] == int(scores[-1].argmax())

        # The same final token after a different prefix predicts differently,
        # so attention over the cache matters.
        llm.reset()
        altered = llm.tokenize(b"Completely different words came first here.") + prompt[-1:]
        llm.eval(altered)
        assert not np.allclose(np.array(llm._scores)[-1], scores[-1], atol=1e-3)
    finally:
        llm.close()


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a.gguf", "llama", seed=7)
    b = write_tiny_model(tmp_path / "b.gguf", "llama", seed=7)
    c = write_tiny_model(tmp_path / "c.gguf", "llama", seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert a.stat().st_size == c.stat().st_size


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_chat_template_can_be_left_out(tmp_path: Path, arch: str) -> None:
    # Qwen2's vocab carries a template and LLaMA's gets one supplied: both must go
    path = write_tiny_model(tmp_path / f"{arch}-base.gguf", arch, chat_template=False)
    keys = read_header(path).kvs
    assert "tokenizer.chat_template" not in keys
    assert "tokenizer.ggml.tokens" in keys  # the rest of the tokenizer is still there


def test_f16_and_other_shapes_load(tmp_path: Path) -> None:
    f32 = write_tiny_model(tmp_path / "f32.gguf", "llama", n_layer=3, n_embd=32, n_head=2)
    f16 = write_tiny_model(
        tmp_path / "nested" / "f16.gguf", "llama", n_layer=3, n_embd=32, n_head=2, dtype="f16"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f32.gguf", "nested"]
    assert sorted(p.name for p in (tmp_path / "nested").iterdir()) == ["f16.gguf"]
    llm = _load(f16, logits_all=True)
    try:
        assert llama_cpp.llama_model_n_layer(llm.model) == 3
        assert llama_cpp.llama_model_n_head_kv(llm.model) == 2
        assert "F16" in llm._model.desc()
        llm.eval(llm.tokenize(PROMPT.encode()))
        assert np.isfinite(np.array(llm._scores)).all()
    finally:
        llm.close()
    # Matrices dominate the file, so halving their width nearly halves it.
    assert f16.stat().st_size < 0.6 * f32.stat().st_size


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"arch": "gpt9"}, "arch"),
        ({"dtype": "q4_0"}, "dtype"),
        ({"n_embd": 60, "n_head": 8}, "n_embd"),
        ({"n_head": 4, "n_head_kv": 3}, "n_head_kv"),
        ({"n_embd": 12, "n_head": 4}, "n_embd / n_head"),
        ({"n_layer": 0}, "n_layer"),
        ({"n_ff": 1.5}, "n_ff"),
        ({"n_ctx_train": True}, "n_ctx_train"),
        ({"seed": -1}, "seed"),
        ({"chat_template": "no"}, "chat_template"),
    ],
)
def test_bad_config_raises_naming_the_field(
    tmp_path: Path, kwargs: dict[str, object], field: str
) -> None:
    target = tmp_path / "bad.gguf"
    kwargs = dict(kwargs)
    arch = kwargs.pop("arch", "qwen2")
    with pytest.raises(ValueError, match=f"^{field}"):
        write_tiny_model(target, arch, **kwargs)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
