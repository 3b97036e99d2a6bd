"""tools/gen_cdef.py: the cdef comes from the header, checked by cffi's parser."""

from __future__ import annotations

import cffi
import pytest

import gen_cdef
from conftest import ROOT

PATCHED = ROOT / "build" / "patched" / "include"
UPSTREAM = ROOT / "build" / "upstream" / "include"


def test_synthetic_header_keeps_llama_decls_and_what_they_need(tmp_path):
    (tmp_path / "ggml.h").write_text(
        "#include <stdint.h>\n"
        "enum ggml_type { GGML_TYPE_F32 = 0, GGML_TYPE_F16 = 1 };\n"
        "struct ggml_used { int64_t ne[4]; enum ggml_type type; };\n"
        "struct ggml_unused { int x; };\n"
        "int ggml_unused_fn(struct ggml_unused * u);\n")
    (tmp_path / "llama.h").write_text(
        '#include "ggml.h"\n'
        "#define LLAMA_API __attribute__((visibility(\"default\")))\n"
        "#define LLAMA_ANSWER 42\n"
        "#define LLAMA_NOT_A_NUMBER \"text\"\n"
        "struct llama_thing { struct ggml_used * t; float x; };\n"
        "LLAMA_API int llama_fn(const struct llama_thing * thing, enum ggml_type type);\n")
    cdef = gen_cdef.generate([tmp_path])
    assert "struct ggml_used" in cdef and "enum ggml_type" in cdef
    assert "ggml_unused" not in cdef, "unreferenced ggml declarations must be dropped"
    assert "int llama_fn(const struct llama_thing *thing, enum ggml_type type);" in cdef
    assert "#define LLAMA_ANSWER ..." in cdef
    assert "LLAMA_NOT_A_NUMBER" not in cdef
    assert "GGML_TYPE_F16,\n  ...\n" in cdef, "enum values are left to the compiler"
    cffi.FFI().cdef(cdef)  # cffi accepts it


@pytest.mark.parametrize("include", [PATCHED, UPSTREAM], ids=["patched", "upstream"])
def test_real_header_parses(include):
    if not (include / "llama.h").exists():
        pytest.skip("run `make build` first")
    cdef = gen_cdef.generate([include])
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    for name in ("llama_decode", "llama_memory_seq_rm", "llama_state_seq_get_data", "gguf_init_empty"):
        assert f" {name}(" in cdef or f"*{name}(" in cdef, name
    assert "struct llama_context_params\n{" in cdef


def test_patched_header_adds_the_memory_report():
    if not (PATCHED / "llama-ssm.h").exists():
        pytest.skip("run `make build` first")
    assert "llama_memory_report_get" in gen_cdef.generate([PATCHED])
    assert "llama_memory_report_get" not in gen_cdef.generate([UPSTREAM])
