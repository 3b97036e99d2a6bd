"""Read and validate a GGUF file in Python before llama.cpp sees it.

llama.cpp trusts much of a GGUF file: some corrupt files make it abort the
process (GGML_ASSERT) instead of returning an error.  read() parses the header,
the metadata and the tensor table (never the tensor data) and checks everything
the loader would trust, so a bad file becomes a ModelLoadError naming the path
and the reason.  The planner reads model metadata through the same function.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import hparams
from .errors import ModelLoadError

MAGIC = b"GGUF"
VERSION = 3                    # GGUF_VERSION: the newest this llama.cpp reads
DEFAULT_ALIGNMENT = 32         # GGUF_DEFAULT_ALIGNMENT
MAX_STRING = 1 << 30           # GGUF_MAX_STRING_LENGTH
MAX_ARRAY = 1 << 30            # GGUF_MAX_ARRAY_ELEMENTS
MAX_DIMS = 4                   # GGML_MAX_DIMS
MAX_NAME = 64                  # GGML_MAX_NAME, terminating NUL included
INT64_MAX = (1 << 63) - 1
SIZE_MAX = (1 << 64) - 1


class ValueType(IntEnum):
    """gguf_type: the type of a metadata value."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# struct format and numpy dtype of each fixed-size value type (BOOL: one byte, non-zero is true)
VALUE_FORMATS = {ValueType.UINT8: "B", ValueType.INT8: "b", ValueType.UINT16: "H", ValueType.INT16: "h",
            ValueType.UINT32: "I", ValueType.INT32: "i", ValueType.FLOAT32: "f", ValueType.BOOL: "B",
            ValueType.UINT64: "Q", ValueType.INT64: "q", ValueType.FLOAT64: "d"}
_STRUCTS = {t: struct.Struct("<" + c) for t, c in VALUE_FORMATS.items()}
_DTYPES = {t: np.dtype("<" + c) for t, c in VALUE_FORMATS.items()}
_VALUE_TYPES = frozenset(int(t) for t in ValueType)


@dataclass(frozen=True)
class GGMLType:
    """A tensor element type: `block_size` elements take `type_size` bytes."""

    id: int
    name: str
    block_size: int
    type_size: int

    def row_bytes(self, n: int) -> int:
        return n // self.block_size * self.type_size


# ggml's type_traits (ggml/src/ggml.c); tests/test_gguf_validation.py checks the
# table against ggml_type_size/ggml_blck_size of the loaded library.  Ids 4, 5
# and 31-33, 36-38 are removed types: llama.cpp rejects them.
GGML_TYPES: dict[int, GGMLType] = {t.id: t for t in (GGMLType(*row) for row in [
    (0, "f32", 1, 4), (1, "f16", 1, 2), (2, "q4_0", 32, 18), (3, "q4_1", 32, 20),
    (6, "q5_0", 32, 22), (7, "q5_1", 32, 24), (8, "q8_0", 32, 34), (9, "q8_1", 32, 36),
    (10, "q2_K", 256, 84), (11, "q3_K", 256, 110), (12, "q4_K", 256, 144), (13, "q5_K", 256, 176),
    (14, "q6_K", 256, 210), (15, "q8_K", 256, 292), (16, "iq2_xxs", 256, 66), (17, "iq2_xs", 256, 74),
    (18, "iq3_xxs", 256, 98), (19, "iq1_s", 256, 50), (20, "iq4_nl", 32, 18), (21, "iq3_s", 256, 110),
    (22, "iq2_s", 256, 82), (23, "iq4_xs", 256, 136), (24, "i8", 1, 1), (25, "i16", 1, 2),
    (26, "i32", 1, 4), (27, "i64", 1, 8), (28, "f64", 1, 8), (29, "iq1_m", 256, 56),
    (30, "bf16", 1, 2), (34, "tq1_0", 256, 54), (35, "tq2_0", 256, 66), (39, "mxfp4", 32, 17),
    (40, "nvfp4", 64, 36), (41, "q1_0", 128, 18), (42, "q2_0", 64, 18),
])}
GGML_TYPE_COUNT = 43


