"""Run identical decoding on whichever build PYLLAMA_SSM_BUILD selects.

    python tests/parity/driver.py OUT.npz MODEL.gguf [MODEL.gguf ...]

PARITY_SINGLE_ONLY (comma-separated model stems) limits those models to the
single-sequence configuration: upstream computes their multi-sequence batches
wrongly or aborts (see the patch that fixes it), so there is nothing to match.

For each model and configuration (n_seq_max 1/8/16, unified KV or not) it
prefills n_seq different prompts in one batch, then decodes 64 greedy tokens
for every sequence at once, and stores the prompt logits and the continuations.
Then a mixed run (see `mixed`) moves sequences through every path of the
recurrent memory: forks, sequences joining alone and in pairs, removals, and
with PARITY_SNAPSHOTS=1 (patched build) snapshots restored into new sequences;
PARITY_MIXED_ONLY=1 runs only that; PARITY_N_GPU_LAYERS offloads layers (CUDA build).
The parity test runs this once per build and compares the files.
Flash attention is off in both: patch 0009 (ggml-cpu-fa-gqa) computes decode attention in another
order on purpose; its accuracy is tested against upstream's kernel in tests/test_cpu_kernels.py, and
everything the memory patches touch (cells, masks, states) is the same with the unfused attention.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pyllama_ssm as ps  # before numpy: see tests/models/generate.py

import numpy as np  # noqa: I001

N_GEN = 64
CONFIGS = [(1, True), (8, True), (8, False), (16, True), (16, False)]
PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "Hello, world",
           "State space models", "Recurrent memory", "A shared pool", "Copy on write"]


def run(model: ps.Model, n_seq: int, unified: bool) -> tuple[np.ndarray, np.ndarray]:
    prompts = [model.tokenize(PROMPTS[s % len(PROMPTS)] + " #" * (s // len(PROMPTS))) for s in range(n_seq)]
    n_ctx = 256 * n_seq if not unified else 2048
    with ps.Context(model, n_ctx=n_ctx, n_seq_max=n_seq, kv_unified=unified, n_batch=512,
                    flash_attn=False) as ctx, \
            ps.Batch(512, 1) as batch:
        last = [batch.add_sequence(p, 0, s) for s, p in enumerate(prompts)]
        ctx.decode(batch)
        prompt_logits = np.stack([ctx.logits(i) for i in last])
        pos = [len(p) for p in prompts]
        tokens = np.zeros((n_seq, N_GEN), dtype=np.int32)
        logits = prompt_logits
        for step in range(N_GEN):
            batch.clear()
            for s in range(n_seq):
                tok = int(np.argmax(logits[s]))
                tokens[s, step] = tok
                batch.add(tok, pos[s], s, logits=True)
                pos[s] += 1
            ctx.decode(batch)
            logits = np.stack([ctx.logits(s) for s in range(n_seq)])
    return prompt_logits, tokens


MIXED_STEPS = 16


def mixed(model: ps.Model, snapshots: bool) -> dict[str, np.ndarray]:
    """Greedy decoding while sequences fork, join, leave and (optionally) restore snapshots.

    Each step's batch mixes decode tokens with whole prompts; the recurrent memory sees
    forks pending copy-on-write, one and two cleared cells, holes in its cell range and,
    with snapshots, pinned cells. Returns the logits of every sequence at every step.
    """
    prompt = lambda s: model.tokenize(PROMPTS[s % len(PROMPTS)] + " !" * (s // 4))  # noqa: E731
    snapshots = snapshots and (model.is_recurrent or model.is_hybrid)  # attention-only: nothing to pin
    out: dict[str, np.ndarray] = {}
    with ps.Context(model, n_ctx=2048, n_seq_max=16, n_batch=512, n_rs_pool=8 if snapshots else 0,
                    flash_attn=False) as ctx, \
            ps.Batch(512, 16) as batch:
        pos: dict[int, int] = {}
        logits: dict[int, np.ndarray] = {}
        pending: dict[int, list[int]] = {s: prompt(s) for s in range(6)}  # prompts joining this step
        snap: tuple[int, int, np.ndarray] | None = None  # handle, next position, logits
        for step in range(MIXED_STEPS):
            if step == 4:                      # fork: seq 0 continues twice, with different tokens
                ctx.seq_cp(0, 6)
                pos[6], logits[6] = pos[0], logits[0][::-1].copy()
            if step == 6:
                pending[7] = prompt(7)         # one sequence joins
            if step == 8:                      # one leaves, leaving a hole in the cells
                ctx.seq_rm(2)
                del pos[2], logits[2]
            if step == 10:
                pending[8], pending[9] = prompt(8), prompt(9)  # two join at once
            if snapshots and step == 5:
                snap = ctx.snapshot(1), pos[1], logits[1]
            if snapshots and step == 11:       # a new sequence continues from seq 1's past state
                handle, pos[10], logits[10] = snap
                ctx.restore(handle, 10)
                ctx.release(handle)
            batch.clear()
            rows: dict[int, int] = {}
            for s in sorted(pos):
                rows[s] = batch.add(int(np.argmax(logits[s])), pos[s], s, logits=True)
                pos[s] += 1
            for s, toks in pending.items():
                rows[s] = batch.add_sequence(toks, 0, s)
                pos[s] = len(toks)
            pending = {}
            ctx.decode(batch)
            for s, row in rows.items():
                logits[s] = ctx.logits(row)
                out[f"mixed/{step}/{s}"] = logits[s]
    return out


def main() -> int:
    out, paths = Path(sys.argv[1]), sys.argv[2:]
    single_only = set(filter(None, os.environ.get("PARITY_SINGLE_ONLY", "").split(",")))
    arrays = {}
    for path in paths:
        with ps.Model(path, n_gpu_layers=int(os.environ.get("PARITY_N_GPU_LAYERS", "0"))) as model:
            name = Path(path).stem
            configs = CONFIGS[:1] if name in single_only else CONFIGS
            for n_seq, unified in [] if os.environ.get("PARITY_MIXED_ONLY") == "1" else configs:
                key = f"{name}/{n_seq}/{'u' if unified else 's'}"
                arrays[key + "/logits"], arrays[key + "/tokens"] = run(model, n_seq, unified)
            if name not in single_only:
                snapshots = os.environ.get("PARITY_SNAPSHOTS") == "1"
                arrays.update({f"{name}/{k}": v for k, v in mixed(model, snapshots).items()})
    np.savez(out, **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main())
