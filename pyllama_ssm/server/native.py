"""llama-server's own API beside the OpenAI one: `POST /completion` (and `/completions`), `/tokenize`,
`/detokenize` and `/apply-template`, for clients written against llama-server rather than OpenAI
(scripts, benchmarks, editor plugins), and the answer format its `/infill` (infill.py) shares.

/completion takes llama-server's prompt forms: a string; token ids; ids and strings mixed (one prompt,
a string tokenized with BOS only when it comes first); or a list of such prompts, answered as a JSON
array in their order (not streamed).  Special tokens written in the text are parsed, as llama-server
does.  The answer is llama-server's: content, tokens_predicted, tokens_evaluated, tokens_cached,
stop_type ("eos", "word", "limit"), stopping_word, prompt (special tokens written out),
generation_settings and timings; with `stream` its pieces as `data:` events, the last with
`"stop": true` and the totals (no `[DONE]`).  `response_fields` picks fields by path
("timings/prompt_n"); `n_indent` and `t_max_predict_ms` end a completion as llama-server does: at a
new line indented less than n_indent, or at a new line once generating took longer than
t_max_predict_ms.  `logit_bias` takes llama-server's pairs ([[id or text, bias or false], ...]) or
OpenAI's object; `ignore_eos` rules out every end-of-generation token (EOS, <|im_end|>,
<|endoftext|>, ...), as llama-server does.  `n_probs` (or `logprobs`) > 0 adds llama-server's
completion_probabilities: per generated token (the end-of-generation token that ended it included, a stop
string's tokens not) its id, the text sent with it, its bytes and logprob under the model, and the n_probs
most likely tokens'; streamed, each token's piece carries its own.  `post_sampling_probs` (the
probabilities after the sampling chain) is refused: these are the model's.

/tokenize and /detokenize use llama-server's names (content, tokens, add_special, parse_special,
with_pieces: a piece that is not whole UTF-8 comes as its bytes); /apply-template renders OpenAI
messages with the model's chat template, as /v1/chat/completions does, and answers {"prompt": ...}.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import math
import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Optional, Union

import anyio
import numpy as np
from fastapi import APIRouter, Request
from pydantic import BeforeValidator, Field

from ..chat_templates import TEMPLATE_REFUSED
from ..limits import FLOAT_MAX, INT32_MAX
from ..limits import field as limit
from ..llama import LlamaGrammar, LogitsProcessorList
from ..results import CompletionResult, TokenProbs, Usage
from .chat import MappedStream
from .errors import ERROR_RESPONSES, ApiError, bad_request
from .generation import capped_max_tokens, check_tokens, generate, note_ignored, registry_of
from .schemas import ChatMessage, RequestBody, TokenId, ignored_field

router = APIRouter(responses=ERROR_RESPONSES)
STREAMED = {200: {"description": "The completion, or with stream=true its pieces as server-sent events (`data: "
                                 "{piece}` lines, the last with stop=true and the totals)",
                  "content": {"text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                                               "properties": {"data": {"type": "string"}}}}}}}


class NativeRequest(RequestBody):
    """The generation fields of llama-server's own completion requests (/completion, /infill)."""

    model: Optional[str] = Field(default=None, description="The alias of a configured model (a server of one model "
                                                          "answers under any name).")
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
    return_tokens: bool = Field(default=False, description="The generated token ids in the final answer's "
                                                           "`tokens` (streamed, each piece lists its own).")
    n_probs: int = Field(default=0, **limit("n_probs"), description="Report each generated token's logprob and the "
                         "n_probs most likely tokens' (the model's, before sampling): completion_probabilities.")
    logprobs: Optional[int] = Field(default=None, **limit("n_probs"), description="n_probs' other name, used when "
                                                                                     "n_probs is not sent.")
    post_sampling_probs: bool = Field(default=False, description="Not supported with n_probs > 0 (the "
                                                                 "probabilities after the sampling chain).")
    response_fields: Optional[list[str]] = Field(default=None, description="Only these fields, by path "
                                                                           "(\"timings/prompt_n\").")
    # sent by llama-server's clients; nothing to do here (every sequence keeps its prompt's cache)
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


