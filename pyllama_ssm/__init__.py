"""pyllama-ssm: serve many sequences of state-space and hybrid models from one memory pool."""

from .batch import Batch
from .bindings import BUILD, ffi, lib
from .context import Context
from .errors import (ContextError, DecodeError, MemoryFullError, ModelLoadError, PoolExhaustedError,
                     PyllamaError, SnapshotError, StateError, TokenError)
from .memory import MemoryReport
from .model import Model

__version__ = "0.1.0"

__all__ = [
    "BUILD", "Batch", "Context", "ContextError", "DecodeError", "MemoryFullError", "MemoryReport",
    "Model", "ModelLoadError", "PoolExhaustedError", "PyllamaError", "SnapshotError", "StateError",
    "TokenError", "ffi", "lib",
]
