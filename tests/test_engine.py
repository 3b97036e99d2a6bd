"""The Engine: concurrent requests give what each gives alone, memory comes back."""

from __future__ import annotations

import asyncio
import threading

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import pyllama_ssm as ps
from conftest import zoo_model, zoo_names
from pyllama_ssm.bindings import lib
from pyllama_ssm.engine import Engine
from pyllama_ssm.sampling import Sampler, SamplingParams

GREEDY = SamplingParams(temperature=0)
SYSTEM = "System: you are a helpful assistant that answers briefly. "
PROMPTS = [SYSTEM + "User: hi", SYSTEM + "User: tell me a story about a fox", "Hello",
           "The quick brown fox jumps over the lazy dog and keeps running far away"]
N_GEN = 16


_alone: dict[tuple[str, str], list[int]] = {}


def alone(name: str, prompt: str, n: int = N_GEN, invariant: bool = False) -> list[int]:
    """Greedy tokens of the prompt run by itself on a fresh context."""
    key = (name, prompt, n, invariant)
    if key not in _alone:
        with Engine(zoo_model(name), n_ctx=512, parallel=1, prefix_cache=0, batch_invariant=invariant) as e:
            _alone[key] = e.generate(prompt, GREEDY, max_tokens=n).tokens
    return _alone[key]


@pytest.mark.parametrize("name", zoo_names())
def test_concurrent_requests_match_each_alone(name):
    with Engine(zoo_model(name), n_ctx=2048, parallel=4) as e:
        first = [e.submit(p, GREEDY, max_tokens=N_GEN) for p in PROMPTS[:2]]
        next(iter(first[0]))  # the others join mid-run
        later = [e.submit(p, GREEDY, max_tokens=N_GEN) for p in PROMPTS[2:]]
        got = [r.result(timeout=120) for r in first + later]
    for p, c in zip(PROMPTS, got):
        assert c.tokens == alone(name, p), f"{name}: {p!r}"
        assert c.finish_reason in ("length", "stop") and c.usage.completion_tokens == len(c.tokens)


@pytest.mark.parametrize("name", [n for n in zoo_names() if n in ("llama", "mamba2", "qwen35", "jamba", "rwkv7")])
def test_shared_prefix_is_served_from_the_cache(name):
    long_system = SYSTEM * 6  # > one checkpoint interval of tokens
    with Engine(zoo_model(name), n_ctx=2048, parallel=2) as e:
        a = e.generate(long_system + "User: first question", GREEDY, max_tokens=N_GEN)
        b = e.generate(long_system + "User: second question", GREEDY, max_tokens=N_GEN)
        stats = e.stats()
    assert a.usage.cached_tokens == 0
    assert b.usage.cached_tokens >= 64, "the common system prompt must not be prefilled again"
    assert stats.prefix_hits >= 1
    assert b.tokens == alone(name, long_system + "User: second question")


@pytest.mark.parametrize("name", [n for n in zoo_names() if n in ("llama", "qwen35", "jamba")])
def test_preemption_under_memory_pressure_resumes_bit_identical(name):
    prompts = [PROMPTS[3] + f" number {i}" for i in range(4)]
    with Engine(zoo_model(name), n_ctx=256, parallel=4, prefix_cache=0) as e:
        assert e.n_ctx == 256
        reqs = [e.submit(p, GREEDY, max_tokens=80) for p in prompts]
        got = [r.result(timeout=120) for r in reqs]
        assert e._counters["preemptions"] >= 1, "4 x ~100 tokens cannot fit 256 cells at once"
    for p, c in zip(prompts, got):
        assert c.tokens == alone(name, p, 80)


def test_cancel_frees_memory_and_stops_stream():
    name = "qwen35" if "qwen35" in zoo_names() else zoo_names()[0]
    with Engine(zoo_model(name), n_ctx=1024, parallel=2, prefix_cache=0) as e:
        r = e.submit(PROMPTS[1], GREEDY, max_tokens=10_000)
        it = iter(r)
        next(it)
        r.cancel()
        with pytest.raises(StopIteration):
            while True:
                next(it)
        assert r.finish_reason == "cancelled"
        if e.memory().report is not None:
            rep = e.memory().report
            assert rep.kv_cells_used == 0 and rep.rs_cells_live == 0


