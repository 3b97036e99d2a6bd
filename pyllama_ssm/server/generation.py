"""Running one model call, for every API's routes.

A route checks its request against the model (token ids, logit_bias, grammar,
max_tokens within --max_tokens_limit) and hands the call to generate(): the
request is admitted to its model (or refused with 429), then runs on a worker
thread inside that model's Llama(n_parallel=P), answered as JSON or as
server-sent events.  A client that goes away cancels its request, streaming or
not, which frees the sequence at the Engine's next step; a failure becomes the
API error it means (api_error).  The OpenAI routes (openai.py), the Anthropic
Messages route, /infill and /props all run on these helpers.

The Llama answers with typed results (Llama.complete, Llama.chat_complete:
pyllama_ssm.results) and the routes build each API's JSON from them, here at the
edge: the cached prompt tokens and the generated token ids come with the result,
and the call's Cancellation is handed to it, with no thread-local between them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi import Request
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask

from ..cancellation import Cancellation, CompletionStream
from ..errors import EngineError
from ..llama_callbacks import LogitsProcessorList, MinTokensLogitsProcessor
from ..llama_chat_format import TEMPLATE_REFUSED
from ..llama_grammar import LlamaGrammar
from ..results import ChatResult, CompletionResult
from . import errors
from .errors import ApiError, bad_request, from_exception
from .registry import ModelRegistry, ServedModel
from .schemas import CreateChatCompletionRequest, CreateCompletionRequest, ignored_fields, ignored_names
from .settings import ServerSettings

logger = logging.getLogger("pyllama_ssm.server")

_END = object()  # next()'s default: the stream is over

# request fields that are not Llama keyword arguments
_NOT_KWARGS = {"n", "best_of", "logit_bias_type", "user", "min_tokens", "stream_options", "max_completion_tokens",
               "reasoning_format", "parse_tool_calls"}


def registry_of(request: Request) -> ModelRegistry:
    return request.app.state.registry


def settings_of(request: Request) -> ServerSettings:
    return request.app.state.settings


# -- checks that need the model ----------------------------------------------------------------------

def check_tokens(param: str, tokens: list[int], n_vocab: int) -> None:
    """Refuse (400, naming param) a token id outside the vocabulary."""
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
    """Log, once per field, the fields a client sent that this server ignores: OpenAI's it accepts for
    compatibility, and those it does not know (as llama_cpp.server, it ignores them)."""
    noted: set[str] = request.app.state.noted
    for name, why in [(n, "is accepted for OpenAI compatibility") for n in ignored_fields(body)] + \
            [(n, "is not one this server knows") for n in getattr(body, "unknown_fields", ())]:
        if name not in noted:
            noted.add(name)
            logger.info("request field %r %s and ignored (noted once)", name, why)


def generation_kwargs(request: Request, served: ServedModel,
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
        check_tokens("logit_bias", [tok], llama.n_vocab())
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
                    kwargs: dict[str, Any], on_result: Callable[[Any], Any] | None = None,
                    event: Callable[[Any], dict[str, str]] = _chunk_event, done: bool = True,
                    error_event: Callable[[ApiError], dict[str, str]] = _error_event) -> Any:
    """Run one admitted completion: call(cancellation=..., **kwargs)'s typed result made JSON by on_result, or
    an SSE stream when body.stream (call(**kwargs)'s items as event(item), then `data: [DONE]` when done; a
    failure after the first event is the last event, error_event(error))."""
    fields = set(type(body).model_fields)
    admission = contextlib.ExitStack()
    admission.enter_context(served.admit())
    try:
        if served.generation_lock is not None:  # one sequence: requests take turns, in order
            await served.generation_lock.acquire()
            admission.callback(served.generation_lock.release)
        if not body.stream:
            with admission:
                result = await _until_done_or_gone(
                    request, served, lambda cancellation: call(cancellation=cancellation, **kwargs), fields)
                return on_result(result) if on_result is not None else result
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


def openai_usage(usage: dict[str, int], cached: int) -> dict[str, Any]:
    """llama-cpp-python's usage with OpenAI's prompt_tokens_details.cached_tokens (prompt tokens whose
    state came from a cache, not computed)."""
    return {**usage, "prompt_tokens_details": {"cached_tokens": min(cached, usage["prompt_tokens"])}}


def completion_json(result: CompletionResult) -> dict[str, Any]:
    """OpenAI's text completion."""
    return {**result.as_response(), "usage": openai_usage(result.usage.as_dict(), result.usage.cached_tokens)}


def chat_json(chat: ChatResult) -> dict[str, Any]:
    """OpenAI's chat completion: the handler's, its usage with the cached prompt tokens of its completion."""
    response = chat.response
    if "usage" in response:
        cached = chat.completion.usage.cached_tokens if chat.completion is not None else 0
        response["usage"] = openai_usage(response["usage"], cached)
    return response


async def _until_done_or_gone(request: Request, served: ServedModel, work: Callable[[Cancellation], Any],
                              fields: set[str]) -> Any:
    """work(cancellation)'s result on a worker thread; a client that hangs up meanwhile sets the cancellation
    (and gets 499)."""
    cancellation = Cancellation()

    def run() -> Any:
        return work(cancellation)

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
        raise api_error(request, failure, fields) from None
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
            raise api_error(self.request, e, self.fields) from None
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
                    yield self.error_event(api_error(self.request, e, self.fields))
                    return
            result = self.chunks.result if self.chunks is not None else None
            if self.include_usage and last is not None and result is not None:
                # OpenAI's stream_options.include_usage: one more chunk, no choices, the usage
                usage = openai_usage(result.usage.as_dict(), result.usage.cached_tokens)
                yield {"data": json.dumps({**{k: last[k] for k in ("id", "object", "created", "model")},
                                           "choices": [], "usage": usage})}
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


def api_error(request: Request, error: BaseException, fields: set[str]) -> ApiError:
    """The API error a failed model call answers: shutdown and a stopped Engine are 503, a template that
    refuses the messages 400, the rest as errors.from_exception maps them."""
    if isinstance(error, ApiError):
        return error
    if registry_of(request).closing:
        return errors.unavailable("the server is shutting down")
    if isinstance(error, EngineError):
        return errors.unavailable(f"the model cannot serve: {error}")
    if TEMPLATE_REFUSED in getattr(error, "__notes__", ()):  # the client's messages, not a server bug
        return bad_request("messages", f"{TEMPLATE_REFUSED} ({type(error).__name__}: {error})")
    return from_exception(error, fields)
