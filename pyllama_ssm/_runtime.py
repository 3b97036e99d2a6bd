"""Process-wide llama.cpp setup: backend init once, logs routed to `logging`.

llama.cpp reports why a load or a context creation failed only through its
log; the last error lines are kept so exceptions can quote them.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from pathlib import Path

from .bindings import ffi, lib
from .errors import BuildMissingError

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
        load_backend_modules()
        _initialized = True


def library_dir() -> Path:
    """The directory this process loaded libggml-base from (the build's lib/, or a wheel's _lib/)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split(maxsplit=5)[-1].strip()
            if "/libggml-base.so" in path:
                return Path(path).parent
    raise BuildMissingError("libggml-base is not loaded in this process")


def load_backend_modules() -> None:
    """A build with GGML_BACKEND_DL (the wheel that runs on any x86-64) links no backend: its modules
    lie beside libggml, one CPU variant per instruction set (libggml-cpu-haswell.so, ...-skylakex.so,
    ...-sapphirerapids.so), and ggml loads the one that scores best on this CPU, as llama.cpp's tools do.
    PYLLAMA_SSM_CPU_VARIANT=NAME loads that CPU variant instead (and no other backend)."""
    if lib.ggml_backend_dev_count() > 0:  # backends linked in: the native build
        return
    where = library_dir()
    variant = os.environ.get("PYLLAMA_SSM_CPU_VARIANT")
    if variant:
        module = where / f"libggml-cpu-{variant}.so"
        if not module.exists():
            known = sorted(p.name[len("libggml-cpu-"):-3] for p in where.glob("libggml-cpu-*.so"))
            raise ValueError(f"PYLLAMA_SSM_CPU_VARIANT={variant!r}: no {module.name} in {where} "
                             f"(variants: {', '.join(known) or 'none'})")
        if lib.ggml_backend_load(str(module).encode()) == ffi.NULL:
            raise BuildMissingError(f"PYLLAMA_SSM_CPU_VARIANT={variant!r}: {module.name} does not run on this CPU")
    else:
        lib.ggml_backend_load_all_from_path(str(where).encode())
    if lib.ggml_backend_dev_count() == 0:
        raise BuildMissingError(f"no ggml backend loads from {where}: the build has no CPU variant this CPU runs")


def backend_names() -> list[str]:
    """The registered ggml backends (e.g. ["CPU", "RPC"]); a dispatching build's CPU variant logs its name."""
    return [ffi.string(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i))).decode()
            for i in range(lib.ggml_backend_reg_count())]


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
