"""Prompt speed of this checkout's build: a returning user's prompt after a long context, ms per token.

    python bench/prompt_speed.py [--models jamba-small,nemotron_h-small,qwen35-small,falcon-h1-graft-q4_k_m]
        [--context 1500] [--prompt 300] [--rounds 3] [--batch-invariant] [--out prompt_speed]
    PYLLAMA_SSM_BUILD=upstream python bench/prompt_speed.py ...    # the pin's own build

For each model, one Context (one sequence, n_batch 512, --threads): --context random tokens in chunks
of 500, then --prompt more, each timed; the median over --rounds, per token.  A returning user's first
token waits on prompts like the second (its own and the others' in a burst), which is why the chat
benchmark's later turns follow this figure.  It measures the build this checkout has: compare patches by
running it on each build in turn (`git stash`, `make build`), as the README's patch table does, or
against the pin's own build with PYLLAMA_SSM_BUILD=upstream; --batch-invariant: the kernels the Engine
runs by default.

Prints a table, writes bench/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import RESULTS, BenchError, provenance, run_main, write_results  # noqa: E402

ZOO = ROOT / "build" / "models"


def measure(path: Path, context: int, prompt: int, rounds: int, threads: int, invariant: bool) -> dict:
    import pyllama_ssm as ps
    rng = random.Random(0)
    with ps.Model(path) as model, \
            ps.Context(model, n_ctx=context + prompt + 64, n_seq_max=1, n_batch=512, n_threads=threads,
                       n_threads_batch=threads, batch_invariant=invariant) as ctx, ps.Batch(512, 1) as batch:
        tokens = [rng.randrange(100, model.n_vocab) for _ in range(context + prompt)]
        long, new = [], []
        for _ in range(rounds):
            ctx.clear()
            t0 = time.perf_counter()
            for i in range(0, context, 500):
                batch.clear()
                batch.add_sequence(tokens[i:min(i + 500, context)], i, 0, logits_last=False)
                ctx.decode(batch)
            t1 = time.perf_counter()
            batch.clear()
            batch.add_sequence(tokens[context:], context, 0, logits_last=True)
            ctx.decode(batch)
            t2 = time.perf_counter()
            long.append((t1 - t0) / context * 1e3)
            new.append((t2 - t1) / prompt * 1e3)
    return {"context_ms_per_token": statistics.median(long), "prompt_ms_per_token": statistics.median(new),
            "rounds": {"context": long, "prompt": new}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="jamba-small,nemotron_h-small,qwen35-small,falcon-h1-graft-q4_k_m")
    ap.add_argument("--context", type=int, default=1500)
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-invariant", action="store_true",
                    help="the Engine's default kernels (patch 0007); without it ggml's, as the pin's build runs")
    ap.add_argument("--out", default="prompt_speed")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        path = ZOO / f"{name}.gguf"
        if not path.exists():
            raise BenchError(f"{path} is missing: make models")
        rows.append({"model": name, **measure(path, args.context, args.prompt, args.rounds, args.threads,
                                                     args.batch_invariant)})
    prov = provenance(args.threads)
    md = [f"Prompt speed, {args.prompt} tokens after {args.context} in one sequence (ms per token, median of "
          f"{args.rounds}); {args.threads} threads, n_batch 512, batch invariance "
          f"{'on' if args.batch_invariant else 'off'}, {os.environ.get('PYLLAMA_SSM_BUILD', 'patched')} build; commit {(prov.get('commit') or '?')[:12]}, "
          f"build {prov.get('build_keys', {}).get('patched', '?')}; {prov.get('cpu_model', '?')}.", "",
          f"| model | {args.context}-token context | {args.prompt} tokens after it |", "|---|---:|---:|"]
    md += [f"| {r['model']} | {r['context_ms_per_token']:.3f} | {r['prompt_ms_per_token']:.3f} |" for r in rows]
    write_results(args.out, {"provenance": prov, "settings": vars(args) | {"results_dir": str(args.results_dir)},
                             "rows": rows}, "\n".join(md) + "\n", args.results_dir)
    return 0


if __name__ == "__main__":
    run_main(main)
