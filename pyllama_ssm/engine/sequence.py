"""A running request's state on the engine thread: the sequence id it holds and how far it has come."""

from __future__ import annotations

import operator
from collections.abc import Collection
from dataclasses import dataclass, field

from ..sampling import Sampler
from .request import Generation, Request
from .scheduler import SeqFacts, StepPlan, plan_decode, plan_step


@dataclass
class Speculation:
    """A step that fed next_token and draft tokens at positions start..: what to undo if one is rejected."""

    start: int
    fed: list[int]
    snapshot: int | None  # the recurrent state before them (a pool handle): none for attention-only


@dataclass
class Slot:
    """A request bound to a sequence id of the context."""

    req: Request
    seq: int
    sampler: Sampler
    gen: Generation          # what it has made so far
    cursor: int = 0          # prompt tokens already in memory
    pos: int = 0             # next position
    next_token: int | None = None
    admitted: int = 0
    since_step: int = 0      # the engine's step count at its admission (how long its prompt has waited)
    relocated_at: int = -1   # position at which its cells were last moved (see Engine._relieve_memory)
    share_at: set[int] = field(default_factory=set)  # prompt positions queued requests wait to share
    resumed_entry: tuple[int, ...] | None = None  # the prefix-cache entry it was restored from
    draft: list[int] = field(default_factory=list)  # proposed this step, fed after next_token
    spec: Speculation | None = None  # this step's fed draft, until Speculator.settle keeps what was accepted
    finishing: str | None = None  # a finish waiting for settle (the memory must hold the kept tokens)

    def facts(self, steps: int) -> SeqFacts:
        """What the scheduler is told of it, `steps` being the engine's step count now (share_at is
        shared, not copied: the scheduler only reads it)."""
        req = self.req
        return SeqFacts(self.seq, self.admitted, req.prompt, self.cursor, self.next_token is not None,
                        req.score_prompt or req.keeps_logits, self.share_at, len(self.draft),
                        waited=steps - self.since_step, turns=bool(req.checkpoints))


ADMITTED = operator.attrgetter("admitted")


def plan_for(slots: Collection[Slot], steps: int, n_batch: int, n_outputs: int, checkpoints: bool,
             draft_budget: int | None) -> StepPlan:
    """scheduler.plan_step for the running slots, `steps` being the engine's step count now.  The common
    step, every slot decoding and none with a draft, is planned from the sequence ids alone: gathering
    every slot's facts each step was a tenth of the Engine's Python per step at 32 sequences."""
    if all(s.next_token is not None and not s.draft for s in slots):
        return plan_decode([s.seq for s in sorted(slots, key=ADMITTED)], n_batch, n_outputs)
    return plan_step([s.facts(steps) for s in slots], n_batch, n_outputs, checkpoints=checkpoints,
                     draft_budget=draft_budget)
