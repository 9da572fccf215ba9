"""The long-context evaluation suite behind ``edgemerge bench``.

Every case is a token prefix that goes into the KV cache, then either questions whose
greedy answers are scored (passkey, needle grid, multi-needle, code completion) or a
continuation whose NLL is scored (recall of a repeated passage, plain continuation).

Two modes, and every row goes through the real patched llama.cpp:

offline (as kvpress)
    The prefix is prefilled with the full cache once (``capture_kv``: K/V, the
    attention mass each cell received, the last queries). Each method compresses that
    capture to its budget; the compressed cells (positions, bias, spans) are written
    into the sequence state and restored into a fresh context, where the questions or
    the continuation are decoded.
streaming (the edge mode; bounds peak memory)
    The budget holds during prefill. BlockMerge and the quantized caches run natively:
    ``edgemerge.Llama`` with ``MergeSettings`` merges inside the cache as chunks
    arrive. The other methods run through :class:`StreamingPrefill`: chunked prefill,
    and whenever a chunk would not fit, the method compresses the live cache, which is
    written back. The state left at the end is scored like an offline one.

Scoring always uses the same flash-attention context (``Scorer``), so rows differ only
in the cells they leave. Speed and memory come from the native rows: prefill and
decode tokens/s, the share of prefill time spent merging, KV bytes, and the peak RSS
of a child process that runs the row alone.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from edgemerge.evaluation import tasks, texts
from edgemerge.evaluation.scoring import Scorer, compressed_state, row_major_v
from edgemerge.evaluation.streaming import StreamingPrefill
from edgemerge.methods import get_method
from edgemerge.native import kvstate
from edgemerge.native.capture import capture_kv, model_layout
from edgemerge.reference.ggml_quants import ggml_type, row_bytes
from edgemerge.settings import MergeSettings, SettingsError

GENERATE_TASKS = ("passkey", "niah", "multi_needle", "lcc")
NLL_TASKS = ("recall", "continuation")
TASKS = GENERATE_TASKS + NLL_TASKS
MODES = ("offline", "streaming")
# Sinks + recent window of the merging rows. 128 rather than the library's 256 so that
# at 25% of a 2K context (512 cells) the protected window is a quarter of the budget,
# not half of it; the reference method gets the same window.
BENCH_RECENT = 128


@dataclass(frozen=True)
class Row:
    """One method as the suite runs it, per mode.

    Attributes:
        label: the table row.
        method, settings: the registry method for offline mode (None: no offline row).
        streaming: how streaming mode runs it: ``"reference"`` (the registry method
            through :class:`StreamingPrefill`), ``"native"`` (``edgemerge.Llama``) or
            None (no streaming row).
        cache_type: KV cache type of the native row (``"f16"``, ``"q8_0"``, ``"q4_0"``).
        merge: native row merges (BlockMerge in the cache) rather than keeping all.
        full_budget: the row keeps every cell (it runs at 100% only).
    """

    label: str
    method: str | None
    settings: Mapping[str, object] = field(default_factory=dict)
    streaming: str | None = "reference"
    cache_type: str = "f16"
    merge: bool = False
    full_budget: bool = False


ROWS: tuple[Row, ...] = (
    Row("full", "full", streaming="native", full_budget=True),
    Row("q8_0 cache", "quant", {"key_type": "q8_0"}, "native", "q8_0", full_budget=True),
    Row("q4_0 cache", "quant", {"key_type": "q4_0"}, "native", "q4_0", full_budget=True),
    Row("streaming_llm", "streaming_llm"),
    Row("h2o", "h2o"),
    Row("snapkv", "snapkv"),
    # query-agnostic: statistics of the last n_obs queries moved to the next 512 positions
    Row("expected_attention", "expected_attention"),
    Row("keydiff", "keydiff"),
    # the paper's rule with epsilon above any cosine, so the budget alone sets the cut
    Row("kvmerger", "kvmerger", {"threshold": 1.01}),
    Row("blockmerge", "blockmerge", {"recent": BENCH_RECENT}, "native", merge=True),
    Row("blockmerge + q8_0", None, streaming="native", cache_type="q8_0", merge=True),
)


@dataclass(frozen=True)
class SuiteConfig:
    """What one run measures. Token counts are per case."""

    models: tuple[str, ...] = ("qwen2.5-coder-0.5b", "gemma-3-270m")
    budgets: tuple[int, ...] = (50, 35, 25)
    modes: tuple[str, ...] = MODES
    rows: tuple[Row, ...] = ROWS
    # labels run in streaming mode (None: all). SnapKV is left out by default: its
    # observation window is the end of the prompt, and streaming would move it to the
    # end of each chunk, which is not the published method.
    streaming_rows: tuple[str, ...] | None = tuple(r.label for r in ROWS if r.label != "snapkv")
    n_context: int = 2048
    passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    niah_lengths: tuple[int, ...] = (1024, 2048)
    niah_depths: tuple[float, ...] = (0.0, 1 / 3, 2 / 3, 1.0)
    # streaming mode runs the first N cases of each task (it prefills once per row and
    # budget, so it costs ~20x offline); the needle grid runs offline only
    streaming_cases_per_task: int = 1
    n_multi_needle: int = 2
    n_lcc: int = 3
    n_recall: int = 2
    n_continuation: int = 2
    n_scored: int = 128
    n_batch: int = 256
    n_obs: int = 32
    n_decode_probe: int = 32
    seed: int = 0
    n_threads: int | None = None
    rss: bool = True
    merge_recent: int = BENCH_RECENT  # MergeSettings.recent of the native merging rows
    # MergeSettings fields for every BlockMerge row, offline and native (e.g. centre)
    merge: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("give at least one model")
        if not all(isinstance(b, int) and 1 <= b < 100 for b in self.budgets):
            raise ValueError(f"budgets must be percentages in 1..99, got {self.budgets}")
        bad = sorted(set(self.modes) - set(MODES))
        if bad or not self.modes:
            raise ValueError(f"modes must be among {MODES}, got {self.modes}")
        MergeSettings.from_dict(dict(self.merge))  # an unknown or bad field fails now
        if self.n_context < 256 or self.n_batch < 16:
            raise ValueError("n_context must be >= 256 and n_batch >= 16")

    def method_settings(self, row: Row) -> dict[str, object]:
        """The registry settings of ``row``'s offline method (``merge`` for BlockMerge)."""
        extra = dict(self.merge) if row.method == "blockmerge" else {}
        return {**row.settings, **extra}

    def runs_streaming(self, row: Row) -> bool:
        return row.streaming is not None and (
            self.streaming_rows is None or row.label in self.streaming_rows
        )


