#!/usr/bin/env python3
"""Real-text hybrids grafted from SmolLM2-135M-Instruct (issue #25).

The random zoo (generate.py) exercises every architecture but writes noise; these models
write English, so benchmarks and parity checks of the hybrid paths see real logits.

- falcon-h1-graft: all 30 SmolLM2 layers (attention, FFN, norms; tied embeddings, tokenizer
  and chat template), each with a Mamba2 branch beside its attention, on the same normed input
  (src/models/falcon-h1.cpp adds the two outputs).  Falcon-H1 rotates with NEOX RoPE (pairs
  i, i + 32), llama's GGUF converter permuted attn_q/attn_k for llama's NORM RoPE (pairs 2i,
  2i + 1): they are un-permuted here.  Falcon-H1 names the FFN norm `blk.N.ffn_norm` (no
  `.weight`: tn(LLM_TENSOR_FFN_NORM, i) in its loader).
- granitehybrid-graft: SmolLM2's 30 attention layers with a Mamba2 layer after every 3rd (40
  layers: AAAM x 10).  A layer is recurrent iff its head_count_kv is 0 (per-layer array);
  head_count stays a scalar.  Granite has an FFN in every layer, sized by the one n_ff
  (load_arch_tensors reads n_ff of layer 0), so each Mamba2 layer carries an FFN of
  SmolLM2's size whose weights are zero: a no-op.  RoPE is on through
  rope.scaling.finetuned = true (Granite's switch, NORM RoPE like llama: q/k stay permuted),
  and the multipliers make the attention layers compute SmolLM2's: attention.scale 0.125
  (= 1/sqrt(64), llama's default), embedding_scale, residual_scale and logit_scale 1.0.
- the Mamba2 parts (falcon-h1: a branch per layer; granite: 10 layers): inner size 1152 (=
  2 x 576, Granite requires 2 x n_embd), state 64, 18 heads of 64, 1 group, conv kernel 4, the
  gated RMS norm, all seeded random with Mamba2's own initialisation (dt log-uniform in
  [1e-3, 1e-1], A = -U(1, 16), conv and in_proj at fan-in scale) but D = 0 (below), and ssm_out drawn
  at std SSM_OUT_STD[arch]: the knob between "the recurrent state does not matter" (0: each
  graft computes SmolLM2 exactly, up to summation order) and "the text falls apart".
- smollm2-135m-instruct-{f16,q8_0,q4_0,q4_k_m}: the attention-only reference, SmolLM2
  dequantized to f16 in its own llama arch, and the formats users download quantized from it.
- {mamba2,qwen35}-tiny-{q8_0,q4_0,q4_k_m}: a recurrent and a hybrid family of the random zoo
  (generate.py, which runs first) in the same formats, so the quantized kernels (repacked, AMX:
  separate gemm and gemv paths) run under the recurrent paths too.  Their rows are 128 wide, so
  Q4_K_M keeps llama-quantize's fallbacks (q5_0/q8_0) for most tensors.

Every graft comes as f16 and quantized by llama.cpp's own llama_model_quantize (through our
cffi bindings) to Q8_0 and Q4_K_M.  build/models/grafts.json lists them (name -> file, arch,
format, ssm_out_std, sha256); graft_path(arch, fmt) finds one.  Output is deterministic and
cached: when grafts.json carries the current key (sha256 of this file, of SmolLM2's GGUF, of
build/patched/BUILD_KEY, the numpy version) and every file is there, nothing is written.

    python tests/models/graft.py              # -> build/models/{falcon-h1,granitehybrid}-graft-*.gguf, ...
    python tests/models/graft.py --measure    # the table below, again

The ssm_out scale, measured (`python tests/models/graft.py --measure [--arch A --scales ...]`:
f16 grafts on the patched CPU build, a 2-core Xeon with AMX).  For each scale: greedy chat
answers to PROMPTS (40 tokens), and the state effect: each of PROBE_TEXTS decoded as first half
+ second half, once straight on and once with the recurrent state dropped between the halves
(the attention cells kept; state_effect()), comparing the next token's log-probabilities (the
largest change over the 10 most likely tokens).  Wanted: every answer fluent and on topic, and
every probe moved by >= 0.1.

  falcon-h1 (a branch in all 30 layers)   state effect over the 5 probes   answers
    std 0      0.000 on every probe      SmolLM2-f16's, word for word
    std 0.01   0.088 .. 0.593            fluent, on topic
    std 0.02   0.195 .. 1.173  CHOSEN    fluent, on topic ("Paris.", "Red, Blue, Green", ...)
    std 0.03   0.245 .. 0.960            slipping: "Name three colors." -> "The answer is: 3"
    std 0.05   0.640 .. 2.962            broken: "- 1. 2. 3. 4. 5. ...", an empty answer
  granitehybrid (10 Mamba2 layers)
    std 0      0.000 on every probe      SmolLM2-f16's, word for word
    std 0.008  0.077 .. 0.882            fluent, on topic
    std 0.015  0.149 .. 1.221  CHOSEN    fluent, on topic
    std 0.02   0.237 .. 2.389            drifting: Romeo and Juliet -> "Shakespeare's sonnets, ..."
    std 0.04   0.839 .. 5.644            broken: "The capital of France is a sovereign territory ..."

The quantized files keep both (their state effect over the probes: falcon-h1 Q8_0 0.218 ..
1.288, Q4_K_M 0.235 .. 0.857; granitehybrid Q8_0 0.228 .. 1.367, Q4_K_M 0.387 .. 1.394; every
one answers "The capital of France is Paris.").

D = 0, not mamba_ssm's D = 1: the skip term D * x is per token and state-free, all perturbation
and no memory.  With D = 1, falcon-h1 was fluent only up to std 0.002 (state effect 0.026 ..
0.053) and at 0.004 (0.038 .. 0.132) already repeated itself ("The answer to the question of
what is the capital of France?" x3); with D = 0 all the branch adds comes through the conv
window and the SSM state.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from vendor import sha256_of  # noqa: E402
if str(ROOT) not in sys.path and os.environ.get("PYLLAMA_SSM_TEST_INSTALLED") != "1":  # tests/conftest.py
    sys.path.insert(0, str(ROOT))
GGUF_PY = ROOT / "vendor" / "llama.cpp" / "gguf-py"  # llama.cpp's own GGUF reader/writer/dequantizer
if str(GGUF_PY) not in sys.path:
    sys.path.insert(0, str(GGUF_PY))

# llama.cpp's libraries before numpy's (see generate.py)
import pyllama_ssm  # noqa: E402, F401
import numpy as np  # noqa: E402

SOURCE = ROOT / "build" / "models" / "smollm2-135m-instruct-q4_1.gguf"  # tests/models/real.py
DEFAULT_OUT = ROOT / "build" / "models"
BUILD_KEY = ROOT / "build" / "patched" / "BUILD_KEY"
INDEX = "grafts.json"

SEED = 25
ARCHS = ("falcon-h1", "granitehybrid")
FORMATS = ("f16", "q8_0", "q4_k_m")              # of each graft
SMOLLM2_FORMATS = ("f16", "q8_0", "q4_0", "q4_k_m")  # of the attention-only reference
SMOLLM2 = "smollm2"                               # graft_path()'s name for the reference
FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
          "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}

# the Mamba2 mixer
D_INNER, D_STATE, N_SSM_HEAD, N_GROUP, D_CONV = 1152, 64, 18, 1, 4
SSM_OUT_STD = {"falcon-h1": 0.02, "granitehybrid": 0.015}  # measured: see the docstring
GRANITE_MAMBA_EVERY = 3  # a Mamba2 layer after every 3rd attention layer

PROMPTS = ["What is the capital of France?", "Who wrote Romeo and Juliet?",
           "Write one sentence about the ocean.", "Name three colors.",
           "Give me one tip for sleeping well."]
PROBE_TEXTS = [
    "The old lighthouse keeper climbed the stairs every evening to light the lamp. One stormy night he saw",
    "Photosynthesis is the process by which green plants use sunlight to make food from carbon dioxide and",
    "In 1969 two astronauts walked on the surface of the Moon while a third one stayed in orbit, and the",
    "My grandmother keeps a small garden behind her house where she grows tomatoes, beans and",
    "The recipe calls for two cups of flour, one cup of sugar, three eggs and a pinch of",
]


# -- names --------------------------------------------------------------------------

def model_name(arch: str, fmt: str = "f16") -> str:
    """The index name (= file stem) of a graft, or of the reference for arch "smollm2"."""
    if arch == SMOLLM2:
        if fmt not in SMOLLM2_FORMATS:
            raise KeyError(f"smollm2 comes as {', '.join(SMOLLM2_FORMATS)}, not {fmt!r}")
        return f"smollm2-135m-instruct-{fmt}"
    if arch in ZOO_QUANTIZED and fmt in ZOO_FORMATS:
        return f"{arch}-{fmt}"
    if arch not in ARCHS or fmt not in FORMATS:
        raise KeyError(f"no graft {arch}/{fmt}: archs {', '.join(ARCHS)}, formats {', '.join(FORMATS)}")
    return f"{arch}-graft-{fmt}"


def graft_path(arch: str, fmt: str = "f16", out: Path = DEFAULT_OUT) -> Path:
    """The file of a graft ("falcon-h1", "granitehybrid"), of the reference ("smollm2") or of a quantized
    zoo model ("mamba2-tiny", "qwen35-tiny")."""
    return out / f"{model_name(arch, fmt)}.gguf"


# -- the source ---------------------------------------------------------------------

@dataclass
class Source:
    """SmolLM2 as read from its GGUF: metadata and tensors (numpy order: ne reversed)."""

    kvs: list[tuple[str, Any, Any, Any]]  # general.* and tokenizer.*: (key, value, type, array item type)
    hp: dict[str, Any]                    # llama.* without the prefix
    tensors: dict[str, np.ndarray]        # matrices float16, vectors float32


def read_source(path: Path = SOURCE) -> Source:
    import gguf
    if not path.exists():
        raise SystemExit(f"graft.py: {path} is missing: run `python tests/models/real.py`")
    r = gguf.GGUFReader(path)
    kvs, hp = [], {}
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type",
                                               "general.quantization_version"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if key.startswith("llama."):
            hp[key.removeprefix("llama.")] = value
        else:
            kvs.append((key, value, vtype, sub))
    tensors = {}
    for t in r.tensors:
        w = gguf.dequantize(t.data, t.tensor_type)
        tensors[t.name] = w.astype(np.float16) if w.ndim >= 2 else np.array(w, dtype=np.float32)
    return Source(kvs, hp, tensors)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute: rows of each head from llama's NORM
    RoPE order (pairs 2i, 2i+1) back to the HF order NEOX RoPE rotates (pairs i, i + d/2)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- the Mamba2 mixer -------------------------------------------------------------------

def _rng(model: str, name: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{model}/{name}".encode()).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([SEED, *words])))


def mamba2_tensors(model: str, il: int, n_embd: int, ssm_out_std: float) -> dict[str, np.ndarray]:
    """A seeded-random Mamba2 mixer for layer il, initialised as mamba_ssm's Mamba2 is, but D = 0.

    ssm_out is a fixed standard-normal draw times ssm_out_std (0: zeros), so every scale
    shares one direction and the measurements in the docstring compare like with like.
    """
    p = f"blk.{il}."
    conv_dim = D_INNER + 2 * N_GROUP * D_STATE
    d_in_proj = 2 * D_INNER + 2 * N_GROUP * D_STATE + N_SSM_HEAD  # z, xBC, dt
    r = lambda name: _rng(model, p + name)  # noqa: E731
    bound = 1.0 / np.sqrt(D_CONV)  # torch's Conv1d default: U(-1/sqrt(fan_in), ...), fan_in = kernel
    dt = np.exp(r("dt").uniform(np.log(1e-3), np.log(1e-1), N_SSM_HEAD))
    t = {
        "ssm_in.weight": (r("ssm_in").standard_normal((d_in_proj, n_embd)) / np.sqrt(n_embd)).astype(np.float16),
        "ssm_conv1d.weight": r("conv").uniform(-bound, bound, (conv_dim, D_CONV)).astype(np.float32),
        "ssm_conv1d.bias": r("conv_b").uniform(-bound, bound, conv_dim).astype(np.float32),
        "ssm_dt.bias": (dt + np.log(-np.expm1(-dt))).astype(np.float32),  # softplus^-1(dt)
        "ssm_a": -r("a").uniform(1.0, 16.0, (N_SSM_HEAD, 1)).astype(np.float32),
        "ssm_d": np.zeros((N_SSM_HEAD, 1), np.float32),  # no skip: see the docstring
        "ssm_norm.weight": np.ones((N_GROUP, D_INNER // N_GROUP), np.float32),
    }
    if ssm_out_std:
        t["ssm_out.weight"] = (r("ssm_out").standard_normal((n_embd, D_INNER)) * ssm_out_std).astype(np.float16)
    else:
        t["ssm_out.weight"] = np.zeros((n_embd, D_INNER), np.float16)
    return {p + k: v for k, v in t.items()}


MAMBA2_HP = {"ssm.conv_kernel": D_CONV, "ssm.inner_size": D_INNER, "ssm.state_size": D_STATE,
             "ssm.time_step_rank": N_SSM_HEAD, "ssm.group_count": N_GROUP}


# -- the models ---------------------------------------------------------------------------

def _llama_hp(src: Source) -> dict[str, Any]:
    keep = ("context_length", "embedding_length", "feed_forward_length", "attention.head_count",
            "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon", "vocab_size",
            "rope.dimension_count", "block_count")
    return {k: src.hp[k] for k in keep}


def build_smollm2(src: Source) -> tuple[dict, dict]:
    return _llama_hp(src), dict(src.tensors)


def build_falcon_h1(src: Source, ssm_out_std: float) -> tuple[dict, dict]:
    hp = _llama_hp(src)
    n_embd, n_head, n_head_kv = hp["embedding_length"], hp["attention.head_count"], hp["attention.head_count_kv"]
    head_dim = n_embd // n_head
    hp.update({"attention.key_length": head_dim, "attention.value_length": head_dim, **MAMBA2_HP})
    t = {}
    for name, w in src.tensors.items():
        if name.endswith("attn_q.weight"):
            w = unpermute(w, n_head)
        elif name.endswith("attn_k.weight"):
            w = unpermute(w, n_head_kv)
        elif name.endswith("ffn_norm.weight"):
            name = name.removesuffix(".weight")
        t[name] = w
    for il in range(hp["block_count"]):
        t.update(mamba2_tensors("falcon-h1-graft", il, n_embd, ssm_out_std))
    return hp, t


def granite_layout(n_attn: int) -> list[int | None]:
    """Granite layer -> SmolLM2 layer (None: a Mamba2 layer)."""
    layers: list[int | None] = []
    for i in range(n_attn):
        layers.append(i)
        if i % GRANITE_MAMBA_EVERY == GRANITE_MAMBA_EVERY - 1:
            layers.append(None)
    return layers


def build_granitehybrid(src: Source, ssm_out_std: float) -> tuple[dict, dict]:
    hp = _llama_hp(src)
    n_embd, n_ff = hp["embedding_length"], hp["feed_forward_length"]
    layout = granite_layout(hp["block_count"])
    hp.update({
        "block_count": len(layout),
        "attention.head_count_kv": [0 if s is None else hp["attention.head_count_kv"] for s in layout],
        "rope.scaling.finetuned": True,
        "attention.scale": 1.0 / np.sqrt(n_embd // hp["attention.head_count"]).item(),
        "embedding_scale": 1.0, "residual_scale": 1.0, "logit_scale": 1.0,
        **MAMBA2_HP,
    })
    t = {k: w for k, w in src.tensors.items() if not k.startswith("blk.")}
    for il, s in enumerate(layout):
        if s is not None:
            for name, w in src.tensors.items():
                if name.startswith(f"blk.{s}."):
                    t[f"blk.{il}." + name.removeprefix(f"blk.{s}.")] = w
            continue
        t.update(mamba2_tensors("granitehybrid-graft", il, n_embd, ssm_out_std))
        t[f"blk.{il}.attn_norm.weight"] = np.ones(n_embd, np.float32)
        t[f"blk.{il}.ffn_norm.weight"] = np.ones(n_embd, np.float32)
        t[f"blk.{il}.ffn_gate.weight"] = np.zeros((n_ff, n_embd), np.float16)
        t[f"blk.{il}.ffn_up.weight"] = np.zeros((n_ff, n_embd), np.float16)
        t[f"blk.{il}.ffn_down.weight"] = np.zeros((n_embd, n_ff), np.float16)
    return hp, t


def _add_hp(w, arch: str, key: str, value: Any) -> None:
    import gguf
    k = f"{arch}.{key}"
    if isinstance(value, bool):
        w.add_bool(k, value)
    elif isinstance(value, (int, np.integer)):
        w.add_uint32(k, int(value))
    elif isinstance(value, (float, np.floating)):
        w.add_float32(k, float(value))
    elif isinstance(value, list):
        w.add_key_value(k, [int(v) for v in value], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)
    else:
        raise TypeError(f"{k}: cannot store {value!r}")


def write_gguf(path: Path, arch: str, name: str, src: Source, hp: dict, tensors: dict) -> None:
    """An F16 GGUF (vectors and the conv kernels F32), written atomically."""
    import gguf
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        w = gguf.GGUFWriter(tmp, arch)
        for key, value, vtype, sub in src.kvs:
            if key == "general.name":
                value = name
            w.add_key_value(key, value, vtype, sub)
        w.add_uint32("general.file_type", 1)  # LLAMA_FTYPE_MOSTLY_F16
        for key, value in hp.items():
            _add_hp(w, arch, key, value)
        for tname, data in tensors.items():
            w.add_tensor(tname, data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_model(arch: str, path: Path, src: Source | None = None, ssm_out_std: float | None = None) -> None:
    """Write the f16 graft of arch (or the f16 reference, arch "smollm2") to path."""
    src = src or read_source()
    if arch == SMOLLM2:
        hp, t = build_smollm2(src)
        write_gguf(path, "llama", "SmolLM2 135M Instruct (f16)", src, hp, t)
        return
    std = SSM_OUT_STD[arch] if ssm_out_std is None else ssm_out_std
    hp, t = build_falcon_h1(src, std) if arch == "falcon-h1" else build_granitehybrid(src, std)
    write_gguf(path, arch, f"SmolLM2 135M {arch} graft (Mamba2 ssm_out std {std:g})", src, hp, t)


def zero_ssm_out(src: Path, dst: Path) -> Path:
    """A copy of a graft with every ssm_out zeroed: the Mamba2 parts then add exactly 0, and the
    graft computes SmolLM2 (up to summation order).  Fast: a file copy and an in-place write."""
    import gguf
    shutil.copyfile(src, dst)
    r = gguf.GGUFReader(dst, "r+")
    n = 0
    for t in r.tensors:
        if t.name.endswith("ssm_out.weight"):
            t.data[...] = 0
            n += 1
    r.data.flush()
    del r
    if not n:
        raise ValueError(f"{src}: no ssm_out tensor")
    return dst


def quantize(src: Path, dst: Path, fmt: str, nthread: int = 0) -> None:
    """llama.cpp's llama_model_quantize (through the cffi bindings), written atomically."""
    from pyllama_ssm import _runtime
    from pyllama_ssm.bindings import ffi, lib
    _runtime.init()
    p = ffi.new("llama_model_quantize_params *", lib.llama_model_quantize_default_params())
    p.ftype = getattr(lib, FTYPES[fmt])
    p.nthread = nthread or len(os.sched_getaffinity(0))
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        _runtime.clear_errors()
        rc = lib.llama_model_quantize(str(src).encode(), str(tmp).encode(), p)
        if rc != 0:
            raise RuntimeError(f"quantizing {src.name} to {fmt} failed ({rc}): {_runtime.take_errors()}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


# -- the index --------------------------------------------------------------------------

def grafts_key(source: Path = SOURCE) -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(sha256_of(source).encode() if source.exists() else b"no source")
    h.update(BUILD_KEY.read_bytes() if BUILD_KEY.exists() else b"no patched build")
    h.update(f"numpy {np.__version__}".encode())
    for z in ZOO_QUANTIZED:  # the zoo files quantized here (generate.py's output is deterministic)
        f = DEFAULT_OUT / f"{z}.gguf"
        h.update(sha256_of(f).encode() if f.exists() else b"missing")
    return h.hexdigest()


ZOO_QUANTIZED = ("mamba2-tiny", "qwen35-tiny")  # from generate.py's zoo: recurrent, hybrid
ZOO_FORMATS = ("q8_0", "q4_0", "q4_k_m")


def _all_models() -> list[tuple[str, str]]:
    return [(SMOLLM2, f) for f in SMOLLM2_FORMATS] + [(a, f) for a in ARCHS for f in FORMATS] \
        + [(z, f) for z in ZOO_QUANTIZED for f in ZOO_FORMATS]


def read_index(out: Path = DEFAULT_OUT) -> dict | None:
    try:
        return json.loads((out / INDEX).read_text())
    except (OSError, ValueError):
        return None


def build_grafts(out: Path = DEFAULT_OUT, *, force: bool = False, log=None) -> dict:
    log = log or (lambda msg: print(msg, flush=True))
    key = grafts_key()
    old = read_index(out)
    if not force and old and old.get("key") == key and all(
            (out / e["file"]).exists() and (out / e["file"]).stat().st_size == e["bytes"]
            for e in old["models"].values()) and len(old["models"]) == len(_all_models()):
        log(f"grafts up to date: {len(old['models'])} models in {out}")
        return old
    t_all = time.time()
    t0 = time.time()
    src = read_source()
    log(f"  read + dequantized {SOURCE.name}: {time.time() - t0:.1f}s")
    models = {}
    for arch, fmt in _all_models():
        t0 = time.time()
        path = graft_path(arch, fmt, out)
        if arch in ZOO_QUANTIZED:
            quantize(out / f"{arch}.gguf", path, fmt)
        elif fmt == "f16":
            write_model(arch, path, src)
        else:
            quantize(graft_path(arch, "f16", out), path, fmt)
        models[model_name(arch, fmt)] = {
            "file": path.name,
            "arch": "llama" if arch == SMOLLM2 else arch.rsplit("-", 1)[0] if arch in ZOO_QUANTIZED else arch,
            "format": fmt,
            "ssm_out_std": SSM_OUT_STD.get(arch),
            "bytes": path.stat().st_size,
            "sha256": sha256_of(path),
        }
        log(f"  {path.name}: {path.stat().st_size / 1e6:.0f} MB, {time.time() - t0:.1f}s")
    index = {"key": key, "source": SOURCE.name, "seed": SEED, "models": models}
    tmp = out / f".{INDEX}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / INDEX)
    log(f"grafts: {len(models)} models in {time.time() - t_all:.1f}s in {out}")
    return index


# -- measuring (the tests and --measure) ------------------------------------------------------

def chat_tokens(model, question: str) -> list[int]:
    """The model's chat template applied to one user turn (llama_chat_apply_template), tokenized."""
    from pyllama_ssm.bindings import ffi, lib
    tmpl = model.chat_template()
    role, content = ffi.new("char[]", b"user"), ffi.new("char[]", question.encode())
    msg = ffi.new("llama_chat_message[1]")
    msg[0].role, msg[0].content = role, content
    buf = ffi.new("char[]", 4096)
    n = lib.llama_chat_apply_template(tmpl.encode() if tmpl else ffi.NULL, msg, 1, True, buf, 4096)
    if n < 0 or n > 4096:
        raise RuntimeError(f"chat template failed ({n})")
    return model.tokenize(ffi.buffer(buf, n)[:], add_special=True, parse_special=True)


def greedy(ctx, tokens: list[int], n: int, seq_id: int = 0) -> tuple[list[int], list[np.ndarray]]:
    """Greedy continuation of tokens (from an empty seq_id): the tokens, and the logits of every
    step (the prompt's last token, then each generated token but the last)."""
    ctx.seq_rm(seq_id)
    steps = [ctx.decode_tokens(tokens, seq_id)]
    out: list[int] = []
    for _ in range(n):
        tok = int(np.argmax(steps[-1]))
        if ctx.model.is_eog(tok):
            break
        out.append(tok)
        if len(out) < n:
            steps.append(ctx.decode_tokens([tok], seq_id))
    return out, steps


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def state_effect(ctx, tokens: list[int], top: int = 10) -> float:
    """How much the recurrent state carried across the middle of tokens moves the next token.

    tokens go in as two halves, twice, in sequence 0 of ctx (n_seq_max >= 2): straight on, and
    with the recurrent state dropped between the halves while the attention cells stay (the
    recurrent part of the empty sequence 1, read and written with
    LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY, replaces sequence 0's).  Both runs split the same way,
    so with the Mamba2 output at zero the two are equal.  Returns the largest |change| in
    log-probability over the `top` most likely next tokens of the straight run.
    """
    from pyllama_ssm.bindings import ffi, lib
    h = len(tokens) // 2
    ctx.seq_rm(0)
    ctx.decode_tokens(tokens[:h], 0)
    straight = log_softmax(ctx.decode_tokens(tokens[h:], 0))
    ctx.seq_rm(0)
    ctx.seq_rm(1)
    ctx.decode_tokens(tokens[:h], 0)
    flags = lib.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
    size = lib.llama_state_seq_get_size_ext(ctx.ptr, 1, flags)
    buf = ffi.new("uint8_t[]", size)
    n = lib.llama_state_seq_get_data_ext(ctx.ptr, buf, size, 1, flags)
    if lib.llama_state_seq_set_data_ext(ctx.ptr, buf, n, 0, flags) == 0:
        raise RuntimeError("dropping the recurrent state failed")
    reset = log_softmax(ctx.decode_tokens(tokens[h:], 0, pos0=h))
    ctx.seq_rm(0)
    idx = np.argsort(straight)[::-1][:top]
    return float(np.abs(straight[idx] - reset[idx]).max())


def measure(path: Path, n_gen: int = 40) -> dict:
    """Greedy answers to PROMPTS and state_effect on PROBE_TEXTS for one model file."""
    from pyllama_ssm import Context, Model
    with Model(path) as model, Context(model, n_ctx=512, n_seq_max=2, n_batch=256) as ctx:
        answers = []
        for q in PROMPTS:
            toks, _ = greedy(ctx, chat_tokens(model, q), n_gen)
            answers.append(model.detokenize(toks).decode("utf-8", "replace"))
        effects = [state_effect(ctx, model.tokenize(t)) for t in PROBE_TEXTS] if model.is_hybrid else []
    return {"answers": answers, "state_effect": effects}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--force", action="store_true", help="rebuild even when grafts.json is current")
    ap.add_argument("--measure", action="store_true",
                    help="write f16 grafts at each --scales value to a temporary folder and measure them")
    ap.add_argument("--scales", default="0,0.005,0.01,0.02,0.04")
    ap.add_argument("--arch", default=",".join(ARCHS))
    ap.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    args = ap.parse_args(argv)
    # quiet by default: Q4_K_M alone warns ~200 times that 576 columns do not fit Q4_K's 256-blocks
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR, format="%(message)s")
    if not args.measure:
        build_grafts(args.out, force=args.force)
        return 0
    import tempfile
    src = read_source()
    with tempfile.TemporaryDirectory() as d:
        for arch in args.arch.split(","):
            for s in (float(x) for x in args.scales.split(",")):
                path = Path(d) / f"{arch}-{s}.gguf"
                write_model(arch, path, src, s)
                m = measure(path)
                path.unlink()
                eff = m["state_effect"]
                print(f"{arch} ssm_out std {s:g}: state effect min {min(eff):.3f} max {max(eff):.3f} "
                      f"({', '.join(f'{e:.3f}' for e in eff)})", flush=True)
                for q, a in zip(PROMPTS, m["answers"]):
                    print(f"    {q!r} -> {a!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
