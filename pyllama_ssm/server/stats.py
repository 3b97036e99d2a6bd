"""What /extras/stats and /metrics report: admission, Engine statistics, memory, process RSS.

The numbers a soak test needs to prove nothing leaked: with no request in
flight, no sequence is queued, running or preempted, no recurrent cell is
live, and the attention cells in use are at most those the prefix cache keeps.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from .registry import ModelRegistry, ServedModel

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """Resident set size of this process (Linux), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def _memory(engine) -> dict[str, Any] | None:
    mem = engine.memory()
    if mem.report is None:  # the pristine build has no memory accounting
        return None
    r = mem.report
    cached_kv = mem.cached_tokens if r.kv_bytes_per_cell else 0  # a recurrent-only model has no KV
    return {"total_bytes": r.total_bytes, "weights_bytes": r.weights_bytes, "kv_bytes": r.kv_bytes,
            "rs_bytes": r.rs_bytes, "compute_bytes": r.compute_bytes,
            "kv_cells_total": r.kv_cells_total, "kv_cells_used": r.kv_cells_used,
            "kv_cells_cached_max": cached_kv, "rs_cells_total": r.rs_cells_total, "rs_cells_live": r.rs_cells_live,
            "rs_snapshots": r.rs_snapshots, "swapped_bytes": mem.swapped_bytes,
            "cached_prefixes": mem.cached_prefixes, "cached_bytes": mem.cached_bytes,
            "cached_prefixes_max": mem.cached_prefixes_max, "cached_bytes_max": mem.cached_bytes_max}


def _model(served: ServedModel) -> dict[str, Any]:
    out: dict[str, Any] = {"n_parallel": served.settings.n_parallel, "n_ctx": served.settings.n_ctx,
                           "capacity": served.capacity, "in_flight": served.in_flight,
                           "served": served.served, "refused": served.refused, "engine": None, "memory": None}
    engine = served.engine
    if engine is not None:
        stats = engine.stats()
        out["engine"] = {**dataclasses.asdict(stats), "python_overhead": stats.python_overhead}
        out["memory"] = _memory(engine)
    return out


def collect(registry: ModelRegistry) -> dict[str, Any]:
    return {"rss_bytes": rss_bytes(), "models": {alias: _model(m) for alias, m in list(registry.models.items())}}


def prometheus(snapshot: dict[str, Any]) -> str:
    """The numbers of a snapshot in Prometheus' text format: pyllama_ssm_<group>_<name>{model="alias"}."""
    lines = []
    if snapshot["rss_bytes"] is not None:
        lines.append(f"pyllama_ssm_rss_bytes {snapshot['rss_bytes']}")
    for alias, model in snapshot["models"].items():
        label = '{model="%s"}' % alias.replace("\\", "\\\\").replace('"', '\\"')
        groups = {"requests": {k: v for k, v in model.items() if not isinstance(v, dict) and v is not None},
                  "engine": model["engine"] or {}, "memory": model["memory"] or {}}
        for group, values in groups.items():
            for name, value in values.items():
                lines.append(f"pyllama_ssm_{group}_{name}{label} {float(value):g}")
    return "\n".join(lines) + "\n"
