"""The OpenAI-compatible app: llama_cpp.server's routes, served in parallel.

Each request is admitted to its model (or refused with 429), then runs on a
worker thread inside that model's Llama(n_parallel=P): P requests decode
together in one batch, the rest wait in the Engine's queue.  Streams are
server-sent events ending with `data: [DONE]`; a client that goes away
cancels its request, streaming or not, which frees the sequence at the
Engine's next step (queued, in its prefill or generating).  The OpenAPI
schema states every bound the server enforces, the model-dependent ones
included, and the error answers each route may give.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, Optional

import anyio
import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask

from .. import __version__, fim
from ..bindings import lib
from ..errors import EngineError
from ..llama import (Cancellation, CompletionStream, LlamaGrammar, LogitsProcessorList, MinTokensLogitsProcessor,
                     cancellation_scope)
from ..llama_chat_format import TEMPLATE_REFUSED, _grammar_for_response_format
from . import errors, responses, stats
from .chat import ParsedChatStream, parse_completion
from .errors import ERROR_RESPONSES, ApiError, bad_request, from_exception
from .parsing import OutputParser, arguments_as_objects
from .registry import ModelRegistry, ServedModel
from .responses import CreateResponseRequest, ResponseStore
from .schemas import (CreateChatCompletionRequest, CreateCompletionRequest, CreateEmbeddingRequest,
                      DetokenizeInputRequest, TokenizeInputRequest, ignored_fields, ignored_names)
from .security import ApiKeyMiddleware, BodyLimitMiddleware
from .settings import ModelSettings, ServerSettings

logger = logging.getLogger("pyllama_ssm.server")

router = APIRouter(responses=ERROR_RESPONSES)
# a generation answers JSON, or server-sent events with stream=true
_STREAMED = {200: {"description": "The completion, or with stream=true its chunks as server-sent events "
                                  "(`data: {chunk}` lines, then `data: [DONE]`)",
                   "content": {"text/event-stream": {"schema": {  # one event (OpenAPI 3.1)
                       "type": "object", "required": ["data"],
                       "properties": {"data": {"type": "string", "description": "A JSON chunk; `[DONE]` last"}}}}}}}
_END = object()  # next()'s default: the stream is over

# request fields that are not Llama keyword arguments
_NOT_KWARGS = {"n", "best_of", "logit_bias_type", "user", "min_tokens", "stream_options", "max_completion_tokens",
               "reasoning_format", "parse_tool_calls"}


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
    app.state.noted = set()  # ignored request fields already noted in the log
    app.state.responses = responses.ResponseStore()  # stored responses, for previous_response_id
    errors.install(app)
    app.include_router(router)
    from . import anthropic, infill, props, ui  # the other APIs' routes, built on this module's helpers
    for extra in (anthropic.router, infill.router, props.router, ui.router):
        app.include_router(extra)
    app.openapi = lambda: _openapi(app)
    # the last added runs first: CORS (answers preflights), then the key, then the size limit
    app.add_middleware(BodyLimitMiddleware, limit=server_settings.max_request_bytes)
    if server_settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=server_settings.api_key)
    if server_settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=server_settings.cors_origins,
                           allow_credentials="*" not in server_settings.cors_origins,
                           allow_methods=["*"], allow_headers=["*"])
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with what depends on the loaded models and the settings: the bounds marked
    x-limit (token ids below the smallest vocabulary, max_tokens_limit) and the rules below."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    registry: ModelRegistry = app.state.registry
    schema = FastAPI.openapi(app)
    if not registry.models:  # not loaded yet: do not keep a schema without the model bounds
        app.openapi_schema = None
        return schema
    models = list(registry.models.values())
    n_vocab = min(served.llama.n_vocab() for served in models)
    _fill_bounds(schema, {"token": n_vocab - 1, "logprobs": n_vocab,
                          "max_tokens": app.state.settings.max_tokens_limit})
    _add_model_rules(schema, models, n_vocab)
    return schema


def _fill_bounds(node: Any, bounds: dict[str, int | None], limit: str | None = None) -> None:
    if isinstance(node, dict):
        limit = node.get("x-limit", limit)
        if limit is not None and bounds.get(limit) is not None and node.get("type") == "integer":
            node["maximum"] = min(node.get("maximum", bounds[limit]), bounds[limit])
        for value in node.values():
            _fill_bounds(value, bounds, limit)
    elif isinstance(node, list):
        for value in node:
            _fill_bounds(value, bounds, limit)


def _add_model_rules(schema: dict[str, Any], models: list[ServedModel], n_vocab: int) -> None:
    """The refusals that depend on the served models, as schema rules."""
    bodies = schema["components"]["schemas"]
    completion, chat = bodies["CreateCompletionRequest"], bodies["CreateChatCompletionRequest"]
    for body in (completion, chat):  # logit_bias keys: token ids, or any text with logit_bias_type=tokens
        body.setdefault("allOf", []).append({
            "if": {"required": ["logit_bias_type"], "properties": {"logit_bias_type": {"const": "tokens"}}},
            "else": {"properties": {"logit_bias": {"propertyNames": {"pattern": _numbers_below(n_vocab)}}}}})
    if any(served.engine is None and not served.settings.logits_all for served in models):
        # n_parallel=1 without logits_all keeps no logits to report
        completion["properties"]["logprobs"] = {"type": "null", "description": "Not with logits_all=false."}
        chat["properties"]["logprobs"] = {"enum": [False, None], "description": "Not with logits_all=false."}
    if not all(served_fim(served) for served in models):  # a vocabulary without FIM tokens: no fill-in-the-middle
        completion["properties"]["suffix"] = {"type": "null", "description": "The model has no FIM tokens."}
        schema["paths"].pop("/infill", None)
    embedders = [served for served in models if served.settings.embedding]
    if not embedders:  # every embedding request would be refused: the route is not offered
        schema["paths"].pop("/v1/embeddings", None)
    elif any(served.llama.pooling_type() == lib.LLAMA_POOLING_TYPE_NONE for served in embedders):
        # a vector per token has no single base64 encoding
        bodies["CreateEmbeddingRequest"]["properties"]["encoding_format"]["anyOf"][0]["enum"] = ["float"]


def served_fim(served: ServedModel) -> bool:
    """Whether the model's vocabulary has the tokens fill-in-the-middle needs."""
    return not fim.FimTokens.of(served.llama._model.vocab).missing


