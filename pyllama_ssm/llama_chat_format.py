"""Chat formats: how create_chat_completion turns messages into a prompt.

The names and behaviour are llama_cpp.llama_chat_format's: a registry of chat
completion handlers by name (the named formats below and
"chatml-function-calling"), Jinja2ChatFormatter for the HF-style templates that
GGUF files carry (a Llama registers its model's as "chat_template.default"),
and guess_chat_format_from_gguf_metadata.  A handler renders the prompt, turns
response_format and a forced tool choice into a grammar, calls
llama.create_completion and reshapes the result as a chat completion.

Why ours and not stock's: stock's module loads its ctypes layer and the rest of its package as the
top-level `llama_cpp` (`import llama_cpp.llama_cpp`), so it exists only under install_as_llama_cpp()
(as_llama_cpp.py).  There `llama_cpp.llama_chat_format` is stock's own, multimodal handlers included;
our Llama takes its handlers and finds the formats registered there (get_chat_completion_handler).
Without it, pyllama_ssm.Llama renders the same prompts (tests/parity: every template of the pin).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Optional, Protocol, Union

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import llama_grammar
from . import llama_types as T

TEMPLATE_REFUSED = "the chat template cannot render these messages"  # note on what render() raised
CHATML_CHAT_TEMPLATE = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"  # noqa: E501
CHATML_BOS_TOKEN = "<s>"
CHATML_EOS_TOKEN = "<|im_end|>"
MISTRAL_INSTRUCT_CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"  # noqa: E501
MISTRAL_INSTRUCT_BOS_TOKEN = "<s>"
MISTRAL_INSTRUCT_EOS_TOKEN = "</s>"
MIXTRAL_INSTRUCT_CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"  # noqa: E501
LLAMA3_INSTRUCT_CHAT_TEMPLATE = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"  # noqa: E501

Messages = list[T.ChatCompletionRequestMessage]
CompletionOrChunks = Union[T.CreateCompletionResponse, Iterator[T.CreateCompletionStreamResponse]]
ChatOrChunks = Union[T.CreateChatCompletionResponse, Iterator[T.CreateChatCompletionStreamResponse]]


# -- the registry --------------------------------------------------------------------
class LlamaChatCompletionHandler(Protocol):
    """A callable taking llama=, messages= and create_chat_completion's keywords; returns a
    chat completion, or an iterator of chunks when stream=True."""

    def __call__(self, *, llama: Any, messages: Messages, **kwargs: Any) -> ChatOrChunks: ...


class LlamaChatCompletionHandlerNotFoundException(ValueError):
    pass


class LlamaChatCompletionHandlerRegistry:
    """Handlers by name; one table shared by every instance."""

    _chat_handlers: dict[str, LlamaChatCompletionHandler] = {}

    def register_chat_completion_handler(self, name: str, chat_handler: LlamaChatCompletionHandler,
                                         overwrite: bool = False) -> None:
        if not overwrite and name in self._chat_handlers:
            raise ValueError(f"chat format {name!r} is already registered; pass overwrite=True to replace it")
        self._chat_handlers[name] = chat_handler

    def unregister_chat_handler(self, name: str) -> None:
        if self._chat_handlers.pop(name, None) is None:
            raise ValueError(f"no chat format registered as {name!r}")

    def get_chat_completion_handler_by_name(self, name: str) -> LlamaChatCompletionHandler:
        try:
            return self._chat_handlers[name]
        except KeyError:
            raise LlamaChatCompletionHandlerNotFoundException(
                f"chat_format={name!r}: unknown (known: {', '.join(sorted(self._chat_handlers))})") from None


def get_chat_completion_handler(name: str) -> LlamaChatCompletionHandler:
    try:
        return LlamaChatCompletionHandlerRegistry().get_chat_completion_handler_by_name(name)
    except LlamaChatCompletionHandlerNotFoundException:
        # under install_as_llama_cpp(), formats registered with stock's llama_cpp.llama_chat_format
        # (its multimodal handlers' names among them) are found there
        stock = sys.modules.get("llama_cpp.llama_chat_format")
        if stock is None or stock is sys.modules[__name__]:
            raise
        try:
            return stock.get_chat_completion_handler(name)
        except Exception:
            raise LlamaChatCompletionHandlerNotFoundException(
                f"chat_format={name!r}: unknown here and in llama_cpp.llama_chat_format") from None


def register_chat_completion_handler(name: str):
    def decorator(f: LlamaChatCompletionHandler) -> LlamaChatCompletionHandler:
        LlamaChatCompletionHandlerRegistry().register_chat_completion_handler(name, f)
        return f
    return decorator


# -- formatters ------------------------------------------------------------------------
@dataclasses.dataclass
class ChatFormatterResponse:
    """A rendered prompt, the stop strings of its format, and whether it already holds BOS."""

    prompt: str
    stop: Optional[Union[str, list[str]]] = None
    stopping_criteria: Any = None  # a llama.StoppingCriteriaList
    added_special: bool = False
    # leading parts of `prompt` where a later conversation is likely to part from this one (ours, not
    # stock's): the end of the system message(s), shared by every user, and the end of the last turn,
    # before the generation prompt, where the next request's history renders the answer
    boundaries: tuple[str, ...] = ()


class ChatFormatter(Protocol):
    def __call__(self, *, messages: Messages, **kwargs: Any) -> ChatFormatterResponse: ...


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
            from .llama import StoppingCriteriaList, StopOnTokenIds
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


# -- grammars from the request ------------------------------------------------------------
def _grammar_for_schema(schema: Any, verbose: bool) -> llama_grammar.LlamaGrammar:
    """The schema's grammar, or any JSON when the converter cannot handle the schema (as stock does)."""
    try:
        return llama_grammar.LlamaGrammar.from_json_schema(json.dumps(schema), verbose=verbose)
    except ValueError:
        return llama_grammar.LlamaGrammar.from_string(llama_grammar.JSON_GBNF, verbose=verbose)


