"""System texts (Debian licences and docs) are found lazily, can be moved with
EDGEMERGE_LICENSES_DIR / EDGEMERGE_DOC_DIR, and their absence (macOS) breaks neither
``import edgemerge`` nor the collection of the tests, only the cases that read them."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgemerge.evaluation import chat_memory, tasks, texts
from edgemerge.evaluation.texts import FidelityInputError
from edgemerge.merging import calibration
from tests_support import english_text, package_env

TESTS = Path(__file__).resolve().parent
# The test modules that used to open /usr/share/common-licenses/GPL-3 at import, and
# those whose cases read the system texts.
TEXT_MODULES = (
    "test_sequences.py",
    "test_llama.py",
    "test_blockcache.py",
    "test_chat.py",
    "test_calibration.py",
    "test_evaluation_tasks.py",
    "test_evaluation_suite.py",
    "test_evaluation_quick.py",
    "test_evaluation_chat_memory.py",
    "test_fidelity.py",
)


def words(text: str) -> list[int]:
    """A tokenizer good enough to tell texts apart: one id per word, its length."""
    return [len(word) for word in text.split()]


@pytest.fixture
def no_system_texts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("EDGEMERGE_LICENSES_DIR", str(empty))
    monkeypatch.setenv("EDGEMERGE_DOC_DIR", str(empty))
    return empty


def test_the_licence_folder_is_read_when_a_case_is_built(tmp_path, monkeypatch):
    folder = tmp_path / "licences"
    folder.mkdir()
    body = " ".join(f"clause{'x' * (i % 7)}" for i in range(300))
    (folder / "GPL-3").write_text(body)
    doc = texts.PLAIN_DOCS[0]  # defined at import, before the variable was set
    monkeypatch.setenv("EDGEMERGE_LICENSES_DIR", str(folder))
    assert doc.path == folder / "GPL-3"
    ctx = texts.plain_context(doc, words, [0], n_context=100, n_scored=20)
    assert ctx.tokens.tolist() == [0] + words(body)[:119]
    monkeypatch.delenv("EDGEMERGE_LICENSES_DIR")
    assert doc.path == Path("/usr/share/common-licenses/GPL-3")


def test_the_doc_folder_follows_its_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMERGE_DOC_DIR", str(tmp_path))
    assert [d.path for d in tasks.FILLER_DOCS if d.folder is texts.DEBIAN_DOCS] == [
        tmp_path / "bash" / "NEWS.gz",
        tmp_path / "bash" / "COMPAT.gz",
    ]


def test_a_missing_system_text_names_the_file_and_the_variable(no_system_texts):
    licence, debian = texts.PLAIN_DOCS[0], texts.PLAIN_DOCS[1]
    with pytest.raises(FidelityInputError) as err:
        texts.plain_context(licence, words, [0], n_context=100, n_scored=20)
    assert str(no_system_texts / "GPL-3") in str(err.value)
    assert "EDGEMERGE_LICENSES_DIR" in str(err.value)
    with pytest.raises(FidelityInputError) as err:
        debian.read()
    assert str(no_system_texts / "bash" / "COMPAT.gz") in str(err.value)
    assert "EDGEMERGE_DOC_DIR" in str(err.value)
    # the haystack says the same when none of its documents is there
    with pytest.raises(FidelityInputError) as err:
        tasks.niah_samples(words, [0], lengths=(500,), depths=(0.5,))
    text = str(err.value)
    assert str(no_system_texts / "Apache-2.0") in text
    assert "EDGEMERGE_LICENSES_DIR" in text and "EDGEMERGE_DOC_DIR" in text


def test_other_material_takes_over_without_licences(no_system_texts):
    text, source = calibration.default_text()
    assert source == os.__file__ and "def " in text
    pool = chat_memory._Pool.load("dev")
    assert pool.prose and pool.code  # the stdlib docstrings and sources remain
    assert any("EDGEMERGE_LICENSES_DIR" in m and "GPL-2" in m for m in pool.missing)


def test_english_text_needs_no_system_folder(no_system_texts):
    text = english_text()
    assert len(text.split()) > 6000  # the tests slice up to ~3k tokens of it


def _hide_system_folders(empty: Path) -> list[str] | None:
    """A command prefix that runs its command with the Debian folders replaced by
    ``empty`` (a private mount namespace, as on a machine without them); [] where they do
    not exist anyway, None where no such namespace can be made."""
    folders = [f for f in (texts.LICENCES.default, texts.DEBIAN_DOCS.default) if f.is_dir()]
    if not folders:
        return []
    if shutil.which("unshare") is None:
        return None
    mounts = " && ".join(
        f"mount --bind {shlex.quote(str(empty))} {shlex.quote(str(f))}" for f in folders
    )
    prefix = ["unshare", "--map-root-user", "--mount", "sh", "-c", f'{mounts} && exec "$@"', "sh"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=60)
    return prefix if probe.returncode == 0 else None


@pytest.mark.parametrize("absent", ["variables", "hidden folders"])
def test_import_and_collection_work_without_the_system_folders(tmp_path, absent):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = package_env()
    if absent == "variables":
        # the folders exist here, the variables send edgemerge elsewhere
        prefix: list[str] | None = []
        env["EDGEMERGE_LICENSES_DIR"] = env["EDGEMERGE_DOC_DIR"] = str(empty)
        licence_file = empty / "GPL-3"
    else:
        # the default folders themselves are empty: nothing may bypass the lookup
        prefix = _hide_system_folders(empty)
        if prefix is None:
            pytest.skip("cannot hide /usr/share/common-licenses here (no unshare --mount)")
        env.pop("EDGEMERGE_LICENSES_DIR", None)
        env.pop("EDGEMERGE_DOC_DIR", None)
        licence_file = texts.LICENCES.default / "GPL-3"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*prefix, sys.executable, *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=TESTS.parent,
            timeout=600,
        )

    modules = (
        "edgemerge.merging.calibration edgemerge.evaluation.tasks edgemerge.evaluation.chat_memory"
    )
    imported = run("-c", f"import edgemerge, {modules.replace(' ', ', ')}, edgemerge.cli")
    assert imported.returncode == 0, imported.stderr

    collected = run(
        "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
        *(f"tests/{m}" for m in TEXT_MODULES),
    )  # fmt: skip
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    assert re.search(r"^\d+ tests collected in ", collected.stdout, re.M), collected.stdout[-500:]
    for module in TEXT_MODULES:
        assert f"tests/{module}::" in collected.stdout

    # a case that reads the licences is skipped, naming the file and the variable
    ran = run(
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-rs",
        "tests/test_evaluation_tasks.py::test_niah_grid",
    )
    assert ran.returncode == 0, ran.stdout[-3000:]
    assert "1 skipped" in ran.stdout
    assert str(licence_file) in ran.stdout and "EDGEMERGE_LICENSES_DIR" in ran.stdout
