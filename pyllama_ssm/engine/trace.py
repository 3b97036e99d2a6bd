"""A timeline of the Engine's work, for finding where a request's time goes (issue #28).

PYLLAMA_SSM_TRACE=<file> makes every Engine append one JSON object per line there: a request's
arrival (submit), its start in a sequence (with the prefix-cache hit), every step (what it fed, and
how long llama_decode took), its first token and its end; each Engine's events follow an
"open" event.  Times are seconds on one monotonic clock
(time.perf_counter).  Off, it costs one attribute test per event.  bench/trace_summary.py reads it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, TextIO


class Trace:
    def __init__(self, path: str | None):
        self._file: TextIO | None = open(path, "a", buffering=1) if path else None  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()  # submit runs on callers' threads, the rest on the engine's
        self.event("open", pid=os.getpid())  # request ids restart in each process: runs part here

    @classmethod
    def from_env(cls) -> "Trace":
        return cls(os.environ.get("PYLLAMA_SSM_TRACE") or None)

    @property
    def on(self) -> bool:
        return self._file is not None

    def event(self, kind: str, **fields: Any) -> None:
        if self._file is None:
            return
        line = json.dumps({"ev": kind, "t": round(time.perf_counter(), 6), **fields})
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
