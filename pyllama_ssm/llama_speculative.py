"""Draft models for speculative decoding: stock llama-cpp-python's llama_speculative, as it is.

LlamaDraftModel and LlamaPromptLookupDecoding are the pinned sdist's own module
(pyllama_ssm/_stock/llama_cpp/llama_speculative.py, plain numpy), loaded from there
so that `pyllama_ssm.Llama(draft_model=LlamaPromptLookupDecoding())` needs no
install_as_llama_cpp(); under it, llama_cpp.llama_speculative is the same file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parent / "_stock" / "llama_cpp" / "llama_speculative.py"
if not _PATH.exists():
    raise ImportError(f"{_PATH} is missing: run `make build` in a checkout, or reinstall pyllama-ssm")
_spec = importlib.util.spec_from_file_location("pyllama_ssm._stock_llama_speculative", _PATH)
_stock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_stock)

LlamaDraftModel = _stock.LlamaDraftModel
LlamaPromptLookupDecoding = _stock.LlamaPromptLookupDecoding

__all__ = ["LlamaDraftModel", "LlamaPromptLookupDecoding"]
