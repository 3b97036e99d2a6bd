"""Typed results of one completion: what the runtime produces, before anybody's JSON.

The Session's loop and the Engine path (pyllama_ssm.completion) produce a CompletionResult, or when
streamed CompletionEvents whose last one carries it.  Llama.create_completion turns them into
llama-cpp-python's dicts (as_response, as_chunk); Llama.complete and Llama.chat_complete hand them to
callers that need more than those dicts, as the server does: it builds the OpenAI, Anthropic, Responses
and llama-server answers from them, with the cached prompt tokens and the generated token ids that
llama-cpp-python's shapes do not carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

from .llama_types import CompletionLogprobs


@dataclass(frozen=True)
class Usage:
    """One completion's token counts."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose state came from a cache (prefix reuse), not computed

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        """llama-cpp-python's usage (no cached_tokens: stock has none)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class CompletionResult:
    """A finished completion."""

    id: str
    created: int
    model: str
    text: str                   # the generated text (after stop strings are cut), without the echoed prompt
    tokens: tuple[int, ...]     # the generated token ids, without the end-of-generation token
    finish_reason: str          # "stop" or "length"
    usage: Usage
    logprobs: Optional[CompletionLogprobs] = None  # OpenAI's layout; streamed: None (the events carry them)
    echo: str = ""              # the prompt's text when echo=True
    end_token: Optional[int] = None  # the end-of-generation token that ended it (llama-server lists and counts it)

    def as_response(self) -> dict[str, Any]:
        """llama-cpp-python's whole (not streamed) response."""
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"text": self.echo + self.text, "index": 0, "logprobs": self.logprobs,
                             "finish_reason": self.finish_reason}],
                "usage": self.usage.as_dict()}


class TokenProbs(NamedTuple):
    """A generated token's log-probability under the model and the most likely tokens', by token id (OpenAI's
    layout keys them by text, which loses ids): what llama-server's n_probs reports.  Events carry one when
    logprobs were asked for."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), the most likely first


@dataclass(frozen=True)
class CompletionEvent:
    """One streamed piece of a completion; the last one has its finish_reason and carries the result."""

    id: str
    created: int
    model: str
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    result: Optional[CompletionResult] = None
    # with logprobs: the token this piece came with; on the last event, the end-of-generation token that ended it
    probs: tuple[TokenProbs, ...] = ()
    # the generated tokens since the previous event (a piece held back for a stop string or a character comes
    # with a later token's); on the last event the rest, then the end-of-generation token that ended it
    tokens: tuple[int, ...] = ()

    @property
    def finish_reason(self) -> Optional[str]:
        return self.result.finish_reason if self.result is not None else None

    def as_chunk(self) -> dict[str, Any]:
        """llama-cpp-python's chunk."""
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"text": self.text, "index": 0, "logprobs": self.logprobs,
                             "finish_reason": self.finish_reason}]}


@dataclass(frozen=True)
class ChatResult:
    """A chat completion (not streamed): the handler's answer, and the completion it ran (the last one, where
    a handler runs several; None for a handler that ran none through the Llama it was given)."""

    response: dict[str, Any]
    completion: Optional[CompletionResult]
