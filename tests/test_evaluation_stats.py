"""Paired bootstrap intervals: coverage, the verdict words, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from edgemerge.evaluation.stats import PairedInterval, paired_bootstrap


def test_constant_difference_gives_a_point_interval() -> None:
    a = np.array([1.0, 2.0, 3.0, 4.0])
    iv = paired_bootstrap(a + 0.5, a)
    assert iv.diff == pytest.approx(0.5)
    assert iv.lo == pytest.approx(0.5) and iv.hi == pytest.approx(0.5)
    assert iv.n == 4
    assert iv.verdict() == "beats"
    assert iv.verdict(higher_is_better=False) == "loses"


def test_pairing_removes_the_shared_case_effect() -> None:
    # case difficulty varies far more than the rows differ; pairing must see through it
    rng = np.random.default_rng(1)
    difficulty = rng.normal(0.0, 5.0, 40)
    a = difficulty + 0.3 + rng.normal(0.0, 0.1, 40)
    b = difficulty + rng.normal(0.0, 0.1, 40)
    iv = paired_bootstrap(a, b)
    assert 0.2 < iv.lo < iv.diff < iv.hi < 0.4
    assert iv.verdict() == "beats"


def test_coverage_of_the_95_percent_interval() -> None:
    rng = np.random.default_rng(7)
    trials, covered = 300, 0
    for t in range(trials):
        d = rng.normal(0.25, 1.0, 40)
        iv = paired_bootstrap(d, np.zeros_like(d), n_boot=1000, seed=t)
        covered += iv.lo <= 0.25 <= iv.hi
    # a percentile bootstrap at n=40 covers a little under nominal
    assert 0.88 <= covered / trials <= 0.99


def test_ties_when_the_interval_holds_zero() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(0.0, 1.0, 20)
    b = a + rng.normal(0.0, 1.0, 20)
    iv = paired_bootstrap(a, b)
    assert (iv.verdict() == "ties") == (iv.lo <= 0.0 <= iv.hi)
    assert PairedInterval(0.1, -0.1, 0.3, 10).verdict() == "ties"
    assert PairedInterval(-0.2, -0.3, -0.1, 10).verdict(higher_is_better=False) == "beats"


def test_same_seed_same_interval() -> None:
    a, b = np.arange(10.0), np.arange(10.0)[::-1]
    assert paired_bootstrap(a, b, seed=5) == paired_bootstrap(a, b, seed=5)
    text = paired_bootstrap(a, b, seed=5).format()
    assert text.startswith("+0.00 [-") and text.endswith("]")


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "match"),
    [
        ([1.0, 2.0], [1.0], {}, "equal 1-D shapes"),
        ([1.0], [1.0], {}, "at least 2"),
        ([1.0, np.nan], [1.0, 2.0], {}, "finite"),
        ([1.0, 2.0], [1.0, 2.0], {"n_boot": 10}, "n_boot"),
        ([1.0, 2.0], [1.0, 2.0], {"level": 1.0}, "level"),
    ],
)
def test_bad_input(a: list, b: list, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(a, b, **kwargs)
