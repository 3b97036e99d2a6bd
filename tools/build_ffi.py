"""Compile the cffi API-mode extensions over the two builds of libllama.

    python tools/build_ffi.py            # after tools/build.py

One extension per build, each compiled against that build's own llama.h, so
the C compiler checks every struct layout and function signature the Python
side uses:

    pyllama_ssm/_llama_patched.*.so   -> build/patched/lib
    pyllama_ssm/_llama_upstream.*.so  -> build/upstream/lib

A key file next to each extension skips the compile when neither the library
build nor the generator changed.  The wheel (tools/pep517_backend.py) compiles
the patched one the same way, finding its libraries through $ORIGIN/_lib.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import cffi

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_cdef  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "pyllama_ssm"
FLAVOURS = ("patched", "upstream")
# ggml-rpc: the RPC backend's entry points (ggml_backend_rpc_add_server); tools/build.py builds it
LIBRARIES = ("llama", "ggml", "ggml-base", "ggml-rpc")

# Callbacks the Python layer hands to the library (cffi "extern Python").
CALLBACKS = """
extern "Python" {
    void _pyllama_log(enum ggml_log_level level, const char * text, void * user_data);
    void _pyllama_set_tensor_data(struct ggml_tensor * tensor, void * user_data);
}
"""


def key_for(flavour: str) -> str:
    h = hashlib.sha256()
    h.update((ROOT / "build" / flavour / "BUILD_KEY").read_bytes())
    for src in (Path(gen_cdef.__file__), Path(__file__)):
        h.update(src.read_bytes())
    return h.hexdigest()


def compile_extension(flavour: str, incdir: Path, libdir: Path, outdir: Path, rpath: str) -> tuple[Path, str]:
    """outdir/pyllama_ssm/_llama_<flavour><EXT_SUFFIX> over the headers and libraries given, which
    the loader finds at run time through `rpath`; (its path, the cdef).  The compiler is called
    directly, not through distutils, whose flags carry the interpreter's own -g and -rpath."""
    name = f"_llama_{flavour}"
    cdef = gen_cdef.generate([incdir])
    ffi = cffi.FFI()
    ffi.cdef(cdef + CALLBACKS)
    ffi.set_source(f"pyllama_ssm.{name}",
                   "".join(f'#include "{h}"\n' for h in [*gen_cdef.headers([incdir]), "gguf.h", "ggml-backend.h"]))
    so = outdir / "pyllama_ssm" / (name + sysconfig.get_config_var("EXT_SUFFIX"))
    so.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ffi.emit_c_code(str(Path(tmp) / f"{name}.c"))
        cmd = [*shlex.split(os.environ.get("CC") or "cc"), "-shared", "-fPIC", "-O1", "-g0", "-DNDEBUG",
               "-Wno-deprecated-declarations", f"-ffile-prefix-map={incdir}=include",
               f"-I{sysconfig.get_paths()['include']}", f"-I{incdir}", f"{name}.c",
               f"-L{libdir}", *(f"-l{lib}" for lib in LIBRARIES), f"-Wl,-rpath,{rpath}", "-o", so.name]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[-300:])
            raise RuntimeError(f"compiling the cffi extension {name} failed: {first}")
        os.replace(Path(tmp) / so.name, so)
    return so, cdef


def build(flavour: str) -> Path:
    name = f"_llama_{flavour}"
    stamp = PKG / f"{name}.key"
    key = key_for(flavour)
    existing = list(PKG.glob(f"{name}.*.so"))
    if existing and stamp.exists() and stamp.read_text().strip() == key:
        return existing[0]
    for old in existing:
        old.unlink()
    libdir = ROOT / "build" / flavour / "lib"
    so, cdef = compile_extension(flavour, ROOT / "build" / flavour / "include", libdir, ROOT, str(libdir))
    (PKG / f"_cdef_{flavour}.h").write_text(cdef)  # kept for reading, ignored by git
    stamp.write_text(key + "\n")
    print(f"build_ffi: {so.relative_to(ROOT)}")
    return so


def main() -> int:
    for flavour in FLAVOURS:
        build(flavour)
    return 0


if __name__ == "__main__":
    sys.exit(main())
