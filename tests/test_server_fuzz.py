"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis), as a new user would try it.

Every applicable check: no 5xx, responses and status codes as documented,
content types, valid requests accepted and invalid ones refused (the schema
states every bound the server enforces), 405 with Allow.  Fixed seed, a bounded
number of examples; afterwards nothing is in flight, queued, running or
swapped out and no memory cell is held beyond the prefix cache's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, zoo_path

httpx = pytest.importorskip("httpx")
pytest.importorskip("schemathesis")

from pyllama_ssm.server.process import ServerProcess  # noqa: E402

SEED, EXAMPLES = 3, 300


def idle_stats(c: httpx.Client, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = next(iter(c.get("/extras/stats").json()["models"].values()))
        busy = s["in_flight"] or any(s["engine"][k] for k in ("queued", "running", "preempted"))
        if not busy or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def test_the_api_keeps_its_published_contract(tmp_path):
    flags = ["--model", str(zoo_path("qwen35")), "--n_ctx", "1024", "--n_parallel", "4", "--max_queued_requests", "16",
             "--max_tokens_limit", "24", "--embedding", "true", "--n_threads", "2", "--verbose", "false"]
    with ServerProcess(*flags) as server:
        cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json", "--checks", "all",
               "--seed", str(SEED), "--max-examples", str(EXAMPLES), "--generation-database", "none",
               "--phases", "examples,coverage,fuzzing", "--workers", "2", "--request-timeout", "60",
               "--suppress-health-check", "all", "--no-color", "--output-sanitize", "false", "--report", "ndjson",
               "--report-ndjson-path", str(tmp_path / "events.ndjson")]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks",
               "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
        t0 = time.monotonic()
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        seconds = time.monotonic() - t0
        with httpx.Client(base_url=server.url, timeout=30) as c:
            s = idle_stats(c)
            healthy = c.get("/health").status_code
    print(run.stdout[-2500:])
    cases = _cases(tmp_path / "events.ndjson")
    print(f"schemathesis: {cases} cases in {seconds:.0f}s")
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert cases >= 100, "the fuzzer hardly ran"
    assert healthy == 200
    assert s["in_flight"] == 0, f"{s['in_flight']} requests never got an answer"
    assert (s["engine"]["queued"], s["engine"]["running"], s["engine"]["preempted"]) == (0, 0, 0), s["engine"]
    assert s["memory"]["rs_cells_live"] == 0, s["memory"]
    assert s["memory"]["kv_cells_used"] <= s["memory"]["kv_cells_cached_max"], s["memory"]


def _cases(path) -> int:
    """Test cases the run sent, from its event log (each ScenarioFinished carries its recorder's cases)."""
    n = 0
    for line in path.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if finished:
            n += len(finished.get("recorder", {}).get("cases", {}))
    return n
