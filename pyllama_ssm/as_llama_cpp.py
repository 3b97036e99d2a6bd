"""`import llama_cpp` answered by pyllama-ssm: stock llama-cpp-python 0.3.36 over our library.

install() loads the pure-Python package of the pinned llama-cpp-python sdist
(pyllama_ssm/_stock/llama_cpp: shipped in the wheel, never rewritten here)
under the name `llama_cpp`, with two changes:

- its ctypes layers are bound to the libraries pyllama-ssm runs on:
  `llama_cpp.llama_cpp` to the very libllama that pyllama_ssm.bindings loaded
  (the same file, so the dynamic loader hands back the same copy: one library
  per process, one set of globals), `llama_cpp.mtmd_cpp` to the libmtmd built
  beside it.  Their declarations are the pin's by construction, and patch 0002
  keeps llama.h's structs byte-for-byte (tests/test_abi.py);
- `llama_cpp.Llama` (and `llama_cpp.llama.Llama`) is pyllama_ssm.Llama: the
  same API plus `n_parallel`, on the Engine.

Everything else (`_internals`, `_logger`, `llama_speculative`,
`llama_tokenizer`, `llama_chat_format` with its multimodal handlers,
`llama_grammar`, `llama_cache`, `llama_types`, `llama_cpp.server`, ...) is
stock's own code.  `Llama.model`, `Llama.ctx`, `Llama._model.model`,
`Llama._ctx.ctx` are ctypes pointers usable with `llama_cpp.llama_cpp`,
`Llama._batch.batch` is a ctypes llama_batch, and the rest of stock's
`_internals` methods answer on `_model`, `_ctx` and `_batch`
(pyllama_ssm/stock_handles.py).

Programs that cannot call install_as_llama_cpp() themselves run under it with

    python -m pyllama_ssm.as_llama_cpp PROGRAM [ARGS...]      # a script, a console script
    python -m pyllama_ssm.as_llama_cpp -m MODULE [ARGS...]    # like python -m
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import re
import runpy
import shutil
import sys
import types
from pathlib import Path

from .stock_handles import MARK, installed  # noqa: F401 - installed() is asked of this module too

STOCK = Path(__file__).with_name("_stock") / "llama_cpp"


@functools.cache
def loaded_libllama() -> Path:
    """The file of the libllama that pyllama_ssm.bindings loaded (its extension's NEEDED entry,
    found by the dynamic loader on the extension's RUNPATH): the one mapped into this process."""
    from . import bindings  # noqa: F401 - loads it
    mapped = {Path(line.split(maxsplit=5)[5].strip()) for line in Path("/proc/self/maps").read_text().splitlines()
              if re.search(r"/libllama\.so[.\d]*$", line)}
    if len(mapped) != 1:
        raise ImportError(f"expected one libllama in this process, found {sorted(map(str, mapped)) or 'none'}")
    return mapped.pop()


def _load_shared_library(stock_loader, lib_base_name: str, base_path: Path) -> ctypes.CDLL:
    """Stock's loader, pointed at our libraries: libllama is the loaded one, the others (mtmd)
    the build's files beside it (lib/libmtmd.so in a checkout, _lib/libmtmd.so.0 in the wheel)."""
    libllama = loaded_libllama()
    if lib_base_name == "llama":
        return ctypes.CDLL(str(libllama))
    beside = sorted(libllama.parent.glob(f"lib{lib_base_name}.so*"), key=lambda p: len(p.name))
    if beside:
        return ctypes.CDLL(str(beside[0]))
    return stock_loader(lib_base_name, libllama.parent)  # stock's FileNotFoundError, naming our directory


def install() -> types.ModuleType:
    """Make `llama_cpp` stock's package over our library with our Llama (see the module docstring);
    returns the package.  Idempotent; refuses when another llama_cpp is imported already."""
    present = sys.modules.get("llama_cpp")
    if present is not None:
        if getattr(present, MARK, False):
            return present
        raise ImportError(f"llama_cpp is already imported (from {getattr(present, '__file__', present)!r}): "
                          "call pyllama_ssm.install_as_llama_cpp() before anything imports llama_cpp")
    if not (STOCK / "__init__.py").exists():
        raise ImportError(f"stock llama-cpp-python's package is missing ({STOCK}): run `make build` in a "
                          "checkout, or reinstall pyllama-ssm")
    from . import _runtime
    from . import llama as ours
    spec = importlib.util.spec_from_file_location("llama_cpp", STOCK / "__init__.py",
                                                  submodule_search_locations=[str(STOCK)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["llama_cpp"] = package
    try:
        loader_module = importlib.import_module("llama_cpp._ctypes_extensions")
        loader_module.load_shared_library = functools.partial(_load_shared_library,
                                                               loader_module.load_shared_library)
        spec.loader.exec_module(package)  # stock's __init__: llama_cpp.llama_cpp, then llama_cpp.llama
    except BaseException:
        for name in [n for n in sys.modules if n == "llama_cpp" or n.startswith("llama_cpp.")]:
            del sys.modules[name]
        raise
    package.Llama = package.llama.Llama = ours.Llama
    setattr(package, MARK, True)
    _runtime.route_logs()  # stock's _logger took llama.cpp's log callback; errors must reach our exceptions
    return package


def main(argv: list[str] | None = None) -> int:
    """python -m pyllama_ssm.as_llama_cpp PROGRAM|-m MODULE [ARGS...]: run it with llama_cpp = pyllama-ssm."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or (argv[0] == "-m" and len(argv) < 2):
        print(__doc__.split("\n\n")[-1].rstrip(), file=sys.stderr)
        return 2
    install()
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return 0
    program = argv[0] if Path(argv[0]).exists() else shutil.which(argv[0])
    if program is None:
        print(f"pyllama_ssm.as_llama_cpp: {argv[0]}: no such file or program on PATH", file=sys.stderr)
        return 2
    sys.argv = [program, *argv[1:]]
    sys.path.insert(0, str(Path(program).resolve().parent))
    runpy.run_path(program, run_name="__main__")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
