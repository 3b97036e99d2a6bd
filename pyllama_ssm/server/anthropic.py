"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) over the chat route.

llama-server serves it, so Anthropic's clients (the `anthropic` SDKs, Claude Code and the agents
built on them) can point at a local model; here it is a translation, not a second chat path.  A
request's system prompt, messages (text, thinking, tool_use and tool_result blocks) and tools become
an OpenAI chat request, which runs through the chat route's own code (openai.chat_call: the model's
template, its tool markup, the reasoning and tool-call parser of parsing.py); the parsed answer
becomes content blocks (thinking, text, tool_use), streamed as Anthropic's events: message_start,
each block's content_block_start, its deltas (thinking_delta, text_delta, input_json_delta) and
content_block_stop, then message_delta (stop_reason end_turn, max_tokens, stop_sequence or tool_use,
and the usage) and message_stop.  Refusals come in Anthropic's error shape,
{"type": "error", "error": {"type": "invalid_request_error", "message": ...}}, mid-stream as an
`error` event.  Usage counts as Anthropic's does: input_tokens are the prompt tokens computed,
cache_read_input_tokens those the prefix cache supplied.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal, Optional, Union

import anyio
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..limits import field as limit
from ..llama_chat_format import TEMPLATE_REFUSED
from ..results import ChatResult, CompletionResult, Usage
from .chat import MappedStream, ParsedChatStream, parse_completion
from .errors import ERROR_RESPONSES, ApiError, bad_request, shape_errors
from .generation import generate, named_event, note_ignored, registry_of
from .openai import chat_call
from .parsing import arguments_as_objects
from .registry import ServedModel
from .schemas import CreateChatCompletionRequest, NonEmptyStr, RequestBody, ignored_field

MESSAGES, COUNT_TOKENS = "/v1/messages", "/v1/messages/count_tokens"


# -- errors ------------------------------------------------------------------------------------------
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                503: "overloaded_error", 529: "overloaded_error"}


def error_body(error: ApiError) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def error_event(error: ApiError) -> dict[str, str]:
    return {"event": "error", "data": json.dumps(error_body(error))}


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    type: Literal["error"]
    error: AnthropicErrorDetail


_ERRORS = {status: {**spec, "model": AnthropicErrorResponse} for status, spec in ERROR_RESPONSES.items()}
router = APIRouter(responses=_ERRORS)
shape_errors((MESSAGES, COUNT_TOKENS), error_body)


# -- the request -------------------------------------------------------------------------------------
class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class _Block(_Part):
    cache_control: Optional[dict[str, Any]] = Field(default=None, description="Accepted, ignored (the prefix "
                                                                              "cache works on its own).")


class TextBlock(_Block):
    type: Literal["text"]
    text: str
    citations: Optional[list[dict[str, Any]]] = None


class ThinkingBlock(_Block):
    type: Literal["thinking"]
    thinking: str
    signature: Optional[str] = None


class RedactedThinkingBlock(_Block):
    type: Literal["redacted_thinking"]
    data: str


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: NonEmptyStr
    name: NonEmptyStr
    input: dict[str, Any]
    caller: Optional[dict[str, Any]] = ignored_field()
    toolset_name: Optional[str] = ignored_field()


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: NonEmptyStr
    content: Optional[Union[str, list[TextBlock]]] = None
    is_error: Optional[bool] = None
    toolset_name: Optional[str] = ignored_field()


Block = Annotated[Union[TextBlock, ThinkingBlock, RedactedThinkingBlock, ToolUseBlock, ToolResultBlock],
                  Field(discriminator="type")]


class Message(_Part):
    role: Literal["user", "assistant"]
    content: Union[str, list[Block]]


class Tool(_Block):
    type: Optional[Literal["custom"]] = None
    name: NonEmptyStr
    description: Optional[str] = None
    input_schema: dict[str, Any]
    strict: Optional[bool] = ignored_field()
    allowed_callers: Optional[list[str]] = ignored_field()
    defer_loading: Optional[bool] = ignored_field()
    eager_input_streaming: Optional[bool] = ignored_field()
    input_examples: Optional[list[dict[str, Any]]] = ignored_field()