class NativeRun:
    """One completion of llama-server's API (/completion, /infill): its pieces as llama-server's chunks, the early stops, and the final answer."""

    def __init__(self, body: "NativeRequest", alias: str, prompt: str, n_prompt: int, halt: _Halt, llama: Any,
                 index: int = 0):
        self.body, self.alias, self.prompt, self.n_prompt, self.index = body, alias, prompt, n_prompt, index
        self.halt, self.llama = halt, llama
        self.probs: list[dict[str, Any]] = []  # completion_probabilities so far
        self.ids: list[int] = []  # streamed: generated tokens not yet sent with a piece
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

    def piece(self, content: str, n_predicted: int, probs: list[dict[str, Any]]) -> dict[str, Any]:
        """A streamed piece, with the tokens generated since the previous one (llama-server sends a piece per
        token, its text empty while held back; ours come with the next piece sent)."""
        tokens, self.ids = self.ids, []
        out = {"index": self.index, "content": content, "tokens": tokens, "stop": False, "id_slot": -1,
               "tokens_predicted": n_predicted, "tokens_evaluated": self.n_prompt}
        if probs:
            out["completion_probabilities"] = probs
        return out

    def score(self, probs: tuple[TokenProbs, ...], sent: str) -> list[dict[str, Any]]:
        """llama-server's completion_probabilities entries of these tokens (the first sent `sent` out)."""
        entries = []
        for k, p in enumerate(probs):
            text = sent.encode("utf-8") if k == 0 else b""
            entries.append(_entry(p.token, text, p.logprob) |
                           {"top_logprobs": [_entry(t, self.llama.detokenize([t]), lp) for t, lp in p.top]})
        self.probs += entries
        return entries

    def final(self, finish_reason: str, result: Optional[CompletionResult], content: str) -> dict[str, Any]:
        t_end = time.perf_counter()
        t_first = self.t_first or t_end
        counted = result.usage if result is not None else Usage(self.n_prompt, 0)
        # llama-server lists and counts the end-of-generation token that ended it (not after an early stop)
        end = [result.end_token] if result is not None and result.end_token is not None and not self.early else []
        tokens = list(result.tokens) + end if result is not None else []
        cached = min(counted.cached_tokens, counted.prompt_tokens)
        n_gen = counted.completion_tokens + len(end)
        stop_type, word = "limit", ""
        if finish_reason == "stop" and not self.early:
            full = self.llama.detokenize(tokens).decode("utf-8", errors="ignore")
            found = [(full.find(s), s) for s in self.body.stop if s and s in full]
            stop_type, word = ("word", min(found)[1]) if found else ("eos", "")
        prompt_ms, predicted_ms = (t_first - self.t_start) * 1000, (t_end - t_first) * 1000
        n_prompt = counted.prompt_tokens - cached
        b = self.body
        answer = {
            # streamed, the pieces carried the tokens (llama-server's last chunk has none)
            "index": self.index, "content": content, "tokens": tokens if b.return_tokens and not b.stream else [],
            "id_slot": -1,
            "stop": True, "model": self.alias, "tokens_predicted": n_gen, "tokens_evaluated": counted.prompt_tokens,
            "generation_settings": {
                "n_predict": b.n_predict, "seed": b.seed if b.seed is not None else -1, "temperature": b.temperature,
                "top_k": b.top_k, "top_p": b.top_p, "min_p": b.min_p, "typical_p": b.typical_p,
                "repeat_penalty": b.repeat_penalty, "presence_penalty": b.presence_penalty,
                "frequency_penalty": b.frequency_penalty, "mirostat": b.mirostat, "mirostat_tau": b.mirostat_tau,
                "mirostat_eta": b.mirostat_eta, "stop": b.stop, "n_indent": b.n_indent,
                "t_max_predict_ms": b.t_max_predict_ms, "stream": b.stream, "grammar": b.grammar or ""},
            "prompt": self.prompt, "has_new_line": "\n" in self.text, "truncated": False, "stop_type": stop_type,
            "stopping_word": word, "tokens_cached": counted.prompt_tokens + counted.completion_tokens,
            "timings": {"cache_n": cached, "prompt_n": n_prompt, "prompt_ms": prompt_ms,
                        "prompt_per_token_ms": prompt_ms / n_prompt if n_prompt else 0.0,
                        "prompt_per_second": n_prompt / prompt_ms * 1000 if prompt_ms > 0 else 0.0,
                        "predicted_n": n_gen, "predicted_ms": predicted_ms,
                        "predicted_per_token_ms": predicted_ms / n_gen if n_gen else 0.0,
                        "predicted_per_second": n_gen / predicted_ms * 1000 if predicted_ms > 0 else 0.0}}
        if self.probs and not b.stream:  # less a stop string's tokens, as llama-server counts them
            cut = len(self.llama.tokenize(word.encode("utf-8"), add_bos=False, special=False)) if word else 0
            answer["completion_probabilities"] = self.probs[:len(self.probs) - min(cut, len(self.probs))]
        return answer if b.response_fields is None else _fields(answer, b.response_fields)


