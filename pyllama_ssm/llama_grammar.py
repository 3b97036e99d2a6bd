"""GBNF grammars for constrained sampling, as llama_cpp.llama_grammar offers them.

A LlamaGrammar holds GBNF text; completions hand it to llama.cpp's grammar
sampler (llama_sampler_init_grammar).  from_string() parses it once up front so
a bad grammar fails where it is written, not in the middle of a request.

JSON Schema -> GBNF: upstream llama.cpp keeps only a C++ converter (in
libllama-common, without a C API); its Python port ships in the pinned
llama-cpp-python sdist as llama_cpp/llama_grammar.py.  tools/stock.py puts that
package into pyllama_ssm/_stock/ (`make build` in a checkout, `pip install` in
the wheel) and the converter is loaded from there at first use, so our grammars
are exactly stock's.  The named grammars (JSON_GBNF, LIST_GBNF, ...) are
llama.cpp's grammars/ directory, copied to pyllama_ssm/_stock/grammars/.

grammar_for_response_format (ours, not stock's) turns an OpenAI response_format
into its grammar, for the chat formats and the server's Responses route alike.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

from . import _runtime
from .bindings import ffi, lib
from .llama_types import ChatCompletionRequestResponseFormat

LLAMA_GRAMMAR_DEFAULT_ROOT = "root"

_STOCK = Path(__file__).resolve().parent / "_stock"
GRAMMARS_DIR = _STOCK / "grammars"
STOCK_GRAMMAR_PY = _STOCK / "llama_cpp" / "llama_grammar.py"
_MISSING = "run `python tools/stock.py` (part of `make build`) in the checkout; an installed wheel has it"


class LlamaGrammar:
    """A GBNF grammar whose start symbol is `root`."""

    def __init__(self, *, _grammar: str):
        self._grammar = _grammar
        self._root = LLAMA_GRAMMAR_DEFAULT_ROOT

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True) -> "LlamaGrammar":  # noqa: ARG003 - stock signature
        if not isinstance(grammar, str):
            raise TypeError(f"grammar: expected GBNF text (str), got {type(grammar).__name__}")
        if not grammar.strip():
            raise ValueError("grammar: empty GBNF text")
        # token references (<name>, <[id]>) need a vocabulary: those grammars are
        # checked by the completion that uses them (Llama.create_completion)
        if "<" not in grammar:
            check(grammar)
        return cls(_grammar=grammar)

    @classmethod
    def from_file(cls, file: str | os.PathLike, verbose: bool = True) -> "LlamaGrammar":
        try:
            text = Path(file).read_text()
        except OSError as e:
            raise ValueError(f"grammar file {file}: cannot read it ({e.strerror})") from e
        if not text.strip():
            raise ValueError(f"grammar file {file}: empty")
        return cls.from_string(text, verbose=verbose)

    @classmethod
    def from_json_schema(cls, json_schema: str, verbose: bool = True) -> "LlamaGrammar":
        return cls.from_string(json_schema_to_gbnf(json_schema), verbose=verbose)

    def __repr__(self) -> str:
        return f"<LlamaGrammar {len(self._grammar)} chars>"


def check(grammar: str, vocab=ffi.NULL) -> None:
    """Parse `grammar` with llama.cpp's parser; ValueError if it rejects it.

    llama.cpp prints the parser's reason on stderr (not through its log), so the
    message here can only point there.
    """
    _runtime.init()
    _runtime.clear_errors()
    sampler = lib.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), LLAMA_GRAMMAR_DEFAULT_ROOT.encode())
    if sampler == ffi.NULL:
        why = _runtime.take_errors() or "see llama.cpp's message on stderr"
        head = grammar.strip().splitlines()[0][:80]
        raise ValueError(f"grammar: llama.cpp cannot parse it ({why}); it begins {head!r}")
    lib.llama_sampler_free(sampler)


def json_schema_to_gbnf(schema: str, prop_order: list[str] | None = None) -> str:
    """GBNF for a JSON Schema given as JSON text, built by the pinned converter."""
    try:
        parsed = json.loads(schema)
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"json_schema: not valid JSON ({e})") from e
    conv = _converter()
    converter = conv.SchemaConverter(prop_order={name: i for i, name in enumerate(prop_order or [])},
                                     allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        converter.visit(converter.resolve_refs(parsed, "stdin"), "")
    except (KeyError, TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"json_schema: cannot be turned into a grammar ({type(e).__name__}: {e})") from e
    return converter.format_grammar()



# -- the grammar a request's response_format asks for (chat formats, the server's Responses route) ------
def grammar_for_schema(schema: Any, verbose: bool = False) -> LlamaGrammar:
    """The schema's grammar, or any JSON when the converter cannot handle the schema (as stock does)."""
    try:
        return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=verbose)
    except ValueError:
        return LlamaGrammar.from_string(_named_grammar("json"), verbose=verbose)


def grammar_for_response_format(response_format: Optional[ChatCompletionRequestResponseFormat],
                                verbose: bool = False) -> Optional[LlamaGrammar]:
    """The grammar an OpenAI response_format asks for: None for none or "text", any JSON for "json_object"
    (its "schema" when given), the schema's for "json_schema"; ValueError for anything else."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        if "schema" in response_format:
            return grammar_for_schema(response_format["schema"], verbose)
        return LlamaGrammar.from_string(_named_grammar("json"), verbose=verbose)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ValueError('response_format: type "json_schema" needs {"json_schema": {"schema": {...}}}')
        return LlamaGrammar.from_json_schema(json.dumps(spec["schema"]), verbose=verbose)
    if kind == "text":
        return None
    raise ValueError(f"response_format type {kind!r}: expected 'text', 'json_object' or 'json_schema'")

@functools.cache
def _converter() -> ModuleType:
    if not STOCK_GRAMMAR_PY.exists():
        raise RuntimeError(f"the JSON-schema converter is missing ({STOCK_GRAMMAR_PY}): {_MISSING}")
    spec = importlib.util.spec_from_file_location("pyllama_ssm._stock_llama_grammar", STOCK_GRAMMAR_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _named_grammar(name: str) -> str:
    path = GRAMMARS_DIR / f"{name}.gbnf"
    if not path.exists():
        raise RuntimeError(f"{path} is missing: {_MISSING}")
    return path.read_text()


def __getattr__(name: str) -> str:
    """JSON_GBNF, LIST_GBNF, ... : llama.cpp's grammars (pyllama_ssm/_stock/grammars/), by file name."""
    if name.endswith("_GBNF"):
        return _named_grammar(name.removesuffix("_GBNF").lower())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
