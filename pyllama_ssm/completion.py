"""One completion of the drop-in Llama, from its checked arguments to llama-cpp-python's responses.

Llama.create_completion checks the arguments once into a CompletionRequest; the request is then run
by the Engine (n_parallel > 1, engine_responses here) or by the Session (n_parallel = 1,
pyllama_ssm.session: stock's loop over the tokens of its own inline Engine), and both shape what they
produce with the request's methods below into typed
results (pyllama_ssm.results: a CompletionResult, or CompletionEvents when streamed) with the usage and
the logprobs (OpenAI's layout, scored by pyllama_ssm.output's rules); Llama makes llama-cpp-python's
dicts of them.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from . import fim, llama_grammar
from .bindings import lib
from .cancellation import Cancellation
from .engine.request import NO_TOKEN
from .llama_callbacks import StopOnTokenIds
from .llama_types import CompletionLogprobs
from .model import Model
from .results import CompletionEvent, CompletionResult, TokenProbs, Usage
from .sampling import SamplingParams

UNLIMITED = (None, 0, -1)  # max_tokens values meaning "up to the context size" (llama-cpp-python)
# create_completion's arguments that request() checks, and those of the sampler chain (sampling_params's names)
REQUEST_ARGUMENTS = ("prompt", "suffix", "max_tokens", "stop", "logprobs", "echo", "stream", "seed",
                     "prefix_checkpoints")
SAMPLING_ARGUMENTS = ("top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "frequency_penalty", "presence_penalty",
                      "mirostat_mode", "mirostat_tau", "mirostat_eta", "grammar", "logit_bias", "logits_processor")


def prompt_tokens(model: Model, prompt: Union[str, list[int]], tokenize: Callable[..., list[int]],
                  n_ctx: int) -> list[int]:
    """BOS/EOS around a text prompt as llama-cpp-python adds them; token prompts are taken as given."""
    if isinstance(prompt, str):
        vocab = model.vocab
        bos, sep, eos = model.token_bos, lib.llama_vocab_sep(vocab), model.token_eos
        end = sep if sep != -1 else eos
        head = [bos] if lib.llama_vocab_get_add_bos(vocab) and bos != -1 else []
        tail = [end] if (lib.llama_vocab_get_add_eos(vocab) or sep != -1) and end != -1 else []
        body = tokenize(prompt.encode("utf-8"), add_bos=False, special=True) if prompt else []
        tokens = head + body + tail
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in prompt):
        tokens = [model.check_token(int(t)) for t in prompt]
    else:
        raise TypeError(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}")
    if not tokens:
        raise ValueError("prompt: empty (no tokens, and the model adds no BOS)")
    if tokens[:2] == [model.token_bos] * 2:
        warnings.warn("prompt starts with two BOS tokens; the chat template or the prompt already adds one",
                      RuntimeWarning, stacklevel=4)
    if len(tokens) >= n_ctx:
        raise ValueError(f"Requested tokens ({len(tokens)}) exceed context window of {n_ctx}")
    return tokens


def request(model: Model, tokenize: Callable[..., list[int]], detokenize: Callable[..., bytes], n_ctx: int,
            prompt: Union[str, list[int]], *, suffix: Optional[str], spm_infill: bool, max_tokens: Optional[int],
            stop, logprobs: Optional[int], echo: bool, stream: bool, seed: Optional[int], logits_all: bool,
            prefix_checkpoints: Sequence[int], name: str, cancellation: Cancellation) -> "CompletionRequest":
    """create_completion's arguments checked (ValueError/TypeError before anything runs) into a request;
    logits_all: whether logprobs can be had; cancellation: the caller's (a chat call's is shared by the
    completions its handler runs)."""
    prefix = prompt
    if suffix is not None:  # fill-in-the-middle: the prompt is the prefix (text, or token ids as given)
        if not isinstance(suffix, str):
            raise TypeError(f"suffix: expected a string, got {type(suffix).__name__}")
        prompt = fim.infill_tokens(model, prompt, suffix, spm=spm_infill)
    tokens = prompt_tokens(model, prompt, tokenize, n_ctx)
    room = n_ctx - len(tokens)
    if max_tokens in UNLIMITED:
        max_tokens = room
    elif not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens={max_tokens!r}: must be a positive int (None, 0 or -1: up to the context)")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) for s in stops):
        raise TypeError("stop: expected a string or a list of strings")
    if logprobs is not None:
        if not isinstance(logprobs, int) or not 0 <= logprobs <= model.n_vocab:
            raise ValueError(f"logprobs={logprobs!r}: must be an int in 0..{model.n_vocab}")
        if not logits_all:
            raise ValueError("logprobs is not supported for models created with logits_all=False")
    if seed is not None and not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    echo_text = "" if not echo else prefix if isinstance(prefix, str) else \
        detokenize(tokens).decode("utf-8", errors="ignore")
    return CompletionRequest(prompt, tokens, min(max_tokens, room), stops, logprobs, echo, echo_text, stream,
                             cancellation, tuple(prefix_checkpoints),
                             (f"cmpl-{uuid.uuid4()}", int(time.time()), name), detokenize, model.token_bos)


def sampling_params(model: Model, *, temp: float, top_k: int, top_p: float, min_p: float, typical_p: float,
                    repeat_penalty: float, frequency_penalty: float, presence_penalty: float, mirostat_mode: int,
                    mirostat_tau: float, mirostat_eta: float, penalty_last_n: int, seed: int,
                    grammar=None, logit_bias: Optional[dict] = None, logits_processor=None,
                    seen: Optional[Callable[[list[int]], np.ndarray]] = None) -> SamplingParams:
    """The sampler chain llama-cpp-python builds for these arguments.  A logits processor is called with
    seen(generated) (the tokens it is shown: the evaluated ones on the single sequence, the prompt and the
    generated ones on the Engine) and the raw logits, as llama-cpp-python calls it."""
    if grammar is not None:
        # ours, or stock's (llama_cpp.LlamaGrammar after install_as_llama_cpp(), what LangChain and
        # stock's chat handlers build): both hold the GBNF text in _grammar
        if not isinstance(getattr(grammar, "_grammar", None), str):
            raise TypeError(f"grammar: expected a LlamaGrammar, got {type(grammar).__name__}")
        llama_grammar.check(grammar._grammar, model.vocab)
    bias = {}
    for key, value in (logit_bias or {}).items():
        try:
            tok = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias: key {key!r} is not a token id") from None
        bias[model.check_token(tok)] = float(value)
    processor = None
    if logits_processor is not None:
        processor = lambda generated, logits: logits_processor(seen(generated), logits)  # noqa: E731
    return SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
                          repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                          presence_penalty=presence_penalty, penalty_last_n=penalty_last_n,
                          mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta,
                          logit_bias=bias, grammar=grammar._grammar if grammar is not None else None,
                          seed=seed, logits_processor=processor)


@dataclass
class CompletionRequest:
    """One completion's checked arguments, and how its answers are shaped."""

    prompt: Union[str, list[int]]
    prompt_tokens: list[int]
    max_tokens: int
    stop: list[str]
    logprobs: Optional[int]
    echo: bool
    echo_text: str   # the prompt's text when echo=True, else ""
    stream: bool
    cancellation: Cancellation
    checkpoints: tuple[int, ...] = ()  # prompt positions worth a prefix-cache entry
    head: tuple[str, int, str] = ("", 0, "")  # the responses' id, created and model
    detokenize: Callable[..., bytes] = field(default=lambda tokens, **kw: b"", repr=False)  # Llama.detokenize
    bos: int = -1

    def event(self, text: str, logprobs=None, result: Optional[CompletionResult] = None,
              probs: tuple[TokenProbs, ...] = (), tokens: tuple[int, ...] = ()) -> CompletionEvent:
        return CompletionEvent(*self.head, text, logprobs, result, probs, tokens)

    def result(self, text: str, completion: list[int], finish_reason: str, cached: int,
               logprobs=None, end: Optional[int] = None) -> CompletionResult:
        """The finished completion (`completion`: its tokens without the end-of-generation token `end`)."""
        return CompletionResult(*self.head, text, tuple(completion), finish_reason,
                                Usage(len(self.prompt_tokens), len(completion), cached), logprobs, self.echo_text, end)

    def text(self, token: int) -> str:
        return self.detokenize([token]).decode("utf-8", errors="ignore")

    def token_logprobs(self, token: int, offset: int, logprob: float,
                       top: Iterable[tuple[int, float]]) -> tuple[str, int, float, dict[str, float]]:
        """(text, text offset, logprob, top alternatives by text) of one token, as llama-cpp-python reports it."""
        text = self.text(token)
        alternatives = {self.text(t): float(lp) for t, lp in top}
        alternatives[text] = float(logprob)
        return text, offset, float(logprob), alternatives

    def stream_logprobs(self, token: int, offset: int, logprob: float,
                        top: Iterable[tuple[int, float]]) -> CompletionLogprobs:
        text, offset, logprob, alternatives = self.token_logprobs(token, offset, logprob, top)
        return {"tokens": [text], "text_offset": [offset], "token_logprobs": [logprob], "top_logprobs": [alternatives]}

    def logprobs_of(self, completion: list[int], scored: list[tuple[Optional[float], Any]],
                    end: Optional[int] = None) -> CompletionLogprobs:
        """OpenAI's completion logprobs: one entry per token of the completion, preceded with echo=True by
        one per prompt token; `scored` holds each one's (logprob, top alternatives).  Deliberately unlike
        llama-cpp-python, which scores each echoed prompt token with the logits at its own position (the
        prediction of the next token): here token i is scored given tokens 0..i-1, so loglikelihoods
        (lm-eval) are right.  The first prompt token has none; a BOS that the tokenizer added to a text
        prompt is not listed, and one the caller sent as a token id is.  With echo=True the end-of-generation
        token `end` that stopped the completion is listed last (no text), as vLLM lists it: lm-eval asks
        max_tokens=1 and drops the last entry as the generated token, which without it is a prompt token."""
        tokens = (self.prompt_tokens + completion + ([end] if end is not None else [])) if self.echo else completion
        skip = int(self.echo and isinstance(self.prompt, str) and self.prompt_tokens[:1] == [self.bos])
        base = 0 if self.echo else len(self.prompt)
        out: CompletionLogprobs = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
        for i in range(skip, len(tokens)):
            offset = base + len(self.detokenize(tokens[skip:i]).decode("utf-8", errors="ignore"))
            logprob, top = scored[i]
            text = self.text(tokens[i])
            if logprob is not None:
                text, offset, logprob, top = self.token_logprobs(tokens[i], offset, logprob, top)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(top)
        return out


