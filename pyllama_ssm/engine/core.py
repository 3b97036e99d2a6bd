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

An inline Engine (inline=True) has no thread: whoever reads a request runs the steps, on the caller's
thread.  The single-sequence Llama serves its completions so (pyllama_ssm.session), on its own context,
which stock's code also reaches from the caller's thread between calls; its requests continue from
what the sequence's memory holds and leave it there (request.Continuation).

This module is the thread, its loop and the life of a request (admission,
finish, preemption); it asks scheduler.py and retention.py what to do, and
leaves the batch and the sampling to runner.py, the drafts to speculative.py.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from ..batch import Batch
from ..context import Context
from ..errors import EngineError, MemoryFullError, StateError
from ..model import Model
from ..sampling import Sampler, SamplingParams
from . import reports, retention
from .config import EngineConfig, Sizing
from .prefix_cache import HolderStore, PoolStore, PrefixCache
from .reports import EngineMemory, EngineStats, PrefixEntryView, SlotView
from .request import Completion, Continuation, Generation, Request, check_submission
from .runner import Runner
from .scheduler import drafts_pay, preemption_victim, waits_for
from .sequence import Slot, plan_for
from .speculative import Speculator
from .trace import Trace


class Engine:
    """Serve `parallel` sequences at once from one model and one context."""

    def __init__(self, model: Model | str, config: EngineConfig | None = None, *, context: Context | None = None,
                 inline: bool = False, **settings: Any):
        """Engine(model, EngineConfig(...)), or Engine(model, n_ctx=..., parallel=...) with EngineConfig's
        field names (an unknown one is a TypeError naming it).  context: run on this one (the caller's to
        close; it must hold the sequences the config sizes) instead of making one from the config.  inline:
        no thread of its own, the steps run on the thread that reads a request (see the module's note)."""
        self.config = cfg = replace(config or EngineConfig(), **settings)
        parallel, n_batch = cfg.parallel, cfg.n_batch
        self._own_model = not isinstance(model, Model)
        if not self._own_model and (cfg.n_gpu_layers or cfg.rpc_servers is not None):
            raise ValueError("n_gpu_layers, rpc_servers: give them to the Model when passing a loaded one")
        # weights keep ggml's extra buffers (AMX, repacked) with batch_invariant too: patch 0007 has those
        # kernels sum a row alike at any row count
        self.model = Model(model, n_gpu_layers=cfg.n_gpu_layers, rpc_servers=cfg.rpc_servers) \
            if self._own_model else model
        size = Sizing.of(self.model, cfg)
        self.n_cache = size.n_cache
        self._n_outputs = size.n_outputs
        n_holders = size.n_holders
        self._own_ctx = context is None
        if context is None:
            context = Context(self.model, n_ctx=cfg.n_ctx, n_seq_max=parallel + n_holders, n_rs_pool=size.n_rs_pool,
                              n_batch=n_batch, n_ubatch=min(cfg.n_ubatch or n_batch, n_batch),
                              n_threads=cfg.n_threads, n_threads_batch=cfg.n_threads_batch, kv_unified=True,
                              flash_attn=cfg.flash_attn, batch_invariant=cfg.batch_invariant, overrides=size.overrides)
        elif context.n_seq_max < parallel + n_holders:
            raise ValueError(f"context: holds {context.n_seq_max} sequences, this config needs {parallel + n_holders}")
        else:  # its output rows are its own: llama.cpp's default, n_batch, unless it was given fewer
            self._n_outputs = getattr(context.params, "n_outputs_max", 0) or context.n_batch
        self.ctx = context
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
        self._running: dict[int, Slot] = {}
        self._preempted: collections.deque[tuple[Slot, bytes]] = collections.deque()
        self._free = list(range(parallel - 1, -1, -1))
        self._closing = False
        self.failure: BaseException | None = None  # what stopped the engine thread, if anything did
        self._resume_blocked = False
        self._cancels = False  # a request was cancelled since the step last looked (set from any thread)
        self._admissions = itertools.count()
        self._counters = collections.Counter()
        self._t_decode = 0.0
        self._t_step = 0.0
        self._t_start = time.perf_counter()
        self._trace = Trace.from_env()
        self._draft_seqs = size.draft_seqs
        self._speculator = Speculator(self.ctx, self.model, cfg.draft_model, size.draft_max, size.stateful,
                                      self._batch, self._counters)
        self._runner = Runner(self.ctx, self.model, self._batch, self._speculator, self._counters, self._trace)
        self.inline = inline
        self._thread: threading.Thread | None = None
        if not inline:
            self._thread = threading.Thread(target=self._loop, name="pyllama-ssm-engine", daemon=True)
            self._thread.start()

    # -- public API ------------------------------------------------------------------------
    def submit(self, prompt: str | list[int], params: SamplingParams | None = None, *, max_tokens: int = 128,
               stop: list[str] | str | None = None, add_special: bool = True,
               logprobs: int | None = None, prompt_logprobs: bool = False,
               checkpoints: Iterable[int] = (), continues: Continuation | None = None) -> Request:
        """Queue a generation.  logprobs=k reports each token's log-probability and the k most
        likely alternatives (from the model's raw logits, as llama-cpp-python does).
        prompt_logprobs=True scores the prompt too, each token by the logits of the position
        before it (the prompt is then computed whole, not taken from the prefix cache).
        checkpoints: prompt positions (1..len(prompt)) where later prompts are likely to part from
        this one, e.g. a chat's turn boundaries: its prefill stops there and keeps a prefix-cache
        entry (recurrent memory exists only where it was saved; attention cells serve any prefix).
        continues: the request goes on from what sequence 0 holds and leaves its memory there (an inline
        Engine of one sequence and no prefix cache: the single-sequence Llama's)."""
        if self.failure is not None:
            raise self._failed()
        if self._closing:
            raise RuntimeError("engine is closed")
        tokens = self.model.tokenize(prompt, add_special=add_special) if isinstance(prompt, str) else list(prompt)
        checkpoints, stops = tuple(checkpoints), [stop] if isinstance(stop, str) else list(stop or [])
        check_submission(self, tokens, max_tokens, logprobs, checkpoints, continues)
        req = Request(self, tokens, params or SamplingParams(), max_tokens, stops, logprobs, prompt_logprobs,
                      checkpoints if self.takes_checkpoints else (), continues)
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
        return reports.stats(self)

    def slots(self) -> list[SlotView | None]:
        """What each sequence (index = sequence id) is doing: the request it runs, or None when idle (a
        request swapped out to host memory holds none).  Read on the engine thread, between two steps."""
        return self.call(lambda: reports.slots(self))

    def prefix_entries(self) -> list[PrefixEntryView]:
        """The prefix cache's entries, least recently added first.  Read on the engine thread."""
        return self.call(lambda: reports.prefix_entries(self)) if self.n_cache else []

    def memory(self) -> EngineMemory:
        return reports.memory(self)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._event.set()
        if self._thread is not None:
            self._thread.join()
        else:
            self._shut_down()
        self._trace.close()
        self.cache.clear()
        self._batch.close()
        if self._own_ctx:
            self.ctx.close()
        if self._own_model:
            self.model.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- engine thread ---------------------------------------------------------------------
    def _wake(self) -> None:
        self._cancels = True  # req.cancelled is set: it is dropped at the start of the next step
        self._event.set()

    def call(self, fn):
        """Run fn on the engine thread, between steps, and return its result: the way for anything
        that touches llama.cpp after start-up (context reads, adapters) to do so."""
        if self._thread is None or threading.current_thread() is self._thread or not self._thread.is_alive():
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
        self._shut_down()

    def pump(self, req: Request, whole: bool) -> None:
        """An inline Engine's steps, run by the thread that reads req: until req has a chunk to read
        (whole: until it ended).  One request's failure fails it alone, as on the thread; an exception that
        interrupts a step (KeyboardInterrupt) fails every running request, whose memory it left undefined."""
        while not req.done and (whole or not req._chunks):
            self._event.clear()
            self._take_inbox()
            if req.done:
                break
            if not (self._pending or self._running or self._preempted):
                raise RuntimeError(f"request {req.id}: not queued on this engine")
            try:
                self._step()
            except BaseException as e:  # noqa: BLE001 - as _loop: no single request to blame
                for slot in list(self._running.values()):
                    self._release(slot, "error", e)
                if not isinstance(e, Exception):
                    raise

    def _shut_down(self) -> None:
        """What is left when the Engine closes: calls answered, requests ended."""
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

    # -- admission ---------------------------------------------------------------------------
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
        steps = self._counters["steps"]
        wait = waits_for(req.prompt, hit.n_tokens if hit else 0, (s.facts(steps) for s in self._running.values()))
        if wait is None:
            return False
        leader, at = wait
        self._running[leader].share_at.add(at)  # its prefill stops there and keeps a prefix-cache entry
        return True

    def _start(self, req: Request) -> None:
        """Move a queued request into a free sequence; anything it raises fails it alone."""
        try:
            sampler = Sampler(self.model, req.params)
        except Exception as e:  # noqa: BLE001 - a grammar llama.cpp refuses, a value cffi cannot convert...
            self._pending.remove(req)
            req._finish("error", e)
            return
        slot = Slot(req, self._free.pop(), sampler, Generation.of(req), admitted=next(self._admissions),
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
            if req.continues is not None:  # sequence 0 holds the first `resident` prompt tokens already
                self._continue(slot, req.continues)
            if self._trace.on:
                self._trace.event("start", req=req.id, seq=slot.seq, cached=slot.cursor, queued=len(self._pending))
        except Exception as e:  # noqa: BLE001
            self._release(slot, "error", e)

    def _continue(self, slot: Slot, cont: Continuation) -> None:
        slot.cursor = slot.pos = slot.gen.usage.cached_tokens = cont.resident
        if cont.live and (reason := self._runner.sample_live(slot)) is not None:
            self._finish(slot, reason)

    # -- the step ------------------------------------------------------------------------------
    def _step(self) -> None:
        t0 = time.perf_counter()
        if self._cancels:  # cleared before the scans: a cancel from now on sets it again for the next step
            self._cancels = False
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
        speculator, runner = self._speculator, self._runner
        drafting = speculator.draft_max and drafts_pay(sum(s.next_token is not None for s in self._running.values()),
                                                       self._draft_seqs)
        if drafting:
            for slot in list(self._running.values()):
                try:
                    speculator.propose(slot, self.n_ctx)
                except Exception as e:  # noqa: BLE001 - a failing draft model fails its request alone
                    self._release(slot, "error", e)
        plan = plan_for(self._running.values(), self._counters["steps"], self.n_batch, self._n_outputs,
                        checkpoints=bool(self.n_cache), draft_budget=speculator.draft_max)
        outputs, verify, prefill, scored = runner.fill(plan, self._running)
        batch = self._batch
        if batch.n_tokens == 0:
            return
        t1 = time.perf_counter()
        try:
            self.ctx.decode(batch)
        except MemoryFullError:
            for slot in self._running.values():  # the step did not happen: nothing to verify
                speculator.drop(slot)
            self._relieve_memory()
            self._t_step += time.perf_counter() - t0
            return
        self.ctx.synchronize()  # on a GPU decode returns once queued: its compute is decode time, not Python's
        t2 = time.perf_counter()
        self._t_decode += t2 - t1
        runner.decoded(outputs, verify)
        if self._trace.on:
            self._trace.event("step", t0=round(t0, 6), decode_s=round(t2 - t1, 6), n=batch.n_tokens,
                              decode=[self._running[s].req.id for s in plan.decode], drafts=sum(plan.drafts),
                              prefill=[[self._running[c.seq].req.id, c.start, c.n] for c in plan.prefill])
        self._counters["steps"] += 1
        self._counters["decoded"] += batch.n_tokens
        for slot, first, n in scored:
            try:
                runner.score_prompt(slot, first, n)
            except Exception as e:  # noqa: BLE001 - this request alone fails
                self._release(slot, "error", e)
        for slot, n in prefill:
            if slot.seq not in self._running:
                continue
            slot.cursor += n
            slot.pos += n
            if slot.req.score_prompt and slot.cursor == len(slot.req.prompt):
                slot.req._scored_prompt(slot.gen)  # the caller may read them before the first chunk
            if self.n_cache and retention.is_checkpoint(slot.facts(self._counters["steps"])):
                self._keep_prefix(slot, slot.req.prompt[:slot.cursor])
        for slot, idx in outputs:
            if slot.seq not in self._running:  # failed while scoring its prompt
                continue
            fed = slot.next_token is not None
            if fed:
                slot.pos += 1
            if slot.req.max_tokens == 0:  # prompt logprobs only
                self._release(slot, "length")
                continue
            try:
                if fed and slot.req.keeps_logits:
                    runner.keep_logits(slot, idx)
                if (reason := runner.sample(slot, idx)) is not None:
                    self._finish(slot, reason)
                for k, draft_idx in enumerate(verify.get(slot.seq, ())):
                    # the token just sampled is the draft's next: its logits (fed after it) sample on
                    if slot.seq not in self._running or slot.finishing or slot.next_token != slot.spec.fed[k + 1]:
                        break
                    self._counters["accepted"] += 1
                    slot.pos += 1
                    if slot.req.keeps_logits:
                        runner.keep_logits(slot, draft_idx)
                    if (reason := runner.sample(slot, draft_idx)) is not None:
                        self._finish(slot, reason)
            except Exception as e:  # the request's own logits processor or grammar: it alone fails
                if slot.seq in self._running:
                    self._release(slot, "error", e)
        if verify:
            self._settle([self._running[seq] for seq in verify if seq in self._running])
        self._t_step += time.perf_counter() - t0

    def _settle(self, slots: list[Slot]) -> None:
        """Undo the rejected drafts (Speculator.settle), then carry out the finishes that waited for it."""
        failed, error = self._speculator.settle(slots)
        for slot in failed:
            self._release(slot, "error", error)
        for slot in slots:
            if slot.seq in self._running and slot.finishing:
                self._finish(slot, slot.finishing)

    # -- the end of a request -----------------------------------------------------------------
    def _finish(self, slot: Slot, reason: str) -> None:
        if slot.spec is not None:  # rejected draft tokens are still in its memory: _settle finishes it
            slot.finishing = reason
            return
        req, gen = slot.req, slot.gen
        self._runner.flush(slot)
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

    def _keep_prefix(self, slot: Slot, tokens: Sequence[int]) -> None:
        """A prefix-cache entry for slot's memory, which holds `tokens`, and the entries it supersedes
        dropped (retention.superseded, retention.replaced): a chat keeps its turn boundaries and the
        positions others wait for."""
        turns = {*slot.req.checkpoints, *slot.share_at} if slot.req.checkpoints else None
        if self.cache.keep(slot.seq, tokens, slot.resumed_entry, turns):
            slot.resumed_entry = None

    def _release(self, slot: Slot, reason: str, error: BaseException | None = None) -> None:
        del self._running[slot.seq]
        if self._trace.on:
            self._trace.event("end", req=slot.req.id, reason=reason, tokens=len(slot.gen.tokens))
        slot.gen.n_past = slot.pos
        try:
            self._speculator.drop(slot)
            if slot.req.continues is None or error is not None:
                self.ctx.seq_rm(slot.seq)
            self._free.append(slot.seq)  # only a cleared sequence id is used again (or the continued one)
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
            steps = self._counters["steps"]
            slot = self._running[preemption_victim(s.facts(steps) for s in self._running.values())]
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
