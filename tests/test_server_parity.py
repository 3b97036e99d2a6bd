"""Our server next to stock `python -m llama_cpp.server` (llama-cpp-python 0.3.36 on build/upstream).

The same requests to both: the same routes answer with the same JSON keys and
value types, and greedy completions give the same text, finish reason and usage.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import zoo_path
from parity.stock import stock_env

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("starlette_context", reason="stock llama_cpp.server needs starlette-context")
pytest.importorskip("pydantic_settings", reason="stock llama_cpp.server needs pydantic-settings")

from pyllama_ssm.server.process import ServerProcess  # noqa: E402

GREEDY = {"temperature": 0, "max_tokens": 8}
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]}
# ids and timestamps differ by nature; the rest must match
VARYING = {"id", "created", "model"}


def shape(value):
    """The keys and value types of a JSON value, recursively (floats and ints alike: JSON numbers)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def events(c: httpx.Client, route: str, body: dict) -> list[dict]:
    with c.stream("POST", route, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(e) for e in lines[:-1]]


def streamed_text(chunks: list[dict]) -> str:
    return "".join((c["choices"][0].get("delta", {}).get("content") or "") if "delta" in c["choices"][0]
                   else c["choices"][0]["text"] for c in chunks)


@pytest.fixture(scope="module", params=["llama", "mamba"])
def servers(request):
    flags = ["--model", str(zoo_path(request.param)), "--n_ctx", "512", "--n_threads", "2", "--verbose", "false",
             "--embedding", "true"]
    env = stock_env()  # skips when stock llama-cpp-python or the upstream build is missing
    # ours with stock's kernels (llama_cpp.server's flash_attn=False and llama.cpp's fastest kernel per shape;
    # ours default to flash attention "auto" and batch invariance)
    with ServerProcess(*flags, module="llama_cpp.server", env=env) as stock, \
            ServerProcess(*flags, "--n_parallel", "4", "--flash_attn", "false", "--batch_invariant", "false") as ours, \
            httpx.Client(base_url=stock.url, timeout=120) as s, httpx.Client(base_url=ours.url, timeout=120) as o:
        yield s, o


def test_models_and_tokenizer_routes_answer_alike(servers):
    stock, ours = servers
    assert ours.get("/v1/models").json() == stock.get("/v1/models").json()
    for text in ("Hello world", " leading space, ünïcödé and <s> special"):
        tokens = stock.post("/extras/tokenize", json={"input": text}).json()
        assert ours.post("/extras/tokenize", json={"input": text}).json() == tokens
        assert ours.post("/extras/tokenize/count", json={"input": text}).json() == \
            stock.post("/extras/tokenize/count", json={"input": text}).json()
        assert ours.post("/extras/detokenize", json=tokens).json() == stock.post("/extras/detokenize", json=tokens).json()


@pytest.mark.parametrize("route,body", [("/v1/completions", {"prompt": "The state of the art", **GREEDY}),
                                        ("/v1/completions", {"prompt": "1 2 3", "stop": ["4"], **GREEDY}),
                                        ("/v1/chat/completions", {**CHAT, **GREEDY})])
def test_greedy_completions_answer_alike(servers, route, body):
    stock, ours = servers
    expected, got = stock.post(route, json=body).json(), ours.post(route, json=body).json()
    # OpenAI's usage.prompt_tokens_details.cached_tokens, which stock does not report
    assert set(got["usage"].pop("prompt_tokens_details")) == {"cached_tokens"}
    assert shape(got) == shape(expected)
    assert {k: v for k, v in got.items() if k not in VARYING} == {k: v for k, v in expected.items()
                                                                  if k not in VARYING}
    stock_chunks, our_chunks = events(stock, route, body), events(ours, route, body)
    assert shape(our_chunks[0]) == shape(stock_chunks[0]) and shape(our_chunks[-1]) == shape(stock_chunks[-1])
    assert streamed_text(our_chunks) == streamed_text(stock_chunks)
    assert our_chunks[-1]["choices"][0]["finish_reason"] == stock_chunks[-1]["choices"][0]["finish_reason"]


def test_embeddings_answer_alike(servers):
    stock, ours = servers
    # one input per request: stock misplaces the per-token rows of later inputs in a batch
    # (its embed() slices them at the wrong offset for models that pool nothing)
    for body in ({"input": "Hello world"}, {"input": ["another text"]}):
        expected, got = stock.post("/v1/embeddings", json=body).json(), ours.post("/v1/embeddings", json=body).json()
        assert shape(got) == shape(expected) and got["usage"] == expected["usage"]
        np.testing.assert_allclose(np.array(got["data"][0]["embedding"]), np.array(expected["data"][0]["embedding"]),
                                   atol=1e-5)