def _grammar_for_response_format(response_format: Optional[T.ChatCompletionRequestResponseFormat],
                                 verbose: bool = False) -> Optional[llama_grammar.LlamaGrammar]:
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        if "schema" in response_format:
            return _grammar_for_schema(response_format["schema"], verbose)
        return llama_grammar.LlamaGrammar.from_string(llama_grammar.JSON_GBNF, verbose=verbose)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ValueError('response_format: type "json_schema" needs {"json_schema": {"schema": {...}}}')
        return llama_grammar.LlamaGrammar.from_json_schema(json.dumps(spec["schema"]), verbose=verbose)
    if kind == "text":
        return None
    raise ValueError(f"response_format type {kind!r}: expected 'text', 'json_object' or 'json_schema'")


def _tools_and_choice(functions, function_call, tools, tool_choice):
    """Legacy functions/function_call as tools/tool_choice."""
    if functions is not None:
        tools = [{"type": "function", "function": f} for f in functions]
    if function_call in ("none", "auto"):
        tool_choice = function_call
    elif isinstance(function_call, dict) and "name" in function_call:
        tool_choice = {"type": "function", "function": {"name": function_call["name"]}}
    return tools, tool_choice


def _find_tool(tools, name: str):
    tool = next((t for t in tools or [] if t["function"]["name"] == name), None)
    if tool is None:
        raise ValueError(f"tool_choice: no tool named {name!r} in tools")
    return tool


# -- completion -> chat completion ----------------------------------------------------------
def _convert_text_completion_logprobs_to_chat(logprobs: Optional[T.CompletionLogprobs]) -> Optional[T.ChatCompletionLogprobs]:
    if logprobs is None:
        return None
    return {
        "content": [{"token": token, "bytes": None, "logprob": logprob,
                     "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in (top or {}).items()]}
                    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                                   logprobs["top_logprobs"])],
        "refusal": None,
    }


