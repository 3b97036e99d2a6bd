"""The wheel for any x86-64 (`make wheel-portable`): one package, the best CPU variant picked at run time.

Built as llama.cpp's own releases are (`-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON`):
ggml's CPU backend is compiled once per x86-64 instruction-set level (x64, sse42, sandybridge, haswell,
skylakex, icelake, cooperlake, zen4, alderlake, sapphirerapids, ...) into modules beside libggml, and
pyllama_ssm._runtime has ggml load the one that scores best on this CPU.  Here: the wheel installs in a
fresh venv, loads the variant this CPU's flags call for, and a lower variant forced with
PYLLAMA_SSM_CPU_VARIANT gives the same greedy tokens on real weights.

That build compiles the CPU backend a dozen times (about 6 minutes on 2 cores), more than a cold CI run
can spend beside the rest, so the tests run where `make wheel-portable` has put it in the build cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT, cpu_flags
from test_wheel import _env, pip_wheel  # the venv and pip helpers of the wheel tests

DISPATCH_ARGS = "-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"  # as in the Makefile
SMOLLM2 = ROOT / "build" / "models" / "smollm2-135m-instruct-q4_1.gguf"


def dispatch_artifact():
    import build
    saved = os.environ.get("CMAKE_ARGS")
    os.environ["CMAKE_ARGS"] = DISPATCH_ARGS
    try:
        return build.Builder(False, 1).artifact("patched")
    finally:
        if saved is None:
            del os.environ["CMAKE_ARGS"]
        else:
            os.environ["CMAKE_ARGS"] = saved


def expected_variant(flags: set[str]) -> str:
    """The variant ggml's scores pick for these /proc/cpuinfo flags (ggml/src/CMakeLists.txt's list)."""
    if {"amx_tile", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512vbmi"} <= flags:
        return "sapphirerapids"
    if {"avx512f", "avx512_vnni", "avx512_bf16", "avx512vbmi"} <= flags:
        return "zen4"
    if {"avx512f", "avx512_vnni", "avx512_bf16"} <= flags:
        return "cooperlake"
    if {"avx512f", "avx512_vnni", "avx512vbmi"} <= flags:
        return "icelake"
    if {"avx512f", "avx512_vnni"} <= flags:
        return "cascadelake"
    if {"avx512f", "avx512vbmi"} <= flags:
        return "cannonlake"
    if "avx512f" in flags:
        return "skylakex"
    if "avx_vnni" in flags:
        return "alderlake"
    return "haswell" if "avx2" in flags else "sse42"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if not (dispatch_artifact() / "BUILD_KEY").exists():
        pytest.skip("the dispatching build is not in the build cache: `make wheel-portable` first "
                    "(it compiles ggml's CPU backend once per x86-64 variant, about 6 minutes on 2 cores)")
    sdist_dir, dist = tmp_path_factory.mktemp("sdist"), tmp_path_factory.mktemp("dist")
    code = "import sys; sys.path.insert(0, 'tools'); import pep517_backend as b; print(b.build_sdist(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(sdist_dir)], capture_output=True, text=True, cwd=ROOT,
                          env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = pip_wheel(sdist_dir / proc.stdout.split()[-1], dist, CMAKE_ARGS=DISPATCH_ARGS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "building patched llama.cpp" not in proc.stdout + proc.stderr, "the wheel rebuilt libllama"
    (whl,) = dist.glob("*.whl")
    return whl


@pytest.fixture(scope="module")
def python(wheel, tmp_path_factory):
    where = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, env=_env(), timeout=300)
    py = where / "bin" / "python"
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True,
                          env=_env(), timeout=1200, cwd=where)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return py


def test_wheel_holds_a_cpu_module_per_variant(wheel):
    libs = {n.rsplit("/", 1)[-1] for n in zipfile.ZipFile(wheel).namelist() if n.startswith("pyllama_ssm/_lib/")}
    variants = {n[len("libggml-cpu-"):-3] for n in libs if n.startswith("libggml-cpu-")}
    assert {"x64", "haswell", "skylakex", "icelake", "sapphirerapids"} <= variants, sorted(libs)
    assert "libggml-cpu.so.0" not in libs  # no CPU backend linked in: chosen at run time


# Which CPU module ggml loaded (its log), and SmolLM2's greedy tokens on ggml's plain kernels.
RUN = """
import json, logging, sys
loaded = []
class Keep(logging.Handler):
    def emit(self, r):
        if "loaded CPU backend from" in r.getMessage(): loaded.append(r.getMessage().rsplit("/", 1)[-1].strip())
