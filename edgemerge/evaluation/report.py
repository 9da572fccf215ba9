"""Markdown tables and PNG plots of an evaluation-suite run (``edgemerge bench``).

Scores: generate tasks are accuracies in [0, 1] (exact answers; edit similarity for
code lines); NLL tasks are nats per token. *Relative to full* puts both on one scale:
``score / full score`` for generate tasks and ``exp(full NLL - NLL)`` for NLL tasks
(the per-token likelihood ratio), so 1.0 means "as good as the full cache".
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgemerge.evaluation.suite import (
    GENERATE_TASKS,
    NLL_TASKS,
    TASKS,
    ModelResults,
    Result,
    SuiteConfig,
)

_MB = 1e6


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def task_scores(run: ModelResults) -> dict[tuple[str, str, int, str], float]:
    """Mean score per (row, mode, budget, task)."""
    acc: dict[tuple[str, str, int, str], list[float]] = defaultdict(list)
    for r in run.results:
        acc[(r.row, r.mode, r.budget, run.cases[r.case].task)].append(r.score)
    return {k: _mean(v) for k, v in acc.items()}


def answer_nlls(run: ModelResults) -> dict[tuple[str, str, int, str], float]:
    """Mean teacher-forced answer NLL per (row, mode, budget, task), where measured."""
    acc: dict[tuple[str, str, int, str], list[float]] = defaultdict(list)
    for r in run.results:
        nll = getattr(r, "nll", math.nan)  # runs pickled before the field have none
        if not math.isnan(nll):
            acc[(r.row, r.mode, r.budget, run.cases[r.case].task)].append(nll)
    return {k: _mean(v) for k, v in acc.items()}


def _full(scores: dict, mode: str, task: str) -> float:
    return scores.get(("full", mode, 100, task), math.nan)


def relative(scores: dict, row: str, mode: str, budget: int, task: str) -> float:
    """The row's score on ``task`` relative to full in the same mode (see module doc)."""
    value = scores.get((row, mode, budget, task), math.nan)
    full = _full(scores, mode, task)
    if task in NLL_TASKS:
        return math.exp(full - value)
    return value / full if full > 0 else math.nan


def _fmt(x: float, digits: int = 2) -> str:
    return "·" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _present_tasks(run: ModelResults) -> list[str]:
    have = {c.task for c in run.cases}
    return [t for t in TASKS if t in have]


def _row_budgets(run: ModelResults, mode: str) -> list[tuple[str, int]]:
    seen: dict[tuple[str, int], None] = {}
    for r in run.results:
        if r.mode == mode:
            seen[(r.row, r.budget)] = None
    return list(seen)


def mean_relative(run: ModelResults, scores: dict, row: str, mode: str, budget: int) -> float:
    rel = [relative(scores, row, mode, budget, t) for t in _present_tasks(run)]
    rel = [x for x in rel if not math.isnan(x)]
    return _mean(rel)


def _kv_mb(run: ModelResults, row: str, mode: str, budget: int) -> float:
    return _mean(
        [r.kv_bytes / _MB for r in run.results if (r.row, r.mode, r.budget) == (row, mode, budget)]
    )


def verdicts(run: ModelResults, config: SuiteConfig) -> list[str]:
    """Per mode and budget: BlockMerge's mean relative score against the best baseline."""
    scores = task_scores(run)
    lines = []
    for mode in config.modes:
        for budget in config.budgets:
            rows = {row for row, b in _row_budgets(run, mode) if b == budget}
            if "blockmerge" not in rows:
                continue
            ours = mean_relative(run, scores, "blockmerge", mode, budget)
            others = {
                row: mean_relative(run, scores, row, mode, budget)
                for row in rows
                if not row.startswith("blockmerge")
            }
            if not others:
                continue
            best = max(others, key=lambda k: others[k])
            diff = ours - others[best]
            word = "beats" if diff > 0 else "does not beat"
            lines.append(
                f"{mode}, {budget}%: blockmerge {ours:.3f} of full vs best baseline {best} "
                f"{others[best]:.3f}: blockmerge {word} it ({diff:+.3f})"
            )
    return lines


