"""Run code under stock llama-cpp-python 0.3.36, and the same code under pyllama-ssm.

Stock is the pure-Python llama_cpp package of the pinned sdist (tools/stock.py
extracts it into pyllama_ssm/_stock/, its tests into build/stock/tests/, on first
use) loading our pristine build through its LLAMA_CPP_LIB_PATH=build/upstream/lib.  Each run is a fresh subprocess (one
libllama per process), so the same driver code can run on both sides:

    from parity.stock import run_ours, run_stock      # tests/ is on sys.path (conftest)

    DRIVER = '''
    import json, sys, llama_cpp
    llm = llama_cpp.Llama(sys.argv[1], n_ctx=256, flash_attn=False, batch_invariant=False, verbose=False)
    print(json.dumps(llm.create_completion("Hello", max_tokens=8, temperature=0)))
    '''
    stock = json.loads(run_stock(DRIVER, str(path)))
    ours = json.loads(run_ours(DRIVER, str(path), build="upstream"))

run_stock(code, *args, timeout=600) -> stdout of `python -c code *args` where
`import llama_cpp` is stock; the calling test is skipped (with the reason) when
the upstream build or the pinned sdist is missing.

run_ours(code, *args, build="patched", timeout=600) -> the same with
pyllama_ssm.install_as_llama_cpp() done first, so `import llama_cpp` is
pyllama-ssm; build picks PYLLAMA_SSM_BUILD ("upstream" runs both sides on the
same library, "patched" adds our patch series).

stock_env() -> the environment of run_stock, for callers that start their own
process (a stock llama_cpp.server, for instance).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_with_build

STOCK = ROOT / "pyllama_ssm" / "_stock"  # holds llama_cpp/: the Python path root of stock
STOCK_TESTS = ROOT / "build" / "stock" / "tests"
LIB_DIR = ROOT / "build" / "upstream" / "lib"


@functools.cache
def _extract() -> str | None:
    """Run tools/stock.py once per process; the reason it failed, or None."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "stock.py")], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    return None if proc.returncode == 0 else proc.stderr.strip()[-500:]


def stock_env() -> dict[str, str]:
    """PYTHONPATH and LLAMA_CPP_LIB_PATH for stock llama_cpp (extracted on first use)."""
    if not (LIB_DIR / "libllama.so").exists():
        pytest.skip(f"stock llama-cpp-python needs the upstream build ({LIB_DIR}/libllama.so): run `make build`")
    if (why := _extract()) is not None:
        pytest.skip(f"stock llama-cpp-python unavailable: {why}")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(STOCK), os.environ.get("PYTHONPATH", "")]),
            "LLAMA_CPP_LIB_PATH": str(LIB_DIR)}


def run_stock(code: str, *args: str, timeout: float = 600) -> str:
    """stdout of `code` run with stock llama_cpp; AssertionError with its stderr if it fails."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=stock_env(),
                          timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"stock llama-cpp-python subprocess failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def run_ours(code: str, *args: str, build: str = "patched", timeout: float = 600) -> str:
    """stdout of `code` run with pyllama-ssm installed as llama_cpp, on the given build."""
    prelude = "import pyllama_ssm; pyllama_ssm.install_as_llama_cpp()\n"
    return run_with_build(build, prelude + code, *args, timeout=timeout)
