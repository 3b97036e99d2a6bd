"""The OpenAI-compatible app: llama_cpp.server's routes, served in parallel.

Each request is admitted to its model (or refused with 429), then runs on a
worker thread inside that model's Llama(n_parallel=P): P requests decode
together in one batch, the rest wait in the Engine's queue.  Streams are
server-sent events ending with `data: [DONE]`; a client that goes away
cancels its stream, which frees the sequence: before the first token
(queued, or in its prefill) at the Engine's next step, later at its next token.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask

from .. import __version__
from ..llama import CompletionStream, LlamaGrammar, LogitsProcessorList, MinTokensLogitsProcessor
from . import errors, stats
from .errors import ApiError, bad_request, from_exception
from .registry import ModelRegistry, ServedModel
from .schemas import (CreateChatCompletionRequest, CreateCompletionRequest, CreateEmbeddingRequest,
                      DetokenizeInputRequest, TokenizeInputRequest)
from .security import ApiKeyMiddleware, BodyLimitMiddleware
from .settings import ModelSettings, ServerSettings

logger = logging.getLogger("pyllama_ssm.server")

router = APIRouter()
_END = object()  # next()'s default: the stream is over

# request fields that are not Llama keyword arguments
_NOT_KWARGS = {"n", "best_of", "logit_bias_type", "user", "min_tokens"}


def create_app(server_settings: ServerSettings, model_settings: list[ModelSettings]) -> FastAPI:
    """The app; its lifespan loads every model before serving and closes them on shutdown."""
    registry = ModelRegistry(model_settings, server_settings.max_queued_requests)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(registry.load)
        try:
            yield
        finally:
            # in-flight requests had shutdown_timeout to finish; closing cancels what is left
            await anyio.to_thread.run_sync(registry.close)

    app = FastAPI(title="pyllama-ssm: OpenAI-compatible API", version=__version__,
                  root_path=server_settings.root_path, lifespan=lifespan)
    app.state.registry = registry
    app.state.settings = server_settings
    errors.install(app)
    app.include_router(router)
    # the last added runs first: CORS (answers preflights), then the key, then the size limit
    app.add_middleware(BodyLimitMiddleware, limit=server_settings.max_request_bytes)
    if server_settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=server_settings.api_key)
    if server_settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=server_settings.cors_origins,
                           allow_credentials="*" not in server_settings.cors_origins,
                           allow_methods=["*"], allow_headers=["*"])
    return app


def _registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def _settings(request: Request) -> ServerSettings:
    return request.app.state.settings


# -- checks that need the model ----------------------------------------------------------------------

def _check_tokens(param: str, tokens: list[int], n_vocab: int) -> None:
    bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise bad_request(param, f"token id {bad} is out of the vocabulary (0..{n_vocab - 1})")


def _max_tokens(request: Request, value: int | None) -> int | None:
    """The request's max_tokens within --max_tokens_limit (None or 0: up to the limit, else the context)."""
    limit = _settings(request).max_tokens_limit
    if limit is None:
        return value
    if value is not None and value > limit:
        raise bad_request("max_tokens", f"{value} exceeds the server's limit of {limit} (max_tokens_limit)")
    return value or limit


def _generation_kwargs(request: Request, served: ServedModel,
                       body: CreateCompletionRequest | CreateChatCompletionRequest) -> dict[str, Any]:
    """The body as Llama keyword arguments, with what only the model can check (ids, grammar)."""
    llama = served.llama
    kwargs = body.model_dump(exclude=_NOT_KWARGS, by_alias=True)
    kwargs["max_tokens"] = _max_tokens(request, body.max_tokens)
    if body.logit_bias:
        kwargs["logit_bias"] = _logit_bias(llama, body.logit_bias, body.logit_bias_type)
    if body.grammar is not None:
        try:
            kwargs["grammar"] = LlamaGrammar.from_string(body.grammar, verbose=False)
        except (ValueError, TypeError) as e:
            raise bad_request("grammar", str(e).removeprefix("grammar: ")) from None
    if body.min_tokens > 0:
        kwargs["logits_processor"] = LogitsProcessorList([MinTokensLogitsProcessor(body.min_tokens,
                                                                                   llama.token_eos())])
    return kwargs


