"""llama.cpp's log under ``verbose=False``: quiet about warnings, loud about errors.

Each case runs in a child Python so that fd 2 (where llama.cpp's C code writes through
the log callback) is captured whole.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgemerge.testing.tiny_models import write_tiny_model
from tests_support import package_env

CHILD = """
import sys
import edgemerge
from edgemerge.models import resolve_model

llm = edgemerge.Llama(str(resolve_model(sys.argv[1])), n_ctx=256, verbose=sys.argv[2] == "1")
print("-- built", file=sys.stderr, flush=True)
try:
    llm.eval([llm.n_vocab() + 5])  # not a token: llama.cpp logs an error and refuses it
except RuntimeError as exc:
    print("refused:", exc)
"""


def build(model: str, verbose: bool) -> tuple[str, str]:
    """(stdout, stderr) of a child that builds a Llama on ``model`` and feeds it a bad token."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, "1" if verbose else "0"],
        capture_output=True,
        text=True,
        timeout=300,
        env=package_env(),
    )
    assert out.returncode == 0, out.stderr
    assert "refused: llama_decode returned -1" in out.stdout
    return out.stdout, out.stderr


@pytest.fixture(scope="module")
def short_trained(tmp_path_factory: pytest.TempPathFactory) -> str:
    # trained on 128 positions: a 256-cell context makes llama.cpp warn while it is created
    path = tmp_path_factory.mktemp("log") / "short.gguf"
    return str(write_tiny_model(path, "qwen2", n_ctx_train=128))


def test_quiet_llama_prints_llama_cpp_errors_but_not_its_warnings(short_trained: str) -> None:
    _, err = build(short_trained, verbose=False)
    built, after = err.split("-- built\n")
    assert built == ""  # llama-cpp-python's own filter let the n_ctx_train warning through
    assert "invalid token[0]" in after  # ... and dropped this error


def test_verbose_llama_prints_everything(short_trained: str) -> None:
    _, err = build(short_trained, verbose=True)
    assert "n_ctx_seq (256) > n_ctx_train (128)" in err
    assert "print_info: n_ctx_train" in err  # an INFO line
    assert "invalid token[0]" in err


@pytest.mark.slow
def test_quiet_gemma_has_no_sliding_window_cache_warning() -> None:
    _, err = build("gemma-3-270m", verbose=False)
    assert err.split("-- built\n")[0] == ""  # was: llama_kv_cache_iswa: using full-size SWA cache
