"""`edgemerge bench --quick` on the real Qwen 0.5B: the CI smoke run of the suite.

It checks that the preset runs end to end through the command line (every task, both
modes, report and plots), and two facts about the real model that the tasks rely on:
with the full cache it finds the pass key and the needle, and compressed rows report
fewer KV bytes than full.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from edgemerge.evaluation import report, suite
from tests_support import package_env, require_suite_texts


@pytest.mark.slow
def test_quick_preset_end_to_end(tmp_path: Path) -> None:
    require_suite_texts(suite.QUICK)
    out, raw = tmp_path / "results.md", tmp_path / "raw.pkl"
    proc = subprocess.run(
        [sys.executable, "-m", "edgemerge", "bench", "--quick", "--no-progress"]
        + ["--out", str(out), "--raw", str(raw)],
        capture_output=True,
        text=True,
        env=package_env(),
        cwd=tmp_path,
        timeout=1200,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for heading in ("offline: score per task", "streaming: score per task", "Speed and memory"):
        assert heading in text
    pngs = sorted(p.name for p in (tmp_path / "results").glob("*.png"))
    assert pngs == sorted(
        f"qwen2.5-coder-0.5b-{kind}.png" for kind in ("offline", "streaming", "niah")
    )

    saved = pickle.loads(raw.read_bytes())
    (run,) = saved["runs"]
    scores = report.task_scores(run)
    for mode in ("offline", "streaming"):
        assert scores[("full", mode, 100, "passkey")] == 1.0
    assert scores[("full", "offline", 100, "niah")] == 1.0
    full_bytes = {r.case: r.kv_bytes for r in run.results if (r.row, r.mode) == ("full", "offline")}
    for r in run.results:
        if r.budget < 100:
            assert r.kv_bytes < full_bytes[r.case]
    assert {s.row for s in run.speeds} == {"full", "blockmerge"}
    assert len(report.verdicts(run, suite.QUICK)) == 4  # 2 modes x 2 budgets
