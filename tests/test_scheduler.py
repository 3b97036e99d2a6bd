"""The Engine's scheduling rules on plain data: no model, no llama.cpp."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyllama_ssm.engine.retention import is_checkpoint
from pyllama_ssm.engine.scheduler import (AGING, CHECKPOINT_INTERVAL, RIDE_ALONG, SeqFacts, drafts_pay, plan_decode,
                                          plan_step, preemption_victim, waits_for)


def seq(i, prompt_len, cursor=0, decoding=False, admitted=None, score=False, prompt=None):
    return SeqFacts(i, i if admitted is None else admitted, prompt or list(range(prompt_len)), cursor, decoding, score)


def test_decode_tokens_go_first_then_the_shortest_prompt_within_the_budget():
    plan = plan_step([seq(0, 1000, admitted=2), seq(1, 10, cursor=10, decoding=True), seq(2, 300, admitted=1)],
                     n_batch=512, n_outputs=4, checkpoints=False)
    assert plan.decode == (1,)
    assert [(c.seq, c.start, c.n, c.last) for c in plan.prefill] == [(2, 0, 300, True)]
    plan = plan_step([seq(0, 1000), seq(1, 10, cursor=10, decoding=True)], n_batch=512, n_outputs=4,
                     checkpoints=False)
    assert [(c.seq, c.n, c.last) for c in plan.prefill] == [(0, 511, False)] and plan.n_tokens == 512


@given(st.permutations(range(12)), st.integers(1, 16), st.integers(1, 16))
def test_the_common_step_planned_from_ids_alone_is_plan_steps(admitted, n_batch, n_outputs):
    """Every sequence decoding, none drafting: plan_decode, given the ids oldest first (what the Engine
    passes without gathering facts), plans what plan_step plans from the facts, limits included."""
    facts = [seq(i, 5, cursor=5, decoding=True, admitted=a) for i, a in enumerate(admitted)]
    oldest_first = [f.seq for f in sorted(facts, key=lambda f: f.admitted)]
    assert plan_decode(oldest_first, n_batch, n_outputs) == plan_step(facts, n_batch, n_outputs, checkpoints=True)


def test_chunks_end_on_their_last_checkpoint():
    plan = plan_step([seq(0, 1000, cursor=100)], n_batch=512, n_outputs=4, checkpoints=True)
    (chunk,) = plan.prefill
    assert chunk.start + chunk.n == 576 and (chunk.start + chunk.n) % CHECKPOINT_INTERVAL == 0
    assert plan_step([seq(0, 1000, cursor=100)], n_batch=512, n_outputs=4, checkpoints=False).prefill[0].n == 512
    # the prompt's tail after its last checkpoint is one chunk
    assert plan_step([seq(0, 650, cursor=640)], n_batch=512, n_outputs=4, checkpoints=True).prefill[0].n == 10


def test_prompt_logprobs_take_one_logits_row_per_position():
    plan = plan_step([seq(0, 8, cursor=8, decoding=True), seq(1, 100, score=True)], n_batch=512, n_outputs=6,
                     checkpoints=True)
    (chunk,) = plan.prefill
    assert chunk.all_logits and chunk.n == 5  # 6 rows, one taken by the decoding sequence


def test_no_output_rows_left_means_no_prefill_that_needs_one():
    plan = plan_step([seq(0, 1, cursor=1, decoding=True), seq(1, 1, cursor=1, decoding=True), seq(2, 50)],
                     n_batch=512, n_outputs=2, checkpoints=False)
    assert plan.decode == (0, 1) and plan.prefill == ()


def test_a_queued_request_waits_for_a_prefix_being_prefilled_and_the_leader_stops_there():
    system = list(range(1000, 1300))
    leader = seq(0, 0, cursor=128, prompt=system + [1, 2, 3])
    follower_prompt = system + [7, 8]
    assert waits_for(follower_prompt, cached=128, running=[leader]) == (0, 300)  # the leader, where they part
    assert leader.share_at == frozenset(), "the scheduler reads the facts, never writes them"
    leader.share_at = {300}  # what the Engine records
    assert is_checkpoint(SeqFacts(0, 0, leader.prompt, 300, False, share_at={300}))
    plan = plan_step([leader], n_batch=512, n_outputs=4, checkpoints=True)
    assert plan.prefill[0].start + plan.prefill[0].n == 256  # its last checkpoint first
    leader.cursor = 256
    plan = plan_step([leader], n_batch=512, n_outputs=4, checkpoints=True)
    assert plan.prefill[0].start + plan.prefill[0].n == 300  # then where the prompts part
    # nothing to wait for: the cache already has it, the leader is past it, or too little is shared
    assert waits_for(follower_prompt, cached=290, running=[seq(0, 0, cursor=128, prompt=system + [1])]) is None
    assert waits_for(follower_prompt, cached=0, running=[seq(0, 0, cursor=301, prompt=system + [1, 2])]) is None
    assert waits_for(system[:40] + [5], cached=0, running=[seq(0, 0, prompt=system)]) is None
    assert waits_for(follower_prompt, cached=0, running=[seq(0, 0, cursor=303, prompt=system + [1, 2, 3],
                                                             decoding=True)]) is None


def test_the_newest_admission_is_preempted():
    assert preemption_victim([seq(0, 5, admitted=3), seq(1, 5, admitted=9), seq(2, 5, admitted=1)]) == 1


@given(st.lists(st.tuples(st.integers(1, 3000), st.integers(0, 3000), st.booleans(), st.booleans()),
                min_size=1, max_size=16),
       st.integers(1, 2048), st.integers(1, 64), st.booleans())
def test_any_plan_respects_the_budget_and_the_rows(specs, n_batch, n_outputs, checkpoints):
    seqs = [seq(i, length, cursor=min(cursor, length), decoding=decoding and cursor >= length, score=score)
            for i, (length, cursor, decoding, score) in enumerate(specs)]
    seqs = [s for s in seqs][:n_outputs]  # the Engine never runs more sequences than output rows
    plan = plan_step(seqs, n_batch, n_outputs, checkpoints)
    assert plan.n_tokens <= n_batch
    rows = len(plan.decode) + sum(c.n if c.all_logits else int(c.last) for c in plan.prefill)
    assert rows <= n_outputs
    by_seq = {s.seq: s for s in seqs}
    for c in plan.prefill:
        s = by_seq[c.seq]
        assert c.n > 0 and c.start == s.cursor and c.start + c.n <= len(s.prompt) and not s.decoding
        assert c.last == (c.start + c.n == len(s.prompt))
    # progress: while anything is left to do and budget allows, the step does something
    if any(s.decoding or s.cursor < len(s.prompt) for s in seqs):
        assert plan.n_tokens > 0


def test_a_returning_users_few_new_tokens_go_before_a_long_prefill():
    long, back = seq(0, 3000, cursor=0, admitted=0), seq(1, 1650, cursor=1500, admitted=1)
    plan = plan_step([long, back], n_batch=512, n_outputs=4, checkpoints=True)
    # the returning user's chunk first, to its checkpoint at 1600; the long one waits for it to end
    assert [(c.seq, c.n) for c in plan.prefill] == [(1, 100)]
    back.cursor = 1600
    plan = plan_step([long, back], n_batch=512, n_outputs=4, checkpoints=True)
    assert [(c.seq, c.n, c.last) for c in plan.prefill] == [(1, 50, True)]


def test_prompts_are_prefilled_one_at_a_time_short_ones_riding_along():
    """Prompts sharing a step all reach their first token when it ends (and users who start together
    stay in step turn after turn); a batch of unequal chunks also splits into one micro-batch per chunk
    length on recurrent memory.  So one prompt per step, the one closest to its first token, and after
    it, if it ends, prompts of at most RIDE_ALONG tokens."""
    a, b, c = (seq(i, 400, cursor=0) for i in range(3))
    plan = plan_step([a, b, c], n_batch=512, n_outputs=8, checkpoints=False)
    assert [(ch.seq, ch.n, ch.last) for ch in plan.prefill] == [(0, 400, True)]
    short, shorter = seq(3, 40 + RIDE_ALONG, cursor=40), seq(4, 10)
    plan = plan_step([a, b, short, shorter], n_batch=512, n_outputs=8, checkpoints=False)
    assert [(ch.seq, ch.n) for ch in plan.prefill] == [(4, 10), (3, RIDE_ALONG)]
    plan = plan_step([a, b, short], n_batch=420, n_outputs=8, checkpoints=False)
    assert [(ch.seq, ch.n, ch.last) for ch in plan.prefill] == [(3, RIDE_ALONG, True)]  # a, b: too long to ride
    # a prompt that does not end in the step takes it alone
    plan = plan_step([seq(0, 2000), seq(1, 10, cursor=0, admitted=5)], n_batch=8, n_outputs=8, checkpoints=False)
    assert [(ch.seq, ch.n) for ch in plan.prefill] == [(1, 8)]


def test_a_long_prompt_that_waited_goes_before_newer_short_ones():
    """Fewest tokens left first, less AGING tokens per step waited: short prompts arriving all the time
    do not hold a long one back for ever."""
    long = SeqFacts(0, admitted=0, prompt=[1] * 1000, cursor=0, decoding=False)
    short = SeqFacts(1, admitted=1, prompt=[1] * 100, cursor=0, decoding=False)
    assert plan_step([long, short], 512, 8, False).prefill[0].seq == 1
    long.waited = (1000 - 100) // AGING + 1
    assert plan_step([long, short], 512, 8, False).prefill[0].seq == 0


def test_a_chat_prompt_ends_its_chunks_at_turn_boundaries_only():
    """A chat's prefix-cache entries are its turn boundaries (retention.superseded drops the others): its
    chunks do not stop at interval checkpoints, which would cost a step each."""
    chat = SeqFacts(0, 0, list(range(2000)), cursor=1700, decoding=False, share_at={1950, 2000}, turns=True)
    assert [c.n for c in plan_step([chat], 512, 4, checkpoints=True).prefill] == [250]
    chat.share_at = {2000}
    assert [c.n for c in plan_step([chat], 512, 4, checkpoints=True).prefill] == [300]
    assert not is_checkpoint(SeqFacts(0, 0, list(range(2000)), cursor=1792, decoding=False, turns=True))
    assert is_checkpoint(SeqFacts(0, 0, list(range(2000)), cursor=1792, decoding=False))


def test_draft_tokens_follow_their_decode_token_within_budget_and_rows():
    old = SeqFacts(0, admitted=0, prompt=[1] * 4, cursor=4, decoding=True, draft=5)
    new = SeqFacts(1, admitted=1, prompt=[1] * 4, cursor=4, decoding=True, draft=5)
    prefill = SeqFacts(2, admitted=2, prompt=[1] * 100, cursor=0, decoding=False)
    plan = plan_step([new, old, prefill], n_batch=16, n_outputs=13, checkpoints=False)
    assert plan.decode == (0, 1) and plan.drafts == (5, 5)
    assert plan.prefill[0].n == 16 - 2 - 10 and plan.n_tokens == 16  # the prompt takes what is left
    assert plan_step([new, old, prefill], n_batch=8, n_outputs=64, checkpoints=False).drafts == (5, 1)  # budget
    assert plan_step([new, old], n_batch=64, n_outputs=5, checkpoints=False).drafts == (3, 0)  # logits rows
    assert plan_step([SeqFacts(0, 0, [1], 1, True)], 16, 16, False).drafts == ()
    assert plan_step([new, old], 64, 64, False, draft_budget=6).drafts == (3, 3)  # shared evenly
    assert plan_step([new, old], 64, 64, False, draft_budget=1).drafts == (1, 1)  # at least one each


def test_a_turn_boundary_may_be_the_prompts_end():
    """A chat's turn boundary (Engine.submit's checkpoints) is kept even at the prompt's last token: the
    next turn parts there when its history renders the answer after the generation prompt."""
    prompt = list(range(100))
    assert is_checkpoint(SeqFacts(0, 0, prompt, cursor=100, decoding=True, share_at={100}))
    assert not is_checkpoint(SeqFacts(0, 0, prompt, cursor=100, decoding=True))
    assert is_checkpoint(SeqFacts(0, 0, prompt, cursor=37, decoding=False, share_at={37}))
    plan = plan_step([SeqFacts(0, 0, prompt, cursor=0, decoding=False, share_at={37})], 512, 4, checkpoints=True)
    assert [c.n for c in plan.prefill] == [37]  # the chunk ends at the boundary


def test_drafts_are_verified_only_while_few_sequences_decode():
    """Verifying drafts pays while a step is bound by reading the weights: with at most max_seqs
    sequences decoding (none decoding: nothing to verify)."""
    assert [drafts_pay(n, 2) for n in range(5)] == [False, True, True, False, False]
    assert drafts_pay(8, 8) and not drafts_pay(9, 8)
