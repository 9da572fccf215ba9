"""`edgemerge serve`: llama-cpp-python's OpenAI-compatible server on edgemerge's runtime.

The app is llama-cpp-python's own (``llama_cpp.server``: its FastAPI router, request
types, settings, ``LlamaProxy``, authentication and SSE streaming), with three changes:

- the model is an :class:`~edgemerge.prefix.conversations.ServedLlama` (``edgemerge.Llama``,
  merging as configured) with a :class:`~edgemerge.prefix.conversations.ConversationCache`,
  so each conversation keeps its own bounded cache and a client that resends a long
  history only has its tail evaluated;
- ``/v1/chat/completions`` and ``/v1/completions`` are served by the handlers below,
  which call the same ``Llama`` methods as llama-cpp-python's but report cells,
  logical tokens and merges in an ``edgemerge`` field (and in a last stream chunk
  with no choices), and turn bad input into an OpenAI-style error *before* a stream
  starts: the first chunk is produced before the response is committed;
- an unknown model is a 404 (llama-cpp-python silently uses the default one), a body
  that does not validate is a 400 naming the field, and a client that leaves a stream
  stops the generation at the next token; its conversation is saved as far as it got.

Requests are served one at a time (one context); the others wait. Other routes of
llama-cpp-python's server (``/v1/models``, ``/extras/tokenize``, ...) are kept as
they are and see the same model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import llama_cpp
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware import Middleware
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from llama_cpp.server import app as lcs_app
from llama_cpp.server.model import LlamaProxy
from llama_cpp.server.settings import ModelSettings, ServerSettings
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from sse_starlette.sse import EventSourceResponse
from starlette_context.middleware import RawContextMiddleware
from starlette_context.plugins import RequestIdPlugin

from edgemerge.models import resolve_model
from edgemerge.prefix.conversations import ConversationCache, ServedLlama
from edgemerge.settings import MergeSettings

log = logging.getLogger("edgemerge.server")

COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")


@dataclass
class ServeConfig:
    """Everything ``edgemerge serve`` needs; the CLI fills it from its flags.

    Attributes:
        model: registry name or GGUF path (as everywhere in edgemerge).
        alias: the model id clients send and ``/v1/models`` lists (default: ``model``).
        merge: the merge policy, or None for plain llama-cpp-python.
        n_ctx: physical KV cells of the one context.
        n_ctx_logical: longest conversation in tokens when merging (default: trained).
        n_batch: prompt tokens per evaluation.
        n_threads: CPU threads (None: llama-cpp-python's default).
        n_gpu_layers: layers to offload (CUDA builds).
        chat_format: a llama-cpp-python chat format (None: the GGUF's template).
        max_conversations: conversations kept; the idle ones are dropped first.
        cache_bytes: bytes of saved conversations kept.
        max_tokens: reply length when a request gives none (or 0).
        host, port, api_key: where to listen and the bearer key (None: no key).
        seed: sampling seed of the context.
    """

    model: str
    alias: str | None = None
    merge: MergeSettings | None = None
    n_ctx: int = 4096
    n_ctx_logical: int | None = None
    n_batch: int = 512
    n_threads: int | None = None
    n_gpu_layers: int = 0
    chat_format: str | None = None
    max_conversations: int = 16
    cache_bytes: int = 2 << 30
    max_tokens: int = 2048
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    seed: int = llama_cpp.LLAMA_DEFAULT_SEED


class ServeError(HTTPException):
    """An OpenAI-style error response (an HTTPException, so that llama-cpp-python's
    route class passes it through)."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None
    ) -> None:
        super().__init__(status_code=status, detail=message)
        self.body = {"error": {"message": message, "type": type, "param": None, "code": code}}


def _error_response(exc: ServeError) -> JSONResponse:
    return JSONResponse(exc.body, status_code=exc.status_code)


class EdgemergeProxy(LlamaProxy):
    """llama-cpp-python's model proxy, loading a :class:`ServedLlama` and refusing
    models it does not serve (instead of answering with the default one)."""

    def __init__(
        self, config: ServeConfig, settings: ModelSettings, extra_aliases: tuple[str, ...] = ()
    ) -> None:
        self.config = config
        self.extra_aliases = extra_aliases
        super().__init__(models=[settings])

    def __call__(self, model: str | None = None) -> ServedLlama:
        if model is not None and model not in self.aliases:
            raise ServeError(
                404,
                f"model {model!r} is not served here; this server serves "
                f"{self._default_model_alias!r} (GET /v1/models lists it)",
                code="model_not_found",
            )
        return super().__call__(None)

    @property
    def aliases(self) -> set[str]:
        return {self._default_model_alias, *self.extra_aliases}

    def load_llama_from_model_settings(self, settings: ModelSettings) -> ServedLlama:
        c = self.config
        kwargs: dict[str, Any] = {}
        if c.n_threads is not None:
            kwargs.update(n_threads=c.n_threads, n_threads_batch=c.n_threads)
        llm = ServedLlama(
            settings.model,
            merge=c.merge,
            n_ctx_logical=c.n_ctx_logical,
            n_ctx=settings.n_ctx,
            n_batch=settings.n_batch,
            n_gpu_layers=settings.n_gpu_layers,
            seed=settings.seed,
            chat_format=settings.chat_format,
            logits_all=False,
            verbose=settings.verbose,
            **kwargs,
        )
        llm.set_cache(
            ConversationCache(
                c.cache_bytes,
                max_conversations=c.max_conversations,
                block_size=c.merge.block_size if c.merge is not None else 16,
                namespace=str(settings.model),
            )
        )
        return llm


class _Server:
    """The state behind one app: the proxy, the one-request-at-a-time lock, counters."""

    def __init__(self, config: ServeConfig, proxy: EdgemergeProxy) -> None:
        self.config = config
        self.proxy = proxy
        # a semaphore, not a lock: a stream takes it in the handler and gives it back
        # from the response's task once the stream ends
        self.busy = anyio.Semaphore(1)
        self.requests = 0
        self.streams_left = 0  # streams whose client went away before the end
        self.errors = 0


def _context_error(exc: Exception, config: ServeConfig, llm: ServedLlama) -> ServeError | None:
    """The clear error for a prompt that does not fit the (logical) context."""
    m = re.search(r"Requested tokens \((\d+)\) exceed context window", str(exc))
    if m is None:
        return None
    limit = llm._n_ctx
    what = "n_ctx_logical (--n-ctx-logical)" if config.merge is not None else "n_ctx (--n-ctx)"
    return ServeError(
        400,
        f"the prompt has {m.group(1)} tokens; this server's context holds {limit} ({what}); "
        "send a shorter history or start the server with a longer context",
        code="context_length_exceeded",
    )


def _as_serve_error(exc: Exception, config: ServeConfig, llm: ServedLlama) -> ServeError:
    if isinstance(exc, ServeError):
        return exc
    ctx = _context_error(exc, config, llm)
    if ctx is not None:
        return ctx
    if isinstance(exc, ValueError):  # llama-cpp-python's checks of a request's values
        return ServeError(400, str(exc), code=None)
    log.error("request failed:\n%s", traceback.format_exc())
    return ServeError(500, f"{type(exc).__name__}: {exc}", type="internal_server_error", code=None)


def _request_kwargs(
    body: CreateCompletionRequest | CreateChatCompletionRequest, config: ServeConfig
) -> dict[str, Any]:
    kwargs = body.model_dump(exclude={"n", "best_of", "logit_bias_type", "user", "min_tokens"})
    if not kwargs.get("max_tokens"):
        kwargs["max_tokens"] = config.max_tokens
    return kwargs


def _final_chunk(last: dict[str, Any] | None, stats: dict[str, Any], chat: bool) -> dict:
    """The stream's last chunk: no choices, the response's edgemerge counters."""
    last = last or {}
    return {
        "id": last.get("id", ""),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": last.get("created", int(time.time())),
        "model": last.get("model", ""),
        "choices": [],
        "edgemerge": stats,
    }


class _Stream(EventSourceResponse):
    """An SSE response over a started completion; whatever ends it (the last chunk, an
    error, the client leaving), :meth:`__call__` closes the generation, saves the
    conversation when it was cut short and frees the server for the next request."""

    def __init__(
        self,
        server: _Server,
        llm: ServedLlama,
        iterator: Iterator[dict],
        first: dict,
        chat: bool,
        request: Request,
    ) -> None:
        self._server, self._llm, self._iterator, self._chat = server, llm, iterator, chat
        self._finished = self._failed = False
        self._released = False
        send, recv = anyio.create_memory_object_stream(10)
        super().__init__(
            recv,
            data_sender_callable=partial(self._publish, send, first, request),
            sep="\n",
        )

    async def _publish(self, send: Any, first: dict, request: Request) -> None:
        async with send:
            chunk: dict | None = first
            last = first
            try:
                while chunk is not None:
                    await send.send({"data": json.dumps(chunk)})
                    if await request.is_disconnected():
                        return
                    last = chunk
                    chunk = await anyio.to_thread.run_sync(next, self._iterator, None)
                self._finished = True
                stats = await anyio.to_thread.run_sync(self._llm.request_stats)
                final = _final_chunk(last, stats.to_dict(), self._chat)
                await send.send({"data": json.dumps(final)})
                await send.send({"data": "[DONE]"})
            except Exception as exc:  # a failure mid-stream: say so, then end the stream
                err = _as_serve_error(exc, self._server.config, self._llm)
                self._server.errors += 1
                self._failed = True
                await send.send({"data": json.dumps(err.body)})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._release()

    async def _release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            await anyio.to_thread.run_sync(self._end_generation)
        finally:
            self._server.busy.release()

    def _end_generation(self) -> None:
        self._iterator.close()
        if self._failed:
            self._llm.reset()  # the context may be half-way through a chunk: start clean
        elif not self._finished:
            self._server.streams_left += 1
            self._llm.save_partial()


def _first_chunk(llm: ServedLlama, call: Any, kwargs: dict) -> tuple[Iterator[dict], dict | None]:
    iterator = iter(call(llm, **kwargs))
    try:
        return iterator, next(iterator)
    except BaseException:
        iterator.close()
        raise


async def _complete(
    request: Request,
    body: CreateCompletionRequest | CreateChatCompletionRequest,
    call: Any,
    chat: bool,
) -> Any:
    server: _Server = request.app.state.edgemerge
    kwargs = _request_kwargs(body, server.config)
    llm = server.proxy(body.model)  # 404 for a model not served here
    await server.busy.acquire()
    handed_over = False
    try:
        if await request.is_disconnected():
            raise ServeError(400, "the client closed the request before it started", code=None)
        server.requests += 1
        try:
            # llama-cpp-python's own preparation: logit bias, grammar, min_tokens
            lcs_app.prepare_request_resources(body, server.proxy, body.model, kwargs)
            llm.begin_request()
            if kwargs.get("stream"):
                iterator, first = await anyio.to_thread.run_sync(_first_chunk, llm, call, kwargs)
            else:
                result = await anyio.to_thread.run_sync(partial(call, llm, **kwargs))
                stats = await anyio.to_thread.run_sync(llm.request_stats)
        except Exception as exc:
            # a failure may leave the context half-way through a chunk: start clean (the
            # conversations' saved states are untouched)
            await anyio.to_thread.run_sync(llm.reset)
            raise _as_serve_error(exc, server.config, llm) from exc
        if not kwargs.get("stream"):
            return JSONResponse({**result, "edgemerge": stats.to_dict()})
        if first is None:  # nothing to stream (llama-cpp-python always yields a chunk)
            raise ServeError(500, "the completion produced no chunk", code=None)
        handed_over = True
        return _Stream(server, llm, iterator, first, chat, request)
    finally:
        if not handed_over:
            server.busy.release()


def _router() -> APIRouter:
    router = APIRouter()
    auth = [Depends(lcs_app.authenticate)]

    @router.post("/v1/chat/completions", dependencies=auth, tags=["OpenAI V1"])
    async def chat_completions(request: Request, body: CreateChatCompletionRequest) -> Any:
        """llama-cpp-python's chat completion, with an ``edgemerge`` field."""
        if not body.messages:
            raise ServeError(400, "messages: give at least one message", code=None)
        return await _complete(request, body, llama_cpp.Llama.create_chat_completion, True)

    @router.post("/v1/completions", dependencies=auth, tags=["OpenAI V1"])
    async def completions(request: Request, body: CreateCompletionRequest) -> Any:
        """llama-cpp-python's text completion, with an ``edgemerge`` field."""
        if isinstance(body.prompt, list):
            if len(body.prompt) > 1:
                raise ServeError(400, "prompt: give one prompt per request", code=None)
            body.prompt = body.prompt[0] if body.prompt else ""
        return await _complete(request, body, llama_cpp.Llama.__call__, False)

    return router


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            why = (err.get("ctx") or {}).get("error", "")
            return f"the request body is not valid JSON{f' ({why})' if why else ''}"
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "the request body is not valid: " + "; ".join(parts)


def create_app(config: ServeConfig) -> FastAPI:
    """The FastAPI app of llama-cpp-python's server on edgemerge (loads the model)."""
    path = resolve_model(config.model)
    alias = config.alias or config.model
    model_settings = ModelSettings(
        model=str(path),
        model_alias=alias,
        n_ctx=config.n_ctx,
        n_batch=config.n_batch,
        n_gpu_layers=config.n_gpu_layers,
        chat_format=config.chat_format,
        seed=config.seed,
        logits_all=False,
        verbose=False,
    )
    server_settings = ServerSettings(
        host=config.host, port=config.port, api_key=config.api_key, interrupt_requests=False
    )
    proxy = EdgemergeProxy(config, model_settings, (str(path), path.name, path.stem))
    server = _Server(config, proxy)

    # the app llama_cpp.server.app.create_app builds, over our proxy instead of its global
    app = FastAPI(
        middleware=[Middleware(RawContextMiddleware, plugins=(RequestIdPlugin(),))],
        title="edgemerge (llama-cpp-python server)",
        version=llama_cpp.__version__,
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_credentials=True,
        allow_methods=["*"],
        allow_headers=["*"],
    )
    app.state.edgemerge = server
    app.include_router(_router())
    # its other routes, unchanged (include_router copies them onto the app, where the
    # dependency overrides below apply)
    others = APIRouter()
    others.routes.extend(
        r for r in lcs_app.router.routes if getattr(r, "path", None) not in COMPLETION_PATHS
    )
    app.include_router(others)

    async def the_proxy() -> AsyncIterator[EdgemergeProxy]:
        # no lock: its other routes read the model (names, tokenizer), never the context
        yield proxy

    async def the_settings() -> AsyncIterator[ServerSettings]:
        yield server_settings

    app.dependency_overrides[lcs_app.get_llama_proxy] = the_proxy
    app.dependency_overrides[lcs_app.get_server_settings] = the_settings

    @app.exception_handler(ServeError)
    async def _serve_error(_: Request, exc: ServeError) -> JSONResponse:
        server.errors += 1
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        server.errors += 1
        return _error_response(ServeError(400, _validation_message(exc), code=None))

    return app


def run(config: ServeConfig) -> None:
    """Load the model and serve until interrupted."""
    import uvicorn

    app = create_app(config)
    print(
        f"edgemerge serve: {config.alias or config.model} on http://{config.host}:{config.port}/v1"
        f" ({'merging, ' + str(config.merge.budget) + ' cells' if config.merge else 'no merging'})",
        flush=True,
    )
    try:
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    finally:
        app.state.edgemerge.proxy.free()
