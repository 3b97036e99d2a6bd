"""What an Engine reports of itself: its counters (stats), its memory, its sequences and its prefix cache."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .. import memory as memory_mod

if TYPE_CHECKING:
    from .core import Engine


@dataclass
class EngineStats:
    queued: int
    running: int
    preempted: int
    steps: int
    tokens_decoded: int
    tokens_generated: int
    tokens_per_second: float
    decode_seconds: float     # in llama_decode and waiting for the device to finish it
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
        """Share of step time spent outside llama_decode (and the device's work for it)."""
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


# -- read from an Engine's state (slots and prefix_entries on its thread, between steps) ----------------
def stats(engine: "Engine") -> EngineStats:
    c, cache = engine._counters, engine.cache
    elapsed = max(time.perf_counter() - engine._t_start, 1e-9)
    queued = len(engine._pending) + sum(not isinstance(x, tuple) for x in list(engine._inbox))
    return EngineStats(
        queued=queued, running=len(engine._running), preempted=len(engine._preempted),
        steps=c["steps"], tokens_decoded=c["decoded"], tokens_generated=c["generated"],
        tokens_per_second=c["generated"] / elapsed, decode_seconds=engine._t_decode, step_seconds=engine._t_step,
        prefix_hits=cache.hits, prefix_misses=cache.misses, cached_prefixes=len(cache.entries),
        draft_tokens=c["drafted"], draft_accepted=c["accepted"])


def slots(engine: "Engine") -> list[SlotView | None]:
    out: list[SlotView | None] = [None] * engine.parallel
    for seq, slot in engine._running.items():
        req, gen = slot.req, slot.gen
        out[seq] = SlotView(seq, req.id, "prefill" if slot.cursor < len(req.prompt) else "decode", len(req.prompt),
                            slot.cursor, gen.usage.cached_tokens, len(gen.tokens), req.max_tokens)
    return out


def prefix_entries(engine: "Engine") -> list[PrefixEntryView]:
    cache = engine.cache
    return [PrefixEntryView(len(key), cache.entry_bytes(len(key)), entry.hits) for key, entry in cache.entries.items()]


def memory(engine: "Engine") -> EngineMemory:
    report = pool = None
    if memory_mod.available():
        report = engine.call(engine.ctx.memory_report)
        if engine.n_cache:
            pool = engine.call(engine.ctx.pool_stats)
    swapped = sum(len(state) for _, state in list(engine._preempted))
    cached, tokens = engine.call(lambda: (engine.cache.bytes, engine.cache.tokens)) if engine.n_cache else (0, 0)
    return EngineMemory(report, swapped, len(engine.cache.entries), cached, pool, tokens,
                        engine.n_cache, engine.cache.max_bytes if engine.n_cache else 0)
