"""Schemathesis hooks for tests/test_server_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

Four refusals a JSON schema cannot state: a prompt longer than the context in
tokens (it depends on the tokenizer and the template, not on the JSON shape); a
model's own chat template (Jinja) rejecting a conversation shape (no user message,
a system message that is not first..., in chat messages, Responses input items or
Anthropic messages); a `grammar` that is not valid GBNF (a language, not a JSON
shape); and an Anthropic tool_choice naming a tool the request does not offer.
Those 400s name the context, the template, the grammar or the tool and are
dropped; every other failure stands.  Errors come in OpenAI's shape, or in
Anthropic's on /v1/messages (no param or code: the message starts with the field).
"""

from __future__ import annotations

import json

import schemathesis


def _one_ast_parse_at_a_time() -> None:
    """Hypothesis describes each filter lambda by parsing its module's source (in a per-thread cache);
    two workers parsing at once hit a CPython 3.11 race in the ast module (SystemError: AST constructor
    recursion depth mismatch).  In this fuzzing process only, ast.parse takes turns."""
    import ast
    import threading

    parse, lock = ast.parse, threading.Lock()

    def parse_alone(*args, **kwargs):
        with lock:
            return parse(*args, **kwargs)

    ast.parse = parse_alone


_one_ast_parse_at_a_time()


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    if response.status_code != 400:
        return True
    try:
        error = json.loads(response.content)["error"]
        message = error["message"]
    except (ValueError, KeyError, TypeError):
        return True
    param = error.get("param") or message.partition(":")[0]
    if param == "grammar" or error.get("code") == "context_length_exceeded" or "exceed context window" in message:
        return False
    path = case.operation.path
    return not ((path.endswith(("/chat/completions", "/v1/messages", "/v1/messages/count_tokens", "/apply-template"))
                 and message.startswith("messages: the chat template cannot render"))
                or (path.endswith("/responses") and message.startswith("input: the chat template cannot render"))
                or (path.startswith("/v1/messages") and message.startswith("tool_choice: no tool named")))
