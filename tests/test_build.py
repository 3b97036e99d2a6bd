"""The two builds: pristine and patched libraries, upstream tools, object reuse."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import ROOT

BUILD = ROOT / "build"


@pytest.fixture(scope="module", autouse=True)
def built():
    if not (BUILD / "config.json").exists():
        pytest.skip("run `make build` first")


def exported(lib) -> set[str]:
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True)
    return {ln.split()[-1] for ln in out.stdout.splitlines() if ln.strip()}


@pytest.mark.parametrize("flavour", ["upstream", "patched"])
def test_shared_libraries_and_headers(flavour):
    d = BUILD / flavour
    for name in ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so"):
        assert (d / "lib" / name).exists(), name
    assert (d / "include" / "llama.h").exists()
    assert (d / "BUILD_KEY").read_text().strip() == json.loads((BUILD / "config.json").read_text())[f"{flavour}_key"]


def test_patch_series_is_in_patched_build_only():
    up = exported(BUILD / "upstream" / "lib" / "libllama.so")
    pa = exported(BUILD / "patched" / "lib" / "libllama.so")
    assert "llama_decode" in up and "llama_decode" in pa
    assert "llama_memory_report_get" in pa
    assert "llama_memory_report_get" not in up


@pytest.mark.parametrize("tool", ["llama-server", "ggml-rpc-server"])
def test_upstream_tools_run(tool):
    exe = BUILD / "upstream" / "bin" / tool
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in (out.stdout + out.stderr).lower()


def test_patched_build_reuses_upstream_objects():
    """Only what the series touches recompiles; everything else is the pristine build's object."""
    import patches as series_mod
    import vendor
    # empty when the work tree already held the series' content (e.g. only a patch header changed)
    recompiled = (BUILD / "patched" / "RECOMPILED").read_text().split()
    touched = {f for p in series_mod.series() for f in series_mod.touched_files(p)}
    allowed = ("src/", "ggml/") if any(f.startswith("ggml/") for f in touched) else ("src/",)
    assert all(o.startswith(allowed) for o in recompiled), recompiled
    config = json.loads((BUILD / "config.json").read_text())
    objects = vendor.cache_root() / "work" / config.get("tree_key", config["upstream_key"]) / "obj"
    if objects.is_dir():  # this machine built it (not a copied artifact): most objects were reused
        total = sum(1 for _ in objects.rglob("*.o"))
        assert len(recompiled) < total / 2, f"{len(recompiled)} of {total} objects recompiled"
