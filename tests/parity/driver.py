"""Run identical decoding on whichever build PYLLAMA_SSM_BUILD selects.

    python tests/parity/driver.py OUT.npz MODEL.gguf [MODEL.gguf ...]

PARITY_SINGLE_ONLY (comma-separated model stems) limits those models to the
single-sequence configuration: upstream computes their multi-sequence batches
wrongly or aborts (see the patch that fixes it), so there is nothing to match.

For each model and configuration (n_seq_max 1/8/16, unified KV or not) it
prefills n_seq different prompts in one batch, then decodes 64 greedy tokens
for every sequence at once, and stores the prompt logits and the continuations.
The parity test runs this once per build and compares the files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

import pyllama_ssm as ps

N_GEN = 64
CONFIGS = [(1, True), (8, True), (8, False), (16, True), (16, False)]
PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "Hello, world",
           "State space models", "Recurrent memory", "A shared pool", "Copy on write"]


def run(model: ps.Model, n_seq: int, unified: bool) -> tuple[np.ndarray, np.ndarray]:
    prompts = [model.tokenize(PROMPTS[s % len(PROMPTS)] + " #" * (s // len(PROMPTS))) for s in range(n_seq)]
    n_ctx = 256 * n_seq if not unified else 2048
    with ps.Context(model, n_ctx=n_ctx, n_seq_max=n_seq, kv_unified=unified, n_batch=512) as ctx, \
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


def main() -> int:
    out, paths = Path(sys.argv[1]), sys.argv[2:]
    single_only = set(filter(None, os.environ.get("PARITY_SINGLE_ONLY", "").split(",")))
    arrays = {}
    for path in paths:
        with ps.Model(path) as model:
            name = Path(path).stem
            for n_seq, unified in CONFIGS[:1] if name in single_only else CONFIGS:
                key = f"{name}/{n_seq}/{'u' if unified else 's'}"
                arrays[key + "/logits"], arrays[key + "/tokens"] = run(model, n_seq, unified)
    np.savez(out, **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main())
