"""Shared fixtures: the repo paths and the generated model zoo."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


LLAMA_SERVER = ROOT / "build" / "upstream" / "bin" / "llama-server"


@contextlib.contextmanager
def llama_server(model: str, *args: str):
    """The pin's llama-server on model with args (the test skips when it is not built): its URL, once /health
    answers; stopped after."""
    import httpx
    if not LLAMA_SERVER.exists():
        pytest.skip("the pin's llama-server is not built (make build)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: its log must never block it
    proc = subprocess.Popen([str(LLAMA_SERVER), "-m", model, "--host", "127.0.0.1", "--port", str(port), "--no-webui",
                             *args], stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"llama-server did not start:\n{log.read()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
# PYLLAMA_SSM_TEST_INSTALLED=1 (tools/gpu_wheel_check.sh): test the pyllama_ssm installed in this
# interpreter, not the checkout's: the checkout stays off sys.path and off the children's
# PYTHONPATH, children run outside it, and the pristine build (a checkout tool) is absent.
INSTALLED = os.environ.get("PYLLAMA_SSM_TEST_INSTALLED") == "1"
CHILD_CWD = Path(tempfile.gettempdir()) if INSTALLED else ROOT
if not INSTALLED:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests" / "models"))

ZOO = ROOT / "build" / "models"


def zoo_index() -> dict:
    index = ZOO / "index.json"
    if not index.exists():
        pytest.skip("model zoo missing: run `make models`")
    return json.loads(index.read_text())


def zoo_path(name: str, size: str = "tiny") -> Path:
    entry = zoo_index()["models"].get(f"{name}-{size}")
    if entry is None:
        pytest.skip(f"model {name}-{size} is not in the zoo")
    return ZOO / entry["file"]


def zoo_names(kind: str = "all") -> list[str]:
    """Tiny zoo model names for parametrize: "all", "stateful" (recurrent or hybrid) or "hybrid".

    Empty when the zoo is missing: the tests then collect nothing, and the zoo tests say why.
    """
    index = ZOO / "index.json"
    if not index.exists():
        return []
    models = json.loads(index.read_text())["models"]
    keep = {"all": lambda m: True, "stateful": lambda m: m.get("recurrent") or m.get("hybrid"),
            "hybrid": lambda m: m.get("hybrid")}[kind]
    return sorted(k.removesuffix("-tiny") for k, m in models.items() if k.endswith("-tiny") and keep(m))


_loaded: dict[str, object] = {}


def loaded_model(path):
    """A model loaded once per test process (models are read-only), closed at the session's end."""
    key = str(path)
    if key not in _loaded:
        import pyllama_ssm
        _loaded[key] = pyllama_ssm.Model(path)
    return _loaded[key]


def zoo_model(name: str):
    """A tiny zoo model, loaded once per test process."""
    return loaded_model(zoo_path(name))


def child_env(build: str, **extra: str) -> dict[str, str]:
    """The environment of a child process running pyllama_ssm on `build` (see INSTALLED)."""
    if INSTALLED and build != "patched":
        pytest.skip(f"the {build} build is a checkout tool (`make build`); an installed wheel has the patched one")
    path = [] if INSTALLED else [str(ROOT)]
    return {**os.environ, "PYLLAMA_SSM_BUILD": build,
            "PYTHONPATH": os.pathsep.join([*path, os.environ.get("PYTHONPATH", "")]), **extra}


def run_with_build(build: str, code: str, *args: str, timeout: float = 600, env: dict | None = None) -> str:
    """Run python code in a subprocess with PYLLAMA_SSM_BUILD=build (and env); returns stdout.

    One process holds one libllama, so comparing the builds needs two processes.
    """
    # -X faulthandler: a crash in the library prints the Python stack, not nothing
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code, *args], capture_output=True, text=True,
                          env=child_env(build, **(env or {})), timeout=timeout, cwd=CHILD_CWD)
    if proc.returncode != 0:
        raise AssertionError(f"{build} subprocess failed (exit status {proc.returncode}):\n{proc.stderr[-3000:]}"
                             f"\nits stdout ends:\n{proc.stdout[-1000:]}")
    return proc.stdout


@pytest.fixture(scope="session", autouse=True)
def _close_zoo_models():
    yield
    for model in _loaded.values():
        model.close()
    _loaded.clear()


CPU_FLAGS_SHOWN = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                   "amx_tile", "amx_int8", "amx_bf16")


def cpu_flags() -> set[str]:
    """The x86 feature flags /proc/cpuinfo lists for this CPU (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


# ggml's AMX kernels run here (AMX tile and int8 instructions): test_cpu_kernels and test_grafts ask
AMX = {"amx_tile", "amx_int8"} <= cpu_flags()


def pytest_report_header(config):
    """Which CPU the suite ran on and which ggml CPU kernels it used: a pass says where it holds."""
    import platform
    model = next((ln.partition(":")[2].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    flags = cpu_flags()
    lines = [f"cpu: {model}; {os.cpu_count()} cores; "
             f"features: {' '.join(f for f in CPU_FLAGS_SHOWN if f in flags) or 'none of ' + ','.join(CPU_FLAGS_SHOWN)}"]
    try:
        from pyllama_ssm import bindings
        from pyllama_ssm._runtime import init
        init()
        info = bindings.ffi.string(bindings.lib.llama_print_system_info()).decode()
        lines.append(f"ggml ({bindings.BUILD} build): {' '.join(info.split())}")
    except Exception as e:  # noqa: BLE001 - a header must not stop the session; the tests say why
        lines.append(f"ggml: not loaded ({e})")
    pristine = ROOT / "build" / "upstream" / "CPU_FLAGS"
    if pristine.exists():
        lines.append(f"pristine build's ggml-cpu: {pristine.read_text().strip()} (upstream's AMX path faults here)")
    return lines