def test_stop_strings_max_tokens_and_streaming_text():
    name = zoo_names()[0]
    with Engine(zoo_model(name), n_ctx=1024, parallel=2) as e:
        full = e.generate("Hello", GREEDY, max_tokens=12)
        assert full.finish_reason == "length" and len(full.tokens) == 12
        streamed = "".join(c.text for c in e.submit("Hello", GREEDY, max_tokens=12))
        assert streamed == full.text
        if len(full.text) > 4:
            stop = full.text[2:4]
            cut = e.generate("Hello", GREEDY, max_tokens=12, stop=[stop])
            assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]


def test_async_streaming():
    name = zoo_names()[0]

    async def collect(e):
        return [c.token async for c in e.submit("Hello", GREEDY, max_tokens=6)]

    with Engine(zoo_model(name), n_ctx=512, parallel=1) as e:
        tokens = asyncio.run(collect(e))
    assert tokens == alone(name, "Hello", 6)


def test_bad_requests_are_refused_at_submit():
    name = zoo_names()[0]
    with Engine(zoo_model(name), n_ctx=256, parallel=1) as e:
        with pytest.raises(ValueError, match=f"does not fit the context of {e.n_ctx}"):
            e.submit("word " * (e.n_ctx + 10))
        with pytest.raises(ps.TokenError, match="out of range"):
            e.submit([1, 10**9])
        with pytest.raises(ValueError, match="empty"):
            e.submit([])
        with pytest.raises(ValueError, match="top_p"):
            e.submit("hi", SamplingParams(top_p=2.0))
        assert e.generate("hi", GREEDY, max_tokens=3).finish_reason in ("length", "stop")


def test_many_threads_submit_at_once():
    name = zoo_names()[0]
    results = {}
    with Engine(zoo_model(name), n_ctx=2048, parallel=4) as e:
        def worker(i):
            results[i] = e.generate(PROMPTS[i % 4], GREEDY, max_tokens=8).tokens
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    for i in range(8):
        assert results[i] == alone(name, PROMPTS[i % 4], 8)


class EngineMachine(RuleBasedStateMachine):
    """Random submit / cancel / wait never leak cells, mix tokens or deadlock."""

    name = "qwen35"

    def __init__(self):
        super().__init__()
        self.engine = Engine(zoo_model(self.name), n_ctx=384, parallel=3, prefix_cache=2)
        self.requests: list[tuple[str, int, object]] = []

    @rule(prompt=st.sampled_from(PROMPTS), n=st.integers(1, 12))
    def submit(self, prompt, n):
        self.requests.append((prompt, n, self.engine.submit(prompt, GREEDY, max_tokens=n)))

    @rule(i=st.integers(0, 20))
    def cancel(self, i):
        if self.requests:
            self.requests[i % len(self.requests)][2].cancel()

    @rule()
    def wait_all(self):
        for prompt, n, r in self.requests:
            c = None
            try:
                c = r.result(timeout=120)
            except Exception as e:  # noqa: BLE001 - the only allowed failure is none
                raise AssertionError(f"request failed: {e!r}")
            if c.finish_reason != "cancelled":
                assert c.tokens == alone(self.name, prompt, n), "tokens of one request leaked into another"
            else:
                assert c.tokens == alone(self.name, prompt, n)[:len(c.tokens)]
        self.requests.clear()

    @invariant()
    def engine_alive(self):
        assert self.engine._thread.is_alive()

    def teardown(self):
        self.wait_all()
        self.engine.cache.clear()
        mem = self.engine.memory()
        self.engine.close()
        if mem.report is not None:
            assert mem.report.kv_cells_used == 0 and mem.report.rs_cells_live == 0, "cells leaked"
            assert mem.report.rs_snapshots == 0


@pytest.mark.parametrize("name", [n for n in zoo_names() if n in ("qwen35", "jamba", "mamba2", "llama")])
def test_engine_state_machine(name):
    """Hybrid (delta net, mamba1), recurrent and attention-only models: each prefix store and memory."""
    machine = type(f"EngineMachine_{name}", (EngineMachine,), {"name": name})
    machine.TestCase.settings = settings(max_examples=4, stateful_step_count=8, deadline=None,
                                         suppress_health_check=list(HealthCheck))
    machine.TestCase().runTest()


