"""No request is ever lost or left hanging.

A fault on the Engine's thread (a value cffi refuses, a failing prefix restore,
detokenizer or decode, a swap-out that fails) fails its own request only and
frees its sequence; a dead Engine fails every waiting and later request at once
with EngineError; out-of-range numbers are refused at the edge, naming the
field and its range; and over the whole sampling parameter space every call
returns or raises within a bound, leaking no cell, snapshot, sequence or thread.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyllama_ssm as ps
from conftest import zoo_model, zoo_names, zoo_path
from pyllama_ssm.engine import core as engine_mod
from pyllama_ssm.engine import Engine
from pyllama_ssm.errors import EngineError
from pyllama_ssm.limits import FLOAT_MAX, INT32_MAX
from pyllama_ssm.sampling import SamplingParams

NAME = "qwen35" if "qwen35" in zoo_names() else (zoo_names() or ["qwen35"])[0]
GREEDY = SamplingParams(temperature=0)
BOUND = 60  # seconds any one call may take on a tiny model
LONG = "System: you are a helpful assistant that answers briefly and well. " * 6  # > one prefix checkpoint


class Fault(Exception):
    """What the tests inject."""


def assert_idle(e: Engine) -> None:
    """Nothing queued, running or swapped out, every sequence id free, no cell or snapshot left."""
    s = e.stats()
    assert (s.queued, s.running, s.preempted) == (0, 0, 0), s
    assert sorted(e._free) == list(range(e.parallel)), "a sequence id was lost"
    e.call(e.cache.clear)
    report = e.memory().report
    if report is not None:
        assert report.kv_cells_used == 0 and report.rs_cells_live == 0 and report.rs_snapshots == 0, report


def alone(prompt: str, n: int = 8) -> list[int]:
    with Engine(zoo_model(NAME), n_ctx=512, parallel=1, prefix_cache=0) as e:
        return e.generate(prompt, GREEDY, max_tokens=n).tokens


def past_the_check(**fields) -> SamplingParams:
    """Parameters that slipped past the edge's check (as a bug elsewhere would let them)."""
    params = SamplingParams(temperature=1.0, seed=1)  # the sampler chain with every stage
    for k, v in fields.items():
        object.__setattr__(params, k, v)
    return params


# -- the Engine's invariant ------------------------------------------------------------------------

def test_a_value_cffi_refuses_fails_its_request_only():
    """The issue's hang: top_k past int32 made Sampler() raise OverflowError after the request left
    the queue; it was in neither the queue nor the running set and waited for ever."""
    with Engine(zoo_model(NAME), n_ctx=512, parallel=2) as e:
        bad = e.submit("x", past_the_check(top_k=11920657811558), max_tokens=4)
        good = e.submit("Hello", GREEDY, max_tokens=8)
        with pytest.raises(OverflowError):
            bad.result(timeout=BOUND)
        assert bad.finish_reason == "error"
        assert good.result(timeout=BOUND).tokens == alone("Hello")
        assert_idle(e)


FAULT_SITES = ["sampler", "restore", "token_to_piece", "swap_out"]


@pytest.mark.parametrize("site", FAULT_SITES)
def test_a_fault_on_the_engine_thread_fails_one_request_and_frees_it(site, monkeypatch):
    prompts = [LONG + f"User: question {i}" for i in range(3)]
    # swap_out: 3 x ~300 tokens cannot fit 512 cells, the newest sequence is swapped out
    with Engine(zoo_model(NAME), n_ctx=512, parallel=3, prefix_cache=0 if site == "swap_out" else 4) as e:
        if site == "restore":  # a cached prefix the next requests hit
            e.generate(prompts[0], GREEDY, max_tokens=2)
        fired = threading.Event()

        def once(original):
            def faulty(*args, **kw):
                if not fired.is_set():
                    fired.set()
                    raise Fault(site)
                return original(*args, **kw)
            return faulty

        if site == "sampler":
            monkeypatch.setattr(engine_mod, "Sampler", once(engine_mod.Sampler))
        elif site == "restore":
            monkeypatch.setattr(e.cache, "restore", once(e.cache.restore))
        elif site == "token_to_piece":
            monkeypatch.setattr(e.model, "token_to_piece", once(e.model.token_to_piece))
        else:
            monkeypatch.setattr(e.ctx, "seq_state", once(e.ctx.seq_state))
        n = 200 if site == "swap_out" else 8
        reqs = [e.submit(p, GREEDY, max_tokens=n) for p in prompts]
        outcomes = []
        for r in reqs:
            try:
                outcomes.append(r.result(timeout=BOUND).tokens)
            except Fault:
                outcomes.append(None)
        assert fired.is_set(), f"the {site} fault never fired"
        assert outcomes.count(None) == 1, outcomes
        for p, got in zip(prompts, outcomes):
            if got is not None and site != "swap_out":
                assert got == alone(p), "a request beside the faulty one changed"
        assert e.failure is None and e._thread.is_alive()
        assert_idle(e)


