"""Stopping a completion from another thread: Cancellation and CompletionStream.

A completion checks its Cancellation between steps; a stream's cancel() and a server whose client
went away set it.  A caller hands its Cancellation to a completion explicitly (Llama.complete,
Llama.chat_complete); the completions a chat handler runs get their chat call's through the Llama
view the handler is given (chat_call.ChatCall), so that cancelling the chat stops whichever of them
runs.  Their own module because the server uses them beside Llama; pyllama_ssm.llama re-exports them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, Optional

from .results import CompletionEvent, CompletionResult


class Cancellation:
    """A flag set from any thread; hooks added run when it is set (at once if it already is)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hooks: list[Callable[[], None]] = []
        self.is_set = False

    def set(self) -> None:
        with self._lock:
            if self.is_set:
                return
            self.is_set = True
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()

    def on_set(self, hook: Callable[[], None]) -> None:
        with self._lock:
            if not self.is_set:
                self._hooks.append(hook)
                return
        hook()


class CompletionStream(Iterator[Any]):
    """The chunks of create_completion / create_chat_completion(stream=True), or the CompletionEvents of
    Llama.complete(stream=True).

    cancel() may be called from any thread, also while another one waits in
    next(): no chunk follows, and with n_parallel > 1 the sequence leaves the
    Engine at its next step, whether it was queued, in its prefill or
    generating (n_parallel=1: after the token being computed).  `result` is the
    completion's CompletionResult once it ended.
    """

    def __init__(self, chunks: Iterator[Any], cancellation: Cancellation,
                 shape: Optional[Callable[[CompletionEvent], Any]] = None,
                 result_of: Optional[Callable[[], Optional[CompletionResult]]] = None):
        self._chunks = chunks
        self._cancellation = cancellation
        self._shape = shape  # an event to what is yielded (llama-cpp-python's chunk); None: the item itself
        self._result_of = result_of  # where the result is, when the items carry none (a chat's chunks)
        self._result: Optional[CompletionResult] = None

    def __iter__(self) -> "CompletionStream":
        return self

    def __next__(self) -> Any:
        if self._cancellation.is_set:
            self.close()
            raise StopIteration
        item = next(self._chunks)
        if isinstance(item, CompletionEvent) and item.result is not None:
            self._result = item.result
        return self._shape(item) if self._shape is not None else item

    @property
    def cancelled(self) -> bool:
        return self._cancellation.is_set

    @property
    def result(self) -> Optional[CompletionResult]:
        """The finished completion (a chat's: the last its handler ran), else None."""
        if self._result is None and self._result_of is not None:
            return self._result_of()
        return self._result

    @property
    def usage(self) -> Optional[dict[str, int]]:
        """Token counts with cached_tokens once the generation ended, else None."""
        result = self.result
        return None if result is None else {**result.usage.as_dict(), "cached_tokens": result.usage.cached_tokens}

    @property
    def tokens(self) -> Optional[list[int]]:
        """The generated token ids once the generation ended, else None."""
        return None if self.result is None else list(self.result.tokens)

    def cancel(self) -> None:
        """Stop the completion; returns at once, from any thread."""
        self._cancellation.set()

    def close(self) -> None:
        """Cancel, and end the generator behind the stream when no other thread is inside it."""
        self.cancel()
        with contextlib.suppress(ValueError):  # "generator already executing": that thread's next() ends it
            getattr(self._chunks, "close", lambda: None)()
