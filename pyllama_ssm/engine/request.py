"""What a caller holds and receives: the Request handle, its streamed Chunks and its Completion.

A Request is written by the caller's thread at submit() and read by the Engine's; what the Engine
makes of it (Generation, written on the engine thread only) reaches the caller through the handle's
condition: chunks, the prompt's logprobs once its prefill ended, the Completion once it ended.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..output import TextStream
from ..sampling import SamplingParams

if TYPE_CHECKING:
    from .core import Engine


NO_TOKEN = -1  # LLAMA_TOKEN_NULL: a Chunk's token when it brings no new one


class Chunk(NamedTuple):  # a tuple: one is made per token and sequence, on the engine thread
    """One generated token and the text it completes (may be empty while a stop string is possible).  The
    text held back for a possible stop string comes, when the request ends without one, in a last Chunk
    whose token is NO_TOKEN."""

    token: int
    text: str
    logprob: float | None = None                   # log-probability of token (when requested)
    top_logprobs: dict[int, float] | None = None   # the most likely alternatives


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class Continuation:
    """A request that goes on from what the sequence's memory holds, and leaves it there: the single-sequence
    Llama's completions (pyllama_ssm.session) on its inline Engine of one sequence, which keep between calls
    what llama-cpp-python keeps (the evaluated tokens, their logits with logits_all)."""

    resident: int = 0   # prompt tokens sequence 0 holds already: the prefill starts after them
    live: bool = False  # all of the prompt is resident and its last logits are the context's last: sample at once
    # logits_all: called with (position, logits after the token there) for every position the request evaluates
    on_logits: Callable[[int, np.ndarray], None] | None = None
    # llama-cpp-python's stopping_criteria, asked with the tokens generated before each new one: True ends the
    # request ("stop") without that token
    stop: Callable[[list[int]], bool] | None = None


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    # prompt_logprobs=True: entry i scores prompt token i given tokens 0..i-1 (None for token 0)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    restored_from: tuple[int, ...] | None = None  # the prefix-cache entry's tokens it resumed from
    preemptions: int = 0                          # times it was swapped out to host memory
    n_past: int = 0                               # positions its sequence's memory held when it ended


@dataclass
class Generation:
    """What the Engine has made of one request so far: its own, written on its thread only; the caller
    sees it as the Completion handed over when the request ends (and the prompt's logprobs, handed over
    once its prefill ends)."""

    usage: Usage
    stream: TextStream  # its text, what of it was streamed, and what waits (a character, a stop string)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    restored_from: tuple[int, ...] | None = None
    preemptions: int = 0
    n_past: int = 0

    @property
    def text(self) -> str:
        return self.stream.text

    @classmethod
    def of(cls, req: "Request") -> "Generation":
        scored = [None] * len(req.prompt) if req.score_prompt else None
        return cls(Usage(prompt_tokens=len(req.prompt)), TextStream(req.stop),
                   logprobs=[] if req.n_logprobs is not None else None,
                   top_logprobs=[] if req.n_logprobs is not None else None,
                   prompt_logprobs=scored, prompt_top_logprobs=list(scored) if scored is not None else None)

    def completion(self, finish_reason: str) -> Completion:
        return Completion(self.text, list(self.tokens), finish_reason, self.usage, self.logprobs, self.top_logprobs,
                          self.prompt_logprobs, self.prompt_top_logprobs, self.restored_from, self.preemptions,
                          self.n_past)


def check_submission(engine: "Engine", tokens: list[int], max_tokens: int, logprobs: int | None,
                     checkpoints: tuple[int, ...], continues: Continuation | None) -> None:
    """Engine.submit's arguments: ValueError (TokenError) naming the wrong one, before anything is queued."""
    model, n_ctx = engine.model, engine.n_ctx
    if not tokens:
        raise ValueError("prompt: empty (no tokens)")
    for t in tokens:
        model.check_token(t)
    if len(tokens) >= n_ctx:
        raise ValueError(f"prompt of {len(tokens)} tokens does not fit the context of {n_ctx} "
                         f"(one position must remain for generation)")
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens={max_tokens!r}: must be an int >= 0")
    if logprobs is not None and not (isinstance(logprobs, int) and 0 <= logprobs <= model.n_vocab):
        raise ValueError(f"logprobs={logprobs}: must be in 0..{model.n_vocab}")
    if not all(isinstance(p, int) and 0 < p <= len(tokens) for p in checkpoints):
        raise ValueError(f"checkpoints={list(checkpoints)}: must be prompt positions in 1..{len(tokens)}")
    if continues is not None:
        if not (engine.inline and engine.parallel == 1 and not engine.n_cache):
            raise ValueError("continues: needs an inline Engine of one sequence without a prefix cache")
        if not 0 <= continues.resident <= len(tokens) or (continues.resident == len(tokens)) != continues.live:
            raise ValueError(f"continues: {continues.resident} resident tokens of a {len(tokens)}-token prompt "
                             f"(all of it exactly when its logits are live)")