QUICK = SuiteConfig(
    models=("qwen2.5-coder-0.5b",),
    budgets=(50, 35),
    n_context=1024,
    passkey_depths=(0.5,),
    niah_lengths=(1024,),
    niah_depths=(0.5,),
    n_multi_needle=1,
    n_lcc=1,
    n_recall=1,
    n_continuation=1,
    n_scored=64,
    n_batch=128,
    n_decode_probe=16,
    streaming_rows=("full", "streaming_llm", "h2o", "blockmerge"),
    rss=False,
)


@dataclass(frozen=True)
class Case:
    """One evaluation case: ``prefix`` is cached (and compressed), then either the
    ``queries`` are answered or ``feed`` (last prefix token + scored tokens) is scored."""

    task: str
    label: str
    prefix: np.ndarray
    meta: Mapping[str, object]
    queries: tuple[tasks.Query, ...] = ()
    feed: np.ndarray | None = None


@dataclass(frozen=True)
class Result:
    """One row at one budget on one case.

    ``score``: generate tasks: mean answer score in [0, 1]; NLL tasks: mean NLL in nats.
    ``n_cells``/``kv_bytes``: the compressed cache that was scored.
    ``prefill_s``: wall time of the prefill (capture excluded in offline mode: there it
    is the compression time). ``merge_s``: time in compression/merging.
    """

    row: str
    mode: str
    budget: int
    case: int
    score: float
    n_cells: int
    kv_bytes: int
    prefill_s: float
    merge_s: float
    answers: tuple[str, ...] = ()
    # passkey, niah, multi_needle: mean NLL (nats/token) of the answers' tokens, teacher
    # forced after each query (NaN for the other tasks)
    nll: float = float("nan")


