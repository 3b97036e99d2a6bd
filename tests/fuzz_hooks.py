"""Schemathesis hooks for tests/test_server_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

Three refusals a JSON schema cannot state: a prompt longer than the context in
tokens (it depends on the tokenizer and the template, not on the JSON shape); a
model's own chat template (Jinja) rejecting a conversation shape (no user message,
a system message that is not first..., in chat messages or Responses input
items); and a `grammar` that is not valid GBNF (a language, not a JSON shape).
Those 400s name the context, the template or the grammar and are dropped; every
other failure stands.
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
    except (ValueError, KeyError, TypeError):
        return True
    if error["param"] == "grammar" or error["code"] == "context_length_exceeded":
        return False
    return not ((case.operation.path.endswith("/chat/completions")
                 and error["message"].startswith("messages: the chat template cannot render"))
                or (case.operation.path.endswith("/responses")
                    and error["message"].startswith("input: the chat template cannot render")))
