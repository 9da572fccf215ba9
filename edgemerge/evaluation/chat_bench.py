"""``edgemerge bench --task chat-memory`` and ``--task retrieval``: the product's path.

Every row is an ``edgemerge.Llama``. Chat memory feeds it turn by turn as ``edgemerge
chat`` does (:func:`edgemerge.evaluation.chat_memory.run_chat_memory`); retrieval
evaluates a pass-key or needle context and asks its questions as prompts of their own
(:func:`edgemerge.evaluation.retrieval.run_retrieval`), so recall runs where a user's
program would see it. The rows: the full cache at f16,
q8_0 and q4_0 (llama.cpp's own choices at fewer bytes), eviction only (sinks and the
recent window, the StreamingLLM rule, on the product's own cache), BlockMerge, and
either with recall. A merging row's budget is a fixed cell count, a percentage of
the case's tokens, held from the first turn to the answer.

Results are cached per (case, row) in a JSONL file, so a stopped run resumes where it
stopped and a finished one re-renders its table for free. The table pairs every row
with the full cache and with the best equal-cells baseline by case and gives the 95%
bootstrap interval of the difference (:mod:`edgemerge.evaluation.stats`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemerge.evaluation import chat_memory as cm
from edgemerge.evaluation import retrieval, tasks
from edgemerge.evaluation.stats import PairedInterval, paired_bootstrap
from edgemerge.evaluation.texts import FidelityInputError

Case = cm.ChatMemoryCase | retrieval.RetrievalCase

# eviction only: nothing is close enough to merge, no cell is kept for its distinctness
_EVICT = {"max_merge_error": 1e-6, "retain_top": 0.0}
# every row says whether it recalls: the default changed once and must not again
# change what a row (and its cached results) means
_NO_RECALL = {"recall": False}
_RECALL = {"recall": True}


@dataclass(frozen=True)
class ChatRow:
    """One configuration of ``edgemerge.Llama`` the cases run through.

    Attributes:
        label: the row's name in tables and the cache file.
        cache_type: K and V cache type (f16, q8_0, q4_0).
        merge: MergeSettings fields other than ``budget`` (None: the full cache).
        product: a row of the product (BlockMerge); the others are baselines.
    """

    label: str
    cache_type: str = "f16"
    merge: Mapping[str, object] | None = None
    product: bool = False

    @property
    def full(self) -> bool:
        return self.merge is None


ROWS: tuple[ChatRow, ...] = (
    ChatRow("full"),
    ChatRow("full q8_0", "q8_0"),
    ChatRow("full q4_0", "q4_0"),
    ChatRow("evict", merge={**_EVICT, **_NO_RECALL}),
    ChatRow("evict+recall", merge={**_EVICT, **_RECALL}, product=True),
    ChatRow("blockmerge", merge=_NO_RECALL, product=True),
    ChatRow("blockmerge+recall", merge=_RECALL, product=True),
    ChatRow("blockmerge+recall q8_0", "q8_0", merge=_RECALL, product=True),
)
# the row that runs MergeSettings' defaults: the other product rows are paired with it
DEFAULT_ROW = "blockmerge+recall"
QUICK_ROWS = ("full", "full q4_0", "evict", "blockmerge", "blockmerge+recall")


@dataclass(frozen=True)
class ChatBenchConfig:
    """What one chat-memory or retrieval run measures.

    Attributes:
        task: ``"chat-memory"`` or ``"retrieval"``.
        model: registry name or GGUF path.
        split: "dev" (tune on it) or "confirm" (report only).
        n: cases per length.
        lengths: conversation (or retrieval context) lengths in tokens.
        retrieval_tasks: the retrieval tasks run (``task="retrieval"`` only).
        budgets: merging rows' budgets, in percent of each case's tokens, or in cells
            when ``budget_unit`` is "cells".
        budget_unit: "percent" or "cells".
        decode_steps: single-token decode steps timed at the end of each case.
        rows: the rows, in table order.
        merge: MergeSettings fields applied to every merging row (after the row's own).
        n_batch: prefill chunk, the same for every row.
        n_threads: CPU threads (None: all cores).
        seed: the cases' seed.
    """

    task: str = "chat-memory"
    model: str = "qwen2.5-coder-0.5b"
    split: str = "dev"
    n: int = 8
    lengths: tuple[int, ...] = (2048, 4096)
    budgets: tuple[int, ...] = (25, 40)
    budget_unit: str = "percent"
    retrieval_tasks: tuple[str, ...] = retrieval.TASKS
    decode_steps: int = 0
    rows: tuple[ChatRow, ...] = ROWS
    merge: tuple[tuple[str, object], ...] = ()
    # 128, not llama.cpp's 512 or the chat's 256: a budget must hold a batch on top of
    # sinks + recent (272 cells by default), and 25% of a 2K conversation is ~512 cells
    n_batch: int = 128
    n_threads: int | None = None
    seed: int = 0

    def settings(self, row: ChatRow, budget_cells: int) -> dict[str, object] | None:
        if row.merge is None:
            return None
        return {**row.merge, **dict(self.merge), "budget": budget_cells}


@dataclass(frozen=True)
class Job:
    """One case through one row at one budget (None for a full row)."""

    case: Case
    row: ChatRow
    budget: int | None
    settings: dict[str, object] | None = None

    def key(self, config: ChatBenchConfig) -> str:
        """What the cached result depends on: the case, the row's settings and chunking.

        The settings enter resolved, every MergeSettings field with its value, so that a
        changed default is a new job instead of a silent reuse of results measured under
        the old one."""
        from edgemerge.settings import MergeSettings, SettingsError

        resolved = self.settings
        if self.settings is not None:
            try:
                resolved = MergeSettings.from_dict(dict(self.settings)).to_dict()
            except SettingsError:
                pass  # the job records its error under the settings as given
        what = {
            "case": [self.case.label, self.case.seed, self.case.n_tokens],
            "row": self.row.label,
            "cache_type": self.row.cache_type,
            "settings": resolved,
            "n_batch": config.n_batch,
            "model": str(config.model),
        }
        if config.decode_steps:  # absent when off, so older cache files keep their keys
            what["decode_steps"] = config.decode_steps
        if isinstance(self.case, retrieval.RetrievalCase):
            tokens = [self.case.context, *(q.tokens for q in self.case.queries)]
            what["tokens"] = hashlib.sha256(b"".join(t.tobytes() for t in tokens)).hexdigest()
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def budget_cells(budget: int, case: Case, unit: str = "percent") -> int:
    """A merging row's cell budget on ``case``."""
    if unit == "cells":
        return budget
    return max(1, round(budget / 100 * case.n_tokens))


def jobs(config: ChatBenchConfig, cases: Sequence[Case]) -> list[Job]:
    """Case-major order, so a stopped run still has whole cases to pair."""
    out = []
    for case in cases:
        for row in config.rows:
            for budget in (None,) if row.full else config.budgets:
                cells = None if budget is None else budget_cells(budget, case, config.budget_unit)
                out.append(Job(case, row, budget, config.settings(row, cells or 0)))
    return out


class ResultCache:
    """Results per job key in an append-only JSONL file (a torn last line is skipped)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a run killed mid-write leaves half a line
                if isinstance(record, dict) and "key" in record:
                    self.records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.records[record["key"]] = record


def _n_ctx(job: Job, config: ChatBenchConfig) -> int:
    if isinstance(job.case, retrieval.RetrievalCase):
        margin = job.case.tail_tokens + 64
    else:
        margin = cm.MAX_NEW_TOKENS + 64 + 16 * (len(job.case.messages) + 2)  # template tokens
    if job.settings is None:
        return job.case.n_tokens + margin
    budget = int(job.settings["budget"])  # type: ignore[arg-type]
    slack = int(job.settings.get("slack", 64))  # type: ignore[arg-type]
    return budget + slack + config.n_batch + margin


def run_job(job: Job, config: ChatBenchConfig) -> dict[str, Any]:
    """Run one job on a fresh Llama; the record the cache keeps."""
    from edgemerge.settings import MergeSettings, SettingsError

    merge = None if job.settings is None else MergeSettings.from_dict(dict(job.settings))
    make = cm.llm_factory(
        config.model,
        merge=merge,
        cache_type=job.row.cache_type,
        n_ctx=_n_ctx(job, config),
        n_batch=config.n_batch,
        n_threads=config.n_threads,
    )
    identity = {
        "key": job.key(config),
        "case": job.case.label,
        "length": job.case.length,
        "row": job.row.label,
        "budget": job.budget,
    }
    try:
        llm = make()
    except SettingsError as err:  # the budget cannot hold a batch: the row is infeasible
        return {**identity, "error": str(err)}
    start = time.perf_counter()
    try:
        if isinstance(job.case, retrieval.RetrievalCase):
            result = retrieval.run_retrieval(llm, job.case)
        else:
            result = cm.run_chat_memory(llm, job.case, decode_steps=config.decode_steps)
        stats = llm.merge_stats() if merge is not None else None
    finally:
        llm.close()
    seconds = time.perf_counter() - start
    record: dict[str, Any] = {
        **identity,
        "correct": result.correct,
        "nll": result.answer_nll,
        "reply": result.reply,
        "prompt_tokens": result.prompt_tokens,
        "peak_cells": result.peak_cells,
        "final_cells": result.final_cells,
        "kv_bytes": result.kv_bytes,
        "peak_kv_bytes": result.peak_cells * (result.kv_bytes // max(result.final_cells, 1)),
        "seconds": seconds,
        "decode_tok_s": None if math.isnan(result.decode_tok_s) else result.decode_tok_s,
    }
    if stats is not None:
        record.update(
            merges=stats.merges,
            cells_evicted=stats.cells_evicted,
            recall_hits=stats.recall_hits,
            blocks_restored=stats.blocks_restored,
            recall_time_s=stats.recall_time_s,
            store_ram_bytes=stats.store_ram_bytes,
            store_disk_bytes=stats.store_disk_bytes,
            store_positions=stats.store_positions,
        )
    return record


Progress = Callable[[int, int, str], None]


def run(
    config: ChatBenchConfig,
    cache: ResultCache,
    *,
    progress: Progress | None = None,
    tokenize: Callable[[str], Sequence[int]] | None = None,
    bos: Sequence[int] = (),
) -> tuple[list[Case], list[Job]]:
    """Run every job not in ``cache`` yet; returns the cases and all jobs.

    ``tokenize`` and ``bos``: the model's tokenizer and its BOS tokens (retrieval needs
    both; chat memory counts tokens with ``tokenize`` when given)."""
    cases: list[Case]
    if config.task == "retrieval":
        if tokenize is None:
            raise ValueError("retrieval cases are built with the model's tokenizer: pass it")
        cases = list(
            retrieval.cases(
                config.split,
                config.n,
                config.lengths,
                config.retrieval_tasks,
                config.seed,
                tokenize=tokenize,
                bos=bos,
            )
        )
    else:
        cases = list(
            cm.cases(config.split, config.n, config.lengths, config.seed, tokenize=tokenize)
        )
    todo = jobs(config, cases)
    for i, job in enumerate(todo):
        if progress is not None:
            progress(i, len(todo), f"{job.row.label} {job.budget or ''} {job.case.label}")
        if job.key(config) not in cache:
            cache.add(run_job(job, config))
    if progress is not None:
        progress(len(todo), len(todo), "done")
    return cases, todo


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class RowSummary:
    """One row at one budget over the cases that every row finished."""

    row: ChatRow
    budget: int | None
    correct: np.ndarray  # [n] 0/1
    nll: np.ndarray  # [n]
    kv_bytes: float  # mean peak KV bytes
    seconds: float
    records: tuple[dict[str, Any], ...]
    unit: str = "percent"

    @property
    def name(self) -> str:
        if self.budget is None:
            return self.row.label
        return f"{self.row.label} @{self.budget}{'%' if self.unit == 'percent' else ' cells'}"

    @property
    def store_bytes(self) -> float:
        """Mean bytes of the recall store (RAM and spill file) at the case's end; 0 without."""
        sizes = [r.get("store_ram_bytes", 0) + r.get("store_disk_bytes", 0) for r in self.records]
        return float(np.mean(sizes)) if sizes else 0.0

    @property
    def decode_tok_s(self) -> float:
        speeds = [r["decode_tok_s"] for r in self.records if r.get("decode_tok_s")]
        return float(np.mean(speeds)) if speeds else math.nan


