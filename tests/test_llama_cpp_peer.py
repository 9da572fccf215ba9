"""The drop-in, proven by llama-cpp-python 0.3.36's own tests.

Its tests/ are extracted from the pinned sdist (the one the build caches) into a temporary
folder, with ``peer_conftest.py`` beside them, and run in a child pytest: once with
``llama_cpp.Llama`` on edgemerge's patched library, once with ``edgemerge.Llama`` (merging
on where the test's context allows). Hub-downloaded models are swapped for the offline
tiny llama; tests tied to one model (its token ids, or a model kind none of ours is)
are skipped with the reason. No code of theirs is kept in this repository.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edgemerge.models import cache_dir
from edgemerge.testing.tiny_models import VOCAB_DIR
from tests_support import package_env

SDIST = "llama_cpp_python-0.3.36"
PEER_CONFTEST = Path(__file__).with_name("peer_conftest.py")
# every skip must be one of these (from peer_conftest.SKIP)
REASONS = ("Qwen3.5 0.8B's token ids", "recurrent (Mamba)", "hybrid (Falcon-H1)", "embedding")
EXPECTED = {"passed": 12, "skipped": 14}


def sdist_path() -> Path | None:
    for folder in (cache_dir() / "sdist", Path.home() / ".cache" / "edgemerge" / "sdist"):
        path = folder / f"{SDIST}.tar.gz"
        if path.exists():
            return path
    return None


@pytest.fixture(scope="module")
def peer_tests(tmp_path_factory: pytest.TempPathFactory, tiny_llama_path: Path) -> Path:
    sdist = sdist_path()
    if sdist is None:
        pytest.skip(f"{SDIST}.tar.gz is not cached (the native build downloads it)")
    pytest.importorskip("scipy", reason="llama-cpp-python's tests import scipy")
    root = tmp_path_factory.mktemp("peer")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"{SDIST}/tests/")]
        tar.extractall(root, members=members, filter="data")
    tests = root / SDIST / "tests"
    shutil.copy(PEER_CONFTEST, tests / "conftest.py")
    vocab = root / SDIST / "vendor" / "llama.cpp" / "models"
    vocab.mkdir(parents=True)
    shutil.copy(VOCAB_DIR / "ggml-vocab-llama-spm.gguf", vocab)
    return tests


def run_peer(tests: Path, mode: str, tiny_llama: Path) -> tuple[dict[str, int], str, str]:
    env = package_env()
    env.update(
        EDGEMERGE_PEER_MODE=mode,
        EDGEMERGE_PEER_TINY_LLAMA=str(tiny_llama),
        EDGEMERGE_PEER_REPORT=str(tests / f"merged-{mode}.txt"),
    )
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tests)],
        cwd=tests.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = out.stdout + out.stderr
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", text)}
    report = tests / f"merged-{mode}.txt"
    return counts, text, report.read_text() if report.exists() else ""


@pytest.mark.parametrize("mode", ["llama_cpp", "edgemerge"])
def test_llama_cpp_pythons_own_tests_pass(peer_tests, tiny_llama_path, mode):
    counts, text, merged = run_peer(peer_tests, mode, tiny_llama_path)
    assert counts.get("failed", 0) == 0 and counts.get("error", 0) == 0, text[-4000:]
    assert counts == EXPECTED, text[-4000:]
    skips = [line for line in text.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) >= 1
    for line in skips:
        assert any(r in line for r in REASONS), f"a skip without a named reason: {line}"
    if mode == "edgemerge":
        # the cache tests built edgemerge.Llama with a merge budget
        assert int(merged) >= 8
