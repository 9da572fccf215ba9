"""Markdown for the fidelity harness: method x budget tables per measure and model.

Every number here is computed from the :class:`_fidelity_config.ModelRun` results; the
summary lines (BlockMerge beside full and the best baseline, the ablation that
hurts most) are derived from the same tables, so a rerun rewrites them.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from typing import Literal

import numpy as np
from _fidelity_config import FidelityConfig, Measurement, ModelRun, Row

Kind = Literal["plain", "recall"]
# Methods that are not baselines for BlockMerge: the reference and the quantized caches
# keep every cell. The BlockMerge row that the summary and the ablations compare with
# is the main row labelled "blockmerge".
_NOT_BASELINES = ("full", "quant", "blockmerge")


def _measurements(
    run: ModelRun, label: str, pct: int, kind: Kind
) -> list[Measurement] | str | None:
    """The row's measurements on every context of ``kind``; a reason string if any is
    missing; None if the row did not run at that budget."""
    found: list[Measurement] = []
    for ci, context in enumerate(run.contexts):
        if context.kind != kind:
            continue
        entry = run.results.get((label, pct, ci))
        if entry is None:
            return None
        if isinstance(entry, str):
            return entry
        found.append(entry)
    return found or None


def mean_nll(run: ModelRun, label: str, pct: int, kind: Kind) -> float | None:
    """Mean NLL over the contexts of ``kind`` (None when not measured)."""
    found = _measurements(run, label, pct, kind)
    if not isinstance(found, list):
        return None
    return float(np.mean([m.nll for m in found]))


def layer_errors(run: ModelRun, label: str, pct: int, kind: Kind) -> np.ndarray | None:
    """Attention-output error per layer, averaged over the contexts of ``kind``."""
    found = _measurements(run, label, pct, kind)
    if not isinstance(found, list):
        return None
    return np.mean([m.attn_error for m in found], axis=0)


def _cell(run: ModelRun, row: Row, pct: int, kind: Kind, measure: str, notes: list[str]) -> str:
    found = _measurements(run, row.label, pct, kind)
    if found is None:
        return "·"
    if isinstance(found, str):
        note = f"{row.label} at {pct}%: {found}"
        if note not in notes:
            notes.append(note)
        return "n/a"
    if measure == "nll":
        text = f"{np.mean([m.nll for m in found]):.3f}"
    else:
        per_layer = np.mean([m.attn_error for m in found], axis=0)
        text = f"{per_layer.mean():.3f} ({per_layer.max():.2f})"
    cells = float(np.mean([m.n_cells for m in found]))
    budget = float(np.mean([m.budget_cells for m in found]))
    if cells < 0.98 * budget:  # a method that stops short of its budget says so
        text += f" [{cells:.0f} cells]"
    return text


def _table(
    run: ModelRun, rows: Sequence[Row], budgets: Sequence[int], kind: Kind, measure: str
) -> list[str]:
    notes: list[str] = []
    lines = [
        "| method | " + " | ".join(f"{b}%" for b in budgets) + " |",
        "| --- |" + " ---: |" * len(budgets),
    ]
    for row in rows:
        cells = [_cell(run, row, b, kind, measure, notes) for b in budgets]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- n/a: {n}" for n in notes] + ([""] if notes else [])
    return lines


def _best_baseline(
    run: ModelRun, rows: Sequence[Row], pct: int, kind: Kind
) -> tuple[str, float] | None:
    best: tuple[str, float] | None = None
    for row in rows:
        if row.group != "main" or row.method in _NOT_BASELINES:
            continue
        value = mean_nll(run, row.label, pct, kind)
        if value is not None and (best is None or value < best[1]):
            best = (row.label, value)
    return best


def _summary(run: ModelRun, config: FidelityConfig) -> list[str]:
    lines: list[str] = []
    main = [r for r in config.rows if r.group == "main"]
    blockmerge = next((r for r in main if r.label == "blockmerge"), None)
    full = next((r for r in main if r.method == "full"), None)
    for kind, name in (("recall", "recall NLL"), ("plain", "continuation NLL")):
        if not any(c.kind == kind for c in run.contexts) or blockmerge is None:
            continue
        ref = mean_nll(run, full.label, 100, kind) if full is not None else None
        for pct in config.budgets:
            if pct == 100:
                continue
            ours = mean_nll(run, blockmerge.label, pct, kind)
            best = _best_baseline(run, main, pct, kind)
            if ours is None or best is None:
                continue
            text = f"- {name} at {pct}%: blockmerge {ours:.3f}"
            if ref is not None:
                text += f", full {ref:.3f}"
            text += f", best baseline {best[1]:.3f} ({best[0]})"
            if ours > best[1]:
                text += f"; blockmerge is {ours - best[1]:.3f} above that baseline"
            elif ref is not None and best[1] > ref:
                closed = (best[1] - ours) / (best[1] - ref)
                text += f"; blockmerge closes {100 * closed:.0f}% of that baseline's gap to full"
            lines.append(text + ".")
    ablations = [r for r in config.rows if r.group == "ablation"]
    if blockmerge is not None and ablations:
        for kind, name in (("recall", "recall NLL"), ("plain", "continuation NLL")):
            deltas = []
            for row in ablations:
                diffs = []
                for pct in config.row_budgets(row):
                    off = mean_nll(run, row.label, pct, kind)
                    on = mean_nll(run, blockmerge.label, pct, kind)
                    if off is not None and on is not None:
                        diffs.append(off - on)
                if diffs:
                    deltas.append((float(np.mean(diffs)), row.label))
            if deltas:
                deltas.sort(reverse=True)
                listed = ", ".join(f"{label} {d:+.3f}" for d, label in deltas)
                lines.append(
                    f"- ablations, change in {name} against blockmerge (mean over "
                    f"{'/'.join(str(b) for b in config.ablation_budgets)}%): {listed}; "
                    f"the costliest to switch off: {deltas[0][1]}."
                )
    return lines


def _ablation_table(run: ModelRun, config: FidelityConfig) -> list[str]:
    rows = [r for r in config.rows if r.group == "ablation"]
    blockmerge = [r for r in config.rows if r.group == "main" and r.label == "blockmerge"]
    if not rows:
        return []
    budgets = config.ablation_budgets
    head = []
    for measure in ("recall NLL", "continuation NLL", "attention error, plain"):
        head += [f"{measure} {b}%" for b in budgets]
    lines = [
        "| row | " + " | ".join(head) + " |",
        "| --- |" + " ---: |" * len(head),
    ]
    notes: list[str] = []
    for row in blockmerge + rows:
        cells = []
        for kind, measure in (("recall", "nll"), ("plain", "nll"), ("plain", "attn")):
            cells += [_cell(run, row, b, kind, measure, notes) for b in budgets]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- n/a: {n}" for n in notes] + ([""] if notes else [])
    return lines


def _per_layer(run: ModelRun, config: FidelityConfig, kind: Kind) -> list[str]:
    budgets = [b for b in config.budgets if b != 100][:2]
    rows = [r for r in config.rows if r.group == "main"]
    lines = [
        "| method | budget | " + " | ".join(f"L{il}" for il in run.layers) + " |",
        "| --- | ---: |" + " ---: |" * len(run.layers),
    ]
    for pct in budgets:
        for row in rows:
            err = layer_errors(run, row.label, pct, kind)
            if err is None:
                continue
            lines.append(f"| {row.label} | {pct}% | " + " | ".join(f"{e:.3f}" for e in err) + " |")
    return lines


def _contexts_lines(run: ModelRun) -> list[str]:
    lines = []
    for context in run.contexts:
        what = "continuation" if context.kind == "plain" else "recall"
        lines.append(
            f"- {what}: {context.label}: {context.prefix.shape[0]} context cells, "
            f"{context.n_scored} scored tokens"
        )
    return lines


def _model_section(run: ModelRun, config: FidelityConfig) -> list[str]:
    main = [r for r in config.rows if r.group == "main"]
    compressed = (
        f"layers {', '.join(str(il) for il in run.layers)} of {run.n_layer} "
        "(the full-attention ones; the sliding-window cache is kept as it is)"
        if len(run.layers) < run.n_layer
        else f"all {run.n_layer} layers"
    )
    lines = [
        f"## {run.model}",
        "",
        f"`{run.path.name}` ({run.arch}); compressed: {compressed}. Contexts:",
        "",
        *_contexts_lines(run),
        "",
        f"Time: {run.seconds / 60:.1f} min in all ({run.capture_s / 60:.1f} min capturing, "
        f"{run.score_s / 60:.1f} min scoring).",
        "",
    ]
    summary = _summary(run, config)
    if summary:
        lines += ["Summary (derived from the tables below):", "", *summary, ""]
    budgets = list(config.budgets)
    for kind, title in (
        ("recall", "(c) Recall NLL of the repeated passage (nats/token, lower is better)"),
        ("plain", "(b) Continuation NLL on plain text (nats/token)"),
    ):
        if any(c.kind == kind for c in run.contexts):
            lines += [f"### {title}", "", *_table(run, main, budgets, kind, "nll")]
    for kind, what in (("plain", "plain-text"), ("recall", "recall")):
        if any(c.kind == kind for c in run.contexts):
            lines += [
                f"### (a) Attention-output relative error, {what} contexts",
                "",
                "Mean over layers, worst layer in brackets; queries of the first "
                f"{config.n_probe} tokens after the context.",
                "",
                *_table(run, main, budgets, kind, "attn"),
            ]
    ablation = _ablation_table(run, config)
    if ablation:
        lines += ["### Ablations: BlockMerge with one component switched off", "", *ablation]
    for kind, what in (("plain", "plain-text"), ("recall", "recall")):
        if any(c.kind == kind for c in run.contexts):
            lines += [
                "<details>",
                f"<summary>Per-layer attention-output error, {what} contexts</summary>",
                "",
                *_per_layer(run, config, kind),
                "",
                "</details>",
                "",
            ]
    return lines


def _method_lines(config: FidelityConfig) -> list[str]:
    lines = []
    for row in config.rows:
        settings = ", ".join(f"{k}={v!r}" for k, v in row.settings.items()) or "defaults"
        budgets = "/".join(str(b) for b in config.row_budgets(row))
        lines.append(f"- {row.label}: `{row.method}` ({settings}); budgets {budgets}%")
    return lines


def render_markdown(
    runs: Sequence[ModelRun],
    config: FidelityConfig,
    *,
    command: str,
    machine: str,
    elapsed_s: float,
) -> str:
    """The whole report: setup, then one section per model."""
    today = _dt.date.today().isoformat()
    lines = [
        "# Fidelity of KV compression on real KV",
        "",
        "Written by `bench/fidelity.py`; rerun it rather than editing the numbers.",
        "",
        f"- command: `{command}`",
        f"- machine: {machine}",
        f"- date: {today}; wall time {elapsed_s / 60:.1f} min",
        "",
        "How the numbers are made (details in the harness's docstring): each context's KV "
        "cache is captured once from the real model (f16 cache, flash attention off so "
        "that the attention mass each cell received is recorded) and every method "
        "compresses that same capture. Budgets are percentages of the context's cells. "
        "(b) and (c) write the compressed cells (K/V, positions, and the attention-mass "
        "bias and spans of merged cells) into the llama.cpp sequence state, restore it "
        "in a fresh context (flash attention on, the bias applied in the KQ mask by "
        "edgemerge's patched libllama) and score the tokens that follow at their true "
        "positions. (c): a passage, other text, then the passage's first tokens again; "
        "the NLL of that repeat. (a) uses queries the methods never saw: those of the "
        "first tokens after the context, from a second capture. `n/a`: the budget is "
        "below what the method always keeps; `[N cells]`: the method used fewer cells "
        "than its budget.",
        "",
        "Rows:",
        "",
        *_method_lines(config),
        "",
    ]
    for run in runs:
        lines += _model_section(run, config)
    return "\n".join(lines).rstrip() + "\n"