def test_a_decode_error_fails_the_batch_and_the_engine_goes_on(monkeypatch):
    with Engine(zoo_model(NAME), n_ctx=512, parallel=2) as e:
        original, fired = e.ctx.decode, threading.Event()

        def decode(batch):
            if not fired.is_set():
                fired.set()
                raise ps.DecodeError("llama_decode returned -1 (injected)")
            return original(batch)

        monkeypatch.setattr(e.ctx, "decode", decode)
        with pytest.raises(ps.DecodeError):
            e.generate("Hello", GREEDY, max_tokens=4)
        assert e.generate("Hello", GREEDY, max_tokens=8).tokens == alone("Hello")
        assert_idle(e)


class Dying(BaseException):
    """Not an Exception: nothing on the engine thread may catch it as a request's fault."""


def test_a_dead_engine_fails_every_request_at_once_and_refuses_new_ones(monkeypatch):
    e = Engine(zoo_model(NAME), n_ctx=512, parallel=1)
    try:
        running = e.submit("Hello", SamplingParams(temperature=0, grammar='root ::= "a" root'), max_tokens=400)
        next(iter(running))  # it runs
        queued = [e.submit(f"queued {i}", GREEDY, max_tokens=4) for i in range(3)]

        def dying_step():
            raise Dying("the engine thread's own bug")

        monkeypatch.setattr(e, "_step", dying_step)
        e._wake()
        t0 = time.monotonic()
        for r in [running, *queued]:
            with pytest.raises(EngineError, match="Dying: the engine thread's own bug") as info:
                r.result(timeout=5)
            assert isinstance(info.value.__cause__, Dying)
        assert time.monotonic() - t0 < 5
        assert isinstance(e.failure, Dying)
        with pytest.raises(EngineError, match="engine stopped: Dying"):
            e.submit("later", GREEDY, max_tokens=4)
        assert e.stats().queued == 0 and e.memory() is not None  # reads still answer
    finally:
        e.close()


