"""Sizing: the bytes a context allocates, computed as the pinned llama.cpp allocates them.

What Model and Context need at start-up (model facts from the GGUF, the shape of a context,
its buffers' bytes, the free-memory preflight that refuses a context the machine cannot hold)
without the planner's report, which compares setups for the CLI (planner.py).  KV and
recurrent bytes are exact (tests/test_planner.py checks them against the memory report of
real contexts); compute buffers are an estimate.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from . import gguf
from .bindings import ffi, lib
from .errors import ContextError
from .hparams import HParams, derive

CELL_PAD = 256          # llama_context pads n_ctx (and n_ctx_seq) to a multiple of 256
BUFFER_ALIGN = 32       # ggml's CPU buffer alignment: each tensor is padded to it
GiB = 1 << 30
MiB = 1 << 20
COMPONENTS = ("weights", "kv", "recurrent", "snapshots", "output", "compute")


def pad(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class ModelFacts:
    """What the planner needs from a GGUF file: hyperparameters and the weights per layer."""

    hp: HParams
    layer_weights: tuple[int, ...]   # bytes of blk.N.* tensors, per layer
    input_weights: int               # token embeddings: always on the CPU
    output_weights: int              # everything else (output head, final norm)
    has_tensors: bool                # False for metadata-only files: weights unknown


@functools.lru_cache(maxsize=16)
def _facts(path: str, mtime_ns: int, size: int) -> ModelFacts:  # noqa: ARG001 - cache key
    return facts_of(gguf.read(path, check_data=False))


def facts_of(g: gguf.GGUFFile) -> ModelFacts:
    """The planner's view of a parsed GGUF file."""
    hp = derive(g)
    layers = [0] * hp.n_layer_all
    inp = out = 0
    for t in g.tensors:
        nbytes = pad(t.nbytes, g.alignment)
        block, _, rest = t.name.partition(".")
        if block == "blk" and rest.split(".", 1)[0].isdigit() and int(rest.split(".", 1)[0]) < hp.n_layer_all:
            layers[int(rest.split(".", 1)[0])] += nbytes
        elif t.name.startswith("token_embd"):
            inp += nbytes
        else:
            out += nbytes
    return ModelFacts(hp, tuple(layers), inp, out, bool(g.tensors))


def model_facts(path: str | os.PathLike) -> ModelFacts:
    """Parsed once per file version (cached by path, mtime and size)."""
    try:
        st = os.stat(path)
    except OSError:
        gguf.read(path)  # raises the ModelLoadError that names the path and the reason
        raise
    return _facts(str(path), st.st_mtime_ns, st.st_size)


@dataclass(frozen=True)
class ContextShape:
    """One llama_context's memory parameters (llama_context_params, as pyllama_ssm.Context takes them)."""

    n_ctx: int
    n_seq_max: int = 1
    n_rs_pool: int = 0
    n_rs_seq: int = 0
    n_ubatch: int = 512
    type_k: str | int = "f16"   # a ggml type name or id
    type_v: str | int = "f16"
    kv_unified: bool = True
    swa_full: bool = True
    flash_attn: bool = True      # pyllama-ssm's "auto" sizes the V cache as flash attention does
    n_gpu_layers: int = 0
    attn_kv_per_seq: bool = False  # upstream before #19559: hybrid attention KV of n_ctx per sequence


def layer_on_gpu(il: int, n_layer_all: int, n_gpu_layers: int) -> bool:
    """llama.cpp's split: the last n_gpu_layers of (layers + output) go to the GPU; input stays on the CPU."""
    if n_gpu_layers < 0:
        return True
    return il >= n_layer_all + 1 - n_gpu_layers


