"""Every submodule is an attribute of its package (`edgemerge.models`), imported on first use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import edgemerge
from tests_support import package_env

PACKAGE = Path(edgemerge.__file__).parent


def submodule_names() -> list[str]:
    """Dotted names of every module and package under edgemerge, from the files (no import)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if "__main__" in parts or len(parts) == 1:
            continue  # running __main__ would start the CLI
        names.append(".".join(parts))
    return names


CHILD = """
import sys
import edgemerge
heavy = ("llama_cpp", "cffi", "edgemerge.models", "edgemerge.evaluation", "edgemerge.merging")
print("loaded at import:", sorted(m for m in heavy if m in sys.modules))
for full in sys.argv[1:]:
    obj = edgemerge
    for part in full.split(".")[1:]:
        obj = getattr(obj, part)
    assert obj.__name__ == full, (obj.__name__, full)
print("reached", len(sys.argv) - 1)
"""


def test_every_submodule_is_reachable_as_an_attribute_and_none_is_imported_up_front():
    names = submodule_names()
    documented = {
        "edgemerge.models",
        "edgemerge.evaluation.suite",
        "edgemerge.reference.merge",
        "edgemerge.native",
        "edgemerge.native.ops",
        "edgemerge.native.kvcells",
        "edgemerge.native.kvmerge",
        "edgemerge.native.kvstate",
        "edgemerge.native.capture",
        "edgemerge.merging.policy",
        "edgemerge.merging.planner",
        "edgemerge.merging.calibration",
        "edgemerge.merging.gguf_meta",
        "edgemerge.prefix.blocktable",
        "edgemerge.prefix.blockcache",
        "edgemerge.prefix.sequences",
        "edgemerge.prefix.conversations",
        "edgemerge.testing.tiny_models",
    }
    assert documented <= set(names)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *names],
        capture_output=True,
        text=True,
        timeout=300,
        env=package_env(),
    )
    assert out.returncode == 0, out.stderr
    assert "loaded at import: []" in out.stdout
    assert f"reached {len(names)}" in out.stdout


def test_unknown_attributes_and_dir():
    assert "models" in dir(edgemerge) and "MergeSettings" in dir(edgemerge)
    assert "suite" in dir(edgemerge.evaluation)
    assert {"native", "merging", "prefix", "testing"} <= set(dir(edgemerge))
    assert {"kvcells", "lib", "check"} <= set(dir(edgemerge.native))
    with pytest.raises(AttributeError, match="module 'edgemerge' has no attribute 'no_such'"):
        edgemerge.no_such  # noqa: B018
    with pytest.raises(AttributeError, match="'edgemerge.reference' has no attribute 'nope'"):
        edgemerge.reference.nope  # noqa: B018
    assert not hasattr(edgemerge, "__wrapped__")  # dunders are never looked up as modules
