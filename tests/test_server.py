"""The OpenAI-compatible server, run as `python -m pyllama_ssm.server` on 127.0.0.1 with zoo models.

Every route, streaming, the API key, 400s that name the field, 413, 429 with
Retry-After, disconnects (mid-stream, queued, in a prefill) that free their sequence, concurrent greedy answers
equal to each alone, config files with aliases, CORS, and SIGTERM/SIGINT.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, run_with_build, zoo_model, zoo_path

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")

from pyllama_ssm.server.process import ServerProcess  # noqa: E402

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
N_CTX = 1024
GREEDY = {"temperature": 0, "max_tokens": 8}
ENDLESS = {"temperature": 0, "grammar": 'root ::= "a" root'}  # no end of text: runs until max_tokens
PROMPTS = ["Hello", "The state of the art", "Once upon a time in a recurrent network",
           "1 2 3 4 5", "A hybrid model keeps two memories"]


def start(name: str, *flags: str) -> ServerProcess:
    return ServerProcess("--model", str(zoo_path(name)), "--n_ctx", str(N_CTX), "--n_threads", "2",
                         "--verbose", "false", *flags)


@pytest.fixture(scope="module")
def qwen():
    """The hybrid model with an API key and small limits; most tests share it."""
    with start("qwen35", "--n_parallel", "4", "--max_queued_requests", "2", "--api_key", KEY,
               "--max_tokens_limit", "256", "--max_request_bytes", "65536", "--embedding", "true") as server:
        yield server


@pytest.fixture(scope="module", params=["qwen35", "mamba"])
def any_model(request, qwen):
    """The hybrid (shared) and a purely recurrent model."""
    if request.param == "qwen35":
        yield qwen
        return
    with start(request.param, "--n_parallel", "4", "--api_key", KEY) as server:
        yield server


def client(server: ServerProcess, **kw) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=AUTH, timeout=60, **kw)


def complete(c: httpx.Client, route: str, body: dict) -> dict:
    r = c.post(route, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream(c: httpx.Client, route: str, body: dict) -> list[dict]:
    """The events of a stream; asserts it ends with [DONE]."""
    events = []
    with c.stream("POST", route, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def text_of(route: str, answer: dict | list[dict]) -> tuple[str, str]:
    if isinstance(answer, dict):
        choice = answer["choices"][0]
        return (choice["message"]["content"] if "message" in choice else choice["text"]), choice["finish_reason"]
    pieces = [(e["choices"][0]["delta"].get("content") if "delta" in e["choices"][0] else e["choices"][0]["text"])
              for e in answer]
    return "".join(p or "" for p in pieces), answer[-1]["choices"][0]["finish_reason"]


def stats(c: httpx.Client) -> dict:
    return next(iter(c.get("/extras/stats").json()["models"].values()))


def wait_idle(c: httpx.Client, timeout: float = 10) -> dict:
    """Stats once nothing is in flight, queued or running (what a cancelled stream must come back to)."""
    deadline = time.monotonic() + timeout
    while True:
        s = stats(c)
        busy = s["in_flight"] or s["engine"]["running"] or s["engine"]["queued"] or s["engine"]["preempted"]
        if not busy or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


# -- security ---------------------------------------------------------------------------------------

def test_health_is_open_and_every_other_route_needs_the_key(qwen):
    assert httpx.get(qwen.url + "/health").json() == {"status": "ok"}
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/extras/tokenize"),
                         ("GET", "/extras/stats"), ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/nowhere")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, qwen.url + path, headers=headers, json={"prompt": "x"})
            assert r.status_code == 401, (path, headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(qwen.url + "/v1/models", headers=AUTH).status_code == 200


def test_cors_is_off_unless_configured(qwen):
    origin = {"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(qwen.url + "/v1/completions", headers=origin)
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(qwen.url + "/v1/models", headers={**AUTH, "Origin": "http://elsewhere.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_request_body_over_the_limit_gets_413(qwen):
    with client(qwen) as c:
        r = c.post("/v1/completions", json={"prompt": "x" * 70000})
        assert r.status_code == 413 and r.json()["error"]["param"] == "body"
        assert "max_request_bytes" in r.json()["error"]["message"]
        chunked = c.post("/v1/completions", content=iter([b'{"prompt": "', b"y" * 70000, b'"}']),
                         headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413


# -- routes -----------------------------------------------------------------------------------------

def test_models_and_tokenizer_routes(qwen):
    with client(qwen) as c:
        models = c.get("/v1/models").json()
        assert models["object"] == "list"
        assert [m["id"] for m in models["data"]] == [str(zoo_path("qwen35"))]
        assert set(models["data"][0]) == {"id", "object", "owned_by", "permissions"}
        tokens = c.post("/extras/tokenize", json={"input": "Hello world"}).json()["tokens"]
        assert tokens and all(isinstance(t, int) for t in tokens)
        assert c.post("/extras/tokenize/count", json={"input": "Hello world"}).json() == {"count": len(tokens)}
        assert c.post("/extras/detokenize", json={"tokens": tokens}).json()["text"].strip() == "Hello world"


def test_embeddings(qwen):
    with client(qwen) as c:
        one = c.post("/v1/embeddings", json={"input": "Hello world"}).json()
        assert set(one) == {"object", "model", "data", "usage"} and one["object"] == "list"
        assert one["data"][0]["object"] == "embedding" and one["data"][0]["index"] == 0
        assert one["usage"]["prompt_tokens"] > 0
        two = c.post("/v1/embeddings", json={"input": ["Hello world", "another text"]}).json()
        assert [d["index"] for d in two["data"]] == [0, 1]
        assert two["data"][0]["embedding"] == one["data"][0]["embedding"]


def test_completion_streams_the_same_text(qwen):
    with client(qwen) as c:
        body = {"prompt": "The state of the art", **GREEDY}
        plain = complete(c, "/v1/completions", body)
        assert set(plain) >= {"id", "object", "created", "model", "choices", "usage"}
        assert plain["object"] == "text_completion" and plain["usage"]["completion_tokens"] > 0
        events = stream(c, "/v1/completions", body)
        assert all(e["object"] == "text_completion" for e in events)
        assert text_of("/v1/completions", events) == text_of("/v1/completions", plain)


def test_chat_completion_streams_the_same_text(qwen):
    with client(qwen) as c:
        body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
                **GREEDY}
        plain = complete(c, "/v1/chat/completions", body)
        assert plain["object"] == "chat.completion"
        assert plain["choices"][0]["message"]["role"] == "assistant"
        events = stream(c, "/v1/chat/completions", body)
        assert all(e["object"] == "chat.completion.chunk" for e in events)
        assert text_of("/v1/chat/completions", events) == text_of("/v1/chat/completions", plain)


def test_concurrent_greedy_requests_equal_each_alone(any_model):
    with client(any_model) as c:
        routes = [("/v1/completions", {"prompt": p, **GREEDY}) for p in PROMPTS]
        routes.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], **GREEDY}))
        alone = [text_of(route, complete(c, route, body)) for route, body in routes]
        together: dict[int, tuple[str, str]] = {}

        def run(i: int) -> None:  # as many at once as the qwen server admits (4 running + 2 queued)
            route, body = routes[i]
            together[i] = text_of(route, stream(c, route, body) if i % 2 else complete(c, route, body))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(routes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [together[i] for i in range(len(routes))] == alone
        assert wait_idle(c)["in_flight"] == 0


# -- bad input --------------------------------------------------------------------------------------

BAD = [
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": "hello " * (N_CTX + 10)}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10 ** 9]}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100000}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": [1, 2]}, "stop"),
    ("/v1/completions", {"prompt": "x", "grammar": "root ::= ("}, "grammar"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"not-a-token": 1.0}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"999999999": 1.0}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "n": 3}, "n"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, "messages"),  # the template's
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "robot"}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "xml"}}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/embeddings", {"input": ""}, "input"),
    ("/extras/detokenize", {"tokens": [-1]}, "tokens"),
    ("/extras/tokenize", {"text": "x"}, "input"),
]


@pytest.mark.parametrize("route,body,param", BAD, ids=[f"{r}-{p}-{i}" for i, (r, _, p) in enumerate(BAD)])
def test_bad_requests_get_4xx_naming_the_field(qwen, route, body, param):
    with client(qwen) as c:
        for stream_it in ([False, True] if "completions" in route else [False]):
            r = c.post(route, json={**body, "stream": True} if stream_it else body)
            assert 400 <= r.status_code < 500, r.text
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert param in (error["param"] or "") or param in error["message"], error


def test_fields_the_server_does_not_know_are_ignored_and_logged(qwen):
    """As llama_cpp.server: a field outside the schema is ignored, not refused.  Clients written for
    llama-server send its own (cache_prompt, n_predict, id_slot), OpenAI's SDKs newer ones; a 400 failed
    them all.  The log names each field once."""
    extra = {"cache_prompt": True, "id_slot": -1, "some_future_field": {"a": 1}}
    with client(qwen) as c:
        text = complete(c, "/v1/completions", {"prompt": "x", "max_tokens": 2, **extra})
        chat = complete(c, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                                    **extra})
        streamed = stream(c, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                      "max_tokens": 2, "stream": True, **extra})
    assert text["usage"]["completion_tokens"] <= 2 and chat["usage"]["completion_tokens"] <= 2
    assert streamed and streamed[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    deadline = time.monotonic() + 5
    while not all(any(repr(name) in line for line in qwen.log) for name in extra) and time.monotonic() < deadline:
        time.sleep(0.05)
    for name in extra:
        noted = [line for line in qwen.log if repr(name) in line]
        assert len(noted) == 1 and "not one this server knows" in noted[0], noted


def test_numbers_past_what_llama_cpp_accepts_get_400_naming_field_and_range(qwen):
    """(Seen: top_k=11920657811558 left the request waiting for ever, holding an admission slot.)"""
    with client(qwen) as c:
        for field, value, bound in [("top_k", 11920657811558, "2147483647"), ("temperature", 4.2e190, "less than"),
                                    ("repeat_penalty", 0, "greater than 0"),
                                    ("logit_bias", {"1": 1e39}, "less than")]:
            for stream_it in (False, True):
                r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, field: value, "stream": stream_it})
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert error["param"] == field and bound in error["message"], error
        # a seed is any integer, taken modulo 2**32 as llama.cpp's uint32_t takes it
        same = [complete(c, "/v1/completions", {"prompt": "x", "max_tokens": 4, "seed": seed})["choices"][0]["text"]
                for seed in (7, 2**64 + 7, 7 - 2**32)]
        assert same[0] == same[1] == same[2]
        assert wait_idle(c)["in_flight"] == 0


def test_unsupported_methods_get_405_with_allow(qwen):
    with client(qwen) as c:
        for method, path, allow in [("PUT", "/v1/completions", "POST"), ("GET", "/v1/embeddings", "POST"),
                                    ("DELETE", "/health", "GET"), ("POST", "/v1/models", "GET")]:
            r = c.request(method, path)
            assert r.status_code == 405, (method, path, r.text)
            assert set(r.headers["allow"].split(", ")) - {"HEAD"} == {allow}, (method, path, r.headers)
            assert r.json()["error"]["type"] == "invalid_request_error"


def test_the_openapi_schema_is_the_enforced_contract(qwen):
    """Bounds from pyllama_ssm.limits and the loaded model, refusals stated, error answers documented."""
    with client(qwen) as c:
        schema = c.get("/openapi.json").json()
    n_vocab = zoo_model("qwen35").n_vocab
    parts = schema["components"]["schemas"]
    props = parts["CreateCompletionRequest"]["properties"]
    assert (props["top_k"]["minimum"], props["top_k"]["maximum"]) == (0, 2**31 - 1)
    assert props["temperature"]["maximum"] == pytest.approx(3.4028234663852886e38)
    assert [b["maximum"] for b in props["max_tokens"]["anyOf"] if b.get("type") == "integer"] == [256]
    text, texts, ids, idss = props["prompt"]["anyOf"]
    assert text["minLength"] == 1 and texts["items"]["minLength"] == 1 and texts["maxItems"] == 1
    assert ids["minItems"] == 1 and ids["items"]["maximum"] == n_vocab - 1
    assert idss["items"]["items"]["maximum"] == n_vocab - 1
    assert parts["DetokenizeInputRequest"]["properties"]["tokens"]["items"]["maximum"] == n_vocab - 1
    embedding_input = parts["CreateEmbeddingRequest"]["properties"]["input"]["anyOf"]
    assert embedding_input[0]["minLength"] == 1 and embedding_input[1]["minItems"] == 1
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            # the Anthropic routes answer Anthropic's error shape
            shape = "/AnthropicErrorResponse" if path.startswith("/v1/messages") else "/ErrorResponse"
            for status in ("400", "401", "404", "413", "429", "500", "503"):
                ref = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith(shape), (path, method, status)
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert "text/event-stream" in schema["paths"][path]["post"]["responses"]["200"]["content"]


def test_the_schema_states_what_a_model_setup_refuses():
    """n_parallel=1 without logits_all reports no logprobs, and a model without --embedding none."""
    from fastapi.testclient import TestClient

    from pyllama_ssm.server.app import create_app
    from pyllama_ssm.server.settings import ModelSettings, ServerSettings

    app = create_app(ServerSettings(), [ModelSettings(model=str(zoo_path("qwen35")), n_parallel=1, n_ctx=256,
                                                      logits_all=False, n_threads=2, verbose=False)])
    with TestClient(app) as c:
        schema = c.get("/openapi.json").json()
        refused = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "logprobs": 2})
        no_embeddings = c.post("/v1/embeddings", json={"input": "x"})
    assert "/v1/embeddings" not in schema["paths"] and no_embeddings.status_code == 400
    assert schema["components"]["schemas"]["CreateCompletionRequest"]["properties"]["logprobs"]["type"] == "null"
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"


def test_invalid_json_and_non_objects_are_400(qwen):
    with client(qwen) as c:
        for content in (b'{"prompt": ', b"[1, 2]", b""):
            r = c.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "body", r.text


# -- load, disconnects, limits ----------------------------------------------------------------------

class OpenStream:
    """A stream whose first event arrived (so it is admitted and running); close() hangs up."""

    def __init__(self, c: httpx.Client, body: dict):
        self._cm = c.stream("POST", "/v1/completions", json={**body, "stream": True})
        r = self._cm.__enter__()
        assert r.status_code == 200, r.read()
        # keep the line iterator: dropping a half-read one closes the connection
        self.lines = r.iter_lines()
        assert next(line for line in self.lines if line.startswith("data: "))

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


def test_disconnect_mid_stream_frees_the_sequence(any_model):
    with client(any_model) as c:
        before = wait_idle(c)["engine"]["tokens_generated"]
        held = OpenStream(c, {"prompt": "Hello", "max_tokens": 250, **ENDLESS})  # 2 s or so
        assert stats(c)["engine"]["running"] == 1
        held.close()
        s = wait_idle(c)
        assert s["in_flight"] == 0 and s["engine"]["running"] == 0
        assert s["engine"]["tokens_generated"] - before < 250, "the cancelled sequence kept generating"
        assert s["memory"]["rs_cells_live"] == 0
        assert s["memory"]["kv_cells_used"] <= s["memory"]["kv_cells_cached_max"]
        # the prefix cache's bounds are reported beside what it holds (the server's defaults)
        assert s["memory"]["cached_prefixes_max"] == 32 and s["memory"]["cached_bytes_max"] == 256 << 20


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_a_client_hanging_up_on_a_non_streaming_request_cancels_it(any_model, route):
    """(Seen: 6 clients that gave up after 3 s left 24,384 tokens of work behind them.)"""
    body = {"prompt": "Hello"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    with client(any_model) as c:
        before = wait_idle(c)["engine"]["tokens_generated"]
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            c.post(route, json={**body, "max_tokens": 250, **ENDLESS}, timeout=0.3)
        t0 = time.monotonic()
        s = wait_idle(c, timeout=5)
        assert not (s["in_flight"] or s["engine"]["running"] or s["engine"]["queued"]), s
        assert time.monotonic() - t0 < 1.5, "the abandoned request ran on"
        assert s["engine"]["tokens_generated"] - before < 250, "the cancelled sequence kept generating"
        assert s["memory"]["rs_cells_live"] == 0


def test_disconnect_in_the_queue_or_the_prefill_frees_the_sequence_at_once():
    """Hanging up before the first token (headers not even sent) cancels at the Engine's next step."""
    prompt_tokens = 1500  # on the small model, in steps of 64 tokens: seconds of prefill for two
    with ServerProcess("--model", str(zoo_path("qwen35", "small")), "--n_ctx", "4096", "--n_parallel", "2",
                       "--n_batch", "64", "--n_threads", "2", "--verbose", "false") as server, \
            httpx.Client(base_url=server.url, timeout=60) as c:
        host, port = server.url.removeprefix("http://").split(":")
        sockets = []
        for i in range(3):  # two in their prefill, one queued behind them
            body = json.dumps({"prompt": f"{i} " + "hello " * prompt_tokens, "max_tokens": 4, "stream": True})
            sock = socket.create_connection((host, int(port)))
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
            sockets.append(sock)
        deadline = time.monotonic() + 20
        while (s := stats(c))["engine"]["running"] < 2 or s["engine"]["queued"] < 1 \
                or s["engine"]["tokens_decoded"] == 0:
            assert time.monotonic() < deadline, s
            time.sleep(0.02)
        for sock in sockets:
            sock.close()
        t0 = time.monotonic()
        while (s := stats(c))["engine"]["running"] or s["engine"]["queued"] or s["in_flight"]:
            assert time.monotonic() - t0 < 1.0, f"still busy 1 s after the clients left: {s}"
            time.sleep(0.02)
        decoded = s["engine"]["tokens_decoded"]
        assert decoded < 2 * prompt_tokens, f"{decoded} tokens decoded: the prefills ran on"
        time.sleep(0.3)
        assert stats(c)["engine"]["tokens_decoded"] == decoded and s["engine"]["tokens_generated"] == 0


