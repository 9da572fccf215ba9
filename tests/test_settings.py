"""MergeSettings: validated once, every error names its field and range."""

from __future__ import annotations

import dataclasses
import math

import pytest

from edgemerge.settings import MergeSettings, SettingsError


def test_defaults_are_valid_and_round_trip_through_a_dict():
    s = MergeSettings()
    assert MergeSettings.from_dict(s.to_dict()) == s
    t = MergeSettings(budget=1024, threshold="calibrated", similarity_layers=(3, 4))
    assert MergeSettings.from_dict(t.to_dict()) == t
    assert t.to_dict()["similarity_layers"] == [3, 4]


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MergeSettings().budget = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("budget", 0, "budget"),
        ("budget", -5, "budget"),
        ("budget", 0.0, "budget"),
        ("budget", 1.5, "budget"),
        ("budget", math.nan, "budget"),
        ("budget", "half", "budget"),
        ("budget", True, "budget"),
        ("block_size", 0, r"block_size: 0 must be an integer in \[1, 4096\]"),
        ("block_size", 2.5, "block_size"),
        ("sinks", -1, "sinks"),
        ("recent", -1, "recent"),
        ("threshold", math.nan, "threshold"),
        ("threshold", 1.5, "threshold"),
        ("threshold", "auto", "threshold"),
        ("similarity_layers", "first_half", "similarity_layers"),
        ("similarity_layers", (), "similarity_layers"),
        ("similarity_layers", (-1,), "similarity_layers"),
        ("retain_top", 1.0, "retain_top"),
        ("retain_top", math.inf, "retain_top"),
        ("sigma", 0.0, "sigma"),
        ("sigma", math.nan, "sigma"),
        ("magnitude", 1, "magnitude"),
        ("attention_bias", "yes", "attention_bias"),
        ("slack", -1, "slack"),
        ("max_merge_error", 0.0, "max_merge_error"),
        ("max_merge_error", math.nan, "max_merge_error"),
        ("eviction", "lru", "eviction"),
        ("store_type", "q4_0", r"store_type: 'q4_0' is not one of 'cache', 'q8_0'"),
    ],
)
def test_each_bad_value_is_rejected_with_its_field(field, value, message):
    with pytest.raises(SettingsError, match=message):
        MergeSettings(**{field: value})


def test_unknown_keys_are_rejected_and_known_ones_listed():
    with pytest.raises(SettingsError, match="unknown merge setting.*budgt.*known: .*budget"):
        MergeSettings.from_dict({"budgt": 100})


def test_budget_cells():
    assert MergeSettings(budget=300).budget_cells(10_000) == 300
    assert MergeSettings(budget=0.25).budget_cells(1000) == 250
    assert MergeSettings(budget=0.25).budget_cells(1) == 1
