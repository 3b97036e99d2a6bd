"""A short soak of the server (bench/soak.py): concurrent clients, mixed requests, nothing lost or leaked.

The long run (64 clients, hundreds of requests) is `make soak`.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from conftest import ROOT, zoo_path

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
sys.path.insert(0, str(ROOT / "bench"))

import soak  # noqa: E402

from pyllama_ssm.server.process import ServerProcess  # noqa: E402


@pytest.mark.parametrize("name", ["qwen35", "mamba"])
def test_short_soak_loses_and_leaks_nothing(name):
    flags = ["--model", str(zoo_path(name)), "--n_ctx", "2048", "--n_parallel", "4", "--max_queued_requests", "4",
             "--n_threads", "2", "--verbose", "false"]
    with ServerProcess(*flags) as server:
        # 16 clients on 8 places: some get 429 and retry after Retry-After
        report = asyncio.run(soak.soak(server.url, clients=16, requests=40, n_variants=10, long_words=150,
                                       disconnect_share=0.2, seed=1, time_limit_s=120))
    print(report.summary())
    assert report.passed, "\n".join([report.summary(), *report.server_errors, *report.mismatches, *report.leaks])
    assert report.completed >= 20 and report.disconnected >= 1 and report.abandoned >= 1 and report.fuzzed >= 1


def test_soak_under_memory_pressure_finishes():
    """A context too small for its clients: preemption, cached prefixes and resumption never stall.

    (Seen once: with nothing running, a swapped-out sequence waited forever for memory that
    only cached prefixes held.)
    """
    flags = ["--model", str(zoo_path("qwen35")), "--n_ctx", "1024", "--n_parallel", "8",
             "--max_queued_requests", "64", "--n_threads", "2", "--verbose", "false"]
    with ServerProcess(*flags) as server:
        report = asyncio.run(soak.soak(server.url, clients=32, requests=120, n_variants=10, long_words=300,
                                       disconnect_share=0.1, seed=3, time_limit_s=90))
    print(report.summary())
    assert report.passed, "\n".join([report.summary(), *report.server_errors, *report.mismatches, *report.leaks])
