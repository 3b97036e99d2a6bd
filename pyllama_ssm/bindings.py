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

# ggml's CPU backend runs on OpenMP (libgomp): its threads meet at a barrier after
# every op, about a thousand times per decode step. Sleeping at once at each one
# (OMP_WAIT_POLICY=passive) pays a wake-up per op, and spinning without bound
# (libgomp's default or active) starves a descheduled thread when another process
# shares the cores. So workers spin 1000 times, then sleep. On a 2-core VM
# (bench/openmp_wait.py): alone, 2.2-3.9x passive's tokens/s at 1 sequence and
# 1.5x at 16, near active; two processes at once, 0.5-0.95x passive's, where
# active falls to 0.01-0.2x. Set before libgomp loads; a user's own
# OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "1000"}
if not any(name in os.environ for name in OPENMP_DEFAULTS):
    os.environ.update(OPENMP_DEFAULTS)

BUILDS = ("patched", "upstream")
BUILD = os.environ.get("PYLLAMA_SSM_BUILD", "patched")
if BUILD not in BUILDS:
    raise ValueError(f"PYLLAMA_SSM_BUILD={BUILD!r}: expected one of {', '.join(BUILDS)}")

try:
    _ext = importlib.import_module(f"._llama_{BUILD}", __package__)
except ImportError as e:  # built by `make build` in a checkout; a wheel holds the patched one
    how = ("the pristine upstream build is a development tool: run `make build` in a pyllama-ssm checkout"
           if BUILD == "upstream" else "run `make build` in a pyllama-ssm checkout, or `pip install` it")
    raise BuildMissingError(f"the {BUILD} bindings are not built or cannot load ({e}); {how}") from e

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


__all__ = ["BUILD", "OPENMP_DEFAULTS", "ffi", "lib", "has", "set_fields"]
