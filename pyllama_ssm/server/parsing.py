"""Reasoning and tool calls out of a chat model's raw text, as its own chat template writes them.

Two tool-call forms, told apart by the template: Qwen3.5 / Qwen3-Next's
`<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>`
and Hermes / ChatML's `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`; reasoning
is `<think>...</think>`, opened by the generation prompt itself when it ends with `<think>`
(llama.cpp's server calls that "thinking forced open").  The parser takes the text piece by piece
and returns what became certain: a tail that may still grow into a tag is held back, so a stream
gives the same result as the whole text.  XML tool calls stream their JSON arguments one parameter
at a time; a Hermes call comes whole once its closing tag arrives.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Union

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>\n?")
_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>\n?", re.S)
_FUNCTION_END = re.compile(r"\s*</function>\s*$")


@dataclass(frozen=True)
class Markup:
    """What a chat template writes: reasoning tags, and which tool-call form (None: none)."""

    reasoning: bool
    tools: Optional[str]  # "xml" or "hermes"

    @classmethod
    def of_template(cls, template: Optional[str]) -> Optional["Markup"]:
        if not template:
            return None
        tools = "xml" if "<function=" in template and "<parameter=" in template else \
            "hermes" if TOOL_OPEN in template else None
        markup = cls(THINK_OPEN in template, tools)
        return markup if markup.reasoning or markup.tools else None


@dataclass
class Delta:
    """What one piece of text added: reasoning, content, or a tool call's name and argument text."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's delta.tool_calls entries

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


