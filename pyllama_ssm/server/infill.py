"""llama-server's fill-in-the-middle route, `POST /infill`, for the code-completion clients that use it
(llama.vim, llama.vscode and the editors' plugins built on them).

The request's prefix, suffix, other files (input_extra) and the start of the middle (prompt) are laid
out around the model's FIM tokens by pyllama_ssm.fim, which builds the layout llama-server builds,
with its cuts to one batch and to the context, and are completed as a token prompt.  The answer is
llama-server's: content, tokens_predicted, tokens_evaluated, tokens_cached, stop_type ("eos", "word",
"limit"), stopping_word, prompt (the layout, special tokens written out), generation_settings and
timings; with `stream` its pieces as `data:` events, the last with `"stop": true` and the totals
(no `[DONE]`, as llama-server).  `response_fields` picks fields by path ("timings/prompt_n"), and
`n_indent` and `t_max_predict_ms` end a completion as llama-server does: at a new line indented less
than n_indent, or at a new line once the generation took longer than t_max_predict_ms.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
from fastapi import APIRouter, Request
from pydantic import Field

from .. import fim
from ..limits import INT32_MAX
from ..limits import field as limit
from ..llama import LlamaGrammar, LogitsProcessorList
from ..results import CompletionResult, Usage
from .chat import MappedStream
from .errors import ERROR_RESPONSES, bad_request
from .generation import capped_max_tokens, generate, note_ignored, registry_of
from .schemas import RequestBody, ignored_field

router = APIRouter(responses=ERROR_RESPONSES)


class ExtraChunk(RequestBody):
    filename: str = Field(default="tmp", description="The file the text comes from.")
    text: str = Field(description="Its text (context for the completion).")


class InfillRequest(RequestBody):
    model: Optional[str] = Field(default=None, description="The alias of a configured model (a server of one model "
                                                          "answers under any name).")
    input_prefix: str = Field(description="The code before the cursor.")
    input_suffix: str = Field(description="The code after the cursor.")
    input_extra: list[ExtraChunk] = Field(default_factory=list, description="Other files, as context.")
    prompt: str = Field(default="", description="The start of the middle, already written.")
    n_predict: int = Field(default=-1, ge=-1, le=INT32_MAX, json_schema_extra={"x-limit": "max_tokens"},
                           description="Tokens to generate at most (-1: up to the context or the server's limit; "
                                       "at least one is generated, as llama-server does).")
    temperature: float = Field(default=0.8, **limit("temperature"))
    top_k: int = Field(default=40, **limit("top_k"))
    top_p: float = Field(default=0.95, **limit("top_p"))
    min_p: float = Field(default=0.05, **limit("min_p"))
    typical_p: float = Field(default=1.0, **limit("typical_p"))
    repeat_penalty: float = Field(default=1.0, **limit("repeat_penalty"))
    presence_penalty: float = Field(default=0.0, **limit("presence_penalty"))
    frequency_penalty: float = Field(default=0.0, **limit("frequency_penalty"))
    mirostat: int = Field(default=0, **limit("mirostat_mode"))
    mirostat_tau: float = Field(default=5.0, **limit("mirostat_tau"))
    mirostat_eta: float = Field(default=0.1, **limit("mirostat_eta"))
    seed: Optional[int] = Field(default=None, description="Any integer, taken modulo 2**32 (-1: random).")
    stop: list[str] = Field(default_factory=list, max_length=16, description="Strings at which to stop.")
    stream: bool = Field(default=False, description="Stream the pieces as server-sent events.")
    grammar: Optional[str] = Field(default=None, description="A GBNF grammar the output must follow.")
    n_indent: int = Field(default=0, ge=0, le=INT32_MAX,
                          description="Stop at a new line indented less than this (spaces and tabs).")
    t_max_predict_ms: int = Field(default=0, ge=0, le=INT32_MAX,
                                  description="Stop at a new line once generating took longer (0: no limit).")
    return_tokens: bool = Field(default=False, description="The generated token ids in `tokens` (of the final "
                                                           "answer; streamed pieces carry none).")
    response_fields: Optional[list[str]] = Field(default=None, description="Only these fields, by path "
                                                                           "(\"timings/prompt_n\").")
    # sent by llama.vim / llama.vscode; nothing to do here
    cache_prompt: Optional[bool] = ignored_field()
    id_slot: Optional[int] = ignored_field(ge=-1, le=INT32_MAX)
    samplers: Optional[list[str]] = ignored_field()
    t_max_prompt_ms: Optional[int] = ignored_field(ge=0, le=INT32_MAX)
    timings_per_token: Optional[bool] = ignored_field()


class _Halt:
    """A logits processor that makes the end-of-generation token the most likely by far once set: how the
    route ends a completion early (n_indent, t_max_predict_ms) without cancelling it, so that its counts
    stay the Engine's.  The other tokens keep their logits: a grammar that does not allow the end yet
    still has tokens to choose from (a grammar left with none aborts llama.cpp), and what they add after
    the early stop is dropped."""

    def __init__(self, eos: int):
        self.eos = eos
        self.set = False

    def __call__(self, input_ids: Any, scores: np.ndarray) -> np.ndarray:
        if self.set:
            top = float(np.max(scores))
            if np.isfinite(top):
                scores[self.eos] = top + 1000.0
        return scores


class InfillRun:
    """One /infill completion: its pieces as llama-server's chunks, the early stops, and the final answer."""

    def __init__(self, body: InfillRequest, alias: str, prompt: str, n_prompt: int, halt: _Halt, detokenize):
        self.body, self.alias, self.prompt, self.n_prompt = body, alias, prompt, n_prompt
        self.halt, self.detokenize = halt, detokenize
        self.text = ""          # generated so far (cut at an early stop)
        self.scan = 0           # where the next new line to check for n_indent is looked for
        self.early = False      # ended by n_indent or t_max_predict_ms
        self.t_start = time.perf_counter()
        self.t_first: Optional[float] = None

    def take(self, piece: str) -> str:
        """What of the generated text can be sent once piece arrived (nothing after an early stop)."""
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if self.early:
            return ""
        sent = len(self.text)
        self.text += piece
        cut = self._indent_cut() if self.body.n_indent > 0 else None
        if cut is not None:
            self.text, self.early = self.text[:cut], True
        elif "\n" in piece and self.body.t_max_predict_ms > 0 \
                and (time.perf_counter() - self.t_first) * 1000 > self.body.t_max_predict_ms:
            self.early = True
        if self.early:
            self.halt.set = True  # the next token is the end: the counts stay the Engine's
        return self.text[sent:]

    def _indent_cut(self) -> Optional[int]:
        """llama-server's n_indent rule: a line after the first whose indentation (spaces, tabs) is followed by
        anything, a new line included, and is shorter than n_indent is cut after its indentation."""
        text = self.text
        while (nl := text.find("\n", self.scan)) >= 0:
            start = pos = nl + 1
            while pos < len(text) and text[pos] in " \t":
                pos += 1
            if pos == len(text):  # its indentation may still grow (and is kept either way)
                return None
            if pos - start < self.body.n_indent:
                return pos
            self.scan = start
        return None

    def piece(self, content: str, n_predicted: int) -> dict[str, Any]:
        return {"index": 0, "content": content, "tokens": [], "stop": False, "id_slot": -1,
                "tokens_predicted": n_predicted, "tokens_evaluated": self.n_prompt}

    def final(self, finish_reason: str, result: Optional[CompletionResult], content: str) -> dict[str, Any]:
        t_end = time.perf_counter()
        t_first = self.t_first or t_end
        counted = result.usage if result is not None else Usage(self.n_prompt, 0)
        tokens = list(result.tokens) if result is not None else []
        cached = min(counted.cached_tokens, counted.prompt_tokens)
        n_gen = counted.completion_tokens
        stop_type, word = "limit", ""
        if finish_reason == "stop" and not self.early:
            full = self.detokenize(tokens)
            found = [(full.find(s), s) for s in self.body.stop if s and s in full]
            stop_type, word = ("word", min(found)[1]) if found else ("eos", "")
        prompt_ms, predicted_ms = (t_first - self.t_start) * 1000, (t_end - t_first) * 1000
        n_prompt = counted.prompt_tokens - cached
        b = self.body
        answer = {
            "index": 0, "content": content, "tokens": tokens if b.return_tokens else [], "id_slot": -1,
            "stop": True, "model": self.alias, "tokens_predicted": n_gen, "tokens_evaluated": counted.prompt_tokens,
            "generation_settings": {
                "n_predict": b.n_predict, "seed": b.seed if b.seed is not None else -1, "temperature": b.temperature,
                "top_k": b.top_k, "top_p": b.top_p, "min_p": b.min_p, "typical_p": b.typical_p,
                "repeat_penalty": b.repeat_penalty, "presence_penalty": b.presence_penalty,
                "frequency_penalty": b.frequency_penalty, "mirostat": b.mirostat, "mirostat_tau": b.mirostat_tau,
                "mirostat_eta": b.mirostat_eta, "stop": b.stop, "n_indent": b.n_indent,
                "t_max_predict_ms": b.t_max_predict_ms, "stream": b.stream, "grammar": b.grammar or ""},
            "prompt": self.prompt, "has_new_line": "\n" in self.text, "truncated": False, "stop_type": stop_type,
            "stopping_word": word, "tokens_cached": counted.prompt_tokens + n_gen,
            "timings": {"cache_n": cached, "prompt_n": n_prompt, "prompt_ms": prompt_ms,
                        "prompt_per_token_ms": prompt_ms / n_prompt if n_prompt else 0.0,
                        "prompt_per_second": n_prompt / prompt_ms * 1000 if prompt_ms > 0 else 0.0,
                        "predicted_n": n_gen, "predicted_ms": predicted_ms,
                        "predicted_per_token_ms": predicted_ms / n_gen if n_gen else 0.0,
                        "predicted_per_second": n_gen / predicted_ms * 1000 if predicted_ms > 0 else 0.0}}
        return answer if b.response_fields is None else _fields(answer, b.response_fields)


