"""OpenAI's Responses API (`POST /v1/responses`) over a model's chat template, with stored conversations.

A request's input items (messages, function calls and their outputs, reasoning) become chat
messages, rendered by the model's own template; the answer is parsed into output items (reasoning,
message, function_call) as server/parsing.py splits chat answers, and streamed as the Responses
event sequence (response.created ... response.completed).  With `store` (the default, as OpenAI's),
a response keeps its conversation: its prompt and generated token ids.  A follow-up naming it in
`previous_response_id` is those tokens plus the new turn's, so the Engine resumes from the prefix
cache entry the previous answer left (its recurrent snapshot and attention cells) and computes only
the new tokens; when the entry was evicted, or the template writes the history differently, the
prompt is recomputed, with the same result.  Stored responses are kept in memory, the oldest
dropped past `capacity`.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..limits import field as limit
from ..results import CompletionResult, Usage
from .chat import MappedStream
from .parsing import Delta, OutputParser
from .schemas import NonEmptyStr, RequestBody, ignored_field


# -- the request -------------------------------------------------------------------------------------
class _Item(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class InputText(_Item):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: Optional[list[dict[str, Any]]] = None
    logprobs: Optional[list[dict[str, Any]]] = None


class MessageItem(_Item):
    type: Optional[Literal["message"]] = None
    role: Literal["user", "assistant", "system", "developer"]
    content: Union[str, list[InputText]]
    id: Optional[str] = None
    status: Optional[Literal["in_progress", "completed", "incomplete"]] = None
    phase: Optional[str] = None


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: NonEmptyStr
    name: NonEmptyStr
    arguments: str
    id: Optional[str] = None
    status: Optional[Literal["in_progress", "completed", "incomplete"]] = None


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: NonEmptyStr
    output: str
    id: Optional[str] = None
    status: Optional[Literal["in_progress", "completed", "incomplete"]] = None


class ReasoningText(_Item):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(_Item):
    type: Literal["reasoning"]
    id: Optional[str] = None
    summary: list[ReasoningText] = Field(default_factory=list)
    content: Optional[list[ReasoningText]] = None
    encrypted_content: Optional[str] = None
    status: Optional[Literal["in_progress", "completed", "incomplete"]] = None


InputItem = Union[FunctionCallItem, FunctionCallOutputItem, ReasoningItem, MessageItem]


class FunctionTool(_Item):
    type: Literal["function"]
    name: NonEmptyStr
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class TextFormat(_Item):
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    description: Optional[str] = None
    strict: Optional[bool] = None


class TextOptions(_Item):
    format: Optional[TextFormat] = None
    verbosity: Optional[Literal["low", "medium", "high"]] = None


class CreateResponseRequest(RequestBody):
    model: Optional[str] = Field(default=None, description="The alias of a configured model (default: the first; "
                                                           "a server of one model answers under any name).")
    input: Union[NonEmptyStr, Annotated[list[InputItem], Field(min_length=1)]] = Field(
        description="The new turn: text (a user message) or input items.")
    instructions: Optional[str] = Field(default=None, description="A system message for this response only.")
    previous_response_id: Optional[str] = Field(default=None, description="Continue a stored response.")
    store: bool = Field(default=True, description="Keep the response (and its state) for previous_response_id.")
    stream: bool = Field(default=False, description="Stream the Responses events as server-sent events.")
    stream_options: Optional[dict[str, Any]] = ignored_field()
    max_output_tokens: Optional[int] = Field(default=None, **limit("max_tokens"),
                                             json_schema_extra={"x-limit": "max_tokens"})
    temperature: Optional[float] = Field(default=None, **limit("temperature", ge=0.0, le=2.0))
    top_p: Optional[float] = Field(default=None, **limit("top_p"))
    # any integer, taken modulo 2**32 (as on chat)
    seed: Optional[int] = Field(default=None, description="Any integer, taken modulo 2**32 (-1: random).")
    tools: Optional[list[FunctionTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[TextOptions] = None
    reasoning: Optional[dict[str, Any]] = ignored_field()
    metadata: Optional[dict[str, str]] = Field(default=None, description="Returned with the response.")
    user: Optional[str] = None
    truncation: Optional[Literal["auto", "disabled"]] = ignored_field()
    include: Optional[list[str]] = ignored_field()
    service_tier: Optional[str] = ignored_field()
    top_logprobs: Optional[int] = ignored_field(ge=0, le=20)
    prompt_cache_key: Optional[str] = ignored_field()
    safety_identifier: Optional[str] = ignored_field()
    max_tool_calls: Optional[int] = ignored_field(ge=0, le=2**31 - 1)
    background: Optional[bool] = ignored_field()  # answered at once, never in the background
    # llama.cpp's
    top_k: Optional[int] = Field(default=None, **limit("top_k"))
    min_p: Optional[float] = Field(default=None, **limit("min_p"))
    repeat_penalty: Optional[float] = Field(default=None, **limit("repeat_penalty"))
    grammar: Optional[str] = Field(default=None, description="A GBNF grammar the output must follow.")
    reasoning_format: Optional[Literal["auto", "none"]] = Field(default=None, description="none: keep <think> in "
                                                                                          "the text.")
    parse_tool_calls: Optional[bool] = Field(default=None, description="false: keep <tool_call> in the text.")


# -- input items as chat messages --------------------------------------------------------------------
def _text(content: Union[str, list[InputText]]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def input_messages(body: CreateResponseRequest) -> list[dict[str, Any]]:
    """The request's new turn as chat messages (its instructions apart: see conversation())."""
    out: list[dict[str, Any]] = []
    if isinstance(body.input, str):
        out.append({"role": "user", "content": body.input})
        return out
    reasoning = ""
    for item in body.input:
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            message = {"role": role, "content": _text(item.content)}
            if role == "assistant" and reasoning:
                message["reasoning_content"], reasoning = reasoning, ""
            out.append(message)
        elif isinstance(item, ReasoningItem):
            reasoning += "".join(part.text for part in (item.content or item.summary))
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name,
                                                                         "arguments": item.arguments}}
            if out and out[-1]["role"] == "assistant":  # calls after the answer's text belong to it
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                message = {"role": "assistant", "content": "", "tool_calls": [call]}
                if reasoning:
                    message["reasoning_content"], reasoning = reasoning, ""
                out.append(message)
        else:
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return out