class Request:
    """The caller's handle on a submitted generation: iterate for Chunks, or wait for result().  What it
    was asked is fixed at submit(); what the Engine makes of it arrives through the chunks, the prompt
    logprobs (once its prefill ended) and the Completion (once it ended), never as shared state."""

    _ids = itertools.count()

    def __init__(self, engine: "Engine", prompt: list[int], params: SamplingParams, max_tokens: int,
                 stop: list[str], logprobs: int | None = None, prompt_logprobs: bool = False,
                 checkpoints: tuple[int, ...] = (), continues: Continuation | None = None):
        self.id = next(self._ids)
        self.engine = engine
        self.prompt = prompt
        self.params = params
        self.max_tokens = max_tokens
        self.stop = [s for s in stop if s]
        self.n_logprobs = logprobs
        self.score_prompt = prompt_logprobs
        self.checkpoints = checkpoints
        self.continues = continues
        self.keeps_logits = continues is not None and continues.on_logits is not None  # every position's, to it
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self._completion: Completion | None = None
        self._prompt_scores: tuple[list, list] | None = None
        self._chunks: collections.deque[Chunk] = collections.deque()
        self._cond = threading.Condition()
        self._waiting = 0  # readers waiting on _cond for a chunk (see _push)
        self.cancelled = False

    # -- engine side ----------------------------------------------------------------
    def _push(self, chunk: Chunk) -> None:
        # the condition only when a reader waits on it: one lock and notify per token add up over 32
        # sequences a step.  A reader counts itself in _waiting before it tests for chunks, and the
        # chunk is queued before _waiting is read, so either the reader sees the chunk or it is woken.
        self._chunks.append(chunk)
        if self._waiting:
            with self._cond:
                self._cond.notify_all()

    def _scored_prompt(self, gen: "Generation") -> None:
        with self._cond:
            self._prompt_scores = (list(gen.prompt_logprobs), list(gen.prompt_top_logprobs))

    def _finish(self, reason: str, error: BaseException | None = None, gen: "Generation | None" = None) -> None:
        with self._cond:
            if self.finish_reason is None:
                self.finish_reason = reason
                self.error = error
                self._completion = (gen or Generation.of(self)).completion(reason)
            self._cond.notify_all()

    # -- user side --------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_logprobs(self) -> list[float | None] | None:
        """With prompt_logprobs=True, once its prefill ended (before its first chunk): entry i scores
        prompt token i given tokens 0..i-1 (None for token 0).  None before, or when not asked."""
        return self._prompt_scores[0] if self._prompt_scores is not None else None

    @property
    def prompt_top_logprobs(self) -> list[dict[int, float] | None] | None:
        return self._prompt_scores[1] if self._prompt_scores is not None else None

    def cancel(self) -> None:
        """Stop generating; the sequence's memory is freed at the next step (queued: it never starts).
        Returns at once, from any thread."""
        self.cancelled = True
        self.engine._wake()

    def _next(self, timeout: float | None) -> Chunk | None:
        if self.engine.inline:  # no engine thread: the reader's runs the steps
            self.engine.pump(self, whole=False)
        with self._cond:
            self._waiting += 1
            try:
                if not self._cond.wait_for(lambda: self._chunks or self.finish_reason is not None, timeout):
                    raise TimeoutError(f"request {self.id}: no token within {timeout}s")
            finally:
                self._waiting -= 1
            if self._chunks:
                return self._chunks.popleft()
            if self.error is not None:
                raise self.error
            return None

    def drain(self) -> list[Chunk]:
        """The chunks that arrived since the last call, without waiting."""
        out = []
        while self._chunks:  # popped one by one: the engine thread appends without the lock
            out.append(self._chunks.popleft())
        return out

    def __iter__(self) -> Iterator[Chunk]:
        while (chunk := self._next(None)) is not None:
            yield chunk

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        while (chunk := await loop.run_in_executor(None, self._next, None)) is not None:
            yield chunk

    def result(self, timeout: float | None = None) -> Completion:
        if self.engine.inline:
            self.engine.pump(self, whole=True)
        with self._cond:
            if not self._cond.wait_for(lambda: self.finish_reason is not None, timeout):
                raise TimeoutError(f"request {self.id}: not finished within {timeout}s")
        if self.error is not None:
            raise self.error
        return self._completion
