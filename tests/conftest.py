"""Shared fixtures: the repo paths and the generated model zoo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
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


def zoo_model(name: str):
    """A tiny zoo model, loaded once per test process (models are read-only)."""
    if name not in _loaded:
        import pyllama_ssm
        _loaded[name] = pyllama_ssm.Model(zoo_path(name))
    return _loaded[name]


def run_with_build(build: str, code: str, *args: str, timeout: float = 600, env: dict | None = None) -> str:
    """Run python code in a subprocess with PYLLAMA_SSM_BUILD=build (and env); returns stdout.

    One process holds one libllama, so comparing the builds needs two processes.
    """
    env = {**os.environ, "PYLLAMA_SSM_BUILD": build,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"{build} subprocess failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


@pytest.fixture(scope="session", autouse=True)
def _close_zoo_models():
    yield
    for model in _loaded.values():
        model.close()
    _loaded.clear()