def _numbers_below(n: int) -> str:
    """A regular expression for the decimal numbers 0..n-1 (no leading zeros, no sign)."""
    top = str(n - 1)
    parts = ["0"] + ([f"[1-9][0-9]{{0,{len(top) - 2}}}"] if len(top) > 1 else [])  # fewer digits than top
    for i, digit in enumerate(top):  # as many digits: top's first i, a smaller one, then any
        low = 1 if i == 0 else 0
        if int(digit) - 1 >= low:
            parts.append(f"{top[:i]}[{low}-{int(digit) - 1}][0-9]{{{len(top) - i - 1}}}")
    return f"^({'|'.join([*parts, top])})$"


def registry_of(request: Request) -> ModelRegistry:
    return request.app.state.registry


def settings_of(request: Request) -> ServerSettings:
    return request.app.state.settings


# -- checks that need the model ----------------------------------------------------------------------

def _check_tokens(param: str, tokens: list[int], n_vocab: int) -> None:
    bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise bad_request(param, f"token id {bad} is out of the vocabulary (0..{n_vocab - 1})")


def capped_max_tokens(request: Request, value: int | None, param: str = "max_tokens") -> int | None:
    """The request's max_tokens within --max_tokens_limit (None or 0: up to the limit, else the context)."""
    limit = settings_of(request).max_tokens_limit
    if limit is None:
        return value
    if value is not None and value > limit:
        raise bad_request(param, f"{value} exceeds the server's limit of {limit} (max_tokens_limit)")
    return value or limit


def note_ignored(request: Request, body: Any) -> None:
    """Log, once per field, the OpenAI fields a client sent that this server accepts and ignores."""
    noted: set[str] = request.app.state.noted
    for name in ignored_fields(body):
        if name not in noted:
            noted.add(name)
            logger.info("request field %r is accepted for OpenAI compatibility and ignored (noted once)", name)


