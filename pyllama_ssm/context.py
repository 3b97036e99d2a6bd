"""A llama_context: the memory (KV cache and/or recurrent states) of N sequences."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

import numpy as np

from . import _runtime, memory, sizing
from .batch import Batch
from .bindings import ffi, has, lib, set_fields
from .errors import (ContextError, DecodeError, MemoryFullError, PoolExhaustedError, SnapshotError,
                     StateError)
from .model import Model

MAX_SEQ = 256  # LLAMA_MAX_SEQ in src/llama-cparams.h
MAX_TOKENS = 2**31 - 256  # positions are int32, and n_ctx is padded up to a multiple of 256
MAX_RS_CELLS = 2**16  # each recurrent cell is a whole state: far beyond any memory

# llama_rs_error codes of the snapshot pool (include/llama-ssm.h)
_RS_ERRORS = {
    -1: (SnapshotError, "the model has no recurrent state"),
    -2: (PoolExhaustedError, "the shared recurrent pool is full: raise n_rs_pool or release snapshots"),
    -3: (SnapshotError, "sequence id out of range"),
    -4: (SnapshotError, "unknown or released snapshot handle"),
    -5: (SnapshotError, "the sequence holds no state yet"),
    -6: (SnapshotError, "unsupported here (hybrid with kv_unified=False, indexer cache, or pending n_rs_seq rollback)"),
    -7: (SnapshotError, "no sequence id left to hold the snapshot's attention cells"),
}

_FLASH_ATTN = {"auto": lib.LLAMA_FLASH_ATTN_TYPE_AUTO, True: lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
               False: lib.LLAMA_FLASH_ATTN_TYPE_DISABLED}


@dataclass(frozen=True)
class ContextParams:
    """The llama_context_params a caller sets beside the sizes the runtime works out (n_ctx, batches, sequences,
    threads, flash attention, which Context takes by name): llama-cpp-python's Llama arguments of the same
    names, typed and checked once, where they are made (Llama, EngineConfig, the server's flags through
    Llama).  None: llama.cpp's default.  Context's `overrides` also takes a raw mapping of any field (a
    callback, a field of this build only); above it these are the settings."""

    rope_scaling_type: Optional[int] = None  # LLAMA_ROPE_SCALING_TYPE_*, -1 unspecified (the model's)
    pooling_type: Optional[int] = None       # LLAMA_POOLING_TYPE_*, -1 unspecified
    attention_type: Optional[int] = None     # LLAMA_ATTENTION_TYPE_*, -1 unspecified
    rope_freq_base: Optional[float] = None   # 0: the model's
    rope_freq_scale: Optional[float] = None
    yarn_ext_factor: Optional[float] = None
    yarn_attn_factor: Optional[float] = None
    yarn_beta_fast: Optional[float] = None
    yarn_beta_slow: Optional[float] = None
    yarn_orig_ctx: Optional[int] = None
    offload_kqv: Optional[bool] = None
    no_perf: Optional[bool] = None
    op_offload: Optional[bool] = None
    swa_full: Optional[bool] = None
    type_k: Optional[int] = None             # ggml_type of the KV cache's K and V
    type_v: Optional[int] = None
    n_outputs_max: Optional[int] = None      # logits rows a decode may ask for (0: n_batch)

    def __post_init__(self) -> None:
        whole = {"rope_scaling_type": (-1, lib.LLAMA_ROPE_SCALING_TYPE_MAX_VALUE),
                 "pooling_type": (-1, lib.LLAMA_POOLING_TYPE_RANK),
                 "attention_type": (-1, lib.LLAMA_ATTENTION_TYPE_NON_CAUSAL), "yarn_orig_ctx": (0, MAX_TOKENS),
                 "type_k": (0, lib.GGML_TYPE_COUNT - 1), "type_v": (0, lib.GGML_TYPE_COUNT - 1),
                 "n_outputs_max": (0, MAX_TOKENS)}
        real = {"rope_freq_base", "rope_freq_scale", "yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast",
                "yarn_beta_slow"}
        for f in fields(self):
            name, value = f.name, getattr(self, f.name)
            if value is None:
                continue
            if name in whole:
                lo, hi = whole[name]
                if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                    raise ContextError(f"{name}={value!r}: must be an integer in {lo}..{hi}")
            elif name in real:
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                    raise ContextError(f"{name}={value!r}: must be a finite number")
            elif isinstance(value, int) and value in (0, 1):  # as llama-cpp-python (ctypes): 0 and 1 too
                object.__setattr__(self, name, bool(value))
            else:
                raise ContextError(f"{name}={value!r}: must be True or False")

    @classmethod
    def of(cls, values: "ContextParams | Mapping[str, Any] | None") -> "ContextParams":
        """These settings from a mapping by name (an unknown name is a TypeError naming it)."""
        if values is None or isinstance(values, ContextParams):
            return values or cls()
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"context settings: no setting {', '.join(map(repr, unknown))} "
                            f"(settings: {', '.join(f.name for f in fields(cls))})")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """The llama_context_params fields to set (those left None keep llama.cpp's default)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def invariant_by_default(batch_invariant: bool | None) -> bool:
    """batch_invariant=None, the default above the bindings: on wherever the build has it (patch 0007), so
    an answer does not depend on load, on the prefix cache or on n_parallel; False is the documented switch
    back to llama.cpp's fastest kernel per shape (and what parity with stock llama-cpp-python needs)."""
    return has("llama_set_batch_invariant") if batch_invariant is None else bool(batch_invariant)


class Context:
    """An inference context over a Model.

    Sequences 0..n_seq_max-1 share the context's memory.  Use as a context
    manager or call close(); the model must outlive the context.
    """

    _free = lib.llama_free  # kept on the class: __del__ may run after module teardown

    def __init__(self, model: Model, *, n_ctx: int = 0, n_batch: int = 512, n_ubatch: int = 512,
                 n_seq_max: int = 1, n_rs_seq: int = 0, n_rs_pool: int = 0, n_threads: int | None = None,
                 n_threads_batch: int | None = None, kv_unified: bool = True,
                 flash_attn: bool | str = "auto", embeddings: bool = False, swa_full: bool = True,
                 batch_invariant: bool | None = False, overrides: ContextParams | Mapping[str, Any] | None = None):
        """batch_invariant: each sequence's logits do not depend on the other sequences of a step
        or on how its tokens were split into steps (patch 0007; with flash attention, which skips
        other sequences' cells).  Off: llama.cpp's fastest kernel for each shape.  None: on where the
        build has it (the default of Llama, Engine and the server: invariant_by_default)."""
        for name, value, lo, hi in (("n_ctx", n_ctx, 0, MAX_TOKENS), ("n_batch", n_batch, 1, MAX_TOKENS),
                                    ("n_ubatch", n_ubatch, 1, MAX_TOKENS), ("n_seq_max", n_seq_max, 1, MAX_SEQ),
                                    ("n_rs_seq", n_rs_seq, 0, MAX_RS_CELLS), ("n_rs_pool", n_rs_pool, 0, MAX_RS_CELLS)):
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise ContextError(f"{name}={value!r}: must be an integer in {lo}..{hi}"
                                   + (" (0 = the model's training context)" if name == "n_ctx" else ""))
        if n_rs_pool and not has("llama_memory_rs_snapshot"):
            raise ContextError(f"n_rs_pool={n_rs_pool}: the snapshot pool needs the patched build")
        if flash_attn not in _FLASH_ATTN:
            raise ContextError(f"flash_attn={flash_attn!r}: expected 'auto', True or False")
        batch_invariant = invariant_by_default(batch_invariant)
        if batch_invariant and not has("llama_set_batch_invariant"):
            raise ContextError("batch_invariant=True: needs the patched build (patch 0007)")
        self.model = model
        p = lib.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = min(n_ubatch, n_batch)
        p.n_seq_max = n_seq_max
        p.n_rs_seq = n_rs_seq
        p.n_threads = n_threads or default_threads()
        p.n_threads_batch = n_threads_batch or p.n_threads
        p.kv_unified = kv_unified
        p.flash_attn_type = _FLASH_ATTN[flash_attn]
        p.embeddings = embeddings
        p.swa_full = swa_full
        # rope, yarn, type_k/v, pooling, ...: the settings, or any field by name
        set_fields(p, overrides.as_dict() if isinstance(overrides, ContextParams) else overrides or {},
                   "llama_context_params")
        if 0 < p.n_outputs_max < n_seq_max:  # llama.cpp asserts (aborts) on this at the first decode
            raise ContextError(f"n_outputs_max={p.n_outputs_max}: must be 0 (= n_batch) or >= n_seq_max={n_seq_max}")
        self.params = p
        if model.facts is not None:  # else an architecture sizing does not model: llama.cpp decides
            sizing.preflight(model.path, sizing.ContextShape(
                n_ctx or model.n_ctx_train, n_seq_max, n_rs_pool, n_rs_seq, p.n_ubatch, p.type_k, p.type_v,
                kv_unified, swa_full, flash_attn is not False, model.n_gpu_layers), model.facts)
        _runtime.clear_errors()
        if has("llama_init_from_model_ssm"):  # the series' settings travel beside upstream's struct
            ssm = lib.llama_ssm_context_default_params()
            ssm.n_rs_pool = n_rs_pool
            ptr = lib.llama_init_from_model_ssm(model.ptr, p, ssm)
        else:
            ptr = lib.llama_init_from_model(model.ptr, p)
        if ptr == ffi.NULL:
            raise ContextError(f"context for {model.path.name} (n_ctx={n_ctx}, n_seq_max={n_seq_max}) "
                               f"could not be created: {_runtime.take_errors() or 'no reason given'}")
        self._ptr = ptr
        model._contexts.add(self)
        self._mem = lib.llama_get_memory(ptr)
        self.batch_invariant = bool(batch_invariant)
        if batch_invariant:
            lib.llama_set_batch_invariant(ptr, True)
        self.n_ctx = lib.llama_n_ctx(ptr)
        self.n_batch = lib.llama_n_batch(ptr)
        self.n_seq_max = lib.llama_n_seq_max(ptr)
        self.n_vocab = model.n_vocab

    # -- lifetime ---------------------------------------------------------------
    @property
    def ptr(self):
        if self._ptr is None:
            raise ValueError("context is closed")
        return self._ptr

    @property
    def mem(self):
        """The context's llama_memory_t (checked: raises once the context is closed)."""
        self.ptr
        return self._mem

    def close(self) -> None:
        if getattr(self, "_ptr", None) is not None:
            self._free(self._ptr)
            self._ptr = None

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # -- decoding -------------------------------------------------------------------
    def check_seq(self, seq_id: int) -> int:
        if not 0 <= seq_id < self.n_seq_max:
            raise ContextError(f"seq_id {seq_id} out of range: this context holds sequences 0..{self.n_seq_max - 1}")
        return seq_id

    def decode(self, batch: Batch) -> None:
        """llama_decode with its return codes turned into exceptions."""
        tokens = batch.token[:batch.n_tokens]
        if len(tokens) and tokens.view(np.uint32).max() >= self.n_vocab:  # (a negative id wraps above)
            i = int(np.flatnonzero((tokens < 0) | (tokens >= self.n_vocab))[0])
            raise DecodeError(f"batch token {i}: id {tokens[i]} out of range (vocabulary of {self.n_vocab})")
        _runtime.clear_errors()
        rc = lib.llama_decode(self.ptr, batch.raw)
        if rc == 0:
            return
        why = _runtime.take_errors()
        if rc == 1:
            raise MemoryFullError(f"no memory slot for a batch of {batch.n_tokens} tokens "
                                  f"(n_ctx={self.n_ctx}, n_seq_max={self.n_seq_max}): {why}")
        if rc == 2:
            raise DecodeError(f"decode aborted: {why}")
        if rc == -1:
            raise DecodeError(f"invalid batch of {batch.n_tokens} tokens: {why}")
        raise DecodeError(f"llama_decode failed with code {rc}: {why}")

    def decode_tokens(self, tokens: list[int], seq_id: int = 0, pos0: int | None = None) -> np.ndarray:
        """Decode tokens of one sequence in n_batch chunks; returns the last token's logits."""
        self.check_seq(seq_id)
        if not tokens:
            raise ValueError("decode_tokens: empty token list")
        for t in tokens:
            self.model.check_token(t)
        pos = self.seq_pos_max(seq_id) + 1 if pos0 is None else pos0
        if pos + len(tokens) > self.n_ctx:
            raise MemoryFullError(f"sequence {seq_id}: {pos} + {len(tokens)} tokens exceed the context of {self.n_ctx}")
        with Batch(min(self.n_batch, len(tokens))) as batch:
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start:start + self.n_batch]
                batch.clear()
                last = batch.add_sequence(chunk, pos + start, seq_id, logits_last=start + len(chunk) == len(tokens))
                self.decode(batch)
        return self.logits(last)

    def logits(self, i: int = -1, copy: bool = True) -> np.ndarray:
        """The logits of batch output i (-1: the last output).

        copy=False returns a read-only view of the context's buffer, without a
        copy; it is valid until the next decode on this context.
        """
        p = lib.llama_get_logits_ith(self.ptr, i)
        if p == ffi.NULL:
            raise DecodeError(f"no logits for batch index {i} (was logits=True set for it?)")
        view = np.frombuffer(ffi.buffer(p, self.n_vocab * 4), dtype=np.float32)
        if copy:
            return view.copy()
        view.flags.writeable = False
        return view

    def synchronize(self) -> None:
        """Wait for the last decode's work: llama_decode returns once it is queued on a GPU backend (reading
        an output waits as well); on the CPU it has finished already."""
        lib.llama_synchronize(self.ptr)

    def all_logits(self, n_rows: int) -> np.ndarray:
        """The first n_rows outputs' logits, [n_rows, n_vocab], in batch order (llama_get_logits): a
        view of the context's buffer, valid until the next decode, for reading (writable only because
        numpy copies a read-only array before argmax and other reductions, 3x their time); n_rows at
        most the last decode's outputs."""
        p = lib.llama_get_logits(self.ptr)
        if p == ffi.NULL:
            raise DecodeError("no logits: the last decode asked for none")
        return np.frombuffer(ffi.buffer(p, n_rows * self.n_vocab * 4), dtype=np.float32).reshape(n_rows, self.n_vocab)

    # -- memory -------------------------------------------------------------------
    def clear(self, data: bool = True) -> None:
        lib.llama_memory_clear(self.mem, data)

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove positions [p0, p1) of a sequence (-1: all); False if the memory cannot do it."""
        if seq_id != -1:
            self.check_seq(seq_id)
        return bool(lib.llama_memory_seq_rm(self.mem, seq_id, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self.check_seq(src)
        self.check_seq(dst)
        lib.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_keep(self, seq_id: int) -> None:
        lib.llama_memory_seq_keep(self.mem, self.check_seq(seq_id))

    def seq_pos_min(self, seq_id: int) -> int:
        return lib.llama_memory_seq_pos_min(self.mem, self.check_seq(seq_id))

    def seq_pos_max(self, seq_id: int) -> int:
        return lib.llama_memory_seq_pos_max(self.mem, self.check_seq(seq_id))

    def memory_report(self) -> memory.MemoryReport:
        return memory.read(self.ptr)

    # -- recurrent snapshots (patched build) --------------------------------------------
    def _rs_check(self, rc: int, what: str) -> int:
        if rc >= 0:
            return rc
        cls, why = _RS_ERRORS.get(rc, (SnapshotError, f"error code {rc}"))
        raise cls(f"{what}: {why}")

    def snapshot(self, seq_id: int) -> int:
        """Pin seq_id's current state (and, for hybrids, its attention prefix); returns a handle."""
        self.check_seq(seq_id)
        return self._rs_check(lib.llama_memory_rs_snapshot(self.mem, seq_id), f"snapshot of sequence {seq_id}")

    def restore(self, handle: int, seq_id: int) -> None:
        """seq_id continues from the snapshot; its previous state is dropped."""
        self.check_seq(seq_id)
        self._rs_check(lib.llama_memory_rs_restore(self.mem, handle, seq_id),
                       f"restore of snapshot {handle} into sequence {seq_id}")

    def release(self, handle: int) -> None:
        self._rs_check(lib.llama_memory_rs_release(self.mem, handle), f"release of snapshot {handle}")

    def snapshot_pos(self, handle: int) -> int:
        """Position of the last token in the snapshot's state."""
        pos = lib.llama_memory_rs_snapshot_pos(self.mem, handle)
        if pos < 0:
            raise SnapshotError(f"snapshot {handle}: unknown or released handle")
        return pos

    def pool_stats(self) -> memory.PoolStats:
        return memory.pool_stats(self.mem)

    # -- state ------------------------------------------------------------------------
    def seq_state(self, seq_id: int) -> bytes:
        """The serialized memory of one sequence (KV cells and/or recurrent state)."""
        self.check_seq(seq_id)
        size = lib.llama_state_seq_get_size(self.ptr, seq_id)
        buf = ffi.new("uint8_t[]", size)
        n = lib.llama_state_seq_get_data(self.ptr, buf, size, seq_id)
        return ffi.buffer(buf, n)[:]

    def set_seq_state(self, seq_id: int, data: bytes) -> None:
        """Restore a sequence from seq_state() output; the sequence's old memory is replaced."""
        self.check_seq(seq_id)
        if not data:
            raise StateError(f"sequence {seq_id}: empty state")
        n = lib.llama_state_seq_set_data(self.ptr, data, len(data), seq_id)
        if n == 0:
            raise StateError(f"sequence {seq_id}: state of {len(data)} bytes does not fit this context "
                             f"or model: {_runtime.take_errors()}")

    def state(self) -> bytes:
        size = lib.llama_state_get_size(self.ptr)
        buf = ffi.new("uint8_t[]", size)
        n = lib.llama_state_get_data(self.ptr, buf, size)
        return ffi.buffer(buf, n)[:]

    def set_state(self, data: bytes) -> None:
        n = lib.llama_state_set_data(self.ptr, data, len(data))
        if n == 0:
            raise StateError(f"state of {len(data)} bytes does not fit this context: {_runtime.take_errors()}")
