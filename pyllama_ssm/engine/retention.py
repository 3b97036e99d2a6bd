"""Which prompt prefixes the prefix cache keeps, and which it gives up, decided from plain data.

prefix_cache.py saves, restores and drops entries; the decisions are here, over the entries' tokens
and counters alone, so every rule is unit-tested without a model (tests/test_retention.py):

- is_checkpoint: a prefilling sequence keeps an entry where later prompts are likely to part from
  its own: a multiple of the checkpoint interval in a plain completion, a position a queued request
  waits for, a chat's turn boundary.
- finished_prefix: a finished sequence keeps what its memory holds (its prompt and answer) for the
  next turn; turn_boundary: the chat's last turn boundary before it, which remembers that tail.
- superseded, replaced: once a sequence adds an entry, the entries it extends that nobody else used
  give way.  A conversation keeps its newest tail, not one per turn, while prefixes others share (a
  system prompt) stay; a chat keeps its turn boundaries too (where a re-tokenized answer parts from
  the tail), and nothing else (an 8-user chat on nemotron_h-small otherwise filled the cache with
  its interval checkpoints and earlier turns, 32 entries of 7 MiB).
- stale_tail: a hit on a turn boundary whose prompt parts from the tail that followed it (the history
  re-tokenized the answer, or the answer was edited) drops that tail if nobody used it.
- eviction_victim: a full cache gives up the least recently used entry first, the cheapest to
  recompute among equals.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass

from .scheduler import CHECKPOINT_INTERVAL, SeqFacts

Key = tuple[int, ...]  # an entry's tokens


@dataclass
class Entry:
    tokens: Key
    handle: int          # the store's: a pool snapshot or a holder sequence id
    last_used: int       # the cache's clock when it was added or last hit
    hits: int = 0        # requests that resumed from it
    tail: Key | None = None  # a chat turn boundary's: the answer's tail entry that extends it


def is_checkpoint(s: SeqFacts) -> bool:
    """Whether the prompt position s.cursor deserves a prefix-cache entry: a multiple of the interval
    inside a prompt without turn boundaries, or a position others part at (a queued request's, a chat's
    turn boundary, which may be the prompt's end)."""
    if s.cursor in s.share_at:
        return 0 < s.cursor <= len(s.prompt)
    return not s.turns and 0 < s.cursor < len(s.prompt) and s.cursor % CHECKPOINT_INTERVAL == 0


def finished_prefix(prompt: Sequence[int], generated: Sequence[int]) -> Key:
    """What a finished sequence's memory holds: its prompt and every generated token but the last,
    which was sampled and never fed."""
    return (*prompt, *generated[:-1])


def turn_boundary(tail: Key, checkpoints: Sequence[int]) -> Key:
    """The entry at a chat's last turn boundary, which the tail of its answer extends."""
    return tail[:max(checkpoints)]


def superseded(entries: Mapping[Key, Entry], key: Key, resumed: Key | None, keep: Container[int]) -> list[Key]:
    """A chat's entries that its new entry `key` extends and nobody else used: never hit, or hit once by
    the request now extending them (`resumed`, the entry it resumed from).  Lengths in `keep` stay (turn
    boundaries, positions others wait for).  Dropped before `key` is added, so that a cache at its bound
    does not evict another conversation's entry for this one."""
    return [k for k, e in entries.items()
            if len(k) < len(key) and len(k) not in keep and e.hits <= (k == resumed) and key[:len(k)] == k]


def replaced(entries: Mapping[Key, Entry], key: Key, resumed: Key | None) -> Key | None:
    """The entry a plain completion's new entry `key` replaces: the one it resumed from, once `key`
    extends it, unless another request resumed from it too."""
    entry = entries.get(resumed) if resumed is not None else None
    if entry is not None and entry.hits <= 1 and len(resumed) < len(key) and key[:len(resumed)] == resumed:
        return resumed
    return None


def stale_tail(entries: Mapping[Key, Entry], hit: Entry, prompt: Sequence[int]) -> Key | None:
    """The tail that followed the turn boundary `hit`, if the prompt that hit it parts from that tail
    and nobody used it: the conversation has moved on."""
    tail = entries.get(hit.tail) if hit.tail is not None else None
    if tail is not None and tail.hits == 0 and tuple(prompt[:len(tail.tokens)]) != tail.tokens:
        return tail.tokens
    return None


def eviction_victim(entries: Mapping[Key, Entry]) -> Key | None:
    """The entry a full cache gives up: least recently used first; among equals, the cheapest to recompute."""
    if not entries:
        return None
    return min(entries.values(), key=lambda e: (e.last_used, len(e.tokens))).tokens