def summarise(
    config: ChatBenchConfig, all_jobs: Iterable[Job], cache: ResultCache
) -> list[RowSummary]:
    """Rows in table order, restricted to the cases every row has a result for."""
    all_jobs = list(all_jobs)
    done: dict[tuple[str, int | None], dict[str, dict[str, Any]]] = {}
    for job in all_jobs:
        record = cache.records.get(job.key(config))
        if record is not None:
            done.setdefault((job.row.label, job.budget), {})[job.case.label] = record
    groups = [(r, b) for r in config.rows for b in ((None,) if r.full else config.budgets)]
    # a row that could not run on some case (its budget cannot hold a batch) is left out
    # of the table rather than shrinking every other row's cases
    groups = [
        (r, b)
        for r, b in groups
        if not any("error" in rec for rec in done.get((r.label, b), {}).values())
    ]
    labels = list(dict.fromkeys(job.case.label for job in all_jobs))
    common = [c for c in labels if all(c in done.get((r.label, b), {}) for r, b in groups)]
    out = []
    for row, budget in groups:
        recs = tuple(done[(row.label, budget)][c] for c in common) if common else ()
        out.append(
            RowSummary(
                row,
                budget,
                np.array([float(r["correct"]) for r in recs]),
                np.array([float(r["nll"]) for r in recs]),
                float(np.mean([r["peak_kv_bytes"] for r in recs])) if recs else math.nan,
                float(np.mean([r["seconds"] for r in recs])) if recs else math.nan,
                recs,
                config.budget_unit,
            )
        )
    return out


