"""The wheel, as a user installs it: built by pip from our sdist, installed in a fresh venv.

`pip wheel --no-build-isolation` builds it from the sdist (so the sdist is complete), reusing
the libraries `make build` just put in the cache: it compiles nothing but, at most, the cffi
extension.  The wheel is checked as a file (platform tag, contents, RUNPATHs, no build-machine
path, `auditwheel show`) and installed with its `server` extra into a venv in a temporary
directory; there, with the checkout off sys.path: import, the drop-in Llama with two concurrent
completions equal to solo runs, grammars, `pyllama-ssm plan` and the console-script server.
Failed builds (no compiler, nvcc missing, a patch that does not apply, no pin and no network)
stop pip with one line naming the cause.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, zoo_path

BUILD = ROOT / "build"
TIMINGS: dict[str, float] = {}  # printed with the wheel's name (pytest -s, or -rP)


def _env(**extra: str) -> dict[str, str]:
    """The environment of pip and of the venv's programs: nothing pointing at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYLLAMA_SSM_BUILD", "VIRTUAL_ENV")}
    return {**env, **extra}


def pip_wheel(source: Path, dest: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                           "-w", str(dest), str(source)], capture_output=True, text=True, env=_env(**env),
                          timeout=1800, cwd=dest)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("sdist")
    code = "import sys; sys.path.insert(0, 'tools'); import pep517_backend as b; print(b.build_sdist(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(dest)], capture_output=True, text=True, cwd=ROOT,
                          env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dest / proc.stdout.split()[-1]


