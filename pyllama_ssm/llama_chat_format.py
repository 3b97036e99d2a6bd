"""Chat formats: how create_chat_completion turns messages into a prompt.

The names and behaviour are llama_cpp.llama_chat_format's: a registry of chat
completion handlers by name (the named formats below and
"chatml-function-calling"), Jinja2ChatFormatter for the HF-style templates that
GGUF files carry (a Llama registers its model's as "chat_template.default"),
and guess_chat_format_from_gguf_metadata.  A handler renders the prompt, turns
response_format and a forced tool choice into a grammar, calls
llama.create_completion and reshapes the result as a chat completion.

This module holds the named formats and re-exports the rest, by concern:
chat_handlers (the registry, a formatter made a handler), chat_templates (Jinja
and HF templates, the format guess), chat_convert (completion -> chat
completion), chat_function_calling ("chatml-function-calling") and
llama_grammar.grammar_for_response_format.  Importing it registers every format.

Why ours and not stock's: stock's module loads its ctypes layer and the rest of its package as the
top-level `llama_cpp` (`import llama_cpp.llama_cpp`), so it exists only under install_as_llama_cpp()
(as_llama_cpp.py).  There `llama_cpp.llama_chat_format` is stock's own, multimodal handlers included;
our Llama takes its handlers and finds the formats registered there (get_chat_completion_handler).
Without it, pyllama_ssm.Llama renders the same prompts (tests/parity: every template of the pin).
"""

from __future__ import annotations

from typing import Any, Optional

from .chat_convert import (ChatOrChunks, CompletionOrChunks, convert_completion_to_chat,
                           convert_completion_to_chat_function, convert_text_completion_chunks_to_chat,
                           convert_text_completion_logprobs_to_chat, convert_text_completion_to_chat)
from .chat_function_calling import chatml_function_calling
from .chat_handlers import (ChatFormatter, ChatFormatterResponse, LlamaChatCompletionHandler,
                            LlamaChatCompletionHandlerNotFoundException, LlamaChatCompletionHandlerRegistry, Messages,
                            chat_formatter_to_chat_completion_handler, get_chat_completion_handler,
                            register_chat_completion_handler, register_chat_format)
from .chat_templates import (CHATML_BOS_TOKEN, CHATML_CHAT_TEMPLATE, CHATML_EOS_TOKEN, LLAMA3_INSTRUCT_CHAT_TEMPLATE,
                             MISTRAL_INSTRUCT_BOS_TOKEN, MISTRAL_INSTRUCT_CHAT_TEMPLATE, MISTRAL_INSTRUCT_EOS_TOKEN,
                             MIXTRAL_INSTRUCT_CHAT_TEMPLATE, TEMPLATE_REFUSED, Jinja2ChatFormatter,
                             guess_chat_format_from_gguf_metadata, hf_tokenizer_config_to_chat_completion_handler,
                             hf_tokenizer_config_to_chat_formatter)
from .llama_grammar import grammar_for_response_format

# stock's private helpers under stock's names, for code written against stock's module
_convert_text_completion_logprobs_to_chat = convert_text_completion_logprobs_to_chat
_convert_text_completion_to_chat = convert_text_completion_to_chat
_convert_text_completion_chunks_to_chat = convert_text_completion_chunks_to_chat
_convert_completion_to_chat = convert_completion_to_chat
_convert_completion_to_chat_function = convert_completion_to_chat_function
_grammar_for_response_format = grammar_for_response_format

__all__ = [
    "CHATML_BOS_TOKEN", "CHATML_CHAT_TEMPLATE", "CHATML_EOS_TOKEN", "ChatFormatter", "ChatFormatterResponse",
    "ChatOrChunks", "CompletionOrChunks", "Jinja2ChatFormatter", "LLAMA3_INSTRUCT_CHAT_TEMPLATE",
    "LlamaChatCompletionHandler", "LlamaChatCompletionHandlerNotFoundException", "LlamaChatCompletionHandlerRegistry",
    "MISTRAL_INSTRUCT_BOS_TOKEN", "MISTRAL_INSTRUCT_CHAT_TEMPLATE", "MISTRAL_INSTRUCT_EOS_TOKEN",
    "MIXTRAL_INSTRUCT_CHAT_TEMPLATE", "Messages", "TEMPLATE_REFUSED", "chat_formatter_to_chat_completion_handler",
    "chatml_function_calling", "format_alpaca", "format_chatml", "format_gemma", "format_llama2", "format_llama3",
    "format_mistral_instruct", "format_phi3", "format_qwen", "format_vicuna", "format_zephyr",
    "get_chat_completion_handler", "guess_chat_format_from_gguf_metadata",
    "hf_tokenizer_config_to_chat_completion_handler", "hf_tokenizer_config_to_chat_formatter",
    "register_chat_completion_handler", "register_chat_format",
]


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

