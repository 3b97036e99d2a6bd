"""lm-eval's loglikelihoods through the server on real weights: what `local-completions` reads from an
echoed completion (token_logprobs[ctxlen:-1]) is the continuation's log-probability, the same at
n_parallel 1 and 4, equal to the library's own logits.  The lm-eval run skips without `lm-eval`
(the `eval` extra, not in dev); the end-of-generation entry it depends on is pinned without it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyllama_ssm as ps  # noqa: E402
from bench.lm_eval_check import MODEL, TOL, direct_loglikelihood, check, setups  # noqa: E402
from pyllama_ssm import Llama  # noqa: E402
from pyllama_ssm.bindings import has  # noqa: E402

pytestmark = pytest.mark.skipif(not MODEL.exists(), reason="SmolLM2 missing: run `make models` (tests/models/real.py)")
# SmolLM2's greedy next token after this answer is end-of-generation
CONTEXT, ANSWER = "Question: Which planet do we live on?\nAnswer:", " Earth"


@pytest.mark.parametrize("n_parallel", [1, 4])
def test_echo_lists_the_end_of_generation_token_that_stopped_the_completion(n_parallel):
    """lm-eval asks max_tokens=1 and drops the last entry as the generated one: without the stopping
    token listed, that entry is the continuation's own and its loglikelihood reads 0.0."""
    llm = Llama(str(MODEL), n_ctx=512, n_parallel=n_parallel, logits_all=n_parallel == 1, flash_attn=True,
                verbose=False)
    try:
        context = llm.tokenize(CONTEXT.encode(), add_bos=False)
        ids = llm.tokenize((CONTEXT + ANSWER).encode(), add_bos=False)
        out = llm.create_completion(ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    finally:
        llm.close()
    choice = out["choices"][0]
    assert (choice["finish_reason"], out["usage"]["completion_tokens"]) == ("stop", 0), "the premise: EOG first"
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and choice["text"] == CONTEXT + ANSWER
    assert lp["tokens"][-1] == "" and lp["token_logprobs"][-1] < 0 and "".join(lp["tokens"]) == choice["text"]
    with ps.Model(MODEL) as model:
        want = direct_loglikelihood(model, context, ids[len(context):], flash_attn=True)
    assert sum(lp["token_logprobs"][len(context):-1]) == pytest.approx(want, abs=TOL)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed (pip install -e .[eval])")
@pytest.mark.skipif(not has("llama_set_batch_invariant"), reason="batch invariance needs the patched build")
def test_lm_eval_loglikelihoods_at_n_parallel_1_and_4_equal_the_library():
    every = setups(4)
    data = check(8, {name: every[name] for name in ("p1-fa", "p4-invariant")}, threads=2)
    lone, invariant = rows = data["rows"]
    assert invariant["peak_in_flight"] > 1, f"lm-eval's requests did not overlap: {rows}"
    assert invariant["max_diff"]["p1-fa"] == 0.0, rows
    for row in rows:
        assert row["max_diff_vs_direct"] < TOL, rows
        assert row["requests"] == 32 and row["acc"] == lone["acc"], rows
    assert all(np.isfinite(r["p1-fa"]) and r["p1-fa"] < 0 for r in data["requests"])
