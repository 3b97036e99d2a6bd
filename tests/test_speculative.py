"""Speculative decoding (draft_model): greedy output with a draft equals greedy output without it.

The draft models here are stock llama-cpp-python's LlamaPromptLookupDecoding and an
"oracle" that proposes the true continuation with every third token wrong, so each
step accepts some draft tokens and rejects the rest: on recurrent and hybrid models
the rejected ones are undone from a snapshot of the shared pool (patch 0002), on
attention by removing their cells.  Every zoo family, n_parallel=1 (Llama's own
loop) and n_parallel=3 (the Engine, three requests at once), batch_invariant=True
on both sides so that a verification batch computes what single-token steps do.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import run_with_build, zoo_names, zoo_path
from pyllama_ssm import Llama, TokenError
from pyllama_ssm.llama_speculative import LlamaPromptLookupDecoding
from pyllama_ssm.sampling import SamplingParams

PROMPTS = [b"Once upon a time there", b"The weather today is", b"def main():"]
N_TOKENS = 20


class Oracle:
    """Proposes the reference continuation of each prompt, 4 tokens, the third one wrong."""

    def __init__(self, references: dict[tuple[int, ...], list[int]]):
        self.references = references
        self.calls = 0

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        self.calls += 1
        ids = ids.tolist()
        for prompt, ref in self.references.items():
            if tuple(ids[:len(prompt)]) == prompt:
                done = len(ids) - len(prompt)  # generated tokens so far, the last one included
                out = ref[done:done + 4]
                if len(out) > 2:
                    out[2] = (out[2] + 1) % 100
                return np.array(out, dtype=np.intc)
        return np.array([], dtype=np.intc)


def _llama(model: str, n_parallel: int, draft=None) -> Llama:
    # drafts in every step, however many sequences decode: the verification and undo of several at once
    return Llama(str(zoo_path(model)), n_ctx=512, n_parallel=n_parallel, draft_model=draft,
                 batch_invariant=True, flash_attn=True, verbose=False, draft_max_seqs=n_parallel)


def _greedy(llm: Llama, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens of each prompt: one after the other (n_parallel=1) or all at once (the Engine)."""
    if llm.engine is None:
        out = []
        for p in prompts:
            tokens = []
            for t in llm.generate(p, temp=0.0, top_k=1):
                tokens.append(t)
                if len(tokens) == N_TOKENS:
                    break
            out.append(tokens)
        return out
    reqs = [llm.engine.submit(p, SamplingParams(temperature=0.0), max_tokens=N_TOKENS) for p in prompts]
    return [r.result(timeout=120).tokens for r in reqs]


@pytest.mark.parametrize("n_parallel", [1, 3])
@pytest.mark.parametrize("model", zoo_names())
def test_greedy_with_a_draft_equals_greedy_without(model, n_parallel):
    plain = _llama(model, n_parallel)
    prompts = [plain.tokenize(p) for p in PROMPTS]
    reference = _greedy(plain, prompts)
    plain.close()
    oracle = Oracle({tuple(p): r for p, r in zip(prompts, reference)})
    drafted = _llama(model, n_parallel, oracle)
    try:
        assert _greedy(drafted, prompts) == reference
        assert oracle.calls >= 3
        if drafted.engine is not None:
            stats = drafted.engine.stats()
            # every third proposal is wrong: some accepted, some undone
            assert 0 < stats.draft_accepted < stats.draft_tokens, stats
    finally:
        drafted.close()


