"""pyllama-ssm: serve many sequences of state-space and hybrid models from one memory pool."""

from .batch import Batch
from .bindings import BUILD, ffi, lib
from .context import Context
from .errors import (ContextError, DecodeError, EngineError, MemoryFullError, ModelLoadError, PoolExhaustedError,
                     PyllamaError, SnapshotError, StateError, TokenError)
from .memory import MemoryReport
from .model import Model

__version__ = "0.1.0"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the llama-cpp-python API that pyllama_ssm.Llama reproduces

# The drop-in layer (and with it the Engine, chat formats, jinja2) loads on first use: `import
# pyllama_ssm` costs the core bindings only.
_LAZY = {"Llama": ".llama", "LlamaGrammar": ".llama_grammar"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def install_as_llama_cpp():
    """Make `import llama_cpp` resolve to pyllama-ssm for code written for llama-cpp-python, as
    pymysql.install_as_MySQLdb() does: stock llama-cpp-python 0.3.36's whole package over our
    library, with pyllama_ssm.Llama as llama_cpp.Llama (pyllama_ssm/as_llama_cpp.py).  Call it
    before that code imports llama_cpp; returns the llama_cpp package."""
    from . import as_llama_cpp
    return as_llama_cpp.install()


__all__ = [
    "BUILD", "Batch", "Context", "ContextError", "DecodeError", "EngineError", "Llama", "LlamaGrammar", "MemoryFullError",
    "MemoryReport", "Model", "ModelLoadError", "PoolExhaustedError", "PyllamaError", "SnapshotError", "StateError",
    "TokenError", "ffi", "install_as_llama_cpp", "lib",
]