def _logit_bias(llama, bias: dict[str, float], kind: str | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in bias.items():
        if kind == "tokens":  # keys are text: bias each of its tokens
            for tok in llama.tokenize(key.encode("utf-8"), add_bos=False, special=True):
                out[tok] = value
            continue
        try:
            tok = int(key)
        except ValueError:
            raise bad_request("logit_bias", f"key {key!r} is not a token id (use logit_bias_type='tokens' "
                                            f"for text keys)") from None
        _check_tokens("logit_bias", [tok], llama.n_vocab())
        out[tok] = value
    return out


# -- running a model call ----------------------------------------------------------------------------

async def _generate(request: Request, served: ServedModel, body: Any, call: Callable[..., Any],
                    kwargs: dict[str, Any]) -> Any:
    """Run one admitted completion: a JSON answer, or an SSE stream when body.stream."""
    fields = set(type(body).model_fields)
    admission = contextlib.ExitStack()
    admission.enter_context(served.admit())
    try:
        if served.generation_lock is not None:  # one sequence: requests take turns, in order
            await served.generation_lock.acquire()
            admission.callback(served.generation_lock.release)
        if not body.stream:
            with admission:
                try:
                    return await anyio.to_thread.run_sync(lambda: call(**kwargs), limiter=served.limiter)
                except Exception as e:
                    raise _failure(request, e, fields) from None
        stream = _Stream(request, served, admission, fields)
        await stream.start(lambda: call(**kwargs))
    except BaseException:
        admission.close()
        raise
    settings = _settings(request)
    return EventSourceResponse(stream.events(), sep="\n", ping=0 if settings.disable_ping_events else None,
                               shutdown_grace_period=settings.shutdown_timeout + 2,
                               background=BackgroundTask(stream.close))


class _Stream:
    """A streaming call: its CompletionStream (iterated on worker threads) and its admission to the model.

    Cancelled (client gone, shutdown), it cancels and closes the stream, which
    frees the sequence.  close() runs when the events end and again after the
    response, in case the events never started.
    """

    def __init__(self, request: Request, served: ServedModel, admission: contextlib.ExitStack, fields: set[str]):
        self.request = request
        self.served = served
        self.admission = admission
        self.fields = fields
        self.chunks: CompletionStream | None = None
        self.first: Any = _END

    async def _next(self) -> Any:
        return await anyio.to_thread.run_sync(next, self.chunks, _END, limiter=self.served.limiter)

    async def start(self, call: Callable[[], CompletionStream]) -> None:
        """Take the first chunk before answering 200, so that bad input still gets its 400.

        Until then the request may wait in the Engine's queue or run a long prefill:
        a client that hangs up meanwhile cancels it at once.
        """
        try:
            self.chunks = await anyio.to_thread.run_sync(call, limiter=self.served.limiter)
            self.first = await self._first_chunk()
        except Exception as e:
            await self.close()
            raise _failure(self.request, e, self.fields) from None
        if self.chunks.cancelled:
            await self.close()
            raise ApiError(499, "the client closed the connection before the first token", code="client_closed")

    async def _first_chunk(self) -> Any:
        failure: Exception | None = None
        async with anyio.create_task_group() as watch:
            watch.start_soon(self._cancel_on_disconnect)
            try:
                first = await self._next()
            except Exception as e:  # raised below: out of a task group it would come as an ExceptionGroup
                failure = e
            watch.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return first

    async def _cancel_on_disconnect(self) -> None:
        # the body was read: what receive() gives next is the client's hang-up
        while (await self.request.receive())["type"] != "http.disconnect":
            pass
        self.chunks.cancel()

    async def events(self) -> AsyncIterator[dict[str, str]]:
        try:
            chunk = self.first
            while chunk is not _END:
                yield {"data": json.dumps(chunk)}
                try:
                    chunk = await self._next()
                except Exception as e:  # headers are sent: the failure is the last event
                    yield {"data": json.dumps(_failure(self.request, e, self.fields).body())}
                    return
            yield {"data": "[DONE]"}
        finally:
            await self.close()

    async def close(self) -> None:
        # a cancelled to_thread call waits for its thread: no thread runs the generator now
        with anyio.CancelScope(shield=True):
            if self.chunks is not None:
                chunks, self.chunks = self.chunks, None
                chunks.cancel()  # returns at once; a worker still in next() comes back at the next step
                await anyio.to_thread.run_sync(chunks.close)
            self.admission.close()


def _failure(request: Request, error: BaseException, fields: set[str]) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if _registry(request).closing:
        return errors.unavailable("the server is shutting down")
    return from_exception(error, fields)


# -- routes ------------------------------------------------------------------------------------------

@router.post("/v1/completions", summary="Completion", tags=["OpenAI V1"])
async def create_completion(request: Request, body: CreateCompletionRequest) -> Any:
    served = _registry(request).get(body.model)
    if not isinstance(body.prompt, str):
        _check_tokens("prompt", body.prompt, served.llama.n_vocab())
    kwargs = _generation_kwargs(request, served, body)
    return await _generate(request, served, body, served.llama.create_completion, kwargs)


@router.post("/v1/chat/completions", summary="Chat", tags=["OpenAI V1"])
async def create_chat_completion(request: Request, body: CreateChatCompletionRequest) -> Any:
    served = _registry(request).get(body.model)
    kwargs = _generation_kwargs(request, served, body)
    kwargs["messages"] = [m.model_dump(exclude_unset=True) for m in body.messages]
    if body.response_format is not None:
        kwargs["response_format"] = body.response_format.model_dump(by_alias=True, exclude_none=True)
    return await _generate(request, served, body, served.llama.create_chat_completion, kwargs)


@router.post("/v1/embeddings", summary="Embedding", tags=["OpenAI V1"])
async def create_embedding(request: Request, body: CreateEmbeddingRequest) -> Any:
    served = _registry(request).get(body.model)
    if not served.settings.embedding:
        raise bad_request("model", f"{served.alias!r} serves no embeddings (start it with --embedding true)")
    with served.admit():
        async with served.embedding_lock:
            try:
                result = await anyio.to_thread.run_sync(
                    lambda: served.llama.create_embedding(input=body.input, model=body.model), limiter=served.limiter)
            except Exception as e:
                raise _failure(request, e, set(type(body).model_fields)) from None
    if body.encoding_format == "base64":  # OpenAI's encoding: the little-endian float32 bytes of each vector
        for item in result["data"]:
            vector = np.asarray(item["embedding"], dtype="<f4")
            if vector.ndim != 1:
                raise bad_request("encoding_format", "base64 encodes one vector per input; this model pools "
                                                     "nothing (one vector per token): ask for 'float'")
            item["embedding"] = base64.b64encode(vector.tobytes()).decode("ascii")
    return result


@router.get("/v1/models", summary="Models", tags=["OpenAI V1"])
async def get_models(request: Request) -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": alias, "object": "model", "owned_by": "me", "permissions": []}
                     for alias in _registry(request).aliases]}


