"""chatml-function-calling: tools for any model, as llama_cpp.llama_chat_format offers them.

The model first picks "message:" or "functions.<name>:" under a grammar, then
writes the message, or each call's arguments under its schema's grammar, in a
ChatML prompt that lists the tools.  Registered as "chatml-function-calling"
when llama_chat_format loads it.
"""

from __future__ import annotations

from typing import Any, Optional

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import llama_grammar
from . import llama_types as T
from .chat_convert import (ChatOrChunks, convert_completion_to_chat, convert_completion_to_chat_function,
                           convert_text_completion_logprobs_to_chat, find_tool, tools_and_choice)
from .chat_handlers import Messages, register_chat_completion_handler
from .llama_grammar import grammar_for_response_format, grammar_for_schema


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
    tools, tool_choice = tools_and_choice(functions, function_call, tools, tool_choice)
    stop = [stop, "<|im_end|>"] if isinstance(stop, str) else (list(stop) if stop else []) + ["<|im_end|>"]
    common = dict(top_p=top_p, top_k=top_k, min_p=min_p, typical_p=typical_p, presence_penalty=presence_penalty,
                  frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty, tfs_z=tfs_z,
                  mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, model=model,
                  logits_processor=logits_processor)
    n_logprobs = top_logprobs if logprobs else None

    if tool_choice is None or tool_choice == "none" or not tools:  # a plain message
        prompt = render.render(messages=messages, tools=[], tool_calls=None, add_generation_prompt=True)
        grammar = grammar_for_response_format(response_format, llama.verbose) or grammar
        return convert_completion_to_chat(llama.create_completion(
            prompt=prompt, temperature=temperature, stream=stream, stop=stop, max_tokens=max_tokens,
            grammar=grammar, logprobs=n_logprobs, **common), stream=stream)

    prompt = render.render(messages=messages, tools=tools, tool_calls=True, add_generation_prompt=True)
    if isinstance(tool_choice, dict):  # the caller named the tool
        tool = find_tool(tools, tool_choice["function"]["name"])
        name = tool["function"]["name"]
        out = llama.create_completion(
            prompt=prompt + f"functions.{name}:\n", temperature=temperature, stream=stream, stop=stop,
            max_tokens=max_tokens, grammar=grammar_for_schema(tool["function"]["parameters"], llama.verbose),
            **common)
        return convert_completion_to_chat_function(name, out, stream)

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
        return convert_completion_to_chat(llama.create_completion(
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
                                       max_tokens=None, grammar=grammar_for_schema(tool["function"]["parameters"],
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
                     "logprobs": convert_text_completion_logprobs_to_chat(choice["choices"][0]["logprobs"]),
                     "message": message}],
        "usage": {key: sum(call["usage"][key] for _, call in calls)
                  for key in ("completion_tokens", "prompt_tokens", "total_tokens")},
    }