def test_a_full_queue_gets_429_with_retry_after():
    with start("qwen35", "--n_ctx", "4096", "--n_parallel", "2", "--max_queued_requests", "1") as server, \
            httpx.Client(base_url=server.url, timeout=60) as c:
        running = [OpenStream(c, {"prompt": f"Hold {i}", "max_tokens": 2000, **ENDLESS}) for i in range(2)]
        waiting = threading.Thread(target=c.post, args=("/v1/completions",),
                                   kwargs={"json": {"prompt": "wait", "max_tokens": 4}})
        waiting.start()
        deadline = time.monotonic() + 10
        while stats(c)["in_flight"] < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = c.post("/v1/completions", json={"prompt": "one too many", "max_tokens": 4})
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "queue_full"
        for held in running:  # hang up: the queued request runs, then there is room again
            held.close()
        waiting.join()
        assert wait_idle(c)["refused"] == 1
        assert c.post("/v1/completions", json={"prompt": "room again", "max_tokens": 2}).status_code == 200


def test_metrics_and_stats_report_engine_and_memory(qwen):
    with client(qwen) as c:
        s = stats(c)
        assert s["n_parallel"] == 4 and s["capacity"] == 6
        assert s["memory"]["kv_cells_total"] >= N_CTX and s["memory"]["weights_bytes"] > 0
        text = c.get("/metrics").text
        assert "pyllama_ssm_engine_tokens_generated{model=" in text
        assert "pyllama_ssm_memory_kv_cells_used{model=" in text and "pyllama_ssm_rss_bytes " in text


