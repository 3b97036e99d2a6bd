"""The server's boundary with the runtime (issue #27 item 6): no private import, no Llama private in
pyllama_ssm/server (public accessors: Llama.fim_tokens, infill_tokens, context_params; schemas'
StrictBody, ignored_field).
"""

from __future__ import annotations

import ast

from conftest import ROOT

SERVER = ROOT / "pyllama_ssm" / "server"


def _server_modules():
    return [(path.name, ast.parse(path.read_text())) for path in sorted(SERVER.glob("*.py"))]


def test_the_server_imports_no_private_name_and_reads_no_llama_private():
    for name, tree in _server_modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{name}: imports {private} from {node.module}"
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                # its own objects' privates are its business; the Llama's are not
                assert not (isinstance(owner, ast.Name) and owner.id == "llama"), f"{name}: llama.{node.attr}"
                assert not (isinstance(owner, ast.Attribute) and owner.attr == "llama"), \
                    f"{name}: ….llama.{node.attr}"
