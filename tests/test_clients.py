"""The llama-cpp-python clients give stock's output on pyllama-ssm (issue #15 item 5).

LangChain (`LlamaCpp`, `ChatLlamaCpp`: invoke, stream, a grammar, bind_tools, with_structured_output),
outlines (`from_llamacpp`: text, regex, JSON from a pydantic model) and guidance (`models.LlamaCpp`:
gen, select) run tests/parity/clients_driver.py, greedy, on SmolLM2 (real weights) and on a zoo hybrid:

- stock llama-cpp-python 0.3.36 on build/upstream;
- pyllama-ssm as `llama_cpp` (install_as_llama_cpp) with n_parallel=1, on the same library and on
  the patched one: every case equals stock's (flash_attn=False on both sides);
- with n_parallel=4 (patched build), each case from 4 threads at once on one shared client: every
  thread's output equals the lone output of our n_parallel=1 with the same numerics (raising
  n_parallel never changes a lone request's answer).  That needs batch_invariant=True (patch 0007),
  whose kernels are ours (patch 0009's attention pass, for prompts too), not stock's: the comparison
  with stock is the n_parallel=1 sides', with stock's settings.  LangChain takes n_parallel through
  model_kwargs (LlamaCpp builds Llama(model_path, **fields, **model_kwargs)); outlines and guidance
  take a Llama the caller made.

Not compared, and why:
- guidance with n_parallel=4: guidance drives llama_decode on Llama.ctx with its own batch and KV
  positions, so it needs the single sequence (n_parallel=1), as on stock, where one guidance model is
  not shared between threads either;
- a case that fails on stock too is skipped with stock's error (guidance on hybrid models: it trims
  the KV cache with llama_memory_seq_rm at any position, which recurrent memory refuses, and then
  decodes at positions that do not follow);
- stock stops streaming at a byte sequence that can never be UTF-8 and sends each later token as its
  own chunk at the end, the bad bytes as "" (random-weight text has them); ours drops those bytes and
  streams on (tests/test_llama_api.py::test_stream_sends_text_as_soon_as_its_bytes_are_complete):
  there the streamed text, not its chunking, must match.

Then the switch for programs that cannot call install_as_llama_cpp(), on an installed program: stock's
own server run as `python -m pyllama_ssm.as_llama_cpp -m llama_cpp.server` (the PROGRAM form:
tests/test_as_llama_cpp.py).
"""

from __future__ import annotations

import importlib.util
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ZOO, child_env, zoo_path
from parity.stock import run_ours, run_stock

DRIVER = Path(__file__).parent / "parity" / "clients_driver.py"
RUN_DRIVER = f"import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path({str(DRIVER)!r}, run_name='__main__')"
SMOLLM2 = ZOO / "smollm2-135m-instruct-q4_1.gguf"
MODELS = ["smollm2", "granitehybrid"]
CASES = {"langchain": ["llm.invoke", "llm.stream", "llm.grammar", "chat.invoke", "chat.stream", "chat.bind_tools",
                       "chat.with_structured_output"],
         "outlines": ["text", "regex", "json"],
         "guidance": ["gen", "select"]}
# what each client needs importable, and why
NEEDS = {"langchain": [("langchain_community", "LangChain's llama.cpp classes"),
                       ("langchain_core", "LangChain")],
         "outlines": [("outlines", "outlines"),
                      ("numba", "outlines' logits processor for llama.cpp (outlines_core.kernels.numpy)")],
         "guidance": [("guidance", "guidance")]}
ONE = {"n_parallel": 1, "flash_attn": False}
INVARIANT = {"flash_attn": True, "batch_invariant": True}
# side -> (build, our Llama's keywords, the reference: ("stock", its keywords) or ("ours", our lone run's))
SIDES = {"upstream": ("upstream", ONE, ("stock", {"flash_attn": False})),
         "patched": ("patched", ONE, ("stock", {"flash_attn": False})),
         "patched-n_parallel=4": ("patched", {"n_parallel": 4, **INVARIANT}, ("ours", {"n_parallel": 1, **INVARIANT}))}
