"""A served model's chat template as the server reads it: rendering, and the parsing of its answers.

Chat answers come back split as OpenAI's clients expect them: `reasoning_content`, `content` and
parsed `tool_calls` (finish_reason "tool_calls"), streamed as `delta.reasoning_content`,
`delta.content` and `delta.tool_calls` with incremental arguments.  A model is parsed when its
template writes reasoning or tool-call markup (server/parsing.py); `--reasoning_format none` and
`--parse_tool_calls false` turn it off per model, the fields of the same names per request.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

from ..llama import Llama
from ..llama_chat_format import Jinja2ChatFormatter
from ..results import CompletionResult
from .parsing import Markup, OutputParser, arguments_as_objects


@dataclass
class ChatTemplate:
    """The Jinja template a model's chat answers follow, and the markup it writes."""

    formatter: Jinja2ChatFormatter
    markup: Optional[Markup]
    template_kwargs: dict[str, Any]

    @classmethod
    def of(cls, llama: Llama) -> Optional["ChatTemplate"]:
        """The template of llama's chat format (its own GGUF template by default); None for named formats."""
        name = llama.chat_format or "chat_template.default"
        if llama.chat_handler is not None or not name.startswith("chat_template."):
            return None
        key = "tokenizer.chat_template" + ("" if name == "chat_template.default"
                                           else "." + name.removeprefix("chat_template."))
        template = llama.metadata.get(key)
        if not template:
            return None
        eos, bos = llama.token_eos(), llama.token_bos()
        text = lambda t: llama.detokenize([t], special=True).decode("utf-8", "ignore") if t != -1 else ""  # noqa: E731
        formatter = Jinja2ChatFormatter(template, eos_token=text(eos), bos_token=text(bos), stop_token_ids=[eos])
        return cls(formatter, Markup.of_template(template), dict(llama.chat_template_kwargs or {}))

    def render(self, messages: list[dict[str, Any]], tools: Optional[list[dict[str, Any]]] = None) -> str:
        return self.formatter(messages=arguments_as_objects(messages), tools=tools, **self.template_kwargs).prompt

    def prompt_tokens(self, llama: Llama, messages: list[dict[str, Any]], tools: Optional[list[dict[str, Any]]] = None,
                      tool_choice: Any = None) -> list[int]:
        """The prompt's tokens as create_chat_completion renders and tokenizes them (a Jinja template adds
        its own special tokens): what a token count tells a client."""
        prompt = self.formatter(messages=messages, tools=tools, tool_choice=tool_choice, **self.template_kwargs).prompt
        return llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)

    def parser(self, messages: list[dict[str, Any]], tools: Optional[list[dict[str, Any]]], *, reasoning: bool,
               parse_tools: bool, prompt: Optional[str] = None) -> Optional[OutputParser]:
        """A parser for the answer to messages (None: nothing to parse); prompt: already rendered."""
        markup = self.markup
        if markup is None or not (reasoning and markup.reasoning or parse_tools and markup.tools):
            return None
        markup = Markup(markup.reasoning and reasoning, markup.tools)
        if prompt is None:
            try:
                prompt = self.render(messages, tools)
            except Exception:  # noqa: BLE001 - the call itself refuses these messages, with its own error
                return None
        thinking = markup.reasoning and prompt.rstrip().endswith("<think>")
        # tool calls are parsed when the request offers tools, as llama.cpp's server does
        return OutputParser(markup, thinking=thinking, parse_tools=parse_tools and bool(tools), tools=tools)


def parse_completion(result: dict[str, Any], parser: OutputParser) -> dict[str, Any]:
    """A chat completion with its message split into reasoning, content and tool calls."""
    choice = result["choices"][0]
    parser.feed(choice["message"].get("content") or "")
    parser.finish()
    message = parser.message()
    if choice["message"].get("tool_calls") and not parser.tool_calls:  # a named tool_choice: already a call
        return result
    choice["message"] = message
    if parser.tool_calls and choice["finish_reason"] == "stop":
        choice["finish_reason"] = "tool_calls"
    return result


class MappedStream:
    """A CompletionStream seen through _map() (its items turned into others), with the stream's controls."""

    def __init__(self, chunks: Any):
        self._chunks = chunks
        self._out: Iterator[dict[str, Any]] = self._map()

    def _map(self) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def __iter__(self) -> "MappedStream":
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._out)

    @property
    def cancelled(self) -> bool:
        return self._chunks.cancelled

    @property
    def result(self) -> Optional[CompletionResult]:
        """The finished completion (its usage, token ids), once it ended (see CompletionStream.result)."""
        return self._chunks.result

    def cancel(self) -> None:
        self._chunks.cancel()

    def close(self) -> None:
        self._chunks.close()


class CompletionChunks(MappedStream):
    """Llama.complete(stream=True)'s events as OpenAI's text completion chunks."""

    def _map(self) -> Iterator[dict[str, Any]]:
        for event in self._chunks:
            yield event.as_chunk()


class ParsedChatStream(MappedStream):
    """A chat CompletionStream whose chunks' content is split by a parser."""

    def __init__(self, chunks: Any, parser: OutputParser):
        self._parser = parser
        super().__init__(chunks)

    def _map(self) -> Iterator[dict[str, Any]]:
        for chunk in self._chunks:
            choice = chunk["choices"][0]
            delta = choice.get("delta") or {}
            if choice.get("finish_reason") is not None:
                last = self._parser.finish()
                if last:
                    yield _with_delta(chunk, last)
                if self._parser.tool_calls and choice["finish_reason"] == "stop":
                    chunk = copy.deepcopy(chunk)
                    chunk["choices"][0]["finish_reason"] = "tool_calls"
                yield chunk
            elif delta.get("content"):
                parsed = self._parser.feed(delta["content"])
                if parsed or delta.get("role"):
                    yield _with_delta(chunk, parsed, delta.get("role"))
            else:
                yield chunk


def _with_delta(chunk: dict[str, Any], parsed, role: Optional[str] = None) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": role} if role else {}
    if parsed.reasoning:
        delta["reasoning_content"] = parsed.reasoning
    if parsed.content:
        delta["content"] = parsed.content
    if parsed.tool_calls:
        delta["tool_calls"] = parsed.tool_calls
    choice = {**chunk["choices"][0], "delta": delta, "finish_reason": None}
    return {**chunk, "choices": [choice]}
