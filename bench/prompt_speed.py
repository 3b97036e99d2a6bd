"""Prompt speed: a returning user's prompt after a long context, ms per token, the builds side by side.

    python bench/prompt_speed.py [--models jamba-small,nemotron_h-small,qwen35-small,falcon-h1-graft-q4_k_m]
        [--configs upstream,patched,patched-invariant] [--context 1500] [--prompt 300] [--rounds 3]
        [--out prompt_speed]

For each model and configuration, one Context (one sequence, n_batch 512, --threads) in a process of its
own: --context random tokens in chunks of 500, then --prompt more, each timed, per token.  A returning
user's first token waits on prompts like the second (its own and the others' in a burst), which is why the
chat benchmark's later turns follow this figure.  Configurations: `upstream`, the pin's own build (ggml's
kernels); `patched`, this checkout's build with ggml's kernels; `patched-invariant`, the kernels the Engine
runs by default (batch invariance, patch 0007).  Each round runs every configuration once, in an order
that rotates from round to round after a warm-up round that is not counted, so the shared machine's drift
falls on all of them alike; the table gives the median over rounds [min-max] and each configuration's
ratio to the first one per round.

Prints a table, writes bench/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import RESULTS, BenchError, provenance, run_main, write_results  # noqa: E402

ZOO = ROOT / "build" / "models"
CONFIGS = {"upstream": ("upstream", False), "patched": ("patched", False), "patched-invariant": ("patched", True)}


def measure(path: Path, context: int, prompt: int, threads: int, invariant: bool) -> dict:
    """One round in this process: ms per token of the context and of the prompt after it."""
    import pyllama_ssm as ps
    rng = random.Random(0)
    with ps.Model(path) as model, \
            ps.Context(model, n_ctx=context + prompt + 64, n_seq_max=1, n_batch=512, n_threads=threads,
                       n_threads_batch=threads, batch_invariant=invariant) as ctx, ps.Batch(512, 1) as batch:
        tokens = [rng.randrange(100, model.n_vocab) for _ in range(context + prompt)]
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
    return {"context": (t1 - t0) / context * 1e3, "prompt": (t2 - t1) / prompt * 1e3}


def measure_in_child(config: str, path: Path, args) -> dict:
    build, invariant = CONFIGS[config]
    cmd = [sys.executable, __file__, "--child", str(path), "--context", str(args.context), "--prompt",
           str(args.prompt), "--threads", str(args.threads)] + (["--batch-invariant"] if invariant else [])
    out = subprocess.run(cmd, env=os.environ | {"PYLLAMA_SSM_BUILD": build}, capture_output=True, text=True,
                         timeout=1800)
    if out.returncode != 0:
        raise BenchError(f"{config} on {path.name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float], fmt: str = ".3f") -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="jamba-small,nemotron_h-small,qwen35-small,falcon-h1-graft-q4_k_m")
    ap.add_argument("--configs", default="upstream,patched,patched-invariant",
                    help=f"comma-separated, of {', '.join(CONFIGS)}; ratios are to the first")
    ap.add_argument("--context", type=int, default=1500)
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="prompt_speed")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # one round in this process
    ap.add_argument("--batch-invariant", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.context, args.prompt, args.threads, args.batch_invariant)))
        return 0
    configs = args.configs.split(",")
    if unknown := [c for c in configs if c not in CONFIGS]:
        raise BenchError(f"--configs: unknown {', '.join(unknown)}; expected some of {', '.join(CONFIGS)}")
    models = args.models.split(",")
    for name in models:
        if not (ZOO / f"{name}.gguf").exists():
            raise BenchError(f"{ZOO / name}.gguf is missing: make models")
    prov = provenance(args.threads)  # before the runs: the tree they ran
    runs: dict[str, dict[str, list[dict]]] = {m: {c: [] for c in configs} for m in models}
    for r in range(args.rounds + 1):  # round 0 warms up the page cache and the CPU, and is dropped
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for name in models:
            for config in order:
                got = measure_in_child(config, ZOO / f"{name}.gguf", args)
                print(f"round {r}{' (warm-up)' if r == 0 else ''} {name} {config}: context {got['context']:.3f}, "
                      f"prompt {got['prompt']:.3f} ms/token", flush=True)
                if r:
                    runs[name][config].append(got)
    rows = []
    for name in models:
        first = runs[name][configs[0]]
        for config in configs:
            mine = runs[name][config]
            rows.append({"model": name, "config": config,
                         "context_ms_per_token": [x["context"] for x in mine],
                         "prompt_ms_per_token": [x["prompt"] for x in mine],
                         "prompt_ratio": [x["prompt"] / f["prompt"] for x, f in zip(mine, first)],
                         "context_ratio": [x["context"] / f["context"] for x, f in zip(mine, first)]})
    md = [f"Prompt speed, {args.prompt} tokens after {args.context} in one sequence, ms per token: the median of "
          f"{args.rounds} interleaved rounds [min-max], after a warm-up round; ratio: to {configs[0]} in the same "
          f"round.  {args.threads} threads, n_batch 512; commit {(prov.get('commit') or '?')[:12]}"
          f"{' (dirty)' if prov.get('dirty') else ''}, builds {prov.get('build_keys')}; {prov.get('cpu_model', '?')}.",
          "", f"| model | configuration | {args.context}-token context | ratio | {args.prompt} tokens after it | ratio |",
          "|---|---|---:|---:|---:|---:|"]
    md += [f"| {r['model']} | {r['config']} | {spread(r['context_ms_per_token'])} | {spread(r['context_ratio'], '.2f')}x "
           f"| {spread(r['prompt_ms_per_token'])} | {spread(r['prompt_ratio'], '.2f')}x |" for r in rows]
    write_results(args.out, {"provenance": prov, "settings": vars(args) | {"results_dir": str(args.results_dir)},
                             "rows": rows}, "\n".join(md) + "\n", args.results_dir)
    return 0


if __name__ == "__main__":
    run_main(main)