def infeasible(config: ChatBenchConfig, all_jobs: Iterable[Job], cache: ResultCache) -> list[str]:
    """One line per row and budget that could not run, with the first reason given."""
    out: dict[str, str] = {}
    for job in all_jobs:
        record = cache.records.get(job.key(config))
        if record is not None and "error" in record:
            unit = "%" if config.budget_unit == "percent" else " cells"
            out.setdefault(f"{job.row.label} @{job.budget}{unit}", record["error"])
    return [f"- {name}: not run ({why})" for name, why in out.items()]


def _interval(a: np.ndarray, b: np.ndarray, seed: int) -> PairedInterval | None:
    return paired_bootstrap(a, b, seed=seed) if a.size >= 2 else None


def render(
    config: ChatBenchConfig,
    summaries: Sequence[RowSummary],
    command: str,
    machine: str,
    task: str | None = None,
) -> str:
    """The markdown table: accuracy, answer NLL, and paired intervals.

    ``task``: the retrieval task the summaries are of (None for chat memory)."""
    full = next((s for s in summaries if s.row.label == "full"), None)
    n = int(full.correct.size) if full is not None else 0
    lengths = ", ".join(map(str, config.lengths))
    if task is None:
        unit = "% of each conversation's tokens" if config.budget_unit == "percent" else "cells"
        title = "Chat memory"
        what = (
            f"{n} conversations ({config.n} per length; lengths {lengths} tokens), facts at "
            f"varying depth; budgets in {unit}, held from the first turn."
        )
    else:
        unit = "% of each context's tokens" if config.budget_unit == "percent" else "cells"
        title = f"Retrieval, {task}"
        if task == "multi_needle":
            n_needles = retrieval.N_NEEDLES
            where = f"{n_needles} needles at {n_needles} evenly spaced depths, a question each"
        elif task == "repeat":
            where = (
                "a pasted passage of code at varying depth, asked back from its first "
                f"tokens; accuracy: token similarity of the first {tasks.NEW_TOKENS['repeat']} "
                "reply tokens to the passage's next ones"
            )
        else:
            where = "the needle at varying depth"
        what = (
            f"{n} contexts ({config.n} per length; lengths {lengths} tokens; {where}), "
            "each question a prompt of its own after the "
            f"context; accuracy: questions answered; budgets in {unit}, held from the first "
            "chunk."
        )
    lines = [
        f"### {title}, {Path(str(config.model)).name}, {config.split} split",
        "",
        f"{what} Δ: paired mean difference with its 95% bootstrap interval; "
        "verdicts only where the interval excludes zero. NLL: answer tokens, nats/token.",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine}",
        "",
        "| row | accuracy | NLL | Δacc vs full | ΔNLL vs full | vs best equal-cells baseline "
        "(ΔNLL) | vs full q4_0 (ΔNLL) | KV MiB | s/case | decode tok/s |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    if n == 0:
        return "\n".join(lines + ["", "(no case finished by every row yet)"])
    for s in summaries:
        acc = f"{_count(s.correct)}/{n}"
        d_acc = d_nll = vs = q4 = ""
        if s.row.label != "full":
            ia = _interval(s.correct, full.correct, config.seed)
            inl = _interval(s.nll, full.nll, config.seed)
            d_acc = ia.format() if ia else ""
            d_nll = inl.format() if inl else ""
        if s.row.product:
            vs = _versus(s, _best_baseline(summaries, s.budget), config.seed)
            q4 = _versus(
                s, next((x for x in summaries if x.row.label == "full q4_0"), None), config.seed
            )
        lines.append(
            f"| {s.name} | {acc} | {s.nll.mean():.3f} | {d_acc} | {d_nll} | {vs} | {q4} | "
            f"{s.kv_bytes / 2**20:.1f} | {s.seconds:.1f} | {_fmt_speed(s.decode_tok_s)} |"
        )
    default = against_default(summaries, config.seed)
    lines += ["", *(default + [""] if default else []), *_frontier(summaries)]
    lines += ["", *_recall_lines(summaries)]
    return "\n".join(lines)