def _generation_kwargs(request: Request, served: ServedModel,
                       body: CreateCompletionRequest | CreateChatCompletionRequest) -> dict[str, Any]:
    """The body as Llama keyword arguments, with what only the model can check (ids, grammar)."""
    llama = served.llama
    note_ignored(request, body)
    kwargs = body.model_dump(exclude=_NOT_KWARGS | ignored_names(type(body)), by_alias=True)
    for name in ("presence_penalty", "frequency_penalty"):  # null: the default, as llama_cpp.server takes it
        if kwargs[name] is None:
            del kwargs[name]
    newer = getattr(body, "max_completion_tokens", None)  # OpenAI's current name wins
    if body.seed is not None:
        kwargs["seed"] = body.seed % 2**32  # as llama.cpp's uint32_t takes it
    kwargs["max_tokens"] = capped_max_tokens(request, body.max_tokens) if newer is None else \
        capped_max_tokens(request, newer, "max_completion_tokens")
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
        if not re.fullmatch(r"0|[1-9][0-9]*", key):
            raise bad_request("logit_bias", f"key {key!r} is not a token id (use logit_bias_type='tokens' "
                                            f"for text keys)")
        tok = int(key)
        _check_tokens("logit_bias", [tok], llama.n_vocab())
        out[tok] = value
    return out


# -- running a model call ----------------------------------------------------------------------------

def _chunk_event(chunk: Any) -> dict[str, str]:
    return {"data": json.dumps(chunk)}


def named_event(event: dict[str, Any]) -> dict[str, str]:
    return {"event": event["type"], "data": json.dumps(event)}


def _error_event(error: ApiError) -> dict[str, str]:
    return {"data": json.dumps(error.body())}


async def generate(request: Request, served: ServedModel, body: Any, call: Callable[..., Any],
                    kwargs: dict[str, Any], on_result: Callable[[Any, Cancellation], Any] | None = None,
                    event: Callable[[Any], dict[str, str]] = _chunk_event, done: bool = True,
                    error_event: Callable[[ApiError], dict[str, str]] = _error_event) -> Any:
    """Run one admitted completion: a JSON answer (on_result(result, its Cancellation) when given), or an
    SSE stream when body.stream (each item as event(item), then `data: [DONE]` when done; a failure after
    the first event is the last event, error_event(error))."""
    fields = set(type(body).model_fields)
    admission = contextlib.ExitStack()
    admission.enter_context(served.admit())
    try:
        if served.generation_lock is not None:  # one sequence: requests take turns, in order
            await served.generation_lock.acquire()
            admission.callback(served.generation_lock.release)
        if not body.stream:
            with admission:
                cancellation = Cancellation()
                result = await _until_done_or_gone(request, served, lambda: call(**kwargs), fields, cancellation)
                if on_result is not None:
                    return on_result(result, cancellation)
                if isinstance(result, dict) and "usage" in result:
                    result["usage"] = openai_usage(result["usage"], cancellation.usage)
                return result
        options = getattr(body, "stream_options", None)
        stream = _Stream(request, served, admission, fields, bool(getattr(options, "include_usage", False)), event,
                         done, error_event)
        await stream.start(lambda: call(**kwargs))
    except BaseException:
        admission.close()
        raise
    settings = settings_of(request)
    return EventSourceResponse(stream.events(), sep="\n", ping=0 if settings.disable_ping_events else None,
                               shutdown_grace_period=settings.shutdown_timeout + 2,
                               background=BackgroundTask(stream.close))


