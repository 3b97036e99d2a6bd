"""Which prefixes the prefix cache keeps and gives up, on plain data: no model, no llama.cpp.

retention.py's rules over entries built by hand, then PrefixCache carrying them out over a store that
only hands out handles (what a context's memory would hold, counted).
"""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from pyllama_ssm.engine.prefix_cache import PrefixCache
from pyllama_ssm.engine.retention import (Entry, eviction_victim, finished_prefix, is_checkpoint, replaced, stale_tail,
                                          superseded, turn_boundary)
from pyllama_ssm.engine.scheduler import CHECKPOINT_INTERVAL, SeqFacts
from pyllama_ssm.errors import PoolExhaustedError

SYSTEM = tuple(range(100, 110))


def entries(*specs: tuple[tuple[int, ...], int]) -> dict[tuple[int, ...], Entry]:
    """Entries from (tokens, hits), added in this order (last_used counts up)."""
    return {tokens: Entry(tokens, handle=i, last_used=i, hits=hits) for i, (tokens, hits) in enumerate(specs)}


class FakeStore:
    """What PrefixCache asks of a context's memory, as bare handles: save, load, drop, the bytes of one."""

    def __init__(self, partial: bool = False, entry_bytes: int = 1000, room: int | None = None):
        self.partial = partial
        self.room = room             # handles it can hold at once (a pool's free cells), None: any
        self.live: set[int] = set()
        self.bytes_reads = 0
        self._entry_bytes = entry_bytes
        self._handles = itertools.count()

    def save(self, seq_id: int) -> int:
        if self.room is not None and len(self.live) >= self.room:
            raise PoolExhaustedError("no free cell")
        handle = next(self._handles)
        self.live.add(handle)
        return handle

    def load(self, handle: int, seq_id: int, n_tokens: int) -> None:
        assert handle in self.live

    def drop(self, handle: int) -> None:
        self.live.remove(handle)

    def entry_bytes(self) -> int:
        self.bytes_reads += 1
        return self._entry_bytes


def test_a_chats_new_entry_supersedes_what_it_extends_that_nobody_else_used():
    turn1 = SYSTEM + (1, 2, 3)
    tail1 = turn1 + (4, 5)
    es = entries((SYSTEM, 3), (turn1, 0), (tail1, 1), ((7, 8, 9), 0))
    new = tail1 + (6, 7, 8)
    # the turn boundary stays; the tail this request resumed from (its only hit) goes; the system prompt
    # others resumed from stays; another conversation's entry is not a prefix of it
    assert superseded(es, new, resumed=tail1, keep={len(turn1)}) == [tail1]
    assert superseded(es, new, resumed=tail1, keep=()) == [turn1, tail1]
    # the tail was resumed from by another request: it stays
    assert superseded(es, new, resumed=None, keep={len(turn1)}) == []
    assert superseded(es, tail1, resumed=None, keep=()) == [turn1]  # never longer than itself


def test_a_completion_replaces_the_entry_it_resumed_from_unless_another_request_shares_it():
    first = SYSTEM + (1, 2)
    es = entries((first, 1))
    assert replaced(es, first + (3, 4), first) == first
    assert replaced(es, first + (3, 4), None) is None
    assert replaced(es, SYSTEM + (9,), first) is None  # not an extension of it
    assert replaced(es, first, first) is None          # itself
    es[first].hits = 2
    assert replaced(es, first + (3, 4), first) is None


def test_a_hit_on_a_turn_boundary_drops_the_tail_the_conversation_parted_from():
    boundary, tail = SYSTEM + (1,), SYSTEM + (1, 2, 3)
    es = entries((boundary, 1), (tail, 0))
    es[boundary].tail = tail
    assert stale_tail(es, es[boundary], list(boundary) + [9, 9, 9]) == tail  # answer re-tokenized or edited
    assert stale_tail(es, es[boundary], list(tail) + [9]) is None          # the conversation goes on
    es[tail].hits = 1
    assert stale_tail(es, es[boundary], list(boundary) + [9, 9, 9]) is None  # somebody used it
    del es[tail]
    assert stale_tail(es, es[boundary], list(boundary) + [9]) is None        # evicted already


def test_a_full_cache_gives_up_the_least_recently_used_then_the_cheapest():
    es = entries((SYSTEM, 5), ((1, 2), 0), ((3,), 0))
    assert eviction_victim(es) == SYSTEM
    es[SYSTEM].last_used = es[(1, 2)].last_used = es[(3,)].last_used = 7
    assert eviction_victim(es) == (3,)
    assert eviction_victim({}) is None


def test_a_finished_sequence_keeps_its_memory_and_its_chat_boundary_remembers_it():
    prompt, answer = [1, 2, 3, 4], [5, 6, 7]
    tail = finished_prefix(prompt, answer)
    assert tail == (1, 2, 3, 4, 5, 6)  # the last token was sampled, never fed
    assert turn_boundary(tail, (2, 4)) == (1, 2, 3, 4)