def test_logprobs_match_the_models_distribution():
    name = zoo_names()[0]
    with Engine(zoo_model(name), n_ctx=512, parallel=1) as e:
        c = e.generate("Hello", GREEDY, max_tokens=5, logprobs=3)
        with pytest.raises(ValueError, match="logprobs"):
            e.submit("Hello", logprobs=-1)
    assert c.tokens == alone(name, "Hello", 5)
    assert len(c.logprobs) == len(c.top_logprobs) == 5
    for tok, lp, top in zip(c.tokens, c.logprobs, c.top_logprobs):
        assert lp <= 0 and len(top) == 3
        assert max(top, key=top.get) == tok, "greedy picks the most likely token"
        assert abs(top[tok] - lp) < 1e-9


@pytest.mark.skipif("llama" not in zoo_names(), reason="needs the llama zoo model")
def test_attention_only_prefix_hits_any_leading_part_and_frees_its_cells():
    """Attention-only models: holder sequences share the prefix's KV cells, usable at any length."""
    long_system = SYSTEM * 6
    with Engine(zoo_model("llama"), n_ctx=2048, parallel=2, prefix_cache=4) as e:
        first = e.generate(long_system + "User: first question", GREEDY, max_tokens=N_GEN)
        # shares only the system prompt with the cached entry (prompt + answer of the first)
        second = e.generate(long_system + "Assistant: a different turn", GREEDY, max_tokens=N_GEN)
        n_system = len(e.model.tokenize(long_system))
        assert first.usage.cached_tokens == 0
        assert n_system - 2 <= second.usage.cached_tokens < n_system + 4, "the common part, mid-entry"
        assert second.tokens == alone("llama", long_system + "Assistant: a different turn")
        held = e.memory().report.kv_cells_used
        assert held >= n_system, "cached prefixes keep their cells"
        e.call(e.cache.clear)
        assert e.memory().report.kv_cells_used == 0, "dropping the entries frees their cells"


def test_prefix_cache_stays_within_its_byte_budget():
    name = "qwen35" if "qwen35" in zoo_names() else zoo_names()[0]
    long_system = SYSTEM * 6
    with Engine(zoo_model(name), n_ctx=2048, parallel=2, prefix_cache=8, prefix_cache_bytes=None) as e:
        for q in ("one", "two", "three"):
            e.generate(long_system + f"User: question {q}", GREEDY, max_tokens=4)
        unbounded = e.cache.bytes
        assert len(e.cache.entries) >= 3
    budget = unbounded // 2
    with Engine(zoo_model(name), n_ctx=2048, parallel=2, prefix_cache=8, prefix_cache_bytes=budget) as e:
        for q in ("one", "two", "three"):
            e.generate(long_system + f"User: question {q}", GREEDY, max_tokens=4)
        assert 0 < e.cache.bytes <= budget
        assert e.memory().cached_bytes == e.cache.bytes
        assert (e.memory().cached_prefixes_max, e.memory().cached_bytes_max) == (8, budget)  # the bound, reported
        b = e.generate(long_system + "User: question four", GREEDY, max_tokens=4)
        assert b.usage.cached_tokens >= 64, "the most recent entries survive eviction"


def test_a_failing_logits_processor_fails_only_its_request():
    """An exception in one request's callback fails that request; the others go on untouched."""
    import dataclasses
    name = "qwen35" if "qwen35" in zoo_names() else zoo_names()[0]

    def explode(tokens, logits):
        if len(tokens) >= 2:
            raise RuntimeError("processor bug")
        return logits

    bad = dataclasses.replace(GREEDY, logits_processor=explode)
    with Engine(zoo_model(name), n_ctx=1024, parallel=2, prefix_cache=0) as e:
        good = e.submit(PROMPTS[0], GREEDY, max_tokens=N_GEN)
        broken = e.submit(PROMPTS[1], bad, max_tokens=N_GEN)
        with pytest.raises(RuntimeError, match="processor bug"):
            broken.result(timeout=60)
        assert good.result(timeout=60).tokens == alone(name, PROMPTS[0])
        assert broken.finish_reason == "error"
        report = e.memory().report
    if report is not None:
        assert report.kv_cells_used == 0 and report.rs_cells_live == 0, "the failed request's cells were freed"


