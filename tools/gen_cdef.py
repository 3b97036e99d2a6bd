"""Generate the cffi cdef for llama.h from the header itself.

    python tools/gen_cdef.py INCLUDE_DIR... > cdef.h

The header is run through the C preprocessor, parsed with pycparser, and every
declaration of llama.h is kept together with the ggml/gguf declarations it
needs (transitively), plus EXTRA_GGML below (from ggml-rpc.h too).  Enums are written as
`{ A, B, ... }` and integer #defines as `#define X ...` so their values come
from the C compiler; structs keep their fields so cffi's API mode makes the
compiler check every layout.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from pycparser import c_ast, c_generator, c_parser

# ggml/gguf functions the Python layer calls directly (model zoo, devices).
EXTRA_GGML = {
    "gguf_init_empty", "gguf_init_from_file", "gguf_free", "gguf_find_key", "gguf_get_n_kv",
    "gguf_get_key", "gguf_get_kv_type", "gguf_get_val_u32", "gguf_get_val_str", "gguf_get_arr_n",
    "gguf_remove_key", "gguf_set_val_u8", "gguf_set_val_u32", "gguf_set_val_i32", "gguf_set_val_f32",
    "gguf_set_val_bool", "gguf_set_val_str", "gguf_set_arr_data", "gguf_set_arr_str", "gguf_add_tensor",
    "gguf_set_kv", "gguf_type_name",
    "ggml_nelements", "ggml_nbytes", "ggml_backend_tensor_set", "ggml_backend_tensor_get",
    "ggml_backend_dev_count", "ggml_backend_dev_get", "ggml_backend_dev_name",
    "ggml_backend_dev_description", "ggml_backend_dev_type", "ggml_backend_dev_memory",
    "ggml_backend_buft_name", "ggml_type_name",
    # backends built as modules (GGML_BACKEND_DL: the dispatching CPU build): loaded at init (_runtime)
    "ggml_backend_load", "ggml_backend_load_all_from_path", "ggml_backend_reg_count", "ggml_backend_reg_get",
    "ggml_backend_reg_name",
    # RPC devices (Model(rpc_servers=...)): ggml-rpc.h
    "ggml_backend_rpc_add_server", "ggml_backend_reg_dev_count", "ggml_backend_reg_dev_get",
}

# Names that the C library headers define; cffi knows them, pycparser must be told.
STD_TYPES = ["size_t", "ssize_t", "int8_t", "int16_t", "int32_t", "int64_t", "uint8_t", "uint16_t",
             "uint32_t", "uint64_t", "uintptr_t", "intptr_t", "bool", "FILE", "va_list"]
STRIP_MACROS = [
    "-D__attribute__(x)=", "-D__extension__=", "-D__restrict=", "-D__restrict__=", "-D__inline=",
    "-D__inline__=", "-D__asm__(x)=", "-D__asm(x)=", "-D__declspec(x)=", "-D__THROW=",
]
DEFINE_RE = re.compile(
    r"^\s*#\s*define\s+((?:LLAMA|RPC_PROTO)_[A-Z0-9_]+)\s+(\(?-?(0x[0-9a-fA-F]+|\d+)u?\)?)\s*(//.*)?$")
MARKER_RE = re.compile(r'^# \d+ "([^"]+)"')


# The headers whose declarations are all kept; llama-ssm.h is our patch series' API.
ROOT_HEADERS = ("llama.h", "llama-ssm.h")
# The CPU backend's own API: not linked into libggml when backends are modules (GGML_BACKEND_DL, the
# portable wheel), so a wrapper of one of its functions would leave the extension an undefined symbol: its
# types stay (llama.h uses ggml_numa_strategy), its functions only where EXTRA_GGML names them.
BACKEND_HEADERS = ("ggml-cpu.h",)
# Headers llama.h does not include that EXTRA_GGML picks from (each where the build has it).
EXTRA_HEADERS = ("ggml-rpc.h",)


def roots(include_dirs: list[Path]) -> list[str]:
    return [h for h in ROOT_HEADERS if any((d / h).exists() for d in include_dirs)]


def headers(include_dirs: list[Path]) -> list[str]:
    """Every header the cdef is generated from: the roots, then the extra headers present."""
    return roots(include_dirs) + [h for h in EXTRA_HEADERS if any((d / h).exists() for d in include_dirs)]


def preprocess(include_dirs: list[Path], cc: str = "gcc") -> str:
    """Preprocessed llama.h with the C library's own declarations removed.

    Line markers are kept so pycparser knows the header each declaration came from.
    """
    out = subprocess.run(
        [cc, "-E", "-std=c11", *STRIP_MACROS, *(f"-I{d}" for d in include_dirs), "-"],
        input="".join(f'#include "{h}"\n' for h in headers(include_dirs)),
        capture_output=True, text=True, check=True).stdout
    own = {p.name for d in include_dirs for p in d.glob("*.h")}
    keep, lines = False, []
    for line in out.splitlines():
        m = MARKER_RE.match(line)
        if m:
            keep = Path(m.group(1)).name in own
            if keep:
                lines.append(line)
            continue
        if keep:
            lines.append(line)
    return "\n".join(lines) + "\n"


class _Refs(c_ast.NodeVisitor):
    def __init__(self) -> None:
        self.names: set[str] = set()

    def visit_IdentifierType(self, node):
        self.names.update(node.names)

    def visit_Struct(self, node):
        if node.name:
            self.names.add("struct " + node.name)
        self.generic_visit(node)

    def visit_Union(self, node):
        if node.name:
            self.names.add("union " + node.name)
        self.generic_visit(node)

    def visit_Enum(self, node):
        if node.name:
            self.names.add("enum " + node.name)
        self.generic_visit(node)


def _defines(node) -> set[str]:
    """Names a top-level declaration introduces (typedef, tag with a body, function)."""
    names = set()
    if isinstance(node, c_ast.Typedef):
        names.add(node.name)
    if isinstance(node, (c_ast.Decl, c_ast.Typedef)):
        if isinstance(node, c_ast.Decl) and node.name:
            names.add(node.name)
        t = node.type
        while isinstance(t, (c_ast.TypeDecl, c_ast.PtrDecl, c_ast.ArrayDecl, c_ast.FuncDecl)):
            t = t.type
        if isinstance(t, (c_ast.Struct, c_ast.Union)) and t.name:
            kind = "struct" if isinstance(t, c_ast.Struct) else "union"
            names.add(f"{kind} {t.name}")
        if isinstance(t, c_ast.Enum) and t.name:
            names.add("enum " + t.name)
    return names


class _ArrayDims(c_ast.NodeVisitor):
    """Array sizes cffi cannot evaluate (`64 / sizeof(int32_t)`) become `...`."""

    def visit_ArrayDecl(self, node):
        if node.dim is not None and not isinstance(node.dim, c_ast.Constant):
            node.dim = c_ast.ID("...")
        self.generic_visit(node)


class _Gen(c_generator.CGenerator):
    """C text for cffi: enum values are left to the compiler."""

    def visit_Enumerator(self, n):
        return self._make_indent() + n.name + ",\n"

    def _generate_enum_body(self, members):
        return "".join(self.visit(v) for v in members) + self._make_indent() + "...\n"


def generate(include_dirs: list[Path], cc: str = "gcc") -> str:
    prelude = "".join(f"typedef int {t};\n" for t in STD_TYPES)
    ast = c_parser.CParser().parse(prelude + preprocess(include_dirs, cc), filename="<std>")
    decls = [(Path(n.coord.file).name, n) for n in ast.ext[len(STD_TYPES):]]

    definers: dict[str, list[int]] = {}
    for i, (_, node) in enumerate(decls):
        for name in _defines(node):
            definers.setdefault(name, []).append(i)

    keep: set[int] = set()
    todo = [i for i, (f, n) in enumerate(decls) if f in ROOT_HEADERS or (_defines(n) & EXTRA_GGML)]
    while todo:
        i = todo.pop()
        if i in keep or (decls[i][0] in BACKEND_HEADERS and isinstance(getattr(decls[i][1], "type", None), c_ast.FuncDecl)
                         and not _defines(decls[i][1]) & EXTRA_GGML):
            continue
        keep.add(i)
        refs = _Refs()
        refs.visit(decls[i][1])
        for name in refs.names:
            todo += definers.get(name, [])

    gen = _Gen()
    dims = _ArrayDims()
    for i in keep:
        dims.visit(decls[i][1])
    lines = ["// Generated by tools/gen_cdef.py from llama.h; do not edit."]
    typedefs: set[str] = set()
    for i in sorted(keep):
        node = decls[i][1]
        if isinstance(node, c_ast.Typedef):
            if node.name in typedefs:  # C11 allows repeating a typedef; cffi does not
                continue
            typedefs.add(node.name)
        lines.append(gen.visit(node) + ";")
    for header in headers(include_dirs):
        path = next(d / header for d in include_dirs if (d / header).exists())
        for line in path.read_text().splitlines():
            m = DEFINE_RE.match(line)
            if m:
                lines.append(f"#define {m.group(1)} ...")
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    sys.stdout.write(generate([Path(a) for a in sys.argv[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
