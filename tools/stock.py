"""The pure-Python and data pieces of the pinned sdist, packaged into pyllama_ssm/_stock/.

    python tools/stock.py      # -> pyllama_ssm/_stock/ (ignored by git), build/stock/tests/
    python tools/stock.py examples/server  # -> build/stock/examples/server/ (the batched example server)

From the llama-cpp-python 0.3.36 sdist that tools/vendor.py downloads and
verifies (nothing to compile, never committed):

    pyllama_ssm/_stock/llama_cpp/           stock's whole pure-Python package
    pyllama_ssm/_stock/grammars/*.gbnf      llama.cpp's named grammars (JSON_GBNF, ...)
    pyllama_ssm/_stock/llm_arch_names.txt   the architectures the pinned llama.cpp knows
    pyllama_ssm/_stock/LICENSE.*            the licenses of both

`make build` writes them into the checkout and `pip install .` into the wheel
(tools/pep517_backend.py), so the package reads the same files in both and
never the checkout.  Users:

- pyllama_ssm.llama_grammar: the JSON-schema converter (stock's llama_grammar.py;
  upstream llama.cpp dropped its Python version) and the named grammars;
- pyllama_ssm.gguf: the architecture table;
- parity tests and benchmarks: `import llama_cpp` with pyllama_ssm/_stock on the
  path is stock, loading a prebuilt libllama through its LLAMA_CPP_LIB_PATH
  variable (build/upstream/lib); stock's own tests go to build/stock/tests;
- bench/chat_sessions.py runs the sdist's batched example server
  (examples/server/server.py, extracted on demand into build/stock/examples/server).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
import tarfile
from pathlib import Path

import vendor

DEST = vendor.ROOT / "pyllama_ssm" / "_stock"
TESTS = vendor.ROOT / "build" / "stock" / "tests"
LIB_DIR = vendor.ROOT / "build" / "upstream" / "lib"


def arch_names(llama_arch_cpp: str) -> list[str]:
    """LLM_ARCH_NAMES of llama.cpp's src/llama-arch.cpp."""
    table = re.search(r"LLM_ARCH_NAMES\s*=\s*\{(.*?)\n\};", llama_arch_cpp, re.S)
    names = re.findall(r'\{\s*LLM_ARCH_(?!UNKNOWN\b)\w+\s*,\s*"([^"]+)"\s*\}', table.group(1)) if table else []
    if not names:
        raise vendor.VendorError("no LLM_ARCH_NAMES table in llama-arch.cpp (the pin's layout changed?)")
    return names


def stamp(pin: dict[str, str]) -> str:
    """What a populated directory was made from: the pin and this script."""
    return f"{pin['sha256']} {hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]}\n"


def populate(archive: Path, pin: dict[str, str], dest: Path, llama_cpp_tree: Path = vendor.DEST) -> None:
    """Write the pieces above into dest (replacing it); llama_cpp_tree is the extracted vendor/llama.cpp."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vendor.extract(archive, {**pin, "subdir": "llama_cpp"}, tmp / "llama_cpp")
    (tmp / "llama_cpp" / vendor.STAMP).unlink()
    (tmp / "grammars").mkdir()
    for gbnf in sorted((llama_cpp_tree / "grammars").glob("*.gbnf")):
        shutil.copyfile(gbnf, tmp / "grammars" / gbnf.name)
    names = arch_names((llama_cpp_tree / "src" / "llama-arch.cpp").read_text())
    (tmp / "llm_arch_names.txt").write_text("".join(n + "\n" for n in names))
    shutil.copyfile(llama_cpp_tree / "LICENSE", tmp / "LICENSE.llama.cpp")
    with tarfile.open(archive, "r:gz") as tar:
        member = tar.extractfile(f"{archive.name.removesuffix('.tar.gz')}/LICENSE.md")
        (tmp / "LICENSE.llama-cpp-python.md").write_bytes(member.read())
    (tmp / vendor.STAMP).write_text(stamp(pin))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def main() -> int:
    try:
        pin = vendor.read_lock()
        archive = vendor.download(pin, vendor.cache_root())
        if sys.argv[1:]:  # other parts of the sdist, for benchmarks (not packaged)
            for part in sys.argv[1:]:
                vendor.extract(archive, {**pin, "subdir": part}, TESTS.parent / part)
            return 0
        done = DEST / vendor.STAMP
        if not (done.exists() and done.read_text() == stamp(pin)):
            populate(archive, pin, DEST)
        vendor.extract(archive, {**pin, "subdir": "tests"}, TESTS)
    except (vendor.VendorError, OSError, KeyError) as e:
        print(f"stock: error: {e}", file=sys.stderr)
        return 1
    print(f"stock: {pin['package']} {pin['version']} (pure Python, grammars, architectures) in "
          f"{DEST.relative_to(vendor.ROOT)}; run it with LLAMA_CPP_LIB_PATH={LIB_DIR.relative_to(vendor.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
