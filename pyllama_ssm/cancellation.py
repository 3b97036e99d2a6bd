"""Stopping a completion from another thread: Cancellation, cancellation_scope, CompletionStream.

A completion checks its Cancellation between steps; a stream's cancel() and a
server whose client went away set it.  The completions that a chat handler
starts find their chat call's Cancellation in a thread-local scope, so that
cancelling the chat stream stops whichever of them runs.  Their own module
because the server uses them beside Llama; pyllama_ssm.llama re-exports them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, Optional


class Cancellation:
    """A flag set from any thread; hooks added run when it is set (at once if it already is).

    It also carries what a server reads of the call it scopes beyond llama-cpp-python's return
    shapes: `usage`, the last completion's token counts with the prompt tokens that came from
    a cache (`cached_tokens`), and `tokens`, its generated token ids (without the end-of-generation
    token), both set when that completion ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hooks: list[Callable[[], None]] = []
        self.is_set = False
        self.usage: Optional[dict[str, int]] = None
        self.tokens: Optional[list[int]] = None

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


_chat_scope = threading.local()  # .cancellation: the chat stream whose handler is running on this thread


@contextlib.contextmanager
def cancellation_scope(cancellation: Cancellation) -> Iterator[Cancellation]:
    """Completions started inside, on this thread, stop when `cancellation` is set (from any thread):
    how a server cancels a non-streaming call whose client went away, and how a chat call's
    completions share its stream's cancellation."""
    outer, _chat_scope.cancellation = getattr(_chat_scope, "cancellation", None), cancellation
    try:
        yield cancellation
    finally:
        _chat_scope.cancellation = outer


def current_cancellation() -> Optional[Cancellation]:
    """The Cancellation of the innermost cancellation_scope on this thread, if any."""
    return getattr(_chat_scope, "cancellation", None)


class CompletionStream(Iterator[Any]):
    """The chunks of create_completion / create_chat_completion(stream=True).

    cancel() may be called from any thread, also while another one waits in
    next(): no chunk follows, and with n_parallel > 1 the sequence leaves the
    Engine at its next step, whether it was queued, in its prefill or
    generating (n_parallel=1: after the token being computed).
    """

    def __init__(self, chunks: Iterator[Any], cancellation: Cancellation):
        self._chunks = chunks
        self._cancellation = cancellation

    def __iter__(self) -> "CompletionStream":
        return self

    def __next__(self) -> Any:
        if self._cancellation.is_set:
            self.close()
            raise StopIteration
        return next(self._chunks)

    @property
    def cancelled(self) -> bool:
        return self._cancellation.is_set

    @property
    def usage(self) -> Optional[dict[str, int]]:
        """Token counts (with cached_tokens) once the generation ended, else None."""
        return self._cancellation.usage

    @property
    def tokens(self) -> Optional[list[int]]:
        """The generated token ids once the generation ended, else None."""
        return self._cancellation.tokens

    def cancel(self) -> None:
        """Stop the completion; returns at once, from any thread."""
        self._cancellation.set()

    def close(self) -> None:
        """Cancel, and end the generator behind the stream when no other thread is inside it."""
        self.cancel()
        with contextlib.suppress(ValueError):  # "generator already executing": that thread's next() ends it
            getattr(self._chunks, "close", lambda: None)()