def _entry(token: int, piece: bytes, logprob: float) -> dict[str, Any]:
    """One token of llama-server's completion_probabilities: its text cut before a character its bytes do not
    finish (an incremental decoder holds those back), the bytes whole, the logprob at least the lowest float
    (JSON has no -inf)."""
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(piece)
    return {"id": token, "token": text, "bytes": list(piece), "logprob": max(logprob, -FLOAT_MAX)}


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


class NativeStream(MappedStream):
    """Llama.complete(stream=True)'s events as llama-server's chunks: the pieces, then the final answer."""

    def __init__(self, chunks: Any, run: NativeRun):
        self._run = run
        super().__init__(chunks)

    def _map(self) -> Iterator[dict[str, Any]]:
        run, reason, n = self._run, "stop", 0
        for event in self._chunks:
            early = run.early
            out = run.take(event.text) if event.text else ""
            probs = run.score(event.probs, out) if event.probs and not early else []
            if not early:
                run.ids += event.tokens
                n += len(event.tokens)
            if (out or probs or (run.ids and event.result is not None)) and run.body.stream:
                yield run.piece(out, n, probs)
            if event.finish_reason is not None:
                reason = event.finish_reason
        if self._chunks.cancelled:
            return
        yield run.final(reason, self.result, "" if run.body.stream else run.text)


def _last(stream: NativeStream) -> Optional[dict[str, Any]]:
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


async def complete_native(request: Request, served: Any, body: NativeRequest, tokens: list[int], index: int = 0,
                          logit_bias: Optional[dict[int, float]] = None) -> Any:
    """One completion of tokens answered as llama-server answers (/completion, /infill): the final answer, or
    with body.stream its pieces as server-sent events."""
    llama = served.llama
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
    if logit_bias:
        kwargs["logit_bias"] = logit_bias
    if body.grammar is not None:
        try:
            kwargs["grammar"] = LlamaGrammar.from_string(body.grammar, verbose=False)
        except (ValueError, TypeError) as e:
            raise bad_request("grammar", str(e).removeprefix("grammar: ")) from None
    if body.n_indent > 0 or body.t_max_predict_ms > 0:
        kwargs["logits_processor"] = LogitsProcessorList([halt])
    n_probs = body.n_probs if "n_probs" in body.model_fields_set or body.logprobs is None else body.logprobs
    if n_probs > 0:
        if body.post_sampling_probs:
            raise bad_request("post_sampling_probs", "not supported: n_probs reports the model's probabilities, "
                                                     "before the sampling chain (send it without post_sampling_probs)")
        kwargs["logprobs"] = min(n_probs, llama.n_vocab())  # as llama-server, at most the vocabulary
    prompt = llama.detokenize(tokens, special=True).decode("utf-8", errors="replace")

    def run(**kw: Any) -> NativeStream:
        return NativeStream(llama.complete(**kw), NativeRun(body, served.alias, prompt, len(tokens), halt, llama,
                                                            index))

    if body.stream:
        return await generate(request, served, body, run, kwargs, done=False,
                              event=lambda item: {"data": json.dumps(item)})
    return await generate(request, served, body, lambda **kw: _last(run(**kw)), kwargs)


