"""Fidelity of every KV compression method on real KV, as a method x budget table.

For each model and each context (see ``edgemerge.evaluation.texts``), the context's KV cache is
captured once from the real model (``edgemerge.native.capture.capture_kv``: K/V as cached,
the last ``n_obs`` queries and the attention mass every cell received) and reused
by every method and budget:

(a) attention-output relative error per layer: ``||O' - O|| / ||O||`` of held-out
    queries (those of the first ``n_probe`` tokens after the context, captured in a
    second run over context + probe) over the compressed cells against the original
    ones (``edgemerge.reference.error.compressed_attention_error``). The methods
    never see these queries.
(b) continuation NLL on plain text: the compressed cells are written into the
    captured state (``edgemerge.native.kvstate.with_kv``, with each cell's position, bias
    and span), restored with ``llama_state_seq_set_data`` into a fresh context, and
    the next tokens of the same document are decoded at their true positions (after
    the context's last position, not after the cell count) and scored.
(c) recall NLL: the same for a passage, then other text, then the start of the
    passage repeated; the NLL of the repeat.

Budgets are percentages of the context's cells. Methods keep their registry
defaults except where ROWS says. Gemma 3 keeps its sliding-window cache as it is;
only the full-attention layers are compressed. No sampling happens anywhere and
every method is deterministic (SimHash seed 0), so a rerun gives the same table
up to llama.cpp's floating-point scheduling.

    python bench/fidelity.py                # both models, all budgets -> docs/fidelity.md
    python bench/fidelity.py --quick        # Qwen only, shorter texts, printed only
"""

from __future__ import annotations

# edgemerge first: importing it points llama_cpp at edgemerge's patched libllama.
import edgemerge  # isort: skip
import llama_cpp  # isort: skip

import argparse
import dataclasses
import hashlib
import os
import pickle
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _fidelity_config import (
    DEFAULT_MODELS,
    QUICK,
    FidelityConfig,
    Measurement,
    ModelRun,
    Row,
    budget_cells,
)
from _fidelity_report import render_markdown
from tqdm import tqdm

from edgemerge.evaluation.scoring import Scorer, compressed_state, row_major_v
from edgemerge.evaluation.texts import (
    PLAIN_DOCS,
    RECALL_PAIRS,
    Context,
    FidelityInputError,
    plain_context,
    recall_context,
)
from edgemerge.methods import get_method
from edgemerge.methods.base import CompressedKV, KVSnapshot
from edgemerge.models import resolve_model
from edgemerge.native import kvstate
from edgemerge.native.capture import capture_kv
from edgemerge.reference.error import compressed_attention_error

ROOT = Path(__file__).resolve().parents[1]


def _contexts(llm: llama_cpp.Llama, config: FidelityConfig) -> list[Context]:
    def tokenize(text: str) -> list[int]:
        return llm.tokenize(text.encode(), add_bos=False, special=False)

    bos = llm.tokenize(b"", add_bos=True, special=False)
    contexts = [
        plain_context(doc, tokenize, bos, config.n_context, config.n_scored)
        for doc in config.plain_docs
    ]
    contexts += [
        recall_context(
            passage, filler, tokenize, bos, config.n_passage, config.n_filler, config.n_repeat
        )
        for passage, filler in config.recall_pairs
    ]
    return contexts


