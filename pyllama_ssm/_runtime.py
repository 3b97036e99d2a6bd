"""Process-wide llama.cpp setup: backend init once, logs routed to `logging`.

llama.cpp reports why a load or a context creation failed only through its
log; the last error lines are kept so exceptions can quote them.
"""

from __future__ import annotations

import collections
import logging
import threading

from .bindings import ffi, lib

logger = logging.getLogger("pyllama_ssm.llama")
_LEVELS = {
    lib.GGML_LOG_LEVEL_DEBUG: logging.DEBUG,
    lib.GGML_LOG_LEVEL_INFO: logging.DEBUG,  # upstream INFO is load chatter
    lib.GGML_LOG_LEVEL_WARN: logging.WARNING,
    lib.GGML_LOG_LEVEL_ERROR: logging.ERROR,
}
_pending = threading.local()  # per thread: the level of the line being continued, and recent errors
_lock = threading.Lock()
_initialized = False


@ffi.def_extern()
def _pyllama_log(level, text, user_data):  # noqa: ARG001 - C signature
    msg = ffi.string(text).decode("utf-8", "replace")
    if level == lib.GGML_LOG_LEVEL_CONT:  # continuation of the previous line
        level = getattr(_pending, "level", lib.GGML_LOG_LEVEL_INFO)
    _pending.level = level
    py_level = _LEVELS.get(level, logging.DEBUG)
    if py_level >= logging.WARNING and msg.strip():
        _recent().append(msg.strip())
    if logger.isEnabledFor(py_level):
        logger.log(py_level, "%s", msg.rstrip("\n"))


def init() -> None:
    global _initialized
    with _lock:
        if _initialized:
            return
        route_logs()
        lib.llama_backend_init()
        _initialized = True


def route_logs() -> None:
    """llama.cpp's log to _pyllama_log (again, once stock's llama_cpp._logger has taken it)."""
    lib.llama_log_set(lib._pyllama_log, ffi.NULL)


def _recent() -> collections.deque[str]:
    """This thread's recent llama.cpp warnings and errors: llama.cpp logs on the thread of the call
    that failed, so a model loading in one thread never explains another thread's failure."""
    if not hasattr(_pending, "errors"):
        _pending.errors = collections.deque(maxlen=8)
    return _pending.errors


def take_errors() -> str:
    """The warnings/errors llama.cpp logged on this thread since the last call, joined."""
    msgs = list(_recent())
    _recent().clear()
    return "; ".join(msgs)


def clear_errors() -> None:
    _recent().clear()
