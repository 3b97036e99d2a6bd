"""Compile the cffi API-mode extensions over the two builds of libllama.

    python tools/build_ffi.py            # after tools/build.py

One extension per build, each compiled against that build's own llama.h, so
the C compiler checks every struct layout and function signature the Python
side uses:

    pyllama_ssm/_llama_patched.*.so   -> build/patched/lib
    pyllama_ssm/_llama_upstream.*.so  -> build/upstream/lib

A key file next to each extension skips the compile when neither the library
build nor the generator changed.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import cffi

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_cdef  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "pyllama_ssm"
FLAVOURS = ("patched", "upstream")

# Callbacks the Python layer hands to the library (cffi "extern Python").
CALLBACKS = """
extern "Python" {
    void _pyllama_log(enum ggml_log_level level, const char * text, void * user_data);
    bool _pyllama_progress(float progress, void * user_data);
    bool _pyllama_abort(void * user_data);
    void _pyllama_set_tensor_data(struct ggml_tensor * tensor, void * user_data);
}
"""


def key_for(flavour: str) -> str:
    h = hashlib.sha256()
    h.update((ROOT / "build" / flavour / "BUILD_KEY").read_bytes())
    for src in (Path(gen_cdef.__file__), Path(__file__)):
        h.update(src.read_bytes())
    return h.hexdigest()


def build(flavour: str) -> Path:
    libdir = ROOT / "build" / flavour / "lib"
    incdir = ROOT / "build" / flavour / "include"
    name = f"_llama_{flavour}"
    stamp = PKG / f"{name}.key"
    key = key_for(flavour)
    existing = list(PKG.glob(f"{name}.*.so"))
    if existing and stamp.exists() and stamp.read_text().strip() == key:
        return existing[0]
    cdef = gen_cdef.generate([incdir])
    (PKG / f"_cdef_{flavour}.h").write_text(cdef)  # kept for reading, ignored by git
    ffi = cffi.FFI()
    ffi.cdef(cdef + CALLBACKS)
    ffi.set_source(
        f"pyllama_ssm.{name}",
        "".join(f'#include "{h}"\n' for h in [*gen_cdef.headers([incdir]), "gguf.h", "ggml-backend.h"]),
        include_dirs=[str(incdir)],
        library_dirs=[str(libdir)],
        # ggml-rpc: the RPC backend's entry points (ggml_backend_rpc_add_server); tools/build.py builds it
        libraries=["llama", "ggml", "ggml-base", "ggml-rpc"],
        extra_link_args=[f"-Wl,-rpath,{libdir}"],
        extra_compile_args=["-O1", "-Wno-deprecated-declarations"],
    )
    for old in existing:
        old.unlink()
    so = Path(ffi.compile(tmpdir=str(ROOT), verbose=False))
    stamp.write_text(key + "\n")
    print(f"build_ffi: {so.relative_to(ROOT)}")
    return so


def main() -> int:
    for flavour in FLAVOURS:
        build(flavour)
    return 0


if __name__ == "__main__":
    sys.exit(main())