def _probe_queries(
    llm: llama_cpp.Llama, context: Context, config: FidelityConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Post-RoPE queries (and positions) of the first tokens fed after the context.

    A second capture over prefix + probe tokens; flash attention on, since this run
    needs no attention probabilities and is faster that way.
    """
    n_probe = min(config.n_probe, context.n_scored + 1)
    tokens = np.concatenate([context.prefix, context.feed[:n_probe]])
    probe = capture_kv(
        llm,
        tokens,
        n_obs=n_probe,
        flash_attn=True,
        n_batch=config.n_batch,
        n_threads=config.n_threads,
    )
    return probe.queries, probe.query_positions


def _attention_error(
    kv: KVSnapshot, compressed: CompressedKV, queries: np.ndarray, query_positions: np.ndarray
) -> np.ndarray:
    return compressed_attention_error(
        queries,
        kv.keys,
        kv.values,
        compressed.keys,
        compressed.values,
        compressed.bias,
        scale=kv.scale,
        positions=kv.positions,
        compressed_positions=compressed.positions,
        query_positions=query_positions,
    )


def _jobs(config: FidelityConfig) -> list[tuple[Row, int]]:
    return [(row, pct) for row in config.rows for pct in config.row_budgets(row)]


def run_model(
    model: str | os.PathLike[str], config: FidelityConfig, *, progress: bool = True
) -> ModelRun:
    """Measure every row of ``config`` at its budgets on every context, for one model.

    Raises:
        FidelityInputError: a text is missing or too short for the token counts.
        edgemerge.native.capture.CaptureError, edgemerge.evaluation.scoring.ScoringError:
            llama.cpp failed.
    """
    path = resolve_model(model, progress=progress)
    label = str(model) if not Path(str(model)).is_file() else Path(model).stem
    threads = config.n_threads or max(1, os.cpu_count() or 1)
    config = dataclasses.replace(config, n_threads=threads)
    start = time.perf_counter()
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=threads, verbose=False)
    contexts = _contexts(llm, config)
    jobs = _jobs(config)
    run = ModelRun(label, path, (), 0, "", contexts, {})
    n_ctx = -(-max(c.tokens.shape[0] for c in contexts) // 256) * 256
    bar = tqdm(
        total=len(contexts) * (len(jobs) + 2),
        desc=label,
        unit="step",
        disable=not progress,
        file=sys.stderr,
    )
    with Scorer(llm._model.model, n_ctx, n_batch=config.n_batch, n_threads=threads) as scorer:
        for ci, context in enumerate(contexts):
            bar.set_postfix_str(f"capture {context.label}")
            t0 = time.perf_counter()
            capture = capture_kv(
                llm,
                context.prefix,
                n_obs=min(config.n_obs, context.prefix.shape[0]),
                n_batch=config.n_batch,
                n_threads=threads,
            )
            bar.update()
            queries, query_positions = _probe_queries(llm, context, config)
            run.capture_s += time.perf_counter() - t0
            bar.update()
            run.layers, run.n_layer = capture.layers, capture.layout.n_layer
            run.arch = capture.layout.arch
            probe = (queries, query_positions)
            _measure_context(
                run, ci, context, capture.snapshot, capture.state, probe, jobs, scorer, bar
            )
    bar.close()
    run.seconds = time.perf_counter() - start
    return run


def _measure_context(
    run: ModelRun,
    ci: int,
    context: Context,
    kv: KVSnapshot,
    state: kvstate.SeqState,
    probe: tuple[np.ndarray, np.ndarray],
    jobs: Sequence[tuple[Row, int]],
    scorer: Scorer,
    bar: tqdm,
) -> None:
    """Compress, measure and score every job on one captured context."""
    base = row_major_v(state)
    compressed: dict[tuple[object, int], tuple[CompressedKV, float] | str] = {}
    scored: dict[bytes, float] = {}  # identical states (e.g. every method at 100%) score once
    n_prefix = kv.n_tok
    for row, pct in jobs:
        bar.set_postfix_str(f"{context.label[:28]}: {row.label} @ {pct}%")
        budget = budget_cells(pct, n_prefix)
        key = (row.key, budget)
        if key not in compressed:
            method = get_method(row.method, **row.settings)
            if budget < method.min_budget(n_prefix):
                compressed[key] = (
                    f"needs at least {method.min_budget(n_prefix)} cells, the budget is {budget}"
                )
            else:
                t0 = time.perf_counter()
                out = method.compress(kv, budget)
                compressed[key] = (out, time.perf_counter() - t0)
        entry = compressed[key]
        if isinstance(entry, str):
            run.results[(row.label, pct, ci)] = entry
            bar.update()
            continue
        out, compress_s = entry
        if out.positions[-1] != n_prefix - 1:
            raise RuntimeError(
                f"{row.label} dropped the context's last cell (position {n_prefix - 1}); "
                "the scored tokens could not continue at their true positions"
            )
        state_bytes = compressed_state(base, out)
        digest = hashlib.sha256(state_bytes).digest()
        if digest not in scored:
            t0 = time.perf_counter()
            scored[digest] = float(scorer.nll(state_bytes, context.feed, context.first_pos).mean())
            run.score_s += time.perf_counter() - t0
        run.results[(row.label, pct, ci)] = Measurement(
            n_cells=out.n_cells,
            budget_cells=budget,
            attn_error=_attention_error(kv, out, *probe),
            nll=scored[digest],
            compress_s=compress_s,
            info=dict(out.info),
        )
        bar.update()


def machine_line(threads: int) -> str:
    """Platform, cores and software versions, for the report."""
    import platform

    return (
        f"{platform.platform()} ({platform.machine()}), {os.cpu_count()} logical cores, "
        f"{threads} threads; Python {platform.python_version()}, numpy {np.__version__}, "
        f"llama-cpp-python {llama_cpp.__version__}, edgemerge {edgemerge.__version__}"
    )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="Qwen only, 1000-token contexts, one text of each kind, budgets 100/50/35, "
        "ablations at 50%%",
    )
    ap.add_argument(
        "--models",
        nargs="+",
        help=f"registry names or GGUF paths (default: {' '.join(DEFAULT_MODELS)}; "
        "--quick: the first)",
    )
    ap.add_argument("--budgets", type=int, nargs="+", help="budgets in percent of the cells")
    ap.add_argument("--ablation-budgets", type=int, nargs="+")
    for name in ("context", "scored", "passage", "filler", "repeat", "probe"):
        ap.add_argument(f"--{name}", type=int, help=f"n_{name} tokens")
    ap.add_argument("--plain-docs", type=int, help="how many plain-text documents to use")
    ap.add_argument("--recall-pairs", type=int, help="how many recall contexts to use")
    ap.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    ap.add_argument(
        "--out",
        type=Path,
        help="markdown file to write (default docs/fidelity.md; none with --quick)",
    )
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--raw", type=Path, help="also save the measurements (pickle) to this file")
    ap.add_argument(
        "--render",
        type=Path,
        help="measure nothing: render the report from a file saved with --raw",
    )
    return ap


def config_from_args(args: argparse.Namespace) -> FidelityConfig:
    """The run's configuration: defaults (or QUICK), then the flags given."""
    config = QUICK if args.quick else FidelityConfig()
    changes: dict[str, object] = {}
    if args.budgets:
        changes["budgets"] = tuple(args.budgets)
    if args.ablation_budgets:
        changes["ablation_budgets"] = tuple(args.ablation_budgets)
    for name in ("context", "scored", "passage", "filler", "repeat", "probe"):
        if getattr(args, name) is not None:
            changes[f"n_{name}"] = getattr(args, name)
    if args.plain_docs is not None:
        changes["plain_docs"] = PLAIN_DOCS[: args.plain_docs]
    if args.recall_pairs is not None:
        changes["recall_pairs"] = RECALL_PAIRS[: args.recall_pairs]
    if args.threads is not None:
        changes["n_threads"] = args.threads
    return dataclasses.replace(config, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.render is not None:
        try:
            with args.render.open("rb") as f:
                saved = pickle.load(f)
            runs, config = saved["runs"], saved["config"]
            command, machine, elapsed = saved["command"], saved["machine"], saved["elapsed_s"]
        except (OSError, pickle.UnpicklingError, KeyError, TypeError) as err:
            print(f"fidelity: cannot read a saved run from {args.render}: {err}", file=sys.stderr)
            return 2
    else:
        try:
            config = config_from_args(args)
        except FidelityInputError as err:
            print(f"fidelity: {err}", file=sys.stderr)
            return 2
        models = args.models or (DEFAULT_MODELS[:1] if args.quick else DEFAULT_MODELS)
        threads = config.n_threads or max(1, os.cpu_count() or 1)
        command = "python bench/fidelity.py" + "".join(
            f" {a}" for a in (sys.argv[1:] if argv is None else argv)
        )
        machine = machine_line(threads)
        start = time.perf_counter()
        try:
            runs = [run_model(m, config, progress=not args.no_progress) for m in models]
        except FidelityInputError as err:
            print(f"fidelity: {err}", file=sys.stderr)
            return 2
        elapsed = time.perf_counter() - start
        if args.raw is not None:
            with args.raw.open("wb") as f:
                pickle.dump(
                    {
                        "runs": runs,
                        "config": config,
                        "command": command,
                        "machine": machine,
                        "elapsed_s": elapsed,
                    },
                    f,
                )
    text = render_markdown(runs, config, command=command, machine=machine, elapsed_s=elapsed)
    print(text)
    out = args.out if args.out is not None else (None if args.quick else ROOT / "docs/fidelity.md")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