# -- on the Engine -------------------------------------------------------------------------------
def engine_completion(engine, model: Model, r: CompletionRequest, params: SamplingParams,
                      stopping_criteria: Optional[Sequence] = None) -> Iterator[Any]:
    """The request as one sequence of the Engine: a CompletionResult, or CompletionEvents when streamed."""
    for criteria in stopping_criteria or []:
        # the Engine ends a sequence at any end-of-generation token; other criteria need Python per token
        if not (isinstance(criteria, StopOnTokenIds) and all(map(model.is_eog, criteria.token_ids))):
            raise ValueError("stopping_criteria: arbitrary criteria need n_parallel=1")
    return _engine_responses(engine, model, r, params)


def _completion_of(model: Model, result) -> list[int]:
    """An Engine result's completion tokens, without the end-of-generation token that ended it."""
    return result.tokens[:-1] if result.tokens and model.is_eog(result.tokens[-1]) else result.tokens


def _echo_logprobs(r: CompletionRequest, req) -> Optional[CompletionLogprobs]:
    if r.logprobs is None:
        return None
    scored = [(lp, top and top.items()) for lp, top in zip(req.prompt_logprobs, req.prompt_top_logprobs)]
    return r.logprobs_of([], scored)


def _engine_responses(engine, model: Model, r: CompletionRequest, params: SamplingParams) -> Iterator[Any]:
    if r.cancellation.is_set:  # cancelled before its first next(): never submitted
        return
    req = engine.submit(r.prompt_tokens, params, max_tokens=r.max_tokens, stop=r.stop, logprobs=r.logprobs,
                        prompt_logprobs=r.echo and r.logprobs is not None, checkpoints=r.checkpoints)
    r.cancellation.on_set(req.cancel)
    try:
        if r.stream:
            sent = 0  # characters of text streamed (the Engine's stream holds back and cuts stop strings)
            echo = r.echo
            ids: list[int] = []  # tokens since the last event
            for chunk in req:
                if r.cancellation.is_set:
                    return
                if chunk.token != NO_TOKEN:
                    ids.append(chunk.token)
                if echo:  # the prompt is scored once its prefill ended, before the first token
                    echo = False
                    yield r.event(r.echo_text, _echo_logprobs(r, req))
                lp, probs = None, ()
                if r.logprobs is not None and chunk.logprob is not None:
                    lp = r.stream_logprobs(chunk.token, len(r.prompt) + sent, chunk.logprob,
                                           chunk.top_logprobs.items())
                    probs = (TokenProbs(chunk.token, chunk.logprob, tuple(chunk.top_logprobs.items())),)
                if chunk.text or lp is not None:
                    sent += len(chunk.text)
                    yield r.event(chunk.text, lp, probs=probs, tokens=tuple(ids))
                    ids.clear()
            if r.cancellation.is_set:
                return
            result = req.result()
            if echo:  # no token came (max_tokens=0)
                yield r.event(r.echo_text, _echo_logprobs(r, req))
            completion = _completion_of(model, result)
            end = result.tokens[-1] if len(result.tokens) > len(completion) else None
            ended = r.result(result.text, completion, result.finish_reason, result.usage.cached_tokens, end=end)
            scored = ()  # the end-of-generation token, scored like the others but streamed as no piece
            if r.logprobs is not None and end is not None and result.logprobs:
                scored = (TokenProbs(end, result.logprobs[-1], tuple(result.top_logprobs[-1].items())),)
            yield r.event("", result=ended, probs=scored, tokens=(*ids, *([] if end is None else [end])))
            return
        result = req.result()
        completion = _completion_of(model, result)
        end = result.tokens[-1] if len(result.tokens) > len(completion) else None
        lp = None
        if r.logprobs is not None:
            scored = [(lp_, top.items()) for lp_, top in zip(result.logprobs, result.top_logprobs)]
            if r.echo:
                scored = [(lp_, top and top.items()) for lp_, top in
                          zip(result.prompt_logprobs, result.prompt_top_logprobs)] + scored
            lp = r.logprobs_of(completion, scored, end)
        yield r.result(result.text, completion, result.finish_reason, result.usage.cached_tokens, lp, end)
    finally:
        if not req.done:  # the caller stopped reading: free the sequence
            req.cancel()
