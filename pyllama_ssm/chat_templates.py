"""Chat templates: the HF-style Jinja templates that GGUF files carry, rendered as transformers does.

Jinja2ChatFormatter renders a template in jinja2's sandbox (a Llama registers
its model's as "chat_template.default"); hf_tokenizer_config_to_chat_formatter
takes an HF tokenizer_config.json; guess_chat_format_from_gguf_metadata names
the format whose template a GGUF carries verbatim.  The names are
llama_cpp.llama_chat_format's; that module re-exports them.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Optional

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import llama_types as T
from .chat_handlers import (ChatFormatter, ChatFormatterResponse, LlamaChatCompletionHandler, Messages,
                            chat_formatter_to_chat_completion_handler)
from .llama_callbacks import StoppingCriteriaList, StopOnTokenIds

TEMPLATE_REFUSED = "the chat template cannot render these messages"  # note on what render() raised
CHATML_CHAT_TEMPLATE = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"  # noqa: E501
CHATML_BOS_TOKEN = "<s>"
CHATML_EOS_TOKEN = "<|im_end|>"
MISTRAL_INSTRUCT_CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"  # noqa: E501
MISTRAL_INSTRUCT_BOS_TOKEN = "<s>"
MISTRAL_INSTRUCT_EOS_TOKEN = "</s>"
MIXTRAL_INSTRUCT_CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"  # noqa: E501
LLAMA3_INSTRUCT_CHAT_TEMPLATE = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"  # noqa: E501


class Jinja2ChatFormatter(ChatFormatter):
    """Renders an HF-style chat template with jinja2's sandbox, as transformers does."""

    class IgnoreGenerationTags(jinja2.ext.Extension):
        """HF's {% generation %} ... {% endgeneration %} marks training spans: render the body."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def __init__(self, template: str, eos_token: str, bos_token: str, add_generation_prompt: bool = True,
                 stop_token_ids: Optional[list[int]] = None):
        self.template = template
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.add_generation_prompt = add_generation_prompt
        self.stop_token_ids = set(stop_token_ids) if stop_token_ids is not None else None
        env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                            extensions=[self.IgnoreGenerationTags, jinja2.ext.loopcontrols])
        env.filters["tojson"] = self.tojson
        self._environment = env.from_string(template)

    @staticmethod
    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    @staticmethod
    def tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
               separators: Optional[tuple[str, str]] = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def __call__(self, *, messages: Messages, functions=None, function_call=None, tools=None, tool_choice=None,
                 **kwargs: Any) -> ChatFormatterResponse:
        def raise_exception(message: str):
            raise ValueError(f"chat template: {message}")

        def render(messages: Messages, add_generation_prompt: bool) -> str:
            return self._environment.render(
                messages=messages, eos_token=self.eos_token, bos_token=self.bos_token,
                raise_exception=raise_exception, add_generation_prompt=add_generation_prompt,
                functions=functions, function_call=function_call, tools=tools, tool_choice=tool_choice,
                strftime_now=self.strftime_now, **kwargs)

        try:
            prompt = render(messages, self.add_generation_prompt)
        except Exception as e:
            # raised as stock raises it; the note tells a server that the messages did not fit the template
            e.add_note(TEMPLATE_REFUSED)
            raise
        stopping_criteria = None
        if self.stop_token_ids is not None:
            stopping_criteria = StoppingCriteriaList([StopOnTokenIds(self.stop_token_ids)])
        return ChatFormatterResponse(prompt=prompt, stop=[self.eos_token], stopping_criteria=stopping_criteria,
                                     added_special=True, boundaries=self._boundaries(render, messages, prompt))

    @staticmethod
    def _boundaries(render, messages: Messages, prompt: str) -> tuple[str, ...]:
        """Where later prompts part from this one, found by rendering what they would hold: the system
        message(s) and another user's first message, and this conversation with an answer and a next
        message.  A template may render a past answer unlike the generation prompt (a thinking model's
        `<think>` is dropped from the history): the common part with the prompt is what the next turn
        can reuse.  A template that refuses such a conversation gives no boundary there."""
        probes = []
        n_system = next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
        if 0 < n_system < len(messages):
            probes.append([*messages[:n_system], {"role": "user", "content": "x"}])
        probes.append([*messages, {"role": "assistant", "content": "x"}, {"role": "user", "content": "x"}])
        found = []
        for probe in probes:
            try:
                text = render(probe, False)
            except Exception:  # noqa: BLE001 - e.g. "no user message": no boundary there
                continue
            n = len(os.path.commonprefix([prompt, text]))
            if n > 0:
                found.append(prompt[:n])
        return tuple(found)

    def to_chat_handler(self) -> LlamaChatCompletionHandler:
        return chat_formatter_to_chat_completion_handler(self)


def hf_tokenizer_config_to_chat_formatter(tokenizer_config: dict[str, Any],
                                          add_generation_prompt: bool = True) -> ChatFormatter:
    """A formatter from an HF tokenizer_config.json (chat_template, bos_token, eos_token)."""
    for key in ("chat_template", "bos_token", "eos_token"):
        if not isinstance(tokenizer_config.get(key), str):
            raise ValueError(f"tokenizer_config[{key!r}]: expected a string")
    bos, eos = tokenizer_config["bos_token"], tokenizer_config["eos_token"]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(tokenizer_config["chat_template"])

    def format_tokenizer_config(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
        if add_generation_prompt:  # an empty assistant turn prompts the reply, as llama-cpp-python does
            messages = [*messages, T.ChatCompletionRequestAssistantMessage(role="assistant", content="")]
        prompt = template.render(messages=messages, bos_token=bos, eos_token=eos, **kwargs)
        return ChatFormatterResponse(prompt=prompt, stop=[eos, bos], added_special=True)

    return format_tokenizer_config


def hf_tokenizer_config_to_chat_completion_handler(tokenizer_config: dict[str, Any],
                                                   add_generation_prompt: bool = True) -> LlamaChatCompletionHandler:
    return chat_formatter_to_chat_completion_handler(
        hf_tokenizer_config_to_chat_formatter(tokenizer_config, add_generation_prompt=add_generation_prompt))


def guess_chat_format_from_gguf_metadata(metadata: dict[str, str]) -> Optional[str]:
    """The named format whose template the GGUF carries verbatim, if any."""
    template = metadata.get("tokenizer.chat_template")
    if template == CHATML_CHAT_TEMPLATE:
        return "chatml"
    if template in (MISTRAL_INSTRUCT_CHAT_TEMPLATE, MIXTRAL_INSTRUCT_CHAT_TEMPLATE):
        return "mistral-instruct"
    if template == LLAMA3_INSTRUCT_CHAT_TEMPLATE:
        return "llama-3"
    return None