class OutputParser:
    """Feed the generated text with feed(); finish() at the end.  The results so far are in
    reasoning, content and tool_calls."""

    def __init__(self, markup: Markup, *, thinking: bool = False, parse_tools: bool = True,
                 tools: Optional[list[dict[str, Any]]] = None):
        self.markup = markup
        self.parse_tools = parse_tools and markup.tools is not None
        self.types = _parameter_types(tools or [])
        self.mode = "reasoning" if thinking and markup.reasoning else "start"
        self.buffer = ""
        self.pending_space = ""  # content whitespace held until more content follows
        self.reasoning = ""
        self.content = ""
        self.tool_calls: list[ToolCall] = []
        self._args_open = False
        self._trim = False  # drop leading whitespace of the content (after </think>)

    # -- input ---------------------------------------------------------------------------------
    def feed(self, text: str) -> Delta:
        self.buffer += text
        delta = Delta()
        while self._step(delta, final=False):
            pass
        return delta

    def finish(self) -> Delta:
        delta = Delta()
        while self._step(delta, final=True):
            pass
        if self.mode == "tool":  # cut off inside a tool call
            if self.tool_calls and self._args_open:
                self._args(delta, "}")
            elif not self._args_open:
                self._content(delta, self.buffer, final=True)
            self.buffer, self.mode = "", "content"
        return delta

    # -- the state machine ---------------------------------------------------------------------
    def _step(self, delta: Delta, final: bool) -> bool:
        """Consume what can be consumed; True while progress is made."""
        buf = self.buffer
        if self.mode == "start":  # a model may open its reasoning itself
            stripped = buf.lstrip()
            if self.markup.reasoning and stripped.startswith(THINK_OPEN):
                self.buffer, self.mode = stripped[len(THINK_OPEN):], "reasoning"
                return True
            if not final and (not stripped or THINK_OPEN.startswith(stripped)) and self.markup.reasoning:
                return False
            self.mode = "content"
            return True
        if self.mode == "reasoning":
            at = buf.find(THINK_CLOSE)
            if at < 0:
                keep = 0 if final else _partial_tag(buf, THINK_CLOSE)
                if not final:  # newlines before </think> are not reasoning: hold them until more follows
                    keep += len(buf[:len(buf) - keep]) - len(buf[:len(buf) - keep].rstrip("\n"))
                piece, self.buffer = buf[:len(buf) - keep], buf[len(buf) - keep:]
                self._reason(delta, piece.lstrip("\n") if self.reasoning == "" else piece)
                return False
            piece = buf[:at]
            if self.reasoning == "":
                piece = piece.lstrip("\n")
            self._reason(delta, piece.rstrip("\n"))
            self.buffer, self.mode, self._trim = buf[at + len(THINK_CLOSE):], "content", True
            return True
        if self.mode == "content":
            if self._trim:  # the template's blank line after </think>
                buf = self.buffer = buf.lstrip()
                self._trim = not buf
            at = buf.find(TOOL_OPEN) if self.parse_tools else -1
            if at < 0:
                keep = 0 if final or not self.parse_tools else _partial_tag(buf, TOOL_OPEN)
                self._content(delta, buf[:len(buf) - keep], final)
                self.buffer = buf[len(buf) - keep:]
                return False
            self._content(delta, buf[:at], final=True, before_tool=True)
            self.buffer, self.mode = buf[at + len(TOOL_OPEN):], "tool"
            self._args_open = False
            return True
        if self.mode == "tool":
            return self._tool(delta)
        return False

    def _tool(self, delta: Delta) -> bool:
        buf = self.buffer
        end = buf.find(TOOL_CLOSE)
        if self.markup.tools == "hermes":
            if end < 0:
                return False
            call = _hermes(buf[:end])
            if call is None:  # not a call after all: keep the text as content
                self._content(delta, TOOL_OPEN + buf[:end + len(TOOL_CLOSE)], final=True)
            else:
                name, arguments = call
                self._start(delta, name)
                self._args(delta, arguments)
            self.buffer, self.mode = buf[end + len(TOOL_CLOSE):], "content"
            return True
        body = buf if end < 0 else buf[:end]
        if not self._args_open:
            match = _FUNCTION.match(body)
            if match is None:
                if end >= 0:  # a tool_call tag without a function: text, not a call
                    self._content(delta, TOOL_OPEN + buf[:end + len(TOOL_CLOSE)], final=True)
                    self.buffer, self.mode = buf[end + len(TOOL_CLOSE):], "content"
                    return True
                return False
            self._start(delta, match.group(1).strip())
            self._args_open = True
            self.buffer = buf = buf[match.end():]
            return True
        match = _PARAMETER.match(body)
        if match is not None:
            key, raw = match.group(1).strip(), match.group(2)
            value = _typed(raw, self.types.get((self.tool_calls[-1].name, key)))
            sep = "{" if self.tool_calls[-1].arguments == "" else ", "
            self._args(delta, sep + json.dumps(key, ensure_ascii=False) + ": " + json.dumps(value, ensure_ascii=False))
            self.buffer = buf[match.end():]
            return True
        if end >= 0:  # </function> (or nothing more) before </tool_call>: the call is complete
            self._args(delta, "{}" if self.tool_calls[-1].arguments == "" else "}")
            self._args_open = False
            self.buffer, self.mode = buf[end + len(TOOL_CLOSE):], "content"
            return True
        return False

    # -- output --------------------------------------------------------------------------------
    def _reason(self, delta: Delta, text: str) -> None:
        self.reasoning += text
        delta.reasoning += text

    def _content(self, delta: Delta, text: str, final: bool, before_tool: bool = False) -> None:
        """Content as written, but for the whitespace the template puts before a tool call (held back
        while a tool call may still follow) and between calls."""
        text = self.pending_space + text
        kept = text.rstrip() if before_tool or (self.parse_tools and not final) else text
        self.pending_space = "" if final or before_tool else text[len(kept):]
        if self.tool_calls and not kept.strip():
            return
        self.content += kept
        delta.content += kept

    def _start(self, delta: Delta, name: str) -> None:
        call = ToolCall(f"call_{uuid.uuid4().hex[:24]}", name)
        self.tool_calls.append(call)
        delta.tool_calls.append({"index": len(self.tool_calls) - 1, "id": call.id, "type": "function",
                                 "function": {"name": name, "arguments": ""}})

    def _args(self, delta: Delta, text: str) -> None:
        call = self.tool_calls[-1]
        call.arguments += text
        index = len(self.tool_calls) - 1
        if delta.tool_calls and delta.tool_calls[-1]["index"] == index:
            delta.tool_calls[-1]["function"]["arguments"] += text
        else:
            delta.tool_calls.append({"index": index, "function": {"arguments": text}})

    # -- the whole answer ----------------------------------------------------------------------
    def message(self) -> dict[str, Any]:
        """OpenAI's assistant message: content (None when only tool calls), reasoning_content, tool_calls."""
        out: dict[str, Any] = {"role": "assistant", "content": self.content if self.content or not self.tool_calls
                               else None}
        if self.reasoning:
            out["reasoning_content"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name,
                                                                               "arguments": c.arguments}}
                                 for c in self.tool_calls]
        return out


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest tail of text that starts tag."""
    return max((n for n in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:n])), default=0)


def _hermes(body: str) -> Optional[tuple[str, str]]:
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return call["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _parameter_types(tools: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
    """(function name, parameter) -> its JSON Schema type, from the request's tools."""
    out: dict[tuple[str, str], Any] = {}
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else {}
        properties = ((function.get("parameters") or {}).get("properties") or {}) if isinstance(function, dict) else {}
        for key, spec in properties.items() if isinstance(properties, dict) else []:
            if isinstance(spec, dict):
                out[(function.get("name"), key)] = spec.get("type")
    return out


def _typed(raw: str, kind: Union[str, list, None]) -> Any:
    """A parameter's text as its value: as written for strings, else JSON when it parses (the template
    writes objects and arrays as JSON and other values as their text)."""
    if kind == "string" or (isinstance(kind, list) and kind == ["string"]):
        return raw
    if kind == "boolean" and raw in ("True", "False"):  # Jinja's |string of a boolean
        return raw == "True"
    try:
        return json.loads(raw)
    except ValueError:
        return {"True": True, "False": False, "None": None}.get(raw, raw)


def arguments_as_objects(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with each assistant tool call's JSON arguments text as an object, as chat templates
    (which iterate or tojson them) expect; llama.cpp's server does the same."""
    out = []
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if isinstance(calls, list):
            fixed = []
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    try:
                        args = json.loads(function["arguments"])
                    except ValueError:
                        args = None
                    if isinstance(args, dict):
                        call = {**call, "function": {**function, "arguments": args}}
                fixed.append(call)
            message = {**message, "tool_calls": fixed}
        out.append(message)
    return out
