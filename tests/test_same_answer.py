"""Same answer under any load, on real weights: a request's greedy text and logprobs do not depend
on what else runs, on prefix-cache hits, on preemption, on the build or on n_parallel.

Random-weight zoo models have nearly flat logits (a wrong cache hit showed 4e-4 there); SmolLM2's
activations reach the hundreds and turn a last-bit difference in one kernel into 0.1-1.9 in a
token's log-probability.  So these run on SmolLM2-135M-Instruct (tests/models/real.py) and the real-text
grafts, in the formats users download, with the kernels llama.cpp picks for them (AMX or repacked weights
included), and demand equality: the same tokens and the same logprobs, bit for bit.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import pyllama_ssm as ps
from conftest import ZOO, run_with_build, zoo_model, zoo_names
from pyllama_ssm import Llama
from pyllama_ssm.bindings import has
from pyllama_ssm.engine import Engine
from pyllama_ssm.sampling import SamplingParams

SMOLLM2 = ZOO / "smollm2-135m-instruct-q4_1.gguf"
TOL = 0.0  # bit for bit: any tolerance hides the kernel that sums in another order
GREEDY = SamplingParams(temperature=0)
LONG = ("You are a careful assistant. Answer in one short paragraph, and do not repeat the question. "
        "The user asks about the history of the printing press and its effect on literacy in Europe. ")
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The three primary colors are", LONG + "Question: who built the first press?",
           LONG + "Question: when did literacy rise?", LONG * 2 + "Summary:", "1, 2, 3, 5, 8, 13,"]

pytestmark = [
    pytest.mark.skipif(not SMOLLM2.exists(), reason="SmolLM2 missing: run `make models` (tests/models/real.py)"),
    pytest.mark.skipif(not has("llama_set_batch_invariant"), reason="batch invariance needs the patched build"),
]


@pytest.fixture(scope="module")
def model():
    # with ggml's extra buffers (AMX, repacked weights), as Llama and Engine load it
    with ps.Model(SMOLLM2) as m:
        yield m


_lone: dict[tuple[str, int], tuple[list[int], list[float]]] = {}


def lone(model, prompt: str, n: int = 24) -> tuple[list[int], list[float]]:
    """Tokens and logprobs of the prompt run by itself: one sequence, fresh context, no cache."""
    if (prompt, n) not in _lone:
        with Engine(model, n_ctx=1024, parallel=1, prefix_cache=0, batch_invariant=True) as e:
            c = e.generate(prompt, GREEDY, max_tokens=n, logprobs=0)
        _lone[prompt, n] = (c.tokens, c.logprobs)
    return _lone[prompt, n]


def assert_same(got, want, what: str) -> None:
    tokens, logprobs = got
    assert tokens == want[0], f"{what}: greedy text differs from the lone run"
    diff = float(np.max(np.abs(np.subtract(logprobs, want[1]))))
    assert diff <= TOL, f"{what}: logprobs differ by {diff:.3g} (> {TOL})"


def test_concurrent_requests_equal_their_lone_runs(model):
    """8 requests joining at different steps, short and long prompts (prefills of 64+ tokens share
    ubatches with other sequences' decode tokens)."""
    with Engine(model, n_ctx=4096, parallel=8, batch_invariant=True) as e:
        first = [e.submit(p, GREEDY, max_tokens=24, logprobs=0) for p in PROMPTS[:3]]
        next(iter(first[0]))
        later = [e.submit(p, GREEDY, max_tokens=24, logprobs=0) for p in PROMPTS[3:]]
        got = [r.result(timeout=300) for r in first + later]
    for p, c in zip(PROMPTS, got):
        assert_same((c.tokens, c.logprobs), lone(model, p), f"concurrent {p[:30]!r}")


def test_prefix_cache_hits_equal_fresh_computation(model):
    """The same prompt twice (the second a hit on prompt + answer), then one sharing only a long prefix."""
    with Engine(model, n_ctx=4096, parallel=4, batch_invariant=True) as e:
        runs = [e.generate(p, GREEDY, max_tokens=24, logprobs=0) for p in (PROMPTS[4], PROMPTS[4], PROMPTS[5])]
    assert runs[1].usage.cached_tokens > 0 and runs[2].usage.cached_tokens >= 32, "expected prefix-cache hits"
    for p, c in zip((PROMPTS[4], PROMPTS[4], PROMPTS[5]), runs):
        assert_same((c.tokens, c.logprobs), lone(model, p), f"cached {p[-30:]!r}")


def test_unrelated_earlier_requests_change_nothing(model):
    """Cells of cached prefixes lie around in the unified KV cache; a new prompt must not see them."""
    with Engine(model, n_ctx=4096, parallel=4, batch_invariant=True) as e:
        for p in PROMPTS[:4]:
            c = e.generate(p, GREEDY, max_tokens=24, logprobs=0)
            assert_same((c.tokens, c.logprobs), lone(model, p), f"after others {p!r}")


def test_preempted_requests_equal_uninterrupted_ones(model):
    prompts = [LONG + f"Count from {i}: {i}, {i + 1}, {i + 2}," for i in range(4)]  # answers that go on
    with Engine(model, n_ctx=256, parallel=4, prefix_cache=0, batch_invariant=True) as e:
        reqs = [e.submit(p, GREEDY, max_tokens=60, logprobs=0) for p in prompts]
        got = [r.result(timeout=300) for r in reqs]
        assert e._counters["preemptions"] >= 1, "4 x ~100 tokens cannot fit 256 cells at once"
    for p, c in zip(prompts, got):
        assert_same((c.tokens, c.logprobs), lone(model, p, 60), f"preempted {p[-4:]!r}")


def test_n_parallel_1_equals_n_parallel_4_from_threads(model):
    solo = Llama(str(SMOLLM2), n_ctx=1024, flash_attn=True, batch_invariant=True, logits_all=True, verbose=False)
    many = Llama(str(SMOLLM2), n_ctx=4096, n_parallel=4, batch_invariant=True, verbose=False)
    kw = dict(max_tokens=24, temperature=0, logprobs=1, repeat_penalty=1.0)
    try:
        want = {p: solo.create_completion(p, **kw)["choices"][0] for p in PROMPTS[:4]}
        got: dict[str, dict] = {}
        threads = [threading.Thread(target=lambda p=p: got.__setitem__(p, many.create_completion(p, **kw)["choices"][0]))
                   for p in PROMPTS[:4]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    finally:
        solo.close()
        many.close()
    for p in PROMPTS[:4]:
        assert_same((got[p]["text"], got[p]["logprobs"]["token_logprobs"]),
                    (want[p]["text"], want[p]["logprobs"]["token_logprobs"]), f"n_parallel 4 vs 1 {p!r}")


def test_patched_build_equals_upstream_build_alone():
    code = """
import json, sys
import pyllama_ssm as ps
from pyllama_ssm.sampling import SamplingParams
with ps.Model(sys.argv[1]) as m, ps.Context(m, n_ctx=1024, flash_attn=True) as ctx:
    out = []
    for p in sys.argv[2:]:
        toks = m.tokenize(p)
        ctx.seq_rm(0)
        logits = ctx.decode_tokens(toks, seq_id=0)
        for i in range(12):
            t = int(logits.argmax())
            out.append((t, float(logits[t] - logits.max())))
            logits = ctx.decode_tokens([t], seq_id=0, pos0=len(toks) + i)
print(json.dumps(out))
"""
    import json
    prompts = PROMPTS[:2] + PROMPTS[6:7]
    up = json.loads(run_with_build("upstream", code, str(SMOLLM2), *prompts))
    pa = json.loads(run_with_build("patched", code, str(SMOLLM2), *prompts))
    assert [t for t, _ in up] == [t for t, _ in pa]


def test_without_invariance_the_kernels_differ(model):
    """The workload above is sensitive enough: llama.cpp's shape-dependent kernels (no patch 0007)
    or attention over a unified cache without flash attention change SmolLM2's answers."""
    worst = 0.0
    for kw in (dict(batch_invariant=False), dict(flash_attn=False)):
        with Engine(model, n_ctx=4096, parallel=4, **kw) as e:
            for p in (PROMPTS[4], PROMPTS[4], PROMPTS[0], PROMPTS[6]):
                c = e.generate(p, GREEDY, max_tokens=24, logprobs=0)
                want = lone(model, p)
                n = min(len(c.logprobs), len(want[1]))
                worst = max(worst, float(np.max(np.abs(np.subtract(c.logprobs[:n], want[1][:n])))))
    assert worst > TOL, f"expected a measurable difference without invariance, got {worst:.3g}"


@pytest.mark.parametrize("name", zoo_names("stateful"))
def test_zoo_concurrent_requests_equal_lone_logprobs(name):
    """Every recurrent and hybrid family: logprobs (not only tokens) equal the lone run.  kimi-linear's
    MLA layers multiply a strided view (q_nope), which ggml counts as contiguous when it holds one token:
    its lone decode took sgemm and its decode among others vec_dot, 2e-4 apart, until patch 0007 sent every
    input of whole-element rows to sgemm in invariant mode, whatever its row count."""
    m = zoo_model(name)
    prompts = [LONG + "Q1", "Hello there", LONG + "Q2", "A B C D"]
    want = []
    for p in prompts:
        with Engine(m, n_ctx=1024, parallel=1, prefix_cache=0, batch_invariant=True) as e:
            c = e.generate(p, GREEDY, max_tokens=12, logprobs=0)
            want.append((c.tokens, c.logprobs))
    with Engine(m, n_ctx=2048, parallel=4, batch_invariant=True) as e:
        reqs = [e.submit(p, GREEDY, max_tokens=12, logprobs=0) for p in prompts]
        got = [r.result(timeout=120) for r in reqs]
        again = e.generate(prompts[0], GREEDY, max_tokens=12, logprobs=0)  # a prefix-cache hit
    for p, c, w in zip(prompts, got, want):
        assert_same((c.tokens, c.logprobs), w, f"{name} {p[-6:]!r}")
    assert_same((again.tokens, again.logprobs), want[0], f"{name} cached")


# -- prompt logprobs (echo=True) -------------------------------------------------------------


def direct_prompt_logprobs(model, tokens: list[int]) -> list[float]:
    """log P(token i | tokens before it) for i >= 1, straight from the library's logits, on the kernels the
    Llama under test runs (the batch-invariant ones; llama.cpp's fastest are other sums, and on SmolLM2
    their logprobs differ by up to 0.2 from those)."""
    with ps.Context(model, n_ctx=512, flash_attn=True, batch_invariant=True) as ctx, ps.Batch(512, 1) as batch:
        batch.add_sequence(tokens, 0, 0, logits_last=False)
        for i in range(len(tokens)):
            batch.raw.logits[i] = True
        ctx.decode(batch)
        out = []
        for i in range(1, len(tokens)):
            row = ctx.logits(i - 1).astype(np.float64)
            out.append(float(row[tokens[i]] - (row.max() + np.log(np.exp(row - row.max()).sum()))))
    return out


@pytest.mark.parametrize("n_parallel", [1, 4])
def test_echo_scores_each_prompt_token_by_the_position_before_it(model, n_parallel):
    prompt = "The capital of France is Paris, and the capital of Italy is Rome."
    tokens = model.tokenize(prompt)
    kw = dict(n_ctx=1024, n_parallel=n_parallel, verbose=False, flash_attn=True, batch_invariant=True)
    llm = Llama(str(SMOLLM2), logits_all=n_parallel == 1, **kw)
    try:
        out = llm.create_completion(tokens, max_tokens=1, temperature=0, echo=True, logprobs=1)["choices"][0]
    finally:
        llm.close()
    lp = out["logprobs"]
    assert len(lp["token_logprobs"]) == len(tokens) + 1, "every prompt token (ids sent: BOS kept) + 1 generated"
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = direct_prompt_logprobs(model, tokens)
    # the same logits: what differs is the log-softmax, ours in float32, this one in float64
    np.testing.assert_allclose(lp["token_logprobs"][1:len(tokens)], want, atol=1e-5, rtol=0)
    assert all(v <= 0 for v in lp["token_logprobs"][1:])


# -- real text, quantized formats: bit for bit ------------------------------------------------------

QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "Name a famous play by Shakespeare.",
             "What do bees make?"]
# (model, format) from tests/models/graft.py: real-text hybrids, SmolLM2 and a hybrid and a recurrent zoo
# family in the formats users download, on the kernels llama.cpp gives them (AMX or repacked weights)
BIT_FOR_BIT = [("falcon-h1", "f16"), ("falcon-h1", "q4_k_m"), ("falcon-h1", "q8_0"), ("granitehybrid", "q8_0"),
               ("granitehybrid", "q4_k_m"), ("smollm2", "q4_0"), ("smollm2", "q4_k_m"), ("qwen35-tiny", "q4_0"),
               ("qwen35-tiny", "q4_k_m"), ("mamba2-tiny", "q8_0")]


def _answer(llm, question: str) -> tuple[str, list[float]]:
    out = llm.create_chat_completion([{"role": "user", "content": question}], max_tokens=16, temperature=0,
                                     logprobs=True, top_logprobs=1)["choices"][0]
    return out["message"]["content"], [t["logprob"] for t in out["logprobs"]["content"]]


# the small zoo models (random weights, larger than tiny: several ubatches per prompt), f16
BIT_FOR_BIT += [("qwen35-small", "f16"), ("nemotron_h-small", "f16")]


def _path(arch: str, fmt: str):
    import graft
    path = graft.graft_path(arch, fmt) if not arch.endswith("-small") else ZOO / f"{arch}.gguf"
    if not path.exists():
        pytest.skip(f"{path.name} missing: run `make models`")
    return path


@pytest.mark.parametrize("arch,fmt", BIT_FOR_BIT, ids=lambda x: x)
def test_alone_in_a_crowd_and_from_the_cache_bit_for_bit(arch, fmt):
    """What a user checks, at the defaults: the same question alone (`Llama()`), among others
    (`Llama(n_parallel=4)`, staggered concurrent joins) and again (a prefix-cache hit) gives the same text
    and logprobs, exactly."""
    path = _path(arch, fmt)
    with Llama(str(path), n_ctx=2048, logits_all=True, verbose=False) as solo:
        want = {q: _answer(solo, q) for q in QUESTIONS}
    got: dict[str, tuple[str, list[float]]] = {}
    with Llama(str(path), n_ctx=4096, n_parallel=4, verbose=False) as many:
        def ask(i: int, q: str) -> None:
            time.sleep(0.02 * i)  # joins while the others prefill or decode
            got[q] = _answer(many, q)
        threads = [threading.Thread(target=ask, args=(i, q)) for i, q in enumerate(QUESTIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        again = {q: _answer(many, q) for q in QUESTIONS}  # their prompts are cached now
    if "tiny" not in arch:
        assert all(text.strip() for text, _ in want.values())
    for q in QUESTIONS:
        assert got[q] == want[q], f"{path.name} {q!r}: in a crowd {got[q]} != alone {want[q]}"
        assert again[q] == want[q], f"{path.name} {q!r}: from the cache {again[q]} != alone {want[q]}"


COPYING = ["Repeat this sentence exactly: the quick brown fox jumps over the lazy dog.",
           "Repeat this sentence exactly: my favourite fruits are apples, pears and plums.",
           "Copy this list: red, green, blue, yellow, purple.", "What do bees make?"]


@pytest.mark.parametrize("arch,fmt", [("falcon-h1", "q4_k_m"), ("granitehybrid", "q8_0"), ("smollm2", "q4_k_m")],
                         ids=lambda x: x)
def test_speculative_verification_among_eight_bit_for_bit(arch, fmt):
    """Prompt-lookup drafts verified in batches beside 7 other sequences (`Llama(n_parallel=8,
    draft_model=...)`, rejected tokens undone from the recurrent snapshot pool) give the text and
    logprobs of the same question alone without drafts."""
    from pyllama_ssm.llama_speculative import LlamaPromptLookupDecoding
    path = _path(arch, fmt)
    with Llama(str(path), n_ctx=2048, logits_all=True, verbose=False) as solo:
        want = {q: _answer(solo, q) for q in COPYING}
    got: dict[str, tuple[str, list[float]]] = {}
    with Llama(str(path), n_ctx=8192, n_parallel=8, verbose=False, draft_max_seqs=8,
               draft_model=LlamaPromptLookupDecoding(num_pred_tokens=3)) as spec:
        def ask(i: int, q: str) -> None:
            time.sleep(0.02 * i)
            got[q] = _answer(spec, q)
        threads = [threading.Thread(target=ask, args=(i, q)) for i, q in enumerate(COPYING * 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        stats = spec.engine.stats()
    assert stats.draft_tokens > 0, "no draft was verified: the test would not test verification"
    for q in COPYING:
        assert got[q] == want[q], f"{path.name} {q!r}: drafted among 8 {got[q]} != alone {want[q]}"