# -- /completion ------------------------------------------------------------------------------------

Mixed = Annotated[list[Union[TokenId, str]], Field(min_length=1)]  # token ids and texts, one prompt
# [token id or text, bias or false]: a JSON array, a tuple in the schema (strict mode takes no list for one)
Bias = Annotated[float, Field(**limit("logit_bias"))]
BiasPair = Annotated[tuple[Union[TokenId, str], Union[Bias, Literal[False]]],
                     BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)]


class CompletionRequest(NativeRequest):
    prompt: Union[str, Mixed, Annotated[list[Union[str, Mixed]], Field(min_length=1)]] = Field(
        description="A string, token ids, ids and strings mixed, or a list of such prompts (answered as a list).")
    logit_bias: Optional[Union[list[BiasPair], dict[str, Bias]]] = \
        Field(default=None, description="[[token id or text, bias or false], ...] or {\"token id\": bias}: added "
                                        "to the logits (false: never).")
    ignore_eos: bool = Field(default=False, description="Never end at an end-of-generation token.")


def _is_token(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _mixed(llama: Any, parts: list[Union[int, str]], param: str, add_special: bool = True,
           parse_special: bool = True) -> list[int]:
    """llama-server's tokenize_mixed: ids as they are (checked against the vocabulary), texts tokenized, BOS
    (add_special) before the first element when it is a text."""
    out: list[int] = []
    for k, part in enumerate(parts):
        if _is_token(part):
            out.append(part)
        else:
            out += llama.tokenize(part.encode("utf-8"), add_bos=add_special and k == 0, special=parse_special)
    check_tokens(param, out, llama.n_vocab())
    return out


def prompts_of(llama: Any, prompt: Union[str, list[Any]]) -> list[list[int]]:
    """The token lists of /completion's prompt forms (see the module's note)."""
    if isinstance(prompt, str):
        prompts = [_mixed(llama, [prompt], "prompt")]
    elif any(_is_token(x) for x in prompt):
        prompts = [_mixed(llama, prompt, "prompt")]  # one prompt of ids, or of ids and strings
    else:  # several: strings, or lists of ids and strings
        prompts = [_mixed(llama, [p] if isinstance(p, str) else p, f"prompt[{k}]") for k, p in enumerate(prompt)]
    if not all(prompts):
        raise bad_request("prompt", "empty: nothing to complete")
    return prompts


def logit_bias_of(llama: Any, body: CompletionRequest) -> dict[int, float]:
    """llama-server's logit_bias forms as {token id: bias}: pairs of a token id or a text (each of its tokens)
    and a bias or false (never), or {"token id": bias}; and ignore_eos as -inf for every end-of-generation
    token (llama-server's logit_bias_eog), whatever else biased them."""
    bias: dict[int, float] = {}
    if isinstance(body.logit_bias, dict):
        for key, value in body.logit_bias.items():
            if not (key.isdigit() and str(int(key)) == key):
                raise bad_request("logit_bias", f"key {key!r}: expected a token id (texts go in [[text, bias]] pairs)")
            bias[int(key)] = value
    for key, value in body.logit_bias if isinstance(body.logit_bias, list) else ():
        ids = [key] if _is_token(key) else llama.tokenize(key.encode("utf-8"), add_bos=False, special=False)
        for t in ids:
            bias[t] = -math.inf if value is False else float(value)
    check_tokens("logit_bias", list(bias), llama.n_vocab())
    if body.ignore_eos:
        bias.update((t, -math.inf) for t in llama.tokenizer().eog_tokens())
    return bias


@router.post("/completion", summary="Completion (llama-server's)", tags=["llama-server"], responses=STREAMED)
@router.post("/completions", summary="Completion (llama-server's)", tags=["llama-server"], responses=STREAMED,
             include_in_schema=False)
async def completion(request: Request, body: CompletionRequest) -> Any:
    served = registry_of(request).get(body.model)
    note_ignored(request, body)
    llama = served.llama
    prompts = await anyio.to_thread.run_sync(prompts_of, llama, body.prompt)
    bias = logit_bias_of(llama, body)
    if len(prompts) == 1:
        return await complete_native(request, served, body, prompts[0], logit_bias=bias)
    if body.stream:
        raise bad_request("stream", f"{len(prompts)} prompts: streaming answers one prompt at a time")
    return list(await asyncio.gather(*(complete_native(request, served, body, tokens, k, bias)
                                       for k, tokens in enumerate(prompts))))


# -- /tokenize, /detokenize, /apply-template --------------------------------------------------------

class TokenizeRequest(RequestBody):
    model: Optional[str] = Field(default=None)
    content: Union[str, list[Union[TokenId, str]]] = Field(description="A text, or token ids and texts mixed.")
    add_special: bool = Field(default=False, description="Add the model's BOS token (and its other special "
                                                         "tokens), as a prompt gets them.")
    parse_special: bool = Field(default=True, description="Special tokens written in the text are those tokens.")
    with_pieces: bool = Field(default=False, description="Each token as {id, piece}: its text, or its bytes when "
                                                         "they are not whole UTF-8.")


class DetokenizeRequest(RequestBody):
    model: Optional[str] = Field(default=None)
    tokens: list[TokenId] = Field(default_factory=list, description="The token ids to turn into text.")


class ApplyTemplateRequest(RequestBody):
    model: Optional[str] = Field(default=None)
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation, as for /v1/chat/completions.")
    tools: Optional[list[dict[str, Any]]] = None


def _piece(llama: Any, token: int) -> Union[str, list[int]]:
    piece = llama.detokenize([token], special=True)
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)