def _convert_text_completion_to_chat(completion: T.Completion) -> T.ChatCompletion:
    choice = completion["choices"][0]
    return {
        "id": "chat" + completion["id"], "object": "chat.completion", "created": completion["created"],
        "model": completion["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": choice["text"]},
                     "logprobs": _convert_text_completion_logprobs_to_chat(choice["logprobs"]),
                     "finish_reason": choice["finish_reason"]}],
        "usage": completion["usage"],
    }


def _convert_text_completion_chunks_to_chat(chunks: Iterator[T.CreateCompletionStreamResponse]
                                            ) -> Iterator[T.ChatCompletionChunk]:
    for i, chunk in enumerate(chunks):
        head = {"id": "chat" + chunk["id"], "model": chunk["model"], "created": chunk["created"],
                "object": "chat.completion.chunk"}
        choice = chunk["choices"][0]
        if i == 0:
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                        "finish_reason": None}]}
        delta = {"content": choice["text"]} if choice["finish_reason"] is None else {}
        yield {**head, "choices": [{"index": 0, "delta": delta,
                                    "logprobs": _convert_text_completion_logprobs_to_chat(choice["logprobs"]),
                                    "finish_reason": choice["finish_reason"]}]}


def _convert_completion_to_chat(completion_or_chunks: CompletionOrChunks, stream: bool = False) -> ChatOrChunks:
    if stream:
        return _convert_text_completion_chunks_to_chat(completion_or_chunks)
    return _convert_text_completion_to_chat(completion_or_chunks)


def _convert_completion_to_chat_function(tool_name: str, completion_or_chunks: CompletionOrChunks,
                                         stream: bool) -> ChatOrChunks:
    """A completion constrained to a tool's arguments, as a chat completion calling that tool."""
    if not stream:
        completion = completion_or_chunks
        arguments = completion["choices"][0]["text"]
        return {
            "id": "chat" + completion["id"], "object": "chat.completion", "created": completion["created"],
            "model": completion["model"],
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": None,
                            "function_call": {"name": tool_name, "arguments": arguments},
                            "tool_calls": [{"id": f"call__0_{tool_name}_{completion['id']}", "type": "function",
                                            "function": {"name": tool_name, "arguments": arguments}}]},
                "logprobs": _convert_text_completion_logprobs_to_chat(completion["choices"][0]["logprobs"]),
                "finish_reason": "tool_calls",
            }],
            "usage": completion["usage"],
        }
    return _tool_call_chunks(tool_name, completion_or_chunks)


def _tool_call_chunks(tool_name: str, chunks: Iterator[T.CreateCompletionStreamResponse]
                      ) -> Iterator[T.CreateChatCompletionStreamResponse]:
    head = None
    for chunk in chunks:
        if head is None:
            head = {"id": "chat" + chunk["id"], "object": "chat.completion.chunk", "created": chunk["created"],
                    "model": chunk["model"]}
            tool_id = f"call__0_{tool_name}_{chunk['id']}"
            yield {**head, "choices": [{"index": 0, "finish_reason": None, "logprobs": None,
                                        "delta": {"role": "assistant", "content": None, "function_call": None,
                                                  "tool_calls": None}}]}
        if chunk["choices"][0]["finish_reason"] is not None:
            continue  # the tool call's own final chunk follows
        arguments = chunk["choices"][0]["text"]
        yield {**head, "choices": [{
            "index": 0, "finish_reason": None,
            "logprobs": _convert_text_completion_logprobs_to_chat(chunk["choices"][0]["logprobs"]),
            "delta": {"role": None, "content": None,
                      "function_call": {"name": tool_name, "arguments": arguments},
                      "tool_calls": [{"index": 0, "id": tool_id, "type": "function",
                                      "function": {"name": tool_name, "arguments": arguments}}]}}]}
    if head is not None:
        yield {**head, "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None,
                                    "delta": {"role": None, "content": None, "function_call": None,
                                              "tool_calls": None}}]}


