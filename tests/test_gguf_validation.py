"""pyllama_ssm.gguf: a corrupt file is a ModelLoadError naming the path and the reason, never a crash.

Each bad file is built from a valid one by changing exactly one thing, and is
checked twice: by gguf.read and by Model(), which must refuse it before
llama.cpp sees it.  Valid files (the zoo) must parse exactly as gguf-py parses them.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, zoo_names, zoo_path

import gguf_writer as gw
import pyllama_ssm as ps
from pyllama_ssm import gguf
from pyllama_ssm.bindings import BUILD
from pyllama_ssm.errors import ModelLoadError

sys.path.insert(0, str(ROOT / "vendor" / "llama.cpp" / "gguf-py"))
import gguf as gguf_py  # noqa: E402  (upstream's reader, the reference)

V = gguf.ValueType


def small_model(path: Path, **metadata) -> list[gw.Field]:
    """A structurally valid GGUF: a few keys of each kind and two f32 tensors."""
    md = {"general.architecture": "llama", "general.alignment": 32, "llama.block_count": 1,
          "tokenizer.ggml.tokens": ["<unk>", "a", "b"], "llama.rope.freq_base": 10000.0, **metadata}
    tensors = [gw.Tensor("a.weight", (8, 2), 0, bytes(64)), gw.Tensor("b.weight", (4,), 0, bytes(16))]
    return gw.write(path, md, tensors)


def patched(path: Path, fields: list[gw.Field], label: str, data: bytes) -> Path:
    """The file with the field called `label` overwritten by `data` (same size)."""
    f = next(f for f in fields if f.label == label)
    assert len(data) == f.size, (label, f.size)
    raw = bytearray(path.read_bytes())
    raw[f.offset:f.offset + f.size] = data
    path.write_bytes(bytes(raw))
    return path


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v & (2**64 - 1))


# (id, how to break the small model, words the message must contain)
BROKEN = [
    ("wrong-magic", lambda p, f: p.write_bytes(b"GGML" + p.read_bytes()[4:]), "not a GGUF file"),
    ("version-0", lambda p, f: patched(p, f, "version", u32(0)), "endianness"),
    ("version-1", lambda p, f: patched(p, f, "version", u32(1)), "unsupported GGUF version 1"),
    ("version-too-new", lambda p, f: patched(p, f, "version", u32(4)), "unsupported GGUF version 4"),
    ("big-endian", lambda p, f: patched(p, f, "version", struct.pack(">I", 3)), "endianness"),
    ("kv-count-huge", lambda p, f: patched(p, f, "metadata count", u64(2**40)), "metadata entries cannot fit"),
    ("kv-count-negative", lambda p, f: patched(p, f, "metadata count", u64(-1)), "metadata entries cannot fit"),
    ("tensor-count-huge", lambda p, f: patched(p, f, "tensor count", u64(2**62)), "tensors cannot fit"),
    ("truncated-header", lambda p, f: p.write_bytes(p.read_bytes()[:20]), "truncated: metadata count needs bytes 16..24"),
    ("truncated-in-metadata", lambda p, f: p.write_bytes(p.read_bytes()[:60]), "truncated"),
    ("key-length-huge", lambda p, f: patched(p, f, "length of key general.alignment", u64(2**31)),
     "exceeds the limit"),
    ("key-past-eof", lambda p, f: patched(p, f, "length of key general.alignment", u64(10**6)), "truncated"),
    ("empty-key", lambda p, f: patched(p, f, "length of key general.architecture", u64(0)), "is empty"),
    ("bad-value-type", lambda p, f: patched(p, f, "type of llama.block_count", u32(13)), "invalid value type 13"),
    ("nested-array", lambda p, f: patched(p, f, "element type of tokenizer.ggml.tokens", u32(V.ARRAY)),
     "invalid element type 9"),
    ("array-length-huge", lambda p, f: patched(p, f, "length of tokenizer.ggml.tokens", u64(2**33)),
     "cannot fit"),
    ("array-string-past-eof", lambda p, f: patched(p, f, "length of tokenizer.ggml.tokens[1]", u64(10**7)),
     "runs past the end of the file"),
    ("alignment-not-pow2", lambda p, f: patched(p, f, "value of general.alignment", u32(48)),
     "not a power of 2"),
    ("alignment-wrong-type", lambda p, f: patched(p, f, "type of general.alignment", u32(V.INT32)),
     "expected UINT32"),
    ("too-many-dims", lambda p, f: patched(p, f, "dimension count of a.weight", u32(5)), "5 dimensions"),
    ("negative-dim", lambda p, f: patched(p, f, "dimension 1 of a.weight", u64(-2)), "is negative"),
    ("dims-overflow", lambda p, f: patched(p, f, "dimension 0 of a.weight", u64(2**62)), "overflows"),
    ("unknown-ggml-type", lambda p, f: patched(p, f, "type of a.weight", u32(99)), "unknown or removed ggml type 99"),
    ("removed-ggml-type", lambda p, f: patched(p, f, "type of a.weight", u32(4)), "unknown or removed ggml type 4"),
    ("row-not-block-multiple", lambda p, f: patched(p, f, "type of a.weight", u32(2)),
     "not a multiple of the q4_0 block size 32"),
    ("vector-not-f32", lambda p, f: patched(p, f, "type of b.weight", u32(1)), "vector of type f16"),
    ("misaligned-offset", lambda p, f: patched(p, f, "offset of b.weight", u64(70)), "not a multiple of general"),
    ("offset-out-of-order", lambda p, f: patched(p, f, "offset of b.weight", u64(96)), "expected 64"),
    ("tensor-data-cut-short", lambda p, f: p.write_bytes(p.read_bytes()[:-24]),
     "tensor 'b.weight' data ends at byte"),
]


@pytest.mark.parametrize("case", BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_file_is_a_clean_error(tmp_path, case):
    name, brk, words = case
    path = tmp_path / f"{name}.gguf"
    fields = small_model(path)
    brk(path, fields)
    with pytest.raises(ModelLoadError) as e:
        gguf.read(path)
    assert str(path) in str(e.value) and words in str(e.value), str(e.value)
    with pytest.raises(ModelLoadError, match=str(path)):
        ps.Model(path)


@pytest.mark.parametrize("old, new, words", [
    (b"llama.block_counx", b"llama.block_count", "duplicate metadata key 'llama.block_count'"),
    (b"b.weight", b"a.weight", "duplicate tensor name 'a.weight'"),
])
def test_duplicate_names(tmp_path, old, new, words):
    path = tmp_path / "dup.gguf"
    small_model(path, **{"llama.block_counx": 1})
    path.write_bytes(path.read_bytes().replace(old, new))
    with pytest.raises(ModelLoadError, match=words):
        ps.Model(path)


@pytest.mark.parametrize("md, words", [
    ({"general.architecture": "notanarch"}, "unknown architecture 'notanarch'"),
    ({"general.architecture": 7}, "general.architecture is missing or not a string"),
    ({"llama.block_count": 0}, "block_count=0: must be in 1..512"),
    ({"llama.block_count": 513}, "block_count=513"),
    ({"llama.nextn_predict_layers": 2}, "nextn_predict_layers=2 exceeds block_count=1"),
    ({"llama.expert_count": 2000}, "expert_count=2000 exceeds 1024"),
    ({"llama.expert_count": 8, "llama.expert_used_count": 9}, "expert_used_count=9 exceeds expert_count=8"),
    ({"llama.expert_count": 8}, "expert_used_count is 0"),
    ({"llama.expert_group_count": 2}, "without experts"),
    ({"llama.rope.scaling.type": "linnear"}, "rope.scaling.type='linnear'"),
    ({"llama.embedding_length": 64, "llama.attention.head_count": 4, "llama.rope.dimension_count": 20},
     "rope.dimension_count=20: must be even and at most the head size 16"),
    ({"general.architecture": "qwen35", "qwen35.block_count": 1, "qwen35.embedding_length": 64,
      "qwen35.attention.head_count": 4, "qwen35.rope.dimension_sections": [0, 0, 0, 8]}, "dimension_sections"),
    ({"llama.attention.layer_norm_rms_epsilon": float("nan")}, "layer_norm_rms_epsilon=nan"),
    ({"general.architecture": "jamba", "jamba.block_count": 1, "jamba.embedding_length": 64,
      "jamba.ssm.inner_size": 100}, "ssm.inner_size=100 must be 2 x embedding_length=64"),
    ({"general.architecture": "mamba2", "mamba2.block_count": 1, "mamba2.ssm.inner_size": 100,
      "mamba2.ssm.time_step_rank": 0, "mamba2.ssm.group_count": 1}, "time_step_rank=0 heads"),
    ({"general.architecture": "rwkv6", "rwkv6.block_count": 1, "rwkv6.token_shift_count": 3}, "token_shift_count=3"),
    ({"general.architecture": "jamba", "jamba.block_count": 1, "jamba.attention.key_length": 96,
      "jamba.attention.value_length": 64}, "key_length=96 must equal attention.value_length=64"),
    ({"tokenizer.ggml.tokens": ["<unk>", "a", "a"]}, "token 2 'a' duplicates token 1"),
    ({"tokenizer.ggml.tokens": ["<unk>", "a", "a\0b"]}, "token 2 'a' duplicates token 1"),
    ({"tokenizer.ggml.tokens": ["", "[EMPTY_0]"]}, "token 1 '[EMPTY_0]' duplicates token 0"),
], ids=lambda x: "-".join(map(str, x)) if isinstance(x, dict) else None)
def test_values_llama_cpp_would_abort_on(tmp_path, md, words):
    """llama.cpp GGML_ASSERTs on these (process abort); we raise first."""
    path = tmp_path / "m.gguf"
    small_model(path, **md)
    with pytest.raises(ModelLoadError, match=str(path)) as e:
        gguf.read(path)
    assert words in str(e.value)


def test_missing_directory_empty_special(tmp_path):
    cases = {tmp_path / "nope.gguf": "no such file", tmp_path: "is a directory",
             Path("/dev/null"): "not a regular file"}
    empty = tmp_path / "empty.gguf"
    empty.touch()
    cases[empty] = "empty file"
    for path, words in cases.items():
        with pytest.raises(ModelLoadError, match=words) as e:
            ps.Model(path)
        assert str(path) in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.gguf"
    small_model(path)
    path.chmod(0)
    with pytest.raises(ModelLoadError, match="cannot read: Permission denied"):
        ps.Model(path)


def test_zoo_model_truncated_and_renamed(tmp_path):
    """Real models through Model(): tensor data cut short, unknown architecture, cut inside the vocabulary."""
    src = zoo_path("llama")
    raw = src.read_bytes()
    g = gguf.read(src)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(raw[:len(raw) - 4096])
    with pytest.raises(ModelLoadError, match=r"data ends at byte \d+ but the file has \d+ bytes \(truncated\?\)"):
        ps.Model(cut)
    assert gguf.read(cut, check_data=False).tensors == g.tensors  # the planner still reads it
    renamed = tmp_path / "renamed.gguf"
    renamed.write_bytes(raw.replace(b"\x05\x00\x00\x00\x00\x00\x00\x00llama", b"\x05\x00\x00\x00\x00\x00\x00\x00llamq", 1))
    with pytest.raises(ModelLoadError, match="unknown architecture 'llamq'"):
        ps.Model(renamed)
    in_vocab = tmp_path / "in-vocab.gguf"
    in_vocab.write_bytes(raw[:g.data_offset // 2])
    with pytest.raises(ModelLoadError, match="tokenizer.ggml"):
        ps.Model(in_vocab)


@pytest.mark.parametrize("name", ["llama", "mamba"])  # SentencePiece and BPE vocabularies; gguf-py takes ~2 s each
def test_zoo_parses_as_gguf_py_does(name):
    path = zoo_path(name)
    ours = gguf.read(path)
    ref = gguf_py.GGUFReader(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == keys
    for k in keys:
        want, got = ref.fields[k].contents(), ours.metadata[k]
        if isinstance(got, np.ndarray):
            np.testing.assert_array_equal(got, np.asarray(want, dtype=got.dtype), err_msg=k)
        else:
            assert got == want or (isinstance(want, float) and np.isclose(got, want)), k
        assert ours.value_types[k][0] == ref.fields[k].types[0]
    assert [(t.name, t.shape, t.type.id, ours.data_offset + t.offset, t.nbytes) for t in ours.tensors] == \
        [(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type), t.data_offset, int(t.n_bytes))
         for t in ref.tensors]


def test_ggml_type_table_matches_the_library():
    lib = ctypes.CDLL(str(ROOT / "build" / BUILD / "lib" / "libggml-base.so"))
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_type_name.restype = ctypes.c_char_p
    for i in range(gguf.GGML_TYPE_COUNT):
        blck = lib.ggml_blck_size(i)
        t = gguf.GGML_TYPES.get(i)
        if blck == 0:
            assert t is None, f"type {i} is removed in ggml"
            continue
        assert t is not None, f"type {i} ({lib.ggml_type_name(i).decode()}) missing from the table"
        assert (t.name, t.block_size, t.type_size) == (lib.ggml_type_name(i).decode(), blck, lib.ggml_type_size(i))


def test_arch_names_come_from_the_pin():
    assert gguf.ARCH_NAMES is not None and len(gguf.ARCH_NAMES) > 100
    for name in zoo_names():
        assert gguf.read(zoo_path(name)).arch in gguf.ARCH_NAMES
    assert "(unknown)" not in gguf.ARCH_NAMES
