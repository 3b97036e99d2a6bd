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

Which entries stay when one is added, and which goes first when the cache is full, is decided by
retention.py; this module carries it out on the context.
"""

from __future__ import annotations

import itertools
from collections.abc import Container
from dataclasses import dataclass, field

from ..context import Context
from ..errors import PoolExhaustedError, SnapshotError
from .retention import Entry, eviction_victim, replaced, stale_tail, superseded
from .scheduler import common_prefix


class _ContextStore:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def entry_bytes(self) -> int:
        """What one entry adds to the memory: a recurrent state cell (none on attention-only models)."""
        return self.ctx.memory_report().rs_bytes_per_cell


class PoolStore(_ContextStore):
    """Entries as snapshots of the recurrent pool (patched build, recurrent or hybrid models)."""

    partial = False  # a state exists only at the entry's own length

    def save(self, seq_id: int) -> int:
        return self.ctx.snapshot(seq_id)

    def load(self, handle: int, seq_id: int, n_tokens: int) -> None:
        self.ctx.restore(handle, seq_id)

    def drop(self, handle: int) -> None:
        self.ctx.release(handle)


class HolderStore(_ContextStore):
    """Entries as holder sequences sharing the prefix's cells in a unified KV (attention-only models)."""

    partial = True  # cells are per position: any leading part of an entry serves

    def __init__(self, ctx: Context, seq_ids: range):
        super().__init__(ctx)
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
    _cell_bytes: int | None = field(default=None, init=False, repr=False)

    def entry_bytes(self, n_tokens: int) -> int:  # noqa: ARG002 - per entry, whatever its length
        """The memory an entry adds: its recurrent state cell (none on attention-only models)."""
        if self._cell_bytes is None:  # fixed by the context's shapes: read once
            self._cell_bytes = self.store.entry_bytes()
        return self._cell_bytes

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
            if (tail := stale_tail(self.entries, best.entry, prompt)) is not None:
                self.drop(tail)
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

    def keep(self, seq_id: int, tokens: list[int] | tuple[int, ...], resumed: tuple[int, ...] | None,
             turns: Container[int] | None) -> bool:
        """An entry for seq_id's memory, which holds `tokens`, and the entries it supersedes dropped
        (retention.py): a chat's (`turns`: the positions it keeps, its turn boundaries and those others
        wait for) before it is added, a plain completion's (turns=None) once it is.  `resumed`: the entry
        the sequence resumed from.  False when it was not added (already there, or no room)."""
        key = tuple(tokens)
        if turns is not None and key not in self.entries:
            for k in superseded(self.entries, key, resumed, turns):
                self.drop(k)
        if not self.add(seq_id, key):
            return False
        if turns is None and (old := replaced(self.entries, key, resumed)) is not None:
            self.drop(old)
        return True

    def link_tail(self, boundary: tuple[int, ...], tail: tuple[int, ...]) -> None:
        """Remember at a chat's turn boundary the answer's tail entry after it (see retention.stale_tail)."""
        if tail in self.entries and (entry := self.entries.get(boundary)) is not None:
            entry.tail = tail

    def drop(self, key: tuple[int, ...]) -> None:
        """Drop the entry for these tokens, if any."""
        if (e := self.entries.pop(key, None)) is not None:
            self.store.drop(e.handle)

    def evict_one(self) -> bool:
        if (victim := eviction_victim(self.entries)) is None:
            return False
        self.store.drop(self.entries[victim].handle)
        del self.entries[victim]
        return True

    def clear(self) -> None:
        while self.evict_one():
            pass