async def _on_disconnect(request: Request, hook: Callable[[], None]) -> None:
    """Call hook when the client hangs up (the body was read: what receive() gives next is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    hook()


def openai_usage(usage: dict[str, int], counted: dict[str, int] | None) -> dict[str, Any]:
    """llama-cpp-python's usage with OpenAI's prompt_tokens_details.cached_tokens (prompt tokens whose
    state came from a cache, not computed)."""
    cached = (counted or {}).get("cached_tokens", 0)
    return {**usage, "prompt_tokens_details": {"cached_tokens": min(cached, usage["prompt_tokens"])}}


async def _until_done_or_gone(request: Request, served: ServedModel, work: Callable[[], Any],
                              fields: set[str], cancellation: Cancellation | None = None) -> Any:
    """work()'s result on a worker thread; a client that hangs up meanwhile cancels it (and gets 499)."""
    cancellation = cancellation or Cancellation()

    def run() -> Any:
        with cancellation_scope(cancellation):
            return work()

    result: Any = None
    failure: BaseException | None = None
    async with anyio.create_task_group() as watch:
        watch.start_soon(_on_disconnect, request, cancellation.set)
        try:
            result = await anyio.to_thread.run_sync(run, limiter=served.limiter)
        except Exception as e:  # raised below: out of a task group it would come as an ExceptionGroup
            failure = e
        watch.cancel_scope.cancel()
    if cancellation.is_set:
        raise ApiError(499, "the client closed the connection", code="client_closed")
    if failure is not None:
        raise _failure(request, failure, fields) from None
    return result


class _Stream:
    """A streaming call: its CompletionStream (iterated on worker threads) and its admission to the model.

    Cancelled (client gone, shutdown), it cancels and closes the stream, which
    frees the sequence.  close() runs when the events end and again after the
    response, in case the events never started.
    """

    def __init__(self, request: Request, served: ServedModel, admission: contextlib.ExitStack, fields: set[str],
                 include_usage: bool = False, event: Callable[[Any], dict[str, str]] = _chunk_event,
                 done: bool = True, error_event: Callable[[ApiError], dict[str, str]] = _error_event):
        self.event = event
        self.done = done
        self.error_event = error_event
        self.request = request
        self.served = served
        self.admission = admission
        self.fields = fields
        self.include_usage = include_usage
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
            watch.start_soon(_on_disconnect, self.request, self.chunks.cancel)
            try:
                first = await self._next()
            except Exception as e:  # raised below: out of a task group it would come as an ExceptionGroup
                failure = e
            watch.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return first

    async def events(self) -> AsyncIterator[dict[str, str]]:
        try:
            chunk, last = self.first, None
            while chunk is not _END:
                yield self.event(chunk)
                last = chunk
                try:
                    chunk = await self._next()
                except Exception as e:  # headers are sent: the failure is the last event
                    yield self.error_event(_failure(self.request, e, self.fields))
                    return
            counted = self.chunks.usage if self.chunks is not None else None
            if self.include_usage and last is not None and counted is not None:
                # OpenAI's stream_options.include_usage: one more chunk, no choices, the usage
                usage = {k: counted[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
                yield {"data": json.dumps({**{k: last[k] for k in ("id", "object", "created", "model")},
                                           "choices": [], "usage": openai_usage(usage, counted)})}
            if self.done:
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
    if registry_of(request).closing:
        return errors.unavailable("the server is shutting down")
    if isinstance(error, EngineError):
        return errors.unavailable(f"the model cannot serve: {error}")
    if TEMPLATE_REFUSED in getattr(error, "__notes__", ()):  # the client's messages, not a server bug
        return bad_request("messages", f"{TEMPLATE_REFUSED} ({type(error).__name__}: {error})")
    return from_exception(error, fields)


# -- routes ------------------------------------------------------------------------------------------

@router.post("/v1/completions", summary="Completion", tags=["OpenAI V1"], responses=_STREAMED)
async def create_completion(request: Request, body: CreateCompletionRequest) -> Any:
    served = registry_of(request).get(body.model)
    if not isinstance(body.prompt, str):
        _check_tokens("prompt", body.prompt, served.llama.n_vocab())
    kwargs = _generation_kwargs(request, served, body)
    if kwargs.pop("suffix", None) is not None:  # fill-in-the-middle: the prompt is the prefix
        try:
            kwargs["prompt"] = fim.infill_tokens(served.llama._model, body.prompt, body.suffix,
                                                 spm=served.settings.spm_infill)
        except ValueError as e:
            raise bad_request("suffix", str(e).removeprefix("suffix: ")) from None
    return await generate(request, served, body, served.llama.create_completion, kwargs)


def chat_call(request: Request, served: ServedModel,
              body: CreateChatCompletionRequest) -> tuple[dict[str, Any], Optional[OutputParser]]:
    """A chat request as create_chat_completion's keyword arguments, and the parser of its answer (None: the
    answer is not split); the Anthropic Messages route translates its requests to this too."""
    kwargs = _generation_kwargs(request, served, body)
    kwargs["messages"] = [m.model_dump(exclude_unset=True) for m in body.messages]
    if body.response_format is not None:
        kwargs["response_format"] = body.response_format.model_dump(by_alias=True, exclude_none=True)
    parser = None
    if served.chat is not None:
        kwargs["messages"] = arguments_as_objects(kwargs["messages"])  # templates iterate a call's arguments
        reasoning = (body.reasoning_format or served.settings.reasoning_format) == "auto"
        parse_tools = body.parse_tool_calls if body.parse_tool_calls is not None else served.settings.parse_tool_calls
        if isinstance(body.tool_choice, dict) or body.tool_choice == "none":
            parse_tools = False  # a named tool is grammar-forced and returned as a call already
        parser = served.chat.parser(kwargs["messages"], body.tools, reasoning=reasoning, parse_tools=parse_tools)
    return kwargs, parser


@router.post("/v1/chat/completions", summary="Chat", tags=["OpenAI V1"], responses=_STREAMED)
async def create_chat_completion(request: Request, body: CreateChatCompletionRequest) -> Any:
    served = registry_of(request).get(body.model)
    kwargs, parser = chat_call(request, served, body)
    if parser is None:
        return await generate(request, served, body, served.llama.create_chat_completion, kwargs)
    if body.stream:
        return await generate(request, served, body, lambda **kw: ParsedChatStream(
            served.llama.create_chat_completion(**kw), parser), kwargs)
    return parse_completion(await generate(request, served, body, served.llama.create_chat_completion, kwargs),
                            parser)


@router.post("/v1/responses", summary="Response", tags=["OpenAI V1"], responses={
    200: {"description": "The response, or with stream=true its events as server-sent events (`event: TYPE` and "
                         "`data: {event}` lines, response.created first, response.completed last)",
          "content": {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {
              "event": {"type": "string"}, "data": {"type": "string"}}}}}}})
