"""The server as a child process on a free loopback port (tests, the soak bench, embedding applications)."""

from __future__ import annotations

import os
import re
import signal
import site
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

_LISTENING = re.compile(r"Uvicorn running on https?://[^:]+:(\d+)")
# The child imports the pyllama_ssm this process runs: from a checkout, through PYTHONPATH; an
# installed one it finds itself (site-packages on PYTHONPATH would go before the standard library).
_IMPORT_ROOT = Path(__file__).resolve().parents[2]
_INSTALLED = str(_IMPORT_ROOT) in {os.path.realpath(p) for p in [*site.getsitepackages(), site.getusersitepackages()]}


class ServerProcess:
    """`python -m pyllama_ssm.server ARGS --port 0`, waited for until it listens; stop() sends SIGTERM.

    module="llama_cpp.server" runs stock llama-cpp-python's server the same way (give it its env).
    """

    def __init__(self, *args: str, timeout: float = 60.0, env: dict[str, str] | None = None,
                 module: str = "pyllama_ssm.server"):
        env = {**os.environ, **(env or {})}
        if not _INSTALLED:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(_IMPORT_ROOT)) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args, "--host", "127.0.0.1", "--port", "0"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.log: deque[str] = deque(maxlen=400)
        self._port: int | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._ready.wait(timeout) or self._port is None:
            self.stop()
            raise RuntimeError(f"server did not start within {timeout}s (exit code {self.proc.poll()}):\n"
                               + self.output())
        self.url = f"http://127.0.0.1:{self._port}"

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            if self._port is None and (m := _LISTENING.search(line)):
                self._port = int(m.group(1))
                self._ready.set()
        self._ready.set()  # exited before listening

    def output(self) -> str:
        return "".join(self.log)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server and wait for it to exit; its exit code (negative: the signal that ended it)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"server did not exit within {timeout}s of signal {sig}:\n{self.output()}")
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
