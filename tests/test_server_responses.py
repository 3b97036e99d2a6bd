"""POST /v1/responses through the official `openai` client: items, the streamed event sequence, stored
conversations that resume from the prefix cache (#19 points 1 and 2)."""

from __future__ import annotations

import pytest

from conftest import ZOO, zoo_path

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from pyllama_ssm.server.process import ServerProcess  # noqa: E402

KEY = "sk-responses"
SMOLLM2 = ZOO / "smollm2-135m-instruct-q4_1.gguf"  # real weights: answers that end, canonical tokens
TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather of a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
MARKUP = ("Need the weather.</think>\n\nLooking it up.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\n"
          "Paris\n</parameter>\n</function>\n</tool_call>")
FORCED = {"grammar": "root ::= " + '"' + MARKUP.replace("\n", "\\n") + '"'}


@pytest.fixture(scope="module")
def qwen():
    with ServerProcess("--model", str(zoo_path("qwen35")), "--n_ctx", "2048", "--n_parallel", "2", "--n_threads", "2",
                       "--api_key", KEY, "--verbose", "false") as server, \
            openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as client:
        yield client


def test_items_of_a_response_and_its_event_stream(qwen):
    ask = dict(model="any", input="Weather in Paris?", tools=TOOLS, temperature=0, max_output_tokens=400,
               extra_body=FORCED)
    response = qwen.responses.create(**ask)
    assert response.object == "response" and response.status == "completed" and response.id.startswith("resp_")
    reasoning, message, call = response.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "Need the weather."
    assert message.type == "message" and response.output_text == "Looking it up."
    assert call.type == "function_call" and call.name == "get_weather" and call.arguments == '{"city": "Paris"}'
    assert response.usage.output_tokens_details.reasoning_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    with qwen.responses.stream(**ask) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for kind in ("response.reasoning_text.delta", "response.output_text.delta",
                 "response.function_call_arguments.delta", "response.output_item.done"):
        assert kind in kinds
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 3
    assert [o.type for o in final.output] == ["reasoning", "message", "function_call"]
    assert final.output_text == response.output_text and final.output[2].arguments == call.arguments
    # the stream's second run found the same prompt in the prefix cache
    assert final.usage.input_tokens_details.cached_tokens > 0
    # the tool's answer continues the stored response
    follow = qwen.responses.create(model="any", previous_response_id=response.id, temperature=0, max_output_tokens=8,
                                   tools=TOOLS,
                                   input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert follow.previous_response_id == response.id and follow.usage.input_tokens > response.usage.input_tokens
    assert qwen.responses.retrieve(follow.id).id == follow.id
    qwen.responses.delete(follow.id)
    with pytest.raises(openai.NotFoundError):
        qwen.responses.retrieve(follow.id)


def test_refusals_name_the_field(qwen):
    with pytest.raises(openai.NotFoundError) as caught:
        qwen.responses.create(model="any", input="hi", previous_response_id="resp_nope")
    assert caught.value.param == "previous_response_id"
    for kwargs, field in (({"input": ""}, "input"), ({"input": "hi", "max_output_tokens": -1}, "max_output_tokens"),
                          ({"input": "hi", "temperature": 3}, "temperature"),
                          ({"input": "hi " * 3000}, "input")):
        with pytest.raises(openai.BadRequestError) as caught:
            qwen.responses.create(model="any", **kwargs)
        assert caught.value.param == field, caught.value.body
    ignored = qwen.responses.create(model="any", input="hi", max_output_tokens=2, extra_body={"nope": 1})
    assert ignored.usage.output_tokens <= 2  # a field the server does not know is ignored, not refused
    with openai.OpenAI(base_url=str(qwen.base_url), api_key="wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            stranger.responses.create(model="any", input="hi")


@pytest.mark.skipif(not SMOLLM2.exists(), reason="SmolLM2 missing: run `make models` (tests/models/real.py)")
def test_a_stored_conversation_resumes_from_its_prefix_cache_entry():
    """The follow-up computes only its new tokens, and answers as the stateless request with the whole history."""
    with ServerProcess("--model", str(SMOLLM2), "--n_ctx", "2048", "--n_parallel", "2",
                       "--n_threads", "2", "--verbose", "false") as server, \
            openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120) as c:
        first = c.responses.create(model="m", input="What is the capital of France?", temperature=0,
                                   max_output_tokens=48)
        follow = c.responses.create(model="m", input="And of Italy?", previous_response_id=first.id, temperature=0,
                                    max_output_tokens=24)
        cached = follow.usage.input_tokens_details.cached_tokens
        # the memory holds the prompt and the answer but its last token, unless that ended the answer
        assert cached == first.usage.input_tokens + first.usage.output_tokens - (first.status == "incomplete")
        assert follow.usage.input_tokens - cached <= 20  # the new turn only (end of answer, user turn, assistant header)
        history = [{"role": "user", "content": "What is the capital of France?"},
                   *[item.model_dump(exclude_none=True) for item in first.output],
                   {"role": "user", "content": "And of Italy?"}]
        stateless = c.responses.create(model="m", input=history, temperature=0, max_output_tokens=24, store=False)
        assert stateless.output_text == follow.output_text
        assert stateless.usage.input_tokens == follow.usage.input_tokens
        with pytest.raises(openai.NotFoundError):  # store=False keeps nothing
            c.responses.retrieve(stateless.id)
        # other conversations push the entry out of the prefix cache (32 entries): the follow-up is recomputed
        for i in range(40):
            c.completions.create(model="m", prompt=f"{i} unrelated prompt number {i}", max_tokens=2, temperature=0)
        again = c.responses.create(model="m", input="And of Italy?", previous_response_id=first.id, temperature=0,
                                   max_output_tokens=24, store=False)
        assert again.usage.input_tokens_details.cached_tokens < cached
        assert again.usage.input_tokens == follow.usage.input_tokens and again.output_text
        # (its text may differ from the cached run's: the answer's tokens were decoded one per step and are
        # now prefilled in one batch, which on SmolLM2 q4_1 is not bit-identical - an Engine matter)