def test_a_request_submitted_while_others_decode_joins_at_the_next_step():
    """submit() never waits for the engine's step: a late short request finishes long before the long ones."""
    name = "qwen35" if "qwen35" in zoo_names() else zoo_names()[0]
    with Engine(zoo_model(name), n_ctx=2048, parallel=4, prefix_cache=0) as e:
        long = [e.submit(p, GREEDY, max_tokens=400) for p in PROMPTS[:2]]
        for r in long:
            next(iter(r))  # both are decoding
        late = e.submit(PROMPTS[2], GREEDY, max_tokens=2)
        late.result(timeout=60)
        assert not any(r.done for r in long), "the late request waited for the running ones"
        assert e.stats().running == 2
        for r in long:
            r.cancel()


def test_output_rows_below_the_sequences_are_refused():
    model = zoo_model(zoo_names()[0])
    with pytest.raises(ps.ContextError, match="n_outputs_max=2"):
        ps.Context(model, n_ctx=256, n_seq_max=4, overrides={"n_outputs_max": 2})


@pytest.mark.skipif("llama" not in zoo_names(), reason="needs the llama zoo model")
def test_engine_on_the_upstream_build_serves_without_a_prefix_cache():
    """The pristine library has no memory report or snapshot pool: the Engine still serves, uncached."""
    from conftest import run_with_build, zoo_path
    code = """
import sys
import pyllama_ssm as ps
from pyllama_ssm.engine import Engine
from pyllama_ssm.sampling import SamplingParams
for path in sys.argv[1:]:
    with Engine(ps.Model(path), n_ctx=512, parallel=2) as e:
        reqs = [e.submit(p, SamplingParams(temperature=0), max_tokens=4) for p in ("Hello there", "Hello again")]
        print(e.n_cache, [r.result(timeout=60).finish_reason for r in reqs])
"""
    out = run_with_build("upstream", code, str(zoo_path("llama")), str(zoo_path("qwen35"))).splitlines()
    assert out[-2:] == ["0 ['length', 'length']"] * 2


PENALIZED = SamplingParams(temperature=0, repeat_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.5,
                           penalty_last_n=16)


@pytest.mark.parametrize("params", [GREEDY, PENALIZED], ids=["greedy", "penalized"])
@pytest.mark.parametrize("name", ["qwen35", "llama"])
def test_greedy_takes_the_tokens_llamas_sampler_chain_takes(name, params):
    """Greedy reads the context's logits with numpy (no copy of the vocabulary into candidates);
    with penalties the chain runs on the penalty window and the raw first maximum, or on the
    whole vocabulary when that maximum is in the window. Either way: llama.cpp's chain's token,
    output by output, step by step, and both penalized cases occur."""
    model = zoo_model(name)
    n = len(PROMPTS)
    samplers = [Sampler(model, params) for _ in range(n)]
    references = []
    for _ in range(n):
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if params is PENALIZED:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_penalties(
                model.n_vocab, params.penalty_last_n, params.repeat_penalty, params.frequency_penalty,
                params.presence_penalty))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        references.append(chain)
    history: list[list[int]] = [[] for _ in range(n)]
    raw_max_in_window = []
    try:
        with ps.Context(model, n_ctx=512, n_seq_max=n) as ctx, ps.Batch(256, n) as batch:
            prompts = [model.tokenize(p) for p in PROMPTS]
            outputs = [batch.add_sequence(p, 0, s) for s, p in enumerate(prompts)]
            pos = [len(p) for p in prompts]
            for _ in range(24):
                ctx.decode(batch)
                for s, i in enumerate(outputs):
                    raw_max_in_window.append(int(ctx.logits(i).argmax()) in history[s][-params.penalty_last_n:])
                tokens = [samplers[s].sample(ctx.ptr, i) for s, i in enumerate(outputs)]
                assert tokens == [lib.llama_sampler_sample(references[s], ctx.ptr, i) for s, i in enumerate(outputs)]
                batch.clear()
                outputs = [batch.add(t, pos[s], s, logits=True) for s, t in enumerate(tokens)]
                pos = [p + 1 for p in pos]
                for s, t in enumerate(tokens):
                    history[s].append(t)
    finally:
        for sampler in samplers:
            sampler.close()
        for chain in references:
            lib.llama_sampler_free(chain)
    assert samplers[0].greedy == (params is GREEDY)
    if params is PENALIZED:  # the shortcut and the whole-vocabulary fallback both ran
        assert any(raw_max_in_window) and not all(raw_max_in_window), raw_max_in_window