def against_default(summaries: Sequence[RowSummary], seed: int) -> list[str]:
    """Each other product row against the default row at the same budget, case by case:
    which of the product's own configurations to run (the main table pairs them only with
    the full cache and the baselines)."""
    default = {s.budget: s for s in summaries if s.row.label == DEFAULT_ROW}
    out = []
    for s in summaries:
        d = default.get(s.budget)
        if d is None or s is d or not s.row.product:
            continue
        ia = _interval(s.correct, d.correct, seed)
        inl = _interval(s.nll, d.nll, seed)
        if ia is None or inl is None:
            continue
        out.append(
            f"- {s.name}: Δacc {ia.format()}, ΔNLL {inl.format()}; by NLL it "
            f"{inl.verdict(higher_is_better=False)} {d.name}"
        )
    if not out:
        return []
    head = (
        f"Against {DEFAULT_ROW} (the product's defaults, with any --merge fields) at the "
        "same budget, "
        "paired by case; Δ: the row minus the default:"
    )
    return [head, "", *out]


def _count(correct: np.ndarray) -> str:
    """Cases answered: whole for chat memory, with quarters where a case asks several."""
    total = float(correct.sum())
    return f"{total:.0f}" if total.is_integer() else f"{total:.2f}"


def _fmt_speed(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.1f}"


