"""Memory planner: what serving P clients costs, from GGUF metadata alone.

Sizes every buffer a context allocates the way the pinned llama.cpp does
(src/llama-kv-cache.cpp, src/llama-memory-recurrent.cpp, llama_context::output_reserve)
for pyllama-ssm and for what users would run instead, without loading weights:

- pyllama-ssm: one context, one KV pool of n_ctx cells shared by all clients,
  P + S recurrent cells (a live state per client, S shared snapshots);
- llama-cpp-python: P processes, one context of n_ctx each (weights, KV and state P times);
- upstream before PR #19559: hybrid attention KV sized n_ctx per sequence;
- upstream now, unified KV (n_ctx shared) and split (kv_unified=false: n_ctx / P per client).

KV and recurrent bytes are exact (tests/test_planner.py checks them against the
memory report of real contexts); compute buffers are an estimate.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from .sizing import CELL_PAD, COMPONENTS, ContextShape, context_bytes, human, model_facts, pad, weights_bytes

@dataclass
class Setup:
    """One way to serve P clients and what it costs, summed over its processes."""

    name: str
    instances: int
    ctx_per_client: int
    note: str
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # component -> device -> bytes

    @property
    def total(self) -> int:
        return sum(sum(d.values()) for d in self.bytes.values())

    def component(self, name: str) -> int:
        return sum(self.bytes[name].values())


@dataclass
class Plan:
    model: str
    arch: str
    n_ctx: int
    parallel: int
    snapshots: int
    type_k: str
    type_v: str
    n_gpu_layers: int
    attention_layers: int
    recurrent_layers: int
    kv_bytes_per_token: int
    state_bytes_per_sequence: int
    weights_known: bool
    setups: list[Setup]

    def to_json(self) -> dict:
        d = asdict(self)
        for s, setup in zip(d["setups"], self.setups):
            s["total"] = setup.total
        return d


def plan(path: str | os.PathLike, n_ctx: int, parallel: int, *, snapshots: int = 0, type_k: str = "f16",
         type_v: str = "f16", n_gpu_layers: int = 0, n_ubatch: int = 512) -> Plan:
    """Plan serving `parallel` clients at `n_ctx` tokens each, five ways."""
    for name, value, lo in (("n_ctx", n_ctx, 1), ("parallel", parallel, 1), ("snapshots", snapshots, 0)):
        if not isinstance(value, int) or value < lo:
            raise ValueError(f"{name}={value!r}: must be an integer >= {lo}")
    facts = model_facts(path)
    hp = facts.hp
    common = dict(type_k=type_k, type_v=type_v, n_gpu_layers=n_gpu_layers, n_ubatch=n_ubatch)
    hybrid = any(hp.attention) and any(hp.recurrent)
    setups = [
        (Setup("pyllama-ssm", 1, n_ctx, "one KV pool shared by all clients; P states + S shared snapshots"),
         ContextShape(n_ctx, parallel, n_rs_pool=snapshots, **common)),
        (Setup(f"llama-cpp-python x{parallel}", parallel, n_ctx, "one process per client: everything P times "
                                    "(on the CPU, mmap lets them share the weights' pages)"),
         ContextShape(n_ctx, 1, flash_attn=False, **common)),
        (Setup("upstream before #19559", 1, n_ctx,
               "hybrid attention KV of n_ctx per sequence" if hybrid else "same as upstream unified (not a hybrid)"),
         ContextShape(n_ctx, parallel, attn_kv_per_seq=True, **common)),
        (Setup("upstream unified", 1, n_ctx, "shared KV; no shared snapshots"), ContextShape(n_ctx, parallel, **common)),
        (Setup("upstream split", 1, pad(n_ctx, CELL_PAD) // parallel, "kv_unified=false: n_ctx / P per client"),
         ContextShape(n_ctx, parallel, kv_unified=False, **common)),
    ]
    weights = weights_bytes(facts, n_gpu_layers)
    for setup, shape in setups:
        setup.bytes = {c: {d: b * setup.instances for d, b in devs.items()}
                       for c, devs in context_bytes(facts, shape).items()}
        setup.bytes["weights"] = {d: b * setup.instances for d, b in weights.items()}
        setup.bytes = {c: setup.bytes[c] for c in COMPONENTS}
    one = context_bytes(facts, ContextShape(CELL_PAD, 1, type_k=type_k, type_v=type_v))
    return Plan(str(path), hp.arch, n_ctx, parallel, snapshots, type_k, type_v, n_gpu_layers,
                sum(hp.attention), sum(hp.recurrent), sum(one["kv"].values()) // CELL_PAD,
                sum(one["recurrent"].values()), facts.has_tensors, [s for s, _ in setups])


def format_plan(p: Plan) -> str:
    lines = [
        f"{p.model}: {p.arch}, {p.attention_layers} attention layers, {p.recurrent_layers} recurrent layers",
        f"KV per token {human(p.kv_bytes_per_token)} ({p.type_k}/{p.type_v}), recurrent state per sequence "
        f"{human(p.state_bytes_per_sequence)}; {p.parallel} clients x {p.n_ctx} tokens, {p.snapshots} snapshots"
        + (f", {p.n_gpu_layers} GPU layers" if p.n_gpu_layers else ""),
        "",
    ]
    header = ["setup", "ctx/client", "weights", "KV", "recurrent", "snapshots", "output", "compute*", "total"]
    rows = [[s.name, str(s.ctx_per_client)] + [human(s.component(c)) if p.weights_known or c != "weights" else "n/a"
                                               for c in COMPONENTS] + [human(s.total)] for s in p.setups]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    if p.n_gpu_layers:
        lines.append("")
        for s in p.setups:
            per_dev = {d: sum(s.bytes[c][d] for c in COMPONENTS) for d in ("CPU", "GPU")}
            lines.append(f"{s.name}: CPU {human(per_dev['CPU'])}, GPU {human(per_dev['GPU'])}")
    lines += ["", "* compute buffers are an estimate; everything else is what llama.cpp allocates.",
              *(f"  {s.name}: {s.note}" for s in p.setups)]
    if not p.weights_known:
        lines.append("  weights: the file has no tensor table (metadata only)")
    return "\n".join(lines)
