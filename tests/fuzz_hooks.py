"""Schemathesis hooks for tests/test_server_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

Two refusals a JSON schema cannot state: a model's own chat template (Jinja)
rejecting a conversation shape (no user message, a system message that is not
first...), and a `grammar` that is not valid GBNF (a language, not a JSON
shape).  Those 400s name the template or the grammar and are dropped; every
other failure stands.
"""

from __future__ import annotations

import json

import schemathesis


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    if response.status_code != 400:
        return True
    try:
        error = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        return True
    if error["param"] == "grammar":
        return False
    return not (case.operation.path.endswith("/chat/completions")
                and error["message"].startswith("messages: the chat template cannot render"))