class ToolChoice(_Part):
    # a named tool needs its name: stated in the schema too
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={
        "if": {"properties": {"type": {"const": "tool"}}},
        "then": {"required": ["name"], "properties": {"name": {"type": "string"}}}})

    type: Literal["auto", "any", "tool", "none"]
    name: Optional[NonEmptyStr] = Field(default=None, description="The tool to call (type 'tool').")
    disable_parallel_tool_use: Optional[bool] = Field(default=None, description="Accepted, ignored.")


class JsonFormat(_Part):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON schema the answer follows (a grammar).")


class OutputConfig(_Part):
    effort: Optional[Literal["low", "medium", "high", "xhigh", "max"]] = ignored_field()
    format: Optional[JsonFormat] = Field(default=None, description="Structured output: the text is JSON of this "
                                                                   "schema.")


class CountTokensRequest(RequestBody):
    model: Optional[str] = Field(default=None, description="The alias of a configured model (a server of one "
                                                          "model answers under any name).")
    messages: list[Message] = Field(min_length=1, description="The conversation so far.")
    system: Optional[Union[str, list[TextBlock]]] = Field(default=None, description="The system prompt.")
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[ToolChoice] = None
    thinking: Optional[dict[str, Any]] = ignored_field()
    mcp_servers: Optional[list[dict[str, Any]]] = ignored_field()


class CreateMessageRequest(CountTokensRequest):
    max_tokens: Optional[int] = Field(default=None, **limit("max_tokens"), json_schema_extra={"x-limit": "max_tokens"},
                                      description="Tokens to generate at most (default: until the context is "
                                                  "full or the limit of the server).")
    stop_sequences: Optional[list[str]] = Field(default=None, max_length=16,
                                                description="Strings at which to stop (stop_reason 'stop_sequence').")
    stream: bool = Field(default=False, description="Stream the answer as Anthropic's server-sent events.")
    # sampling: Anthropic's older fields (its current clients send them in extra_body)
    temperature: Optional[float] = Field(default=None, **limit("temperature", ge=0.0))
    top_p: Optional[float] = Field(default=None, **limit("top_p"))
    top_k: Optional[int] = Field(default=None, **limit("top_k"))
    output_config: Optional[OutputConfig] = None
    metadata: Optional[dict[str, Any]] = ignored_field()
    service_tier: Optional[str] = ignored_field()
    container: Optional[Union[str, dict[str, Any]]] = ignored_field()
    cache_control: Optional[dict[str, Any]] = ignored_field()
    diagnostics: Optional[dict[str, Any]] = ignored_field()
    inference_geo: Optional[str] = ignored_field()
    speed: Optional[str] = ignored_field()
    user_profile_id: Optional[str] = ignored_field()
    workspace_id: Optional[str] = ignored_field()
    # llama.cpp's
    min_p: Optional[float] = Field(default=None, **limit("min_p"))
    repeat_penalty: Optional[float] = Field(default=None, **limit("repeat_penalty"))
    seed: Optional[int] = Field(default=None, description="Any integer, taken modulo 2**32 (-1: random).")
    grammar: Optional[str] = Field(default=None, description="A GBNF grammar the output must follow.")
    reasoning_format: Optional[Literal["auto", "none"]] = Field(
        default=None, description="none: keep the template's <think> text in the text block.")
    parse_tool_calls: Optional[bool] = Field(default=None, description="false: keep <tool_call> markup in the text.")


# -- the request as a chat request -------------------------------------------------------------------
def _text(content: Union[str, list[TextBlock], None]) -> str:
    return content if isinstance(content, str) else "".join(block.text for block in content or [])


