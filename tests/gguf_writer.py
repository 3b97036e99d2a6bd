"""A minimal GGUF writer for tests: valid files from parts, and the raw pieces to break them.

Tests build small GGUF files (metadata-only models for the planner, shrunken
zoo models as fuzz seeds, hand-broken files for validation) without going
through llama.cpp's saver, so they can also write what a correct writer never would.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pyllama_ssm.gguf import GGUFFile, ValueType, VALUE_FORMATS

V = ValueType


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    type_id: int
    data: bytes


def string(s: str | bytes) -> bytes:
    b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _scalar(t: ValueType, v: Any) -> bytes:
    if t == V.STRING:
        return string(v)
    return struct.pack("<" + VALUE_FORMATS[t], v.item() if isinstance(v, np.generic) else v)


def infer(v: Any) -> tuple[ValueType, ValueType | None]:
    """A value type for a plain Python value: int -> UINT32, float -> FLOAT32, lists by their first item."""
    if isinstance(v, bool):
        return V.BOOL, None
    if isinstance(v, int):
        return (V.UINT32 if 0 <= v < 2**32 else V.INT64), None
    if isinstance(v, float):
        return V.FLOAT32, None
    if isinstance(v, str):
        return V.STRING, None
    items = list(v)
    return V.ARRAY, (infer(items[0])[0] if items else V.UINT32)


@dataclass(frozen=True)
class Field:
    """Where a writer put one structural field: what a fuzzer mutates."""

    offset: int
    size: int
    label: str


def write(path: Path, metadata: dict[str, Any], tensors: list[Tensor] = (), *,
          types: dict[str, tuple[ValueType, ValueType | None]] | None = None,
          alignment: int = 32, version: int = 3) -> list[Field]:
    """Write a GGUF file (types from `types` where given, else inferred); returns its structural fields."""
    types = types or {}
    out = bytearray(b"GGUF")
    fields: list[Field] = []

    def put(label: str, data: bytes) -> None:
        fields.append(Field(len(out), len(data), label))
        out.extend(data)

    def put_string(label: str, s: str | bytes) -> None:
        encoded = string(s)
        put(f"length of {label}", encoded[:8])
        out.extend(encoded[8:])

    put("version", struct.pack("<I", version))
    put("tensor count", struct.pack("<Q", len(tensors)))
    put("metadata count", struct.pack("<Q", len(metadata)))
    for key, v in metadata.items():
        t, et = types.get(key) or infer(v)
        put_string(f"key {key}", key)
        put(f"type of {key}", struct.pack("<I", t))
        if t == V.ARRAY:
            items = list(v)
            put(f"element type of {key}", struct.pack("<I", et))
            put(f"length of {key}", struct.pack("<Q", len(items)))
            for i, x in enumerate(items):
                if et == V.STRING:
                    put_string(f"{key}[{i}]", x)
                else:
                    out.extend(_scalar(et, x))
        elif t == V.STRING:
            put_string(f"value of {key}", v)
        else:
            put(f"value of {key}", _scalar(t, v))
    offset = 0
    for t in tensors:
        put_string(f"name of {t.name}", t.name)
        put(f"dimension count of {t.name}", struct.pack("<I", len(t.shape)))
        for j, d in enumerate(t.shape):
            put(f"dimension {j} of {t.name}", struct.pack("<q", d))
        put(f"type of {t.name}", struct.pack("<I", t.type_id))
        put(f"offset of {t.name}", struct.pack("<Q", offset))
        offset += -(-len(t.data) // alignment) * alignment
    if tensors:
        out.extend(bytes(-len(out) % alignment))
    for t in tensors:
        out.extend(t.data + bytes(-len(t.data) % alignment))
    path.write_bytes(bytes(out))
    return fields


def rewrite(g: GGUFFile, path: Path, metadata: dict[str, Any], tensors: list[Tensor]) -> list[Field]:
    """Write `metadata` and `tensors` keeping the value types `g` used for the keys it has."""
    return write(path, metadata, tensors, types=g.value_types, alignment=g.alignment, version=g.version)


def tensors_of(g: GGUFFile) -> list[Tensor]:
    """The tensors of a parsed file, their data read from disk."""
    raw = g.path.read_bytes()
    return [Tensor(t.name, t.shape, t.type.id, raw[g.data_offset + t.offset:g.data_offset + t.offset + t.nbytes])
            for t in g.tensors]