def test_a_dead_engine_turns_the_servers_health_503_and_its_answers_503(monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from pyllama_ssm.server.app import create_app
    from pyllama_ssm.server.settings import ModelSettings, ServerSettings

    app = create_app(ServerSettings(), [ModelSettings(model=str(zoo_path(NAME)), n_parallel=2, n_ctx=256,
                                                      n_threads=2, verbose=False)])
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        engine = next(iter(app.state.registry.models.values())).engine

        def dying_step():
            raise Dying("the engine thread's own bug")

        monkeypatch.setattr(engine, "_step", dying_step)
        engine._wake()
        deadline = time.monotonic() + 5
        while engine.failure is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        health = c.get("/health")
        assert health.status_code == 503 and "Dying" in health.json()["error"]["message"]
        for stream in (False, True):
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": stream})
            assert r.status_code == 503 and r.headers["retry-after"], r.text
            assert "engine stopped: Dying" in r.json()["error"]["message"]
        assert next(iter(c.get("/extras/stats").json()["models"].values()))["in_flight"] == 0


# -- one range check at the edge --------------------------------------------------------------------

OUT_OF_RANGE = [
    ("top_k", 11920657811558, r"top_k=11920657811558: must be an int in 0\.\.2147483647"),
    ("top_k", -1, r"top_k=-1: must be an int in 0\.\.2147483647"),
    ("temperature", float("nan"), r"temperature=nan: must be a number in \[-3\.40282e\+38, 3\.40282e\+38\]"),
    ("temperature", 4.2e190, r"temperature=4\.2e\+190"),
    ("temperature", float("inf"), r"temperature=inf"),
    ("top_p", 1.5, r"top_p=1\.5: must be a number in \[0, 1\]"),
    ("typical_p", 0.0, r"typical_p=0\.0: must be a number in \(0, 1\]"),
    ("repeat_penalty", 0.0, r"repeat_penalty=0\.0: must be a number in \(0,"),
    ("frequency_penalty", -math.inf, r"frequency_penalty=-inf"),
    ("mirostat_mode", 3, r"mirostat_mode=3: must be an int in 0\.\.2"),
    ("mirostat_tau", 1e39, r"mirostat_tau=1e\+39"),
    ("seed", 2**64, r"seed=18446744073709551616"),
    ("top_k", 4.5, r"top_k=4\.5: must be an int"),
    ("top_p", "high", r"top_p='high': must be a number"),
]


@pytest.mark.parametrize("n_parallel", [1, 2])
def test_the_python_api_refuses_out_of_range_numbers_naming_field_and_range(n_parallel):
    with ps.Llama(str(zoo_path(NAME)), n_ctx=256, n_parallel=n_parallel, verbose=False) as llama:
        for name, value, message in OUT_OF_RANGE:
            with pytest.raises(ValueError, match=message):
                llama.create_completion("x", max_tokens=4, **{name: value})
        with pytest.raises(ValueError, match=r"logit_bias\[3\]=nan"):
            llama.create_completion("x", max_tokens=4, logit_bias={3: float("nan")})
        # what stays accepted: -inf biases ban a token, seeds past 32 bits wrap as llama-cpp-python's
        out = llama.create_completion("x", max_tokens=4, temperature=0, logit_bias={3: float("-inf")}, seed=-5)
        assert out["choices"][0]["finish_reason"] in ("length", "stop")
        if llama.engine is not None:
            assert_idle(llama.engine)


# -- the whole sampling parameter space -------------------------------------------------------------

_ints = st.one_of(st.integers(-3, 3), st.sampled_from([INT32_MAX, INT32_MAX + 1, -2**31 - 1, 2**32, 2**63, -2**70]),
                  st.integers(-2**80, 2**80))
_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3),
                    st.sampled_from([FLOAT_MAX, 3.5e38, -0.0, 1e-45, 4.2e190]))
SPACE = st.fixed_dictionaries({}, optional={
    "temperature": _floats, "top_k": _ints, "top_p": _floats, "min_p": _floats, "typical_p": _floats,
    "repeat_penalty": _floats, "frequency_penalty": _floats, "presence_penalty": _floats,
    "mirostat_mode": _ints, "mirostat_tau": _floats, "mirostat_eta": _floats, "seed": st.one_of(st.none(), _ints),
    "max_tokens": st.one_of(st.none(), _ints), "logprobs": st.one_of(st.none(), _ints),
    "logit_bias": st.dictionaries(_ints, _floats, max_size=2),
})


@pytest.fixture(scope="module")
def llamas():
    with ps.Llama(str(zoo_path(NAME)), n_ctx=128, n_parallel=1, logits_all=True, verbose=False) as one, \
            ps.Llama(str(zoo_path(NAME)), n_ctx=128, n_parallel=2, verbose=False) as two:
        yield one, two


def test_every_sampling_call_returns_or_refuses_within_a_bound(llamas):
    threads_before = threading.active_count()
    calls = {"returned": 0, "refused": 0}
    pool = concurrent.futures.ThreadPoolExecutor(2)

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(kwargs=SPACE, which=st.integers(0, 1), stream=st.booleans())
    def one_call(kwargs, which, stream):
        llama = llamas[which]

        def call():
            out = llama.create_completion("Hello", stream=stream, **kwargs)
            return list(out) if stream else out

        future = pool.submit(call)
        try:
            future.result(timeout=BOUND)
            calls["returned"] += 1
        except concurrent.futures.TimeoutError:
            raise AssertionError(f"create_completion({kwargs}) did not return within {BOUND}s") from None
        except (ValueError, TypeError):  # refused at the edge, naming the field
            calls["refused"] += 1

    try:
        one_call()
    finally:
        pool.shutdown(wait=True)
    print(calls)
    assert calls["returned"] and calls["refused"]
    assert_idle(llamas[1].engine)
    assert threading.active_count() <= threads_before, "a thread was left behind"


def test_dataclass_replace_keeps_the_check():
    with pytest.raises(ValueError, match="top_k"):
        dataclasses.replace(GREEDY, top_k=2**40)