log = logging.getLogger("pyllama_ssm.llama"); log.addHandler(Keep()); log.setLevel(logging.DEBUG)
import pyllama_ssm as ps
with ps.Model(sys.argv[1], overrides={"use_extra_bufts": False}) as m, ps.Context(m, n_ctx=256) as ctx:
    toks, out, margins = m.tokenize("The capital of France is a city called"), [], []
    logits = ctx.decode_tokens(toks, seq_id=0)
    # a fixed continuation, so both runs score the same positions
    for i, t in enumerate(m.tokenize(" Paris, on the river Seine, which is famous for", add_special=False)[:10]):
        top = sorted(float(x) for x in logits)[-2:]
        out.append(int(logits.argmax()))
        margins.append(top[1] - top[0])
        logits = ctx.decode_tokens([t], seq_id=0, pos0=len(toks) + i)
from pyllama_ssm import _runtime
print(json.dumps({"loaded": loaded, "backends": _runtime.backend_names(), "tokens": out, "margins": margins}))
"""


def run_variant(python, variant: str | None) -> dict:
    if not SMOLLM2.exists():
        pytest.skip("SmolLM2 missing: run `make models`")
    env = {"PYLLAMA_SSM_CPU_VARIANT": variant} if variant else {}
    proc = subprocess.run([str(python), "-c", RUN, str(SMOLLM2)], capture_output=True, text=True,
                          env=_env(**env), cwd=python.parent.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_variant_this_cpu_supports_loads(python, capsys):
    got = run_variant(python, None)
    want = expected_variant(cpu_flags())
    with capsys.disabled():
        print(f"\n  dispatching wheel: loaded {got['loaded']}, backends {got['backends']} (expected {want})")
    assert got["loaded"] == [f"libggml-cpu-{want}.so"]
    assert "CPU" in got["backends"]


def test_a_lower_variant_gives_the_same_tokens(python):
    """AVX2 and this CPU's best variant sum in other vector widths: the same greedy token at every
    position of a fixed text, unless the two likeliest are within 0.5 logits (a near-tie either may take:
    SmolLM2 Q4_1 here, AVX512 vs AVX2: 1 of 8 free-running tokens parted, at such a tie)."""
    best, avx2 = run_variant(python, None), run_variant(python, "haswell")
    assert avx2["loaded"] == ["libggml-cpu-haswell.so"]
    parted = [i for i, (a, b) in enumerate(zip(best["tokens"], avx2["tokens"])) if a != b]
    assert all(best["margins"][i] < 0.5 for i in parted), (parted, best["margins"])
    assert len(parted) <= 1, parted


def test_an_unknown_variant_is_named(python):
    code = "import pyllama_ssm as ps, sys\ntry:\n    ps.Model(sys.argv[1])\nexcept ValueError as e:\n    print(e)"
    out = subprocess.run([str(python), "-c", code, str(SMOLLM2)], capture_output=True, text=True,
                         env=_env(PYLLAMA_SSM_CPU_VARIANT="pentium"), cwd=python.parent.parent, timeout=300)
    assert "PYLLAMA_SSM_CPU_VARIANT='pentium'" in out.stdout and "haswell" in out.stdout, out.stdout + out.stderr


def test_auditwheel_rates_it(wheel):
    proc = subprocess.run([sys.executable, "-m", "auditwheel", "show", str(wheel)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "linux_x86_64" in proc.stdout or "manylinux" in proc.stdout