def _best_baseline(summaries: Sequence[RowSummary], budget: int | None) -> RowSummary | None:
    """The equal-cells baseline (not a product row, same budget) with the lowest NLL."""
    others = [s for s in summaries if s.budget == budget and budget and not s.row.product]
    return min(others, key=lambda s: float(s.nll.mean())) if others else None


def _versus(s: RowSummary, other: RowSummary | None, seed: int) -> str:
    """``beats evict: -0.52 [-0.80, -0.21]`` on answer NLL (lower is better)."""
    if other is None or other is s:
        return ""
    iv = _interval(s.nll, other.nll, seed)
    if iv is None:
        return ""
    return f"{iv.verdict(higher_is_better=False)} {other.name}: {iv.format()}"


def _frontier(summaries: Sequence[RowSummary]) -> list[str]:
    """Every row by KV bytes: what to run with this much memory."""
    ranked = sorted(summaries, key=lambda s: s.kv_bytes)
    out = [
        "Equal bytes (KV MiB of the cache at the conversation's peak, mean over cases; a row "
        "is on the frontier when no row with fewer cache bytes has a lower NLL; the recall "
        "store's originals sit in host RAM and its spill file on top, in the last column):",
        "",
        "| KV MiB | row | accuracy | NLL | on the frontier | + recall store MiB (host) |",
        "| ---: | --- | ---: | ---: | :---: | ---: |",
    ]
    best = math.inf
    for s in ranked:
        nll = float(s.nll.mean())
        on = nll < best
        best = min(best, nll)
        out.append(
            f"| {s.kv_bytes / 2**20:.1f} | {s.name} | {_count(s.correct)}/{s.correct.size} | "
            f"{nll:.3f} | {'yes' if on else ''} | {s.store_bytes / 2**20:.1f} |"
        )
    return out


