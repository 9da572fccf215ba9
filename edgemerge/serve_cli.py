"""The `edgemerge serve` subcommand's flags; the server itself is :mod:`edgemerge.server`
(imported only when the command runs, so the rest of the CLI needs no web packages)."""

from __future__ import annotations

import argparse
import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def byte_size(text: str) -> int:
    """``"2G"``, ``"512M"``, ``"1.5GiB"`` or a plain byte count, as bytes (>= 1)."""
    m = _SIZE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 2G, 512M or 1048576")
    scale = 1024 ** "bkmgt".index((m.group(2) or "b").lower())
    value = int(float(m.group(1)) * scale)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is less than one byte")
    return value


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the ``edgemerge`` command's subparsers."""
    from edgemerge import cli

    serve = sub.add_parser(
        "serve",
        help="an OpenAI-compatible server (llama-cpp-python's, on edgemerge)",
        description="Serve /v1/chat/completions, /v1/completions (streaming or not) and "
        "/v1/models. Each conversation keeps its own cache inside --budget cells, so a client "
        "that resends a long history has only its new tail evaluated.",
    )
    serve.add_argument(
        "--model", "-m", default=None, help="registry name or GGUF path (default: the default)"
    )
    serve.add_argument(
        "--alias", default=None, help="the model id clients send (default: --model as given)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="listen port (default %(default)s)")
    serve.add_argument("--api-key", default=None, help="require this bearer key")
    serve.add_argument(
        "--n-ctx", type=cli._positive, default=4096, help="physical KV cache cells (default 4096)"
    )
    serve.add_argument(
        "--n-ctx-logical",
        type=cli._positive,
        default=None,
        help="longest conversation in tokens when merging (default: the model's trained context)",
    )
    serve.add_argument("--n-batch", type=cli._positive, default=512, help="prompt tokens per eval")
    serve.add_argument("--threads", "-t", type=cli._positive, default=None, help="CPU threads")
    serve.add_argument(
        "--n-gpu-layers", "-ngl", type=int, default=0, help="layers on the GPU (-1 = all)"
    )
    serve.add_argument(
        "--chat-format", default=None, help="llama-cpp-python chat format (default: GGUF template)"
    )
    serve.add_argument(
        "--max-conversations",
        type=cli._positive,
        default=16,
        help="conversations whose cache is kept; the least recently used go first (default 16)",
    )
    serve.add_argument(
        "--cache-size",
        type=byte_size,
        default=2 << 30,
        help="memory for the kept conversations' caches, e.g. 512M or 2G (default 2G)",
    )
    serve.add_argument(
        "--max-tokens",
        type=cli._positive,
        default=2048,
        help="reply length when a request sets none (default 2048)",
    )
    cli._merge_flags(serve)
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from edgemerge import cli

    try:
        from edgemerge import server
    except ImportError as exc:
        raise cli.CliError(
            f"edgemerge serve needs the server packages ({exc.name} is missing): "
            "pip install 'edgemerge[server]'"
        ) from exc
    merge = cli.merge_settings_from_args(args)
    config = server.ServeConfig(
        model=args.model,
        alias=args.alias,
        merge=merge,
        n_ctx=args.n_ctx,
        n_ctx_logical=args.n_ctx_logical,
        n_batch=args.n_batch,
        n_threads=args.threads,
        n_gpu_layers=args.n_gpu_layers,
        chat_format=args.chat_format,
        max_conversations=args.max_conversations,
        cache_bytes=args.cache_size,
        max_tokens=args.max_tokens,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
    )
    try:
        server.run(config)
    except ValueError as exc:
        if isinstance(exc, cli.SettingsError):
            raise
        raise cli.CliError(f"could not serve {args.model}: {exc}") from exc
    return 0