@pytest.mark.parametrize("name", [n for n in zoo_names() if n in ("llama", "qwen35", "jamba")])
def test_requests_sharing_a_prefix_in_flight_compute_it_once(name):
    """Four requests on one long system prompt, submitted together: the others wait for the first one's
    checkpoint where their prompts part, instead of prefilling the same tokens beside it."""
    system = SYSTEM * 12  # several prefill chunks' worth
    prompts = [system + f"User: question number {i}" for i in range(4)]
    with Engine(zoo_model(name), n_ctx=4096, parallel=4, n_batch=128, batch_invariant=True) as e:
        reqs = [e.submit(p, GREEDY, max_tokens=N_GEN) for p in prompts]
        got = [r.result(timeout=120) for r in reqs]
        decoded = e.stats().tokens_decoded
    n_system = len(zoo_model(name).tokenize(system))
    n_prompts = sum(len(zoo_model(name).tokenize(p)) for p in prompts)
    assert sum(c.usage.cached_tokens for c in got) >= 3 * (n_system - 8), "the followers start from the shared prefix"
    assert decoded < n_prompts - 2 * n_system, f"{decoded} tokens decoded for {n_prompts} prompt tokens"
    for p, c in zip(prompts, got):
        assert c.tokens == alone(name, p, invariant=True), f"{name}: {p[-12:]!r}"


def test_one_configuration_reaches_the_context():
    from pyllama_ssm.engine import EngineConfig
    cfg = EngineConfig(n_ctx=1024, parallel=2, n_batch=256, n_threads=1, n_threads_batch=2, prefix_cache=3,
                       batch_invariant=True)
    with Engine(zoo_model("qwen35"), cfg) as e:
        p = e.ctx.params
        assert (p.n_threads, p.n_threads_batch, p.n_batch, p.n_ubatch) == (1, 2, 256, 256)
        assert e.config == cfg and e.n_cache == 3 and e.ctx.batch_invariant
    with pytest.raises(TypeError, match="n_thread"):
        Engine(zoo_model("qwen35"), n_thread=2)
    # llama-cpp-python's n_ubatch reaches the Engine's context too: steps of n_batch, passes of n_ubatch
    with ps.Llama(str(zoo_model("qwen35").path), n_ctx=1024, n_parallel=2, n_batch=256, n_ubatch=64,
                  verbose=False) as llm:
        assert (llm.engine.ctx.params.n_batch, llm.engine.ctx.params.n_ubatch) == (256, 64)


def test_configuration_is_checked_once_into_typed_settings():
    """EngineConfig checks every setting when it is made, and holds the context's other settings typed
    (ContextParams); Llama makes the same objects from llama-cpp-python's arguments, and the server from
    its flags through Llama's, so a wrong value is refused before a model loads, naming itself."""
    from pyllama_ssm.context import ContextParams
    from pyllama_ssm.engine import EngineConfig
    from pyllama_ssm.server.registry import load_llama
    from pyllama_ssm.server.settings import ModelSettings
    for bad, match in (({"parallel": 0}, "parallel=0"), ({"n_batch": 0}, "n_batch=0"),
                       ({"flash_attn": "yes"}, "flash_attn='yes'"), ({"draft_max_seqs": -1}, "draft_max_seqs=-1"),
                       ({"prefix_cache": -1}, "prefix_cache=-1"),
                       ({"context_overrides": {"type_k": 999}}, "type_k=999"),
                       ({"context_overrides": {"rope_freq_base": float("nan")}}, "rope_freq_base=nan")):
        with pytest.raises((ValueError, ps.ContextError), match=match):
            EngineConfig(**bad)
    with pytest.raises(TypeError, match="no setting 'type_kk'"):
        EngineConfig(context_overrides={"type_kk": 1})
    cfg = EngineConfig(context_overrides={"type_k": 1, "offload_kqv": 1})
    assert cfg.context_overrides == ContextParams(type_k=1, offload_kqv=True)
    path = str(zoo_model("qwen35").path)
    with pytest.raises(ps.ContextError, match="type_v=99"):
        ps.Llama(path, type_v=99, verbose=False)
    settings = ModelSettings(model=path, n_parallel=2, n_ctx=512, type_k=1, type_v=1, rope_freq_base=1e4, verbose=False)
    with load_llama(settings) as llm:  # the server's flags made a Llama
        made = llm.engine.config.context_overrides
        assert isinstance(made, ContextParams) and (made.type_k, made.type_v, made.rope_freq_base) == (1, 1, 1e4)
        assert (llm.engine.ctx.params.type_k, llm.engine.ctx.params.rope_freq_base) == (1, 1e4)