# -- formatter -> handler ------------------------------------------------------------------
def chat_formatter_to_chat_completion_handler(chat_formatter: ChatFormatter) -> LlamaChatCompletionHandler:
    def chat_completion_handler(*, llama, messages: Messages, functions=None, function_call=None, tools=None,
                                tool_choice=None, temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                                min_p: float = 0.05, typical_p: float = 1.0, stream: bool = False,
                                stop: Optional[Union[str, list[str]]] = None, seed: Optional[int] = None,
                                response_format=None, max_tokens: Optional[int] = None,
                                presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                                repeat_penalty: float = 1.1, tfs_z: float = 1.0, mirostat_mode: int = 0,
                                mirostat_tau: float = 5.0, mirostat_eta: float = 0.1, model: Optional[str] = None,
                                logits_processor=None, grammar=None, logit_bias=None, logprobs: Optional[bool] = None,
                                top_logprobs: Optional[int] = None, **kwargs: Any) -> ChatOrChunks:
        result = chat_formatter(messages=messages, functions=functions, function_call=function_call, tools=tools,
                                tool_choice=tool_choice, **kwargs)
        prompt = llama.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
        if result.stop is not None:
            stop += result.stop if isinstance(result.stop, list) else [result.stop]
        grammar = _grammar_for_response_format(response_format, llama.verbose) or grammar
        tools, tool_choice = _tools_and_choice(functions, function_call, tools, tool_choice)
        tool = None
        if isinstance(tool_choice, dict) and tools is not None:
            tool = _find_tool(tools, tool_choice["function"]["name"])
            grammar = _grammar_for_schema(tool["function"]["parameters"], llama.verbose)
        args = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, typical_p=typical_p,
                    stream=stream, seed=seed, max_tokens=max_tokens, presence_penalty=presence_penalty,
                    frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty, tfs_z=tfs_z,
                    mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, model=model,
                    logits_processor=logits_processor, logit_bias=logit_bias)
        out = llama.create_completion(prompt=prompt, stop=stop, stopping_criteria=result.stopping_criteria,
                                      grammar=grammar, logprobs=top_logprobs if logprobs else None,
                                      prefix_checkpoints=_token_boundaries(llama, result, prompt), **args)
        if tool is not None:
            return _convert_completion_to_chat_function(tool["function"]["name"], out, stream)
        return _convert_completion_to_chat(out, stream=stream)

    return chat_completion_handler


def _token_boundaries(llama, result: ChatFormatterResponse, prompt: list[int]) -> list[int]:
    """The formatter's boundaries as prompt positions: the tokens a boundary's text shares with the prompt
    (a boundary inside what tokenizes as one token falls before it)."""
    engine = getattr(llama, "_engine", None)
    if not result.boundaries or engine is None or not engine.takes_checkpoints:  # tokenizing costs: only
        return []                                                                # where they serve
    found = set()
    for text in result.boundaries:
        head = llama.tokenize(text.encode("utf-8"), add_bos=not result.added_special, special=True)
        found.add(len(os.path.commonprefix([head, prompt])))
    return sorted(found - {0})


def register_chat_format(name: str):
    def decorator(f: ChatFormatter) -> ChatFormatter:
        LlamaChatCompletionHandlerRegistry().register_chat_completion_handler(
            name, chat_formatter_to_chat_completion_handler(f))
        return f
    return decorator


# -- named formats --------------------------------------------------------------------------
def _get_system_message(messages: Messages) -> str:
    return next((m["content"] or "" for m in messages if m["role"] == "system"), "")


def _map_roles(messages: Messages, role_map: dict[str, str]) -> list[tuple[str, Optional[str]]]:
    """(prefix, text) for the messages whose role is mapped; non-text content becomes None."""
    return [(role_map[m["role"]], m["content"] if isinstance(m.get("content"), str) else None)
            for m in messages if m["role"] in role_map]


def _format_llama2(system_message: str, messages, sep: str, sep2: str) -> str:
    seps = (sep, sep2)
    out = system_message + sep
    for i, (role, text) in enumerate(messages):
        if system_message and i == 0:
            out += (text or "") + seps[i % 2]
        elif text:
            out += role + text + " " + seps[i % 2]
        else:
            out += role + " "
    return out


