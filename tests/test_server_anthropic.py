"""The official `anthropic` Python client against `python -m pyllama_ssm.server` (issue #29).

Anthropic's Messages API as llama-server serves it: a system prompt and turns of text blocks, the
answer as thinking and text blocks (the Qwen3.5 template opens <think>: the random model's answer is
reasoning until a </think>), Anthropic's event sequence when streamed, count_tokens equal to the
prompt the answer was computed from, stop_sequences, errors in Anthropic's shape (raised as the
client's typed errors), the key as `x-api-key`, and tool use: a call written in the template's own
markup (forced with a grammar) or forced by tool_choice, returned as a tool_use block and answered
with a tool_result block.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from conftest import zoo_path

anthropic = pytest.importorskip("anthropic")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from pyllama_ssm.server.process import ServerProcess  # noqa: E402

KEY = "sk-anthropic-test"
MODEL = "qwen"
# today's client has no temperature argument: llama.cpp's sampling fields go in the body, as llama-server takes them
GREEDY = {"max_tokens": 12, "extra_body": {"temperature": 0}}
SYSTEM = [{"type": "text", "text": "Be brief. "}, {"type": "text", "text": "Answer in English."}]
TURNS = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
         {"role": "user", "content": [{"type": "text", "text": "Name a colour."}, {"type": "text", "text": "One."}]}]
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                             "days": {"type": "integer", "enum": [1, 2, 3]}},
                            "required": ["city", "days"], "additionalProperties": False}}
MARKUP = ("Need the weather.</think>\n\nLooking it up.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\n"
          "Paris\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")


def forced(text: str) -> dict[str, Any]:
    """A grammar that makes the random model write exactly text."""
    return {"grammar": "root ::= " + json.dumps(text), "temperature": 0}


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--model", str(zoo_path("qwen35")), "--model_alias", MODEL, "--n_ctx", "2048",
                       "--n_parallel", "2", "--n_threads", "2", "--api_key", KEY, "--verbose", "false") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def block_order(events: list) -> None:
    """message_start, then each block's start, deltas and stop (indices 0, 1, ...), message_delta, message_stop."""
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"], types
    index, i, body = 0, 0, events[1:-2]
    while i < len(body):
        assert body[i].type == "content_block_start" and body[i].index == index, types
        i += 1
        while body[i].type == "content_block_delta":
            assert body[i].index == index
            i += 1
        assert body[i].type == "content_block_stop" and body[i].index == index, types
        i, index = i + 1, index + 1


def test_a_message_and_its_stream(client):
    ask = dict(model="claude-sonnet-4-5", system=SYSTEM, messages=TURNS, **GREEDY)
    message = client.messages.create(**ask)
    assert isinstance(message, anthropic.types.Message) and message.role == "assistant"
    assert message.id.startswith("msg_") and message.model == "claude-sonnet-4-5"
    assert [b.type for b in message.content] in (["thinking"], ["thinking", "text"], ["text"])
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert message.usage.output_tokens == 12 and message.stop_reason == "max_tokens"
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens > 20

    events = list(client.messages.create(**ask, stream=True))
    block_order(events)
    start, delta = events[0], events[-2]
    assert start.message.id.startswith("msg_") and start.message.content == [] and start.message.stop_reason is None
    prompt = message.usage.input_tokens + message.usage.cache_read_input_tokens
    assert start.message.usage.input_tokens == prompt  # the prompt's size, before the answer
    assert delta.delta.stop_reason == message.stop_reason and delta.usage.output_tokens == 12
    assert delta.usage.input_tokens + delta.usage.cache_read_input_tokens == prompt
    assert delta.usage.cache_read_input_tokens > 0  # the same prompt again: the prefix cache supplied it
    # the streamed blocks are the whole message's, piece by piece
    with client.messages.stream(**ask) as stream:
        final = stream.get_final_message()
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in message.content]
    thinking = "".join(e.delta.thinking for e in events if e.type == "content_block_delta"
                       and e.delta.type == "thinking_delta")
    assert thinking == message.content[0].thinking