def _fields(answer: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """llama-server's response_fields: {path: value} for each path found ("timings/prompt_n")."""
    out = {}
    for path in paths:
        node: Any = answer
        for key in path.split("/"):
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            out[path] = node
    return out


class InfillStream(MappedStream):
    """Llama.complete(stream=True)'s events as llama-server's /infill chunks: the pieces, then the final answer."""

    def __init__(self, chunks: Any, run: InfillRun):
        self._run = run
        super().__init__(chunks)

    def _map(self) -> Iterator[dict[str, Any]]:
        run, reason, n = self._run, "stop", 0
        for event in self._chunks:
            if event.text:
                n += 1
                out = run.take(event.text)
                if out and run.body.stream:
                    yield run.piece(out, n)
            if event.finish_reason is not None:
                reason = event.finish_reason
        if self._chunks.cancelled:
            return
        yield run.final(reason, self.result, "" if run.body.stream else run.text)


def _last(stream: InfillStream) -> Optional[dict[str, Any]]:
    """A non-streamed request: the final answer (the stream yields nothing else then), read to its end so that
    the completion finishes rather than being cancelled."""
    final = None
    try:
        for final in stream:
            pass
    except BaseException:
        stream.close()
        raise
    return final


@router.post("/infill", summary="Fill-in-the-middle (llama-server's)", tags=["llama-server"],
             responses={200: {"description": "The completion, or with stream=true its pieces as server-sent events "
                                             "(`data: {piece}` lines, the last with stop=true and the totals)",
                              "content": {"text/event-stream": {"schema": {
                                  "type": "object", "required": ["data"],
                                  "properties": {"data": {"type": "string"}}}}}}})
async def infill(request: Request, body: InfillRequest) -> Any:
    served = registry_of(request).get(body.model)
    note_ignored(request, body)
    llama, settings = served.llama, served.settings
    try:
        tokens = llama.infill_tokens(body.input_prefix, body.input_suffix, prompt=body.prompt,
                                     extra=[chunk.model_dump() for chunk in body.input_extra], spm=settings.spm_infill,
                                     limits=fim.Limits(settings.n_batch, llama.n_ctx()))
    except ValueError as e:
        raise bad_request("model", f"{served.alias!r} cannot fill in the middle: "
                                   f"{str(e).removeprefix('suffix: ')}", code="not_supported") from None
    max_tokens = capped_max_tokens(request, body.n_predict if body.n_predict > 0 else
                             1 if body.n_predict == 0 else None, "n_predict")
    halt = _Halt(llama.token_eos())
    kwargs: dict[str, Any] = {
        "prompt": tokens, "max_tokens": max_tokens, "stream": True, "model": served.alias, "stop": body.stop,
        "temperature": body.temperature, "top_k": body.top_k, "top_p": body.top_p, "min_p": body.min_p,
        "typical_p": body.typical_p, "repeat_penalty": body.repeat_penalty, "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty, "mirostat_mode": body.mirostat,
        "mirostat_tau": body.mirostat_tau, "mirostat_eta": body.mirostat_eta}
    if body.seed is not None:
        kwargs["seed"] = body.seed % 2**32
    if body.grammar is not None:
        try:
            kwargs["grammar"] = LlamaGrammar.from_string(body.grammar, verbose=False)
        except (ValueError, TypeError) as e:
            raise bad_request("grammar", str(e).removeprefix("grammar: ")) from None
    if body.n_indent > 0 or body.t_max_predict_ms > 0:
        kwargs["logits_processor"] = LogitsProcessorList([halt])
    prompt = llama.detokenize(tokens, special=True).decode("utf-8", errors="replace")

    def detokenize(ids: list[int]) -> str:
        return llama.detokenize(ids).decode("utf-8", errors="ignore")

    def run(**kw: Any) -> InfillStream:
        return InfillStream(llama.complete(**kw), InfillRun(body, served.alias, prompt, len(tokens), halt, detokenize))

    if body.stream:
        return await generate(request, served, body, run, kwargs, done=False,
                              event=lambda item: {"data": json.dumps(item)})
    return await generate(request, served, body, lambda **kw: _last(run(**kw)), kwargs)