def ggml_type(name: str | int) -> GGMLType:
    """A ggml type by id or name ("f16", "q8_0", ...), as llama.cpp's --cache-type-k spells them."""
    for t in GGML_TYPES.values():
        if t.id == name if isinstance(name, int) else t.name.lower() == name.lower():
            return t
    raise ValueError(f"unknown ggml type {name!r}; known: {', '.join(t.name for t in GGML_TYPES.values())}")


def _load_arch_names() -> frozenset[str] | None:
    """Architecture names of the pinned llama.cpp (LLM_ARCH_NAMES in src/llama-arch.cpp), which
    tools/stock.py lists in pyllama_ssm/_stock/ at build time (`make build`, `pip install`).

    None in a checkout not yet built: llama.cpp then rejects an unknown
    architecture itself, with an error rather than an abort.
    """
    try:
        text = (Path(__file__).resolve().parent / "_stock" / "llm_arch_names.txt").read_text()
    except OSError:
        return None
    return frozenset(text.split()) or None


ARCH_NAMES = _load_arch_names()


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table; `offset` is relative to the data section."""

    name: str
    shape: tuple[int, ...]
    type: GGMLType
    offset: int
    nbytes: int


@dataclass
class GGUFFile:
    """The header, metadata and tensor table of a GGUF file (no tensor data)."""

    path: Path
    version: int
    metadata: dict[str, Any]
    value_types: dict[str, tuple[ValueType, ValueType | None]]  # key -> (type, array element type)
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int
    file_size: int

    @property
    def arch(self) -> str:
        return self.metadata["general.architecture"]

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value; `key` starting with "." is relative to the architecture ("{arch}.key")."""
        if key.startswith("."):
            key = self.arch + key
        return self.metadata.get(key, default)

    def get_int(self, key: str, default: int | None = None) -> int | None:
        """An integer scalar, or `default` when absent or of another type (llama.cpp then errors itself)."""
        value = self.get(key, default)
        return value if isinstance(value, int) and not isinstance(value, bool) else default