# -- configuration and lifecycle ----------------------------------------------------------------------

def test_config_file_serves_models_by_alias_with_cors(tmp_path):
    config = tmp_path / "models.yaml"
    config.write_text(f"""
cors_origins: ["http://ok.example"]
models:
  - model: {zoo_path('qwen35')}
    model_alias: hybrid
    n_ctx: 512
    n_parallel: 2
    verbose: false
  - model: {zoo_path('mamba')}
    model_alias: ssm
    n_ctx: 512
    n_parallel: 1
    logits_all: false
    verbose: false
""")
    with ServerProcess("--config_file", str(config)) as server, httpx.Client(base_url=server.url) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["hybrid", "ssm"]
        for alias in ("hybrid", "ssm"):
            assert complete(c, "/v1/completions", {"prompt": "Hi", "model": alias, **GREEDY})["choices"]
        assert complete(c, "/v1/completions", {"prompt": "Hi", **GREEDY})["choices"]  # the first is the default
        # n_parallel=1 drives one sequence: concurrent requests take turns and each gets its own answer
        bodies = [{"prompt": p, "model": "ssm", **GREEDY} for p in PROMPTS[:3]]
        alone = [text_of("/v1/completions", complete(c, "/v1/completions", b)) for b in bodies]
        together: dict[int, tuple[str, str]] = {}
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(
            i, text_of("/v1/completions", complete(c, "/v1/completions", bodies[i])))) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [together[i] for i in range(3)] == alone
        r = c.post("/v1/embeddings", json={"input": "x", "model": "ssm"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        r = c.post("/v1/completions", json={"prompt": "Hi", "model": str(zoo_path("mamba"))})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        ok = c.options("/v1/completions", headers={"Origin": "http://ok.example",
                                                    "Access-Control-Request-Method": "POST"})
        assert ok.headers["access-control-allow-origin"] == "http://ok.example"
        other = c.options("/v1/completions", headers={"Origin": "http://evil.example",
                                                       "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_cancels_in_flight_requests_and_exits(sig):
    server = start("mamba", "--n_parallel", "2", "--shutdown_timeout", "1")
    results: list[str] = []

    def long_stream() -> None:
        try:
            with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                              json={"prompt": "Hi", "max_tokens": 900, "stream": True, **ENDLESS}) as r:
                # running: the last event; still queued: a 503 before any event
                results.append([line for line in r.iter_lines() if line][-1])
        except httpx.HTTPError as e:
            results.append(repr(e))

    threads = [threading.Thread(target=long_stream) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    code = server.stop(sig, timeout=15)
    for t in threads:
        t.join(5)
    assert code in (0, -sig), server.output()  # uvicorn re-raises SIGTERM once shut down cleanly
    assert time.monotonic() - t0 < 8, "shutdown took longer than the grace period allows"
    assert len(results) == 3 and not any(t.is_alive() for t in threads)
    assert all("shutting down" in r or r == "data: [DONE]" for r in results), results
    assert "Traceback" not in server.output(), server.output()


def test_cli_names_the_bad_flag_or_file(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pyllama_ssm.server", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)

    missing = run("--model", str(tmp_path / "missing.gguf"))
    assert missing.returncode == 1 and "missing.gguf" in missing.stderr
    bad_ctx = run("--model", str(zoo_path("mamba")), "--n_ctx", "-5")
    assert bad_ctx.returncode == 2 and "n_ctx" in bad_ctx.stderr
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"models": [{"model": "m.gguf", "n_ctxx": 5}]}))
    bad_key = run("--config_file", str(config))
    assert bad_key.returncode == 2 and "n_ctxx" in bad_key.stderr


ARENAS = """
import ctypes, os, sys, threading
from pyllama_ssm.server.__main__ import limit_malloc_arenas
if sys.argv[1] == "limit":
    limit_malloc_arenas()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
barrier = threading.Barrier(8)
def work():  # 8 threads allocating at once: glibc gives each its own arena unless bounded
    barrier.wait()
    for _ in range(2000):
        libc.malloc(ctypes.c_size_t(64))
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
sys.stdout.flush()
os.dup2(1, 2)  # malloc_stats() writes to stderr
libc.malloc_stats()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc arenas")
def test_the_server_bounds_malloc_arenas():
    """The server process starts with two malloc arenas (its threads' freed memory stayed resident in
    one arena each: 34-40 MiB of peak RSS in an 8-user chat); MALLOC_ARENA_MAX, when set, wins."""
    env = {"MALLOC_ARENA_MAX": ""}  # unset for this check, whatever the caller's environment says
    arenas = {mode: run_with_build("patched", ARENAS, mode, env=env).count("Arena ") for mode in ("limit", "none")}
    assert arenas["limit"] <= 2 < arenas["none"], arenas