@pytest.mark.parametrize("name", [n for n in zoo_names() if n in ("llama", "qwen35")])
def test_a_conversation_keeps_its_newest_tail_not_one_per_turn(name):
    """Each turn resumes from the previous turn's tail (prompt + answer, fed back as tokens), and that
    tail gives way to the new one: the cache holds one tail per conversation."""
    with Engine(zoo_model(name), n_ctx=4096, parallel=2, n_batch=64) as e:
        tokens, user = e.model.tokenize(SYSTEM * 12 + "User: first"), e.model.tokenize(" next", add_special=False)
        for turn in range(5):
            c = e.generate(tokens, GREEDY, max_tokens=4)
            # all but the answer's last token (never decoded) and the new user message
            assert turn == 0 or c.usage.cached_tokens == len(tokens) - 1 - len(user), turn
            tokens = tokens + c.tokens + user
        keys = e.call(lambda: list(e.cache.entries))
    finished = [k for k in keys if len(k) % 64 != 0]  # a tail, not a prefill checkpoint
    assert len(finished) == 1, [len(k) for k in keys]


def test_checkpoints_must_be_prompt_positions():
    with Engine(zoo_model("qwen35"), n_ctx=512, parallel=1) as e:
        prompt = e.model.tokenize("a short prompt")
        for bad in ([0], [len(prompt) + 1], ["3"]):
            with pytest.raises(ValueError, match="checkpoints="):
                e.submit(prompt, GREEDY, max_tokens=1, checkpoints=bad)
        assert e.generate(prompt, GREEDY, max_tokens=2, checkpoints=[2, len(prompt)]).usage.completion_tokens == 2
        assert {len(k) for k in e.cache.entries} >= {2, len(prompt)}


def test_a_full_cache_drops_what_a_turn_supersedes_before_evicting_another_conversation():
    """Three entries: the shared system prompt and two users' turn boundaries.  User A's next turn
    replaces A's boundary; it must not evict B's (the least recently used) to make room first."""
    with Engine(zoo_model("qwen35"), n_ctx=2048, parallel=2, prefix_cache=3) as e:
        system = e.model.tokenize(SYSTEM * 4)
        a1, b1 = system + e.model.tokenize(" User A: hi", add_special=False), \
            system + e.model.tokenize(" User B: hello", add_special=False)
        a2 = a1 + e.model.tokenize(" more from A", add_special=False)
        b2 = b1 + e.model.tokenize(" more from B", add_special=False)
        for prompt in (a1, b1, a2):
            e.generate(prompt, GREEDY, max_tokens=1, checkpoints=[len(system), len(prompt)])
        assert sorted(map(len, e.cache.entries)) == sorted([len(system), len(b1), len(a2)])
        assert e.generate(b2, GREEDY, max_tokens=1).usage.cached_tokens == len(b1)


