"""Shared fixtures: tiny random-weight models and the ``gpu`` marker's skip rule."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import edgemerge  # noqa: F401  (sets LLAMA_CPP_LIB_PATH before any test imports llama_cpp)
from edgemerge.native._libpath import library_file
from edgemerge.testing.tiny_models import write_tiny_model


def cuda_unavailable_reason() -> str | None:
    """Why CUDA tests cannot run here, or None when they can."""
    cuda_lib = library_file("ggml-cuda")
    if not cuda_lib.exists():
        return f"edgemerge was built without CUDA ({cuda_lib.name} not in {cuda_lib.parent})"
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found, so no NVIDIA driver is installed"
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi -L failed: {err}"
    if listing.returncode != 0 or "GPU" not in listing.stdout:
        return "nvidia-smi -L lists no GPU"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = cuda_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA device: {reason}")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_qwen2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer qwen2 model (GQA 4:2, q/k/v biases) with Qwen2's real tokenizer."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen2.gguf", "qwen2")


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer llama model (GQA 4:2) with LLaMA's SentencePiece tokenizer."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf", "llama")
