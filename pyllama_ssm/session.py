"""The single sequence of an n_parallel=1 Llama: llama-cpp-python's low-level API, in an object of its own.

What stock's Llama exposes for one sequence lives here: eval, sample, generate, n_tokens, input_ids,
scores, reset, save_state/load_state, the prefix reuse between calls and the cache of states
(set_cache), and llama-cpp-python's completion loop over them, so that the same calls give the same
tokens and chunks as stock.  Llama delegates to it (Llama.session) and keeps only the facade.

The Session owns the n_parallel=1 context (the Llama makes it, with the batch that stock's multimodal
handlers reach as Llama._batch), driven on the caller's thread one call at a time as in
llama-cpp-python; threads that share it anyway take turns per call (`lock`).

A completion is a request to an Engine, as with n_parallel > 1: an inline Engine of one sequence on this
context (no thread: the caller's runs its steps as it reads the tokens, since stock's handlers call
llama.cpp on Llama._ctx from that thread between calls).  Its request continues from what the sequence
holds (the prefix reuse below) and leaves its memory there, the logits of every position in scores with
logits_all, stock's stopping criteria asked after each sample (engine.request.Continuation).  So a
completion's tokens come from the one runtime (scheduler, runner, sampler, drafts); this module shapes
them as stock's loop does (output.TextStream, policy STOCK; completion.CompletionRequest's results).
The low-level generate() keeps stock's own loop over eval() and sample(), which callers drive token by
token (send() appends tokens); its rejected drafts are undone by engine.speculative's rewind().
An n_parallel>1 Llama has no Session: its Engine serves every completion.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import numpy as np
import numpy.typing as npt

from .batch import Batch
from .bindings import ffi, lib
from .completion import CompletionRequest
from .context import Context
from .engine import Engine
from .engine.request import Continuation
from .engine.speculative import rewind, snapshot_or_none
from .llama_cache import LlamaState, longest_token_prefix
from .model import Model
from .output import STOCK, TextStream, log_softmax, top_logprobs
from .results import TokenProbs
from .sampling import Sampler, SamplingParams


def state_property(name: str, doc: str, settable: bool = True) -> property:
    """A Llama attribute that is its Session's (n_parallel=1 only; stock's multimodal handlers set some)."""
    def get(self):
        if self._session is None:
            raise AttributeError(f"{name}: the single-sequence state needs n_parallel=1")
        return getattr(self._session, name)
    return property(get, (lambda self, value: setattr(self._single(name), name, value)) if settable else None, doc=doc)


class Session:
    """One sequence of one context, driven as llama-cpp-python drives its own."""

    def __init__(self, model: Model, ctx: Context, batch: Batch, *, n_batch: int, logits_all: bool,
                 score_rows: int, draft_model: Any = None, draft_snapshots: bool = False,
                 engine: Optional[Engine] = None, say: Callable[[str], None] = lambda message: None):
        self.model, self.ctx, self.batch = model, ctx, batch
        self.engine = engine  # inline, on ctx: what runs completions (None: a vocabulary only)
        self.n_ctx, self.n_vocab, self.n_batch = ctx.n_ctx, model.n_vocab, n_batch
        self.logits_all = logits_all  # every position's logits kept in scores (stock's logits_all, or drafts)
        self.draft_model = draft_model
        self.draft_snapshots = draft_snapshots  # a rejected draft on recurrent memory: undone from a snapshot
        self.stateful = model.is_recurrent or model.is_hybrid
        self.say = say
        self.lock = threading.RLock()
        self.generating: Optional[int] = None  # the thread whose generation holds the lock
        self.sampler: Optional[Sampler] = None  # the running generate()'s, which sample() uses
        self.reused = 0  # prompt tokens the last generation found evaluated (usage's cached_tokens)
        self.cache = None  # a BaseLlamaCache (set_cache)
        self.n_tokens = 0
        self.requires_eval = True  # restored or truncated state must decode before sampling
        # sized to the context llama.cpp made (flash attention pads n_ctx to 256), not the one asked for
        self.input_ids: npt.NDArray[np.intc] = np.zeros((self.n_ctx,), dtype=np.intc)
        self.scores: npt.NDArray[np.single] = np.zeros((score_rows, self.n_vocab), dtype=np.single)

    def close(self) -> None:
        """Close its Engine (the context and batch are the Llama's)."""
        if self.engine is not None:
            self.engine.close()

    @property
    def evaluated(self) -> npt.NDArray[np.intc]:
        return self.input_ids[: self.n_tokens]

    @property
    def evaluated_scores(self) -> npt.NDArray[np.single]:
        return self.scores[: self.n_tokens, :]

    @property
    def eval_tokens(self) -> deque[int]:
        return deque(self.evaluated.tolist(), maxlen=self.n_ctx)

    @property
    def eval_logits(self) -> deque[list[float]]:
        return deque(self.evaluated_scores.tolist(), maxlen=self.n_ctx if self.logits_all else 1)

    def set_cache(self, cache) -> None:
        """Save states after completions and resume from the longest cached prefix (None: no cache)."""
        # ours or llama_cpp.llama_cache's (stock's, under install_as_llama_cpp()): a mapping from
        # token sequences to LlamaStates, looked up by longest prefix
        if cache is not None and not all(hasattr(cache, m) for m in ("__getitem__", "__setitem__", "__contains__",
                                                                     "cache_size")):
            raise TypeError(f"set_cache: expected a LlamaRAMCache or LlamaDiskCache, got {type(cache).__name__}")
        self.cache = cache

    # -- the low-level calls -----------------------------------------------------------------
    def reset(self) -> None:
        """Forget the evaluated tokens (recurrent memory cannot be truncated, so it is cleared)."""
        with self.lock:
            self.n_tokens = 0
            self.requires_eval = True
            if self.stateful:
                self.ctx.clear(True)

    def eval(self, tokens: Sequence[int]) -> None:
        """Decode tokens after the n_tokens already evaluated."""
        with self.lock:
            tokens = [self.model.check_token(int(t)) for t in tokens]
            if self.n_tokens + len(tokens) > self.n_ctx:
                raise ValueError(f"eval: {self.n_tokens} + {len(tokens)} tokens exceed the context window of "
                                 f"{self.n_ctx}")
            ctx, batch = self.ctx, self.batch
            ctx.seq_rm(0, self.n_tokens, -1)
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start:start + self.n_batch]
                n_past, n = self.n_tokens, len(chunk)
                batch.clear()
                for k, tok in enumerate(chunk):
                    batch.add(tok, n_past + k, 0, logits=self.logits_all or k == n - 1)
                ctx.decode(batch)
                self.input_ids[n_past:n_past + n] = chunk
                if self.logits_all:
                    rows = ffi.buffer(lib.llama_get_logits(ctx.ptr), n * self.n_vocab * 4)
                    self.scores[n_past:n_past + n, :] = np.frombuffer(rows, np.single).reshape(n, self.n_vocab)
                self.n_tokens += n
                self.requires_eval = False

    def sample(self, idx: Optional[int], params: Callable[[], SamplingParams]) -> int:
        """A token from the logits of evaluated position idx (default: the last one), by the running
        generate()'s sampler, else by a one-off one from params()."""
        with self.lock:
            if self.n_tokens == 0:
                raise ValueError("sample: nothing evaluated yet (call eval first)")
            if idx is not None and not 0 <= idx < self.n_tokens:
                raise ValueError(f"sample: idx={idx} outside the {self.n_tokens} evaluated positions")
            sampler = self.sampler or Sampler(self.model, params())
            try:
                return sampler.sample(self.ctx.ptr, idx - self.n_tokens if idx is not None else -1)
            finally:
                if sampler is not self.sampler:
                    sampler.close()

    def save_state(self, seed: int) -> LlamaState:
        with self.lock:
            data = self.ctx.state()
            return LlamaState(input_ids=self.input_ids.copy(), scores=self.evaluated_scores.copy(),
                              n_tokens=self.n_tokens, llama_state=data, llama_state_size=len(data), seed=seed)

    def load_state(self, state: LlamaState) -> int:
        """Restore state; returns its seed (the Llama's to take)."""
        if not isinstance(state, LlamaState):
            raise TypeError(f"load_state: expected a LlamaState, got {type(state).__name__}")
        with self.lock:
            if state.input_ids.shape != self.input_ids.shape or state.scores.shape[1:] != (self.n_vocab,):
                raise ValueError(f"load_state: the state is from a context of {state.input_ids.shape[0]} tokens "
                                 f"and {state.scores.shape[1:]} logits, this one has {self.n_ctx} and {self.n_vocab}")
            self.ctx.set_state(state.llama_state)
            self.scores[: len(state.scores), :] = state.scores
            self.scores[len(state.scores):, :] = 0.0
            self.input_ids = state.input_ids.copy()
            self.n_tokens = state.n_tokens
            self.requires_eval = True
            return state.seed

    # -- generation ----------------------------------------------------------------------------
    def generate(self, tokens: Sequence[int], params: SamplingParams, reset: bool = True,
                 stopping_criteria=None) -> Iterator[int]:
        """Tokens generated after `tokens`; send() a list of tokens to append them to the sequence.
        With reset=True the longest prefix shared with the evaluated tokens is kept when the memory can
        be truncated there (recurrent memory cannot: it is re-evaluated)."""
        sampler = Sampler(self.model, params)  # sample() uses it while this generator runs
        try:
            # a generation owns the sequence until it ends: other threads wait their turn
            if self.generating == threading.get_ident():
                raise RuntimeError("a generation of this Llama is still open on this thread (finish or close its "
                                   "stream first; n_parallel > 1 serves several at once)")
            with self.lock:
                self.generating = threading.get_ident()
                try:
                    yield from self._generate(sampler, list(tokens), reset, stopping_criteria)
                finally:
                    self.generating = None
        finally:
            if self.sampler is sampler:
                self.sampler = None
            sampler.close()

    def _reuse(self, tokens: list[int]) -> tuple[int, bool]:
        """Keep the longest prefix of tokens that the memory holds and can be cut after (recurrent memory
        cannot: it is cleared), forget the rest: (how many tokens it kept, whether those are all of tokens
        and their last logits are live, to sample from at once)."""
        if self.n_tokens > 0:
            longest = longest_token_prefix(self.evaluated.tolist(), tokens)
            consumed = longest == len(tokens)
            if consumed and self.n_tokens == len(tokens) and not self.requires_eval:
                self.reused = longest
                self.say("generate: full prompt already evaluated")
                return longest, True
            reuse = longest - 1 if consumed else longest  # with nothing left to decode, one token replays
            if reuse > 0 and self.ctx.seq_rm(0, reuse, -1):
                self.reused = self.n_tokens = reuse
                self.requires_eval = True
                self.say(f"generate: {reuse} prefix tokens reused, {len(tokens) - reuse} to evaluate")
                return reuse, False
        self.reset()
        self.reused = 0
        return 0, False

    def _generate(self, sampler: Sampler, tokens: list[int], reset: bool, stopping_criteria) -> Iterator[int]:
        if reset:
            kept, live = self._reuse(tokens)
            tokens = [] if live else tokens[kept:]
        sample_idx = self.n_tokens + len(tokens) - 1
        drafted = False
        while True:
            undo = self._undo_point() if drafted else None
            try:
                self.eval(tokens)
                while sample_idx < self.n_tokens:
                    self.sampler = sampler
                    token = self.sample(sample_idx, lambda: sampler.params)
                    sample_idx += 1
                    if stopping_criteria is not None and stopping_criteria(
                            self.input_ids[:sample_idx], self.scores[sample_idx - self.n_tokens, :]):
                        return
                    sent = yield token
                    tokens = [token] + list(sent or [])
                    if sample_idx < self.n_tokens and token != self.input_ids[sample_idx]:
                        # a rejected draft, or the caller diverged from what is evaluated: cut there
                        tokens = self._truncate(sample_idx, undo) + tokens
                        break
            finally:
                if undo is not None and undo[1] is not None:
                    self.ctx.release(undo[1])
            drafted = False
            if self.draft_model is not None:  # proposed tokens are evaluated (and verified) with the next
                room = self.n_ctx - self.n_tokens - len(tokens)
                ids = np.concatenate([self.evaluated, np.asarray(tokens, dtype=np.intc)])
                draft = [int(t) for t in np.asarray(self.draft_model(ids)).ravel()[:max(room, 0)]]
                tokens, drafted = tokens + draft, bool(draft)

    def _undo_point(self) -> Optional[tuple[int, Optional[int]]]:
        """Where a rejected draft goes back to: (n_tokens, a snapshot of the recurrent state, or None for
        attention-only memory, whose tail is simply removed); None when it cannot be had (the upstream
        build, or the pool's one cell taken): the sequence is then replayed from the start."""
        if not self.stateful:
            return self.n_tokens, None
        snapshot = snapshot_or_none(self.ctx, 0) if self.draft_snapshots else None
        return (self.n_tokens, snapshot) if snapshot is not None else None

    def _truncate(self, n: int, undo: Optional[tuple[int, Optional[int]]]) -> list[int]:
        """Keep the first n evaluated tokens; returns those that must be evaluated again first."""
        self.requires_eval = True
        start = rewind(self.ctx, 0, n, *(undo or (0, None)))
        if start is None:  # recurrent memory and no snapshot: replayed from the start
            self.ctx.clear(True)
            start = 0
        replay = self.input_ids[start:n].tolist()
        self.n_tokens = start
        return replay

    # -- llama-cpp-python's completion loop ---------------------------------------------------------
    def complete(self, llama, r: CompletionRequest, params: SamplingParams, stopping_criteria) -> Iterator[Any]:
        """llama-cpp-python's completion loop on the single sequence, token for token: a CompletionResult, or
        CompletionEvents when streamed.  The cache goes through llama.load_state and llama.save_state, as
        stock's does."""
        if self.cache is not None:
            self._resume_from_cache(llama, r.prompt_tokens)
        model, detokenize = self.model, r.detokenize
        completion: list[int] = [] if len(r.prompt) > 0 else [r.bos]
        stream = TextStream(r.stop, policy=STOCK)  # the text, detokenized whole at each token as stock does
        echo = r.stream and r.echo  # streamed echo: the prompt's chunk comes once the prompt is evaluated
        finish_reason, end = "length", None
        tokens = self._completion_tokens(r.prompt_tokens, params, stopping_criteria)
        with contextlib.closing(tokens):  # its request ends (the memory kept) before the state is read below
            for token in tokens:
                if r.cancellation.is_set:
                    return
                if echo:
                    echo = False
                    yield r.event(r.echo_text, self._logprobs(r, []) if r.logprobs is not None else None)
                if model.is_eog(token):
                    stream.finish(detokenize(completion, prev_tokens=r.prompt_tokens))
                    finish_reason, end = "stop", token
                    break
                completion.append(token)
                # stock skips a token whose text ends inside a multi-byte character (the max_tokens check too),
                # but not past the context: the next token would have no logits row (nor a cell)
                if not stream.update(detokenize(completion, prev_tokens=r.prompt_tokens),
                                     can_wait=len(r.prompt_tokens) + len(completion) < self.n_ctx):
                    continue
                if stream.stopped:
                    finish_reason = "stop"
                    break
                if r.stream:
                    yield from self._stream(r, completion, stream)
                if len(completion) >= r.max_tokens:
                    stream.finish()
                    break
            else:  # the generation ended itself (a stopping criterion): stock's text is empty but for the check below
                stream.finish(b"")
        if stopping_criteria is not None and stopping_criteria(self.evaluated, self.evaluated_scores[-1, :]):
            stream.finish(detokenize(completion, prev_tokens=r.prompt_tokens))
            finish_reason = "stop"
        if echo:  # stopped before its first token
            yield r.event(r.echo_text)
        if r.stream:
            yield from self._stream(r, completion, stream)
            end_probs = () if end is None or r.logprobs is None else \
                (self._token_probs(r, len(r.prompt_tokens) + len(completion) - 1, end),)
            yield r.event("", result=r.result(stream.text.decode("utf-8", errors="ignore"), completion,
                                              finish_reason, self.reused, end=end), probs=end_probs,
                          tokens=(*completion[stream.tokens_sent:], *([] if end is None else [end])))
        if self.cache is not None:
            self.cache[r.prompt_tokens + completion] = llama.save_state()
        if r.stream:
            return
        text = stream.text.decode("utf-8", errors="ignore")
        yield r.result(text, completion, finish_reason, self.reused,
                       self._logprobs(r, completion, end) if r.logprobs is not None else None, end)

    def _completion_tokens(self, prompt: list[int], params: SamplingParams, stopping_criteria) -> Iterator[int]:
        """generate(prompt)'s tokens, made by the inline Engine: a request that continues from the prefix the
        memory holds (_reuse) and leaves its memory as stock's loop does, which is this object's state once
        the generator is closed.  An end-of-generation token comes last, as generate() yields it."""
        if self.engine is None:
            raise ValueError("create_completion: this Llama holds only a vocabulary (vocab_only=True)")
        if self.generating == threading.get_ident():
            raise RuntimeError("a generation of this Llama is still open on this thread (finish or close its "
                               "stream first; n_parallel > 1 serves several at once)")
        with self.lock:
            self.generating = threading.get_ident()
            req = None
            try:
                kept, live = self._reuse(prompt)
                self.ctx.seq_rm(0, kept, -1)  # attention memory past the kept prefix (reset() clears recurrent)
                self.input_ids[:len(prompt)] = prompt
                criteria = None
                if stopping_criteria is not None:  # stock asks them with the logits row its own loop indexes
                    criteria = lambda generated: bool(stopping_criteria(  # noqa: E731
                        np.asarray(prompt + generated, dtype=np.intc), self.scores[0, :]))
                req = self.engine.submit(prompt, params, max_tokens=self.n_ctx - len(prompt), continues=Continuation(
                    kept, live, on_logits=self._keep_row if self.logits_all else None, stop=criteria))
                for k, chunk in enumerate(req):
                    # what stock's loop has evaluated when it yields token k: the prompt and the k before it
                    self.n_tokens = len(prompt) + k
                    self.input_ids[self.n_tokens] = chunk.token
                    yield chunk.token
                ended = req.result()
                if ended.tokens and self.model.is_eog(ended.tokens[-1]):
                    yield ended.tokens[-1]
            finally:
                if req is not None:
                    self._settle(req, prompt)
                self.generating = None

    def _keep_row(self, position: int, logits: np.ndarray) -> None:
        if position < len(self.scores):
            self.scores[position, :] = logits

    def _settle(self, req, prompt: list[int]) -> None:
        """The request ends (closed early: cancelled, its memory kept) and this object's state becomes what
        its memory holds: stock's after its loop (the prompt and what was evaluated of the completion)."""
        if not req.done:
            req.cancel()
        with contextlib.suppress(Exception):  # its error, if any, reached the reader already
            req.result()
        ended = req._completion
        if req.error is not None or ended is None:  # its memory is gone (or undefined)
            self.n_tokens, self.requires_eval = 0, True
            self.ctx.clear(True)
            return
        fed = (prompt + ended.tokens)[:ended.n_past]
        self.input_ids[:len(fed)] = fed
        self.n_tokens = len(fed)
        # the last logits are the last fed token's unless a rejected draft was undone after them
        self.requires_eval = self.draft_model is not None

    def _resume_from_cache(self, llama, prompt_tokens: list[int]) -> None:
        try:
            state = self.cache[prompt_tokens]
        except KeyError:
            self.say("cache miss")
            return
        cached = longest_token_prefix(state.input_ids[: state.n_tokens].tolist(), prompt_tokens)
        if cached > longest_token_prefix(self.evaluated.tolist(), prompt_tokens):
            llama.load_state(state)
            self.say("cache hit")

    def _stream(self, r: CompletionRequest, completion: list[int], stream: TextStream) -> Iterator[Any]:
        """The chunks that became safe to send: text no stop string can still claim."""
        if r.logprobs is None:
            piece = stream.take()
            if piece:
                yield r.event(piece, tokens=tuple(completion[stream.tokens_sent:]))
                stream.tokens_sent = len(completion)
            return
        # with logprobs, one chunk per token (the last one cut at the end of the final text)
        for i, shown, offset in stream.by_token(completion, lambda token: r.detokenize([token])):
            token = completion[i]
            probs = self._token_probs(r, len(r.prompt_tokens) + i - 1, token)
            yield r.event(shown, r.stream_logprobs(token, len(r.prompt) + offset, probs.logprob, probs.top),
                          probs=(probs,), tokens=(token,))

    def _token_probs(self, r: CompletionRequest, row: int, token: int) -> TokenProbs:
        """token scored by the logits of evaluated position `row`, and the r.logprobs most likely there."""
        logprobs = log_softmax(self.scores[row, :])
        return TokenProbs(token, float(logprobs[token]), tuple(top_logprobs(logprobs, r.logprobs)))

    def _logprobs(self, r: CompletionRequest, completion: list[int], end: Optional[int] = None):
        """The logprobs of a finished completion, from the scores of logits_all: row j holds the logits
        after token j, so it scores token j + 1 (the last row: the end-of-generation token `end`)."""
        first = 0 if r.echo else len(r.prompt_tokens)
        base = max(first - 1, 0)  # the first row needed: no log-softmax over rows nobody reads
        rows = log_softmax(self.evaluated_scores[base:])
        tokens = r.prompt_tokens + completion + ([end] if end is not None else [])
        scored = [(None, None) if i == 0 else
                  (float(rows[i - 1 - base][tokens[i]]), top_logprobs(rows[i - 1 - base], r.logprobs))
                  for i in range(first, len(tokens))]
        return r.logprobs_of(completion, scored, end)
