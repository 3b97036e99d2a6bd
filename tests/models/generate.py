#!/usr/bin/env python3
"""The random-weight model zoo: one GGUF per recurrent/hybrid architecture.

No model hub is reachable, so tests, demo and benchmarks run on models whose
weights are random but whose everything else is real: the hyperparameters go
through llama.cpp's own loader, the tensors are the ones llama.cpp itself
creates for the architecture (llama_model_init_from_user), the file is written
by llama.cpp's own saver (llama_model_save_to_file), and the tokenizer is a
real one, copied from the vocab-only GGUF files that ship with llama.cpp
(vendor/llama.cpp/models/ggml-vocab-*.gguf).

This is upstream's tests/test-llama-archs.cpp (get_gguf_ctx, set_tensor_data,
save_models) in Python, through our cffi bindings.

    python tests/models/generate.py                    # tiny zoo -> build/models/
    python tests/models/generate.py --size small       # tiny + the 100-300M variants
    python tests/models/generate.py --arch mamba,lfm2 --out /tmp/zoo

Models are named <arch>-<size> (arch: llama.cpp's name); <out>/index.json lists
them.  Output is deterministic (same seed -> byte-identical files) and cached:
when index.json carries the current key (sha256 of this file, of
build/patched/BUILD_KEY and of the numpy version) and every listed file is
there, nothing is generated.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from vendor import sha256_of  # noqa: E402
if str(ROOT) not in sys.path and os.environ.get("PYLLAMA_SSM_TEST_INSTALLED") != "1":  # tests/conftest.py
    sys.path.insert(0, str(ROOT))

# llama.cpp's libraries before numpy's: with numpy 2.5 (scipy-openblas) loaded first, a CUDA
# build of the pin segfaulted loading any model on an H200 host (Python 3.12); see the README.
import pyllama_ssm  # noqa: E402, F401
import numpy as np  # noqa: E402

VOCAB_DIR = ROOT / "vendor" / "llama.cpp" / "models"
DEFAULT_OUT = ROOT / "build" / "models"
BUILD_KEY = ROOT / "build" / "patched" / "BUILD_KEY"
INDEX = "index.json"

SEED = 42
STDEV = 0.1  # upstream's default stdev; used for vectors (biases, 1-D parameters)
SIZES = ("tiny", "small")
N_CTX_TRAIN = 4096


# -- architectures -----------------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    name: str         # llama.cpp's arch name (src/llama-arch.cpp)
    recurrent: bool   # llama_model_is_recurrent: every layer keeps a recurrent state
    hybrid: bool      # llama_model_is_hybrid: attention layers and recurrent layers
    vocab_tiny: str   # vendor/llama.cpp/models/ggml-vocab-<vocab>.gguf
    vocab_small: str
    moe: bool = False  # upstream's moe_mandatory(): needs the expert hparams

    def vocab(self, size: str) -> str:
        return self.vocab_tiny if size == "tiny" else self.vocab_small


# Vocabularies: the family's own where llama.cpp ships it and it is small enough
# for the size, else llama-spm (SentencePiece, 32000 tokens).  Shipped:
# llama-spm 32000, phi-3 32064, starcoder 49152, gpt-neox 50432, falcon 65024,
# qwen2 / qwen35 151936, ... (the 151936-token ones would make a tiny model 5x
# bigger than all its layers, so tiny Qwens use llama-spm).
ARCHS: dict[str, Arch] = {a.name: a for a in [
    # pure attention: the control
    Arch("llama",         False, False, "llama-spm", "llama-spm"),
    # pure recurrent
    Arch("mamba",         True,  False, "gpt-neox",  "gpt-neox"),   # state-spaces/mamba: GPT-NeoX tokenizer
    Arch("mamba2",        True,  False, "gpt-neox",  "gpt-neox"),
    Arch("rwkv6",         True,  False, "llama-spm", "llama-spm"),  # RWKV "world" vocab: not shipped
    Arch("rwkv7",         True,  False, "llama-spm", "llama-spm"),
    # hybrid: attention layers + recurrent layers
    Arch("jamba",         False, True,  "llama-spm", "llama-spm"),  # Jamba: SentencePiece (llama-like)
    Arch("falcon-h1",     False, True,  "llama-spm", "falcon"),
    Arch("granitehybrid", False, True,  "starcoder", "starcoder"),  # Granite: StarCoder BPE
    Arch("nemotron_h",    False, True,  "llama-spm", "llama-spm"),
    Arch("qwen3next",     False, True,  "llama-spm", "qwen2",  moe=True),
    Arch("qwen35",        False, True,  "llama-spm", "qwen35"),
    Arch("kimi-linear",   False, True,  "llama-spm", "llama-spm", moe=True),
    Arch("lfm2",          False, True,  "llama-spm", "llama-spm"),
    Arch("plamo2",        False, True,  "llama-spm", "llama-spm"),
]}

# All of them generate and decode on the pinned llama.cpp, RWKV included:
# upstream's test-llama-archs.cpp skips rwkv6/rwkv7 ("FIXME RWKV models hang
# indefinitely"), but on the CPU backend they load and decode 16-token prompts
# in milliseconds here (tests/test_zoo.py runs them under a timeout).
DEFAULT_ARCHS = list(ARCHS)

# tokenizer.ggml.pre for vocab files that lack it (llama.cpp then falls back to
# 'default' and warns "GENERATION QUALITY WILL BE DEGRADED" on every load):
# GPT-NeoX pre-tokenizes like GPT-2 (byte-level BPE, same split regex).
VOCAB_PRE = {"gpt-neox": "gpt-2"}

# The vocab-only files carry no chat template: each arch gets its family's from
# vendor/llama.cpp/models/templates (ChatML where the family ships none), so
# chat prompts work end to end.
TEMPLATE_DIR = ROOT / "vendor" / "llama.cpp" / "models" / "templates"
CHATML = "Qwen-Qwen2.5-7B-Instruct.jinja"
CHAT_TEMPLATES = {
    "llama": "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "qwen35": "Qwen3.5-4B.jinja", "qwen3next": "Qwen3.5-4B.jinja",
    "rwkv6": "llama-cpp-rwkv-world.jinja", "rwkv7": "llama-cpp-rwkv-world.jinja",
    "granitehybrid": "ibm-granite-granite-4.0.jinja",
    "nemotron_h": "NVIDIA-Nemotron-Nano-v2.jinja",
    "kimi-linear": "moonshotai-Kimi-K2.jinja",
    "lfm2": "LFM2.5-Instruct.jinja",
}


# -- hyperparameters (GGUF KVs without the "<arch>." prefix) ----------------------------

def _moe_kv(n_expert: int, n_used: int, n_ff_exp: int, n_ff_shexp: int) -> dict:
    return {
        "expert_count": n_expert,
        "expert_used_count": n_used,
        "expert_feed_forward_length": n_ff_exp,
        "expert_shared_feed_forward_length": n_ff_shexp,
        "expert_shared_count": 1,
        "interleave_moe_layer_step": 2,
        "expert_gating_func": 2,  # sigmoid
        "expert_group_scale": 1.0,
        "experts_per_group": 1,
    }


def hparams_tiny(arch: str, n_vocab: int) -> dict:
    """Upstream's get_gguf_ctx() (tests/test-llama-archs.cpp), restricted to these archs.

    One change: n_embd 128 / n_ff 192 (upstream: 256 / 384; kimi-linear already
    128 / 192 there) -- the real vocabularies make the token embedding and the
    output matrices the bulk of a tiny model, and this halves them.
    """
    n_embd, n_head, n_ff, n_layer = 128, 2, 192, 2
    if arch == "kimi-linear":
        n_head = 1
    elif arch == "nemotron_h":
        n_layer = 3
    n_embd_head = n_embd // n_head
    per_layer_heads = arch in ("plamo2", "jamba", "nemotron_h", "granitehybrid", "lfm2", "kimi-linear")
    # layer 1 recurrent (0 heads), the others attention
    heads = [0 if il == 1 else n_head for il in range(n_layer)] if per_layer_heads else n_head
    # nemotron_h: layer 0 attention, 1 mamba2, 2 FFN
    ff = [0 if il <= 1 else n_ff for il in range(n_layer)] if arch == "nemotron_h" else n_ff
    kv = {
        "vocab_size": n_vocab,
        "context_length": N_CTX_TRAIN,
        "embedding_length": n_embd,
        "features_length": n_embd,
        "block_count": n_layer,
        "leading_dense_block_count": 1,
        "feed_forward_length": ff,
        "use_parallel_residual": False,
        "logit_scale": 1.0,
        "time_mix_extra_dim": 64,
        "time_decay_extra_dim": 128,
        "full_attention_interval": 2,  # qwen3next/qwen35: layer 0 recurrent, layer 1 attention
        "attention.head_count": heads,
        "attention.head_count_kv": heads,
        "attention.max_alibi_bias": 8.0,
        "attention.clamp_kqv": 1.0,
        "attention.layer_norm_epsilon": 1e-5,
        "attention.layer_norm_rms_epsilon": 1e-5,
        "attention.group_norm_epsilon": 1e-5,
        "attention.group_norm_groups": 8,
        "attention.q_lora_rank": 512,
        "attention.kv_lora_rank": 512,
        "rope.dimension_sections": [n_embd_head // 4] * 4,
        "ssm.inner_size": 256 if arch in ("qwen3next", "qwen35") else 2 * n_embd,
        "ssm.conv_kernel": 4,
        "ssm.state_size": 128,
        "ssm.time_step_rank": n_head,
        "ssm.group_count": 0 if arch == "plamo2" else 2,
        "kda.head_dim": 128,
        "kda.safe_gate": True,
        "kda.gate_lower_bound": -5.0,
        "wkv.head_size": n_embd // n_head,
        "shortconv.l_cache": 3,
        "residual_scale": 3.5565588200778455,
    }
    if arch == "kimi-linear":
        kv.update({
            "attention.key_length": 576,
            "attention.value_length": 512,
            "rope.dimension_count": 64,
            "attention.key_length_mla": 192,
            "attention.value_length_mla": 128,
        })
    if arch == "rwkv7":  # required by its loader; upstream's fixture lacks them (its RWKV runs are disabled)
        kv.update({
            "attention.decay_lora_rank": 32,
            "attention.iclr_lora_rank": 32,
            "attention.value_residual_mix_lora_rank": 16,
            "attention.gate_lora_rank": 64,
        })
    if ARCHS[arch].moe:
        kv.update(_moe_kv(n_expert=2, n_used=2, n_ff_exp=n_ff, n_ff_shexp=n_ff // 2))
    return kv


def _pattern(n_layer: int, attn: callable, on, off) -> list:
    return [on if attn(il) else off for il in range(n_layer)]


def hparams_small(arch: str, n_vocab: int) -> dict:
    """100-300M parameters, shaped like the small real models of each family.

    Per-layer head counts follow convert_hf_to_gguf.py: hybrids mark their
    recurrent layers with head_count_kv 0 and (except plamo2) keep head_count a
    scalar -- a per-layer head_count of 0 on layer 0 makes the loader size the
    attention heads from n_head(0) = 0.
    """
    every4 = lambda il: il % 4 == 3  # noqa: E731 - 3 recurrent layers, then 1 attention layer
    base = {
        "vocab_size": n_vocab,
        "context_length": N_CTX_TRAIN,
        "embedding_length": 768,
        "attention.layer_norm_epsilon": 1e-5,
        "attention.layer_norm_rms_epsilon": 1e-5,
    }
    mamba2_mixer = {  # d_inner 1536 = 24 heads of 64
        "ssm.conv_kernel": 4, "ssm.inner_size": 1536, "ssm.state_size": 128,
        "ssm.time_step_rank": 24, "ssm.group_count": 1,
    }
    kv: dict
    if arch == "llama":
        kv = {"block_count": 12, "feed_forward_length": 2048, "attention.head_count": 12,
              "attention.head_count_kv": 4, "rope.dimension_count": 64}
    elif arch == "mamba":  # mamba-130m
        kv = {"block_count": 24, "ssm.conv_kernel": 4, "ssm.inner_size": 1536, "ssm.state_size": 16,
              "ssm.time_step_rank": 48}
    elif arch == "mamba2":  # mamba2-130m
        kv = {"block_count": 24, **mamba2_mixer}
    elif arch == "rwkv6":
        kv = {"block_count": 12, "feed_forward_length": 2688, "wkv.head_size": 64,
              "time_mix_extra_dim": 32, "time_decay_extra_dim": 64}
    elif arch == "rwkv7":  # rwkv7 0.1B
        kv = {"block_count": 12, "feed_forward_length": 3072, "wkv.head_size": 64,
              "attention.decay_lora_rank": 64, "attention.iclr_lora_rank": 64,
              "attention.value_residual_mix_lora_rank": 32, "attention.gate_lora_rank": 128}
    elif arch == "jamba":
        n = 12
        kv = {"block_count": n, "feed_forward_length": 2048,
              "attention.head_count": 12, "attention.head_count_kv": _pattern(n, every4, 4, 0),
              "ssm.conv_kernel": 4, "ssm.inner_size": 1536, "ssm.state_size": 16, "ssm.time_step_rank": 48}
    elif arch == "falcon-h1":  # every layer: attention and mamba2 side by side, then the FFN
        kv = {"block_count": 12, "feed_forward_length": 2048, "attention.head_count": 12,
              "attention.head_count_kv": 4, "attention.key_length": 64, "attention.value_length": 64,
              **mamba2_mixer}
    elif arch == "granitehybrid":  # granite-4.0-h: mamba2 layers, a few attention layers, FFN everywhere
        n = 12
        kv = {"block_count": n, "feed_forward_length": 2048,
              "attention.head_count": 12, "attention.head_count_kv": _pattern(n, every4, 4, 0),
              "embedding_scale": 12.0, "residual_scale": 0.22, "attention.scale": 0.015625,
              "logit_scale": 6.0, **mamba2_mixer}
    elif arch == "nemotron_h":  # layers are mamba2 (M), attention (*) or FFN (-): M-M*M- repeated
        n, kinds = 18, "M-M*M-"
        kind = lambda il: kinds[il % len(kinds)]  # noqa: E731
        kv = {"block_count": n,
              "feed_forward_length": [3072 if kind(il) == "-" else 0 for il in range(n)],
              "attention.head_count": 12,
              "attention.head_count_kv": [4 if kind(il) == "*" else 0 for il in range(n)],
              "attention.key_length": 64, "attention.value_length": 64,
              **mamba2_mixer, "ssm.group_count": 2}
    elif arch in ("qwen3next", "qwen35"):  # gated delta net x3, then gated attention; the vocab is 151936
        kv = {"embedding_length": 512, "block_count": 12, "full_attention_interval": 4,
              "attention.head_count": 8, "attention.head_count_kv": 2,
              "attention.key_length": 128, "attention.value_length": 128,
              "rope.dimension_count": 64, "rope.dimension_sections": [11, 11, 10, 0],
              "ssm.conv_kernel": 4, "ssm.state_size": 128, "ssm.group_count": 2,
              "ssm.time_step_rank": 4, "ssm.inner_size": 512}
        if arch == "qwen3next":
            kv.update(_moe_kv(n_expert=8, n_used=2, n_ff_exp=512, n_ff_shexp=512))
            kv["feed_forward_length"] = 1536
        else:
            kv["feed_forward_length"] = 2048
    elif arch == "kimi-linear":  # KDA x3, then MLA; layer 0 dense FFN, then MoE
        n = 8
        kv = {"block_count": n, "feed_forward_length": 2048, "leading_dense_block_count": 1,
              "attention.head_count": 8, "attention.head_count_kv": _pattern(n, every4, 1, 0),  # MLA as MQA
              "attention.q_lora_rank": 384, "attention.kv_lora_rank": 512,
              "attention.key_length": 576, "attention.value_length": 512,
              "attention.key_length_mla": 192, "attention.value_length_mla": 128,
              "rope.dimension_count": 64, "ssm.conv_kernel": 4, "kda.head_dim": 128,
              **_moe_kv(n_expert=16, n_used=4, n_ff_exp=512, n_ff_shexp=512)}
    elif arch == "lfm2":  # LFM2: short convolutions, attention on 6 of 16 layers
        n, attn = 16, {2, 5, 8, 10, 12, 14}
        kv = {"block_count": n, "feed_forward_length": 2560, "shortconv.l_cache": 3,
              "attention.head_count": 12,
              "attention.head_count_kv": [4 if il in attn else 0 for il in range(n)]}
    elif arch == "plamo2":  # mamba and attention layers alternate
        # Real PLaMo-2 starts with a mamba layer, but then n_head(0) = 0, llama.cpp's
        # loader leaves n_rot at 0 (rope.dimension_count is only read when
        # n_head(0) > 0) and the first decode spins forever in ggml's rope kernel
        # (pinned llama.cpp, CPU).  So attention comes first here.
        n = 12
        even = lambda il: il % 2 == 0  # noqa: E731
        kv = {"block_count": n, "feed_forward_length": 2048,
              "attention.head_count": _pattern(n, even, 12, 0),
              "attention.head_count_kv": _pattern(n, even, 4, 0),
              "attention.key_length": 64, "attention.value_length": 64, "rope.dimension_count": 64,
              "ssm.conv_kernel": 4, "ssm.inner_size": 1536, "ssm.state_size": 64,
              "ssm.time_step_rank": 12, "ssm.group_count": 0}
    else:
        raise KeyError(arch)
    return {**base, **kv}


def hparams(arch: str, size: str, n_vocab: int) -> dict:
    return hparams_tiny(arch, n_vocab) if size == "tiny" else hparams_small(arch, n_vocab)


# Tensors stored as F16 (the rest: F32, llama_model_init_from_user's default).
# tiny: the two vocabulary matrices; small: also every large matrix that is only
# used as the weight of a matmul (never in an element-wise op, which wants F32).
F16_ALWAYS = ("token_embd.weight", "output.weight")
F16_SMALL_LAYER = [
    f"{t}.weight" for t in (
        "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "attn_gate", "attn_q_a", "attn_q_b",
        "attn_kv_a_mqa",
        "ffn_up", "ffn_down", "ffn_gate", "ffn_up_exps", "ffn_down_exps", "ffn_gate_exps",
        "ffn_gate_up_exps", "ffn_up_shexp", "ffn_down_shexp", "ffn_gate_shexp",
        "ssm_in", "ssm_out", "ssm_x", "shortconv.in_proj", "shortconv.out_proj",
        "time_mix_key", "time_mix_value", "time_mix_receptance", "time_mix_gate", "time_mix_output",
        "channel_mix_key", "channel_mix_value", "channel_mix_receptance",
    )
]


def tensor_types(size: str, n_layer: int) -> dict[str, str]:
    """Type overrides by tensor name; names the architecture lacks are ignored by the loader."""
    types = dict.fromkeys(F16_ALWAYS, "F16")
    if size == "small":
        for il in range(n_layer):
            types.update(dict.fromkeys((f"blk.{il}.{t}" for t in F16_SMALL_LAYER), "F16"))
    return types


# -- tensor data ----------------------------------------------------------------------

def tensor_values(seed: int, model: str, name: str, ne: tuple[int, ...]) -> np.ndarray:
    """Deterministic random values for one tensor (float32, ggml order: ne[0] fastest).

    Upstream draws everything from normal(0, stdev) seeded by seed ^ hash(name),
    with "ssm_a" made negative.  Here matrices get stdev 1/sqrt(fan-in) instead,
    norm weights are centred on 1 and the optional per-tensor ".scale" /
    ".input_scale" tensors (which llama.cpp creates for every matmul weight when
    building a model from metadata) are exactly 1: with upstream's values those
    multiply every projection by ~0.1, the layers' outputs vanish and the logits
    hardly depend on the context -- useless for testing recurrent state.
    """
    digest = hashlib.sha256(f"{model}/{name}".encode()).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *words])))
    n = int(np.prod(ne))
    if name.endswith((".scale", ".input_scale")) or "rope_freqs" in name or "rope_factors" in name:
        return np.ones(n, dtype=np.float32)
    vals = rng.standard_normal(n, dtype=np.float32)
    std = 1.0 / np.sqrt(ne[0]) if len(ne) > 1 and ne[1] > 1 else STDEV
    vals *= np.float32(std)
    if "ssm_a" in name:  # Mamba's A must be negative (state decay)
        np.negative(np.abs(vals), out=vals)
    elif "norm" in name:
        vals += np.float32(1.0)
    return vals


class _Fill:
    """State shared with the set-tensor-data callback."""

    def __init__(self, seed: int, model: str):
        self.seed = seed
        self.model = model
        self.error: BaseException | None = None


_callback_installed = False


def _install_callback() -> None:
    global _callback_installed
    if _callback_installed:
        return
    from pyllama_ssm.bindings import ffi, lib

    @ffi.def_extern(name="_pyllama_set_tensor_data")
    def _set_tensor_data(tensor, user_data):
        fill: _Fill = ffi.from_handle(user_data)
        if fill.error is not None:
            return
        try:
            name = ffi.string(tensor.name).decode()
            ne = tuple(int(tensor.ne[i]) for i in range(4))
            vals = tensor_values(fill.seed, fill.model, name, ne)
            if tensor.type == lib.GGML_TYPE_F32:
                data = vals
            elif tensor.type == lib.GGML_TYPE_F16:
                data = vals.astype(np.float16)  # IEEE half == ggml_fp16_t
            else:
                raise TypeError(f"{name}: no generator for ggml type {tensor.type}")
            nbytes = lib.ggml_nbytes(tensor)
            if data.nbytes != nbytes:
                raise ValueError(f"{name}: {data.nbytes} bytes generated, tensor holds {nbytes}")
            lib.ggml_backend_tensor_set(tensor, ffi.from_buffer(data), 0, nbytes)
        except BaseException as e:  # noqa: BLE001 - raised again once the C call returns
            fill.error = e

    _callback_installed = True


def _set_kv(ctx, key: str, value) -> None:
    """gguf_set_*: like llama_model_saver::add_kv (vectors become GGUF arrays)."""
    from pyllama_ssm.bindings import ffi, lib
    k = key.encode()
    if isinstance(value, bool):
        lib.gguf_set_val_bool(ctx, k, value)
    elif isinstance(value, int):
        lib.gguf_set_val_u32(ctx, k, value)
    elif isinstance(value, float):
        lib.gguf_set_val_f32(ctx, k, value)
    elif isinstance(value, str):
        lib.gguf_set_val_str(ctx, k, value.encode())
    elif isinstance(value, list) and value and all(type(v) is int for v in value):
        lib.gguf_set_arr_data(ctx, k, lib.GGUF_TYPE_UINT32, ffi.new("uint32_t[]", value), len(value))
    elif isinstance(value, list) and value and all(type(v) is float for v in value):
        lib.gguf_set_arr_data(ctx, k, lib.GGUF_TYPE_FLOAT32, ffi.new("float[]", value), len(value))
    else:
        raise TypeError(f"{key}: cannot store {value!r} in GGUF")


def vocab_path(vocab: str) -> Path:
    return VOCAB_DIR / f"ggml-vocab-{vocab}.gguf"


def _copy_tokenizer(dst, path: Path) -> int:
    """Copy the tokenizer.* KVs of a vocab-only GGUF into dst; returns its token count.

    The vocab files also carry their own arch's hparams (llama.block_count, ...),
    which must not leak into the model.
    """
    from pyllama_ssm.bindings import ffi, lib
    params = ffi.new("struct gguf_init_params *", {"no_alloc": True, "ctx": ffi.NULL})
    src = lib.gguf_init_from_file(str(path).encode(), params[0])
    if src == ffi.NULL:
        raise RuntimeError(f"{path}: not a readable GGUF file")
    tmp = lib.gguf_init_empty()
    try:
        lib.gguf_set_kv(tmp, src)
        keys = [ffi.string(lib.gguf_get_key(tmp, i)).decode() for i in range(lib.gguf_get_n_kv(tmp))]
        for key in keys:
            if not key.startswith("tokenizer."):
                lib.gguf_remove_key(tmp, key.encode())
        lib.gguf_set_kv(dst, tmp)
        kid = lib.gguf_find_key(src, b"tokenizer.ggml.tokens")
        if kid < 0:
            raise RuntimeError(f"{path}: no tokenizer.ggml.tokens")
        return int(lib.gguf_get_arr_n(src, kid))
    finally:
        lib.gguf_free(tmp)
        lib.gguf_free(src)


def generate(arch: str, size: str, path: Path, seed: int = SEED) -> dict:
    """Write the model <arch>-<size> to path (atomically); returns its index entry."""
    from pyllama_ssm import _runtime
    from pyllama_ssm.bindings import ffi, lib
    _runtime.init()
    _install_callback()
    spec = ARCHS[arch]
    name = f"{arch}-{size}"
    vocab = spec.vocab(size)

    ctx = lib.gguf_init_empty()
    try:
        n_vocab = _copy_tokenizer(ctx, vocab_path(vocab))
        if vocab in VOCAB_PRE:
            _set_kv(ctx, "tokenizer.ggml.pre", VOCAB_PRE[vocab])
        if lib.gguf_find_key(ctx, b"tokenizer.chat_template") < 0:
            template = TEMPLATE_DIR / CHAT_TEMPLATES.get(arch, CHATML)
            _set_kv(ctx, "tokenizer.chat_template", template.read_text())
        _set_kv(ctx, "general.architecture", arch)
        _set_kv(ctx, "general.name", name)
        kv = hparams(arch, size, n_vocab)
        for key, value in kv.items():
            _set_kv(ctx, f"{arch}.{key}", value)
        t = ffi.new("struct ggml_tensor *")  # zeroed: only .name and .type matter
        for tname, ttype in tensor_types(size, kv["block_count"]).items():
            ffi.memmove(t.name, tname.encode() + b"\0", len(tname) + 1)
            t.type = getattr(lib, f"GGML_TYPE_{ttype}")
            lib.gguf_add_tensor(ctx, t)

        fill = _Fill(seed, name)
        handle = ffi.new_handle(fill)
        mparams = lib.llama_model_default_params()
        no_devices = ffi.new("ggml_backend_dev_t[1]")  # {NULL}: CPU only, like upstream's save_models()
        mparams.devices = no_devices
        mparams.n_gpu_layers = 0
        _runtime.clear_errors()
        model = lib.llama_model_init_from_user(ctx, lib._pyllama_set_tensor_data, handle, mparams)
        if model == ffi.NULL:
            raise RuntimeError(f"{name}: llama.cpp could not create the model: {_runtime.take_errors()}")
        try:
            if fill.error is not None:
                raise RuntimeError(f"{name}: generating tensor data failed: {fill.error}") from fill.error
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                lib.llama_model_save_to_file(model, str(tmp).encode())
                # read it back: the file must load, and its parameter count is what users see
                # (a tensor the loader creates twice, like a shared rope_freqs, is saved once)
                saved = lib.llama_model_load_from_file(str(tmp).encode(), mparams)
                if saved == ffi.NULL:
                    raise RuntimeError(f"{name}: the saved file does not load: {_runtime.take_errors()}")
                n_params = int(lib.llama_model_n_params(saved))
                lib.llama_model_free(saved)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        finally:
            lib.llama_model_free(model)
    finally:
        lib.gguf_free(ctx)

    return {
        "file": path.name,
        "arch": arch,
        "size": size,
        "vocab": vocab,
        "n_vocab": n_vocab,
        "n_params": n_params,
        "bytes": path.stat().st_size,
        "sha256": sha256_of(path),
        "recurrent": spec.recurrent,
        "hybrid": spec.hybrid,
    }


# -- the zoo -------------------------------------------------------------------------------

def zoo_key(seed: int = SEED) -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(BUILD_KEY.read_bytes() if BUILD_KEY.exists() else b"no patched build")
    h.update(f"numpy {np.__version__} seed {seed}".encode())
    return h.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def build_zoo(out: Path, archs: list[str], sizes: list[str], *, force: bool = False,
              log=None) -> dict:
    """Generate what is missing or stale; returns the index."""
    log = log or (lambda msg: print(msg, flush=True))
    key = zoo_key()
    index_path = out / INDEX
    index = {"key": key, "models": {}}
    if index_path.exists():  # entries of other archs and sizes stay listed
        try:
            old = json.loads(index_path.read_text())
        except ValueError:
            old = {}
        if old.get("key") == key:
            index = old
    todo = []
    for size in sizes:
        for arch in archs:
            name = f"{arch}-{size}"
            entry = index["models"].get(name)
            f = out / f"{name}.gguf"
            if force or entry is None or not f.exists() or f.stat().st_size != entry["bytes"]:
                todo.append((arch, size))
    if not todo:
        log(f"model zoo up to date: {len(index['models'])} models in {out}")
        return index
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    for arch, size in todo:
        t0 = time.time()
        entry = generate(arch, size, out / f"{arch}-{size}.gguf")
        index["models"][f"{arch}-{size}"] = entry
        log(f"  {arch}-{size}: {entry['n_params'] / 1e6:.1f}M params, vocab {entry['vocab']} "
            f"({entry['n_vocab']}), {entry['bytes'] / 1e6:.1f} MB, {time.time() - t0:.1f}s")
    # written once, at the end: until then readers (tests running meanwhile) see the old index
    _write_json(index_path, index)
    total = sum(e["bytes"] for e in index["models"].values())
    log(f"model zoo: {len(todo)} generated in {time.time() - t_all:.1f}s; "
        f"{len(index['models'])} models, {total / 1e6:.0f} MB in {out}")
    return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="tiny",
                    help="tiny (default): the test zoo; small: the tiny zoo plus 100-300M-parameter variants")
    ap.add_argument("--arch", default=None,
                    help=f"comma-separated llama.cpp arch names (default: all: {','.join(DEFAULT_ARCHS)})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    ap.add_argument("--force", action="store_true", help="regenerate even when up to date")
    ap.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR, format="%(message)s")
    archs = args.arch.split(",") if args.arch else DEFAULT_ARCHS
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        ap.error(f"unknown arch {', '.join(unknown)}; known: {', '.join(ARCHS)}")
    sizes = ["tiny"] if args.size == "tiny" else ["tiny", "small"]
    build_zoo(args.out, archs, sizes, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
