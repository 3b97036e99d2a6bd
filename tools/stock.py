"""Stock llama-cpp-python 0.3.36, pure Python, over our pristine library.

    python tools/stock.py            # -> build/stock/llama_cpp/, build/stock/tests/
    python tools/stock.py examples/server  # -> build/stock/examples/server/ (the batched example server)

Extracts only the llama_cpp/ package and its tests/ (no vendor/ tree, nothing
to compile) from the pinned sdist that tools/vendor.py downloads and verifies,
once (vendor.extract's stamp).  Stock code then loads a prebuilt libllama
through its LLAMA_CPP_LIB_PATH variable (the directory holding libllama.so),
which tests point at build/upstream/lib.  Two users:

- parity tests (tests/parity/stock.py runs code under it in a subprocess, and
  runs llama-cpp-python's own tests against pyllama-ssm);
- pyllama_ssm.llama_grammar, which loads the JSON-schema converter from
  build/stock/llama_cpp/llama_grammar.py (upstream llama.cpp dropped its Python
  version of that converter);
- bench/chat_sessions.py, which runs the sdist's batched example server
  (examples/server/server.py, extracted on demand) against ours.
"""

from __future__ import annotations

import sys

import vendor

DEST = vendor.ROOT / "build" / "stock"
PARTS = ("llama_cpp", "tests")
LIB_DIR = vendor.ROOT / "build" / "upstream" / "lib"


def main() -> int:
    try:
        pin = vendor.read_lock()
        archive = vendor.download(pin, vendor.cache_root())
        for part in sys.argv[1:] or PARTS:
            vendor.extract(archive, {**pin, "subdir": part}, DEST / part)
    except vendor.VendorError as e:
        print(f"stock: error: {e}", file=sys.stderr)
        return 1
    print(f"stock: {pin['package']} {pin['version']} (pure Python) in {DEST.relative_to(vendor.ROOT)}; "
          f"run it with LLAMA_CPP_LIB_PATH={LIB_DIR.relative_to(vendor.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
