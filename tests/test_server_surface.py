"""What today's OpenAI clients send, answered as they expect (issue #19), through the official `openai` client.

Current request fields (max_completion_tokens, store, metadata, reasoning_effort...), any model name on a
one-model server, prompt logprobs streamed on --n_parallel > 1, stream_options.include_usage and
usage.prompt_tokens_details.cached_tokens.
"""

from __future__ import annotations

import pytest

from conftest import zoo_path

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from pyllama_ssm.server.process import ServerProcess  # noqa: E402

KEY = "sk-surface"
N_CTX = 2048
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--model", str(zoo_path("qwen35")), "--model_alias", "qwen", "--n_ctx", str(N_CTX),
                       "--n_parallel", "2", "--n_threads", "2", "--api_key", KEY, "--verbose", "false") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def test_max_completion_tokens_and_the_other_current_fields_are_accepted(client):
    answer = client.chat.completions.create(
        model="gpt-3.5-turbo", messages=MESSAGES, temperature=0, max_completion_tokens=5, store=False,
        metadata={"team": "a"}, reasoning_effort="low", service_tier="auto", parallel_tool_calls=True,
        prompt_cache_key="k", safety_identifier="u1", verbosity="low", modalities=["text"])
    assert answer.usage.completion_tokens <= 5 and answer.choices[0].finish_reason == "length"
    # max_completion_tokens wins over the deprecated max_tokens, and is bounded like it
    answer = client.chat.completions.create(model="qwen", messages=MESSAGES, temperature=0, max_tokens=50,
                                            max_completion_tokens=3)
    assert answer.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="qwen", messages=MESSAGES, max_completion_tokens=-1)
    assert caught.value.param == "max_completion_tokens"


def test_one_model_answers_under_any_name(client):
    for name in ("gpt-3.5-turbo", "qwen", "anything/at-all"):
        answer = client.completions.create(model=name, prompt="Hello", temperature=0, max_tokens=3)
        assert answer.choices[0].text


def test_streamed_echo_with_logprobs_on_n_parallel(client):
    whole = client.completions.create(model="qwen", prompt="The state of the art", temperature=0, max_tokens=4,
                                      echo=True, logprobs=2)
    chunks = list(client.completions.create(model="qwen", prompt="The state of the art", temperature=0,
                                            max_tokens=4, echo=True, logprobs=2, stream=True))
    assert chunks[0].choices[0].text == "The state of the art"
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    prompt_lp = chunks[0].choices[0].logprobs
    n = len(prompt_lp.tokens)
    assert n >= 4 and prompt_lp.tokens == whole.choices[0].logprobs.tokens[:n]
    assert prompt_lp.token_logprobs == pytest.approx(whole.choices[0].logprobs.token_logprobs[:n], abs=1e-4)


def test_include_usage_and_cached_tokens(client):
    prompt = "A hybrid model keeps two memories: " + "a recurrent state and a cache of keys. " * 8
    first = client.completions.create(model="qwen", prompt=prompt, temperature=0, max_tokens=4)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = client.completions.create(model="qwen", prompt=prompt, temperature=0, max_tokens=4)
    # the Engine's prefix cache kept the prompt: only what follows its last checkpoint is computed
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens
    for create, kwargs in ((client.completions.create, {"prompt": prompt}),
                           (client.chat.completions.create, {"messages": MESSAGES})):
        chunks = list(create(model="qwen", temperature=0, max_tokens=4, stream=True,
                             stream_options={"include_usage": True}, **kwargs))
        last = chunks[-1]
        assert last.choices == [] and last.usage.completion_tokens == 4 and last.usage.prompt_tokens > 0
        assert last.usage.total_tokens == last.usage.prompt_tokens + 4
        assert all(c.usage is None for c in chunks[:-1]) and chunks[-2].choices[0].finish_reason == "length"
        assert last.usage.prompt_tokens_details.cached_tokens >= 0
    plain = list(client.completions.create(model="qwen", prompt="Hi", max_tokens=2, stream=True))
    assert all(c.choices for c in plain)  # no usage chunk unless asked for


def test_a_repeated_chat_reports_its_cached_tokens(client):
    """The chat route's usage comes from the completion behind the chat (Llama.chat_complete's result)."""
    messages = [{"role": "system", "content": "Answer in one word. " * 12}, MESSAGES[1]]
    first = client.chat.completions.create(model="qwen", messages=messages, temperature=0, max_tokens=2)
    again = client.chat.completions.create(model="qwen", messages=messages, temperature=0, max_tokens=2)
    assert again.usage.prompt_tokens == first.usage.prompt_tokens
    assert 0 < again.usage.prompt_tokens_details.cached_tokens <= again.usage.prompt_tokens


# -- reasoning and tool calls (the grammar makes the random model write the template's markup) ------------------
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
MARKUP = ("Need the weather.</think>\n\nLooking it up.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\n"
          "Paris\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
FORCED = {"grammar": "root ::= " + '"' + MARKUP.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'}


def test_chat_answers_come_split_into_reasoning_content_and_tool_calls(client):
    ask = dict(model="qwen", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=WEATHER,
               temperature=0, max_tokens=400, extra_body=FORCED)
    answer = client.chat.completions.create(**ask)
    message = answer.choices[0].message
    assert message.model_extra["reasoning_content"] == "Need the weather." and message.content == "Looking it up."
    assert answer.choices[0].finish_reason == "tool_calls"
    (call,) = message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == '{"city": "Paris", "days": 3}'
    chunks = list(client.chat.completions.create(**ask, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "Need the weather."
    assert "".join(d.content or "" for d in deltas) == "Looking it up."
    calls = [t for d in deltas for t in d.tool_calls or []]
    assert calls[0].id and calls[0].function.name == "get_weather" and len(calls) >= 3  # arguments in pieces
    assert "".join(t.function.arguments or "" for t in calls) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    raw = client.chat.completions.create(**{**ask, "extra_body": {**FORCED, "reasoning_format": "none",
                                                                   "parse_tool_calls": False}})
    assert raw.choices[0].message.content == MARKUP and not raw.choices[0].message.tool_calls


def test_parsing_is_off_for_a_model_started_without_it():
    with ServerProcess("--model", str(zoo_path("qwen35")), "--n_ctx", "512", "--n_threads", "2", "--verbose", "false",
                       "--reasoning_format", "none", "--parse_tool_calls", "false") as server, \
            openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as c:
        answer = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], tools=WEATHER,
                                           temperature=0, max_tokens=400, extra_body=FORCED)
        assert answer.choices[0].message.content == MARKUP and answer.choices[0].finish_reason == "stop"
