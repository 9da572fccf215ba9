"""GGML_OP_MERGE_ROWS on each backend against the numba oracle (test-backend-ops style).

The native op dequantizes each member row itself; the oracle gets the same rows
dequantized by :mod:`edgemerge.reference.ggml_quants` (checked byte-exact against
ggml in test_ggml_quants.py), so the only difference left is float32 vs float64
accumulation. Tolerance: normalised mean squared error below 1e-10 and max
relative error below 1e-4, for every type.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgemerge import native
from edgemerge.native import ops
from edgemerge.reference.ggml_quants import dequantize_rows, quantize_rows
from edgemerge.reference.merge import merge_rows_grouped

TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0"]
BACKENDS = ["CPU", pytest.param("CUDA0", marks=pytest.mark.gpu)]
NMSE_TOL = 1e-10
MAX_REL_TOL = 1e-4


@pytest.fixture(autouse=True, params=["fused", "vec"])
def cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test twice on the CPU: the fused per-head path where the build has it, and the
    vec-helper path (EDGEMERGE_MERGE_ROWS_VEC=1), which other targets run."""
    if request.param == "vec":
        monkeypatch.setenv("EDGEMERGE_MERGE_ROWS_VEC", "1")
    else:
        monkeypatch.delenv("EDGEMERGE_MERGE_ROWS_VEC", raising=False)
    return request.param


def random_groups(rng: np.random.Generator, n_rows: int, n_group: int, max_size: int = 6):
    sizes = rng.integers(1, max_size + 1, size=n_group)
    sizes[: min(3, n_group)] = 2  # always exercise the two-member (SLERP) path
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    idx = np.concatenate([rng.choice(n_rows, size=s, replace=False) for s in sizes])
    return idx.astype(np.int32), offsets


def normalised_weights(rng: np.random.Generator, offsets: np.ndarray, n_head: int) -> np.ndarray:
    w = rng.random((offsets[-1], n_head)).astype(np.float32) + 0.05
    for g in range(len(offsets) - 1):
        w[offsets[g] : offsets[g + 1]] /= w[offsets[g] : offsets[g + 1]].sum(axis=0)
    return w