def chat_messages(body: CountTokensRequest) -> list[dict[str, Any]]:
    """The system prompt and messages as OpenAI chat messages: a message's text blocks joined by
    newlines, its thinking as reasoning_content, tool_use blocks as tool_calls, and tool_result blocks
    as tool messages ahead of the text of their user message."""
    out: list[dict[str, Any]] = []
    if body.system:
        out.append({"role": "system", "content": _text(body.system)})  # blocks joined as llama-server joins them
    for message in body.messages:
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        texts, calls, reasoning, results = [], [], "", 0
        for block in message.content:
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ThinkingBlock):
                reasoning += block.thinking
            elif isinstance(block, ToolUseBlock):
                arguments = json.dumps(block.input, ensure_ascii=False)
                calls.append({"id": block.id, "type": "function",
                              "function": {"name": block.name, "arguments": arguments}})
            elif isinstance(block, ToolResultBlock):
                out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": _text(block.content)})
                results += 1
        if texts or calls or reasoning or not results:  # a turn of tool results only is those results
            chat: dict[str, Any] = {"role": message.role, "content": "\n".join(texts)}
            if calls:
                chat["tool_calls"] = calls
            if reasoning:
                chat["reasoning_content"] = reasoning
            out.append(chat)
    return out


def chat_tools(body: CountTokensRequest) -> Optional[list[dict[str, Any]]]:
    if not body.tools:
        return None
    return [{"type": "function", "function": {"name": tool.name, "parameters": tool.input_schema,
                                              **({"description": tool.description} if tool.description else {})}}
            for tool in body.tools]


def chat_tool_choice(body: CountTokensRequest) -> Union[str, dict[str, Any], None]:
    choice = body.tool_choice
    if choice is None:
        return None
    if choice.type == "tool":
        if choice.name is None:
            raise bad_request("tool_choice", "type 'tool' needs the name of the tool")
        if not any(tool.name == choice.name for tool in body.tools or []):
            raise bad_request("tool_choice", f"no tool named {choice.name!r} in tools")
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def chat_request(body: CreateMessageRequest, alias: str) -> CreateChatCompletionRequest:
    """The chat request that answers body (unset sampling fields keep the chat route's defaults)."""
    chat: dict[str, Any] = {"model": alias, "messages": chat_messages(body), "stream": body.stream,
                            "max_tokens": body.max_tokens}
    tools = chat_tools(body)
    if tools is not None:
        chat["tools"] = tools
    choice = chat_tool_choice(body)
    if choice is not None:
        chat["tool_choice"] = choice
    if body.stop_sequences:
        chat["stop"] = body.stop_sequences
    fmt = body.output_config.format if body.output_config is not None else None
    if fmt is not None:
        chat["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt.schema_}}
    for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "grammar", "reasoning_format",
                 "parse_tool_calls"):
        if getattr(body, name) is not None:
            chat[name] = getattr(body, name)
    try:
        return CreateChatCompletionRequest.model_validate(chat)
    except ValidationError as e:  # a value the chat route bounds tighter than this schema states
        first = e.errors()[0]
        raise bad_request(str(first["loc"][0]), first["msg"]) from None


def prompt_tokens(served: ServedModel, body: CountTokensRequest) -> int:
    """The tokens of the prompt the model's template renders for body, as the chat call renders it."""
    if served.chat is None:
        raise bad_request("model", f"{served.alias!r} has no Jinja chat template (a named --chat_format): token "
                                   f"counts render the model's own template")
    tools = chat_tools(body)
    choice = chat_tool_choice(body)
    try:
        return len(served.chat.prompt_tokens(served.llama, arguments_as_objects(chat_messages(body)), tools, choice))
    except ApiError:
        raise
    except Exception as e:  # noqa: BLE001 - the template refuses this conversation
        raise bad_request("messages", f"{TEMPLATE_REFUSED} ({type(e).__name__}: {e})") from None


