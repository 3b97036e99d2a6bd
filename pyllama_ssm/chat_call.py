"""The Llama a chat handler is given for one chat call: ChatCall.

A chat handler (ours, stock's, or one a user wrote) gets `llama=` and runs llama.create_completion,
once or several times, then reshapes the dicts into a chat completion.  What a server needs beyond
that chat completion (the cached prompt tokens, the generated token ids) and the chat call's
cancellation have to reach those inner completions, which the handler starts on its own.  The choice:
Llama.create_chat_completion and Llama.chat_complete hand the handler a ChatCall, a view of the Llama
made for that one call, rather than the Llama itself.  Everything else on it is the Llama's (reads and
writes: stock's multimodal handlers set n_tokens and read _ctx), but its create_completion runs with
the call's Cancellation and keeps the typed result of the completion it ran.  It is explicit and per
call: concurrent chat calls on one Llama (n_parallel > 1) each have their own view, with no state on
the Llama, no thread-local and no registry of results.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Optional

from .cancellation import Cancellation, CompletionStream
from .results import ChatResult, CompletionEvent, CompletionResult

_OWN = ("_llama", "_cancellation", "_last")


class ChatCall:
    """One chat call's view of a Llama: its completions share the call's cancellation and leave their result."""

    def __init__(self, llama: Any, cancellation: Cancellation):
        object.__setattr__(self, "_llama", llama)
        object.__setattr__(self, "_cancellation", cancellation)
        object.__setattr__(self, "_last", None)  # the last completion: a CompletionResult or its stream

    def __getattr__(self, name: str) -> Any:  # only what the view does not define
        return getattr(self._llama, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self._llama, name, value)

    def create_completion(self, *args: Any, **kwargs: Any) -> Any:
        """Llama.create_completion, run with the chat call's cancellation; its result is kept (`result`)."""
        out = self._llama.complete(*args, cancellation=self._cancellation, **kwargs)
        if isinstance(out, CompletionResult):
            self._last = out
            return out.as_response()
        self._last = CompletionStream(out, self._cancellation, shape=CompletionEvent.as_chunk)
        return self._last

    __call__ = create_completion

    @property
    def result(self) -> Optional[CompletionResult]:
        """The last completion the handler ran, once it ended; None before (or if it ran none here)."""
        last = self._last
        return last if isinstance(last, CompletionResult) or last is None else last.result


def run(llama: Any, handler: Callable[..., Any], arguments: dict[str, Any], template_kwargs: dict[str, Any],
        cancellation: Cancellation, typed: bool) -> Any:
    """Llama.create_chat_completion (typed=False: the handler's answer) and Llama.chat_complete (typed=True)."""
    messages = arguments["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise TypeError("messages: expected a list of {'role': ..., 'content': ...} dicts")
    call = ChatCall(llama, cancellation)
    out = handler(llama=call, **arguments, **template_kwargs)
    if arguments["stream"]:
        return CompletionStream(out, cancellation, result_of=lambda: call.result)
    return ChatResult(out, call.result) if typed else out


@functools.lru_cache(maxsize=None)
def _signature(method: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(method)


def arguments(method: Callable[..., Any], llama: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call of `method` (create_completion, create_chat_completion) by name, defaults filled in: how
    complete() and chat_complete() take the same arguments (a TypeError for any other)."""
    bound = _signature(method).bind(llama, *args, **kwargs)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k != "self"}


def openai_v1(create_chat_completion: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """Llama.create_chat_completion_openai_v1: the answer as the openai package's ChatCompletion (or chunks)."""
    try:
        from openai.types.chat import ChatCompletion, ChatCompletionChunk
    except ImportError:
        raise ImportError("create_chat_completion_openai_v1 needs the openai package: pip install openai") from None
    if kwargs.get("stream", False):
        return (ChatCompletionChunk(**chunk) for chunk in create_chat_completion(*args, **kwargs))
    return ChatCompletion(**create_chat_completion(*args, **kwargs))
