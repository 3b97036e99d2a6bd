"""The memory report of a context as Python data (patched build only)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .bindings import ffi, has, lib

MiB = 1024 * 1024


@dataclass(frozen=True)
class BufferTypeUsage:
    name: str
    weights: int
    memory: int
    compute: int


@dataclass(frozen=True)
class MemoryReport:
    """Bytes and cells one context holds, read from its allocated buffers."""

    weights_bytes: int
    output_bytes: int
    compute_bytes: int
    memory_bytes: int
    kv_cells_total: int
    kv_cells_used: int
    kv_cells_shared: int
    kv_n_stream: int
    kv_bytes: int
    kv_bytes_per_cell: int
    rs_cells_total: int
    rs_cells_live: int
    rs_n_rs_seq: int
    rs_snapshot_slots: int
    rs_n_pool: int
    rs_snapshots: int
    rs_cells_snapshot: int
    rs_bytes: int
    rs_bytes_per_cell: int
    buffer_types: tuple[BufferTypeUsage, ...] = field(default=())

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.output_bytes + self.compute_bytes + self.memory_bytes

    def summary(self) -> str:
        return (f"weights {self.weights_bytes / MiB:.2f} MiB, KV {self.kv_bytes / MiB:.2f} MiB "
                f"({self.kv_cells_used}/{self.kv_cells_total} cells, {self.kv_cells_shared} shared), "
                f"recurrent {self.rs_bytes / MiB:.2f} MiB ({self.rs_cells_live}/{self.rs_cells_total} live), "
                f"compute {self.compute_bytes / MiB:.2f} MiB, output {self.output_bytes / MiB:.2f} MiB")


@dataclass(frozen=True)
class PoolStats:
    """The shared recurrent state pool (llama_memory_rs_pool_stats)."""

    n_cells: int
    n_pool: int
    n_cells_live: int
    n_cells_snapshot: int
    n_cells_free: int
    n_snapshots: int
    n_demand: int


SCALARS = [f.name for f in MemoryReport.__dataclass_fields__.values() if f.name != "buffer_types"]


def available() -> bool:
    return has("llama_memory_report_get")


def read(ctx_ptr) -> MemoryReport:
    if not available():
        raise NotImplementedError("memory reports need the patched build (PYLLAMA_SSM_BUILD=patched)")
    r = ffi.new("struct llama_memory_report *")
    if lib.llama_memory_report_get(ctx_ptr, r) != 0:
        raise RuntimeError("llama_memory_report_get failed")
    bufts = tuple(
        BufferTypeUsage(ffi.string(b.name).decode(), b.weights, b.memory, b.compute)
        for b in (r.buft[i] for i in range(r.n_buft)))
    return MemoryReport(**{name: getattr(r, name) for name in SCALARS}, buffer_types=bufts)


def pool_stats(mem) -> PoolStats:
    if not has("llama_memory_rs_pool_stats"):
        raise NotImplementedError("the snapshot pool needs the patched build (PYLLAMA_SSM_BUILD=patched)")
    st = ffi.new("struct llama_rs_pool_stats *")
    lib.llama_memory_rs_pool_stats(mem, st)
    return PoolStats(**{name: getattr(st, name) for name in PoolStats.__dataclass_fields__})