def render_model(run: ModelResults, config: SuiteConfig, plots: dict[str, str]) -> str:
    """The markdown section of one model."""
    scores = task_scores(run)
    tasks = _present_tasks(run)
    out = [f"## {run.model}", ""]
    counts = defaultdict(int)
    for c in run.cases:
        counts[c.task] += 1
    out.append(
        f"Architecture {run.arch}; {len(run.cases)} cases ("
        + ", ".join(f"{t} {counts[t]}" for t in tasks)
        + f"); wall time {run.seconds / 60:.1f} min."
    )
    out += ["", "Summary:", ""] + [f"- {line}" for line in verdicts(run, config)] + [""]
    for mode in config.modes:
        pairs = _row_budgets(run, mode)
        if not pairs:
            continue
        out += [f"### {mode}: mean score relative to full (1.00 = full)", ""]
        budgets = sorted({b for _, b in pairs}, reverse=True)
        rows = list(dict.fromkeys(r for r, _ in pairs))
        out.append("| method | " + " | ".join(f"{b}%" for b in budgets) + " |")
        out.append("| --- |" + " ---: |" * len(budgets))
        for row in rows:
            cells = [
                _fmt(mean_relative(run, scores, row, mode, b)) if (row, b) in pairs else "·"
                for b in budgets
            ]
            out.append(f"| {row} | " + " | ".join(cells) + " |")
        out.append("")
        out += [
            f"### {mode}: score per task",
            "",
            "Accuracy for "
            + ", ".join(t for t in tasks if t in GENERATE_TASKS)
            + "; NLL (nats/token, lower is better) for "
            + ", ".join(t for t in tasks if t in NLL_TASKS)
            + ". KV: MB of the scored cache.",
            "",
            "| method | budget | " + " | ".join(tasks) + " | rel. to full | KV MB |",
            "| --- | ---: |" + " ---: |" * (len(tasks) + 2),
        ]
        for row, budget in sorted(pairs, key=lambda p: (-p[1], rows.index(p[0]))):
            vals = [
                _fmt(scores.get((row, mode, budget, t), math.nan), 3 if t in NLL_TASKS else 2)
                for t in tasks
            ]
            out.append(
                f"| {row} | {budget}% | "
                + " | ".join(vals)
                + f" | {_fmt(mean_relative(run, scores, row, mode, budget))}"
                + f" | {_fmt(_kv_mb(run, row, mode, budget), 1)} |"
            )
        out.append("")
        out += _nll_table(run, mode, pairs, rows)
        if mode in plots:
            out += [f"![{run.model} {mode}: score against budget]({plots[mode]})", ""]
    if "niah" in plots:
        out += [f"![{run.model}: needle grid]({plots['niah']})", ""]
    out += _equal_bytes(run, scores, config)
    out += _speed(run)
    return "\n".join(out)


def _nll_table(
    run: ModelResults, mode: str, pairs: list[tuple[str, int]], rows: list[str]
) -> list[str]:
    """Answer-token NLL of the retrieval tasks: a continuous score beside accuracy."""
    nlls = answer_nlls(run)
    tasks = [t for t in _present_tasks(run) if any(k[1] == mode and k[3] == t for k in nlls)]
    if not tasks:
        return []
    out = [
        f"### {mode}: answer NLL (nats/token, teacher forced after the query; lower is better)",
        "",
        "| method | budget | " + " | ".join(tasks) + " |",
        "| --- | ---: |" + " ---: |" * len(tasks),
    ]
    for row, budget in sorted(pairs, key=lambda p: (-p[1], rows.index(p[0]))):
        vals = [_fmt(nlls.get((row, mode, budget, t), math.nan), 3) for t in tasks]
        out.append(f"| {row} | {budget}% | " + " | ".join(vals) + " |")
    return out + [""]