class _Reader:
    """Bounds-checked little-endian reads from a memory-mapped file."""

    def __init__(self, path: Path, buf, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, reason: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {reason}")

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise self.fail(f"truncated: {what} needs bytes {self.pos}..{self.pos + n} "
                            f"but the file has {self.size} bytes")

    def scalar(self, t: ValueType, what: str):
        s = _STRUCTS[t]
        self.need(s.size, what)
        (value,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return value

    def u32(self, what: str) -> int:
        return self.scalar(ValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(ValueType.UINT64, what)

    def i64(self, what: str) -> int:
        return self.scalar(ValueType.INT64, what)

    def raw_string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        if n > MAX_STRING:
            raise self.fail(f"{what}: length {n} exceeds the limit of {MAX_STRING} bytes")
        self.need(n, what)
        data = self.buf[self.pos:self.pos + n]
        self.pos += n
        return data

    def string(self, what: str) -> str:
        return self.raw_string(what).decode("utf-8", "surrogateescape")

    def array(self, t: ValueType, n: int, what: str):
        if t == ValueType.STRING:
            return self.string_array(n, what)
        dtype = _DTYPES[t]
        self.need(n * dtype.itemsize, what)
        values = np.frombuffer(self.buf, dtype, n, self.pos).copy()
        self.pos += n * dtype.itemsize
        return values.astype(bool) if t == ValueType.BOOL else values

    def string_array(self, n: int, what: str) -> list[str]:
        """n length-prefixed strings; the loop is the hot path for 100k+-token vocabularies."""
        buf, size, pos, unpack = self.buf, self.size, self.pos, _STRUCTS[ValueType.UINT64].unpack_from
        out = []
        append = out.append
        for i in range(n):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of {what}[{i}]")
            (length,) = unpack(buf, pos)
            end = pos + 8 + length
            if length > MAX_STRING or end > size:
                self.pos = pos + 8
                raise self.fail(f"{what}[{i}]: string of {length} bytes at byte {pos + 8} "
                                f"runs past the end of the file ({size} bytes)")
            append(buf[pos + 8:end].decode("utf-8", "surrogateescape"))
            pos = end
        self.pos = pos
        return out


def read(path: str | os.PathLike, *, check_data: bool = True) -> GGUFFile:
    """Parse and validate a GGUF file's header, metadata and tensor table.

    check_data=False accepts files whose tensor data is absent or cut short
    (the planner needs only metadata and shapes); everything else is checked
    either way.  Raises ModelLoadError naming the path and the reason.
    """
    path = Path(path)
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise ModelLoadError(f"{path}: is a directory, not a GGUF file")
        if not stat.S_ISREG(st.st_mode):  # opening a FIFO would block
            raise ModelLoadError(f"{path}: not a regular file")
        if st.st_size == 0:
            raise ModelLoadError(f"{path}: empty file")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            gguf = _parse(_Reader(path, buf, len(buf)))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such file") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read: {e.strerror or e}") from None
    _check_tensor_data(gguf, check_data)
    _check_model(gguf)
    return gguf


def _parse(r: _Reader) -> GGUFFile:
    magic = r.buf[:4]
    if magic != MAGIC:
        raise r.fail(f"not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
    r.pos = 4
    version = r.u32("version")
    if version & 0xFFFF == 0:
        raise r.fail(f"GGUF version {version:#x}: written on a machine of the other endianness?")
    if version < 2 or version > VERSION:
        raise r.fail(f"unsupported GGUF version {version} (this llama.cpp reads 2..{VERSION})")
    n_tensors = r.i64("tensor count")
    n_kv = r.i64("metadata count")
    rest = r.size - r.pos
    # the smallest metadata entry takes 14 bytes, the smallest tensor entry 25
    if not 0 <= n_kv <= rest // 14:
        raise r.fail(f"corrupt header: {n_kv} metadata entries cannot fit in the {rest} bytes that follow")
    if not 0 <= n_tensors <= rest // 25:
        raise r.fail(f"corrupt header: {n_tensors} tensors cannot fit in the {rest} bytes that follow")

    metadata: dict[str, Any] = {}
    types: dict[str, tuple[ValueType, ValueType | None]] = {}
    for i in range(n_kv):
        key = r.string(f"metadata key {i}")
        if not key:
            raise r.fail(f"metadata key {i} is empty")
        if key in metadata:
            raise r.fail(f"duplicate metadata key {key!r}")
        metadata[key], types[key] = _read_value(r, key)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if "general.alignment" in types and types["general.alignment"][0] != ValueType.UINT32:
        raise r.fail(f"general.alignment has type {types['general.alignment'][0].name}, expected UINT32")
    if alignment == 0 or alignment & (alignment - 1):
        raise r.fail(f"general.alignment={alignment} is not a power of 2")

    tensors = [_read_tensor_info(r, i) for i in range(n_tensors)]
    names = set()
    for t in tensors:
        if t.name in names:
            raise r.fail(f"duplicate tensor name {t.name!r}")
        names.add(t.name)
    data_offset = -(-r.pos // alignment) * alignment if tensors else r.pos
    return GGUFFile(r.path, version, metadata, types, tensors, alignment, data_offset, r.size)


def _read_value(r: _Reader, key: str) -> tuple[Any, tuple[ValueType, ValueType | None]]:
    t = r.u32(f"type of {key!r}")
    if t not in _VALUE_TYPES:
        raise r.fail(f"metadata {key!r} has invalid value type {t}")
    t = ValueType(t)
    if t != ValueType.ARRAY:
        if t == ValueType.STRING:
            return r.string(f"value of {key!r}"), (t, None)
        value = r.scalar(t, f"value of {key!r}")
        return (value != 0 if t == ValueType.BOOL else value), (t, None)
    et = r.u32(f"element type of {key!r}")
    if et not in _VALUE_TYPES or et == ValueType.ARRAY:
        raise r.fail(f"metadata array {key!r} has invalid element type {et}")
    et = ValueType(et)
    n = r.u64(f"length of {key!r}")
    min_size = 8 if et == ValueType.STRING else _DTYPES[et].itemsize
    if n > MAX_ARRAY or n * min_size > r.size - r.pos:
        raise r.fail(f"metadata array {key!r}: {n} elements of {et.name} cannot fit in the "
                     f"{r.size - r.pos} bytes left in the file")
    return r.array(et, n, f"{key!r}"), (t, et)


def _read_tensor_info(r: _Reader, i: int) -> TensorInfo:
    name = r.string(f"name of tensor {i}")
    if len(name.encode("utf-8", "surrogateescape")) >= MAX_NAME:
        raise r.fail(f"tensor {i}: name of {len(name)} characters is longer than {MAX_NAME - 1}")
    n_dims = r.u32(f"dimension count of tensor {name!r}")
    if n_dims > MAX_DIMS:
        raise r.fail(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
    shape = tuple(r.i64(f"dimension {j} of tensor {name!r}") for j in range(n_dims))
    n_elements = 1
    for j, d in enumerate(shape):
        if d < 0:
            raise r.fail(f"tensor {name!r}: dimension {j} is negative ({d})")
        n_elements *= d
    if n_elements > INT64_MAX:
        raise r.fail(f"tensor {name!r}: shape {shape} overflows 64-bit element counts")
    type_id = r.u32(f"type of tensor {name!r}")
    ggml_t = GGML_TYPES.get(type_id)
    if ggml_t is None:
        raise r.fail(f"tensor {name!r} has unknown or removed ggml type {type_id}")
    ne0 = shape[0] if shape else 1
    if ne0 % ggml_t.block_size:
        raise r.fail(f"tensor {name!r}: {ne0} elements per row is not a multiple of the "
                     f"{ggml_t.name} block size {ggml_t.block_size}")
    nbytes = n_elements // ggml_t.block_size * ggml_t.type_size
    if nbytes > SIZE_MAX // 2:
        raise r.fail(f"tensor {name!r}: {nbytes} bytes is not addressable")
    offset = r.u64(f"data offset of tensor {name!r}")
    return TensorInfo(name, shape, ggml_t, offset, nbytes)


def _check_tensor_data(g: GGUFFile, check_data: bool) -> None:
    """Offsets as llama.cpp expects them (aligned, in table order, no gaps) and data inside the file."""
    expected = 0
    for t in g.tensors:
        if t.offset % g.alignment:
            raise ModelLoadError(f"{g.path}: tensor {t.name!r} offset {t.offset} is not a multiple of "
                                 f"general.alignment={g.alignment}")
        if t.offset != expected:
            raise ModelLoadError(f"{g.path}: tensor {t.name!r} has offset {t.offset}, expected {expected} "
                                 f"(tensor data must follow the table order)")
        expected += -(-t.nbytes // g.alignment) * g.alignment
        end = g.data_offset + t.offset + t.nbytes
        if check_data and end > g.file_size:
            raise ModelLoadError(f"{g.path}: tensor {t.name!r} data ends at byte {end} but the file has "
                                 f"{g.file_size} bytes (truncated?)")


def _check_model(g: GGUFFile) -> None:
    """What llama.cpp's model loader asserts (aborting the process) instead of reporting."""
    def fail(reason: str) -> ModelLoadError:
        return ModelLoadError(f"{g.path}: {reason}")

    arch = g.metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise fail("general.architecture is missing or not a string: not a llama.cpp model")
    if ARCH_NAMES is not None and arch not in ARCH_NAMES:
        raise fail(f"unknown architecture {arch!r} (this llama.cpp knows {len(ARCH_NAMES)}, "
                   f"e.g. llama, mamba2, jamba, qwen35)")
    for t in g.tensors:
        # norms, biases, scales: converters and llama-quantize keep them f32, and the
        # CPU graph aborts on an add or mul by a vector of another type
        if len(t.shape) <= 1 and t.type.id != 0:
            raise fail(f"tensor {t.name!r} is a vector of type {t.type.name}; llama.cpp needs vectors in f32")
    hparams.check(g)
    _check_vocab(g, fail)


def _check_vocab(g: GGUFFile, fail: Callable[[str], ModelLoadError]) -> None:
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        return
    # llama.cpp reads token texts as C strings (up to a NUL), renames empty ones,
    # then asserts that every token text is unique
    seen: dict[str, int] = {}
    for i, text in enumerate(tokens):
        text = text.split("\0", 1)[0] or f"[EMPTY_{i}]"
        j = seen.setdefault(text, i)
        if j != i:
            raise fail(f"tokenizer.ggml.tokens: token {i} {text!r} duplicates token {j}")
