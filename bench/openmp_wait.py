"""How ggml's OpenMP workers wait between ops: decode throughput alone and with a second process.

    python bench/openmp_wait.py [--models qwen35-small:f16,nemotron_h-small:q4_0] [--seqs 1,16]
                                [--steps 32] [--rounds 2]

ggml's CPU backend runs each op of a graph on all threads, which meet at a barrier
after it: about a thousand barriers per decode step. How libgomp's threads wait
there is an environment setting read when the library loads:
  passive   OMP_WAIT_POLICY=passive: sleep at once (a futex wake-up per op)
  spin1000  pyllama-ssm's default: spin 1000 times, then sleep (GOMP_SPINCOUNT=1000)
  active    OMP_WAIT_POLICY=active: spin without bound (libgomp's own default spins 300000 times)
Each is measured alone (one decoding process on the machine) and contended (two
identical decoding processes at once, their tokens/s summed): spinning threads wait
for a thread the kernel has descheduled to give the core to the other process.
Uses bench/inplace_decode.py's decode loop (patched build, states in place).

Writes bench/results/openmp_wait.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from inplace_decode import CHILD, lib_env, model_file
from load import BenchError, Progress, run_main, write_results

POLICIES = {
    "passive": {"OMP_WAIT_POLICY": "passive"},
    "spin1000": {"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "1000"},
    "active": {"OMP_WAIT_POLICY": "active"},
}


def decode(model, n: int, steps: int, policy: str, processes: int) -> float:
    """Summed tokens/s of `processes` identical decoding children started together."""
    env = {k: v for k, v in lib_env("inplace").items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy])
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(model), str(n), str(steps), "0"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(processes)]
    total = 0.0
    for p in procs:
        out, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise BenchError(f"{policy} {model.name} n={n} failed:\n{err[-2000:]}")
        total += json.loads(out.splitlines()[-1])["tok_per_s"]
    return total


def markdown(results: dict) -> str:
    rows = ["| model | seqs | policy | alone tok/s | two processes, sum tok/s | alone vs passive | two vs passive |",
            "|---|---:|---|---:|---:|---:|---:|"]
    for r in results["rows"]:
        base = next(b for b in results["rows"] if (b["model"], b["seqs"], b["policy"]) == (r["model"], r["seqs"], "passive"))
        rows.append(f"| {r['model']} | {r['seqs']} | {r['policy']} | {r['alone']:.1f} | {r['two']:.1f} "
                    f"| {r['alone'] / base['alone']:.2f}x | {r['two'] / base['two']:.2f}x |")
    return "\n".join(rows) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen35-small:f16,nemotron_h-small:q4_0", help="name:weights, ...")
    ap.add_argument("--seqs", default="1,16")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    models = {spec: model_file(*spec.split(":")) for spec in args.models.split(",")}
    jobs = [(m, n, p) for m in models for n in map(int, args.seqs.split(",")) for p in POLICIES]
    samples: dict[tuple, dict[str, list[float]]] = {}
    progress = Progress(len(jobs) * args.rounds * 2)
    for _ in range(args.rounds):
        for m, n, p in jobs:  # interleaved rounds: the policies share whatever load the machine has
            for processes, key in ((1, "alone"), (2, "two")):
                progress.show(f"{m} n={n} {p} {key}")
                samples.setdefault((m, n, p), {}).setdefault(key, []).append(
                    decode(models[m], n, args.steps, p, processes))
                progress.advance()
    progress.close()
    rows = [{"model": m, "seqs": n, "policy": p, "env": POLICIES[p],
             **{k: statistics.median(v) for k, v in samples[(m, n, p)].items()}, "samples": samples[(m, n, p)]}
            for m, n, p in jobs]
    results = {"steps": args.steps, "rounds": args.rounds, "rows": rows}
    write_results("openmp_wait", results, markdown(results))
    return 0


if __name__ == "__main__":
    run_main(main)
