"""Build (once) and locate stock llama-cpp-python 0.3.36's own native libraries.

Benchmarks compare edgemerge's patched libllama with the library that stock
llama-cpp-python builds from the same sdist. The stock wheel is built with pip,
with llama-cpp-python's default options, into the edgemerge cache; later calls
reuse it.

    python bench/stock_llama.py        # builds if needed, prints the lib folder
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "0.3.36"


def _cache_dir() -> Path:
    if "EDGEMERGE_CACHE_DIR" in os.environ:
        return Path(os.environ["EDGEMERGE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgemerge"


def stock_lib_dir(build: bool = True) -> Path:
    """Folder holding stock ``libllama.so`` and its ``libggml*`` companions."""
    out = _cache_dir() / f"stock-llama-cpp-python-{VERSION}" / "lib"
    if (out / "libllama.so").exists() or not build:
        return out
    env = {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "LLAMA_CPP_LIB_PATH")}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"building stock llama-cpp-python {VERSION} (a few minutes)...", file=sys.stderr)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-cache-dir",
                "--no-binary",
                "llama-cpp-python",
                f"llama-cpp-python=={VERSION}",
                "-w",
                tmp,
            ],
            check=True,
            env=env,
        )
        (wheel,) = Path(tmp).glob("llama_cpp_python-*.whl")
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.startswith("llama_cpp/lib/") and not name.endswith("/"):
                    (out / Path(name).name).write_bytes(zf.read(name))
    return out


if __name__ == "__main__":
    print(stock_lib_dir())
