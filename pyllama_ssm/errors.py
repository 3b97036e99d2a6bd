"""Exceptions: each names the input at fault and the reason."""

from __future__ import annotations


class PyllamaError(Exception):
    """Base class of every error pyllama-ssm raises on purpose."""


class BuildMissingError(PyllamaError, ImportError):
    """The compiled bindings or libraries are missing."""


class ModelLoadError(PyllamaError, ValueError):
    """A model file could not be loaded (missing, not GGUF, corrupt, unsupported)."""


class ContextError(PyllamaError, ValueError):
    """A context could not be created with the requested parameters."""


class DecodeError(PyllamaError, RuntimeError):
    """llama_decode failed; the message carries its return code and meaning."""


class EngineError(PyllamaError, RuntimeError):
    """The Engine's thread stopped on an unexpected exception (its __cause__): every waiting and later
    request fails with this error instead of waiting."""


class MemoryFullError(DecodeError):
    """The memory (KV cells or recurrent slots) cannot hold the request."""


class PoolExhaustedError(MemoryFullError):
    """The shared recurrent pool has no free cell for a snapshot or restore."""


class SnapshotError(PyllamaError, ValueError):
    """A snapshot request that cannot be served (no state yet, bad handle, unsupported memory)."""


class TokenError(PyllamaError, ValueError):
    """A token id outside the vocabulary, or text that cannot be tokenized."""


class StateError(PyllamaError, ValueError):
    """A saved state that cannot be restored into this context."""


class RpcError(PyllamaError, ConnectionError):
    """An RPC server (rpc_servers) that cannot be reached or does not speak ggml's RPC protocol."""
