"""The PEP 517 backend of `pip install .`: our native build, then setuptools packages it.

pyproject.toml names this module (backend-path = tools).  build_wheel first
runs what `make build` runs for the patched library, through the same code:

1. the pin: tools/vendor.py takes the llama-cpp-python sdist from the cache
   ($PYLLAMA_SSM_CACHE/sdist) or downloads it with pip, checks its sha256 and
   extracts vendor/llama.cpp;
2. libllama + ggml with patches/series: tools/build.py's Builder, so the build
   cache (artifacts keyed by pin + CMake options + series, one shared object
   tree) is the one `make build` fills: CMAKE_ARGS passes through into the key,
   and a repeated install with the same inputs compiles nothing;
3. the cffi extension over it (tools/build_ffi.py), its RUNPATH $ORIGIN/_lib;
   it is cached too, by the library build and the generator;
4. tools/stock.py's pieces of the pinned sdist (pyllama_ssm/_stock/).

Everything goes into a staging tree (build/wheel-stage/) that setup.py copies
into the wheel; setuptools writes the metadata, the sdist and editable installs
(which stay the `make build` workflow: they build nothing here).  A failed step
stops pip with one line naming the cause; compiler output goes to a log file.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import (build_editable, build_sdist, get_requires_for_build_editable,  # noqa: F401
                                   get_requires_for_build_sdist, prepare_metadata_for_build_editable,
                                   prepare_metadata_for_build_wheel)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build as native  # noqa: E402 - tools/build.py
import build_ffi  # noqa: E402
import patches  # noqa: E402
import stock  # noqa: E402
import vendor  # noqa: E402

ROOT = vendor.ROOT
STAGE = ROOT / "build" / "wheel-stage"
STAGE_ENV = "PYLLAMA_SSM_WHEEL_STAGE"  # tells setup.py what to package


def get_requires_for_build_wheel(config_settings=None) -> list[str]:
    """setuptools' needs, plus cmake, ninja and pip only where this environment lacks them
    (pip downloads the pin; an isolated build environment has no pip of its own)."""
    extra = [tool for tool in ("cmake", "ninja") if not native.works(tool, "--version")]
    cached = (vendor.cache_root() / "sdist" / vendor.read_lock()["filename"]).exists()
    # a subprocess, as vendor.py runs it: importlib.util.find_spec("pip") would make setuptools'
    # distutils shim step aside for pip (pypa/pip#8761), and setup() then fails
    if not cached and not native.works(sys.executable, "-m", "pip", "--version"):
        extra.append("pip")
    return _setuptools.get_requires_for_build_wheel(config_settings) + extra


def _libraries(libdir: Path, dest: Path) -> list[str]:
    """Copy libllama, the ggml libraries (its backends among them: cpu, rpc, cuda, ...) and libmtmd
    (llama_cpp.mtmd_cpp's, under install_as_llama_cpp()) into dest under their sonames (libX.so.N:
    what the loader looks for; a wheel cannot hold the build tree's symlinks).  The tools' other
    libraries (llama-common, the server's) stay out."""
    present = [p.name for p in libdir.iterdir()]
    names = sorted(n for n in present if re.fullmatch(r"lib(llama|mtmd|ggml[\w.+-]*)\.so\.\d+", n))
    # backends built as modules (GGML_BACKEND_DL: one libggml-cpu-<variant>.so per instruction set, loaded
    # at run time by pyllama_ssm._runtime) carry no soname: kept under their own names
    names += sorted(n for n in present if re.fullmatch(r"libggml-[\w.+-]+\.so", n)
                    and not any(m.startswith(n + ".") for m in present))
    if not any(n.startswith("libllama.so.") for n in names):
        raise native.BuildError(f"no libllama.so.N in {libdir}: the library build is incomplete")
    dest.mkdir(parents=True)
    for name in names:
        shutil.copyfile(libdir / name, dest / name)  # follows the symlink to the real file
    return names


def _extension(artifact: Path, dest: Path) -> Path:
    """The patched cffi extension for this interpreter, from the cache when the library build,
    the generator and the interpreter are those it was compiled for."""
    h = hashlib.sha256((artifact / "BUILD_KEY").read_bytes())
    for part in (Path(build_ffi.__file__).read_bytes(), Path(build_ffi.gen_cdef.__file__).read_bytes(),
                 sysconfig.get_config_var("EXT_SUFFIX").encode(), sysconfig.get_paths()["include"].encode()):
        h.update(part)
    cached = vendor.cache_root() / "ext" / h.hexdigest()[:16]
    found = list((cached / "pyllama_ssm").glob("_llama_patched.*.so"))
    if not found:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build_ffi.compile_extension("patched", artifact / "include", artifact / "lib", tmp, "$ORIGIN/_lib")
        shutil.rmtree(cached, ignore_errors=True)
        tmp.rename(cached)
        found = list((cached / "pyllama_ssm").glob("_llama_patched.*.so"))
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(found[0], dest / found[0].name)
    return dest / found[0].name


def prepare() -> Path:
    """Build what the wheel ships into STAGE (see the module docstring); returns STAGE."""
    cuda = native.cuda_wanted("off")  # CPU unless CMAKE_ARGS asks for CUDA, as llama-cpp-python
    native.preflight(cuda)
    pin = vendor.read_lock()
    # a source tree that already holds the pin's pieces (vendor/llama.cpp and pyllama_ssm/_stock, both
    # stamped with the pin) builds without the sdist: no download, e.g. on a machine without network
    have_stock = (ROOT / "pyllama_ssm" / "_stock" / vendor.STAMP).exists() and \
        (ROOT / "pyllama_ssm" / "_stock" / vendor.STAMP).read_text() == stock.stamp(pin)
    archive = None if have_stock and vendor.is_extracted(pin) else vendor.download(pin, vendor.cache_root())
    if archive is not None:
        vendor.extract(archive, pin)
    jobs = int(os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or os.cpu_count() or 2)
    builder = native.Builder(cuda, jobs, log=vendor.cache_root() / "logs" / f"pip-build-{os.getpid()}.log")
    artifact = builder.build_patched()
    native.step(f"libllama: {artifact.name} ({'CUDA' if cuda else 'CPU'}; CMake options: {' '.join(builder.args)})")
    shutil.rmtree(STAGE, ignore_errors=True)
    pkg = STAGE / "pyllama_ssm"
    _libraries(artifact / "lib", pkg / "_lib")
    _extension(artifact, pkg)
    if archive is None:
        shutil.copytree(ROOT / "pyllama_ssm" / "_stock", pkg / "_stock")
    else:
        stock.populate(archive, pin, pkg / "_stock")
    return STAGE


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None) -> str:
    try:
        os.environ[STAGE_ENV] = str(prepare())
    except (native.BuildError, vendor.VendorError, patches.PatchError, RuntimeError, OSError) as e:
        first, *details = str(e).strip().splitlines() or [type(e).__name__]
        if details:  # pip's own words on a failed download, git's on a patch: kept, out of the way
            log = vendor.cache_root() / "logs" / f"pip-build-{os.getpid()}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(str(e) + "\n")
            first += f" (details: {log})"
        print(f"pyllama-ssm: build failed: {first}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