async def create_response(request: Request, body: CreateResponseRequest) -> Any:
    served = registry_of(request).get(body.model)
    note_ignored(request, body)
    llama = served.llama
    if served.chat is None:
        raise bad_request("model", f"{served.alias!r} has no Jinja chat template (a named --chat_format): the "
                                   f"Responses API renders the model's own template")
    store: ResponseStore = request.app.state.responses
    history: list[dict[str, Any]] = []
    previous = None
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id)
        if previous is None:
            raise ApiError(404, f"previous_response_id: {body.previous_response_id!r} is not stored here",
                           param="previous_response_id", code="not_found")
        history = previous.messages
        if previous.alias != served.alias:  # another model's tokens: only its messages carry over
            previous = None
    messages = responses.conversation(body, history)
    tools = responses.chat_tools(body)
    try:
        prompt = served.chat.render(messages, tools)
    except Exception as e:  # noqa: BLE001 - the template refuses this conversation
        raise bad_request("input", f"{TEMPLATE_REFUSED} ({type(e).__name__}: {e})") from None

    def tokenize(text: str) -> list[int]:
        return llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    tokens = responses.prompt_tokens(tokenize, prompt, previous)
    if len(tokens) >= llama.n_ctx():
        raise ApiError(400, f"input: {len(tokens)} prompt tokens do not fit the context of {llama.n_ctx()}",
                       param="input", code="context_length_exceeded")
    kwargs: dict[str, Any] = {"prompt": tokens, "stream": body.stream, "model": body.model or served.alias,
                              "max_tokens": capped_max_tokens(request, body.max_output_tokens, "max_output_tokens"),
                              "stop": [served.chat.formatter.eos_token] if served.chat.formatter.eos_token else []}
    for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty"):
        if getattr(body, name) is not None:
            kwargs[name] = getattr(body, name)
    if body.seed is not None:
        kwargs["seed"] = body.seed % 2**32
    fmt = responses.response_format(body)
    if body.grammar is not None:
        try:
            kwargs["grammar"] = LlamaGrammar.from_string(body.grammar, verbose=False)
        except (ValueError, TypeError) as e:
            raise bad_request("grammar", str(e).removeprefix("grammar: ")) from None
    elif fmt is not None:
        try:
            kwargs["grammar"] = _grammar_for_response_format(fmt, False)
        except ValueError as e:
            raise bad_request("text", str(e)) from None
    rid = responses.new_id("resp")
    turn = responses.Turn(rid, body, served.alias, messages, prompt, tokens,
                          responses.parser_for(served.chat, messages, tools, prompt, body, served.settings),
                          responses.EventWriter(rid, body, kwargs["model"]), store,
                          lambda text: tokenize(text))
    if body.stream:
        return await generate(request, served, body, lambda **kw: responses.ResponseEvents(
            llama.create_completion(**kw), turn), kwargs, event=named_event, done=False)
    return await generate(request, served, body, llama.create_completion, kwargs,
                           on_result=lambda result, c: turn.whole(result, c.usage, c.tokens))


