"""Upstream bugs the patch series fixes, each checked on every stateful zoo model.

0003 plamo2-state-offset: a ubatch of several sequences whose state cells do
not start at cell 0 must write its states to its own cells.  Upstream plamo2
wrote them n_seqs times too far (corrupting other sequences or aborting).
"""

from __future__ import annotations

import numpy as np
import pytest

import pyllama_ssm as ps
from conftest import zoo_names, zoo_path


def batch_logits(ctx, model, prompts, seqs):
    with ps.Batch(128, 1) as batch:
        last = [batch.add_sequence(p, 0, s) for p, s in zip(prompts, seqs)]
        ctx.decode(batch)
        return [ctx.logits(i) for i in last]


@pytest.mark.parametrize("name", zoo_names("stateful"))
def test_multi_sequence_ubatch_above_cell_zero(name):
    with ps.Model(zoo_path(name)) as model:
        a = model.tokenize("A first sequence takes cell zero")
        b = model.tokenize("Two more sequences decode")
        c = model.tokenize("together in one batch")
        with ps.Context(model, n_ctx=512, n_seq_max=2) as ref:
            want = batch_logits(ref, model, [b, c], [0, 1])  # cells 0 and 1
        with ps.Context(model, n_ctx=512, n_seq_max=3) as ctx:
            ctx.decode_tokens(a, seq_id=0)
            got = batch_logits(ctx, model, [b, c], [1, 2])  # cells 1 and 2
            again = ctx.decode_tokens(model.tokenize(" more", add_special=False), seq_id=0)
        with ps.Context(model, n_ctx=512, n_seq_max=1) as solo:
            solo.decode_tokens(a, seq_id=0)
            want_again = solo.decode_tokens(model.tokenize(" more", add_special=False), seq_id=0)
    for g, w in zip(got, want):
        assert np.array_equal(g, w), "a batch above cell 0 must compute what it computes at cell 0"
    assert np.max(np.abs(again - want_again)) <= 1e-6, "sequence 0's state must be untouched"


@pytest.mark.parametrize("name", zoo_names("stateful"))
def test_batched_prefill_of_several_sequences_matches_each_alone(name):
    """0003: a ubatch holding several multi-token sequences keeps their tokens apart."""
    with ps.Model(zoo_path(name)) as model:
        prompts = [model.tokenize("System: answer briefly. User: hi"),
                   model.tokenize("System: answer briefly. User: tell me a story about a fox")]
        with ps.Context(model, n_ctx=512, n_seq_max=2) as ctx:
            got = batch_logits(ctx, model, prompts, [0, 1])
        for p, g in zip(prompts, got):
            with ps.Context(model, n_ctx=512, n_seq_max=1) as solo:
                want = solo.decode_tokens(p, seq_id=0)
            # different batch shapes round differently (~1e-4); mixed-up tokens differ by O(1)
            assert np.max(np.abs(g - want)) <= 1e-2
