"""The Engine's decisions, from plain data: what the next step decodes, who waits, who is swapped out.

Nothing here touches llama.cpp, so every rule is unit-tested without a model
(tests/test_scheduler.py); the Engine (core.py) gathers the facts, asks, and
carries out the answer on its context.

- plan_step: each running sequence with a sampled token feeds it (one logits row each), then the
  draft tokens proposed after it (speculative decoding), oldest sequence first; then one prompt:
  the one closest to its first token (less what it has waited) takes what is left of the token
  budget.  Prompts sharing a step all reach their first token when it ends, as late as the last
  (and users who start together stay in step, arriving together turn after turn); a step of
  several sequences' chunks also splits into one micro-batch per chunk length (recurrent memory
  takes equal tokens per sequence).  Only short prompts (at most RIDE_ALONG tokens left) join a
  step whose prompt ends in it: a step of their own would cost the others' decode more than
  they delay the first.
  A chunk ends where a queued request waits to share the prompt (see waits_for) and at a chat's
  turn boundaries; a prompt without them (a plain completion) also at the last prefix-cache
  checkpoint it crosses (a multiple of the checkpoint interval).  A prompt whose every position is
  scored (prompt logprobs) takes at most the logits rows left.
- waits_for: a queued request waits for a prefix that a running request is prefilling now,
  rather than compute it again beside it.
- which positions keep a prefix-cache entry (is_checkpoint) is retention.py's.
- preemption_victim: the newest admission leaves when a step does not fit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Set as AbstractSet
from dataclasses import dataclass

CHECKPOINT_INTERVAL = 64  # prefill chunks end on multiples of this, each a prefix-cache entry
AGING = 64  # a waiting prompt counts this many tokens fewer per step it has waited (no starvation)
RIDE_ALONG = 64  # a prompt this short joins another's step (see plan_step)


@dataclass(slots=True)
class SeqFacts:
    """What the scheduler knows of one running sequence."""

    seq: int
    admitted: int                 # admission order: lower is older
    prompt: Sequence[int]
    cursor: int                   # prompt tokens already in memory
    decoding: bool                # holds a sampled token to feed this step
    score_prompt: bool = False    # logits at every prompt position (prompt logprobs)
    share_at: AbstractSet[int] = frozenset()  # positions queued requests wait for, turn boundaries
    draft: int = 0                # draft tokens proposed to verify after the sampled one
    waited: int = 0               # steps since its admission (while its prompt is not all in memory)
    turns: bool = False           # the prompt came with its turn boundaries (a chat): no interval checkpoints


@dataclass(frozen=True)
class Chunk:
    seq: int
    start: int         # first prompt position of the chunk
    n: int
    all_logits: bool   # logits at every position (prompt logprobs), else at the prompt's last only
    last: bool         # the chunk ends the prompt: its last position's logits sample the first token


@dataclass(frozen=True)
class StepPlan:
    decode: tuple[int, ...]    # sequences feeding their sampled token
    prefill: tuple[Chunk, ...]
    drafts: tuple[int, ...] = ()  # per decode sequence: draft tokens fed (and verified) after it

    @property
    def n_tokens(self) -> int:
        return len(self.decode) + sum(self.drafts) + sum(c.n for c in self.prefill)


def plan_step(seqs: Iterable[SeqFacts], n_batch: int, n_outputs: int, checkpoints: bool,
              draft_budget: int | None = None) -> StepPlan:
    """The next step: decode tokens first (oldest first), then one prompt's chunk, the prompt with the
    fewest tokens left (less AGING per step waited), and short prompts after it if it ends; within the
    n_batch token budget and the n_outputs logits rows; `checkpoints`: chunks end on prefix-cache
    checkpoints.  draft_budget: draft tokens in all, shared evenly by the decoding sequences
    (verifying drafts pays while a step is bound by reading the weights, less as the batch grows)."""
    seqs = sorted(seqs, key=lambda s: s.admitted)
    if all(s.decoding and not s.draft for s in seqs):
        return plan_decode([s.seq for s in seqs], n_batch, n_outputs)
    # at most the budget and the rows: with fewer than the sequences, the oldest decode first
    decoding = [s for s in seqs if s.decoding][:min(n_batch, n_outputs)]
    decode = tuple(s.seq for s in decoding)
    budget, rows = n_batch - len(decode), n_outputs - len(decode)
    # draft tokens next, oldest first: each needs a logits row to be verified (they are few, and an
    # accepted one saves a whole step of its sequence)
    drafts = []
    share = max(1, draft_budget // len(decoding)) if draft_budget is not None and decoding else budget
    for s in decoding:
        drafts.append(max(0, min(s.draft, share, budget, rows)))
        budget, rows = budget - drafts[-1], rows - drafts[-1]
    # the prompt closest to its first token first: a returning user's few new tokens do not wait behind
    # another's long prefill; the waiting age keeps a long one from waiting for ever; ties by admission
    seqs.sort(key=lambda s: (len(s.prompt) - s.cursor - AGING * s.waited, s.admitted))
    chunks = []
    for s in seqs:
        remaining = len(s.prompt) - s.cursor
        if s.decoding or remaining <= 0 or budget <= 0 or rows <= 0:
            continue
        if chunks and not chunks[-1].last:
            break  # one prompt per step,
        if chunks and remaining > RIDE_ALONG:
            continue  # and short ones once it has ended
        n = min(budget, remaining)
        if s.score_prompt:  # every position's logits: within the output rows
            n = min(n, rows)
        else:
            end = (s.cursor + n) // CHECKPOINT_INTERVAL * CHECKPOINT_INTERVAL
            if checkpoints and not s.turns and s.cursor < end < s.cursor + n:
                n = end - s.cursor  # what is past the last checkpoint comes next step
            share = [p for p in s.share_at if s.cursor < p < s.cursor + n]
            if share:  # a queued request's prompt parts from this one there
                n = min(share) - s.cursor
        last = s.cursor + n == len(s.prompt)
        chunks.append(Chunk(s.seq, s.cursor, n, s.score_prompt, last))
        budget -= n
        rows -= n if s.score_prompt else int(last)
    return StepPlan(decode, tuple(chunks), tuple(drafts) if any(drafts) else ())


def plan_decode(seqs: Sequence[int], n_batch: int, n_outputs: int) -> StepPlan:
    """plan_step's answer when every sequence decodes and none has a draft (the common step), from
    the sequence ids alone, oldest admission first: the Engine asks it without gathering the facts.
    At most the token budget and the logits rows decode, the oldest first."""
    return StepPlan(tuple(seqs[:min(n_batch, n_outputs)]), ())


def drafts_pay(n_decoding: int, max_seqs: int) -> bool:
    """Whether this step verifies draft tokens: only while at most max_seqs sequences decode.  A draft is
    verified in the same step as the sequences' own tokens; that is nearly free while a step is bound by
    reading the weights (few sequences on a CPU, many on a GPU), and costs its full share once the step
    is bound by arithmetic, when a rejected draft also costs the recurrent state's restore."""
    return 0 < n_decoding <= max_seqs


def waits_for(prompt: Sequence[int], cached: int, running: Iterable[SeqFacts]) -> tuple[int, int] | None:
    """The running sequence whose prompt a queued one should wait for, and the position where their
    prompts part: one still prefilling a prefix they share that is at least a checkpoint interval longer
    than the `cached` tokens the prefix cache offers now.  The Engine adds the position to the leader's
    share_at, so that it ends a chunk, and keeps a cache entry, there."""
    for s in running:
        if s.cursor >= len(s.prompt):
            continue  # generating: its prompt's entries are in the cache already, or evicted
        shared = common_prefix(s.prompt, prompt, len(prompt) - 1)
        if shared - cached >= CHECKPOINT_INTERVAL and s.cursor < shared <= len(s.prompt) - 1:
            return s.seq, shared
    return None


def preemption_victim(seqs: Iterable[SeqFacts]) -> int:
    """The sequence to swap out when a step does not fit: the newest admission."""
    return max(seqs, key=lambda s: s.admitted).seq


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most limit."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
