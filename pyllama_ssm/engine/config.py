"""An Engine's settings (EngineConfig) and how they divide its context (Sizing), both fixed at start-up.

Sizing is worked out from the config and the model before the context exists: how many sequence ids,
recurrent state cells and logits rows the prefix cache and speculative decoding need beside the
`parallel` sequences.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .. import memory as memory_mod
from ..bindings import has, lib
from ..context import _FLASH_ATTN, MAX_RS_CELLS, MAX_SEQ, MAX_TOKENS, ContextParams
from ..model import Model

log = logging.getLogger("pyllama_ssm.engine")
DRAFT_MAX = 16  # draft tokens verified per sequence and step, at most
# on the CPU, drafts while at most this many sequences decode: prompt lookup on the real-text grafts
# (bench/results/speculative_grafts.md, 2 cores) gave 3.14/1.05/0.95/0.69x (falcon-h1) and
# 2.72/1.96/1.26/0.98x (granitehybrid) the plain tokens/s at 1/2/4/8 sequences
DRAFT_SEQS_CPU = 4


@dataclass(frozen=True)
class EngineConfig:
    """Every setting of an Engine and of the context it creates, built once: Llama builds it from its
    arguments (the server's flags are Llama's), so no setting is lost on the way down.

    batch_invariant makes a request's output independent of what else runs and of prefix-cache hits:
    the same tokens and logprobs as its lone run, bit for bit (patch 0007, CPU kernels).  It holds with
    flash attention ("auto" picks it on the CPU); without it the attention of a unified KV cache sums
    over every cell, so results depend on where a sequence's cells lie.  None (the default): on wherever
    the build has it; False: llama.cpp's fastest kernel per shape (bench/batch_invariance.py: the cost).
    n_gpu_layers and rpc_servers (Model's) apply when the Engine loads the model from a path."""

    n_ctx: int = 4096
    parallel: int = 4
    n_batch: int = 512                             # tokens per step (one llama_decode)
    n_ubatch: int | None = None                    # tokens per compute pass within a step (None: n_batch)
    n_threads: int | None = None
    n_threads_batch: int | None = None
    prefix_cache: int | None = None                # entries (None: 32, or 3 per sequence if more; the
    #                                                byte budget bounds them too)
    prefix_cache_bytes: int | None = 256 << 20     # on its recurrent snapshots (prefix_cache.py); None: no bound
    flash_attn: bool | str = "auto"
    batch_invariant: bool | None = None
    # the context's other settings (rope, yarn, KV types, ...): typed, or a mapping of their names
    context_overrides: ContextParams | Mapping[str, Any] | None = None
    n_gpu_layers: int = 0
    rpc_servers: str | Sequence[str] | None = None
    # speculative decoding: a llama_cpp.llama_speculative.LlamaDraftModel (any callable from the token
    # ids so far to proposed next ids); each step verifies a sequence's proposal in the same batch, keeps
    # what the sampler agrees with, and undoes the rest (recurrent state from a snapshot of the pool)
    draft_model: Any = None
    # drafts only in steps where at most this many sequences decode (scheduler.drafts_pay); None: DRAFT_SEQS_CPU
    # when the model runs on the CPU (its steps are bound by arithmetic from a few sequences), any number
    # when its layers are offloaded
    draft_max_seqs: int | None = None

    def __post_init__(self) -> None:
        """Every setting checked here, once, when the config is made (and again by dataclasses.replace)."""
        def whole(name: str, lo: int, hi: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise ValueError(f"{name}={value!r}: must be an int in {lo}..{hi}" + (", or None" if optional else ""))
        whole("n_ctx", 0, MAX_TOKENS)
        whole("parallel", 1, MAX_SEQ)
        whole("n_batch", 1, MAX_TOKENS)
        for name in ("n_ubatch", "n_threads", "n_threads_batch"):
            whole(name, 1, MAX_TOKENS, optional=True)
        whole("prefix_cache", 0, MAX_RS_CELLS - self.parallel, optional=True)  # a pool cell per entry and sequence
        whole("prefix_cache_bytes", 0, 2**62, optional=True)
        whole("n_gpu_layers", -1, 2**31 - 1)
        if self.draft_max_seqs is not None and (not isinstance(self.draft_max_seqs, int) or isinstance(
                self.draft_max_seqs, bool) or self.draft_max_seqs < 0):
            raise ValueError(f"draft_max_seqs={self.draft_max_seqs!r}: must be an int >= 0 (0: no drafts), or None")
        if self.flash_attn not in _FLASH_ATTN:
            raise ValueError(f"flash_attn={self.flash_attn!r}: expected 'auto', True or False")
        if self.draft_model is not None and not callable(self.draft_model):
            raise ValueError(f"draft_model={self.draft_model!r}: expected a callable from token ids to proposed ids")
        object.__setattr__(self, "context_overrides", ContextParams.of(self.context_overrides))


@dataclass(frozen=True)
class Sizing:
    """How an Engine's context is divided, for one config and one model."""

    stateful: bool                 # recurrent or hybrid: prefixes and draft undo are pool snapshots
    n_cache: int                   # prefix-cache entries (0: no prefix cache)
    n_holders: int                 # spare sequence ids holding cached attention prefixes
    n_rs_pool: int                 # recurrent state pool cells (0: the context's default)
    draft_max: int                 # draft tokens per sequence and step (0: no speculative decoding)
    draft_seqs: int                # drafts while at most this many sequences decode
    overrides: ContextParams       # the config's, with the output rows unless it sets them
    n_outputs: int                 # logits rows one step may ask for

    @classmethod
    def of(cls, model: Model, cfg: EngineConfig) -> "Sizing":
        parallel = cfg.parallel
        stateful = model.is_recurrent or model.is_hybrid
        n_rs_pool, n_holders = 0, 0
        # a conversation keeps its turn boundary and its tail: room for both per sequence, and shared prefixes
        n_entries = cfg.prefix_cache if cfg.prefix_cache is not None else max(32, 3 * parallel)
        # draft tokens per sequence and step; on recurrent memory a rejected one is undone from a snapshot
        draft_max = 0 if cfg.draft_model is None or (stateful and not has("llama_memory_rs_snapshot")) \
            else max(1, min(DRAFT_MAX, int(getattr(cfg.draft_model, "num_pred_tokens", DRAFT_MAX))))
        if cfg.draft_model is not None and not draft_max:
            log.warning("draft_model: speculative decoding on %s needs the patched build's snapshots; "
                        "decoding without drafts", model.arch)
        if stateful:  # prefixes are snapshots of the recurrent pool (patched build only)
            n_cache = n_entries if has("llama_memory_rs_snapshot") else 0
            # one state cell per sequence + the prefix cache + one copy-on-write cell per sequence,
            # + one snapshot per sequence while its draft is verified
            n_rs_pool = n_cache + parallel if n_cache else 0
            if draft_max:
                n_rs_pool = (n_rs_pool or parallel) + parallel
        elif memory_mod.available():  # prefixes are held by spare sequence ids sharing their cells
            # (the patched build: entry sizes come from its memory report)
            n_cache = n_holders = max(0, min(n_entries, MAX_SEQ - parallel))
        else:
            n_cache = 0
        # a step outputs logits for one token per sequence, and one per draft token (plan_step shares
        # draft_max among them, at least one each): size the output buffer to that (upstream sizes it
        # to n_batch rows of n_vocab floats: 300 MiB for 512 x 152k)
        draft_rows = max(draft_max, parallel) if draft_max else 0
        overrides = cfg.context_overrides
        if overrides.n_outputs_max is None:
            overrides = replace(overrides, n_outputs_max=parallel + draft_rows + n_holders)
        n_outputs = overrides.n_outputs_max or cfg.n_batch  # 0: llama.cpp's default, n_batch
        offloaded = bool(model.n_gpu_layers) and lib.llama_supports_gpu_offload()
        draft_seqs = cfg.draft_max_seqs if cfg.draft_max_seqs is not None else parallel if offloaded else DRAFT_SEQS_CPU
        return cls(stateful, n_cache, n_holders, n_rs_pool, draft_max, draft_seqs, overrides, n_outputs)