@router.post("/extras/tokenize", summary="Tokenize", tags=["Extras"])
async def tokenize(request: Request, body: TokenizeInputRequest) -> dict[str, list[int]]:
    llama = _registry(request).get(body.model).llama
    return {"tokens": await anyio.to_thread.run_sync(lambda: llama.tokenize(body.input.encode("utf-8"),
                                                                             special=True))}


@router.post("/extras/tokenize/count", summary="Tokenize Count", tags=["Extras"])
async def count_query_tokens(request: Request, body: TokenizeInputRequest) -> dict[str, int]:
    llama = _registry(request).get(body.model).llama
    tokens = await anyio.to_thread.run_sync(lambda: llama.tokenize(body.input.encode("utf-8"), special=True))
    return {"count": len(tokens)}


@router.post("/extras/detokenize", summary="Detokenize", tags=["Extras"])
async def detokenize(request: Request, body: DetokenizeInputRequest) -> dict[str, str]:
    llama = _registry(request).get(body.model).llama
    _check_tokens("tokens", body.tokens, llama.n_vocab())
    text = await anyio.to_thread.run_sync(lambda: llama.detokenize(body.tokens))
    return {"text": text.decode("utf-8", errors="replace")}


@router.get("/health", summary="Health", tags=["Extras"])
async def health(request: Request) -> JSONResponse:
    if _registry(request).closing:
        return errors.unavailable("the server is shutting down").response()
    return JSONResponse({"status": "ok"})


@router.get("/extras/stats", summary="Engine statistics and memory", tags=["Extras"])
async def get_stats(request: Request) -> dict[str, Any]:
    return await anyio.to_thread.run_sync(stats.collect, _registry(request))


@router.get("/metrics", summary="Prometheus metrics", tags=["Extras"])
async def get_metrics(request: Request) -> PlainTextResponse:
    snapshot = await anyio.to_thread.run_sync(stats.collect, _registry(request))
    return PlainTextResponse(stats.prometheus(snapshot), media_type="text/plain; version=0.0.4")
