"""A completion reshaped as a chat completion, and a request's legacy functions as tools.

A chat handler renders a prompt, runs llama.create_completion and returns its
result (or stream of chunks) as llama_cpp's chat completion shapes: the text as
the assistant's message, or, constrained to a tool's arguments, as a call of
that tool; logprobs in the chat layout.  The names are stock's
(llama_cpp.llama_chat_format's `_convert_*`), public here because the chat
handlers and chatml-function-calling both use them; llama_chat_format re-exports
them under stock's names.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional, Union

from . import llama_types as T

CompletionOrChunks = Union[T.CreateCompletionResponse, Iterator[T.CreateCompletionStreamResponse]]
ChatOrChunks = Union[T.CreateChatCompletionResponse, Iterator[T.CreateChatCompletionStreamResponse]]


def tools_and_choice(functions, function_call, tools, tool_choice):
    """Legacy functions/function_call as tools/tool_choice."""
    if functions is not None:
        tools = [{"type": "function", "function": f} for f in functions]
    if function_call in ("none", "auto"):
        tool_choice = function_call
    elif isinstance(function_call, dict) and "name" in function_call:
        tool_choice = {"type": "function", "function": {"name": function_call["name"]}}
    return tools, tool_choice


def find_tool(tools, name: str):
    tool = next((t for t in tools or [] if t["function"]["name"] == name), None)
    if tool is None:
        raise ValueError(f"tool_choice: no tool named {name!r} in tools")
    return tool



def convert_text_completion_logprobs_to_chat(logprobs: Optional[T.CompletionLogprobs]
                                             ) -> Optional[T.ChatCompletionLogprobs]:
    if logprobs is None:
        return None
    return {
        "content": [{"token": token, "bytes": None, "logprob": logprob,
                     "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in (top or {}).items()]}
                    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                                   logprobs["top_logprobs"])],
        "refusal": None,
    }


def convert_text_completion_to_chat(completion: T.Completion) -> T.ChatCompletion:
    choice = completion["choices"][0]
    return {
        "id": "chat" + completion["id"], "object": "chat.completion", "created": completion["created"],
        "model": completion["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": choice["text"]},
                     "logprobs": convert_text_completion_logprobs_to_chat(choice["logprobs"]),
                     "finish_reason": choice["finish_reason"]}],
        "usage": completion["usage"],
    }


def convert_text_completion_chunks_to_chat(chunks: Iterator[T.CreateCompletionStreamResponse]
                                            ) -> Iterator[T.ChatCompletionChunk]:
    for i, chunk in enumerate(chunks):
        head = {"id": "chat" + chunk["id"], "model": chunk["model"], "created": chunk["created"],
                "object": "chat.completion.chunk"}
        choice = chunk["choices"][0]
        if i == 0:
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                        "finish_reason": None}]}
        delta = {"content": choice["text"]} if choice["finish_reason"] is None else {}
        yield {**head, "choices": [{"index": 0, "delta": delta,
                                    "logprobs": convert_text_completion_logprobs_to_chat(choice["logprobs"]),
                                    "finish_reason": choice["finish_reason"]}]}


def convert_completion_to_chat(completion_or_chunks: CompletionOrChunks, stream: bool = False) -> ChatOrChunks:
    if stream:
        return convert_text_completion_chunks_to_chat(completion_or_chunks)
    return convert_text_completion_to_chat(completion_or_chunks)


def convert_completion_to_chat_function(tool_name: str, completion_or_chunks: CompletionOrChunks,
                                         stream: bool) -> ChatOrChunks:
    """A completion constrained to a tool's arguments, as a chat completion calling that tool."""
    if not stream:
        completion = completion_or_chunks
        arguments = completion["choices"][0]["text"]
        return {
            "id": "chat" + completion["id"], "object": "chat.completion", "created": completion["created"],
            "model": completion["model"],
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": None,
                            "function_call": {"name": tool_name, "arguments": arguments},
                            "tool_calls": [{"id": f"call__0_{tool_name}_{completion['id']}", "type": "function",
                                            "function": {"name": tool_name, "arguments": arguments}}]},
                "logprobs": convert_text_completion_logprobs_to_chat(completion["choices"][0]["logprobs"]),
                "finish_reason": "tool_calls",
            }],
            "usage": completion["usage"],
        }
    return _tool_call_chunks(tool_name, completion_or_chunks)


def _tool_call_chunks(tool_name: str, chunks: Iterator[T.CreateCompletionStreamResponse]
                      ) -> Iterator[T.CreateChatCompletionStreamResponse]:
    head = None
    for chunk in chunks:
        if head is None:
            head = {"id": "chat" + chunk["id"], "object": "chat.completion.chunk", "created": chunk["created"],
                    "model": chunk["model"]}
            tool_id = f"call__0_{tool_name}_{chunk['id']}"
            yield {**head, "choices": [{"index": 0, "finish_reason": None, "logprobs": None,
                                        "delta": {"role": "assistant", "content": None, "function_call": None,
                                                  "tool_calls": None}}]}
        if chunk["choices"][0]["finish_reason"] is not None:
            continue  # the tool call's own final chunk follows
        arguments = chunk["choices"][0]["text"]
        yield {**head, "choices": [{
            "index": 0, "finish_reason": None,
            "logprobs": convert_text_completion_logprobs_to_chat(chunk["choices"][0]["logprobs"]),
            "delta": {"role": None, "content": None,
                      "function_call": {"name": tool_name, "arguments": arguments},
                      "tool_calls": [{"index": 0, "id": tool_id, "type": "function",
                                      "function": {"name": tool_name, "arguments": arguments}}]}}]}
    if head is not None:
        yield {**head, "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None,
                                    "delta": {"role": None, "content": None, "function_call": None,
                                              "tool_calls": None}}]}