@router.post("/tokenize", summary="Tokenize (llama-server's)", tags=["llama-server"])
async def tokenize(request: Request, body: TokenizeRequest) -> dict[str, Any]:
    llama = registry_of(request).get(body.model).llama
    note_ignored(request, body)

    def work() -> dict[str, Any]:
        parts = [body.content] if isinstance(body.content, str) else body.content
        tokens = _mixed(llama, parts, "content", body.add_special, body.parse_special)
        if not body.with_pieces:
            return {"tokens": tokens}
        return {"tokens": [{"id": t, "piece": _piece(llama, t)} for t in tokens]}

    return await anyio.to_thread.run_sync(work)


@router.post("/detokenize", summary="Detokenize (llama-server's)", tags=["llama-server"])
async def detokenize(request: Request, body: DetokenizeRequest) -> dict[str, str]:
    llama = registry_of(request).get(body.model).llama
    note_ignored(request, body)
    check_tokens("tokens", body.tokens, llama.n_vocab())
    # each token's piece, special tokens written out, as llama-server's tokens_to_str (no space dropped after BOS)
    text = await anyio.to_thread.run_sync(lambda: b"".join(llama.detokenize([t], special=True) for t in body.tokens))
    return {"content": text.decode("utf-8", errors="replace")}


@router.post("/apply-template", summary="A conversation as the prompt its chat template makes (llama-server's)",
             tags=["llama-server"])
async def apply_template(request: Request, body: ApplyTemplateRequest) -> dict[str, str]:
    served = registry_of(request).get(body.model)
    note_ignored(request, body)
    if served.chat is None:
        raise bad_request("model", f"{served.alias!r} has no Jinja chat template (a named --chat_format): "
                                   f"/apply-template renders the model's own template")
    messages = [m.model_dump(exclude_unset=True) for m in body.messages]
    try:
        prompt = await anyio.to_thread.run_sync(served.chat.render, messages, body.tools)
    except ApiError:
        raise
    except Exception as e:  # noqa: BLE001 - the template refuses this conversation
        raise bad_request("messages", f"{TEMPLATE_REFUSED} ({type(e).__name__}: {e})") from None
    return {"prompt": prompt}