# -- the answer --------------------------------------------------------------------------------------
class MessageWriter:
    """One answer as Anthropic's content blocks and its event sequence, from the chat route's parsed deltas
    (reasoning_content, content, tool_calls)."""

    def __init__(self, model: str, stops: list[str], detokenize: Callable[[list[int]], str],
                 max_tokens: Optional[int] = None):
        self.id = f"msg_{uuid.uuid4().hex}"
        self.model = model
        self.stops = [s for s in stops if s]
        self.max_tokens = max_tokens
        self.detokenize = detokenize
        self.input_tokens = 0  # for message_start: the prompt's tokens, when known before the answer
        self.blocks: list[dict[str, Any]] = []
        self.open: Optional[dict[str, Any]] = None
        self.calls: dict[int, dict[str, Any]] = {}  # tool call index -> its block

    def _message(self, content: list[dict[str, Any]], stop_reason: Optional[str], stop_sequence: Optional[str],
                 usage: dict[str, int]) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage}

    def start(self) -> dict[str, Any]:
        usage = {"input_tokens": self.input_tokens, "output_tokens": 0, "cache_read_input_tokens": 0,
                 "cache_creation_input_tokens": 0}
        return {"type": "message_start", "message": self._message([], None, None, usage)}

    def _open(self, block: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield from self._close()
        self.blocks.append(block)
        self.open = block
        yield {"type": "content_block_start", "index": len(self.blocks) - 1,
               "content_block": {**block, "input": {}} if block["type"] == "tool_use" else dict(block)}

    def _close(self) -> Iterator[dict[str, Any]]:
        if self.open is not None:
            self.open = None
            yield {"type": "content_block_stop", "index": len(self.blocks) - 1}

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta}

    def feed(self, delta: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The events of one parsed chat delta."""
        if delta.get("reasoning_content"):
            if self.open is None or self.open["type"] != "thinking":
                yield from self._open({"type": "thinking", "thinking": "", "signature": ""})
            self.open["thinking"] += delta["reasoning_content"]
            yield self._delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]})
        if delta.get("content"):
            if self.open is None or self.open["type"] != "text":
                yield from self._open({"type": "text", "text": ""})
            self.open["text"] += delta["content"]
            yield self._delta({"type": "text_delta", "text": delta["content"]})
        for piece in delta.get("tool_calls") or []:
            function = piece.get("function") or {}
            block = self.calls.get(piece.get("index", 0))
            if block is None:
                block = {"type": "tool_use", "id": piece.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
                         "name": function.get("name") or "", "input": ""}
                self.calls[piece.get("index", 0)] = block
                yield from self._open(block)
            if function.get("arguments"):
                block["input"] += function["arguments"]
                yield {"type": "content_block_delta", "index": self.blocks.index(block),
                       "delta": {"type": "input_json_delta", "partial_json": function["arguments"]}}

    def _stop(self, finish_reason: str, counted: Optional[Usage],
              tokens: Optional[tuple[int, ...]]) -> tuple[str, Optional[str]]:
        """stop_reason and stop_sequence: the stop sequence is the first of them in the generated text.  A call
        forced by tool_choice reports "tool_calls" even when cut off: its token count tells."""
        if finish_reason == "length" or (self.max_tokens and counted and
                                         counted.completion_tokens >= self.max_tokens):
            return "max_tokens", None
        if self.calls or finish_reason == "tool_calls":
            return "tool_use", None
        if self.stops and tokens:
            text = self.detokenize(list(tokens))
            found = [(text.find(s), i, s) for i, s in enumerate(self.stops) if s in text]
            if found:
                return "stop_sequence", min(found)[2]
        return "end_turn", None

    @staticmethod
    def usage(counted: Optional[Usage]) -> dict[str, int]:
        counted = counted or Usage(0, 0)
        cached = min(counted.cached_tokens, counted.prompt_tokens)
        return {"input_tokens": counted.prompt_tokens - cached, "output_tokens": counted.completion_tokens,
                "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}

    def finish(self, finish_reason: str, result: Optional[CompletionResult]) -> Iterator[dict[str, Any]]:
        yield from self._close()
        counted, tokens = (result.usage, result.tokens) if result is not None else (None, None)
        stop_reason, stop_sequence = self._stop(finish_reason, counted, tokens)
        yield {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
               "usage": self.usage(counted)}
        yield {"type": "message_stop"}

    def whole(self, result: dict[str, Any], completion: Optional[CompletionResult]) -> dict[str, Any]:
        """The message answering a completed (parsed) chat completion; completion: the one behind it."""
        choice = result["choices"][0]
        message = choice["message"]
        calls = [{"index": i, "id": call.get("id"), "function": call["function"]}
                 for i, call in enumerate(message.get("tool_calls") or [])]
        for _ in self.feed({"reasoning_content": message.get("reasoning_content"), "content": message.get("content"),
                            "tool_calls": calls}):
            pass
        counted, tokens = (completion.usage, completion.tokens) if completion is not None else (None, None)
        if counted is None and result.get("usage"):  # a handler that ran its completion elsewhere
            counted = Usage(result["usage"]["prompt_tokens"], result["usage"]["completion_tokens"])
        stop_reason, stop_sequence = self._stop(choice["finish_reason"], counted, tokens)
        content = [{**block, "input": _arguments(block["input"])} if block["type"] == "tool_use" else block
                   for block in self.blocks]
        return self._message(content, stop_reason, stop_sequence, self.usage(counted))


def _arguments(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class MessageEvents(MappedStream):
    """A parsed chat stream as Anthropic's events."""

    def __init__(self, chunks: Any, writer: MessageWriter):
        self._writer = writer
        super().__init__(chunks)

    def _map(self) -> Iterator[dict[str, Any]]:
        writer, reason = self._writer, "stop"
        first = next(self._chunks, None)  # the prompt is computed before message_start
        chunk = first
        yield writer.start()
        while chunk is not None:
            for choice in chunk["choices"]:
                yield from writer.feed(choice.get("delta") or {})
                if choice.get("finish_reason") is not None:
                    reason = choice["finish_reason"]
            chunk = next(self._chunks, None)
        if self._chunks.cancelled:
            return
        yield from writer.finish(reason, self._chunks.result)


# -- routes ------------------------------------------------------------------------------------------
_STREAMED = {200: {"description": "The message, or with stream=true Anthropic's events as server-sent events "
                                  "(`event: TYPE` and `data: {event}` lines, message_start first, message_stop last)",
                   "content": {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {
                       "event": {"type": "string"}, "data": {"type": "string"}}}}}}}


