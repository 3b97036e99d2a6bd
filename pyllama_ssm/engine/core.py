"""The Engine: one model, one context, N sequences served at once.

Each step packs one decode token of every running sequence plus chunks of
pending prompts (chunked prefill under the n_batch token budget) into a single
llama_decode.  Requests join and leave between steps.  Prompt prefixes are
served from the prefix cache (snapshots of the shared recurrent pool, which
for hybrids keep the prefix's attention cells shared too; for attention-only
models, spare sequence ids holding shared KV cells).  When the memory cannot
hold a step, cached prefixes are dropped first, then the newest sequence is
preempted to host memory and resumed later, bit-identical.

All llama.cpp calls happen on the engine's own thread, which owns the memory and
takes no lock while it works: submit(), cancel() and the readers post to its
inbox from any thread and never wait for a step to end. Requests stream through
sync or async iterators.

Every request taken from the inbox is owned by exactly one of pending, running
or preempted until it finishes; an exception while handling one request fails
that request only. Should the thread itself meet an exception it cannot pin on
a request, every waiting request fails at once with EngineError (its cause
attached), and so does every later one: nothing ever waits on a dead Engine.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from .. import memory as memory_mod
from ..batch import Batch
from ..bindings import has
from ..context import MAX_SEQ, Context
from ..errors import EngineError, MemoryFullError, PoolExhaustedError, StateError
from ..model import Model
from ..output import complete_text, stop_hold, token_logprobs
from ..sampling import Sampler, SamplingParams
from .prefix_cache import HolderStore, PoolStore, PrefixCache
from . import retention
from .scheduler import SeqFacts, plan_step, preemption_victim, waits_for
from .trace import Trace

log = logging.getLogger("pyllama_ssm.engine")
DRAFT_MAX = 16  # draft tokens verified per sequence and step, at most


@dataclass(frozen=True)
class Chunk:
    """One generated token and the text it completes (may be empty while a stop string is possible)."""

    token: int
    text: str
    logprob: float | None = None                   # log-probability of token (when requested)
    top_logprobs: dict[int, float] | None = None   # the most likely alternatives


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


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


@dataclass
class _Generation:
    """What the Engine has made of one request so far: its own, written on its thread only; the caller
    sees it as the Completion handed over when the request ends (and the prompt's logprobs, handed over
    once its prefill ends)."""

    usage: Usage
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    restored_from: tuple[int, ...] | None = None
    preemptions: int = 0

    @classmethod
    def of(cls, req: "Request") -> "_Generation":
        scored = [None] * len(req.prompt) if req.score_prompt else None
        return cls(Usage(prompt_tokens=len(req.prompt)), logprobs=[] if req.n_logprobs is not None else None,
                   top_logprobs=[] if req.n_logprobs is not None else None,
                   prompt_logprobs=scored, prompt_top_logprobs=list(scored) if scored is not None else None)

    def completion(self, finish_reason: str) -> Completion:
        return Completion(self.text, list(self.tokens), finish_reason, self.usage, self.logprobs, self.top_logprobs,
                          self.prompt_logprobs, self.prompt_top_logprobs, self.restored_from, self.preemptions)


class Request:
    """The caller's handle on a submitted generation: iterate for Chunks, or wait for result().  What it
    was asked is fixed at submit(); what the Engine makes of it arrives through the chunks, the prompt
    logprobs (once its prefill ended) and the Completion (once it ended), never as shared state."""

    _ids = itertools.count()

    def __init__(self, engine: "Engine", prompt: list[int], params: SamplingParams, max_tokens: int,
                 stop: list[str], logprobs: int | None = None, prompt_logprobs: bool = False,
                 checkpoints: tuple[int, ...] = ()):
        self.id = next(self._ids)
        self.engine = engine
        self.prompt = prompt
        self.params = params
        self.max_tokens = max_tokens
        self.stop = [s for s in stop if s]
        self.n_logprobs = logprobs
        self.score_prompt = prompt_logprobs
        self.checkpoints = checkpoints
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self._completion: Completion | None = None
        self._prompt_scores: tuple[list, list] | None = None
        self._chunks: collections.deque[Chunk] = collections.deque()
        self._cond = threading.Condition()
        self.cancelled = False

    # -- engine side ----------------------------------------------------------------
    def _push(self, chunk: Chunk) -> None:
        with self._cond:
            self._chunks.append(chunk)
            self._cond.notify_all()

    def _scored_prompt(self, gen: "_Generation") -> None:
        with self._cond:
            self._prompt_scores = (list(gen.prompt_logprobs), list(gen.prompt_top_logprobs))

    def _finish(self, reason: str, error: BaseException | None = None, gen: "_Generation | None" = None) -> None:
        with self._cond:
            if self.finish_reason is None:
                self.finish_reason = reason
                self.error = error
                self._completion = (gen or _Generation.of(self)).completion(reason)
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
        with self._cond:
            if not self._cond.wait_for(lambda: self._chunks or self.finish_reason is not None, timeout):
                raise TimeoutError(f"request {self.id}: no token within {timeout}s")
            if self._chunks:
                return self._chunks.popleft()
            if self.error is not None:
                raise self.error
            return None

    def drain(self) -> list[Chunk]:
        """The chunks that arrived since the last call, without waiting."""
        with self._cond:
            out = list(self._chunks)
            self._chunks.clear()
            return out

    def __iter__(self) -> Iterator[Chunk]:
        while (chunk := self._next(None)) is not None:
            yield chunk

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        while (chunk := await loop.run_in_executor(None, self._next, None)) is not None:
            yield chunk

    def result(self, timeout: float | None = None) -> Completion:
        with self._cond:
            if not self._cond.wait_for(lambda: self.finish_reason is not None, timeout):
                raise TimeoutError(f"request {self.id}: not finished within {timeout}s")
        if self.error is not None:
            raise self.error
        return self._completion


@dataclass
class _Slot:
    """A request bound to a sequence id of the context."""

    req: Request
    seq: int
    sampler: Sampler
    gen: _Generation         # what it has made so far
    cursor: int = 0          # prompt tokens already in memory
    pos: int = 0             # next position
    next_token: int | None = None
    pending_bytes: bytes = b""
    emitted: int = 0         # characters of gen.text already streamed
    admitted: int = 0
    since_step: int = 0      # the engine's step count at its admission (how long its prompt has waited)
    relocated_at: int = -1   # position at which its cells were last moved (see _relieve_memory)
    share_at: set[int] = field(default_factory=set)  # prompt positions queued requests wait to share
    resumed_entry: tuple[int, ...] | None = None  # the prefix-cache entry it was restored from
    draft: list[int] = field(default_factory=list)  # proposed this step, fed after next_token
    spec: "_Speculation | None" = None  # this step's fed draft, until _settle keeps what was accepted
    finishing: str | None = None  # a finish waiting for _settle (the memory must hold the kept tokens)


@dataclass
class _Speculation:
    """A step that fed next_token and draft tokens at positions start..: what to undo if one is rejected."""

    start: int
    fed: list[int]
    snapshot: int | None  # the recurrent state before them (a pool handle): none for attention-only


@dataclass
class EngineStats:
    queued: int
    running: int
    preempted: int
    steps: int
    tokens_decoded: int
    tokens_generated: int
    tokens_per_second: float
    decode_seconds: float
    step_seconds: float
    prefix_hits: int
    prefix_misses: int
    cached_prefixes: int
    draft_tokens: int = 0     # speculative decoding: draft tokens verified
    draft_accepted: int = 0   # of which the model agreed with

    @property
    def draft_acceptance(self) -> float:
        return 0.0 if self.draft_tokens == 0 else self.draft_accepted / self.draft_tokens

    @property
    def python_overhead(self) -> float:
        """Share of step time spent outside llama_decode."""
        return 0.0 if self.step_seconds == 0 else 1.0 - self.decode_seconds / self.step_seconds


@dataclass
class EngineMemory:
    report: memory_mod.MemoryReport | None
    swapped_bytes: int              # preempted sequences' states, in host memory
    cached_prefixes: int
    cached_bytes: int = 0            # what the prefix cache adds: its recurrent state cells (its attention
                                     # prefixes are cells of the KV cache, allocated whole: cached_tokens)
    pool: memory_mod.PoolStats | None = field(default=None)
    cached_tokens: int = 0           # attention cells of those prefixes, at most
    cached_prefixes_max: int = 0     # the prefix cache's bounds: entries, and bytes (None: unbounded)
    cached_bytes_max: int | None = None


@dataclass(frozen=True)
class SlotView:
    """What one sequence is doing (Engine.slots()): the request it runs, read between two steps."""

    seq: int
    request_id: int
    state: Literal["prefill", "decode"]  # prefill while prompt tokens remain to compute
    prompt_tokens: int
    computed: int        # prompt tokens in its memory: those taken from the prefix cache, then those computed
    cached_tokens: int   # prompt tokens taken from the prefix cache
    generated: int
    max_tokens: int


@dataclass(frozen=True)
class PrefixEntryView:
    """One prefix-cache entry (Engine.prefix_entries())."""

    n_tokens: int
    bytes: int          # what it adds to the memory: its recurrent state cell (0 on attention-only models)
    hits: int           # requests that resumed from it


@dataclass(frozen=True)
class EngineConfig:
    """Every setting of an Engine and of the context it creates, built once: Llama builds it from its
    arguments (the server's flags are Llama's), so no setting is lost on the way down.

    batch_invariant=True (patched build, patch 0007) makes a request's output independent of what else
    runs and of prefix-cache hits: the same tokens and logprobs as its lone run.  It holds with flash
    attention ("auto" picks it on the CPU); without it the attention of a unified KV cache sums over
    every cell, so results depend on where a sequence's cells lie.  Off by default: it costs 0-29% of
    throughput on 2 CPU cores (bench/batch_invariance.py), over the 10% that would make it the default.
    n_gpu_layers and rpc_servers (Model's) apply when the Engine loads the model from a path."""

    n_ctx: int = 4096
    parallel: int = 4
    n_batch: int = 512                             # tokens per step (one llama_decode)
    n_ubatch: int | None = None                    # tokens per compute pass within a step (None: n_batch)
    n_threads: int | None = None
    n_threads_batch: int | None = None
    prefix_cache: int | None = None                # entries (None: 32, or 3 per sequence if more; the
    #                                                byte budget bounds them too)
    prefix_cache_bytes: int | None = 256 << 20     # on its recurrent snapshots (prefix_cache.py); None: no bound
    flash_attn: bool | str = "auto"
    batch_invariant: bool = False
    context_overrides: Mapping[str, Any] | None = None  # llama_context_params fields by name
    n_gpu_layers: int = 0
    rpc_servers: str | Sequence[str] | None = None
    # speculative decoding: a llama_cpp.llama_speculative.LlamaDraftModel (any callable from the token
    # ids so far to proposed next ids); each step verifies a sequence's proposal in the same batch, keeps
    # what the sampler agrees with, and undoes the rest (recurrent state from a snapshot of the pool)
    draft_model: Any = None


class Engine:
    """Serve `parallel` sequences at once from one model and one context."""

    def __init__(self, model: Model | str, config: EngineConfig | None = None, **settings: Any):
        """Engine(model, EngineConfig(...)), or Engine(model, n_ctx=..., parallel=...) with EngineConfig's
        field names (an unknown one is a TypeError naming it)."""
        self.config = cfg = replace(config or EngineConfig(), **settings)
        parallel, n_batch = cfg.parallel, cfg.n_batch
        self._own_model = not isinstance(model, Model)
        if not self._own_model and (cfg.n_gpu_layers or cfg.rpc_servers is not None):
            raise ValueError("n_gpu_layers, rpc_servers: give them to the Model when passing a loaded one")
        # batch_invariant: ggml's plain kernels for quantized weights too (repacked and AMX weights have
        # one kernel for a row and another for many); a Model given loaded is the caller's choice
        self.model = Model(model, n_gpu_layers=cfg.n_gpu_layers, rpc_servers=cfg.rpc_servers,
                           overrides={"use_extra_bufts": False} if cfg.batch_invariant else None) \
            if self._own_model else model
        if not 1 <= parallel <= MAX_SEQ:
            raise ValueError(f"parallel={parallel}: must be in 1..{MAX_SEQ}")
        self._stateful = stateful = self.model.is_recurrent or self.model.is_hybrid
        n_rs_pool, n_holders = 0, 0
        # a conversation keeps its turn boundary and its tail: room for both per sequence, and shared prefixes
        n_entries = cfg.prefix_cache if cfg.prefix_cache is not None else max(32, 3 * parallel)
        # draft tokens per sequence and step; on recurrent memory a rejected one is undone from a snapshot
        self._draft_max = 0 if cfg.draft_model is None or (stateful and not has("llama_memory_rs_snapshot")) \
            else max(1, min(DRAFT_MAX, int(getattr(cfg.draft_model, "num_pred_tokens", DRAFT_MAX))))
        if cfg.draft_model is not None and not self._draft_max:
            log.warning("draft_model: speculative decoding on %s needs the patched build's snapshots; "
                        "decoding without drafts", self.model.arch)
        if stateful:  # prefixes are snapshots of the recurrent pool (patched build only)
            self.n_cache = n_entries if has("llama_memory_rs_snapshot") else 0
            # one state cell per sequence + the prefix cache + one copy-on-write cell per sequence,
            # + one snapshot per sequence while its draft is verified
            n_rs_pool = self.n_cache + parallel if self.n_cache else 0
            if self._draft_max:
                n_rs_pool = (n_rs_pool or parallel) + parallel
        elif memory_mod.available():  # prefixes are held by spare sequence ids sharing their cells
            # (the patched build: entry sizes come from its memory report)
            self.n_cache = n_holders = max(0, min(n_entries, MAX_SEQ - parallel))
        else:
            self.n_cache = 0
        # a step outputs logits for one token per sequence, and one per draft token (plan_step shares
        # _draft_max among them, at least one each): size the output buffer to that (upstream sizes it
        # to n_batch rows of n_vocab floats: 300 MiB for 512 x 152k)
        draft_rows = max(self._draft_max, parallel) if self._draft_max else 0
        overrides = {"n_outputs_max": parallel + draft_rows + n_holders, **(cfg.context_overrides or {})}
        self._n_outputs = overrides["n_outputs_max"] or n_batch  # 0: llama.cpp's default, n_batch
        self.ctx = Context(self.model, n_ctx=cfg.n_ctx, n_seq_max=parallel + n_holders, n_rs_pool=n_rs_pool,
                           n_batch=n_batch, n_ubatch=min(cfg.n_ubatch or n_batch, n_batch), n_threads=cfg.n_threads,
                           n_threads_batch=cfg.n_threads_batch, kv_unified=True,
                           flash_attn=cfg.flash_attn, batch_invariant=cfg.batch_invariant, overrides=overrides)
        self.parallel = parallel
        self.n_ctx = self.ctx.n_ctx
        self.n_batch = self.ctx.n_batch
        store = HolderStore(self.ctx, range(parallel, parallel + n_holders)) if n_holders else PoolStore(self.ctx)
        self.cache = PrefixCache(store, self.n_cache, cfg.prefix_cache_bytes)
        self._batch = Batch(self.n_batch, 1)
        # other threads post requests and calls here (deque appends are atomic) and set the event
        self._inbox: collections.deque[Request | tuple[Any, concurrent.futures.Future]] = collections.deque()
        self._event = threading.Event()
        self._pending: collections.deque[Request] = collections.deque()
        self._running: dict[int, _Slot] = {}
        self._preempted: collections.deque[tuple[_Slot, bytes]] = collections.deque()
        self._free = list(range(parallel - 1, -1, -1))
        self._closing = False
        self.failure: BaseException | None = None  # what stopped the engine thread, if anything did
        self._resume_blocked = False
        self._admissions = itertools.count()
        self._counters = collections.Counter()
        self._t_decode = 0.0
        self._t_step = 0.0
        self._t_start = time.perf_counter()
        self._trace = Trace.from_env()
        self._thread = threading.Thread(target=self._loop, name="pyllama-ssm-engine", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------------
    def submit(self, prompt: str | list[int], params: SamplingParams | None = None, *, max_tokens: int = 128,
               stop: list[str] | str | None = None, add_special: bool = True,
               logprobs: int | None = None, prompt_logprobs: bool = False,
               checkpoints: Iterable[int] = ()) -> Request:
        """Queue a generation.  logprobs=k reports each token's log-probability and the k most
        likely alternatives (from the model's raw logits, as llama-cpp-python does).
        prompt_logprobs=True scores the prompt too, each token by the logits of the position
        before it (the prompt is then computed whole, not taken from the prefix cache).
        checkpoints: prompt positions (1..len(prompt)) where later prompts are likely to part from
        this one, e.g. a chat's turn boundaries: its prefill stops there and keeps a prefix-cache
        entry (recurrent memory exists only where it was saved; attention cells serve any prefix)."""
        if self.failure is not None:
            raise self._failed()
        if self._closing:
            raise RuntimeError("engine is closed")
        tokens = self.model.tokenize(prompt, add_special=add_special) if isinstance(prompt, str) else list(prompt)
        if not tokens:
            raise ValueError("prompt: empty (no tokens)")
        for t in tokens:
            self.model.check_token(t)
        if len(tokens) >= self.n_ctx:
            raise ValueError(f"prompt of {len(tokens)} tokens does not fit the context of {self.n_ctx} "
                             f"(one position must remain for generation)")
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens={max_tokens!r}: must be an int >= 0")
        if logprobs is not None and not (isinstance(logprobs, int) and 0 <= logprobs <= self.model.n_vocab):
            raise ValueError(f"logprobs={logprobs}: must be in 0..{self.model.n_vocab}")
        checkpoints = tuple(checkpoints)
        if not all(isinstance(p, int) and 0 < p <= len(tokens) for p in checkpoints):
            raise ValueError(f"checkpoints={list(checkpoints)}: must be prompt positions in 1..{len(tokens)}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        req = Request(self, tokens, params or SamplingParams(), max_tokens, stops, logprobs, prompt_logprobs,
                      checkpoints if self.takes_checkpoints else ())
        if max_tokens == 0 and not prompt_logprobs:
            req._finish("length")
            return req
        if self._trace.on:
            self._trace.event("submit", req=req.id, prompt=len(tokens))
        self._inbox.append(req)
        self._event.set()
        return req

    @property
    def takes_checkpoints(self) -> bool:
        """Whether submit's checkpoints matter: a prefix cache of recurrent snapshots, which exist only
        where they were taken (attention cells serve any leading part of a cached prefix)."""
        return bool(self.n_cache) and not self.cache.store.partial

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, **kw) -> Completion:
        return self.submit(prompt, params, **kw).result()

    def stats(self) -> EngineStats:
        c = self._counters
        elapsed = max(time.perf_counter() - self._t_start, 1e-9)
        return EngineStats(
            queued=len(self._pending) + sum(isinstance(x, Request) for x in list(self._inbox)),
            running=len(self._running), preempted=len(self._preempted),
            steps=c["steps"], tokens_decoded=c["decoded"], tokens_generated=c["generated"],
            tokens_per_second=c["generated"] / elapsed, decode_seconds=self._t_decode, step_seconds=self._t_step,
            prefix_hits=self.cache.hits, prefix_misses=self.cache.misses, cached_prefixes=len(self.cache.entries),
            draft_tokens=c["drafted"], draft_accepted=c["accepted"])

    def slots(self) -> list[SlotView | None]:
        """What each sequence (index = sequence id) is doing: the request it runs, or None when idle (a
        request swapped out to host memory holds none).  Read on the engine thread, between two steps."""
        def read() -> list[SlotView | None]:
            out: list[SlotView | None] = [None] * self.parallel
            for seq, slot in self._running.items():
                req, gen = slot.req, slot.gen
                out[seq] = SlotView(seq, req.id, "prefill" if slot.cursor < len(req.prompt) else "decode",
                                    len(req.prompt), slot.cursor, gen.usage.cached_tokens, len(gen.tokens),
                                    req.max_tokens)
            return out
        return self.call(read)

    def prefix_entries(self) -> list[PrefixEntryView]:
        """The prefix cache's entries, least recently added first.  Read on the engine thread."""
        if not self.n_cache:
            return []
        return self.call(lambda: [PrefixEntryView(len(key), self.cache.entry_bytes(len(key)), entry.hits)
                                  for key, entry in self.cache.entries.items()])

    def memory(self) -> EngineMemory:
        report = pool = None
        if memory_mod.available():
            report = self.call(self.ctx.memory_report)
            if self.n_cache:
                pool = self.call(self.ctx.pool_stats)
        swapped = sum(len(state) for _, state in list(self._preempted))
        cached, tokens = self.call(lambda: (self.cache.bytes, self.cache.tokens)) if self.n_cache else (0, 0)
        return EngineMemory(report, swapped, len(self.cache.entries), cached, pool, tokens,
                            self.n_cache, self.cache.max_bytes if self.n_cache else 0)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._event.set()
        self._thread.join()
        self._trace.close()
        self.cache.clear()
        self._batch.close()
        self.ctx.close()
        if self._own_model:
            self.model.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- engine thread ---------------------------------------------------------------------
    def _wake(self) -> None:
        self._event.set()  # a cancelled request is dropped at the start of the next step

    def call(self, fn):
        """Run fn on the engine thread, between steps, and return its result: the way for anything
        that touches llama.cpp after start-up (context reads, adapters) to do so."""
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            return fn()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.append((fn, future))
        self._event.set()
        return future.result()

    def _take_inbox(self) -> None:
        while self._inbox:
            item = self._inbox.popleft()
            if isinstance(item, Request):
                if self.failure is None:
                    self._pending.append(item)
                else:
                    item._finish("error", self._failed())
                continue
            fn, future = item
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)
                if not isinstance(e, Exception):
                    raise

    def _loop(self) -> None:
        try:
            while not self._closing:
                if not (self._pending or self._running or self._preempted):
                    self._event.wait(timeout=0.5)
                self._event.clear()  # before taking the inbox: a later post sets it again
                self._take_inbox()
                if self._closing:
                    break
                try:
                    self._step()
                except Exception as e:  # no single request to blame (a decode error...): fail what is running
                    for slot in list(self._running.values()):
                        self._release(slot, "error", e)
        except BaseException as e:  # noqa: BLE001 - the thread is dying: nothing may wait on it
            self._fail_all(e)
            while not self._closing:  # keep answering the inbox (requests fail at once) until close()
                self._event.wait(timeout=0.5)
                self._event.clear()
                with contextlib.suppress(BaseException):  # a failing read must not stop the answers
                    self._take_inbox()
        self._take_inbox()  # calls posted while closing still get their answer
        for req in list(self._pending):
            req._finish("cancelled", RuntimeError("engine closed"))
        for slot in list(self._running.values()):
            self._release(slot, "cancelled", RuntimeError("engine closed"))
        for slot, _ in self._preempted:
            slot.req._finish("cancelled", RuntimeError("engine closed"), slot.gen)

    def _failed(self) -> EngineError:
        cause = self.failure
        error = EngineError(f"engine stopped: {type(cause).__name__}: {cause}")
        error.__cause__ = cause
        return error

    def _fail_all(self, cause: BaseException) -> None:
        """The engine thread stops: fail every request it owns, freeing what can be freed."""
        self.failure = cause
        owned = [(slot.req, slot) for slot in self._running.values()]
        owned += [(slot.req, slot) for slot, _ in self._preempted] + [(req, None) for req in self._pending]
        self._running.clear()
        self._preempted.clear()
        self._pending.clear()
        for req, slot in owned:
            if slot is not None:
                with contextlib.suppress(Exception):
                    slot.sampler.close()
            req._finish("error", self._failed())
        with contextlib.suppress(BaseException):  # what it leaves, the loop after takes
            self._take_inbox()

    def _admit(self) -> None:
        # resume swapped-out sequences only once memory was freed since they left,
        # else the next step would preempt them again (thrashing); with nothing
        # running, nothing else will free memory
        if not self._running:
            self._resume_blocked = False
        while self._free and self._preempted and not self._resume_blocked:
            slot, state = self._preempted[0]
            seq = self._free.pop()
            if not self._running and not self.cache.entries:
                self.ctx.clear(data=False)  # an empty memory: its cells from the first one on (ordered cells)
            try:
                self.ctx.set_seq_state(seq, state)
            except StateError:
                self.ctx.seq_rm(seq)
                self._free.append(seq)
                if self.cache.entries:  # cached prefixes give way to a request in progress
                    self.cache.clear()
                    continue
                if not self._running:  # alone in an empty memory and still no room: it never will be
                    self._preempted.popleft()
                    slot.sampler.close()
                    slot.req._finish("error", MemoryFullError(
                        f"request {slot.req.id}: {slot.pos} tokens do not fit the memory of this context "
                        f"(n_ctx={self.n_ctx})"), slot.gen)
                    continue
                self._resume_blocked = True  # wait for running sequences to finish
                return
            except Exception as e:  # noqa: BLE001 - anything else fails this request only
                self._preempted.popleft()
                self.ctx.seq_rm(seq)
                self._free.append(seq)
                slot.sampler.close()
                slot.req._finish("error", e, slot.gen)
                continue
            self._preempted.popleft()
            slot.seq = seq
            self._running[seq] = slot
        if self._preempted:
            return  # preempted sequences go first
        waiting = 0  # queued requests that wait for a prefix a running request is computing
        while self._free and len(self._pending) > waiting:
            req = self._pending[waiting]  # leaves the queue only once it is running or finished
            if req.cancelled:
                del self._pending[waiting]
                req._finish("cancelled")
                continue
            if self._awaits_shared_prefix(req):
                waiting += 1
                continue
            self._start(req)

    def _awaits_shared_prefix(self, req: Request) -> bool:
        """Whether req waits for a prefix a running request is prefilling now (scheduler.waits_for)."""
        if not self.n_cache or req.score_prompt:
            return False
        hit = self.cache.peek(req.prompt)
        wait = waits_for(req.prompt, hit.n_tokens if hit else 0, map(self._facts, self._running.values()))
        if wait is None:
            return False
        leader, at = wait
        self._running[leader].share_at.add(at)  # its prefill stops there and keeps a prefix-cache entry
        return True

    def _facts(self, slot: "_Slot") -> SeqFacts:
        return SeqFacts(slot.seq, slot.admitted, slot.req.prompt, slot.cursor, slot.next_token is not None,
                        slot.req.score_prompt, slot.share_at, len(slot.draft),
                        waited=self._counters["steps"] - slot.since_step, turns=bool(slot.req.checkpoints))

    def _start(self, req: Request) -> None:
        """Move a queued request into a free sequence; anything it raises fails it alone."""
        try:
            sampler = Sampler(self.model, req.params)
        except Exception as e:  # noqa: BLE001 - a grammar llama.cpp refuses, a value cffi cannot convert...
            self._pending.remove(req)
            req._finish("error", e)
            return
        slot = _Slot(req, self._free.pop(), sampler, _Generation.of(req), admitted=next(self._admissions),
                     since_step=self._counters["steps"])
        self._pending.remove(req)
        self._running[slot.seq] = slot
        try:
            hit = self.cache.lookup(req.prompt) if self.n_cache and not req.score_prompt else None
            if hit is not None:
                self.cache.restore(hit, slot.seq)
                slot.cursor = slot.pos = hit.n_tokens
                slot.gen.usage.cached_tokens = slot.cursor
                slot.gen.restored_from = hit.entry.tokens[:hit.n_tokens]
                slot.resumed_entry = hit.entry.tokens
            slot.share_at.update(p for p in req.checkpoints if p > slot.cursor)
            if self._trace.on:
                self._trace.event("start", req=req.id, seq=slot.seq, cached=slot.cursor, queued=len(self._pending))
        except Exception as e:  # noqa: BLE001
            self._release(slot, "error", e)

    def _step(self) -> None:
        t0 = time.perf_counter()
        for slot in [s for s in self._running.values() if s.req.cancelled]:
            self._release(slot, "cancelled")
        for entry in [e for e in self._preempted if e[0].req.cancelled]:  # swapped out: nothing to free
            self._preempted.remove(entry)
            entry[0].sampler.close()
            entry[0].req._finish("cancelled", gen=entry[0].gen)
        for req in [r for r in self._pending if r.cancelled]:  # queued: it leaves the queue now
            self._pending.remove(req)
            req._finish("cancelled")
        self._admit()
        if not self._running:
            return
        if self._draft_max:
            self._propose_drafts()
        plan = plan_step(map(self._facts, self._running.values()), self.n_batch, self._n_outputs,
                         checkpoints=bool(self.n_cache), draft_budget=self._draft_max)
        batch = self._batch
        batch.clear()
        outputs: list[tuple[_Slot, int]] = []   # (slot, batch index) whose logits sample a token
        verify: dict[int, list[int]] = {}        # seq -> batch indices of its draft tokens' logits
        prefill: list[tuple[_Slot, int]] = []   # (slot, prompt tokens in this step)
        scored: list[tuple[_Slot, int, int]] = []  # (slot, first batch index, n): prompt logprobs
        for i, seq in enumerate(plan.decode):
            slot = self._running[seq]
            outputs.append((slot, batch.add(slot.next_token, slot.pos, slot.seq, logits=True)))
            draft, slot.draft = slot.draft[:plan.drafts[i] if plan.drafts else 0], []
            if draft and self._speculate(slot, draft):
                verify[seq] = [batch.add(t, slot.pos + 1 + k, seq, logits=True) for k, t in enumerate(draft)]
        for chunk in plan.prefill:
            slot = self._running[chunk.seq]
            tokens = slot.req.prompt[chunk.start:chunk.start + chunk.n]
            if chunk.all_logits:
                scored.append((slot, batch.n_tokens, chunk.n))
                for k, t in enumerate(tokens):
                    last = batch.add(t, slot.pos + k, slot.seq, logits=True)
            else:
                last = batch.add_sequence(tokens, slot.pos, slot.seq, logits_last=chunk.last)
            prefill.append((slot, chunk.n))
            if chunk.last:
                outputs.append((slot, last))
        if batch.n_tokens == 0:
            return
        t1 = time.perf_counter()
        try:
            self.ctx.decode(batch)
        except MemoryFullError:
            for slot in self._running.values():  # the step did not happen: nothing to verify
                self._drop_speculation(slot)
            self._relieve_memory()
            self._t_step += time.perf_counter() - t0
            return
        t2 = time.perf_counter()
        self._t_decode += t2 - t1
        if self._trace.on:
            self._trace.event("step", t0=round(t0, 6), decode_s=round(t2 - t1, 6), n=batch.n_tokens,
                              decode=[self._running[s].req.id for s in plan.decode], drafts=sum(plan.drafts),
                              prefill=[[self._running[c.seq].req.id, c.start, c.n] for c in plan.prefill])
        self._counters["steps"] += 1
        self._counters["decoded"] += batch.n_tokens
        for slot, first, n in scored:
            try:
                self._record_prompt_logprobs(slot, first, n)
            except Exception as e:  # noqa: BLE001 - this request alone fails
                self._release(slot, "error", e)
        for slot, n in prefill:
            if slot.seq not in self._running:
                continue
            slot.cursor += n
            slot.pos += n
            if slot.req.score_prompt and slot.cursor == len(slot.req.prompt):
                slot.req._scored_prompt(slot.gen)  # the caller may read them before the first chunk
            if self.n_cache and retention.is_checkpoint(self._facts(slot)):
                self._keep_prefix(slot, slot.req.prompt[:slot.cursor])
        for slot, idx in outputs:
            if slot.seq not in self._running:  # failed while scoring its prompt
                continue
            if slot.next_token is not None:
                slot.pos += 1
            if slot.req.max_tokens == 0:  # prompt logprobs only
                self._release(slot, "length")
                continue
            try:
                self._sample(slot, idx)
                for k, draft_idx in enumerate(verify.get(slot.seq, ())):
                    # the token just sampled is the draft's next: its logits (fed after it) sample on
                    if slot.seq not in self._running or slot.finishing or slot.next_token != slot.spec.fed[k + 1]:
                        break
                    self._counters["accepted"] += 1
                    slot.pos += 1
                    self._sample(slot, draft_idx)
            except Exception as e:  # the request's own logits processor or grammar: it alone fails
                if slot.seq in self._running:
                    self._release(slot, "error", e)
        if verify:
            self._settle([self._running[seq] for seq in verify if seq in self._running])
        self._t_step += time.perf_counter() - t0

    # -- speculative decoding -----------------------------------------------------------------
    def _propose_drafts(self) -> None:
        """Ask the draft model what follows each decoding sequence (within its max_tokens and the context)."""
        for slot in list(self._running.values()):
            req = slot.req
            room = min(self._draft_max, req.max_tokens - len(slot.gen.tokens) - 1, self.n_ctx - slot.pos - 2)
            if slot.next_token is None or room <= 0:
                continue
            try:
                proposal = self.config.draft_model(np.asarray(req.prompt + slot.gen.tokens, dtype=np.intc))
                slot.draft = [self.model.check_token(int(t)) for t in np.asarray(proposal).ravel()[:room]]
            except Exception as e:  # noqa: BLE001 - a failing draft model fails its request alone
                self._release(slot, "error", e)

    def _speculate(self, slot: _Slot, draft: list[int]) -> bool:
        """Prepare to undo slot's draft: a snapshot of its recurrent state (none needed for attention,
        whose cells are simply removed).  False when the pool has no room: decode without the draft."""
        snapshot = None
        if self._stateful:
            try:
                snapshot = self.ctx.snapshot(slot.seq)
            except PoolExhaustedError:
                return False
        slot.spec = _Speculation(slot.pos, [slot.next_token, *draft], snapshot)
        self._counters["drafted"] += len(draft)
        return True

    def _drop_speculation(self, slot: _Slot) -> None:
        spec, slot.spec = slot.spec, None
        if spec is not None and spec.snapshot is not None:
            self.ctx.release(spec.snapshot)

    def _settle(self, slots: list[_Slot]) -> None:
        """After verification, each slot's memory keeps the fed tokens before slot.pos and loses the
        rejected rest: attention cells are removed; a recurrent state goes back to its snapshot and the
        kept tokens are decoded again (one batch for all).  Then the finishes that waited for it."""
        replay: list[tuple[_Slot, int, list[int]]] = []
        for slot in slots:
            spec = slot.spec
            kept = spec.fed[:slot.pos - spec.start]
            if len(kept) < len(spec.fed):
                if spec.snapshot is not None:
                    self.ctx.restore(spec.snapshot, slot.seq)
                    self.ctx.seq_rm(slot.seq, spec.start, -1)
                    replay.append((slot, spec.start, kept))
                else:
                    self.ctx.seq_rm(slot.seq, slot.pos, -1)
            self._drop_speculation(slot)
        if replay:
            batch = self._batch
            batch.clear()
            for slot, start, kept in replay:
                batch.add_sequence(kept, start, slot.seq, logits_last=False)
            try:
                self.ctx.decode(batch)
            except Exception as e:  # noqa: BLE001 - memory cannot take them back: those requests fail
                for slot, _, _ in replay:
                    self._release(slot, "error", e)
        for slot in slots:
            if slot.seq in self._running and slot.finishing:
                self._finish(slot, slot.finishing)

    def _sample(self, slot: _Slot, idx: int) -> None:
        req, gen = slot.req, slot.gen
        # logprobs are the model's: a copy when a logits processor will rewrite the buffer in place
        raw = None if req.n_logprobs is None else self.ctx.logits(idx, copy=req.params.logits_processor is not None)
        tok = slot.sampler.sample(self.ctx.ptr, idx)
        self._counters["generated"] += 1
        if raw is not None:
            lp, top = token_logprobs(raw, tok, req.n_logprobs)
            gen.logprobs.append(lp)
            gen.top_logprobs.append(top)
        gen.tokens.append(tok)
        gen.usage.completion_tokens += 1
        if self._trace.on and len(gen.tokens) == 1:
            self._trace.event("first", req=req.id)
        if self.model.is_eog(tok):
            self._finish(slot, "stop")
            return
        text, slot.pending_bytes = complete_text(slot.pending_bytes + self.model.token_to_piece(tok))
        gen.text += text
        for s in req.stop:
            at = gen.text.find(s, max(0, slot.emitted - len(s)))
            if at >= 0:
                gen.text = gen.text[:at]
                self._emit(slot, tok, final=True)
                self._finish(slot, "stop")
                return
        self._emit(slot, tok)
        if len(gen.tokens) >= req.max_tokens or slot.pos + 1 >= self.n_ctx:
            self._finish(slot, "length")
        else:
            slot.next_token = tok

    def _record_prompt_logprobs(self, slot: _Slot, first: int, n: int) -> None:
        """Batch rows first..first+n-1 hold the logits after prompt tokens cursor..cursor+n-1:
        they score the prompt tokens one position later."""
        req, gen = slot.req, slot.gen
        for k in range(n):
            target = slot.cursor + k + 1
            if target < len(req.prompt):
                gen.prompt_logprobs[target], gen.prompt_top_logprobs[target] = token_logprobs(
                    self.ctx.logits(first + k, copy=False), req.prompt[target], req.n_logprobs or 0)

    def _emit(self, slot: _Slot, tok: int, final: bool = False) -> None:
        """Stream new text, holding back a tail that could still become a stop string."""
        req, gen = slot.req, slot.gen
        text = gen.text
        hold = 0 if final else stop_hold(text, req.stop)
        upto = max(slot.emitted, len(text) - hold)
        lp = (gen.logprobs[-1], gen.top_logprobs[-1]) if gen.logprobs else (None, None)
        req._push(Chunk(tok, text[slot.emitted:upto], *lp))
        slot.emitted = upto

    def _finish(self, slot: _Slot, reason: str) -> None:
        if slot.spec is not None:  # rejected draft tokens are still in its memory: _settle finishes it
            slot.finishing = reason
            return
        req, gen = slot.req, slot.gen
        if slot.emitted < len(gen.text):
            req._push(Chunk(gen.tokens[-1] if gen.tokens else -1, gen.text[slot.emitted:]))
            slot.emitted = len(gen.text)
        # the memory holds prompt + all generated tokens but the last: a prefix for the next turn, if the
        # next turn can hold them: a chat's history holds the answer's text, tokenized again
        if self.n_cache and (not req.checkpoints or self._round_trips(gen.tokens)):
            tail = retention.finished_prefix(req.prompt, gen.tokens)
            self._keep_prefix(slot, tail)
            if req.checkpoints:  # the turn boundary it follows drops it when stale
                self.cache.link_tail(retention.turn_boundary(tail, req.checkpoints), tail)
        self._release(slot, reason)

    def _round_trips(self, tokens: list[int]) -> bool:
        """Whether the text of generated tokens tokenizes back into them, all but the last (which is not
        in memory).  Real models' answers nearly always do; where they do not, a later prompt holding the
        text parts from these tokens and the turn boundary before the answer serves it instead."""
        text = self.model.detokenize(tokens)
        again = self.model.tokenize(text.decode("utf-8", errors="replace"), add_special=False)
        return again[:len(tokens) - 1] == tokens[:-1]

    def _keep_prefix(self, slot: _Slot, tokens: Sequence[int]) -> None:
        """A prefix-cache entry for slot's memory, which holds `tokens`, and the entries it supersedes
        dropped (retention.superseded, retention.replaced): a chat keeps its turn boundaries and the
        positions others wait for."""
        turns = {*slot.req.checkpoints, *slot.share_at} if slot.req.checkpoints else None
        if self.cache.keep(slot.seq, tokens, slot.resumed_entry, turns):
            slot.resumed_entry = None

    def _release(self, slot: _Slot, reason: str, error: BaseException | None = None) -> None:
        del self._running[slot.seq]
        if self._trace.on:
            self._trace.event("end", req=slot.req.id, reason=reason, tokens=len(slot.gen.tokens))
        try:
            self._drop_speculation(slot)
            self.ctx.seq_rm(slot.seq)
            self._free.append(slot.seq)  # only a cleared sequence id is used again
        finally:
            slot.sampler.close()
            self._resume_blocked = False
            slot.req._finish(reason, error, slot.gen)

    def _relieve_memory(self) -> None:
        """The step did not fit: drop the least recently used cached prefix (the step is tried again),
        else swap the newest sequence out."""
        if self.cache.entries:
            self.cache.evict_one()
            return
        if len(self._running) > 1:
            slot = self._running[preemption_victim(map(self._facts, self._running.values()))]
            try:
                state = self.ctx.seq_state(slot.seq)
            except Exception as e:  # noqa: BLE001 - the sequence being swapped out fails alone
                self._release(slot, "error", e)
                return
            self.ctx.seq_rm(slot.seq)
            del self._running[slot.seq]
            self._free.append(slot.seq)
            self._preempted.append((slot, state))
            slot.gen.preemptions += 1
            self._resume_blocked = True
            self._counters["preemptions"] += 1
            return
        slot = next(iter(self._running.values()))
        if self.ctx.batch_invariant and slot.relocated_at != slot.pos:
            # ordered KV cells put a sequence's next token after its last cell: the free cells may all
            # lie below it.  Alone in the memory now, it moves down, bit-identical, and goes on.
            try:
                state = self.ctx.seq_state(slot.seq)
                self.ctx.clear(data=False)  # empty now: the cache starts over at cell 0 (llama.cpp's head)
                self.ctx.set_seq_state(slot.seq, state)
                slot.relocated_at = slot.pos
                self._counters["relocations"] += 1
                return
            except Exception:  # noqa: BLE001 - no room even from the bottom: it fails below
                self.ctx.seq_rm(slot.seq)
        self._release(slot, "error", MemoryFullError(
            f"request {slot.req.id}: {slot.pos} tokens do not fit the memory of this context (n_ctx={self.n_ctx})"))
