"""llama.cpp's hyperparameters, derived from GGUF metadata the way the pinned loader does.

src/llama-model.cpp (load_hparams), src/models/*.cpp (load_arch_hparams) and
src/llama-hparams.cpp turn metadata keys into per-layer arrays, head sizes and
recurrent-state sizes; llama_model::create_memory then decides which layers
keep an attention KV cache and which a recurrent state.  check() rejects the
values llama.cpp asserts on (aborting the process) instead of reporting;
derive() feeds the memory planner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from .errors import ModelLoadError

if TYPE_CHECKING:
    from .gguf import GGUFFile

MAX_LAYERS = 512               # LLAMA_MAX_LAYERS (src/llama-hparams.h)
MAX_EXPERTS = 1024             # LLAMA_MAX_EXPERTS
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # LLAMA_ROPE_SCALING_TYPES

RECURRENT_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})  # llm_arch_is_recurrent
# hybrids whose memory the planner models (llm_arch_is_hybrid minus the indexer/DSA ones below)
HYBRID_ARCHS = frozenset({"jamba", "falcon-h1", "plamo2", "granitehybrid", "lfm2", "lfm2moe", "nemotron_h",
                          "nemotron_h_moe", "qwen3next", "qwen35", "qwen35moe", "kimi-linear"})
# create_memory builds no memory for these (encoders, diffusion)
NO_MEMORY_ARCHS = frozenset({"bert", "jina-bert-v2", "jina-bert-v3", "nomic-bert", "nomic-bert-moe", "neo-bert",
                             "eurobert", "wavtokenizer-dec", "modern-bert", "gemma-embedding", "dream", "llada",
                             "llada-moe", "rnd1"})
# special memories (indexer caches, DSA/MSA, shared or reused layers): not modeled
UNMODELED_ARCHS = frozenset({"minimax-m3", "glm-dsa", "deepseek32", "glm5-next", "hy_v4", "dots3note", "deepseek4",
                             "dflash", "gemma3n", "gemma4", "gemma4-assistant", "bailingmoe3", "kimi-k3",
                             "qwen4exp", "minimax-01"})
MROPE_ARCHS = frozenset({"qwen2vl", "paddleocr", "qwen3vl", "qwen3vlmoe", "qwen35", "qwen35moe"})
# which layers are recurrent: "n_head_kv == 0" for these (jamba.cpp, lfm2.cpp, ... load_arch_hparams)
RECURRENT_IF_NO_KV_HEADS = frozenset({"jamba", "granitehybrid", "lfm2", "lfm2moe", "plamo2", "kimi-linear"})
GATED_DELTA_NET_ARCHS = frozenset({"qwen3next", "qwen35", "qwen35moe"})
MAMBA2_ARCHS = frozenset({"mamba2", "granitehybrid", "nemotron_h", "nemotron_h_moe", "falcon-h1"})


@dataclass(frozen=True)
class HParams:
    """What the memory of a context is made of, per layer."""

    arch: str
    n_layer_all: int        # block_count, NextN/MTP layers included
    n_layer: int            # the trunk (n_layer_all - nextn_predict_layers)
    n_embd: int
    n_vocab: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    head_k: int             # n_embd_head_k of full-attention layers
    head_v: int
    head_k_swa: int
    head_v_swa: int
    is_mla: bool            # latent attention: K only, no V cache
    is_swa: tuple[bool, ...]
    n_swa: int
    attention: tuple[bool, ...]  # the layer has an attention KV cache
    recurrent: tuple[bool, ...]  # the layer has a recurrent state
    n_embd_r: int           # conv / token-shift state per recurrent layer (f32 elements)
    n_embd_s: int           # ssm / wkv / delta-net state per recurrent layer

    def k_width(self, il: int) -> int:
        return (self.head_k_swa if self.is_swa[il] else self.head_k) * self.n_head_kv[il]

    def v_width(self, il: int) -> int:
        return 0 if self.is_mla else (self.head_v_swa if self.is_swa[il] else self.head_v) * self.n_head_kv[il]


def _int(g: GGUFFile, key: str, default: int) -> int:
    value = g.get_int(key)
    return default if value is None else value


def _per_layer(g: GGUFFile, key: str, n: int, default: list[int] | None) -> list[int] | None:
    """get_key_or_arr: one value for every layer, or an array of exactly n; None when malformed."""
    value = g.get(key)
    if value is None:
        return default
    if isinstance(value, np.ndarray):
        return [int(x) for x in value] if len(value) == n and value.dtype.kind in "biu" else None
    return [int(value)] * n if isinstance(value, int) else None


def check(g: GGUFFile) -> None:
    """Raise ModelLoadError on the metadata values llama.cpp asserts on while loading or decoding."""
    def fail(reason: str) -> ModelLoadError:
        return ModelLoadError(f"{g.path}: {reason}")

    arch = g.arch
    n_layer = g.get_int(".block_count")
    if n_layer is not None and not 1 <= n_layer <= MAX_LAYERS:
        raise fail(f"{arch}.block_count={n_layer}: must be in 1..{MAX_LAYERS}")
    n_nextn = _int(g, ".nextn_predict_layers", 0)
    if n_layer is not None and n_nextn > n_layer:
        raise fail(f"{arch}.nextn_predict_layers={n_nextn} exceeds block_count={n_layer}")
    _check_experts(g, fail)
    rope_scaling = g.get(".rope.scaling.type")
    if isinstance(rope_scaling, str) and rope_scaling not in ROPE_SCALING_TYPES:
        raise fail(f"{arch}.rope.scaling.type={rope_scaling!r}: expected one of {', '.join(ROPE_SCALING_TYPES)}")
    if n_layer is not None:
        _check_rope(g, n_layer, fail)
    _check_graph(g, fail)


def _check_experts(g: GGUFFile, fail: Callable[[str], ModelLoadError]) -> None:
    arch = g.arch
    n_expert = _int(g, ".expert_count", 0)
    used = g.get(".expert_used_count", 0)
    used_max = int(np.max(used)) if isinstance(used, np.ndarray) and used.size else used
    if not isinstance(used_max, int) or isinstance(used_max, bool):
        return  # a wrong type: llama.cpp reports it
    groups = _int(g, ".expert_group_count", 0)
    group_used = _int(g, ".expert_group_used_count", 0)
    if n_expert > MAX_EXPERTS:
        raise fail(f"{arch}.expert_count={n_expert} exceeds {MAX_EXPERTS}")
    if used_max > n_expert:
        raise fail(f"{arch}.expert_used_count={used_max} exceeds expert_count={n_expert}")
    if n_expert > 0:
        if used_max == 0:
            raise fail(f"{arch}.expert_count={n_expert} but expert_used_count is 0")
        if groups >= n_expert:
            raise fail(f"{arch}.expert_group_count={groups} must be below expert_count={n_expert}")
        if groups > 1 and (n_expert % groups or not 0 < group_used < groups):
            raise fail(f"{arch}: {n_expert} experts in {groups} groups with {group_used} used: "
                       f"groups must divide the experts and 0 < used < groups")
    elif groups:
        raise fail(f"{arch}.expert_group_count={groups} without experts")


def _check_rope(g: GGUFFile, n_layer: int, fail: Callable[[str], ModelLoadError]) -> None:
    """ggml_rope asserts n_rot <= head size, n_rot even, and (multi-section rope) sane sections."""
    arch = g.arch
    heads = _head_sizes(g, n_layer)
    if heads is None:
        return
    head_k, _, head_k_swa, _, n_rot, n_rot_swa = heads
    for rot, head, suffix in ((n_rot, head_k, ""), (n_rot_swa, head_k_swa, "_swa")):
        if rot > head or rot % 2:
            raise fail(f"{arch}.rope.dimension_count{suffix}={rot}: must be even and at most the "
                       f"head size {head}")
    sections = g.get(".rope.dimension_sections")
    if arch in MROPE_ARCHS and isinstance(sections, np.ndarray) and sections.dtype.kind in "iu":
        s = [int(x) for x in sections[:4]]
        if min(s) < 0 or sum(s[:3]) == 0 or sum(s) > head_k:
            raise fail(f"{arch}.rope.dimension_sections={s}: sections must be >= 0, the first three not all 0, "
                       f"and sum to at most the head size {head_k}")


def _check_graph(g: GGUFFile, fail: Callable[[str], ModelLoadError]) -> None:
    """Invariants the graph builders (src/models/*.cpp) assert when a context is created."""
    arch = g.arch
    for key in (".attention.layer_norm_epsilon", ".attention.layer_norm_rms_epsilon"):
        eps = g.get(key)
        if isinstance(eps, float) and not 0 <= eps < math.inf:
            raise fail(f"{arch}{key}={eps}: must be a finite number >= 0")
    n_embd, d_inner = g.get_int(".embedding_length"), g.get_int(".ssm.inner_size")
    n_heads, n_group = g.get_int(".ssm.time_step_rank"), g.get_int(".ssm.group_count")
    d_state = g.get_int(".ssm.state_size")
    rules: list[tuple[bool, str]] = []
    if arch in ("jamba", "granitehybrid") and None not in (n_embd, d_inner):
        rules.append((d_inner == 2 * n_embd, f"ssm.inner_size={d_inner} must be 2 x embedding_length={n_embd}"))
    if arch in MAMBA2_ARCHS and None not in (d_inner, n_heads, n_group):
        rules.append((n_heads > 0 and d_inner % n_heads == 0 and (n_group == 0 or d_inner % n_group == 0),
                      f"ssm.inner_size={d_inner} must divide into ssm.time_step_rank={n_heads} heads "
                      f"and ssm.group_count={n_group} groups"))
    if arch in GATED_DELTA_NET_ARCHS and None not in (d_inner, n_heads, n_group, d_state):
        rules.append((0 < n_group and 0 < n_heads and n_heads % n_group == 0 and d_state * n_heads == d_inner,
                      f"value heads ssm.time_step_rank={n_heads} must be a multiple of key heads "
                      f"ssm.group_count={n_group}, and ssm.inner_size={d_inner} = heads x ssm.state_size={d_state}"))
    head_k, head_v = g.get_int(".attention.key_length"), g.get_int(".attention.value_length")
    if arch == "jamba" and head_k != head_v:  # its graph shapes Q and K with the V head size
        rules.append((False, f"attention.key_length={head_k} must equal attention.value_length={head_v}"))
    if arch in ("rwkv6", "rwkv7"):
        shift = _int(g, ".token_shift_count", 2)
        rules.append((shift == 2, f"token_shift_count={shift}: this graph supports 2"))
    wkv, n_head_kv = g.get_int(".wkv.head_size"), g.get_int(".attention.head_count_kv")
    if arch in ("rwkv6", "rwkv6qwen2") and None not in (n_embd, wkv, n_head_kv) and wkv > 0 and n_head_kv:
        rules.append(((n_embd // wkv) % n_head_kv == 0,
                      f"{n_embd // wkv} wkv heads are not a multiple of attention.head_count_kv={n_head_kv}"))
    if arch in ("lfm2", "lfm2moe"):
        l_cache = _int(g, ".shortconv.l_cache", 2)
        rules.append((l_cache > 1, f"shortconv.l_cache={l_cache}: must be > 1"))
    for ok, reason in rules:
        if not ok:
            raise fail(f"{arch}.{reason}")


def _head_sizes(g: GGUFFile, n_layer: int) -> tuple[int, int, int, int, int, int] | None:
    """(head_k, head_v, head_k_swa, head_v_swa, n_rot, n_rot_swa) as load_hparams sets them; None if malformed."""
    n_embd = g.get_int(".embedding_length")
    n_head = _per_layer(g, ".attention.head_count", n_layer, [0] * n_layer)
    if n_embd is None or n_head is None:
        return None
    if n_head[0] > 0:
        head_k = _int(g, ".attention.key_length", n_embd // n_head[0])
        head_v = _int(g, ".attention.value_length", n_embd // n_head[0])
        n_rot = _int(g, ".rope.dimension_count", head_k)
    else:
        head_k = head_v = n_rot = 0
    if g.arch == "plamo2":  # re-reads the head sizes whatever the head count
        head_k = _int(g, ".attention.key_length", head_k)
        head_v = _int(g, ".attention.value_length", head_v)
    return (head_k, head_v, _int(g, ".attention.key_length_swa", head_k),
            _int(g, ".attention.value_length_swa", head_v), n_rot, _int(g, ".rope.dimension_count_swa", n_rot))


def derive(g: GGUFFile) -> HParams:
    """The hyperparameters that size a context's memory; ValueError for what the planner cannot model."""
    arch = g.arch
    if arch in UNMODELED_ARCHS:
        raise ValueError(f"{g.path}: the planner does not model the memory of {arch!r} models "
                         f"(indexer, DSA or shared-layer caches)")

    def need(key: str) -> int:
        value = g.get_int(key)
        if value is None:
            raise ValueError(f"{g.path}: {arch}{key} is missing or not an integer")
        return value

    n_layer_all = need(".block_count")
    n_layer = n_layer_all - _int(g, ".nextn_predict_layers", 0)
    n_embd = need(".embedding_length")
    n_vocab = _int(g, ".vocab_size", len(g.get("tokenizer.ggml.tokens", [])))

    def per_layer(key: str, default: list[int] | None) -> list[int]:
        values = _per_layer(g, key, n_layer_all, default)
        if values is None:
            raise ValueError(f"{g.path}: {arch}{key} must be an integer or {n_layer_all} integers")
        return values

    n_head = per_layer(".attention.head_count", [0] * n_layer_all)
    n_head_kv = per_layer(".attention.head_count_kv", n_head)
    n_ff = per_layer(".feed_forward_length", [0] * n_layer_all)
    head_k, head_v, head_k_swa, head_v_swa, _, _ = _head_sizes(g, n_layer_all)
    is_mla = _int(g, ".attention.key_length_mla", 0) != 0 and _int(g, ".attention.value_length_mla", 0) != 0

    recr = _recurrent_flags(g, arch, n_layer_all, n_layer, n_head_kv, n_ff)
    attention, recurrent = _memory_layers(g, arch, n_layer_all, n_layer, recr, n_ff)
    n_swa = _int(g, ".attention.sliding_window", 0)
    # lfm2: attention layers slide when a window is set; other archs' SWA patterns are not
    # modeled, which is exact when SWA layers are sized in full (swa_full, pyllama-ssm's default)
    is_swa = [arch in ("lfm2", "lfm2moe") and n_swa > 0 and not recr[il] for il in range(n_layer_all)]
    n_embd_r, n_embd_s = _state_sizes(g, n_embd, n_head)
    return HParams(arch, n_layer_all, n_layer, n_embd, n_vocab, tuple(n_head), tuple(n_head_kv), head_k, head_v,
                   head_k_swa, head_v_swa, is_mla, tuple(is_swa), n_swa, tuple(attention), tuple(recurrent),
                   n_embd_r, n_embd_s)


def _recurrent_flags(g: GGUFFile, arch: str, n_all: int, n_layer: int, n_head_kv: list[int],
                     n_ff: list[int]) -> list[bool]:
    """hparams.is_recr(il), as each architecture's load_arch_hparams sets it."""
    if arch in RECURRENT_ARCHS or arch == "falcon-h1":
        return [True] * n_all
    if arch in RECURRENT_IF_NO_KV_HEADS:
        return [il < n_layer and n_head_kv[il] == 0 for il in range(n_all)]
    if arch in ("nemotron_h", "nemotron_h_moe"):
        return [il < n_layer and n_head_kv[il] == 0 and n_ff[il] == 0 for il in range(n_all)]
    if arch in GATED_DELTA_NET_ARCHS:
        flags = _per_layer(g, ".attention.recurrent_layers", n_all, None)
        if flags is not None:
            return [bool(f) for f in flags]
        interval = _int(g, ".full_attention_interval", 4)
        return [il < n_layer and (il + 1) % interval != 0 for il in range(n_all)]
    return [False] * n_all


def _memory_layers(g: GGUFFile, arch: str, n_all: int, n_layer: int, recr: list[bool],
                   n_ff: list[int]) -> tuple[list[bool], list[bool]]:
    """Which layers create_memory gives a KV cache and which a recurrent state (its layer filters)."""
    layers = range(n_all)
    if arch in NO_MEMORY_ARCHS:
        return [False] * n_all, [False] * n_all
    if arch in RECURRENT_ARCHS:
        return [False] * n_all, [il < n_layer for il in layers]
    if arch == "falcon-h1":  # every layer has both
        return [True] * n_all, [il < n_layer for il in layers]
    if arch in ("nemotron_h", "nemotron_h_moe"):
        return ([not recr[il] and n_ff[il] == 0 for il in layers],
                [il < n_layer and recr[il] and n_ff[il] == 0 for il in layers])
    if arch in GATED_DELTA_NET_ARCHS:
        return [il < n_layer and not recr[il] for il in layers], [il < n_layer and recr[il] for il in layers]
    if arch in HYBRID_ARCHS:
        return [not recr[il] for il in layers], [il < n_layer and recr[il] for il in layers]
    # attention only: the trunk's layers (NextN/MTP heads get their own context)
    has_nextn = n_layer < n_all and n_layer > 0
    return [not has_nextn or il < n_layer for il in layers], [False] * n_all


def _state_sizes(g: GGUFFile, n_embd: int, n_head: list[int]) -> tuple[int, int]:
    """llama_hparams::n_embd_r() and n_embd_s(): f32 elements of one layer's conv and ssm states."""
    wkv = _int(g, ".wkv.head_size", 0)
    if wkv:  # RWKV: token shift + wkv state
        return _int(g, ".token_shift_count", 2) * n_embd, n_embd * wkv
    d_conv = _int(g, ".ssm.conv_kernel", 0)
    d_inner = _int(g, ".ssm.inner_size", 0)
    d_state = _int(g, ".ssm.state_size", 0)
    l_cache = _int(g, ".shortconv.l_cache", 0)
    if l_cache:  # LFM2 short convolution
        return n_embd * (l_cache - 1), d_state * d_inner
    kda = _int(g, ".kda.head_dim", 0)
    if kda:  # Kimi delta attention: conv over q, k, v and a head_dim^2 state per head
        return 3 * (d_conv - 1 if d_conv > 0 else 3) * n_head[0] * kda, kda * kda * n_head[0]
    n_group = _int(g, ".ssm.group_count", 0)
    return max(d_conv - 1, 0) * (d_inner + 2 * n_group * d_state), d_state * d_inner
