"""What "same answer under any load" costs: Engine throughput per kernel setup, and how far each
setup's answers drift from the lone runs.

    python bench/batch_invariance.py [--models smollm2,qwen35-small,jamba-small] [--clients 1,8] [--rounds 2]

Setups (one Engine each, same requests, rounds interleaved; compare ratios, these machines are shared):
- invariant:   flash attention + patch 0007 (reference kernels, ordered KV cells): the Engine's default
- fa:          flash attention, llama.cpp's shape-dependent kernels
- no-fa:       no flash attention (what Llama(n_parallel>1) used before): attention over the whole unified cache
Workload per client: a ~300-token prompt (a shared instruction + its own question), 64 greedy tokens; all
clients at once.  Drift: max |logprob - lone run| over every token, on the same setup's lone runs
(one sequence, fresh context), so it shows what load changes, not what the kernels do alone.

Prints a table, writes bench/results/batch_invariance.{json,md,png}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import run_main, timed_requests, write_results, zoo_model  # noqa: E402
from bench.plot import lines  # noqa: E402
from pyllama_ssm import Model  # noqa: E402
from pyllama_ssm.engine import Engine  # noqa: E402
from pyllama_ssm.sampling import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0)
SETUPS = {"invariant": dict(flash_attn=True, batch_invariant=True),
          "fa": dict(flash_attn=True, batch_invariant=False),
          "no-fa": dict(flash_attn=False, batch_invariant=False)}
INSTRUCTION = ("You are a careful assistant. Read the question, think about the history involved, and answer "
               "in one short paragraph without repeating the question. ") * 8


def prompts(n: int) -> list[str]:
    return [INSTRUCTION + f"Question {i}: what happened in the year {1500 + 37 * i}, and why does it matter?"
            for i in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,qwen35-small,jamba-small")
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n-gen", type=int, default=64)
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    rows = []
    for name in args.models.split(","):
        with Model(zoo_model(name)) as model:
            engines = {s: Engine(model, n_ctx=max(levels) * 512, parallel=max(levels), **kw) for s, kw in SETUPS.items()}
            try:
                lone = {s: {p: timed_requests(e, [p], args.n_gen, GREEDY, logprobs=0)[1][0]
                            for p in prompts(max(levels))} for s, e in engines.items()}
                for n in levels:
                    batch = prompts(n)
                    times: dict[str, list[float]] = {s: [] for s in SETUPS}
                    drift: dict[str, float] = {s: 0.0 for s in SETUPS}
                    tokens = 0
                    for _ in range(args.rounds):
                        for s, e in engines.items():
                            seconds, done = timed_requests(e, batch, args.n_gen, GREEDY, logprobs=0)
                            times[s].append(seconds)
                            tokens = sum(len(c.tokens) + c.usage.prompt_tokens for c in done)
                            for p, c in zip(batch, done):
                                want = lone[s][p]
                                k = next((i for i, (a, b) in enumerate(zip(c.tokens, want.tokens)) if a != b),
                                         min(len(c.tokens), len(want.tokens)))
                                diffs = [abs(a - b) for a, b in zip(c.logprobs[:k + 1], want.logprobs[:k + 1])]
                                drift[s] = max(drift[s], max(diffs, default=0.0))
                    base = statistics.median(times["fa"])
                    for s in SETUPS:
                        t = statistics.median(times[s])
                        rows.append({"model": name, "clients": n, "setup": s, "seconds": t, "tok_per_s": tokens / t,
                                     "vs_fa": base / t, "drift": drift[s]})
            finally:
                for e in engines.values():
                    e.close()
    md = ["| model | clients | setup | prompt+generated tok/s | throughput vs fa | max drift from lone run |",
          "|---|---:|---|---:|---:|---:|"]
    md += [f"| {r['model']} | {r['clients']} | {r['setup']} | {r['tok_per_s']:.1f} | {r['vs_fa']:.2f}x | "
           f"{r['drift']:.2g} |" for r in rows]
    write_results("batch_invariance", {"rounds": args.rounds, "n_gen": args.n_gen, "rows": rows}, "\n".join(md) + "\n")
    lines("batch_invariance", rows, series="setup", x="clients", y=lambda r: r["tok_per_s"],
          title="throughput by kernel setup", xlabel="concurrent clients", ylabel="prompt+generated tokens/s")
    return 0


if __name__ == "__main__":
    run_main(main)