# why a client fails on stock where it does (the skip says so, with stock's error)
STOCK_FAILS = {"guidance": "on recurrent and hybrid models guidance trims the KV cache with "
                           "llama_memory_seq_rm(kv, -1, n_cached, -1), which recurrent memory refuses, "
                           "then decodes at positions that do not follow"}
NOT_THREADED = {"guidance": "guidance drives llama_decode on Llama.ctx itself (its own batch and KV positions): "
                            "it needs n_parallel=1, and one guidance model is not shared between threads"}


def available(client: str) -> bool:
    return all(importlib.util.find_spec(module) for module, _ in NEEDS[client])


def model_path(name: str) -> Path:
    if name == "smollm2":
        if not SMOLLM2.exists():
            pytest.skip("SmolLM2 missing: run `make models` (tests/models/real.py)")
        return SMOLLM2
    return zoo_path(name)


@pytest.fixture(scope="module", params=MODELS)
def runs(request) -> tuple[str, dict[str, dict[str, dict]]]:
    """The driver's JSON on every side and the stock runs they compare with, run concurrently:
    {"upstream": {"stock": ..., "ours": ...}, ...}."""
    path = str(model_path(request.param))
    clients = [c for c in CASES if available(c)]
    if not clients:
        pytest.skip("none of the clients is installed: pip install -e .[clients]")
    threaded = [c for c in clients if c not in NOT_THREADED]
    jobs = {}
    for side, (build, ours, (kind, ref)) in SIDES.items():
        these = tuple(threaded if ours["n_parallel"] > 1 else clients)
        key = json.dumps(ref)
        if kind == "stock":
            jobs.setdefault((kind, key), lambda k=key, c=these: run_stock(RUN_DRIVER, str(DRIVER), path, k, *c))
        else:
            jobs[kind, key] = lambda b=build, k=key, c=these: run_ours(RUN_DRIVER, str(DRIVER), path, k, *c, build=b)
        jobs[side, "ours"] = (lambda b=build, k=json.dumps(ours), c=these:
                              run_ours(RUN_DRIVER, str(DRIVER), path, k, *c, build=b))
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {key: pool.submit(job) for key, job in jobs.items()}
        out = {key: json.loads(f.result()) for key, f in futures.items()}
    return request.param, {side: {"reference": out[kind, json.dumps(ref)], "ours": out[side, "ours"]}
                           for side, (_, _, (kind, ref)) in SIDES.items()}


def set_aside_utf8_stall(stock, ours):
    """Stock's stream after a never-valid UTF-8 sequence (module docstring): where the chunk lists part
    at stock's "" for those bytes and the streamed text is the same, count them as equal."""
    if (isinstance(stock, list) and isinstance(ours, list) and stock != ours
            and all(isinstance(x, str) for x in stock + ours) and "".join(stock) == "".join(ours)):
        parted = next(i for i, (a, b) in enumerate(zip(stock + [None], ours + [None])) if a != b)
        if parted < len(stock) and stock[parted] == "":
            return ours, ours
    return stock, ours


