"""What "same answer under any load" costs: Engine throughput per kernel setup, and how far each
setup's answers drift from the lone runs.

    python bench/batch_invariance.py [--models smollm2,falcon-h1-graft,qwen35-small,jamba-small] [--clients 1,8]
        [--rounds 3] [--threads 2] [--repeats 8] [--out batch_invariance] [--results-dir bench/results]

Setups (one Engine each, each loading the model as users get it, with ggml's extra (AMX, repacked)
buffers; the same requests):
- invariant:   flash attention + patch 0007 (one kernel per op whatever the rows, ordered KV cells): the default
- fa:          flash attention, llama.cpp's kernel per shape for everything but attention (patch 0009's pass
               serves F16 K and V in every setup with flash attention)
- no-fa:       no flash attention (what Llama(n_parallel>1) used before): attention over the whole unified cache
Workload per client: a ~300-token prompt (a shared instruction + its own question; --repeats 40 makes it
~1,500 tokens, a chat's context, where prompt attention weighs), 64 greedy tokens (end of
generation banned, so every setup does the same work); all
clients at once.  The lone runs come first (they warm every Engine up); then each round runs every setup,
the order rotated from round to round (these machines are shared: compare the ratios).  Reported:
prompt+generated tokens/s (median over rounds [min-max]), the ratio to fa (ratio of medians [per-round
range]), and drift: max |logprob - lone run| over every token of every round, on the same setup's lone
runs (one sequence, fresh context), so it shows what load changes, not what the kernels do alone.

Prints a table, writes <results-dir>/<out>.{json,md,png}; the JSON records each Engine's settings, the
git commit (and whether the tree was dirty), the builds, the CPU and its flags.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import (RESULTS, engine_settings, fmt_spread, measure_models, run_main, spread,  # noqa: E402
                        timed_requests, write_results)
from bench.plot import lines  # noqa: E402
from pyllama_ssm.engine import Engine  # noqa: E402
from pyllama_ssm.sampling import SamplingParams  # noqa: E402

SETUPS = {"invariant": dict(flash_attn=True, batch_invariant=True),
          "fa": dict(flash_attn=True, batch_invariant=False),
          "no-fa": dict(flash_attn=False, batch_invariant=False)}
INSTRUCTION = ("You are a careful assistant. Read the question, think about the history involved, and answer "
               "in one short paragraph without repeating the question. ")


INSTRUCTION_TOKENS = 37  # SmolLM2's tokenizer; a bound for sizing the context


def prompts(n: int, repeats: int = 8) -> list[str]:
    return [INSTRUCTION * repeats + f"Question {i}: what happened in the year {1500 + 37 * i}, and why does it matter?"
            for i in range(n)]


def measure(name: str, path: Path, levels: list[int], args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Every setup at each client count: (rows, each Engine's settings)."""
    engines: dict[str, Engine] = {}
    rows = []
    try:
        for s, kw in SETUPS.items():
            per_seq = -(-(INSTRUCTION_TOKENS * args.repeats + 64 + args.n_gen) // 256) * 256
            engines[s] = Engine(str(path), n_ctx=max(levels) * per_seq, parallel=max(levels), n_threads=args.threads,
                                n_threads_batch=args.threads, **kw)
        settings = {s: engine_settings(e) for s, e in engines.items()}
        # every setup generates n_gen tokens: end-of-generation tokens banned, or a setup whose kernels
        # pick one early would time mostly prefill (SmolLM2 Q8_0 ended after a token in one setup only)
        model = engines["fa"].model
        greedy = SamplingParams(temperature=0, logit_bias={t: float("-inf") for t in range(model.n_vocab)
                                                           if model.is_eog(t)})
        lone = {s: {p: timed_requests(e, [p], args.n_gen, greedy, logprobs=0)[1][0]
                    for p in prompts(max(levels), args.repeats)} for s, e in engines.items()}
        for n in levels:
            batch = prompts(n, args.repeats)
            tok_per_s: dict[str, list[float]] = {s: [] for s in SETUPS}
            drift: dict[str, float] = {s: 0.0 for s in SETUPS}
            for rnd in range(args.rounds):
                order = list(SETUPS)[rnd % len(SETUPS):] + list(SETUPS)[:rnd % len(SETUPS)]
                for s in order:
                    seconds, done = timed_requests(engines[s], batch, args.n_gen, greedy, logprobs=0)
                    assert all(len(c.tokens) == args.n_gen for c in done), f"{s}: a request ended early"
                    tok_per_s[s].append(sum(len(c.tokens) + c.usage.prompt_tokens for c in done) / seconds)
                    for p, c in zip(batch, done):
                        want = lone[s][p]
                        k = next((i for i, (a, b) in enumerate(zip(c.tokens, want.tokens)) if a != b),
                                 min(len(c.tokens), len(want.tokens)))
                        diffs = [abs(a - b) for a, b in zip(c.logprobs[:k + 1], want.logprobs[:k + 1])]
                        drift[s] = max(drift[s], max(diffs, default=0.0))
            base = spread(tok_per_s["fa"])
            for s in SETUPS:
                mine = spread(tok_per_s[s])
                vs_fa = spread([a / b for a, b in zip(tok_per_s[s], tok_per_s["fa"])]) | \
                    {"median": mine["median"] / base["median"]}
                rows.append({"model": name, "model_file": path.name, "clients": n, "setup": s,
                             "tok_per_s": mine["median"], "spread": mine, "vs_fa": vs_fa, "drift": drift[s]})
    finally:
        for e in engines.values():
            e.close()
    return rows, settings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,falcon-h1-graft,qwen35-small,jamba-small",
                    help="bench model names: smollm2, grafts (falcon-h1-graft, granitehybrid-graft-q4_k_m), zoo")
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--rounds", type=int, default=3, help="each round runs every setup, the order rotated")
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=8,
                    help="the shared instruction's repeats: 8 makes ~300-token prompts, 40 ~1,500")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="batch_invariance", help="results stem in --results-dir")
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="where the results go (default bench/results)")
    args = ap.parse_args()
    prov, rows, settings = measure_models(args, measure)
    commit = (prov["commit"] or "?")[:12] + (" (dirty tree)" if prov["dirty"] else "")
    md = [f"Kernel setups under load: ~{INSTRUCTION_TOKENS * args.repeats + 20}-token prompts, {args.n_gen} greedy tokens "
          f"per client, {args.threads} "
          f"threads; {args.rounds} round(s), the order rotated, after the lone runs; median over rounds [min-max]; "
          f"commit {commit}; {prov['cpu_model']}.", "",
          "| model | clients | setup | prompt+generated tok/s | throughput vs fa | max drift from lone run |",
          "|---|---:|---|---:|---:|---:|"]
    md += [f"| {r['model']} | {r['clients']} | {r['setup']} | {fmt_spread(r['spread'], '{:.1f}')} "
           f"| {fmt_spread(r['vs_fa'])}x | {r['drift']:.2g} |" for r in rows]
    write_results(args.out, {"provenance": prov, "rounds": args.rounds, "n_gen": args.n_gen, "threads": args.threads,
                             "instruction_repeats": args.repeats,
                             "clients": [int(x) for x in args.clients.split(",")], "engines": settings, "rows": rows}, "\n".join(md) + "\n",
                  args.results_dir)
    lines(args.out, rows, series="setup", x="clients", y=lambda r: r["tok_per_s"],
          y_range=lambda r: (r["spread"]["min"], r["spread"]["max"]), title="throughput by kernel setup",
          xlabel="concurrent clients", ylabel="prompt+generated tokens/s", results_dir=args.results_dir)
    return 0


if __name__ == "__main__":
    run_main(main)
