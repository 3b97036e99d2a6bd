"""No request is ever lost or left hanging.

A fault on the Engine's thread (a value cffi refuses, a failing prefix restore,
detokenizer or decode, a swap-out that fails) fails its own request only and
frees its sequence; a dead Engine fails every waiting and later request at once
with EngineError.
"""

from __future__ import annotations

import threading
import time

import pytest

import pyllama_ssm as ps
from conftest import zoo_model, zoo_names
from pyllama_ssm import engine as engine_mod
from pyllama_ssm.engine import Engine
from pyllama_ssm.errors import EngineError
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
    e._call(e.cache.clear)
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