def _recall_lines(summaries: Sequence[RowSummary]) -> list[str]:
    out = []
    for s in summaries:
        if not s.records or "recall_hits" not in s.records[0] or not s.row.merge:
            continue
        if not s.row.merge.get("recall"):
            continue
        hist = np.array([r["prompt_tokens"] for r in s.records], dtype=np.float64)
        store = np.array(
            [r["store_ram_bytes"] + r["store_disk_bytes"] for r in s.records], dtype=np.float64
        )
        share = np.array([r["recall_time_s"] / max(r["seconds"], 1e-9) for r in s.records])
        restored = np.mean([r["blocks_restored"] for r in s.records])
        out.append(
            f"- {s.name}: store {np.mean(store / hist) * 1024 / 2**20:.2f} MiB per 1K tokens of "
            f"history; blocks restored per case {restored:.0f}; "
            f"recall {np.mean(share):.0%} of the case's time"
        )
    return out


# ------------------------------------------------------------------------------ CLI


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags of ``edgemerge bench --task chat-memory`` and ``--task retrieval``."""
    ap.add_argument("--split", choices=cm.SPLITS, default="dev")
    ap.add_argument(
        "--cases", type=int, default=8, help="conversations (retrieval: contexts) per length"
    )
    ap.add_argument(
        "--budget-cells",
        action="store_true",
        help="--budgets are cell counts (e.g. 2048), not percentages of each conversation",
    )
    ap.add_argument(
        "--decode-steps",
        type=int,
        default=0,
        help="time this many single-token decode steps at each conversation's end",
    )
    ap.add_argument("--lengths", type=int, nargs="+", help="conversation lengths in tokens")
    ap.add_argument(
        "--retrieval-tasks",
        nargs="+",
        choices=retrieval.TASKS,
        help="--task retrieval: which tasks (default: all)",
    )
    ap.add_argument(
        "--cache",
        type=Path,
        help="JSONL of finished (case, row) results to resume from "
        "(default: ~/.cache/edgemerge/bench/TASK-MODEL-SPLIT.jsonl)",
    )


def config_from_args(
    args: argparse.Namespace, merge: tuple[tuple[str, object], ...]
) -> ChatBenchConfig:
    task = getattr(args, "task", "chat-memory")
    config = ChatBenchConfig(task=task, split=args.split, n=args.cases)
    changes: dict[str, object] = {"merge": merge}
    if task == "retrieval":
        changes.update(lengths=(2048,), budgets=(25, 35, 50))
    if args.quick:
        changes.update(
            n=2,
            lengths=(2048,),
            budgets=(25,),
            rows=tuple(r for r in ROWS if r.label in QUICK_ROWS),
        )
    if getattr(args, "retrieval_tasks", None):
        if task != "retrieval":
            raise ValueError("--retrieval-tasks goes with --task retrieval")
        changes["retrieval_tasks"] = tuple(dict.fromkeys(args.retrieval_tasks))
    if args.models:
        if len(args.models) != 1:
            raise ValueError(f"--task {task} runs one model at a time (give one --models)")
        changes["model"] = args.models[0]
    if args.lengths:
        changes["lengths"] = tuple(args.lengths)
    if args.budgets:
        changes["budgets"] = tuple(args.budgets)
    if args.budget_cells:
        changes["budget_unit"] = "cells"
    if args.decode_steps < 0:
        raise ValueError(f"--decode-steps must be >= 0, got {args.decode_steps}")
    changes["decode_steps"] = args.decode_steps
    if args.threads is not None:
        changes["n_threads"] = args.threads
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.rows:
        from edgemerge.evaluation.bench_cli import check_rows

        check_rows(args.rows, [r.label for r in ROWS])
        if "full" not in args.rows:
            raise ValueError(f"--rows: the {task} table pairs every row with 'full'; keep it")
        changes["rows"] = tuple(r for r in ROWS if r.label in args.rows)
    return dataclasses.replace(config, **changes)


def default_cache(config: ChatBenchConfig) -> Path:
    from edgemerge.models import cache_dir

    # a registry name keeps its dots ("qwen2.5-coder-0.5b"); a path loses .gguf
    name = Path(str(config.model)).name
    stem = name[: -len(".gguf")] if name.endswith(".gguf") else name
    prefix = config.task.replace("-", "_")
    return cache_dir() / "bench" / f"{prefix}-{stem}-{config.split}.jsonl"


def main(args: argparse.Namespace, command: str, merge: tuple[tuple[str, object], ...]) -> int:
    """Run (or resume) and print the table; write it to ``--out`` when given."""
    from tqdm import tqdm

    from edgemerge.evaluation.bench_cli import machine_line

    try:
        config = config_from_args(args, merge)
    except ValueError as err:
        print(f"edgemerge bench: {err}", file=sys.stderr)
        return 2
    cache = ResultCache(args.cache or default_cache(config))
    bar = tqdm(desc=config.task, unit="run", disable=args.no_progress, file=sys.stderr)

    def progress(done: int, total: int, what: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(what[:48])
        bar.refresh()

    try:
        tokenize, bos = _tokenizer(config.model)
        _, all_jobs = run(config, cache, progress=progress, tokenize=tokenize, bos=bos)
    except (FidelityInputError, FileNotFoundError) as err:
        print(f"edgemerge bench: {err}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    threads = config.n_threads or max(1, os.cpu_count() or 1)
    machine = machine_line(threads)
    if config.task == "retrieval":
        # one table per task: a pass key and four needles are not one score
        parts = []
        for task in config.retrieval_tasks:
            mine = [job for job in all_jobs if getattr(job.case, "task", None) == task]
            parts.append(render(config, summarise(config, mine, cache), command, machine, task))
        pooled = against_default(summarise(config, all_jobs, cache), config.seed)
        if len(config.retrieval_tasks) > 1 and pooled:
            parts.append(
                f"### Retrieval, every task pooled, {Path(str(config.model)).name}, "
                f"{config.split} split\n\nEach context one case (a four-needle context scores "
                "the share of its questions answered). " + "\n".join(pooled)
            )
        text = "\n\n".join(parts)
    else:
        text = render(config, summarise(config, all_jobs, cache), command, machine)
    skipped = infeasible(config, all_jobs, cache)
    if skipped:
        text += "\n\n" + "\n".join(skipped)
    print(text)
    print(f"results cached in {cache.path}", file=sys.stderr)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"written to {args.out}", file=sys.stderr)
    return 0


def _tokenizer(model: str) -> tuple[Callable[[str], Sequence[int]], list[int]]:
    """The model's own tokenizer (vocabulary only), so case lengths are exact, and its
    BOS tokens (none for a model without one)."""
    import llama_cpp

    from edgemerge.models import resolve_model

    llm = llama_cpp.Llama(str(resolve_model(model)), vocab_only=True, verbose=False)
    bos = llm.tokenize(b"", add_bos=True, special=False)
    return lambda text: llm.tokenize(text.encode(), add_bos=False, special=False), bos
