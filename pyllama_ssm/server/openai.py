"""The OpenAI API's routes, as llama_cpp.server offers them: completions, chat, responses, embeddings, models.

Each route checks its body against its model, builds the Llama call and runs it
with generation.generate (admission, a worker thread, server-sent events,
cancellation).  chat_call is shared with the Anthropic Messages route, which
translates its requests to a chat request.
"""

from __future__ import annotations

import base64
from typing import Any, Optional

import anyio
import numpy as np
from fastapi import APIRouter, Request

from ..llama_chat_format import TEMPLATE_REFUSED
from ..llama_grammar import LlamaGrammar, grammar_for_response_format
from . import responses
from .chat import CompletionChunks, ParsedChatStream, parse_completion
from .errors import ERROR_RESPONSES, ApiError, bad_request
from .generation import (api_error, capped_max_tokens, chat_json, check_tokens, completion_json, generate,
                         generation_kwargs, named_event, note_ignored, registry_of)
from .parsing import OutputParser, arguments_as_objects
from .registry import ServedModel
from .responses import CreateResponseRequest, ResponseStore
from .schemas import CreateChatCompletionRequest, CreateCompletionRequest, CreateEmbeddingRequest

router = APIRouter(responses=ERROR_RESPONSES)

# a generation answers JSON, or server-sent events with stream=true
_STREAMED = {200: {"description": "The completion, or with stream=true its chunks as server-sent events "
                                  "(`data: {chunk}` lines, then `data: [DONE]`)",
                   "content": {"text/event-stream": {"schema": {  # one event (OpenAPI 3.1)
                       "type": "object", "required": ["data"],
                       "properties": {"data": {"type": "string", "description": "A JSON chunk; `[DONE]` last"}}}}}}}


@router.post("/v1/completions", summary="Completion", tags=["OpenAI V1"], responses=_STREAMED)
async def create_completion(request: Request, body: CreateCompletionRequest) -> Any:
    served = registry_of(request).get(body.model)
    if not isinstance(body.prompt, str):
        check_tokens("prompt", body.prompt, served.llama.n_vocab())
    kwargs = generation_kwargs(request, served, body)
    if kwargs.pop("suffix", None) is not None:  # fill-in-the-middle: the prompt is the prefix
        try:
            kwargs["prompt"] = served.llama.infill_tokens(body.prompt, body.suffix, spm=served.settings.spm_infill)
        except ValueError as e:
            raise bad_request("suffix", str(e).removeprefix("suffix: ")) from None
    if body.stream:
        return await generate(request, served, body, lambda **kw: CompletionChunks(served.llama.complete(**kw)),
                              kwargs)
    return await generate(request, served, body, served.llama.complete, kwargs, on_result=completion_json)


def chat_call(request: Request, served: ServedModel,
              body: CreateChatCompletionRequest) -> tuple[dict[str, Any], Optional[OutputParser]]:
    """A chat request as create_chat_completion's keyword arguments, and the parser of its answer (None: the
    answer is not split); the Anthropic Messages route translates its requests to this too."""
    kwargs = generation_kwargs(request, served, body)
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
    llama = served.llama
    if body.stream:
        call = llama.chat_complete if parser is None else \
            lambda **kw: ParsedChatStream(llama.chat_complete(**kw), parser)
        return await generate(request, served, body, call, kwargs)
    answer = chat_json if parser is None else lambda chat: parse_completion(chat_json(chat), parser)
    return await generate(request, served, body, llama.chat_complete, kwargs, on_result=answer)


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
            kwargs["grammar"] = grammar_for_response_format(fmt, False)
        except ValueError as e:
            raise bad_request("text", str(e)) from None
    rid = responses.new_id("resp")
    turn = responses.Turn(rid, body, served.alias, messages, prompt, tokens,
                          responses.parser_for(served.chat, messages, tools, prompt, body, served.settings),
                          responses.EventWriter(rid, body, kwargs["model"]), store,
                          lambda text: tokenize(text))
    if body.stream:
        return await generate(request, served, body, lambda **kw: responses.ResponseEvents(
            llama.complete(**kw), turn), kwargs, event=named_event, done=False)
    return await generate(request, served, body, llama.complete, kwargs, on_result=turn.whole)


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
                raise api_error(request, e, set(type(body).model_fields)) from None
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