def test_checkpoints_are_intervals_in_completions_and_shared_positions_in_chats():
    prompt = list(range(3 * CHECKPOINT_INTERVAL))
    assert is_checkpoint(SeqFacts(0, 0, prompt, CHECKPOINT_INTERVAL, False))
    assert not is_checkpoint(SeqFacts(0, 0, prompt, CHECKPOINT_INTERVAL + 1, False))
    assert not is_checkpoint(SeqFacts(0, 0, prompt, len(prompt), True))  # the prompt's end: its tail follows
    assert not is_checkpoint(SeqFacts(0, 0, prompt, CHECKPOINT_INTERVAL, False, turns=True))
    assert is_checkpoint(SeqFacts(0, 0, prompt, 70, False, share_at={70}, turns=True))
    assert is_checkpoint(SeqFacts(0, 0, prompt, len(prompt), True, share_at={len(prompt)}))


def test_the_bytes_of_an_entry_are_read_once_and_bound_the_cache():
    store = FakeStore(entry_bytes=1000)
    cache = PrefixCache(store, max_entries=8, max_bytes=2500)
    for i in range(4):
        assert cache.add(0, [i, i])
    assert len(cache.entries) == 2 and cache.bytes == 2000 and store.bytes_reads == 1
    assert set(cache.entries) == {(2, 2), (3, 3)}  # the oldest gave way
    assert not PrefixCache(FakeStore(entry_bytes=3000), max_entries=8, max_bytes=2500).add(0, [1])


def test_a_chat_drops_its_superseded_entries_before_adding_so_another_conversation_keeps_its_own():
    store = FakeStore()
    cache = PrefixCache(store, max_entries=2)
    other = (7, 7, 7)
    cache.add(1, list(other))           # the oldest: what an eviction would take
    old_tail = SYSTEM + (1, 2)
    cache.add(0, list(old_tail))
    hit = cache.lookup(list(old_tail) + [3])
    assert hit is not None and hit.entry.tokens == old_tail
    assert cache.keep(0, old_tail + (3, 4), resumed=old_tail, turns={len(SYSTEM)})
    assert set(cache.entries) == {other, old_tail + (3, 4)}
    assert store.live == {e.handle for e in cache.entries.values()}


def test_a_completion_keeps_one_tail_while_a_shared_prefix_stays():
    cache = PrefixCache(FakeStore(), max_entries=8)
    cache.add(0, list(SYSTEM))
    assert cache.lookup(list(SYSTEM) + [1, 2]).entry.tokens == SYSTEM
    assert cache.keep(0, SYSTEM + (1,), resumed=SYSTEM, turns=None)
    assert set(cache.entries) == {SYSTEM + (1,)}  # nobody else resumed from it: replaced
    cache.add(0, list(SYSTEM))
    for _ in range(2):  # two requests resume from it
        cache.lookup(list(SYSTEM) + [5, 6])
    assert cache.keep(1, SYSTEM + (5,), resumed=SYSTEM, turns=None)
    assert SYSTEM in cache.entries
    assert not cache.keep(1, SYSTEM + (5,), resumed=SYSTEM, turns=None)  # already there: nothing changes


def test_a_stale_tail_goes_when_its_boundary_is_hit():
    cache = PrefixCache(FakeStore(), max_entries=8)
    boundary, tail = SYSTEM + (1,), SYSTEM + (1, 2, 3)
    cache.add(0, list(boundary))
    cache.add(0, list(tail))
    cache.link_tail(boundary, tail)
    cache.lookup(list(boundary) + [8, 8])
    assert set(cache.entries) == {boundary}


@given(st.lists(st.tuples(st.sampled_from(["keep", "keep_chat", "lookup", "evict"]),
                          st.lists(st.integers(0, 3), min_size=1, max_size=8)), max_size=40),
       st.integers(1, 5), st.sampled_from([None, 2500]), st.sampled_from([None, 3]))
def test_any_sequence_of_operations_keeps_the_bounds_and_leaks_no_handle(ops, max_entries, max_bytes, room):
    store = FakeStore(room=room)
    cache = PrefixCache(store, max_entries=max_entries, max_bytes=max_bytes)
    resumed = None
    for op, tokens in ops:
        if op == "lookup":
            hit = cache.lookup(tokens)
            resumed = hit.entry.tokens if hit is not None else None
        elif op == "evict":
            cache.evict_one()
        else:
            turns = {1, len(tokens)} if op == "keep_chat" else None
            if cache.keep(0, tokens, resumed, turns):
                resumed = None
                assert tuple(tokens) in cache.entries
        assert len(cache.entries) <= max_entries
        assert max_bytes is None or cache.bytes <= max_bytes
        assert store.live == {e.handle for e in cache.entries.values()}
        assert all(key == e.tokens for key, e in cache.entries.items())