@dataclass(frozen=True)
class Speed:
    """Native speed and memory of one row at one budget, on the longest case."""

    row: str
    budget: int
    prefill_tok_s: float
    decode_tok_s: float
    merge_share: float
    kv_bytes: int
    kv_allocated: int
    peak_rss: int | None


@dataclass
class ModelResults:
    model: str
    arch: str
    cases: list[Case]
    results: list[Result] = field(default_factory=list)
    speeds: list[Speed] = field(default_factory=list)
    seconds: float = 0.0


def build_cases(llm: llama_cpp.Llama, config: SuiteConfig) -> list[Case]:
    """Every task's cases, tokenized for ``llm``'s model (deterministic for the seed)."""

    def tokenize(text: str) -> list[int]:
        return llm.tokenize(text.encode(), add_bos=False, special=False)

    bos = llm.tokenize(b"", add_bos=True, special=False)
    n, seed = config.n_context, config.seed
    samples = tasks.passkey_samples(
        tokenize, bos, n_context=n, depths=config.passkey_depths, seed=seed
    )
    samples += tasks.niah_samples(
        tokenize, bos, lengths=config.niah_lengths, depths=config.niah_depths, seed=seed
    )
    samples += tasks.multi_needle_samples(
        tokenize, bos, n_context=n, n_samples=config.n_multi_needle, seed=seed
    )
    samples += tasks.lcc_samples(tokenize, bos, n_context=n, n_samples=config.n_lcc, seed=seed)
    cases = [
        Case(s.task, s.label, np.asarray(s.context, np.int32), dict(s.meta), queries=s.queries)
        for s in samples
    ]
    for doc in texts.PLAIN_DOCS[: config.n_continuation]:
        ctx = texts.plain_context(doc, tokenize, bos, n, config.n_scored)
        cases.append(Case("continuation", ctx.label, ctx.prefix, {}, feed=ctx.feed))
    n_passage = n // 3
    for passage, filler in texts.RECALL_PAIRS[: config.n_recall]:
        ctx = texts.recall_context(
            passage,
            filler,
            tokenize,
            bos,
            n_passage,
            n - len(bos) - n_passage,
            min(config.n_scored, n_passage),
        )
        cases.append(Case("recall", ctx.label, ctx.prefix, {}, feed=ctx.feed))
    return cases


def _budget_cells(percent: int, n_cells: int) -> int:
    return max(1, round(percent * n_cells / 100))


def _bytes_per_cell(llm: llama_cpp.Llama, cache_type: str) -> int:
    """KV bytes one cell of the full-attention cache takes (all its layers, K and V)."""
    layout = model_layout(llm.model)
    width = layout.n_kv_head * layout.head_dim
    return 2 * len(layout.full_attention_layers) * row_bytes(cache_type, width)