def _format_add_colon_two(system_message: str, messages, sep: str, sep2: str) -> str:
    seps = (sep, sep2)
    out = system_message + sep
    for i, (role, text) in enumerate(messages):
        out += f"{role}: {text}{seps[i % 2]}" if text else f"{role}:"
    return out


def _format_no_colon_single(system_message: str, messages, sep: str) -> str:
    out = system_message
    for role, text in messages:
        out += role + text + sep if text else role
    return out


def _format_chatml(system_message: str, messages, sep: str) -> str:
    out = "" if system_message == "" else system_message + sep + "\n"
    for role, text in messages:
        out += f"{role}\n{text}{sep}\n" if text else f"{role}\n"
    return out


def _chatml_style(messages: Messages, system: str, user: str, assistant: str, sep: str) -> str:
    """Turns as `role\ntext<sep>\n`, ending with an open assistant turn."""
    turns = _map_roles(messages, {"user": user, "assistant": assistant}) + [(assistant, None)]
    return _format_chatml(system, turns, sep)


@register_chat_format("llama-2")
def format_llama2(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    system = _get_system_message(messages)
    if system:
        system = f"[INST] <<SYS>>\n{system}\n<</SYS>>"
    turns = _map_roles(messages, {"user": "<s>[INST]", "assistant": "[/INST]"})
    return ChatFormatterResponse(prompt=_format_llama2(system, turns, " ", "</s>") + "[/INST]")


@register_chat_format("llama-3")
def format_llama3(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    roles = {r: f"<|start_header_id|>{r}<|end_header_id|>\n\n" for r in ("system", "user", "assistant")}
    turns = _map_roles(messages, roles) + [(roles["assistant"], None)]
    return ChatFormatterResponse(prompt=_format_no_colon_single("", turns, "<|eot_id|>"), stop="<|eot_id|>")


@register_chat_format("alpaca")
def format_alpaca(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    turns = _map_roles(messages, {"user": "### Instruction", "assistant": "### Response"})
    return ChatFormatterResponse(prompt=_format_add_colon_two(_get_system_message(messages), turns, "\n\n", "</s>"))


@register_chat_format("qwen")
def format_qwen(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    system = "<|im_start|>system\n" + (_get_system_message(messages) or "You are a helpful assistant.")
    prompt = _chatml_style(messages, system, "<|im_start|>user", "<|im_start|>assistant", "<|im_end|>")
    return ChatFormatterResponse(prompt=prompt, stop="<|endoftext|>")


@register_chat_format("vicuna")
def format_vicuna(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
    turns = _map_roles(messages, {"user": "USER", "assistant": "ASSISTANT"}) + [("ASSISTANT", None)]
    return ChatFormatterResponse(prompt=_format_add_colon_two(system, turns, " ", "</s>"))


@register_chat_format("zephyr")
def format_zephyr(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    system = "<|system|>\n" + _get_system_message(messages)
    prompt = _chatml_style(messages, system, "<|user|>\n", "<|assistant|>\n", "</s>")
    return ChatFormatterResponse(prompt=prompt, stop="</s>")


@register_chat_format("chatml")
def format_chatml(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    system = "<|im_start|>system\n" + _get_system_message(messages)
    prompt = _chatml_style(messages, system, "<|im_start|>user", "<|im_start|>assistant", "<|im_end|>")
    return ChatFormatterResponse(prompt=prompt, stop="<|im_end|>")


@register_chat_format("mistral-instruct")
def format_mistral_instruct(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    prompt = ""
    for m in messages:
        if m["role"] == "user" and isinstance(m.get("content"), str):
            prompt += "[INST] " + m["content"]
        elif m["role"] == "assistant" and m.get("content") is not None:
            prompt += " [/INST]" + m["content"] + "</s>"
    return ChatFormatterResponse(prompt=prompt + " [/INST]", stop="</s>")


@register_chat_format("gemma")
def format_gemma(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    # Gemma has no system role: a system message is dropped, as llama-cpp-python does
    turns = _map_roles(messages, {"user": "<start_of_turn>user\n", "assistant": "<start_of_turn>model\n"})
    turns.append(("<start_of_turn>model\n", None))
    return ChatFormatterResponse(prompt=_format_no_colon_single("", turns, "<end_of_turn>\n"), stop="<end_of_turn>\n")


@register_chat_format("phi-3")
def format_phi3(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    # https://huggingface.co/microsoft/Phi-3-mini-4k-instruct (tokenizer_config.json chat_template)
    system = _get_system_message(messages)
    prompt = _chatml_style(messages, f"<|system|>\n{system}" if system else "", "<|user|>", "<|assistant|>", "<|end|>")
    return ChatFormatterResponse(prompt=prompt, stop="<|end|>")


# -- tools with any model: chatml-function-calling -------------------------------------------
_FUNCTION_CALLING_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message.role }}\n"
    "{% if message.role == 'system' %}"
    "{{ message.content }}"
    "{% if tool_calls %}"
    "\n\nYou have access to the following functions:\n"
    "{% for tool in tools %}"
    "\nfunctions.{{ tool.function.name }}:\n"
    "{{ tool.function.parameters | tojson }}"
    "\n{% endfor %}"
    "\n\nYou can respond to users messages with either a single message or one or more function calls."
    "\n\nTo respond with a message begin the message with 'message:', use the following format:"
    "\n\nmessage:"
    "\n<message>"
    "\n\nTo respond with one or more function calls begin the message with 'functions.<function_name>:', "
    "use the following format:"
    "\n\nfunctions.<function_name>:"
    '\n{ "arg1": "value1", "arg2": "value2" }'
    "\nfunctions.<function_name>:"
    '\n{ "arg1": "value1", "arg2": "value2" }'
    "{% endif %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% if message.role == 'user' %}"
    "{{ message.content }}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% if message.role == 'assistant' %}"
    "{% if message.content and message.content | length > 0 %}"
    "{% if tool_calls %}"
    "message:\n"
    "{% endif %}"
    "{{ message.content }}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% if 'tool_calls' in message %}"
    "{% for tool_call in message.tool_calls %}"
    "functions.{{ tool_call.function.name }}:\n"
    "{{ tool_call.function.arguments }}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@register_chat_completion_handler("chatml-function-calling")
def chatml_function_calling(llama, messages: Messages, functions=None, function_call=None, tools=None,
                            tool_choice=None, temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                            min_p: float = 0.05, typical_p: float = 1.0, stream: bool = False, stop=None,
                            response_format=None, max_tokens: Optional[int] = None, presence_penalty: float = 0.0,
                            frequency_penalty: float = 0.0, repeat_penalty: float = 1.1, tfs_z: float = 1.0,
                            mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                            model: Optional[str] = None, logits_processor=None, grammar=None,
                            logprobs: Optional[bool] = None, top_logprobs: Optional[int] = None,
                            **kwargs: Any) -> ChatOrChunks:
    """Tools for any model: the model first picks "message:" or "functions.<name>:" under a
    grammar, then writes the message, or each call's arguments under its schema's grammar."""
    render = ImmutableSandboxedEnvironment(autoescape=jinja2.select_autoescape(["html", "xml"]),
                                           undefined=jinja2.StrictUndefined).from_string(_FUNCTION_CALLING_TEMPLATE)
    tools, tool_choice = _tools_and_choice(functions, function_call, tools, tool_choice)
    stop = [stop, "<|im_end|>"] if isinstance(stop, str) else (list(stop) if stop else []) + ["<|im_end|>"]
    common = dict(top_p=top_p, top_k=top_k, min_p=min_p, typical_p=typical_p, presence_penalty=presence_penalty,
                  frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty, tfs_z=tfs_z,
                  mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, model=model,
                  logits_processor=logits_processor)
    n_logprobs = top_logprobs if logprobs else None

    if tool_choice is None or tool_choice == "none" or not tools:  # a plain message
        prompt = render.render(messages=messages, tools=[], tool_calls=None, add_generation_prompt=True)
        grammar = _grammar_for_response_format(response_format, llama.verbose) or grammar
        return _convert_completion_to_chat(llama.create_completion(
            prompt=prompt, temperature=temperature, stream=stream, stop=stop, max_tokens=max_tokens,
            grammar=grammar, logprobs=n_logprobs, **common), stream=stream)

    prompt = render.render(messages=messages, tools=tools, tool_calls=True, add_generation_prompt=True)
    if isinstance(tool_choice, dict):  # the caller named the tool
        tool = _find_tool(tools, tool_choice["function"]["name"])
        name = tool["function"]["name"]
        out = llama.create_completion(
            prompt=prompt + f"functions.{name}:\n", temperature=temperature, stream=stream, stop=stop,
            max_tokens=max_tokens, grammar=_grammar_for_schema(tool["function"]["parameters"], llama.verbose),
            **common)
        return _convert_completion_to_chat_function(name, out, stream)

    if tool_choice != "auto":
        raise ValueError(f"tool_choice={tool_choice!r}: expected 'none', 'auto' or a named function")
    names = " | ".join(f'"functions.{t["function"]["name"]}:"' for t in tools)
    first = llama_grammar.LlamaGrammar.from_string(f'root ::= functions | "message:"\nfunctions ::= {names}\n',
                                                  verbose=llama.verbose)
    follow_up = llama_grammar.LlamaGrammar.from_string(f'root ::= functions | "<|im_end|>"\nfunctions ::= {names}\n',
                                                      verbose=llama.verbose)
    choice = llama.create_completion(prompt=prompt, temperature=0, stream=False, stop=[":"], max_tokens=None,
                                     grammar=first, **common)
    text = choice["choices"][0]["text"]
    if "message" in text:
        return _convert_completion_to_chat(llama.create_completion(
            prompt=prompt + "message:\n", temperature=temperature, stream=stream, stop=["<|im_end|>"],
            logprobs=n_logprobs, max_tokens=None, grammar=follow_up, **common), stream=stream)
    if stream:
        raise ValueError("tool_choice='auto' with stream=True: streaming automatic tool calls is not supported")

    calls: list[tuple[str, T.CreateCompletionResponse]] = []
    tool = next((t for t in tools if t["function"]["name"] == text[len("functions."):]), None)
    while tool is not None:
        name = tool["function"]["name"]
        prompt += f"functions.{name}:\n"
        call = llama.create_completion(prompt=prompt, temperature=temperature, stream=False, stop=stop,
                                       max_tokens=None, grammar=_grammar_for_schema(tool["function"]["parameters"],
                                                                                    llama.verbose), **common)
        calls.append((name, call))
        prompt += call["choices"][0]["text"] + "\n"
        response = llama.create_completion(prompt=prompt, temperature=temperature, stream=False, stop=stop,
                                           max_tokens=None, grammar=follow_up, **common)
        next_name = response["choices"][0]["text"][len("functions."):]
        tool = next((t for t in tools if t["function"]["name"] == next_name), None)
    if not calls:
        raise ValueError(f"the model chose {text!r}, which names no tool")

    first_name, first_call = calls[0]
    message: dict[str, Any] = {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": f"call__{i}_{name}_{call['id']}", "type": "function",
                        "function": {"name": name, "arguments": call["choices"][0]["text"]}}
                       for i, (name, call) in enumerate(calls)]}
    if len(calls) == 1:
        message["function_call"] = {"name": first_name, "arguments": first_call["choices"][0]["text"]}
    return {
        "id": "chat" + choice["id"], "object": "chat.completion", "created": choice["created"],
        "model": choice["model"],
        "choices": [{"finish_reason": "tool_calls", "index": 0,
                     "logprobs": _convert_text_completion_logprobs_to_chat(choice["choices"][0]["logprobs"]),
                     "message": message}],
        "usage": {key: sum(call["usage"][key] for _, call in calls)
                  for key in ("completion_tokens", "prompt_tokens", "total_tokens")},
    }