def test_slots_and_prefix_entries_say_what_each_sequence_and_the_cache_hold():
    """Engine.slots(): per sequence, None when idle, else the request's prefill then decode progress;
    Engine.prefix_entries(): the cache's entries.  Both are read on the engine thread between steps."""
    import dataclasses

    from pyllama_ssm.engine import PrefixEntryView, SlotView
    prompt = SYSTEM * 20 + "User: tell me about foxes"
    with Engine(zoo_model("qwen35"), n_ctx=2048, parallel=2, n_batch=16) as e:
        assert e.slots() == [None, None] and e.prefix_entries() == []
        tokens = e.model.tokenize(prompt)
        first = e.submit(tokens, GREEDY, max_tokens=200)
        seen: list[SlotView] = []
        while not first.done:  # each read falls between two steps: the prefill takes len(tokens) / 16 of them
            views = [v for v in e.slots() if v is not None]
            assert len(views) <= 1
            seen += views
        first.result(timeout=60)
        assert seen and all(isinstance(v, SlotView) and v.request_id == first.id for v in seen)
        assert {(v.seq, v.prompt_tokens, v.max_tokens, v.cached_tokens) for v in seen} == \
            {(seen[0].seq, len(tokens), 200, 0)}
        prefill = [v for v in seen if v.state == "prefill"]
        decode = [v for v in seen if v.state == "decode"]
        assert prefill and decode, "the reads catch the prompt's 16-token chunks and the decode"
        assert all(0 <= v.computed < len(tokens) and v.generated == 0 for v in prefill)
        assert all(v.computed == len(tokens) and 0 <= v.generated <= 200 for v in decode)
        assert [v.computed for v in seen] == sorted(v.computed for v in seen)
        assert [v.generated for v in seen] == sorted(v.generated for v in seen)
        with pytest.raises(dataclasses.FrozenInstanceError):
            seen[0].computed = 0

        entries = e.prefix_entries()
        assert entries and all(isinstance(p, PrefixEntryView) for p in entries)
        assert entries == e.call(lambda: [PrefixEntryView(len(k), e.cache.entry_bytes(len(k)), v.hits)
                                          for k, v in e.cache.entries.items()])
        assert all(0 < p.n_tokens <= len(tokens) + 200 and p.bytes > 0 and p.hits == 0 for p in entries)

        # a second request on the same prompt resumes from the cache: its view says how much it took
        second = e.submit(tokens + e.model.tokenize(" and wolves", add_special=False), GREEDY, max_tokens=400)
        next(iter(second))
        (view,) = [v for v in e.slots() if v is not None]
        assert view.request_id == second.id and view.state == "decode" and view.generated >= 1
        assert 0 < view.cached_tokens <= view.computed == view.prompt_tokens
        assert sum(p.hits for p in e.prefix_entries()) == 1
        second.cancel()
        for _ in range(1000):  # its sequence is freed at the next step
            if e.slots() == [None, None]:
                break
        assert e.slots() == [None, None] and second.finish_reason == "cancelled"


def test_a_trace_records_each_requests_timeline(tmp_path, monkeypatch):
    """PYLLAMA_SSM_TRACE: every request's arrival, start (with its cache hit), first token and end, and
    every step with what it fed; one prompt per step (scheduler.plan_step) shows in the steps."""
    import json
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv("PYLLAMA_SSM_TRACE", str(path))
    prompts = PROMPTS[2:] + [SYSTEM * 6 + "User: first", SYSTEM * 7 + "User: second"]  # 2 short, 2 long
    with Engine(zoo_model("qwen35"), n_ctx=2048, parallel=4, prefix_cache=0) as e:
        assert all(len(e.model.tokenize(p)) > 64 for p in prompts[2:])
        done = [r.result(timeout=120) for r in [e.submit(p, GREEDY, max_tokens=4) for p in prompts]]
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert events[0]["ev"] == "open"
    ids = {ev["req"] for ev in events if ev["ev"] == "submit"}
    assert len(ids) == 4 and all(c.usage.completion_tokens == 4 for c in done)
    for kind in ("start", "first", "end"):
        assert {ev["req"] for ev in events if ev["ev"] == kind} == ids, kind
    steps = [ev for ev in events if ev["ev"] == "step"]
    assert sum(ev["n"] for ev in steps) == e.stats().tokens_decoded
    assert sum(len(ev["decode"]) for ev in steps) == 4 * 3  # the first token comes from the prompt's step
    assert sum(len(ev["prefill"]) for ev in steps) >= 4
    long_prompts = [ev for ev in steps if sum(n > 64 for _, _, n in ev["prefill"]) > 1]
    assert not long_prompts, "two long prompts shared a step"
