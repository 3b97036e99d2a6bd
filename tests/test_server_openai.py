"""The official `openai` Python client against `python -m pyllama_ssm.server` on 127.0.0.1.

Chat, completion, streaming and embeddings through the client's own types; 16
concurrent streams on --n_parallel 8 that overlap in time and each equal the same
request alone; refusals raised as the client's typed errors (BadRequestError,
NotFoundError, AuthenticationError) naming the field; the API key.
"""

from __future__ import annotations

import threading
import time

import pytest

from conftest import zoo_path

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")

from pyllama_ssm.server.process import ServerProcess  # noqa: E402

KEY = "sk-pyllama-ssm-test"
MODEL = "qwen35-tiny"
N_CTX = 2048
GREEDY = {"temperature": 0, "max_tokens": 12}
PROMPTS = [f"{i}: {text}" for i, text in enumerate(
    ["Hello", "The state of the art", "Once upon a time", "1 2 3 4", "A hybrid model keeps two memories",
     "Recurrent networks", "Dear diary", "In the beginning"] * 2)]


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--model", str(zoo_path("qwen35")), "--model_alias", MODEL, "--n_ctx", str(N_CTX),
                       "--n_parallel", "8", "--n_threads", "2", "--api_key", KEY, "--embedding", "true",
                       # mean pooling: one vector per input, as OpenAI's embeddings are (the GGUF pools nothing)
                       "--kv_overrides", "qwen35.pooling_type=int:1", "--verbose", "false") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def test_models_lists_the_alias(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_completion_and_its_stream(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    assert isinstance(answer, openai.types.chat.ChatCompletion) and answer.object == "chat.completion"
    choice = answer.choices[0]
    # the Qwen3.5 template opens <think>: the (random) answer is reasoning until a </think>
    reasoning = choice.message.model_extra.get("reasoning_content") or ""
    assert choice.message.role == "assistant" and (choice.message.content or reasoning)
    assert choice.finish_reason in ("stop", "length") and answer.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True, **GREEDY))
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks) == reasoning
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_completion_and_its_stream(client):
    answer = client.completions.create(model=MODEL, prompt="The state of the art", **GREEDY)
    assert isinstance(answer, openai.types.Completion) and answer.object == "text_completion"
    assert answer.choices[0].text and answer.usage.prompt_tokens > 0
    chunks = list(client.completions.create(model=MODEL, prompt="The state of the art", stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == answer.choices[0].text
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason


def test_embeddings_as_the_client_asks_for_them(client):
    # the client asks for base64 unless told otherwise and decodes it: the same floats either way
    default = client.embeddings.create(model=MODEL, input=["Hello world", "another text"])
    floats = client.embeddings.create(model=MODEL, input=["Hello world", "another text"], encoding_format="float")
    assert [d.index for d in default.data] == [0, 1] and default.usage.prompt_tokens > 0
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]
    assert len(default.data[0].embedding) == 128 and default.data[0].embedding != default.data[1].embedding
    one = client.embeddings.create(model=MODEL, input="Hello world")
    assert one.data[0].embedding == default.data[0].embedding


def stream_answer(client, i: int, on_first_text=lambda: None) -> tuple[str, str]:
    """Request i streamed (a completion for even i, a chat for odd i): its text and finish reason."""
    if i % 2:
        chunks = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPTS[i]}], stream=True, **GREEDY)
        pieces = ((c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in chunks)
    else:
        chunks = client.completions.create(model=MODEL, prompt=PROMPTS[i], stream=True, **GREEDY)
        pieces = ((c.choices[0].text, c.choices[0].finish_reason) for c in chunks)
    text, reason = "", None
    for piece, reason in pieces:
        if piece and not text:
            on_first_text()
        text += piece
    return text, reason


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals in progress at one moment."""
    return max(sum(a <= t < b for a, b in intervals) for t, _ in intervals)


def test_16_concurrent_streams_overlap_and_each_equals_its_lone_run(client):
    """--n_parallel 8: the answers stream at the same time, and batching changes none of them."""
    n = len(PROMPTS)
    alone = [stream_answer(client, i) for i in range(n)]
    together: dict[int, tuple[str, str]] = {}
    times: dict[int, dict[str, float]] = {i: {} for i in range(n)}
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        times[i]["start"] = time.monotonic()
        together[i] = stream_answer(client, i, lambda: times[i].setdefault("first", time.monotonic()))
        times[i]["end"] = time.monotonic()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[i] for i in range(n)] == alone
    # from its first text to its end a request is being generated: several are at once
    generating = [(t.get("first", t["end"]), t["end"]) for t in times.values()]
    assert max_overlap(generating) > 1, times


# -- refusals as the client's typed errors ----------------------------------------------------------

BAD = [  # (call, keyword arguments, error class, field named)
    ("completions", {"prompt": "hello " * (N_CTX + 10)}, openai.BadRequestError, "prompt"),
    ("chat", {"messages": [{"role": "user", "content": "hello " * (N_CTX + 10)}]}, openai.BadRequestError,
     "messages"),
    ("completions", {"prompt": "x", "temperature": -1}, openai.BadRequestError, "temperature"),
    ("completions", {"prompt": "x", "top_p": 1.5}, openai.BadRequestError, "top_p"),
    ("completions", {"prompt": "x", "max_tokens": -1}, openai.BadRequestError, "max_tokens"),
    ("completions", {"prompt": "x", "n": 3}, openai.BadRequestError, "n"),
    ("completions", {"prompt": "x", "logit_bias": {"not-a-token": 1}}, openai.BadRequestError, "logit_bias"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, openai.BadRequestError, "messages"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
     openai.BadRequestError, "response_format"),
    ("embeddings", {"input": ""}, openai.BadRequestError, "input"),
]


@pytest.mark.parametrize("route,kwargs,error,field", BAD, ids=[f"{r}-{f}-{i}" for i, (r, _, _, f) in enumerate(BAD)])
def test_bad_requests_raise_the_clients_error_naming_the_field(client, route, kwargs, error, field):
    kwargs = {"model": MODEL, **kwargs}
    create = {"completions": client.completions.create, "chat": client.chat.completions.create,
              "embeddings": client.embeddings.create}[route]
    for stream in ([False, True] if route != "embeddings" else [False]):
        with pytest.raises(error) as caught:
            create(**kwargs, **({"stream": True} if stream else {}))
        e = caught.value
        assert 400 <= e.status_code < 500 and e.param == field and field in e.message, (e.body, stream)
        assert set(e.body) == {"message", "type", "param", "code"}


def test_extra_body_fields_the_server_does_not_know_are_ignored(client):
    """The SDK's extra_body (llama-server's own fields, a newer API's) reaches the server, which ignores what it
    does not know, as llama_cpp.server does."""
    out = client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"not_a_field": 1,
                                                                                     "cache_prompt": True})
    assert out.usage.completion_tokens <= 2
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                          extra_body={"n_probs": 3, "samplers": ["top_k"]})
    assert chat.usage.completion_tokens <= 2


def test_invalid_json_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/completions", cast_to=object, content=b'{"prompt": "x", ',
                    options={"headers": {"Content-Type": "application/json"}})
    assert caught.value.param == "body" and "invalid JSON" in caught.value.message


def test_requests_without_the_key_get_401(server, client):
    no_header = {"extra_headers": {"Authorization": openai.Omit()}}  # the client sends none at all
    with openai.OpenAI(base_url=server.url + "/v1", api_key="wrong-key", max_retries=0) as stranger:
        for c, options in ((client, no_header), (stranger, {})):
            for call in (lambda: c.models.list(**options),
                         lambda: c.completions.create(model=MODEL, prompt="x", **options),
                         lambda: c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                           stream=True, **options),
                         lambda: c.embeddings.create(model=MODEL, input="x", **options)):
                with pytest.raises(openai.AuthenticationError) as caught:
                    call()
                assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
                assert "authorization" not in caught.value.response.request.headers or c is stranger
    assert client.models.list().data  # with the key
