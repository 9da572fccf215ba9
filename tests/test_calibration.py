"""`edgemerge calibrate`: per-layer thresholds measured on real text, stored in a GGUF copy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgemerge import Llama, MergeSettings
from edgemerge.merging import calibration
from edgemerge.merging.calibration import CalibrationError, layer_thresholds, read_calibration
from edgemerge.merging.gguf_meta import read_header
from edgemerge.native import kvcells
from tests_support import english_text, licence_text, package_env

TEXT = english_text().encode()  # real prose, present on every machine


@pytest.fixture(scope="module")
def calibrated(tiny_qwen2_path, tmp_path_factory):
    import llama_cpp

    vocab = llama_cpp.Llama(str(tiny_qwen2_path), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(TEXT)[:400]
    cal = calibration.calibrate(tiny_qwen2_path, tokens, budget=0.4, text="stdlib docstrings")
    out = tmp_path_factory.mktemp("cal") / "calibrated.gguf"
    return calibration.write_calibrated(tiny_qwen2_path, out, cal), cal


def test_thresholds_are_the_budget_quantile_per_layer():
    rng = np.random.default_rng(0)
    sim = rng.uniform(-1, 1, size=(3, 2, 1001)).astype(np.float32)
    sim[1] += 0.5  # a layer whose similarities run higher gets a higher threshold
    t = layer_thresholds(sim, 0.25)
    per = sim.astype(np.float64).mean(axis=1)
    np.testing.assert_allclose(t, np.quantile(per, 0.25, axis=1), rtol=1e-6)
    assert t[1] > t[0]
    for layer in range(3):  # 75% of each layer's pairs sit at or above its threshold
        assert np.mean(per[layer] >= t[layer]) == pytest.approx(0.75, abs=0.01)
    with pytest.raises(CalibrationError, match="budget"):
        layer_thresholds(sim, 0.0)


def test_round_trip_through_the_gguf(calibrated, tiny_qwen2_path):
    path, cal = calibrated
    back = read_calibration(path)
    np.testing.assert_array_equal(back.thresholds, cal.thresholds)
    assert back.budget == pytest.approx(0.4)
    assert back.n_tokens == 400 and back.text == "stdlib docstrings"
    assert back.settings.threshold == "calibrated"
    assert back.settings == cal.settings
    np.testing.assert_array_equal(back.head_mean, cal.head_mean)
    np.testing.assert_array_equal(back.head_std, cal.head_std)
    assert back.head_mean.shape == (2, 2)  # tiny qwen2: 2 layers x 2 KV heads
    assert np.all(np.abs(back.head_mean) <= 1) and np.all(back.head_std > 0)
    assert read_calibration(tiny_qwen2_path) is None
    # every original key, tensor info and tensor byte is there
    a, b = read_header(tiny_qwen2_path), read_header(path)
    assert set(a.kvs) < set(b.kvs)
    assert all(b.kvs[k] == v for k, v in a.kvs.items())
    ra, rb = Path(tiny_qwen2_path).read_bytes(), Path(path).read_bytes()
    assert ra[slice(*a.info_range)] == rb[slice(*b.info_range)]
    assert ra[a.data_offset :] == rb[b.data_offset :]


def test_calibrating_twice_replaces_the_old_keys(calibrated, tmp_path):
    path, cal = calibrated
    again = calibration.write_calibrated(path, tmp_path / "again.gguf", cal)
    assert read_header(again).kvs.keys() == read_header(path).kvs.keys()
    assert read_header(again).n_tensors == read_header(path).n_tensors
    np.testing.assert_array_equal(read_calibration(again).thresholds, cal.thresholds)


def test_llama_uses_the_calibrated_thresholds(calibrated):
    path, cal = calibrated
    s = MergeSettings(
        budget=160, threshold="calibrated", sinks=4, recent=32, block_size=8, slack=16
    )
    llm = Llama(str(path), merge=s, n_ctx=256, n_batch=32, n_threads=1, verbose=False)
    np.testing.assert_array_equal(llm._planner.layer_thresholds, cal.thresholds)
    llm.eval(llm.tokenize(TEXT)[:500])
    assert llm.merge_stats().cells <= 176
    assert len(kvcells.list_cells(llm)) == llm.merge_stats().cells


def test_wrong_version_is_a_clear_error(calibrated, tmp_path):
    path, _ = calibrated
    data = bytearray(Path(path).read_bytes())
    key = b"edgemerge.calibration.version"
    at = data.index(key) + len(key) + 4  # past the key and its value type
    data[at : at + 4] = (99).to_bytes(4, "little")
    bad = tmp_path / "v99.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CalibrationError, match="version 99"):
        read_calibration(bad)


def test_cli_calibrates_and_refuses_to_overwrite_its_input(tiny_qwen2_path, tmp_path):
    out = tmp_path / "c.gguf"
    run = [sys.executable, "-m", "edgemerge", "calibrate", str(tiny_qwen2_path), "-o"]
    ok = subprocess.run(
        [*run, str(out), "--tokens", "300"],
        capture_output=True,
        text=True,
        env=package_env(),
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert read_calibration(out) is not None
    same = subprocess.run(
        [*run, str(tiny_qwen2_path)], capture_output=True, text=True, env=package_env(), timeout=300
    )
    assert same.returncode == 1 and "input model" in same.stderr
    missing = subprocess.run(
        [*run, str(out), "--text", str(tmp_path / "none.txt")],
        capture_output=True,
        text=True,
        env=package_env(),
        timeout=300,
    )
    assert missing.returncode == 1 and "none.txt" in missing.stderr
    assert "Traceback" not in same.stderr + missing.stderr


def _stock_lib() -> Path | None:
    base = os.environ.get("EDGEMERGE_CACHE_DIR") or str(Path.home() / ".cache" / "edgemerge")
    lib = Path(base) / "stock-llama-cpp-python-0.3.36" / "lib"
    return lib if (lib / "libllama.so").exists() else None


@pytest.mark.slow
@pytest.mark.skipif(
    _stock_lib() is None,
    reason="stock llama-cpp-python not built; run `python bench/stock_llama.py`",
)
def test_stock_llama_cpp_still_loads_the_calibrated_file(calibrated):
    path, _ = calibrated
    assert_stock_llama_cpp_loads(path)


def assert_stock_llama_cpp_loads(path: Path) -> None:
    """Stock llama-cpp-python (its own libllama, no edgemerge import) completes with ``path``."""
    code = (
        "import llama_cpp\n"
        f"llm = llama_cpp.Llama({str(path)!r}, n_ctx=64, verbose=False)\n"
        "print(llm.create_completion('Hello', max_tokens=4, temperature=0)['usage'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["LLAMA_CPP_LIB_PATH"] = str(_stock_lib())
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd="/"
    )
    assert out.returncode == 0, out.stderr
    assert "completion_tokens" in out.stdout


def _real_model(name: str) -> Path | None:
    from edgemerge.models import ModelError, resolve_model

    try:
        return resolve_model(name)
    except ModelError:
        return None


@pytest.mark.slow
@pytest.mark.skipif(
    _real_model("gemma-3-270m") is None, reason="run `edgemerge models pull gemma-3-270m`"
)
def test_real_gemma_thresholds_hold_on_other_text(tmp_path):
    """Gemma 3 270M: thresholds for its 3 full-attention layers only, and they generalise."""
    import inspect

    import llama_cpp

    from edgemerge.native.capture import capture_kv
    from edgemerge.reference.similarity import adjacent_similarity

    path = _real_model("gemma-3-270m")
    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    # calibrated on licence prose, held out on code: the thresholds must carry over
    cal_tokens = vocab.tokenize(licence_text("GPL-3").encode(), add_bos=False)[:1024]
    other = open(inspect.getsourcefile(inspect), "rb").read()
    held_out = vocab.tokenize(other, add_bos=False)[:1024]
    cal = calibration.calibrate(path, cal_tokens, budget=0.5, text="GPL-3")
    merged = np.flatnonzero(np.isfinite(cal.thresholds)).tolist()
    assert merged == [5, 11, 17]  # the sliding-window layers are never merged
    assert np.isnan(cal.head_mean[0]).all() and np.isfinite(cal.head_mean[merged]).all()
    # On held-out text each layer's threshold still splits its pairs roughly in half.
    sim = adjacent_similarity(capture_kv(str(path), held_out, n_obs=0).keys).mean(axis=1)
    above = (sim >= cal.thresholds[merged][:, None]).mean(axis=1)
    assert np.all((above > 0.3) & (above < 0.7)), above
    out = calibration.write_calibrated(path, tmp_path / "gemma-calibrated.gguf", cal)
    assert read_calibration(out).thresholds.tolist()[5] == cal.thresholds[5]
    if _stock_lib() is not None:
        assert_stock_llama_cpp_loads(out)
    s = MergeSettings(budget=192, threshold="calibrated", sinks=4, recent=64, slack=16)
    llm = Llama(str(out), merge=s, n_ctx=512, n_batch=64, verbose=False)
    llm.eval(held_out[:400])
    assert llm.merge_stats().cells <= 192 + 16