class _Evaluator:
    """Scores states: answers for generate tasks, NLL for the others."""

    def __init__(self, llm: llama_cpp.Llama, scorers: Mapping[str, Scorer]) -> None:
        self.llm = llm
        self.scorers = scorers
        self.stop = frozenset([llm.token_eos()])

    def __call__(
        self, case: Case, state: bytes, cache_type: str
    ) -> tuple[float, tuple[str, ...], float]:
        """(score, greedy answers, mean answer NLL or NaN) of ``state`` on ``case``."""
        scorer = self.scorers[cache_type]
        first_pos = int(case.prefix.shape[0])
        if case.feed is not None:
            return float(scorer.nll(state, case.feed, first_pos).mean()), (), float("nan")
        scores, answers, nlls = [], [], []
        for query in case.queries:
            if query.scorer == "exact":
                # the query ends right before the answer, which follows after a space
                forced = self.llm.tokenize((" " + query.answer).encode(), add_bos=False)
                out, nll = scorer.generate_and_force(
                    state,
                    query.tokens,
                    first_pos,
                    query.max_new_tokens,
                    np.asarray(forced),
                    stop=self.stop,
                )
                nlls.append(float(nll.mean()))
            else:
                out = scorer.generate(
                    state, query.tokens, first_pos, query.max_new_tokens, stop=self.stop
                )
            text = self.llm.detokenize(out).decode("utf-8", errors="replace")
            answers.append(text)
            scores.append(tasks.score_answer(query, text))
        nll_mean = float(np.mean(nlls)) if nlls else float("nan")
        return float(np.mean(scores)), tuple(answers), nll_mean


def _read_state(ctx: llama_cpp.llama_context_p) -> bytes:
    size = llama_cpp.llama_state_seq_get_size(ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    if llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0) != size:
        raise RuntimeError("llama_state_seq_get_data did not return the whole state")
    return bytes(buf)


def _flat(state: bytes) -> bytes:
    """``state`` with row-major V (the scorers run with flash attention)."""
    return kvstate.write_seq_state(row_major_v(kvstate.parse_seq_state(state)))


def native_llama(
    path: str,
    cache_type: str,
    *,
    n_ctx: int,
    n_batch: int,
    n_threads: int,
    budget: int | None,
    recent: int = BENCH_RECENT,
    slack: int | None = None,
    merge_fields: Mapping[str, object] | None = None,
) -> llama_cpp.Llama:
    """The native row's Llama: plain (``budget`` None) or merging to ``budget`` cells.

    ``recent``: the merge settings' recent window. ``slack``: cells allowed above the
    budget before merging (default: the library's); quality runs use 0 so that a
    merging row never scores more cells than its budget. ``merge_fields``: other
    MergeSettings fields (``SuiteConfig.merge``); recall is off unless they turn it on.
    """
    import edgemerge

    type_id = ggml_type(cache_type).type_id
    merge = None
    if budget is not None:
        # the suite measures what the cache keeps without recall (the working set);
        # `--merge recall=true` measures the product's default on these tasks
        fields = {"recall": False, **dict(merge_fields or {})}
        merge = MergeSettings(**{**fields, "budget": budget, "recent": recent})
        if slack is not None:
            merge = dataclasses.replace(merge, slack=slack)
    return edgemerge.Llama(
        path,
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        type_k=type_id,
        type_v=type_id,
        flash_attn=True,
        merge=merge,
        verbose=False,
    )