def conversation(body: CreateResponseRequest, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages to render: this request's instructions (as OpenAI, a previous response's are not
    carried over), the stored history, the new turn."""
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    return system + history + input_messages(body)


def chat_tools(body: CreateResponseRequest) -> Optional[list[dict[str, Any]]]:
    if not body.tools or body.tool_choice == "none":
        return None
    return [{"type": "function", "function": tool.model_dump(exclude={"type", "strict"}, exclude_none=True)}
            for tool in body.tools]


def response_format(body: CreateResponseRequest) -> Optional[dict[str, Any]]:
    """text.format as a chat response_format (for its grammar)."""
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"schema": fmt.schema_ or {}}}


# -- stored conversations ----------------------------------------------------------------------------
@dataclass
class Stored:
    """A stored response: the conversation through its answer, as messages, text and tokens."""

    alias: str
    messages: list[dict[str, Any]]   # the history without instructions, its answer included
    prompt: str                      # the rendered prompt of the answer
    tokens: list[int]                # the prompt's tokens, then the generated ones
    answer: str                      # the generated text, as generated
    response: dict[str, Any]


class ResponseStore:
    """Stored responses by id, the oldest dropped past capacity."""

    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._items: collections.OrderedDict[str, Stored] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, rid: str, stored: Stored) -> None:
        with self._lock:
            self._items[rid] = stored
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, rid: str) -> Optional[Stored]:
        with self._lock:
            stored = self._items.get(rid)
            if stored is not None:
                self._items.move_to_end(rid)
            return stored

    def delete(self, rid: str) -> bool:
        with self._lock:
            return self._items.pop(rid, None) is not None


def prompt_tokens(tokenize, prompt: str, previous: Optional[Stored]) -> list[int]:
    """The prompt's tokens: a continued conversation reuses the stored tokens of what it repeats, so
    the prefix cache entry its answer left applies; else (or when the template rewrote the history)
    the whole text."""
    if previous is not None:
        head = previous.prompt + previous.answer
        if prompt.startswith(head):
            return previous.tokens + tokenize(prompt[len(head):])
    return tokenize(prompt)


# -- output items, the response, its events ----------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}


def function_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def response_object(rid: str, body: CreateResponseRequest, model: str, created: float, output: list[dict[str, Any]],
                    status: str, usage: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    return {"id": rid, "object": "response", "created_at": created, "status": status,
            "completed_at": time.time() if status != "in_progress" else None, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": model,
            "output": output, "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "store": body.store, "temperature": body.temperature, "top_p": body.top_p,
            "text": body.text.model_dump(by_alias=True, exclude_none=True) if body.text else {"format": {"type": "text"}},
            "tool_choice": body.tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "truncation": body.truncation or "disabled", "usage": usage, "user": body.user,
            "metadata": body.metadata or {}}


def usage_of(counted: Usage, reasoning_tokens: int) -> dict[str, Any]:
    return {"input_tokens": counted.prompt_tokens,
            "input_tokens_details": {"cached_tokens": min(counted.cached_tokens, counted.prompt_tokens)},
            "output_tokens": counted.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens, counted.completion_tokens)},
            "total_tokens": counted.total_tokens}


class EventWriter:
    """The Responses event sequence of one answer, from its parsed pieces: each output item added,
    its deltas, then done, in order; response.completed (or .incomplete) last."""

    def __init__(self, rid: str, body: CreateResponseRequest, model: str):
        self.rid, self.body, self.model = rid, body, model
        self.created = time.time()
        self.output: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.open: Optional[dict[str, Any]] = None  # the item receiving deltas
        self.calls: dict[int, dict[str, Any]] = {}  # tool call index -> its item
        self.seq = 0

    def _emit(self, kind: str, **payload: Any) -> None:
        self.events.append({"type": kind, "sequence_number": self.seq, **payload})
        self.seq += 1

    def start(self) -> None:
        response = response_object(self.rid, self.body, self.model, self.created, [], "in_progress")
        self._emit("response.created", response=response)
        self._emit("response.in_progress", response=response)

    def _open(self, item: dict[str, Any], part: Optional[dict[str, Any]]) -> dict[str, Any]:
        self._close()
        self.output.append(item)
        index = len(self.output) - 1
        added = {**item, "content": []} if "content" in item else dict(item)
        self._emit("response.output_item.added", output_index=index, item=added)
        if part is not None:
            self._emit("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                       part=part)
        self.open = item
        return item

    def _close(self) -> None:
        item, self.open = self.open, None
        if item is None:
            return
        index = self.output.index(item)
        item["status"] = "completed"
        if item["type"] == "message":
            part = item["content"][0]
            self._emit("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                       text=part["text"], logprobs=[])
            self._emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                       part=part)
        elif item["type"] == "reasoning":
            part = item["content"][0]
            self._emit("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                       text=part["text"])
            self._emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                       part=part)
        else:
            self._emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                       name=item["name"], arguments=item["arguments"])
        self._emit("response.output_item.done", output_index=index, item=item)

    def reasoning(self, text: str) -> None:
        item = self.open if self.open is not None and self.open["type"] == "reasoning" else \
            self._open(reasoning_item(new_id("rs"), "", "in_progress"), {"type": "reasoning_text", "text": ""})
        item["content"][0]["text"] += text
        self._emit("response.reasoning_text.delta", item_id=item["id"], output_index=len(self.output) - 1,
                   content_index=0, delta=text)

    def content(self, text: str) -> None:
        item = self.open if self.open is not None and self.open["type"] == "message" else \
            self._open(message_item(new_id("msg"), "", "in_progress"),
                       {"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        item["content"][0]["text"] += text
        self._emit("response.output_text.delta", item_id=item["id"], output_index=len(self.output) - 1,
                   content_index=0, delta=text, logprobs=[])

    def tool(self, piece: dict[str, Any]) -> None:
        function = piece.get("function", {})
        item = self.calls.get(piece["index"])
        if item is None:
            item = self.calls[piece["index"]] = self._open(
                function_item(new_id("fc"), piece.get("id") or new_id("call"), function.get("name", ""), "", "in_progress"),
                None)
        if function.get("arguments"):
            item["arguments"] += function["arguments"]
            self._emit("response.function_call_arguments.delta", item_id=item["id"],
                       output_index=self.output.index(item), delta=function["arguments"])

    def feed(self, parsed) -> None:
        """One parsed piece (a parsing.Delta)."""
        if parsed.reasoning:
            self.reasoning(parsed.reasoning)
        if parsed.content:
            self.content(parsed.content)
        for piece in parsed.tool_calls:
            self.tool(piece)

    def finish(self, finish_reason: str, usage: Optional[dict[str, Any]]) -> dict[str, Any]:
        self._close()
        status = "incomplete" if finish_reason == "length" else "completed"
        response = response_object(self.rid, self.body, self.model, self.created, self.output, status, usage)
        self._emit(f"response.{status}", response=response)
        return response


class PlainText:
    """A parser stand-in for a model whose template writes no markup (or with parsing off): all content."""

    def __init__(self) -> None:
        self.reasoning, self.content = "", ""

    def feed(self, text: str) -> Delta:
        self.content += text
        return Delta(content=text)

    def finish(self) -> Delta:
        return Delta()

    def message(self) -> dict[str, Any]:
        return {"role": "assistant", "content": self.content}


def parser_for(chat, messages, tools, prompt: str, body: CreateResponseRequest, settings) -> Union[OutputParser,
                                                                                                 PlainText]:
    reasoning = (body.reasoning_format or settings.reasoning_format) == "auto"
    parse_tools = body.parse_tool_calls if body.parse_tool_calls is not None else settings.parse_tool_calls
    return chat.parser(messages, tools, reasoning=reasoning, parse_tools=parse_tools, prompt=prompt) or PlainText()


@dataclass
class Turn:
    """One response being made: what it needs to finish and to be stored."""

    rid: str
    body: CreateResponseRequest
    alias: str
    messages: list[dict[str, Any]]
    prompt: str
    tokens: list[int]
    parser: Union[OutputParser, PlainText]
    writer: EventWriter
    store: ResponseStore
    tokenize: Any

    def finish(self, text: str, finish_reason: str, result: Optional[CompletionResult]) -> dict[str, Any]:
        """The response object once the answer is complete; stored when the request asks."""
        reasoning_tokens = len(self.tokenize(self.parser.reasoning)) if self.parser.reasoning else 0
        counted = result.usage if result is not None else Usage(len(self.tokens), 0)
        response = self.writer.finish(finish_reason, usage_of(counted, reasoning_tokens))
        if self.body.store and result is not None:
            history = self.messages[1:] if self.body.instructions else self.messages
            self.store.put(self.rid, Stored(self.alias, history + [self.parser.message()], self.prompt,
                                            self.tokens + list(result.tokens), text, response))
        return response

    def whole(self, result: CompletionResult) -> dict[str, Any]:
        """The response to a completed (non-streamed) completion."""
        self.writer.feed(self.parser.feed(result.text))
        self.writer.feed(self.parser.finish())
        return self.finish(result.text, result.finish_reason, result)


class ResponseEvents(MappedStream):
    """A completion stream as the Responses events."""

    def __init__(self, chunks: Any, turn: Turn):
        self._turn = turn
        super().__init__(chunks)

    def _map(self):
        turn, writer, text, reason = self._turn, self._turn.writer, "", "stop"
        first = next(self._chunks, None)  # the prompt is computed before response.created
        writer.start()
        chunk = first
        while chunk is not None:
            if chunk.text:
                text += chunk.text
                writer.feed(turn.parser.feed(chunk.text))
            if chunk.finish_reason is not None:
                reason = chunk.finish_reason
            yield from self._take()
            chunk = next(self._chunks, None)
        if self._chunks.cancelled:
            return
        writer.feed(turn.parser.finish())
        turn.finish(text, reason, self._chunks.result)
        yield from self._take()

    def _take(self):
        events, self._turn.writer.events = self._turn.writer.events, []
        yield from events
