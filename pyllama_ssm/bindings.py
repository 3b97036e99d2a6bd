"""The low-level layer: `ffi` and `lib` with llama.h names.

The counterpart of llama-cpp-python's `llama_cpp.llama_cpp`, but compiled by
cffi in API mode against the header of the library it loads, so the C compiler
has checked every struct and signature.

Two extensions exist, one per build (tools/build_ffi.py).  The patched one is
the default; PYLLAMA_SSM_BUILD=upstream loads the pristine upstream library
through the same Python code, which is how parity tests compare the two.  Only
one libllama can live in a process, so the choice is made once, at import.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping

from .errors import BuildMissingError

# ggml's CPU backend runs on OpenMP. Spinning worker threads (the default wait
# policy) collapse by 100x when another process shares the cores, which is the
# normal case on a shared host or beside a Python server thread; sleeping
# workers cost microseconds per graph. Set before libgomp loads; export
# OMP_WAIT_POLICY=active to choose otherwise on dedicated cores.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

BUILDS = ("patched", "upstream")
BUILD = os.environ.get("PYLLAMA_SSM_BUILD", "patched")
if BUILD not in BUILDS:
    raise ValueError(f"PYLLAMA_SSM_BUILD={BUILD!r}: expected one of {', '.join(BUILDS)}")

try:
    _ext = importlib.import_module(f"._llama_{BUILD}", __package__)
except ImportError as e:  # the extension is built by `make build`
    raise BuildMissingError(
        f"the {BUILD} bindings are not built ({e}); run `make build` in the pyllama-ssm checkout") from e

ffi = _ext.ffi
lib = _ext.lib


def has(name: str) -> bool:
    """Whether the loaded library declares `name` (patched-only APIs are absent upstream)."""
    return hasattr(lib, name)


def set_fields(struct, values: Mapping[str, object], what: str) -> None:
    """Set fields of a cffi struct (llama_*_params) by name; a bad name or value names itself."""
    for name, value in values.items():
        try:
            setattr(struct, name, value)
        except AttributeError:
            raise ValueError(f"{what}: no field {name!r} in this build of llama.cpp") from None
        except (TypeError, OverflowError) as e:
            raise ValueError(f"{what}.{name} = {value!r}: {e}") from None


__all__ = ["BUILD", "ffi", "lib", "has", "set_fields"]
