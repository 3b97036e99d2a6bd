"""Reasoning and tool-call parsing against the zoo vocab files' own chat templates: render, then parse.

An assistant message (reasoning, content, tool calls) rendered by the model's template, then parsed
back from the text after the generation prompt, gives the message back, whole and fed a few
characters at a time (a stream), for the Qwen3.5/Qwen3-Next XML form and the Hermes JSON form.
"""

from __future__ import annotations

import json

import pytest

from conftest import zoo_path

from pyllama_ssm.llama import Llama
from pyllama_ssm.llama_chat_format import Jinja2ChatFormatter
from pyllama_ssm.server.parsing import Markup, OutputParser, arguments_as_objects

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "units": {"type": "object"},
    "code": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
CALLS = [{"name": "get_weather", "arguments": {"city": "Paris <France>", "days": 3, "units": {"t": "C"}, "code": "42"}},
         {"name": "now", "arguments": {}}]
ANSWERS = [  # (reasoning, content, tool calls)
    ("The user wants the weather.\nTwo steps.", "Let me look.", CALLS),
    ("", "Plain answer, no tools.", []),
    ("Only thinking then a call.", "", CALLS[:1]),
    ("Think < not a tag > </thin", "Text with a <tool_c lookalike and\n\nparagraphs.", []),
]


def template_of(name: str) -> tuple[str, Jinja2ChatFormatter]:
    with Llama(str(zoo_path(name)), vocab_only=True, verbose=False) as vocab:
        template = vocab.metadata["tokenizer.chat_template"]
        return template, Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="")


def rendered_answer(formatter: Jinja2ChatFormatter, reasoning: str, content: str, calls: list) -> tuple[str, str]:
    """(generation prompt, the assistant's text after it) as the template writes them."""
    user = [{"role": "user", "content": "Weather in Paris?"}]
    message = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [{"type": "function", "function": {"name": c["name"],
                                                                   "arguments": json.dumps(c["arguments"])}}
                                 for c in calls]
    prompt = formatter(messages=user, tools=TOOLS).prompt
    formatter.add_generation_prompt = False
    try:
        full = formatter(messages=arguments_as_objects(user + [message]), tools=TOOLS).prompt
    finally:
        formatter.add_generation_prompt = True
    assert full.startswith(prompt), (prompt[-40:], full[len(prompt) - 40:])
    return prompt, full[len(prompt):].removesuffix("\n").removesuffix("<|im_end|>")


@pytest.mark.parametrize("name,form", [("qwen35", "xml"), ("qwen3next", "xml"), ("mamba", "hermes"),
                                       ("falcon-h1", "hermes")])
@pytest.mark.parametrize("answer", range(len(ANSWERS)))
def test_render_then_parse_gives_the_message_back(name, form, answer):
    template, formatter = template_of(name)
    markup = Markup.of_template(template)
    assert markup.tools == form
    reasoning, content, calls = ANSWERS[answer]
    if reasoning and not markup.reasoning:
        reasoning = ""  # the Hermes templates write no reasoning
    prompt, text = rendered_answer(formatter, reasoning, content, calls)
    thinking = prompt.rstrip().endswith("<think>")
    for step in (len(text) + 1, 1, 3, 7):  # whole, then streamed in pieces
        parser = OutputParser(markup, thinking=thinking, tools=TOOLS)
        deltas = [parser.feed(text[i:i + step]) for i in range(0, len(text), step)] + [parser.finish()]
        message = parser.message()
        assert message.get("reasoning_content", "") == reasoning, (step, text)
        assert (message["content"] or "") == content, (step, text)
        got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", [])]
        assert got == [(c["name"], c["arguments"]) for c in calls], (step, text)
        # the deltas add up to the message: reasoning, content, and each call's name and arguments
        assert "".join(d.reasoning for d in deltas) == reasoning
        assert "".join(d.content for d in deltas) == content
        for i, call in enumerate(message.get("tool_calls", [])):
            pieces = [t for d in deltas for t in d.tool_calls if t["index"] == i]
            assert pieces[0]["id"] == call["id"] and pieces[0]["function"]["name"] == call["function"]["name"]
            assert "".join(t["function"]["arguments"] for t in pieces) == call["function"]["arguments"]
            if form == "xml" and step == 1 and len(calls[i]["arguments"]) > 1:
                assert len(pieces) > 2, "XML arguments stream a parameter at a time"


def test_opt_out_and_cut_off_calls():
    template, _ = template_of("qwen35")
    markup = Markup.of_template(template)
    text = "thinking</think>\n\nhi<tool_call>\n<function=now>\n</function>\n</tool_call>"
    parser = OutputParser(markup, thinking=True, parse_tools=False)
    parser.feed(text)
    parser.finish()
    assert parser.reasoning == "thinking" and parser.content.startswith("hi<tool_call>") and not parser.tool_calls
    cut = OutputParser(markup, thinking=False)
    cut.feed("<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n<parameter=da")
    cut.finish()
    assert json.loads(cut.message()["tool_calls"][0]["function"]["arguments"]) == {"city": "Rome"}
    assert Markup.of_template(template_of("llama")[0]) is None  # no markup: nothing parsed
