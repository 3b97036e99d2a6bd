"""Prefix cache: recurrent (+ attention) states at known token prefixes.

Each entry is a snapshot handle of the shared recurrent pool (patch 0002) and
the exact tokens whose state it holds.  For hybrids the snapshot also keeps the
prefix's attention cells referenced, so a hit restores both memories without
recomputing or copying.  A hit on any entry at or before the common prefix
resumes from there; entries are evicted least-recently-used first, weighed by
how many tokens they would cost to recompute, to stay within a count and a
byte budget.  An entry's bytes are what it can keep alive on its own: one
recurrent state cell plus, for hybrids, the attention cells of its prefix.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from .context import Context
from .errors import PoolExhaustedError, SnapshotError


@dataclass
class Entry:
    tokens: tuple[int, ...]
    handle: int
    last_used: int
    hits: int = 0


@dataclass
class PrefixCache:
    ctx: Context
    max_entries: int
    max_bytes: int | None = None
    entries: dict[tuple[int, ...], Entry] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0
    _clock: itertools.count = field(default_factory=itertools.count)
    _cell_bytes: tuple[int, int] | None = field(default=None, init=False, repr=False)

    def entry_bytes(self, n_tokens: int) -> int:
        if self._cell_bytes is None:  # fixed by the context's shapes: read once
            rep = self.ctx.memory_report()
            self._cell_bytes = (rep.rs_bytes_per_cell, rep.kv_bytes_per_cell)
        rs, kv = self._cell_bytes
        return rs + n_tokens * kv

    @property
    def bytes(self) -> int:
        return sum(self.entry_bytes(len(k)) for k in self.entries)

    def lookup(self, prompt: list[int]) -> Entry | None:
        """The longest entry that is a proper prefix of prompt (one token must remain to decode)."""
        best = None
        for key, e in self.entries.items():
            n = len(key)
            if n < len(prompt) and (best is None or n > len(best.tokens)) and tuple(prompt[:n]) == key:
                best = e
        if best is None:
            self.misses += 1
        else:
            self.hits += 1
            best.hits += 1
            best.last_used = next(self._clock)
        return best

    def add(self, seq_id: int, tokens: list[int]) -> bool:
        """Snapshot seq_id, whose memory holds exactly `tokens`; False when the pool has no room."""
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
                handle = self.ctx.snapshot(seq_id)
            except PoolExhaustedError:
                if not self.evict_one():
                    return False
                continue
            except SnapshotError:
                return False
            self.entries[key] = Entry(key, handle, next(self._clock))
            return True
        return False

    def evict_one(self) -> bool:
        if not self.entries:
            return False
        # least recently used first; among equals, the cheapest to recompute
        victim = min(self.entries.values(), key=lambda e: (e.last_used, len(e.tokens)))
        self.ctx.release(victim.handle)
        del self.entries[victim.tokens]
        return True

    def clear(self) -> None:
        while self.evict_one():
            pass