# one route for both methods, so that a 405 on the path lists both in Allow
@router.api_route("/v1/responses/{response_id}", methods=["GET", "DELETE"], summary="A stored response (GET), "
                  "or delete it (DELETE)", tags=["OpenAI V1"])
async def stored_response(request: Request, response_id: str) -> Any:
    store: ResponseStore = request.app.state.responses
    found = store.get(response_id) if request.method == "GET" else store.delete(response_id)
    if not found:
        raise ApiError(404, f"response_id: {response_id!r} is not stored here", param="response_id",
                       code="not_found")
    if request.method == "GET":
        return found.response
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.post("/v1/embeddings", summary="Embedding", tags=["OpenAI V1"])
async def create_embedding(request: Request, body: CreateEmbeddingRequest) -> Any:
    served = registry_of(request).get(body.model)
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
                     for alias in registry_of(request).aliases]}


@router.post("/extras/tokenize", summary="Tokenize", tags=["Extras"])
async def tokenize(request: Request, body: TokenizeInputRequest) -> dict[str, list[int]]:
    llama = registry_of(request).get(body.model).llama
    return {"tokens": await anyio.to_thread.run_sync(lambda: llama.tokenize(body.input.encode("utf-8"),
                                                                             special=True))}


@router.post("/extras/tokenize/count", summary="Tokenize Count", tags=["Extras"])
async def count_query_tokens(request: Request, body: TokenizeInputRequest) -> dict[str, int]:
    llama = registry_of(request).get(body.model).llama
    tokens = await anyio.to_thread.run_sync(lambda: llama.tokenize(body.input.encode("utf-8"), special=True))
    return {"count": len(tokens)}


@router.post("/extras/detokenize", summary="Detokenize", tags=["Extras"])
async def detokenize(request: Request, body: DetokenizeInputRequest) -> dict[str, str]:
    llama = registry_of(request).get(body.model).llama
    _check_tokens("tokens", body.tokens, llama.n_vocab())
    text = await anyio.to_thread.run_sync(lambda: llama.detokenize(body.tokens))
    return {"text": text.decode("utf-8", errors="replace")}


@router.get("/health", summary="Health", tags=["Extras"])
async def health(request: Request) -> JSONResponse:
    registry = registry_of(request)
    if registry.closing:
        return errors.unavailable("the server is shutting down").response()
    for served in registry.models.values():
        if served.engine is not None and served.engine.failure is not None:
            return errors.unavailable(f"model {served.alias!r}: the engine stopped "
                                      f"({type(served.engine.failure).__name__}: {served.engine.failure})").response()
    return JSONResponse({"status": "ok"})


@router.get("/extras/stats", summary="Engine statistics and memory", tags=["Extras"])
async def get_stats(request: Request) -> dict[str, Any]:
    return await anyio.to_thread.run_sync(stats.collect, registry_of(request))


@router.get("/metrics", summary="Prometheus metrics", tags=["Extras"], responses={
    200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def get_metrics(request: Request) -> PlainTextResponse:
    snapshot = await anyio.to_thread.run_sync(stats.collect, registry_of(request))
    return PlainTextResponse(stats.prometheus(snapshot), media_type="text/plain; version=0.0.4")