@pytest.mark.parametrize("model", ["llama", "qwen35", "mamba2"])
def test_prompt_lookup_decoding_through_create_completion(model):
    """The documented form, Llama(draft_model=LlamaPromptLookupDecoding(...)): same text, from
    several threads at once on n_parallel=4."""
    lookup = LlamaPromptLookupDecoding(num_pred_tokens=4)
    prompt = "Copy: red green blue red green blue red green blue. Copy: red green"
    plain = _llama(model, 4)
    expected = plain.create_completion(prompt, max_tokens=16, temperature=0)["choices"][0]["text"]
    plain.close()
    llm = _llama(model, 4, lookup)
    results: list[str] = []
    try:
        threads = [threading.Thread(target=lambda: results.append(
            llm.create_completion(prompt, max_tokens=16, temperature=0)["choices"][0]["text"])) for _ in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        assert results == [expected] * 3
    finally:
        llm.close()


def test_a_failing_draft_model_fails_its_request_alone():
    def broken(ids):
        raise RuntimeError("draft model exploded")

    for n_parallel in (1, 2):
        llm = _llama("qwen35", n_parallel, broken)
        try:
            with pytest.raises(RuntimeError, match="draft model exploded"):
                llm.create_completion("Hello", max_tokens=8, temperature=0)
            assert llm.engine is None or llm.engine.stats().running == 0
            with pytest.raises(RuntimeError, match="draft model exploded"):  # again: nothing was left held
                llm.create_completion("Hello again", max_tokens=8, temperature=0)
        finally:
            llm.close()
        llm = _llama("llama", n_parallel, lambda ids: np.array([10 ** 9], dtype=np.int64))  # not a token id
        try:
            with pytest.raises(TokenError, match="1000000000"):
                llm.create_completion("Hello", max_tokens=8, temperature=0)
        finally:
            llm.close()


def test_draft_model_must_be_callable():
    with pytest.raises(ValueError, match="draft_model=3: expected a LlamaDraftModel"):
        Llama(str(zoo_path("llama")), draft_model=3, verbose=False)


UPSTREAM = """
import sys, numpy as np
from pyllama_ssm import Llama
path = sys.argv[1]
def run(draft):
    llm = Llama(path, n_ctx=256, draft_model=draft, verbose=False)
    out = []
    for t in llm.generate(llm.tokenize(b"Once upon a time"), temp=0.0, top_k=1):
        out.append(t)
        if len(out) == 12:
            break
    return out
ref = run(None)
wrong = lambda ids: np.array([(ref[0] + 1) % 100, 5], dtype=np.intc)  # always rejected
print(run(wrong) == ref)
"""


def test_upstream_build_replays_instead_of_restoring():
    """Without the patch series' snapshots, a rejected draft on recurrent memory is replayed from the
    start: slower, the same tokens."""
    assert run_with_build("upstream", UPSTREAM, str(zoo_path("mamba"))).strip() == "True"


def test_server_flag_draft_model_prompt_lookup_decoding():
    """llama_cpp.server's --draft_model prompt-lookup-decoding --draft_model_num_pred_tokens N."""
    from pyllama_ssm.server.registry import llama_kwargs
    from pyllama_ssm.server.settings import ModelSettings
    kwargs = llama_kwargs(ModelSettings(model=str(zoo_path("llama")), draft_model="prompt-lookup-decoding",
                                        draft_model_num_pred_tokens=3))
    assert isinstance(kwargs["draft_model"], LlamaPromptLookupDecoding) and kwargs["draft_model"].num_pred_tokens == 3
    with pytest.raises(ValueError, match="draft_model='medusa'"):
        llama_kwargs(ModelSettings(model=str(zoo_path("llama")), draft_model="medusa"))


def test_drafts_only_while_few_sequences_decode_on_the_cpu():
    """On the CPU a step is bound by arithmetic from a few sequences, where verifying drafts costs more
    than it saves (bench/results/speculative_grafts.md): drafts while at most DRAFT_SEQS_CPU sequences
    decode, unless the caller says otherwise; a lone sequence still gets them."""
    from pyllama_ssm.engine import Engine
    from pyllama_ssm.engine.config import DRAFT_SEQS_CPU

    def lookup(ids):  # propose the last token again, a draft on every step
        return np.array([ids[-1]] * 2, dtype=np.intc)

    path = str(zoo_path("llama"))
    with Engine(path, n_ctx=512, parallel=8, draft_model=lookup) as e:
        assert e._draft_seqs == DRAFT_SEQS_CPU == 4
        # submitted between two steps (from the engine's thread), so all eight start in the same step
        many = e.call(lambda: [e.submit(f"prompt {i}", SamplingParams(temperature=0.0), max_tokens=8)
                               for i in range(8)])
        assert [r.result(timeout=120).finish_reason for r in many] == ["length"] * 8
        assert e.stats().draft_tokens == 0  # eight decoding in every step: no step verified a draft
        e.generate("alone", SamplingParams(temperature=0.0), max_tokens=8)
        assert e.stats().draft_tokens > 0
    with Engine(path, n_ctx=512, parallel=8, draft_model=lookup, draft_max_seqs=8) as e:
        assert e._draft_seqs == 8
    for bad in (-1, "4", 2.5, True):
        with pytest.raises(ValueError, match=f"draft_max_seqs={bad!r}: must be an int >= 0"):
            Engine(path, n_ctx=512, parallel=2, draft_model=lookup, draft_max_seqs=bad)
