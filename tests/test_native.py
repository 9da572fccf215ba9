"""The patched native library is the one that runs, and the bindings read the header."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import edgemerge
from edgemerge import native
from edgemerge.native._libpath import LIB_DIR
from tests_support import package_env


def test_patched_libllama_is_loaded_by_llama_cpp():
    import ctypes

    import llama_cpp

    # The symbol exists only in a libllama built with edgemerge's native/src compiled in.
    fn = llama_cpp.llama_cpp._lib.edgemerge_version
    fn.restype = ctypes.c_char_p
    assert fn().decode() == edgemerge.__version__
    assert Path(llama_cpp.llama_cpp._base_path).resolve() == LIB_DIR.resolve()


def test_bindings_load_the_patched_libllama():
    assert native.version() == edgemerge.__version__
    assert native.lib().edgemerge_last_error() is not None


def test_constants_come_from_the_header():
    from edgemerge.native import kvmerge, kvstate, ops
    from edgemerge.reference import merge as reference_merge

    lib = native.lib()
    assert kvstate.MERGE_BIAS_MAX == lib.EDGEMERGE_BIAS_MAX == 65504
    assert kvstate.MERGE_SECTION_TAG == lib.EDGEMERGE_STATE_TAG
    assert kvstate.MERGE_SECTION_TAG.to_bytes(4, "little") == b"EGM1"
    for module in (kvmerge, ops, reference_merge):
        assert module.MERGE_MAGNITUDE == lib.EDGEMERGE_MERGE_MAGNITUDE
        assert module.MERGE_SLERP == lib.EDGEMERGE_MERGE_SLERP


def test_cdef_comes_from_the_header():
    cdef = native.cdef_from_header()
    assert "edgemerge_version" in cdef and "EDGEMERGE_BIAS_MAX" in cdef
    assert "#" not in cdef and "EDGEMERGE_API" not in cdef


def test_header_without_markers_is_rejected(tmp_path):
    bad = tmp_path / "edgemerge.h"
    bad.write_text("int edgemerge_version(void);\n")
    with pytest.raises(native.NativeError, match="CDEF"):
        native.cdef_from_header(bad)


def test_llama_cpp_imported_first_with_other_library_is_an_error(tmp_path):
    # A fresh interpreter that imports llama_cpp from a different library folder
    # before edgemerge: edgemerge must refuse, and say what to do.
    other = tmp_path / "otherlib"
    other.mkdir()
    for f in LIB_DIR.iterdir():
        (other / f.name).symlink_to(f.resolve())
    code = (
        f"import os; os.environ['LLAMA_CPP_LIB_PATH'] = {str(other)!r}\n"
        "import llama_cpp\n"
        "try:\n"
        "    import edgemerge\n"
        "except ImportError as e:\n"
        "    print('REFUSED', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env=package_env(),
    )
    assert "REFUSED" in out.stdout
    assert "Import edgemerge before llama_cpp" in out.stdout
