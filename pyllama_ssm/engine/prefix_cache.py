"""Prefix cache: model memory at known token prefixes, shared with the sequences that hit it.

Where a prefix's memory lives depends on the model:
- recurrent and hybrid models (patched build): a snapshot of the shared recurrent
  pool (patch 0002); for hybrids it also keeps the prefix's attention cells
  referenced, so a hit restores both memories without recomputing or copying.
  A hit needs the whole entry to be a prefix of the prompt: a recurrent state
  exists only at the position where it was taken.
- attention-only models: a spare "holder" sequence id of the context, which
  shares the prefix's cells in the unified KV (seq_cp: no copy). KV cells are
  per position, so a hit may use any leading part of an entry.
A hit on the longest usable entry resumes from there. Entries are evicted
least-recently-used first, weighed by how many tokens they would cost to
recompute, to stay within a count and a byte budget. The byte budget is on
what the cache adds to the process's memory: an entry's recurrent state cell
(the pool's host buffers commit pages as cells are used, patch 0006).  Its
attention cells stay in the context's KV cache, which is allocated and resident
whole whatever holds its cells: counting them only evicted prefixes for nothing
(SmolLM2, 8 chat users: 2.9x the new tokens recomputed per turn, 1.0x without,
at the same peak RSS).  They are reported (`tokens`), and a step that finds the
KV full drops cached prefixes first (Engine._relieve_memory).
"""

from __future__ import annotations

import itertools
from collections.abc import Container
from dataclasses import dataclass, field

from ..context import Context
from ..errors import PoolExhaustedError, SnapshotError
from .scheduler import common_prefix


class PoolStore:
    """Entries as snapshots of the recurrent pool (patched build, recurrent or hybrid models)."""

    partial = False  # a state exists only at the entry's own length

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def save(self, seq_id: int) -> int:
        return self.ctx.snapshot(seq_id)

    def load(self, handle: int, seq_id: int, n_tokens: int) -> None:
        self.ctx.restore(handle, seq_id)

    def drop(self, handle: int) -> None:
        self.ctx.release(handle)


class HolderStore:
    """Entries as holder sequences sharing the prefix's cells in a unified KV (attention-only models)."""

    partial = True  # cells are per position: any leading part of an entry serves

    def __init__(self, ctx: Context, seq_ids: range):
        self.ctx = ctx
        self.free = list(reversed(seq_ids))

    def save(self, seq_id: int) -> int:
        if not self.free:
            raise PoolExhaustedError("no free holder sequence for another prefix")
        holder = self.free.pop()
        self.ctx.seq_cp(seq_id, holder)
        return holder

    def load(self, handle: int, seq_id: int, n_tokens: int) -> None:
        self.ctx.seq_rm(seq_id)
        self.ctx.seq_cp(handle, seq_id, 0, n_tokens)

    def drop(self, handle: int) -> None:
        self.ctx.seq_rm(handle)
        self.free.append(handle)


Store = PoolStore | HolderStore


@dataclass
class Entry:
    tokens: tuple[int, ...]
    handle: int
    last_used: int
    hits: int = 0
    tail: tuple[int, ...] | None = None  # a chat turn boundary's: the answer's tail entry that extends it


@dataclass
class Hit:
    entry: Entry
    n_tokens: int  # leading tokens of the entry the prompt shares (all of them for pool entries)


@dataclass
class PrefixCache:
    store: Store
    max_entries: int
    max_bytes: int | None = None
    entries: dict[tuple[int, ...], Entry] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0
    _clock: itertools.count = field(default_factory=itertools.count)
    _cell_bytes: tuple[int, int] | None = field(default=None, init=False, repr=False)

    def entry_bytes(self, n_tokens: int) -> int:  # noqa: ARG002 - per entry, whatever its length
        """The memory an entry adds: its recurrent state cell (none on attention-only models)."""
        if self._cell_bytes is None:  # fixed by the context's shapes: read once
            rep = self.store.ctx.memory_report()
            self._cell_bytes = (rep.rs_bytes_per_cell, rep.kv_bytes_per_cell)
        return self._cell_bytes[0]

    @property
    def bytes(self) -> int:
        return sum(self.entry_bytes(len(k)) for k in self.entries)

    @property
    def tokens(self) -> int:
        """Attention cells the entries can keep alive on their own (shared prefixes counted once each)."""
        return sum(len(k) for k in self.entries)

    def peek(self, prompt: list[int]) -> Hit | None:
        """The longest usable entry for prompt (one prompt token must remain to decode); no bookkeeping."""
        best: Hit | None = None
        for key, e in self.entries.items():
            n = common_prefix(key, prompt, len(prompt) - 1)
            if n < len(key) and not self.store.partial:
                continue
            if n > 0 and (best is None or n > best.n_tokens):
                best = Hit(e, n)
        return best

    def lookup(self, prompt: list[int]) -> Hit | None:
        """peek(), counted as a hit or a miss and marking the entry used.  A hit on a chat's turn boundary
        whose prompt parts from the answer's tail that followed it (the history re-tokenized the answer,
        or the answer was edited) drops that tail if nobody used it: the conversation has moved on."""
        best = self.peek(prompt)
        if best is None:
            self.misses += 1
        else:
            self.hits += 1
            best.entry.hits += 1
            best.entry.last_used = next(self._clock)
            tail = self.entries.get(best.entry.tail) if best.entry.tail is not None else None
            if tail is not None and tail.hits == 0 and tuple(prompt[:len(tail.tokens)]) != tail.tokens:
                self.drop(tail.tokens)
        return best

    def restore(self, hit: Hit, seq_id: int) -> None:
        self.store.load(hit.entry.handle, seq_id, hit.n_tokens)

    def add(self, seq_id: int, tokens: list[int]) -> bool:
        """Save seq_id's memory, which holds exactly `tokens`; False when there is no room."""
        key = tuple(tokens)
        if not key or key in self.entries or self.max_entries <= 0:
            if key in self.entries:
                self.entries[key].last_used = next(self._clock)
            return False
        if self.max_bytes is not None and self.entry_bytes(len(key)) > self.max_bytes:
            return False
        while len(self.entries) >= self.max_entries or (
                self.max_bytes is not None and self.entries
                and self.bytes + self.entry_bytes(len(key)) > self.max_bytes):
            self.evict_one()
        for _ in range(2):
            try:
                handle = self.store.save(seq_id)
            except PoolExhaustedError:
                if not self.evict_one():
                    return False
                continue
            except SnapshotError:
                return False
            self.entries[key] = Entry(key, handle, next(self._clock))
            return True
        return False

    def drop_superseded(self, key: tuple[int, ...], resumed: tuple[int, ...] | None, keep: Container[int]) -> None:
        """Drop the entries that `key` extends and nobody else used: never hit, or hit once by the request
        now extending them (`resumed`).  Lengths in `keep` stay (turn boundaries, positions others wait for)."""
        for k, e in list(self.entries.items()):
            if len(k) < len(key) and len(k) not in keep and e.hits <= (k == resumed) and key[:len(k)] == k:
                self.drop(k)

    def drop(self, key: tuple[int, ...]) -> None:
        """Drop the entry for these tokens, if any."""
        if (e := self.entries.pop(key, None)) is not None:
            self.store.drop(e.handle)

    def evict_one(self) -> bool:
        if not self.entries:
            return False
        # least recently used first; among equals, the cheapest to recompute
        victim = min(self.entries.values(), key=lambda e: (e.last_used, len(e.tokens)))
        self.store.drop(victim.handle)
        del self.entries[victim.tokens]
        return True

    def clear(self) -> None:
        while self.evict_one():
            pass