@pytest.fixture(scope="module")
def wheel(sdist, tmp_path_factory) -> Path:
    if not (BUILD / "config.json").exists():
        pytest.skip("run `make build` first: the wheel reuses its cached libraries")
    dist = tmp_path_factory.mktemp("dist")
    env = {}
    if json.loads((BUILD / "config.json").read_text())["cuda"]:  # the options `make build` used
        env["CMAKE_ARGS"] = f"{os.environ.get('CMAKE_ARGS', '')} -DGGML_CUDA=on".strip()
    t0 = time.perf_counter()
    proc = pip_wheel(sdist, dist, **env)
    TIMINGS["pip wheel sdist"] = round(time.perf_counter() - t0, 1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the library came from the cache `make build` filled: no compile in CI's wheel step
    assert "building patched llama.cpp" not in proc.stdout + proc.stderr, "the wheel rebuilt libllama"
    (whl,) = dist.glob("*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv (no system site-packages: the checkout's editable install stays out) with
    wheel[server]; its python."""
    where = tmp_path_factory.mktemp("venv")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, env=_env(), timeout=300)
    python = where / "bin" / "python"
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", f"{wheel}[server]"],
                          capture_output=True, text=True, env=_env(), timeout=1200, cwd=where)
    TIMINGS["venv + pip install"] = round(time.perf_counter() - t0, 1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return python


def run_in(python: Path, code: str, *args: str, timeout: float = 600) -> str:
    """stdout of `python -c code args` in the venv, run from its directory."""
    proc = subprocess.run([str(python), "-c", code, *args], capture_output=True, text=True, env=_env(),
                          cwd=python.parent.parent, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


# -- the wheel as a file ------------------------------------------------------------------------

def test_platform_wheel_with_the_library_inside(wheel):
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert wheel.name == f"pyllama_ssm-0.1.0-{tag}-{tag}-{sysconfig.get_platform().replace('-', '_')}.whl"
    names = zipfile.ZipFile(wheel).namelist()
    libs = {Path(n).name for n in names if n.startswith("pyllama_ssm/_lib/")}
    assert {"libllama.so.0", "libggml.so.0", "libggml-base.so.0", "libggml-cpu.so.0", "libggml-rpc.so.0",
            "libmtmd.so.0"} <= libs  # libmtmd: llama_cpp.mtmd_cpp under install_as_llama_cpp()
    assert [n for n in names if re.fullmatch(r"pyllama_ssm/_llama_patched\.cpython-.*\.so", n)]
    assert not [n for n in names if "_llama_upstream" in n or "_cdef_" in n], "only the patched library ships"
    for piece in ("_stock/llama_cpp/__init__.py", "_stock/llama_cpp/llama_grammar.py", "_stock/llama_cpp/server/app.py",
                  "_stock/grammars/json.gbnf", "_stock/llm_arch_names.txt", "_stock/LICENSE.llama.cpp",
                  "server/app.py", "llama.py"):
        assert f"pyllama_ssm/{piece}" in names, piece
    print(f"\nwheel: {wheel.name}, {wheel.stat().st_size / 2**20:.1f} MiB; {TIMINGS}")


def test_no_build_machine_path_and_runpath_within_origin(wheel, tmp_path):
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    import vendor
    zipfile.ZipFile(wheel).extractall(tmp_path)
    needles = {str(ROOT), str(vendor.cache_root()), sys.base_prefix, str(Path.home() / ".cache"), "pip-req-build"}
    elves = 0
    for path in sorted(p for p in tmp_path.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found = [n for n in needles if n.encode() in data]
        assert not found, f"{path.relative_to(tmp_path)} holds the build machine's {found}"
        if not data.startswith(b"\x7fELF"):
            continue
        elves += 1
        with open(path, "rb") as f:
            for section in ELFFile(f).iter_sections():
                if not isinstance(section, DynamicSection):
                    continue
                for tag in section.iter_tags():
                    if tag.entry.d_tag in ("DT_RUNPATH", "DT_RPATH"):
                        paths = (tag.runpath if tag.entry.d_tag == "DT_RUNPATH" else tag.rpath).split(":")
                        assert all(p.startswith("$ORIGIN") for p in paths), f"{path.name}: {tag.entry.d_tag} {paths}"
    assert elves >= 6


def test_auditwheel_policy(wheel):
    """The wheel's manylinux verdict.  The glibc/libstdc++ symbol versions of the build machine set
    the floor (sym_tag); libgomp (OpenMP), outside every manylinux allow-list, keeps the wheel at
    linux_x86_64 (`auditwheel repair` would copy it in); a CUDA wheel needs the CUDA runtime too."""
    proc = subprocess.run([sys.executable, "-m", "auditwheel", "show", "--json", str(wheel)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    verdict = json.loads(proc.stdout)
    assert verdict["pure"] is False and not verdict["unsupported_isa"], verdict
    assert verdict["sym_tag"].startswith("manylinux_2_"), verdict
    external = set(verdict["external_libs"])
    assert external <= {"libgomp.so.1"} | {f"lib{n}.so.{v}" for n in ("cudart", "cublas", "cublasLt") for v in (12, 13)} \
        | {"libcuda.so.1"}, external
    print(f"\nauditwheel: {verdict['overall_tag']} (symbols allow {verdict['sym_tag']}); external: {sorted(external)}")


# -- installed, outside the checkout ------------------------------------------------------------

INSTALLED = """
import json, sys, threading, time
t0 = time.perf_counter()
import pyllama_ssm
t_import = time.perf_counter() - t0
root, model = sys.argv[1], sys.argv[2]
assert not any(p and (p == root or p.startswith(root + "/")) for p in sys.path), sys.path
assert pyllama_ssm.__file__.startswith(sys.prefix), pyllama_ssm.__file__
lazy = [m for m in ("pyllama_ssm.llama", "pyllama_ssm.engine", "jinja2") if m in sys.modules]
from pyllama_ssm import gguf, llama_grammar
assert gguf.ARCH_NAMES and "qwen35" in gguf.ARCH_NAMES and "mamba2" in gguf.ARCH_NAMES
assert "root" in llama_grammar.JSON_GBNF
schema = llama_grammar.LlamaGrammar.from_json_schema('{"type": "object", "properties": {"a": {"type": "integer"}}}')
from pyllama_ssm import Llama
prompts = ["Hello world", "The quick brown fox"]
with Llama(model, n_ctx=512, n_parallel=2, verbose=False) as llm:
    solo = [llm(p, max_tokens=12, temperature=0)["choices"][0]["text"] for p in prompts]
    together = [None, None]
    def run(i):
        together[i] = llm(prompts[i], max_tokens=12, temperature=0)["choices"][0]["text"]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    steps = llm.engine.stats().steps
print(json.dumps({"lazy": lazy, "solo": solo, "together": together, "steps": steps, "import_s": t_import,
                  "grammar": len(schema._grammar)}))
"""


def test_installed_package_runs_outside_the_checkout(venv):
    out = json.loads(run_in(venv, INSTALLED, str(ROOT), str(zoo_path("qwen35"))).splitlines()[-1])
    assert out["lazy"] == [], f"`import pyllama_ssm` loaded {out['lazy']}"
    assert out["together"] == out["solo"] and all(out["solo"]), out
    assert out["steps"] > 0 and out["grammar"] > 0
    print(f"\ninstalled: import pyllama_ssm {out['import_s'] * 1000:.0f} ms; {out['solo']}")


def test_installed_wheel_has_no_upstream_build(venv):
    proc = subprocess.run([str(venv), "-c", "import pyllama_ssm"], capture_output=True, text=True,
                          env=_env(PYLLAMA_SSM_BUILD="upstream"), cwd=venv.parent.parent, timeout=120)
    assert proc.returncode != 0
    assert "BuildMissingError: the upstream bindings are not built" in proc.stderr, proc.stderr[-2000:]
    assert "the pristine upstream build is a development tool" in proc.stderr


INSTALLED_LLAMA_CPP = r"""
import re, sys
import pyllama_ssm
llama_cpp = pyllama_ssm.install_as_llama_cpp()
import llama_cpp.mtmd_cpp, llama_cpp._internals
llm = llama_cpp.Llama(sys.argv[1], n_ctx=128, verbose=False)
n = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))
libs = sorted(set(re.findall(r"\S*/lib(?:llama|mtmd)\.so\S*", open("/proc/self/maps").read())))
print(n == llm.n_vocab(), llama_cpp.mtmd_cpp.mtmd_default_marker().decode(), *libs)
"""


def test_installed_llama_cpp_is_stock_over_the_wheels_library(venv):
    """The wheel's llama_cpp: stock's package from _stock, its ctypes layer on the wheel's own libllama
    (one copy) and libmtmd, nothing from llama-cpp-python itself (not installed)."""
    ok, marker, *libs = run_in(venv, INSTALLED_LLAMA_CPP, str(zoo_path("qwen35"))).split()
    site = venv.parent.parent
    assert ok == "True" and marker == "<__media__>"
    assert [Path(p).name for p in libs] == ["libllama.so.0", "libmtmd.so.0"], libs
    assert all(p.startswith(str(site)) and "/pyllama_ssm/_lib/" in p for p in libs), libs


def test_installed_plan_command(venv):
    proc = subprocess.run([str(venv.parent / "pyllama-ssm"), "plan", str(zoo_path("jamba")), "--ctx", "1024",
                           "--parallel", "4", "--json"], capture_output=True, text=True, env=_env(),
                          cwd=venv.parent.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout), proc.stdout


def test_installed_server_console_script(venv):
    cmd = [str(venv.parent / "pyllama-ssm-server"), "--model", str(zoo_path("qwen35")), "--model_alias", "tiny",
           "--n_ctx", "512", "--host", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
                            cwd=venv.parent.parent)
    log = []
    try:
        deadline = time.monotonic() + 120
        port = None
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            log.append(line)
            if m := re.search(r"Uvicorn running on https?://[^:]+:(\d+)", line):
                port = int(m.group(1))
        assert port, "server did not start:\n" + "".join(log[-40:])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            models = client.get("/v1/models").json()
            assert [m["id"] for m in models["data"]] == ["tiny"], models
            reply = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 6, "temperature": 0})
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert body["usage"]["completion_tokens"] >= 1 and body["choices"][0]["text"], body
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()



# -- failed builds --------------------------------------------------------------------------------

def _break_first_patch(tree: Path, tmp: Path) -> None:
    patch = tree / "patches" / (tree / "patches" / "series").read_text().split()[0]
    head, hunk, body = patch.read_text().partition("\n@@ ")
    context = re.search(r"^ (.*\S.*)$", body, re.M)  # the first context line of the first hunk: the pin holds it
    body = body[:context.start()] + f" {context.group(1)} /* not upstream */" + body[context.end():]
    patch.write_text(head + hunk + body)


def _own_cache(tree: Path, tmp: Path) -> None:
    """A cache of its own holding only the pin, so that a failed configure leaves nothing in the real one."""
    import vendor
    pin = vendor.read_lock()["filename"]
    (tmp / "cache" / "sdist").mkdir(parents=True)
    shutil.copyfile(vendor.cache_root() / "sdist" / pin, tmp / "cache" / "sdist" / pin)


FAILURES = {
    # case: (environment, how the tree or cache is prepared, the cause pip must print)
    "no compiler": ({"CC": "/nonexistent/cc"}, None, "no C compiler found (CC=/nonexistent/cc"),
    "nvcc missing": ({"CMAKE_ARGS": "-DGGML_CUDA=on", "CUDACXX": "/nonexistent/nvcc"}, None,
                     "nvcc is not found (CUDACXX=/nonexistent/nvcc)"),
    "patch does not apply": ({}, _break_first_patch, "does not apply: failing file"),
    "no pin, no network": ({"PYLLAMA_SSM_CACHE": "{tmp}/empty-cache", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""},
                           None, "could not download llama_cpp_python-0.3.36.tar.gz with pip"),
    "compiler fails": ({"CMAKE_ARGS": "-DCMAKE_C_COMPILER=/bin/false", "PYLLAMA_SSM_CACHE": "{tmp}/cache"}, _own_cache,
                       'CMake: The C compiler "/bin/false" is not able to compile a simple test program.'),
}


@pytest.mark.parametrize("case", FAILURES)
def test_a_failed_build_stops_pip_with_one_line(case, sdist, tmp_path):
    env, spoil, cause = FAILURES[case]
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    (tree,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    if spoil:
        spoil(tree, tmp_path)
    proc = pip_wheel(tree, tmp_path, **{k: v.format(tmp=tmp_path) for k, v in env.items()})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    lines = [ln.strip() for ln in out.splitlines() if "pyllama-ssm: build failed:" in ln]
    assert len(lines) == 1 and cause in lines[0], out[-3000:]
    assert not re.search(r"^\s*CMake Error", out, re.M) and "Traceback" not in out, out[-3000:]  # no wall of text
    assert not list(tmp_path.glob("*.whl"))
