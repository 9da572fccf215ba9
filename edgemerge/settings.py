"""`MergeSettings`: the one description of how edgemerge keeps a KV cache in budget.

The same frozen object is used by the Python API (``edgemerge.Llama(merge=...)``),
the CLI (one flag per field, generated from this class), and the GGUF
calibration metadata (``edgemerge.merge.*`` keys). It is validated once, when
built; every error names the field and the allowed range. Unknown keys are
rejected when building from a dict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Eviction = Literal["position", "none"]
StoreType = Literal["cache", "q8_0"]
STORE_TYPES = ("cache", "q8_0")
CALIBRATED = "calibrated"
LATTER_HALF = "latter_half"


class SettingsError(ValueError):
    """A merge setting is out of range; the message names the field and the range."""


@dataclass(frozen=True)
class MergeSettings:
    """How the KV cache is kept inside its budget (the rule: :mod:`edgemerge.merging.policy`).

    When a sequence would pass ``budget + slack`` cells, BlockMerge merges runs of
    similar neighbouring cells into one until the next chunk fits in ``budget``.

    Attributes:
        budget: cells a sequence may occupy. An int is an absolute cell count (>= 1); a
            float in (0, 1] is a fraction of the logical context so far.
        block_size: positions per block; a merge set never spans two blocks, so it holds
            at most block_size cells.
        sinks: leading positions (attention sinks) that are never merged or evicted.
        recent: most recent positions that are never merged or evicted.
        threshold: score at which neighbours merge, in [-1, 1]: the adjacent-key cosine
            averaged over the similarity layers and all heads. Every pair at or above it
            merges; below it, only as many as the budget needs. 1 merges only what the
            budget needs; "calibrated" uses per-layer thresholds stored in the GGUF by
            ``edgemerge calibrate``.
        similarity_layers: cache layers whose similarity counts: "latter_half" or a tuple
            of cache-layer indices.
        centre: subtract the mean key of the sequence's cells (per layer and head) before
            the cosine; off, the raw cosine, which runs higher (so merges more at the
            same threshold).
        retain_top: fraction (rounded down) of the mergeable cells kept verbatim because
            they are least similar to both neighbours, in [0, 1).
        sigma: Gaussian-kernel width relative to the mean distance to the pivot inside a
            set (> 0); the merge weights are that kernel times each member's mass. A large
            sigma (1e6) gives plain mass shares.
        magnitude: merge key directions and norms separately (magnitude retention, SLERP
            for pairs); values always merge by the weighted mean.
        attention_bias: give a merged cell log(tokens it stands for) as attention bias,
            and count those tokens as its mass when choosing pivots and weights.
        slack: cells past the budget tolerated before a merge runs (amortises planning).
        max_merge_error: largest estimated relative key error of a merge (for two unit
            keys with cosine c: sqrt(2 - 2 sqrt((1 + c) / 2)), on the averaged cosine);
            neighbours over it never merge. In (0, 2].
        eviction: what happens when merging alone cannot meet the budget: "position"
            evicts whole sets, oldest first (retained cells last, sinks and recent
            never); "none" raises an error instead.
        recall: keep the original K/V of every merged or evicted cell in a block store
            (host RAM, then a file) and, at the end of each prompt (a chat turn), bring
            back the stored blocks the prompt's last queries attend to most, exact, at
            their positions; less-attended cells make room, so the budget holds. On by
            default: without it a fact from an early turn is lost once its cells merge
            (docs/chat_memory.md).
        recall_window: prompt tokens at the end of a turn whose queries score the store.
            16 holds a short question and the template around it; a longer window
            reaches into the previous reply, whose queries pull up blocks like it and
            cost a 24K-token chat its answer (docs/chat_memory.md).
        recall_blocks: most blocks brought back per turn, following blocks included.
        recall_following: blocks after each chosen block that come back with it. A
            question's queries match the words that name a fact ("the pass key is"),
            and the value after them often starts in the next block, which scores low
            on its own: with eviction and recall, four needles per context were
            answered 3/12 without it and 12/12 with one on the dev split, but on the
            confirm split neither setting was ahead (docs/retrieval.md), so the
            default stays 0. A following block already exact in the cache is kept
            there while room is made.
        recall_threshold: least attention share (of the best layer and head, averaged over
            the window) a stored block needs to come back, in [0, 1).
        recall_skip_layers: share of the model's layers, counted from the input, whose
            queries do not score stored blocks, in [0, 1). Early layers' heads match
            tokens and positions, not content; their shares outvoted the heads that
            retrieve (docs/chat_memory.md). At least the last cache layer always votes.
        recall_reeval: prompt tokens evaluated again after a restore, so that the reply's
            first token sees what came back (0 keeps the first pass); at most
            ``recent - 1`` of them, since older cells may have been merged or evicted.
        recall_every: in a reply, recall again after this many decoded tokens, scored by
            the queries of the last ``recall_window`` of them (0: only at the end of a
            prompt). A reply that quotes a long passage needs more of it than one turn's
            ``recall_blocks`` bring back; the blocks its own tokens point at come next.
            Each time costs a restore and ``recall_reeval`` tokens evaluated again.
        store_ram_mb: MiB of stored blocks kept in RAM; the rest spills to a file under
            the cache directory.
        store_type: how the store keeps the original rows: "cache" in the cache's own type,
            so a restore is byte-identical; "q8_0" re-encodes the rows of an f32/f16/bf16
            cache as q8_0 (about 1.9x less host memory than f16; a restored value is within
            half a q8_0 step of its original), and keeps a quantized cache's rows as they
            are. q8_0 needs K and V rows whose width is a multiple of 32; a model without
            that fails when recall starts.
    """

    budget: int | float = 0.5
    block_size: int = 16
    sinks: int = 16
    recent: int = 256
    threshold: float | str = 0.5
    similarity_layers: str | tuple[int, ...] = LATTER_HALF
    centre: bool = True
    retain_top: float = 0.05
    sigma: float = 1.0
    magnitude: bool = True
    attention_bias: bool = True
    slack: int = 64
    max_merge_error: float = 0.6
    eviction: Eviction = "position"
    recall: bool = True
    recall_window: int = 16
    recall_blocks: int = 8
    recall_following: int = 0
    recall_threshold: float = 0.0
    recall_skip_layers: float = 0.25
    recall_reeval: int = 32
    recall_every: int = 0
    store_ram_mb: int = 512
    store_type: StoreType = "cache"

    def __post_init__(self) -> None:
        _check_budget(self.budget)
        _check_int("block_size", self.block_size, 1, 4096)
        _check_int("sinks", self.sinks, 0, 1 << 20)
        _check_int("recent", self.recent, 0, 1 << 20)
        if isinstance(self.threshold, str):
            if self.threshold != CALIBRATED:
                raise SettingsError(
                    f"threshold: {self.threshold!r} is not a number in [-1, 1] or 'calibrated'"
                )
        else:
            _check_float("threshold", self.threshold, -1.0, 1.0)
        if isinstance(self.similarity_layers, str):
            if self.similarity_layers != LATTER_HALF:
                raise SettingsError(
                    f"similarity_layers: {self.similarity_layers!r} is not 'latter_half' or a "
                    "tuple of cache-layer indices"
                )
        else:
            layers = tuple(self.similarity_layers)
            if not layers or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers
            ):
                raise SettingsError(
                    f"similarity_layers: {self.similarity_layers!r} must be a non-empty tuple of "
                    "layer indices >= 0"
                )
            object.__setattr__(self, "similarity_layers", layers)
        _check_bool("centre", self.centre)
        _check_float("retain_top", self.retain_top, 0.0, 1.0, hi_open=True)
        _check_float("sigma", self.sigma, 0.0, 1e6, lo_open=True)
        _check_bool("magnitude", self.magnitude)
        _check_bool("attention_bias", self.attention_bias)
        _check_int("slack", self.slack, 0, 1 << 20)
        _check_float("max_merge_error", self.max_merge_error, 0.0, 2.0, lo_open=True)
        if self.eviction not in ("position", "none"):
            raise SettingsError(f"eviction: {self.eviction!r} is not 'position' or 'none'")
        _check_bool("recall", self.recall)
        _check_int("recall_window", self.recall_window, 1, 4096)
        _check_int("recall_blocks", self.recall_blocks, 1, 1 << 16)
        _check_int("recall_following", self.recall_following, 0, 64)
        _check_float("recall_threshold", self.recall_threshold, 0.0, 1.0, hi_open=True)
        _check_float("recall_skip_layers", self.recall_skip_layers, 0.0, 1.0, hi_open=True)
        _check_int("recall_reeval", self.recall_reeval, 0, 4096)
        _check_int("recall_every", self.recall_every, 0, 1 << 20)
        if 0 < self.recall_every < self.recall_window:
            raise SettingsError(
                f"recall_every: {self.recall_every} is shorter than recall_window "
                f"({self.recall_window}): each recall in a reply scores the last "
                "recall_window decoded tokens; raise recall_every or lower recall_window"
            )
        _check_int("store_ram_mb", self.store_ram_mb, 0, 1 << 24)
        if self.store_type not in STORE_TYPES:
            raise SettingsError(
                f"store_type: {self.store_type!r} is not one of "
                f"{', '.join(repr(t) for t in STORE_TYPES)}"
            )

    def budget_cells(self, logical_tokens: int) -> int:
        """The cell budget for a sequence of ``logical_tokens`` tokens."""
        if isinstance(self.budget, float):
            return max(1, math.floor(self.budget * logical_tokens))
        return self.budget

    def protected(self) -> int:
        """Cells that are never merged: sinks plus the recent window."""
        return self.sinks + self.recent

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(self.similarity_layers, tuple):
            d["similarity_layers"] = list(self.similarity_layers)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MergeSettings:
        """Build from a dict; unknown keys are an error that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(
                f"unknown merge setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        d = dict(data)
        if isinstance(d.get("similarity_layers"), list):
            d["similarity_layers"] = tuple(d["similarity_layers"])
        return cls(**d)


def _check_budget(v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SettingsError(f"budget: {v!r} must be a cell count >= 1 or a fraction in (0, 1]")
    if isinstance(v, int):
        if v < 1:
            raise SettingsError(f"budget: {v} cells is impossible; use a cell count >= 1")
        return
    if not math.isfinite(v) or not 0.0 < v <= 1.0:
        raise SettingsError(f"budget: {v!r} is not a fraction in (0, 1] (or an int cell count)")


def _check_int(name: str, v: object, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise SettingsError(f"{name}: {v!r} must be an integer in [{lo}, {hi}]")


def _check_float(
    name: str, v: object, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok:
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise SettingsError(f"{name}: {v!r} must be a finite number in {rng}")


def _check_bool(name: str, v: object) -> None:
    if not isinstance(v, bool):
        raise SettingsError(f"{name}: {v!r} must be true or false")