def test_the_events_as_anthropic_sends_them(server):
    """`event: TYPE` then `data: {"type": TYPE, ...}`, and no [DONE]."""
    body = {"model": MODEL, "max_tokens": 4, "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": "Hi"}]}
    with httpx.stream("POST", server.url + "/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines[0::2]]
    data = [json.loads(line.removeprefix("data: ")) for line in lines[1::2]]
    assert all(line.startswith("event: ") for line in lines[0::2]) and len(names) == len(data)
    assert names == [d["type"] for d in data] and names[0] == "message_start" and names[-1] == "message_stop"


def test_count_tokens_is_the_prompt_the_answer_was_computed_from(client):
    count = client.messages.count_tokens(model=MODEL, system=SYSTEM, messages=TURNS)
    message = client.messages.create(model=MODEL, system=SYSTEM, messages=TURNS, max_tokens=1,
                                     extra_body={"temperature": 0})
    assert count.input_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens
    with_tools = client.messages.count_tokens(model=MODEL, system=SYSTEM, messages=TURNS, tools=[WEATHER])
    assert with_tools.input_tokens > count.input_tokens + 10  # the template lists the tools


def test_stop_sequences(client):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Greet."}], max_tokens=40,
               extra_body=forced("Ok.</think>\n\nHello world. Goodbye world."))
    plain = client.messages.create(**ask)
    assert plain.stop_reason == "end_turn" and plain.content[-1].text == "Hello world. Goodbye world."
    stopped = client.messages.create(**ask, stop_sequences=["Goodbye", "world"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "world"
    assert stopped.content[-1].text == "Hello "
    events = list(client.messages.create(**ask, stop_sequences=["Goodbye"], stream=True))
    assert events[-2].delta.stop_reason == "stop_sequence" and events[-2].delta.stop_sequence == "Goodbye"


def test_errors_come_in_anthropics_shape(server, client):
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=MODEL, messages=[], max_tokens=4)
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "invalid_request_error"
    assert caught.value.body["error"]["message"].startswith("messages:")
    with pytest.raises(anthropic.BadRequestError, match="tool_choice: no tool named 'nope'"):
        client.messages.create(model=MODEL, messages=TURNS, max_tokens=4, tools=[WEATHER],
                               tool_choice={"type": "tool", "name": "nope"})
    with pytest.raises(anthropic.BadRequestError, match="context"):
        client.messages.create(model=MODEL, messages=[{"role": "user", "content": "hello " * 2100}], max_tokens=4)
    with anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0) as bad, \
            pytest.raises(anthropic.AuthenticationError) as caught:
        bad.messages.create(model=MODEL, messages=TURNS, max_tokens=4)
    assert caught.value.body == {"type": "error", "error": {"type": "authentication_error", "message": (
        "Invalid API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'")}}
    r = httpx.post(server.url + "/v1/messages", headers={"x-api-key": KEY},
                   json={"model": MODEL, "messages": TURNS, "max_tokenz": 3})
    # a field this server does not know is ignored (llama_cpp.server's leniency), not refused
    assert r.status_code == 200 and r.json()["type"] == "message", r.text


def test_a_tool_call_in_the_templates_markup(client):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
               max_tokens=400, extra_body=forced(MARKUP))
    message = client.messages.create(**ask)
    assert message.stop_reason == "tool_use"
    thinking, text, call = message.content
    assert (thinking.type, thinking.thinking) == ("thinking", "Need the weather.")
    assert (text.type, text.text) == ("text", "Looking it up.")
    assert (call.type, call.name, call.input) == ("tool_use", "get_weather", {"city": "Paris", "days": 3})
    events = list(client.messages.create(**ask, stream=True))
    block_order(events)
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    assert [s.type for s in starts] == ["thinking", "text", "tool_use"] and starts[2].name == "get_weather"
    pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta"
              and e.delta.type == "input_json_delta"]
    assert len(pieces) >= 2 and json.loads("".join(pieces)) == {"city": "Paris", "days": 3}  # a parameter at a time
    assert events[-2].delta.stop_reason == "tool_use"


def test_a_tool_round_trip(client):
    question = {"role": "user", "content": "Weather in Paris?"}
    # tool_choice names the tool: its arguments follow its input_schema
    called = client.messages.create(model=MODEL, messages=[question], tools=[WEATHER], max_tokens=60,
                                    tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"temperature": 0})
    assert called.stop_reason == "tool_use"
    call = next(b for b in called.content if b.type == "tool_use")
    assert call.name == "get_weather" and call.input["city"] in ("Paris", "Rome") and call.input["days"] in (1, 2, 3)
    cut = client.messages.create(model=MODEL, messages=[question], tools=[WEATHER], max_tokens=2,
                                 tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"temperature": 0})
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2
    # the answer goes back as the assistant turn, the result as a tool_result block
    answered = [b.model_dump(exclude_none=True) for b in called.content]
    conversation = [question, {"role": "assistant", "content": answered},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                  "content": [{"type": "text", "text": "18 degrees, sunny"}]}]}]
    before = client.messages.count_tokens(model=MODEL, messages=conversation[:2] + [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": ""}]}], tools=[WEATHER])
    after = client.messages.count_tokens(model=MODEL, messages=conversation, tools=[WEATHER])
    assert after.input_tokens > before.input_tokens  # the template renders the result
    answer = client.messages.create(model=MODEL, messages=conversation, tools=[WEATHER], max_tokens=40,
                                    extra_body=forced("Done.</think>\n\nIt is 18 degrees and sunny."))
    assert answer.stop_reason == "end_turn" and answer.content[-1].text == "It is 18 degrees and sunny."


def test_structured_output(client):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "green"]}},
              "required": ["colour"], "additionalProperties": False}
    message = client.messages.create(model=MODEL, messages=[{"role": "user", "content": "A colour?"}], max_tokens=60,
                                     output_config={"format": {"type": "json_schema", "schema": schema}},
                                     extra_body={"temperature": 0, "reasoning_format": "none"})
    assert json.loads(message.content[-1].text)["colour"] in ("red", "green")


def test_the_request_as_chat_messages():
    """What the chat template is given: tool results as tool messages ahead of their turn's text."""
    from pyllama_ssm.server.anthropic import CreateMessageRequest, chat_messages

    body = CreateMessageRequest.model_validate({"system": "S", "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": ""},
                                          {"type": "text", "text": "a"},
                                          {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"x": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "r"},
                                     {"type": "text", "text": "and?"}]}]})
    assert chat_messages(body) == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning_content": "t", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "r"}, {"role": "user", "content": "and?"}]