def same_stream_text(lone, ours):
    """Our lone run streams by stock's rule (a token whose bytes end inside a character waits whole),
    the Engine by its own (the complete part goes out at once, only the tail waits): where a token ends
    mid-character their chunks part, their text cannot.  Streams (lists of str) compare by text."""
    if (isinstance(lone, list) and isinstance(ours, list) and all(isinstance(x, str) for x in lone + ours)
            and "".join(lone) == "".join(ours)):
        return ours, ours
    return lone, ours


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", [f"{client}.{case}" for client, cases in CASES.items() for case in cases])
def test_client_output_matches_its_reference(runs, case, side):
    """Stock's output on the n_parallel=1 sides, our lone run's on the n_parallel=4 side."""
    client = case.split(".")[0]
    for module, what in NEEDS[client]:
        pytest.importorskip(module, reason=f"{what} needs {module}: pip install -e .[clients]")
    model, results = runs
    threaded = SIDES[side][1]["n_parallel"] > 1
    if threaded and client in NOT_THREADED:
        pytest.skip(f"n_parallel=4: {NOT_THREADED[client]}")
    stock, ours = results[side]["reference"][case], results[side]["ours"][case]
    if isinstance(stock, dict) and "error" in stock:
        why = f" ({STOCK_FAILS[client]})" if client in STOCK_FAILS else ""
        pytest.skip(f"{case} fails on {'our lone run' if threaded else 'stock llama-cpp-python 0.3.36'} too on "
                    f"{model}: {stock['error']}{why}")
    for i, got in enumerate(ours if threaded else [ours]):
        want, got = same_stream_text(stock, got) if threaded else set_aside_utf8_stall(stock, got)
        assert got == want, (f"{model} {case} ({side}{f', thread {i}' if threaded else ''}): ours differs from "
                             f"{'our lone run' if threaded else 'stock'}")


def test_stock_outputs_are_what_the_clients_promise(runs):
    """The comparison above is not between two failures: on SmolLM2, stock's outputs do what each
    feature promises (a tool call, a parsed object, text that matches the regex, ...)."""
    model, results = runs
    if model != "smollm2":
        pytest.skip("random weights give no meaningful text (the hybrid is compared with stock above)")
    out = results["patched"]["reference"]
    if available("langchain"):
        assert "".join(out["langchain.llm.stream"]) == out["langchain.llm.invoke"] != ""
        assert out["langchain.llm.grammar"] in ("yes", "no")
        assert "".join(out["langchain.chat.stream"]) == out["langchain.chat.invoke"]["content"] != ""
        assert [c["name"] for c in out["langchain.chat.bind_tools"]["tool_calls"]] == ["get_weather"]
        parsed = out["langchain.chat.with_structured_output"]["parsed"]
        assert parsed is not None and set(parsed) == {"name", "color"}
    if available("outlines"):
        assert out["outlines.text"] and re.fullmatch(r"[0-9]{3}-[0-9]{4}", out["outlines.regex"])
        assert set(json.loads(out["outlines.json"])) == {"name", "color"}
    if available("guidance"):
        assert out["guidance.gen"] and out["guidance.select"] in ("yes", "no", "maybe")


# -- programs that cannot call install_as_llama_cpp() ---------------------------------------------


def test_as_llama_cpp_runs_stock_server_module_on_pyllama_ssm():
    """`python -m pyllama_ssm.as_llama_cpp -m llama_cpp.server`: stock's own server, unedited, answers
    /v1/models and /v1/completions through pyllama-ssm on the patched libllama, the only one loaded."""
    httpx = pytest.importorskip("httpx")
    for module in ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings"):
        pytest.importorskip(module, reason=f"stock's llama_cpp.server needs {module}")
    from pyllama_ssm.server.process import ServerProcess

    model = zoo_path("qwen35")
    with ServerProcess("-m", "llama_cpp.server", "--model", str(model), "--n_ctx", "256",
                       module="pyllama_ssm.as_llama_cpp", env=child_env("patched")) as server:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            models = c.get("/v1/models")
            done = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0})
        maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert models.status_code == 200 and models.json()["data"][0]["id"] == str(model)
    assert done.status_code == 200, done.text
    answer = done.json()
    assert answer["choices"][0]["text"] and answer["usage"]["completion_tokens"] == 8
    libllama = {line.split()[-1] for line in maps.splitlines() if re.search(r"/libllama\.so[.\d]*$", line)}
    assert [Path(p).parent.parent.name for p in libllama] == ["patched"], libllama  # one library, ours
    assert re.search(r"pyllama_ssm/_llama_patched\.\S*\.so", maps), "pyllama-ssm's bindings are not loaded"
