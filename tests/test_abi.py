"""The patched library keeps upstream's ABI: every struct that stock llama-cpp-python's ctypes layer
declares (for the pin) has the same size and field offsets in the library pyllama-ssm loads.

Stock passes llama_context_params and friends by value through ctypes: a longer struct in the
library (patch 0002 once appended n_rs_pool to llama_context_params) would be overrun by
llama_context_default_params() and read past by llama_init_from_model.  The series' own settings
travel in its own structs (include/llama-ssm.h).
"""

from __future__ import annotations

import json

import pytest

from conftest import run_with_build
from parity.stock import run_stock
from pyllama_ssm.bindings import ffi

LAYOUTS = """
import ctypes, json, llama_cpp.llama_cpp as ll
out = {}
for name in dir(ll):
    cls = getattr(ll, name)
    if isinstance(cls, type) and issubclass(cls, (ctypes.Structure, ctypes.Union)) and getattr(cls, "_fields_", None):
        fields = {}
        for f in cls._fields_:
            # a named union in ctypes is an anonymous one in C: its first member stands for it
            key = f[1]._fields_[0][0] if issubclass(f[1], ctypes.Union) else f[0]
            fields[key] = getattr(cls, f[0]).offset
        out[name] = [ctypes.sizeof(cls), fields]
print(json.dumps(out))
"""


CFFI_LAYOUTS = """
import json
from pyllama_ssm.bindings import ffi
out = {}
for name in ffi.list_types()[1]:  # every struct the bindings declare
    t = ffi.typeof(f"struct {name}")
    try:
        size = ffi.sizeof(t)  # completes the layout; an opaque struct (llama_model) has none
    except ffi.error:
        continue
    out[name] = [size, {f: ffi.offsetof(t, f) for f, _ in t.fields if f}]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def layouts() -> dict[str, dict]:
    return {"stock": json.loads(run_stock(LAYOUTS)),
            "upstream": json.loads(run_with_build("upstream", CFFI_LAYOUTS)),
            "patched": json.loads(run_with_build("patched", CFFI_LAYOUTS))}


def test_every_upstream_struct_keeps_its_layout_in_the_patched_library(layouts):
    up, pa = layouts["upstream"], layouts["patched"]
    assert len(up) >= 20 and "llama_context_params" in up
    for name, layout in up.items():
        assert pa.get(name) == layout, f"struct {name}: patched {pa.get(name)} != upstream {layout}"


def test_every_struct_stock_declares_has_the_libraries_layout(layouts):
    """Where stock's ctypes declaration matches the pin's header, it matches the patched library;
    where it does not (stock lagging its own pin), that is stock's, and named here."""
    stock, up, pa = layouts["stock"], layouts["upstream"], layouts["patched"]
    assert {"llama_context_params", "llama_model_params", "llama_batch", "llama_sampler_chain_params",
            "llama_model_quantize_params", "llama_token_data_array"} <= set(stock)
    same = {n for n in stock if n in up and _matches(stock[n], up[n])}
    assert len(same) >= 15
    assert all(_matches(stock[n], pa[n]) for n in same)
    assert {n for n in stock if n in up} - same <= STOCK_LAGS


# structs whose declaration in stock llama-cpp-python 0.3.36 differs from its own pin's llama.h
STOCK_LAGS = {"llama_opt_params"}


def _matches(ctypes_layout, c_layout) -> bool:
    size, offsets = ctypes_layout
    return size == c_layout[0] and all(c_layout[1].get(f) == off for f, off in offsets.items())


def test_the_series_settings_travel_in_their_own_struct():
    assert "n_rs_pool" not in dict(ffi.typeof("struct llama_context_params").fields)
    assert dict(ffi.typeof("struct llama_ssm_context_params").fields).keys() == {"n_rs_pool"}
