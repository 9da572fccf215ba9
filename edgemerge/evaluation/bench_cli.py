"""``edgemerge bench``: run the evaluation suite and write its report and plots."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

from edgemerge.evaluation import report, suite
from edgemerge.evaluation.texts import FidelityInputError


def add_arguments(ap: argparse.ArgumentParser) -> None:
    from edgemerge.evaluation import chat_bench

    ap.add_argument(
        "--task",
        choices=("suite", "chat-memory", "retrieval"),
        default="suite",
        help="suite: the fidelity suite (default); chat-memory: multi-turn conversations "
        "through edgemerge.Llama as `edgemerge chat` runs them; retrieval: pass keys and "
        "needles asked of an edgemerge.Llama, recall included; both resumable",
    )
    preset = ap.add_mutually_exclusive_group()
    preset.add_argument(
        "--quick",
        action="store_true",
        help="Qwen only, 1K-token cases, one of each task, budgets 50/35%% and a subset of "
        "streaming rows: under 10 minutes on 2 cores (the CI smoke run)",
    )
    preset.add_argument(
        "--full", action="store_true", help="both models, every task, row and budget (default)"
    )
    ap.add_argument("--models", nargs="+", help="registry names or GGUF paths")
    ap.add_argument("--budgets", type=int, nargs="+", help="budgets in percent of the cells")
    ap.add_argument("--modes", nargs="+", choices=suite.MODES)
    ap.add_argument("--context", type=int, help="tokens per case (passkey, multi-needle, ...)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    ap.add_argument("--no-rss", action="store_true", help="skip the child-process RSS probes")
    ap.add_argument(
        "--rows", nargs="+", metavar="LABEL", help="run only these rows (e.g. full blockmerge)"
    )
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="FIELD=VALUE",
        help="MergeSettings fields for the BlockMerge rows, offline and native "
        "(e.g. centre=false threshold=1)",
    )
    ap.add_argument(
        "--out", type=Path, help="markdown report (default: docs/results.md; --quick: none)"
    )
    ap.add_argument(
        "--plots", type=Path, help="directory for the PNGs (default: next to --out, results/)"
    )
    ap.add_argument("--raw", type=Path, help="also pickle the measurements to this file")
    ap.add_argument(
        "--render",
        type=Path,
        nargs="+",
        metavar="RAW",
        help="measure nothing: render the report from files saved with --raw (their models "
        "in order; the first file's settings)",
    )
    ap.add_argument("--no-progress", action="store_true")
    chat = ap.add_argument_group("product path (--task chat-memory, --task retrieval)")
    chat_bench.add_arguments(chat)


def config_from_args(args: argparse.Namespace) -> suite.SuiteConfig:
    """The preset (--quick or the full default), then the flags given."""
    config = suite.QUICK if args.quick else suite.SuiteConfig()
    changes: dict[str, object] = {}
    if args.models:
        changes["models"] = tuple(args.models)
    if args.budgets:
        changes["budgets"] = tuple(args.budgets)
    if args.modes:
        changes["modes"] = tuple(args.modes)
    if args.context is not None:
        changes["n_context"] = args.context
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.threads is not None:
        changes["n_threads"] = args.threads
    if args.no_rss:
        changes["rss"] = False
    if args.rows:
        check_rows(args.rows, [r.label for r in config.rows])
        changes["rows"] = tuple(r for r in config.rows if r.label in args.rows)
        if config.streaming_rows is not None:
            changes["streaming_rows"] = tuple(x for x in config.streaming_rows if x in args.rows)
    if args.merge:
        changes["merge"] = tuple(_merge_field(text) for text in args.merge)
    return suite.replace(config, **changes)


def check_rows(given: Sequence[str], known: Sequence[str]) -> None:
    """``--rows`` names only rows that exist; the error lists them."""
    unknown = [label for label in given if label not in known]
    if unknown:
        raise ValueError(f"--rows: no row {', '.join(unknown)}; the rows: {', '.join(known)}")


def _merge_field(text: str) -> tuple[str, object]:
    """``FIELD=VALUE`` as a MergeSettings field and a value of its type."""
    from edgemerge.settings import MergeSettings

    name, eq, raw = text.partition("=")
    defaults = {f.name: f.default for f in dataclasses.fields(MergeSettings)}
    if not eq or name not in defaults:
        raise ValueError(
            f"--merge {text!r}: want FIELD=VALUE with FIELD among {', '.join(defaults)}"
        )
    default = defaults[name]
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false", "on", "off", "1", "0"):
            raise ValueError(f"--merge {text!r}: {name} takes true or false")
        return name, raw.lower() in ("true", "on", "1")
    for kind in (int, float):
        try:
            return name, kind(raw)
        except ValueError:
            pass
    return name, raw


def machine_line(threads: int) -> str:
    import llama_cpp
    import numpy as np

    import edgemerge

    return (
        f"{platform.platform()} ({platform.machine()}), {os.cpu_count()} logical cores, "
        f"{threads} threads; Python {platform.python_version()}, numpy {np.__version__}, "
        f"llama-cpp-python {llama_cpp.__version__}, edgemerge {edgemerge.__version__}"
    )


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the suite as ``args`` say; 0 on success, 2 on bad input."""
    from tqdm import tqdm

    if args.task in ("chat-memory", "retrieval"):
        from edgemerge.evaluation import chat_bench

        try:
            merge = tuple(_merge_field(text) for text in args.merge or ())
        except ValueError as err:
            print(f"edgemerge bench: {err}", file=sys.stderr)
            return 2
        command = "edgemerge bench" + "".join(f" {a}" for a in argv)
        return chat_bench.main(args, command, merge)

    try:
        config = config_from_args(args)
    except ValueError as err:
        print(f"edgemerge bench: {err}", file=sys.stderr)
        return 2
    threads = config.n_threads or max(1, os.cpu_count() or 1)
    command = "edgemerge bench" + "".join(f" {a}" for a in argv)
    runs = []
    if args.render:
        try:
            saved = [pickle.loads(path.read_bytes()) for path in args.render]
        except (OSError, pickle.UnpicklingError, EOFError) as err:
            print(f"edgemerge bench: cannot read a saved run: {err}", file=sys.stderr)
            return 2
        config = saved[0]["config"]
        runs = [run for s in saved for run in s["runs"]]
        command = " && ".join(s["command"] for s in saved)
        config = suite.replace(config, models=tuple(r.model for r in runs))
    for model in config.models if not args.render else ():
        bar = tqdm(desc=model, unit="case", disable=args.no_progress, file=sys.stderr)

        def progress(done: int, total: int, what: str, bar: tqdm = bar) -> None:
            bar.total = total
            bar.n = done
            bar.set_postfix_str(what[:40])
            bar.refresh()

        try:
            runs.append(suite.run_model(model, config, progress=progress))
        except (FidelityInputError, FileNotFoundError) as err:
            print(f"edgemerge bench: {err}", file=sys.stderr)
            return 2
        finally:
            bar.close()
    elapsed = sum(run.seconds for run in runs)
    machine = machine_line(threads) + f"; wall time {elapsed / 60:.1f} min"
    if args.raw is not None:
        with args.raw.open("wb") as f:
            pickle.dump({"runs": runs, "config": config, "command": command}, f)
    out = args.out
    if out is None and not args.quick:
        out = Path("docs/results.md")
    plot_dir = args.plots or (out.parent / "results" if out is not None else None)
    plots = {}
    if plot_dir is not None:
        plots = {run.model: report.plot_model(run, config, plot_dir) for run in runs}
        if out is not None:
            rel = os.path.relpath(plot_dir, out.parent)
            plots = {m: {k: f"{rel}/{v}" for k, v in p.items()} for m, p in plots.items()}
    text = report.render(runs, config, command=command, machine=machine, plots=plots)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"written to {out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edgemerge bench", description=__doc__)
    add_arguments(ap)
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(ap.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
