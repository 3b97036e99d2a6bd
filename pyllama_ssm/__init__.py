"""pyllama-ssm: serve many sequences of state-space and hybrid models from one memory pool."""

import sys
import types

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


def install_as_llama_cpp() -> None:
    """Make `import llama_cpp` (and its llama, llama_types, llama_chat_format, llama_grammar and
    llama_cache modules) resolve to pyllama-ssm, for code written for llama-cpp-python that cannot
    be edited; as pymysql.install_as_MySQLdb() does.  Call it before that code imports llama_cpp.
    llama_cpp.LLAMA_* / GGML_* constants come from llama.h; the ctypes functions of
    llama_cpp.llama_cpp do not exist here (pyllama_ssm.lib has the same names, through cffi)."""
    from . import llama, llama_cache, llama_chat_format, llama_grammar, llama_types

    package = types.ModuleType("llama_cpp", "pyllama-ssm standing in for llama-cpp-python")
    for module in (llama_types, llama):
        package.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("_")})
    package.__version__ = LLAMA_CPP_PYTHON_VERSION
    package.__path__ = []  # a package: submodules come from sys.modules

    def constant(name: str):
        if name.isupper() and hasattr(lib, name):
            return getattr(lib, name)
        raise AttributeError(f"module 'llama_cpp' (pyllama-ssm) has no attribute {name!r}")

    package.__getattr__ = constant
    sys.modules["llama_cpp"] = package
    for module in (llama, llama_types, llama_chat_format, llama_grammar, llama_cache):
        name = module.__name__.rpartition(".")[2]
        setattr(package, name, module)
        sys.modules[f"llama_cpp.{name}"] = module


__all__ = [
    "BUILD", "Batch", "Context", "ContextError", "DecodeError", "EngineError", "Llama", "LlamaGrammar", "MemoryFullError",
    "MemoryReport", "Model", "ModelLoadError", "PoolExhaustedError", "PyllamaError", "SnapshotError", "StateError",
    "TokenError", "ffi", "install_as_llama_cpp", "lib",
]