@router.post(MESSAGES, summary="Message (Anthropic)", tags=["Anthropic"], responses=_STREAMED)
async def create_message(request: Request, body: CreateMessageRequest) -> Any:
    served = registry_of(request).get(body.model)
    note_ignored(request, body)
    chat = chat_request(body, served.alias)
    kwargs, parser = chat_call(request, served, chat)
    llama = served.llama
    def detokenize(tokens: list[int]) -> str:
        return llama.detokenize(tokens).decode("utf-8", errors="ignore")

    writer = MessageWriter(body.model or served.alias, body.stop_sequences or [], detokenize, kwargs["max_tokens"])
    if body.stream:
        def stream(**kw: Any) -> MessageEvents:
            if served.chat is not None:  # message_start tells the prompt's size, as Anthropic's does
                try:
                    writer.input_tokens = prompt_tokens(served, body)
                except ApiError:
                    pass  # the call below refuses these messages with its own error
            chunks = llama.chat_complete(**kw)
            return MessageEvents(ParsedChatStream(chunks, parser) if parser is not None else chunks, writer)

        return await generate(request, served, chat, stream, kwargs, event=named_event, done=False,
                              error_event=error_event)

    def whole(answer: ChatResult) -> dict[str, Any]:
        result = parse_completion(answer.response, parser) if parser is not None else answer.response
        return writer.whole(result, answer.completion)

    return await generate(request, served, chat, llama.chat_complete, kwargs, on_result=whole)


@router.post(COUNT_TOKENS, summary="Count message tokens (Anthropic)", tags=["Anthropic"])
async def count_tokens(request: Request, body: CountTokensRequest) -> dict[str, int]:
    served = registry_of(request).get(body.model)
    note_ignored(request, body)
    return {"input_tokens": await anyio.to_thread.run_sync(prompt_tokens, served, body, limiter=served.limiter)}
