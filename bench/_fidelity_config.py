"""Configuration and result types of the fidelity harness (``bench/fidelity.py``).

They live apart from the script so that a saved run (``--raw``) can be loaded and
rendered again by any process that has ``bench/`` on its path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgemerge.evaluation.texts import (
    PLAIN_DOCS,
    RECALL_PAIRS,
    Context,
    Document,
    FidelityInputError,
)

DEFAULT_MODELS = ("qwen2.5-coder-0.5b", "gemma-3-270m")
# BlockMerge's ingredients and the MergeSettings that switch each one off (a flat kernel,
# sigma 1e6, gives plain mass shares)
ABLATION_SWITCHES: dict[str, dict[str, object]] = {
    "centre": {"centre": False},
    "retention": {"retain_top": 0.0},
    "gaussian": {"sigma": 1e6},
    "magnitude": {"magnitude": False},
    "bias": {"attention_bias": False},
}


@dataclass(frozen=True)
class Row:
    """One table row: a registry method with settings.

    ``budgets``: the budgets (percent) this row runs at; None: the run's budgets.
    ``group``: ``"main"`` rows form the method x budget tables, ``"ablation"`` rows run
    at the run's ablation budgets.
    """

    label: str
    method: str
    settings: Mapping[str, object] = field(default_factory=dict)
    budgets: tuple[int, ...] | None = None
    group: str = "main"

    @property
    def key(self) -> tuple[str, tuple[tuple[str, object], ...]]:
        """Identity of the compression (rows with equal keys compress identically)."""
        return self.method, tuple(sorted(self.settings.items()))


MAIN_ROWS: tuple[Row, ...] = (
    Row("full", "full", budgets=(100,)),
    Row("quant q8_0", "quant", {"key_type": "q8_0"}, budgets=(100,)),
    Row("quant q4_0", "quant", {"key_type": "q4_0"}, budgets=(100,)),
    Row("streaming_llm", "streaming_llm"),
    Row("h2o", "h2o"),
    Row("snapkv", "snapkv"),
    Row("expected_attention", "expected_attention"),
    Row("keydiff", "keydiff"),
    Row("cam", "cam"),
    # The paper's rule: merge every pair above epsilon = 0.75, even below the budget.
    Row("kvmerger (eps 0.75)", "kvmerger"),
    # The same method filling the budget: an epsilon above any cosine lets the budget
    # alone set the threshold.
    Row("kvmerger (eps from budget)", "kvmerger", {"threshold": 1.01}),
    Row("blockmerge", "blockmerge"),
)
ABLATION_ROWS: tuple[Row, ...] = tuple(
    Row(f"blockmerge, no {switch}", "blockmerge", off, group="ablation")
    for switch, off in ABLATION_SWITCHES.items()
)


@dataclass(frozen=True)
class FidelityConfig:
    """What one run measures (token counts are per context)."""

    budgets: tuple[int, ...] = (100, 50, 35, 25)
    ablation_budgets: tuple[int, ...] = (50, 35)
    n_context: int = 2000
    n_scored: int = 256
    n_passage: int = 800
    n_filler: int = 1200
    n_repeat: int = 300
    n_obs: int = 32
    n_probe: int = 64
    plain_docs: tuple[Document, ...] = PLAIN_DOCS
    recall_pairs: tuple[tuple[Document, Document], ...] = RECALL_PAIRS
    rows: tuple[Row, ...] = MAIN_ROWS + ABLATION_ROWS
    n_threads: int | None = None
    n_batch: int = 256

    def __post_init__(self) -> None:
        for name in ("budgets", "ablation_budgets"):
            values = getattr(self, name)
            if not all(isinstance(b, int) and 1 <= b <= 100 for b in values):
                raise FidelityInputError(f"{name} must be percentages in 1..100, got {values}")
        for name in ("n_obs", "n_probe", "n_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FidelityInputError(f"{name} must be a positive integer, got {value!r}")
        if not self.plain_docs and not self.recall_pairs:
            raise FidelityInputError("no texts: give plain_docs, recall_pairs or both")
        labels = [row.label for row in self.rows]
        if len(set(labels)) != len(labels):
            raise FidelityInputError(f"row labels must be unique, got {labels}")
        if self.n_threads is not None and self.n_threads < 1:
            raise FidelityInputError(f"n_threads must be positive, got {self.n_threads}")

    def row_budgets(self, row: Row) -> tuple[int, ...]:
        """The budgets (percent) ``row`` runs at in this configuration."""
        if row.group == "ablation":
            return tuple(
                b for b in self.ablation_budgets if row.budgets is None or b in row.budgets
            )
        if row.budgets is None:
            return self.budgets
        return tuple(b for b in self.budgets if b in row.budgets)


QUICK = FidelityConfig(
    budgets=(100, 50, 35),
    ablation_budgets=(50,),
    n_context=1000,
    n_scored=128,
    n_passage=400,
    n_filler=600,
    n_repeat=150,
    plain_docs=PLAIN_DOCS[:1],
    recall_pairs=RECALL_PAIRS[:1],
)


@dataclass(frozen=True)
class Measurement:
    """One method at one budget on one context."""

    n_cells: int
    budget_cells: int
    attn_error: np.ndarray  # float32 [n_layer], measure (a)
    nll: float  # mean over the scored tokens, measure (b) or (c)
    compress_s: float
    info: Mapping[str, object]


@dataclass
class ModelRun:
    """Everything measured for one model.

    ``results[(row label, budget percent, context index)]`` is a :class:`Measurement`,
    or a string saying why that cell could not be measured (a budget the method
    cannot meet).
    """

    model: str
    path: Path
    layers: tuple[int, ...]
    n_layer: int
    arch: str
    contexts: list[Context]
    results: dict[tuple[str, int, int], Measurement | str]
    seconds: float = 0.0
    capture_s: float = 0.0
    score_s: float = 0.0


def budget_cells(percent: int, n_cells: int) -> int:
    """Cells allowed at ``percent`` of ``n_cells`` (at least 1)."""
    return max(1, round(percent * n_cells / 100))
