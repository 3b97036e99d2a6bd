"""Chat completion handlers: the registry by name, and a chat formatter made a handler.

A handler takes llama=, messages= and create_chat_completion's keywords and
returns a chat completion (or its chunks).  Most are a ChatFormatter (messages
to a prompt, with its stop strings) made a handler by
chat_formatter_to_chat_completion_handler: render, tokenize, turn
response_format and a forced tool choice into a grammar, run
llama.create_completion, reshape the result (chat_convert).  The names are
llama_cpp.llama_chat_format's; that module re-exports them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Optional, Protocol, Union

from . import llama_types as T
from .chat_convert import (ChatOrChunks, convert_completion_to_chat, convert_completion_to_chat_function, find_tool,
                           tools_and_choice)
from .llama_grammar import grammar_for_response_format, grammar_for_schema

Messages = list[T.ChatCompletionRequestMessage]


# -- the registry --------------------------------------------------------------------
class LlamaChatCompletionHandler(Protocol):
    """A callable taking llama=, messages= and create_chat_completion's keywords; returns a
    chat completion, or an iterator of chunks when stream=True."""

    def __call__(self, *, llama: Any, messages: Messages, **kwargs: Any) -> ChatOrChunks: ...


class LlamaChatCompletionHandlerNotFoundException(ValueError):
    pass


class LlamaChatCompletionHandlerRegistry:
    """Handlers by name; one table shared by every instance."""

    _chat_handlers: dict[str, LlamaChatCompletionHandler] = {}

    def register_chat_completion_handler(self, name: str, chat_handler: LlamaChatCompletionHandler,
                                         overwrite: bool = False) -> None:
        if not overwrite and name in self._chat_handlers:
            raise ValueError(f"chat format {name!r} is already registered; pass overwrite=True to replace it")
        self._chat_handlers[name] = chat_handler

    def unregister_chat_handler(self, name: str) -> None:
        if self._chat_handlers.pop(name, None) is None:
            raise ValueError(f"no chat format registered as {name!r}")

    def get_chat_completion_handler_by_name(self, name: str) -> LlamaChatCompletionHandler:
        try:
            return self._chat_handlers[name]
        except KeyError:
            raise LlamaChatCompletionHandlerNotFoundException(
                f"chat_format={name!r}: unknown (known: {', '.join(sorted(self._chat_handlers))})") from None


def get_chat_completion_handler(name: str) -> LlamaChatCompletionHandler:
    try:
        return LlamaChatCompletionHandlerRegistry().get_chat_completion_handler_by_name(name)
    except LlamaChatCompletionHandlerNotFoundException:
        # under install_as_llama_cpp(), formats registered with stock's llama_cpp.llama_chat_format
        # (its multimodal handlers' names among them) are found there
        stock = sys.modules.get("llama_cpp.llama_chat_format")
        if stock is None or getattr(stock, "get_chat_completion_handler", None) is get_chat_completion_handler:
            raise
        try:
            return stock.get_chat_completion_handler(name)
        except Exception:
            raise LlamaChatCompletionHandlerNotFoundException(
                f"chat_format={name!r}: unknown here and in llama_cpp.llama_chat_format") from None


def register_chat_completion_handler(name: str):
    def decorator(f: LlamaChatCompletionHandler) -> LlamaChatCompletionHandler:
        LlamaChatCompletionHandlerRegistry().register_chat_completion_handler(name, f)
        return f
    return decorator



# -- formatter -> handler ------------------------------------------------------------------
@dataclasses.dataclass
class ChatFormatterResponse:
    """A rendered prompt, the stop strings of its format, and whether it already holds BOS."""

    prompt: str
    stop: Optional[Union[str, list[str]]] = None
    stopping_criteria: Any = None  # a llama.StoppingCriteriaList
    added_special: bool = False
    # leading parts of `prompt` where a later conversation is likely to part from this one (ours, not
    # stock's): the end of the system message(s), shared by every user, and the end of the last turn,
    # before the generation prompt, where the next request's history renders the answer
    boundaries: tuple[str, ...] = ()


class ChatFormatter(Protocol):
    def __call__(self, *, messages: Messages, **kwargs: Any) -> ChatFormatterResponse: ...



def chat_formatter_to_chat_completion_handler(chat_formatter: ChatFormatter) -> LlamaChatCompletionHandler:
    def chat_completion_handler(*, llama, messages: Messages, functions=None, function_call=None, tools=None,
                                tool_choice=None, temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                                min_p: float = 0.05, typical_p: float = 1.0, stream: bool = False,
                                stop: Optional[Union[str, list[str]]] = None, seed: Optional[int] = None,
                                response_format=None, max_tokens: Optional[int] = None,
                                presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                                repeat_penalty: float = 1.1, tfs_z: float = 1.0, mirostat_mode: int = 0,
                                mirostat_tau: float = 5.0, mirostat_eta: float = 0.1, model: Optional[str] = None,
                                logits_processor=None, grammar=None, logit_bias=None, logprobs: Optional[bool] = None,
                                top_logprobs: Optional[int] = None, **kwargs: Any) -> ChatOrChunks:
        result = chat_formatter(messages=messages, functions=functions, function_call=function_call, tools=tools,
                                tool_choice=tool_choice, **kwargs)
        prompt = llama.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
        if result.stop is not None:
            stop += result.stop if isinstance(result.stop, list) else [result.stop]
        grammar = grammar_for_response_format(response_format, llama.verbose) or grammar
        tools, tool_choice = tools_and_choice(functions, function_call, tools, tool_choice)
        tool = None
        if isinstance(tool_choice, dict) and tools is not None:
            tool = find_tool(tools, tool_choice["function"]["name"])
            grammar = grammar_for_schema(tool["function"]["parameters"], llama.verbose)
        args = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, typical_p=typical_p,
                    stream=stream, seed=seed, max_tokens=max_tokens, presence_penalty=presence_penalty,
                    frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty, tfs_z=tfs_z,
                    mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, model=model,
                    logits_processor=logits_processor, logit_bias=logit_bias)
        out = llama.create_completion(prompt=prompt, stop=stop, stopping_criteria=result.stopping_criteria,
                                      grammar=grammar, logprobs=top_logprobs if logprobs else None,
                                      prefix_checkpoints=_token_boundaries(llama, result, prompt), **args)
        if tool is not None:
            return convert_completion_to_chat_function(tool["function"]["name"], out, stream)
        return convert_completion_to_chat(out, stream=stream)

    return chat_completion_handler


def _token_boundaries(llama, result: ChatFormatterResponse, prompt: list[int]) -> list[int]:
    """The formatter's boundaries as prompt positions: the tokens a boundary's text shares with the prompt
    (a boundary inside what tokenizes as one token falls before it)."""
    engine = getattr(llama, "_engine", None)
    if not result.boundaries or engine is None or not engine.takes_checkpoints:  # tokenizing costs: only
        return []                                                                # where they serve
    found = set()
    for text in result.boundaries:
        head = llama.tokenize(text.encode("utf-8"), add_bos=not result.added_special, special=True)
        found.add(len(os.path.commonprefix([head, prompt])))
    return sorted(found - {0})


def register_chat_format(name: str):
    def decorator(f: ChatFormatter) -> ChatFormatter:
        LlamaChatCompletionHandlerRegistry().register_chat_completion_handler(
            name, chat_formatter_to_chat_completion_handler(f))
        return f
    return decorator

