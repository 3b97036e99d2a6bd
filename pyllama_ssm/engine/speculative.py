"""Speculative decoding: draft tokens proposed for a sequence, verified in its step, the rejected undone.

A draft model proposes what follows each decoding sequence; the step feeds those tokens after the
sampled one, and the sampler keeps the longest run it agrees with.  Undoing the rest costs nothing on
attention (its cells are removed) and a snapshot of the sequence's recurrent state on recurrent and
hybrid models (taken before the step, restored after it, and the kept tokens decoded again).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np

from ..batch import Batch
from ..context import Context
from ..errors import PoolExhaustedError
from ..model import Model
from .sequence import Slot, Speculation


class Speculator:
    def __init__(self, ctx: Context, model: Model, draft_model: Callable | None, draft_max: int, stateful: bool,
                 batch: Batch, counters: collections.Counter):
        self.ctx, self.model, self.draft_model = ctx, model, draft_model
        self.draft_max = draft_max      # draft tokens per sequence and step (0: none proposed)
        self.stateful = stateful        # recurrent state to snapshot before a draft is fed
        self.batch = batch              # the Engine's, reused between steps to decode the kept tokens again
        self.counters = counters        # the Engine's: "drafted"

    def propose(self, slot: Slot, n_ctx: int) -> None:
        """Ask the draft model what follows slot's tokens (within its max_tokens and the context) into
        slot.draft; what the draft model raises fails the request alone (the caller's to handle)."""
        req = slot.req
        room = min(self.draft_max, req.max_tokens - len(slot.gen.tokens) - 1, n_ctx - slot.pos - 2)
        if slot.next_token is None or room <= 0:
            return
        proposal = self.draft_model(np.asarray(req.prompt + slot.gen.tokens, dtype=np.intc))
        slot.draft = [self.model.check_token(int(t)) for t in np.asarray(proposal).ravel()[:room]]

    def begin(self, slot: Slot, draft: list[int]) -> bool:
        """Prepare to undo slot's draft: a snapshot of its recurrent state (none needed for attention,
        whose cells are simply removed).  False when the pool has no room: decode without the draft."""
        snapshot = None
        if self.stateful and (snapshot := snapshot_or_none(self.ctx, slot.seq)) is None:
            return False
        slot.spec = Speculation(slot.pos, [slot.next_token, *draft], snapshot)
        self.counters["drafted"] += len(draft)
        return True

    def drop(self, slot: Slot) -> None:
        """Forget slot's speculation, releasing its snapshot."""
        spec, slot.spec = slot.spec, None
        if spec is not None and spec.snapshot is not None:
            self.ctx.release(spec.snapshot)

    def settle(self, slots: list[Slot]) -> tuple[list[Slot], Exception | None]:
        """After verification, each slot's memory keeps the fed tokens before slot.pos and loses the
        rejected rest: attention cells are removed; a recurrent state goes back to its snapshot and the
        kept tokens are decoded again (one batch for all).  Returns the slots whose kept tokens the
        memory could not take back, and why (those requests fail); the finishes that waited on this
        (slot.finishing) are the caller's."""
        replay: list[tuple[Slot, int, list[int]]] = []
        for slot in slots:
            spec = slot.spec
            kept = spec.fed[:slot.pos - spec.start]
            if len(kept) < len(spec.fed):
                start = rewind(self.ctx, slot.seq, slot.pos, spec.start, spec.snapshot)
                if start is not None and start < slot.pos:
                    replay.append((slot, start, kept))
            self.drop(slot)
        if replay:
            batch = self.batch
            batch.clear()
            for slot, start, kept in replay:
                batch.add_sequence(kept, start, slot.seq, logits_last=False)
            try:
                self.ctx.decode(batch)
            except Exception as e:  # noqa: BLE001 - memory cannot take them back: those requests fail
                return [slot for slot, _, _ in replay], e
        return [], None


def snapshot_or_none(ctx: Context, seq: int) -> int | None:
    """A snapshot of seq's recurrent state to undo a draft with, or None when the pool has no room."""
    try:
        return ctx.snapshot(seq)
    except PoolExhaustedError:
        return None


def rewind(ctx: Context, seq: int, keep: int, start: int, snapshot: int | None) -> int | None:
    """Cut seq's memory back to its first `keep` positions after a draft fed from position `start` (the
    Engine's settle and the Session's generate both undo rejected drafts with it).  With `snapshot`, the
    recurrent state at `start`, the memory goes back to it (recurrent memory cannot drop a tail); without,
    the tail's attention cells are removed.  Returns where the kept tokens must be decoded again from
    (keep: nowhere), or None when the memory refused the cut (recurrent memory and no snapshot)."""
    if snapshot is None:
        return keep if ctx.seq_rm(seq, keep, -1) else None
    ctx.restore(snapshot, seq)
    ctx.seq_rm(seq, start, -1)
    return start