def context_bytes(facts: ModelFacts, shape: ContextShape) -> dict[str, dict[str, int]]:
    """Bytes of one context's buffers: {component: {"CPU"/"GPU": bytes}} (weights not included)."""
    hp = facts.hp
    tk, tv = gguf.ggml_type(shape.type_k), gguf.ggml_type(shape.type_v)  # ValueError if unknown
    n_ctx = pad(shape.n_ctx, CELL_PAD)
    n_stream = 1 if shape.kv_unified else shape.n_seq_max
    kv_size = n_ctx if shape.kv_unified else pad(n_ctx // shape.n_seq_max, CELL_PAD)
    if shape.attn_kv_per_seq and any(hp.recurrent):
        n_stream = shape.n_seq_max
        kv_size = n_ctx
    swa_size = kv_size if shape.swa_full else \
        pad(min(kv_size, hp.n_swa * (shape.n_seq_max if shape.kv_unified else 1) + shape.n_ubatch), CELL_PAD)
    v_max = max((hp.v_width(il) for il in range(hp.n_layer_all)), default=0)
    rows = (max(1, shape.n_seq_max) + shape.n_rs_pool) * (1 + shape.n_rs_seq)
    out = {c: {"CPU": 0, "GPU": 0} for c in ("kv", "recurrent", "snapshots", "output", "compute")}
    snapshot_share = shape.n_rs_pool / (max(1, shape.n_seq_max) + shape.n_rs_pool)
    for il in range(hp.n_layer_all):
        dev = "GPU" if layer_on_gpu(il, hp.n_layer_all, shape.n_gpu_layers) else "CPU"
        if hp.attention[il]:
            cells = (swa_size if hp.is_swa[il] else kv_size) * n_stream
            v_width = hp.v_width(il) if shape.flash_attn or hp.is_mla else v_max
            out["kv"][dev] += pad(tk.row_bytes(hp.k_width(il)) * cells, BUFFER_ALIGN)
            out["kv"][dev] += pad(tv.row_bytes(v_width) * cells, BUFFER_ALIGN) if v_width else 0
        if hp.recurrent[il]:
            state = pad(hp.n_embd_r * 4 * rows, BUFFER_ALIGN) + pad(hp.n_embd_s * 4 * rows, BUFFER_ALIGN)
            snap = round(state * snapshot_share)
            out["recurrent"][dev] += state - snap
            out["snapshots"][dev] += snap
    head = "GPU" if layer_on_gpu(hp.n_layer_all, hp.n_layer_all, shape.n_gpu_layers) else "CPU"
    out["output"]["CPU"] = hp.n_vocab * max(1, shape.n_seq_max) * 4
    out["compute"][head] = compute_estimate(hp, min(shape.n_ubatch, n_ctx), kv_size, shape.flash_attn)
    return out


def compute_estimate(hp: HParams, n_ubatch: int, n_kv: int = 0, flash_attn: bool = True) -> int:
    """An estimate of the compute buffer: the larger of a ubatch of logits plus a few layer activations
    and, without flash attention, one layer's attention scores and their mask ((n_head + 1) x n_kv x
    n_ubatch floats; the graph allocator reuses one region for both).  At long contexts the scores,
    not the KV, dominate: 6 GiB at 8 x 128k on a small hybrid, where flash attention needs 1 GiB.

    The graph allocator's real figure depends on the graph; on the zoo models it
    is within 5% of this, on large models it grows with n_ff.
    """
    width = max(hp.n_embd * 4, max((h * hp.head_k for h in hp.n_head), default=0) * 3)
    heads = max((h for h, a in zip(hp.n_head, hp.attention) if a), default=0)
    scores = 0 if flash_attn or not heads else (heads + 1) * n_kv * n_ubatch
    return 4 * max(n_ubatch * (hp.n_vocab + width), scores)


def weights_bytes(facts: ModelFacts, n_gpu_layers: int) -> dict[str, int]:
    hp = facts.hp
    out = {"CPU": facts.input_weights, "GPU": 0}
    for il, nbytes in enumerate(facts.layer_weights):
        out["GPU" if layer_on_gpu(il, hp.n_layer_all, n_gpu_layers) else "CPU"] += nbytes
    out["GPU" if layer_on_gpu(hp.n_layer_all, hp.n_layer_all, n_gpu_layers) else "CPU"] += facts.output_weights
    return out


def human(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def available_memory() -> dict[str, int | None]:
    """Free bytes: RAM from /proc/meminfo MemAvailable; VRAM from the first GPU backend, if any."""
    ram = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    vram = None
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        if lib.ggml_backend_dev_type(dev) == lib.GGML_BACKEND_DEVICE_TYPE_GPU:
            free, total = ffi.new("size_t *"), ffi.new("size_t *")
            lib.ggml_backend_dev_memory(dev, free, total)
            vram = free[0]
            break
    return {"CPU": ram, "GPU": vram}


def preflight(path: str | os.PathLike, shape: ContextShape, facts: ModelFacts | None = None) -> None:
    """Raise ContextError before allocating a context the machine's memory cannot hold.

    facts: the file's, when already known (a loaded Model's), so it is not parsed again.
    """
    try:
        sizes = context_bytes(facts or model_facts(path), shape)
    except ValueError:
        return  # an architecture or cache type the planner does not model: llama.cpp decides
    need = {"CPU": 0, "GPU": 0}
    for devs in sizes.values():
        for dev, nbytes in devs.items():
            need[dev] += nbytes
    free = available_memory()
    if free["GPU"] is None:  # no GPU: what would be offloaded stays in RAM
        need = {"CPU": need["CPU"] + need["GPU"], "GPU": 0}
    for dev, what in (("CPU", "RAM (MemAvailable)"), ("GPU", "free VRAM")):
        if free[dev] is not None and need[dev] > free[dev]:
            raise ContextError(
                f"context for {Path(path).name} (n_ctx={shape.n_ctx}, n_seq_max={shape.n_seq_max}, "
                f"n_rs_pool={shape.n_rs_pool}) needs about {human(need[dev])} of {what} but {human(free[dev])} "
                f"is available: lower n_ctx or n_seq_max (`pyllama-ssm plan` shows the breakdown)")