def _equal_bytes(run: ModelResults, scores: dict, config: SuiteConfig) -> list[str]:
    mode = "streaming" if "streaming" in config.modes else config.modes[0]
    pairs = _row_budgets(run, mode)
    if not pairs:
        return []
    ranked = sorted(pairs, key=lambda p: _kv_mb(run, *p[:1], mode, p[1]))
    out = [
        f"### Equal bytes ({mode}): every row by the KV bytes it keeps",
        "",
        "| method | budget | KV MB | rel. to full |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row, budget in ranked:
        out.append(
            f"| {row} | {budget}% | {_fmt(_kv_mb(run, row, mode, budget), 1)} | "
            f"{_fmt(mean_relative(run, scores, row, mode, budget))} |"
        )
    return out + [""]


def _speed(run: ModelResults) -> list[str]:
    if not run.speeds:
        return []
    out = [
        "### Speed and memory (native rows, longest case, streaming)",
        "",
        "Each row runs alone in a child process: prefill of the longest case, then "
        "greedy decode. Peak RSS is that process's high-water mark, model weights and "
        "runtime included; KV MB allocated is the physical cache the row needs.",
        "",
        "| method | budget | prefill tok/s | decode tok/s | merge share of prefill | "
        "KV MB in use | KV MB allocated | peak RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in run.speeds:
        rss = "·" if s.peak_rss is None else f"{s.peak_rss / _MB:.0f}"
        out.append(
            f"| {s.row} | {s.budget}% | {s.prefill_tok_s:.1f} | {s.decode_tok_s:.1f} | "
            f"{100 * s.merge_share:.1f}% | {s.kv_bytes / _MB:.1f} | {s.kv_allocated / _MB:.1f} | "
            f"{rss} |"
        )
    return out + [""]


def plot_model(run: ModelResults, config: SuiteConfig, directory: Path) -> dict[str, str]:
    """Write the model's PNGs into ``directory``; returns {kind: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    scores = task_scores(run)
    tasks = _present_tasks(run)
    stem = run.model.replace("/", "_")
    files: dict[str, str] = {}
    for mode in config.modes:
        pairs = _row_budgets(run, mode)
        if not pairs:
            continue
        rows = list(dict.fromkeys(r for r, _ in pairs))
        ncol = min(3, len(tasks))
        nrow = -(-len(tasks) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
        for ax, task in zip(axes.flat, tasks, strict=False):
            for row in rows:
                budgets = sorted(b for r, b in pairs if r == row)
                ys = [relative(scores, row, mode, b, task) for b in budgets]
                style = "o-" if len(budgets) > 1 else "s"
                ax.plot(budgets, ys, style, label=row)
            ax.set_title(task)
            ax.set_xlabel("budget (% of cells)")
            ax.set_ylabel("relative to full")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(tasks) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"{run.model}, {mode}")
        fig.tight_layout()
        name = f"{stem}-{mode}.png"
        fig.savefig(directory / name, dpi=110)
        plt.close(fig)
        files[mode] = name
    niah = [(i, c) for i, c in enumerate(run.cases) if c.task == "niah"]
    if niah and "offline" in config.modes:
        files["niah"] = _plot_niah(run, config, niah, directory, stem)
    return files


def _plot_niah(run, config, niah, directory: Path, stem: str) -> str:
    import matplotlib.pyplot as plt

    lengths = sorted({int(c.meta["length"]) for _, c in niah})
    depths = sorted({float(c.meta["depth"]) for _, c in niah})
    budget = min(config.budgets)
    panels = [("full", 100)] + [
        (row, budget)
        for row in dict.fromkeys(r.row for r in run.results if r.mode == "offline")
        if row != "full"
        and any(r.row == row and r.budget == budget and r.mode == "offline" for r in run.results)
    ]
    by_case: dict[tuple[str, int, int], Result] = {
        (r.row, r.budget, r.case): r for r in run.results if r.mode == "offline"
    }
    ncol = min(4, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.8 * nrow), squeeze=False)
    for ax, (row, b) in zip(axes.flat, panels, strict=False):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for ci, case in niah:
            res = by_case.get((row, b, ci))
            if res is not None:
                grid[
                    depths.index(float(case.meta["depth"])), lengths.index(int(case.meta["length"]))
                ] = res.score
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
        ax.set_xlabel("context tokens")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{row} @ {b}%", fontsize=9)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"{run.model}: needle retrieval (offline), green = found")
    fig.tight_layout()
    name = f"{stem}-niah.png"
    fig.savefig(directory / name, dpi=110)
    plt.close(fig)
    return name


def render(
    runs: Sequence[ModelResults],
    config: SuiteConfig,
    *,
    command: str,
    machine: str,
    plots: dict[str, dict[str, str]],
) -> str:
    """The whole report."""
    head = [
        "# Long-context evaluation: quality, memory and speed against every baseline",
        "",
        "Written by `edgemerge bench`; rerun it rather than editing the numbers.",
        "",
        "Chat memory (a fact said in an early turn, asked many turns later, through the "
        "chat's own path, with paired intervals on a dev and a confirm split) is in "
        "`docs/chat_memory.md`, written by `edgemerge bench --task chat-memory`.",
        "",
        f"- command: `{command}`",
        f"- machine: {machine}",
        f"- budgets: {', '.join(f'{b}%' for b in config.budgets)} of the context's cells; "
        f"modes: {', '.join(config.modes)}; seed {config.seed}",
        "",
        "How the rows run is in `edgemerge/evaluation/suite.py`'s docstring. In short: "
        "offline rows compress a full prefill (captured once) and restore the cells into "
        "llama.cpp; streaming rows hold the budget during prefill, natively "
        "(`edgemerge.Llama` merging in the cache: blockmerge; plain quantized caches) or "
        "through chunked compression by the reference method (the other baselines). "
        "Every row is scored in the same flash-attention context. `·`: the budget is "
        "below what the method always keeps, or the row does not run in that mode.",
        "",
        "Read with care: streaming mode runs the first case of each task only (its rows "
        "prefill once per budget), so its columns rest on one case per task, and "
        "relative scores compare rows within a mode, never across modes. The offline "
        "quantized rows round the captured K/V through q8_0/q4_0 once; the streaming "
        "ones are llama.cpp's real quantized caches, where every layer's K/V is computed "
        "from attention over already-quantized cells.",
        "",
    ]
    body = [render_model(run, config, plots.get(run.model, {})) for run in runs]
    return "\n".join(head + body)