def _native_ctx(budget: int | None, n_tokens: int, n_batch: int) -> int:
    cells = n_tokens if budget is None else budget + n_batch + MergeSettings().slack
    return -(-(cells + 64) // 256) * 256


def run_model(
    model: str,
    config: SuiteConfig,
    *,
    progress: Callable[[int, int, str], None] = lambda done, total, what: None,
) -> ModelResults:
    """Every row x budget x mode on every case, for one model.

    ``progress(done, total, what)`` is called before each case and before the speed
    runs (``total`` is the case count plus one).
    """
    from edgemerge.models import resolve_model

    path = str(resolve_model(model))
    threads = config.n_threads or max(1, os.cpu_count() or 1)
    start = time.perf_counter()
    llm = llama_cpp.Llama(path, n_ctx=256, n_threads=threads, verbose=False)
    cases = build_cases(llm, config)
    out = ModelResults(model, model_layout(llm.model).arch, cases)
    longest = max(c.prefix.shape[0] for c in cases)
    n_ctx = -(-(longest + 256) // 256) * 256
    types = sorted({r.cache_type for r in config.rows})
    scorers = {
        t: Scorer(llm.model, n_ctx, n_batch=256, n_threads=threads, cache_type=t) for t in types
    }
    evaluate = _Evaluator(llm, scorers)
    try:
        streamed = streaming_cases(cases, config)
        for ci, case in enumerate(cases):
            progress(ci, len(cases) + 1, case.label)
            if "offline" in config.modes:
                _offline(out, llm, config, ci, case, evaluate, threads)
            if "streaming" in config.modes and ci in streamed:
                _streaming(out, llm, path, config, ci, case, evaluate, threads)
        if "streaming" in config.modes:
            progress(len(cases), len(cases) + 1, "speed and memory")
            out.speeds = measure_speed(llm, path, config, cases, threads)
    finally:
        for scorer in scorers.values():
            scorer.close()
        llm.close()
    progress(len(cases) + 1, len(cases) + 1, "done")
    out.seconds = time.perf_counter() - start
    return out


def streaming_cases(cases: Sequence[Case], config: SuiteConfig) -> set[int]:
    """Indices of the cases streaming mode runs (see ``streaming_cases_per_task``)."""
    taken: dict[str, int] = {}
    chosen = set()
    for ci, case in enumerate(cases):
        if case.task == "niah" or taken.get(case.task, 0) >= config.streaming_cases_per_task:
            continue
        taken[case.task] = taken.get(case.task, 0) + 1
        chosen.add(ci)
    return chosen


def _jobs(config: SuiteConfig, row: Row) -> Iterator[int]:
    yield from (100,) if row.full_budget else config.budgets


def _offline(
    out: ModelResults,
    llm: llama_cpp.Llama,
    config: SuiteConfig,
    ci: int,
    case: Case,
    evaluate: _Evaluator,
    threads: int,
) -> None:
    capture = capture_kv(
        llm,
        case.prefix,
        n_obs=min(config.n_obs, case.prefix.shape[0]),
        n_batch=256,
        n_threads=threads,
    )
    base = row_major_v(capture.state)
    n = capture.snapshot.n_tok
    per_cell = _bytes_per_cell(llm, "f16")
    seen: dict[bytes, tuple[float, tuple[str, ...], float]] = {}
    for row in config.rows:
        if row.method is None:
            continue
        method = get_method(row.method, **config.method_settings(row))
        for pct in _jobs(config, row):
            budget = n if row.full_budget else _budget_cells(pct, n)
            if budget < method.min_budget(n):
                continue
            t0 = time.perf_counter()
            comp = method.compress(capture.snapshot, budget)
            merge_s = time.perf_counter() - t0
            state = compressed_state(base, comp)
            if state not in seen:
                seen[state] = evaluate(case, state, "f16")
            score, answers, nll = seen[state]
            kv = comp.n_cells * (
                _bytes_per_cell(llm, row.settings["key_type"])
                if row.method == "quant"
                else per_cell
            )
            out.results.append(
                Result(
                    row.label,
                    "offline",
                    pct,
                    ci,
                    score,
                    comp.n_cells,
                    kv,
                    merge_s,
                    merge_s,
                    answers,
                    nll,
                )
            )


def _streaming(
    out: ModelResults,
    llm: llama_cpp.Llama,
    path: str,
    config: SuiteConfig,
    ci: int,
    case: Case,
    evaluate: _Evaluator,
    threads: int,
) -> None:
    n = int(case.prefix.shape[0])
    for row in config.rows:
        if not config.runs_streaming(row):
            continue
        for pct in _jobs(config, row):
            budget = None if row.full_budget else _budget_cells(pct, n)
            if row.streaming == "native":
                try:
                    state, cells, prefill_s, merge_s = _native_prefill(
                        path, row, case.prefix, budget, config, threads
                    )
                except SettingsError:
                    continue  # the budget cannot take a chunk beside the protected cells
                kv = cells * _bytes_per_cell(llm, row.cache_type)
            else:
                method = get_method(row.method, **config.method_settings(row))
                n_ctx = -(-(budget + config.n_batch) // 256) * 256
                with StreamingPrefill(
                    llm, n_ctx, n_batch=config.n_batch, n_obs=config.n_obs, n_threads=threads
                ) as stream:
                    try:
                        res = stream.prefill(case.prefix, method, budget)
                    except ValueError:
                        continue  # the budget is below what the method always keeps
                state, cells = _flat(res.state), res.n_cells
                prefill_s = res.eval_s + res.compress_s + res.io_s
                merge_s = res.compress_s + res.io_s
                kv = cells * _bytes_per_cell(llm, "f16")
            score, answers, nll = evaluate(case, state, row.cache_type)
            out.results.append(
                Result(
                    row.label,
                    "streaming",
                    pct,
                    ci,
                    score,
                    cells,
                    kv,
                    prefill_s,
                    merge_s,
                    answers,
                    nll,
                )
            )


def _native_prefill(
    path: str,
    row: Row,
    prefix: np.ndarray,
    budget: int | None,
    config: SuiteConfig,
    threads: int,
) -> tuple[bytes, int, float, float]:
    """Prefill ``prefix`` natively; the state (row-major V), cells, prefill and merge seconds."""
    n_ctx = _native_ctx(budget if row.merge else None, int(prefix.shape[0]), config.n_batch)
    llm = native_llama(
        path,
        row.cache_type,
        n_ctx=n_ctx,
        n_batch=config.n_batch,
        n_threads=threads,
        budget=budget if row.merge else None,
        recent=config.merge_recent,
        slack=0,
        merge_fields=dict(config.merge),
    )
    try:
        t0 = time.perf_counter()
        llm.eval(prefix.tolist())
        prefill_s = time.perf_counter() - t0
        merge_s = llm.merge_stats().merge_time_s if row.merge else 0.0
        state = _read_state(llm.ctx)
        cells = kvstate.parse_seq_state(state).caches[0].stream.positions.shape[0]
        return state, int(cells), prefill_s, merge_s
    finally:
        llm.close()


def measure_speed(
    llm: llama_cpp.Llama, path: str, config: SuiteConfig, cases: Sequence[Case], threads: int
) -> list[Speed]:
    """Prefill/decode speed, merge share, KV bytes and peak RSS of the native rows."""
    from edgemerge.evaluation import memprobe

    prefix = max(cases, key=lambda c: c.prefix.shape[0]).prefix
    speeds = []
    for row in config.rows:
        if row.streaming != "native" or not config.runs_streaming(row):
            continue
        for pct in _jobs(config, row):
            budget = _budget_cells(pct, prefix.shape[0]) if row.merge else None
            n_ctx = _native_ctx(
                budget, int(prefix.shape[0]) + config.n_decode_probe, config.n_batch
            )
            if budget is not None and budget - config.n_batch < config.merge_recent + 18:
                continue  # as in _streaming: this budget cannot run natively
            probe = memprobe.Probe(
                path,
                row.cache_type,
                n_ctx,
                config.n_batch,
                threads,
                budget,
                prefix.tolist(),
                config.n_decode_probe,
                config.merge_recent,
                config.merge,
            )
            measured = memprobe.run_in_child(probe) if config.rss else memprobe.run(probe)
            per_cell = _bytes_per_cell(llm, row.cache_type)
            speeds.append(
                Speed(
                    row.label,
                    pct,
                    measured.prefill_tok_s,
                    measured.decode_tok_s,
                    measured.merge_share,
                    measured.cells * per_cell,
                    n_ctx * per_cell,
                    measured.peak_rss if config.rss else None,
                )
            )
    return speeds


def replace(config: SuiteConfig, **changes: object) -> SuiteConfig:
    """``config`` with ``changes`` (validated again)."""
    return dataclasses.replace(config, **changes)