def encode(x: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(raw rows for the native op, the same rows as float for the oracle)."""
    if qtype == "f32":
        return x, x
    raw = quantize_rows(x, qtype)
    return raw, dequantize_rows(raw, qtype, x.shape[1])


def nmse(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.sum((got - want) ** 2) / max(np.sum(want.astype(np.float64) ** 2), 1e-30))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("magnitude,slerp", [(True, True), (True, False), (False, False)])
# head_dim 48 is no multiple of GGML_F32_STEP: the vec-helper path, not the fused one
@pytest.mark.parametrize("n_head,head_dim", [(2, 64), (1, 256), (4, 32), (2, 48)])
def test_native_matches_reference(backend, qtype, magnitude, slerp, n_head, head_dim):
    rng = np.random.default_rng(n_head * 1000 + head_dim)
    n_embd, n_rows, n_group = n_head * head_dim, 64, 24
    # keys share a common component, as real keys do (DESIGN-NOTES §3)
    x = (rng.standard_normal((n_rows, n_embd)) + 2.0).astype(np.float32)
    idx, offsets = random_groups(rng, n_rows, n_group)
    w = normalised_weights(rng, offsets, n_head)
    raw, as_float = encode(x, qtype)

    got = ops.merge_rows(
        raw,
        qtype,
        n_embd,
        idx,
        w,
        offsets,
        n_head,
        magnitude=magnitude,
        slerp=slerp,
        backend=backend,
    )
    want = merge_rows_grouped(
        as_float, idx, w, offsets, n_head, magnitude=magnitude, slerp_pairs=slerp
    )

    assert got.shape == (n_group, n_embd)
    assert np.all(np.isfinite(got))
    assert nmse(got, want) < NMSE_TOL
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < MAX_REL_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("magnitude", [True, False])
def test_large_groups_match_reference(backend, qtype, magnitude):
    """Groups of 40 and 100 members: on the CPU (4 threads by default) they cross thread
    boundaries, so their sums are split into per-thread partials and combined."""
    rng = np.random.default_rng(7)
    n_head, head_dim, n_rows = 2, 64, 200
    sizes = [40, 100, 2, 7, 1]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    idx = rng.choice(n_rows, size=offsets[-1], replace=False).astype(np.int32)
    x = (rng.standard_normal((n_rows, n_head * head_dim)) + 2.0).astype(np.float32)
    x[idx[5]] = 0.0  # a zero member inside a split group adds nothing to the direction
    w = normalised_weights(rng, offsets, n_head)
    raw, as_float = encode(x, qtype)

    got = ops.merge_rows(
        raw, qtype, n_head * head_dim, idx, w, offsets, n_head, magnitude=magnitude, backend=backend
    )
    want = merge_rows_grouped(
        as_float, idx, w, offsets, n_head, magnitude=magnitude, slerp_pairs=True
    )
    assert np.all(np.isfinite(got))
    assert nmse(got, want) < NMSE_TOL
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < MAX_REL_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_rows_merge_to_themselves(backend):
    rng = np.random.default_rng(1)
    row = rng.standard_normal((1, 128)).astype(np.float32)
    x = np.repeat(row, 5, axis=0)
    for size in (2, 5):
        offsets = np.array([0, size], np.int32)
        w = normalised_weights(rng, offsets, 2)
        got = ops.merge_rows(
            x, "f32", 128, np.arange(size, dtype=np.int32), w, offsets, 2, backend=backend
        )
        np.testing.assert_allclose(got[0], row[0], rtol=1e-5, atol=1e-6)


def test_magnitude_retention_keeps_the_norm():
    # two orthogonal unit-norm rows: the plain mean shrinks to 1/sqrt(2), magnitude keeps 1
    x = np.zeros((2, 64), np.float32)
    x[0, 0] = x[1, 1] = 3.0
    offsets = np.array([0, 2], np.int32)
    w = np.full((2, 1), 0.5, np.float32)
    kept = ops.merge_rows(x, "f32", 64, np.array([0, 1], np.int32), w, offsets, 1)
    mean = ops.merge_rows(x, "f32", 64, np.array([0, 1], np.int32), w, offsets, 1, magnitude=False)
    assert np.linalg.norm(kept) == pytest.approx(3.0, rel=1e-6)
    assert np.linalg.norm(mean) == pytest.approx(3.0 / np.sqrt(2.0), rel=1e-6)


def test_zero_rows_do_not_produce_nan():
    x = np.zeros((3, 64), np.float32)
    x[2, :] = 1.0
    idx = np.array([0, 1, 0, 2], np.int32)
    offsets = np.array([0, 2, 4], np.int32)
    w = np.full((4, 1), 0.5, np.float32)
    got = ops.merge_rows(x, "f32", 64, idx, w, offsets, 1)
    assert np.all(np.isfinite(got))
    assert np.all(got[0] == 0.0)
    np.testing.assert_allclose(
        got[1], 0.5 * np.linalg.norm(x[2]) * x[2] / np.linalg.norm(x[2]), rtol=1e-6
    )


def _args(**over):
    rng = np.random.default_rng(0)
    a = dict(
        rows=rng.standard_normal((4, 64)).astype(np.float32),
        qtype="f32",
        n_embd=64,
        idx=np.array([0, 1, 2], np.int32),
        weights=np.full((3, 2), 0.5, np.float32),
        offsets=np.array([0, 2, 3], np.int32),
        n_head=2,
    )
    a.update(over)
    return a


def _call(**over):
    a = _args(**over)
    return ops.merge_rows(
        a.pop("rows"),
        a.pop("qtype"),
        a.pop("n_embd"),
        a.pop("idx"),
        a.pop("weights"),
        a.pop("offsets"),
        a.pop("n_head"),
        backend=a.pop("backend", "CPU"),
    )


@pytest.mark.parametrize(
    "over,message",
    [
        (dict(idx=np.array([0, 1, 9], np.int32)), "outside"),
        (dict(idx=np.array([0, -1, 2], np.int32)), "outside"),
        (dict(offsets=np.array([0, 0, 3], np.int32)), "empty"),
        (
            dict(
                offsets=np.array([0, 2, 2], np.int32),
                idx=np.array([0, 1], np.int32),
                weights=np.full((2, 2), 0.5, np.float32),
            ),
            "empty",
        ),
        (dict(offsets=np.array([1, 2, 3], np.int32)), "start at 0"),
        (dict(weights=np.array([[0.5, np.nan], [0.5, 0.5], [1, 1]], np.float32)), "not finite"),
        (dict(weights=np.array([[0.5, np.inf], [0.5, 0.5], [1, 1]], np.float32)), "not finite"),
        (dict(n_head=3, weights=np.full((3, 3), 0.5, np.float32)), "multiple of n_head"),
        (dict(backend="NoSuchBackend"), "no ggml backend"),
    ],
)
def test_invalid_arguments_are_errors_not_aborts(over, message):
    with pytest.raises(native.NativeError, match=message):
        _call(**over)


def test_bad_row_shape_is_rejected_in_python():
    with pytest.raises(ValueError, match="rows must be"):
        _call(rows=np.zeros((4, 10), np.uint8), qtype="q8_0")


@pytest.mark.parametrize("n_threads", [1, 2, 0])
def test_the_benchmark_entry_point_merges_as_the_op_does(n_threads):
    """The kernel bench's timed runs (with the backend's threads set, or its default for 0)
    give the same rows as one plain run."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((64, 128)) + 2.0).astype(np.float32)
    idx, offsets = random_groups(rng, 64, 12)
    w = normalised_weights(rng, offsets, 2)
    want = ops.merge_rows(x, "f32", 128, idx, w, offsets, 2)
    got, secs = ops.time_merge_rows(
        x, "f32", 128, idx, w, offsets, 2, n_iter=2, n_threads=n_threads
    )
    assert secs > 0 and np.array_equal(got, want)
    with pytest.raises(ValueError, match="n_threads"):
        ops.time_merge_rows(x, "f32", 128, idx, w, offsets, 2, n_threads=-1)
