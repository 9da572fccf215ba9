"""conftest.py for llama-cpp-python 0.3.36's own tests, run by tests/test_llama_cpp_peer.py.

Copied next to the extracted tests. It loads edgemerge's patched libllama, answers the
tests' ``hf_hub_download`` with the offline models (or skips with the reason), and in
``EDGEMERGE_PEER_MODE=edgemerge`` makes ``llama_cpp.Llama`` an ``edgemerge.Llama`` with
merging on wherever the test's context leaves room for a budget.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

import edgemerge  # noqa: F401  (points llama_cpp at the patched libllama)

MODE = os.environ.get("EDGEMERGE_PEER_MODE", "llama_cpp")
TINY_LLAMA = os.environ["EDGEMERGE_PEER_TINY_LLAMA"]

# (repo, file) the tests download -> an offline model, or the reason a test is skipped
OFFLINE = {
    ("ggml-org/models", "tinyllamas/stories15M-q4_0.gguf"): TINY_LLAMA,
}
SKIP = {
    "Qwen3.5-0.8B-Q8_0.gguf": "asserts Qwen3.5 0.8B's token ids and greedy text; no offline copy",
    "mamba-130m-hf.Q2_K.gguf": "a recurrent (Mamba) model; none is shipped offline",
    "Falcon-H1-Tiny-90M-Instruct-Q2_K.gguf": "a hybrid (Falcon-H1) model; none is shipped offline",
    "bge-small-en-v1.5-q4_k_m.gguf": "an embedding (BERT) model; none is shipped offline",
}


def hf_hub_download(repo_id: str, filename: str, **_: object) -> str:
    if (repo_id, filename) in OFFLINE:
        return OFFLINE[(repo_id, filename)]
    pytest.skip(SKIP.get(filename, f"{repo_id}/{filename} is not available offline"))


hub = types.ModuleType("huggingface_hub")
hub.hf_hub_download = hf_hub_download
sys.modules["huggingface_hub"] = hub

import llama_cpp  # noqa: E402

MERGED = {"count": 0}

if MODE == "edgemerge":
    from edgemerge import Llama, MergeSettings

    class DropIn(Llama):
        """``edgemerge.Llama`` in ``llama_cpp.Llama``'s place: merging on when the test's
        n_ctx leaves room for a budget (a smaller n_batch where it must: it only changes
        how the prompt is chunked)."""

        def __init__(self, model_path: str | None = None, *args: object, **kw: object) -> None:
            if args:
                raise TypeError("pass llama_cpp.Llama's arguments by keyword")
            n_ctx = int(kw.get("n_ctx", 512) or 512)
            merge = None
            if not kw.get("vocab_only") and not kw.get("embedding") and n_ctx >= 32:
                n_batch = min(int(kw.get("n_batch", 512)), n_ctx // 4)
                kw["n_batch"] = n_batch
                kw.pop("n_ubatch", None)
                merge = MergeSettings(
                    budget=n_ctx - n_batch, sinks=2, recent=n_ctx // 4, block_size=4, slack=0
                )
                MERGED["count"] += 1
            kw.pop("flash_attn", None)  # merged cells carry a KQ-mask bias
            super().__init__(model_path=model_path, merge=merge, **kw)

    llama_cpp.Llama = DropIn


def pytest_sessionfinish(session: pytest.Session) -> None:
    out = os.environ.get("EDGEMERGE_PEER_REPORT")
    if out:
        Path(out).write_text(str(MERGED["count"]))
