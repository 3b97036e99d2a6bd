"""Speculative decoding with prompt lookup (draft_model=LlamaPromptLookupDecoding) on a task whose
output repeats its input: rewriting a given text.

    python bench/speculative.py [--models smollm2,falcon-h1-graft,qwen35-small] [--clients 1,8] [--rounds 3]
        [--n-gen 128] [--threads 2] [--out speculative] [--results-dir bench/results]

Setups (one Engine each, each loading the model as a batch-invariant Engine does, the same requests):
plain, and lookup (LlamaPromptLookupDecoding, num_pred_tokens 10, llama_cpp.server's default).
Workload per client: its own ~150-token paragraph to copy, greedy, n-gen tokens, all clients at
once.  For each client count, both setups first answer the same requests with 8 tokens (a
warm-up), then each round runs both, the order alternating from round to round (these machines
are shared: compare the ratios).  Reported: generated tokens/s (median over rounds [min-max]),
the speedup over plain (ratio of medians [range of the per-round ratios]), draft tokens accepted
/ proposed over the measured rounds, and whether every answer of every round equals plain's first
(it must: greedy, batch-invariant kernels on both sides).  On the random-weight zoo models
(qwen35-small) the text is not a copy, so few drafts are proposed or accepted: those rows show
what verification and rollback cost, not a speedup; the grafts (falcon-h1-graft,
granitehybrid-graft: SmolLM2's layers with Mamba2 beside or between them) write English, so their
drafts run through the recurrent rollback for real.

Prints a table, writes <results-dir>/<out>.{json,md,png}; the JSON records each Engine's
settings, the git commit (and whether the tree was dirty), the builds, the CPU and its flags.
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
from pyllama_ssm.llama_speculative import LlamaPromptLookupDecoding  # noqa: E402
from pyllama_ssm.sampling import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0)
WARM_UP_TOKENS = 8
SUBJECTS = ["the harbour", "the old mill", "the library", "the mountain pass", "the orchard", "the market square",
            "the lighthouse", "the river crossing"]


def prompts(n: int) -> list[str]:
    out = []
    for i in range(n):
        subject = SUBJECTS[i % len(SUBJECTS)]
        text = (f"In the morning {subject} was quiet. People came slowly, one by one, and each of them stopped "
                f"to look at {subject} as if seeing it for the first time. By noon {subject} was full of voices, "
                f"carts and children, and the smell of bread drifted over everything. In the evening the light "
                f"turned gold, the crowd thinned, and {subject} was quiet again until the next day.")
        out.append(f"<|im_start|>user\nRewrite the following text exactly as it is, word for word:\n\n{text}"
                   f"<|im_end|>\n<|im_start|>assistant\n")
    return out


def measure(name: str, path: Path, levels: list[int], args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Both setups at each client count: (rows, each Engine's settings)."""
    setups = {"plain": None, "lookup": LlamaPromptLookupDecoding(num_pred_tokens=10)}
    # batch-invariant kernels on both: a verification batch then computes what single steps do, so every
    # answer must be the plain one's (with llama.cpp's default kernels they drift, as they do with
    # concurrency: bench/batch_invariance.py); each Engine loads the model itself, without ggml's extra
    # (repacked, AMX) buffers, as batch invariance needs
    engines: dict[str, Engine] = {}
    rows = []
    try:
        for s, d in setups.items():
            engines[s] = Engine(str(path), n_ctx=max(levels) * 512, parallel=max(levels), draft_model=d,
                                flash_attn=True, batch_invariant=True, n_threads=args.threads,
                                n_threads_batch=args.threads)
        settings = {s: engine_settings(e) for s, e in engines.items()}
        for n in levels:
            batch = prompts(n)
            for e in engines.values():
                timed_requests(e, batch, WARM_UP_TOKENS, GREEDY)
            before = {s: e.stats() for s, e in engines.items()}
            tok_per_s: dict[str, list[float]] = {s: [] for s in setups}
            texts: dict[str, list[list[str]]] = {s: [] for s in setups}
            for rnd in range(args.rounds):
                order = list(engines)[rnd % 2:] + list(engines)[:rnd % 2]
                for s in order:
                    seconds, done = timed_requests(engines[s], batch, args.n_gen, GREEDY)
                    tok_per_s[s].append(sum(len(c.tokens) for c in done) / seconds)
                    texts[s].append([c.text for c in done])
            reference = texts["plain"][0]
            for s, e in engines.items():
                st = e.stats()
                drafted = st.draft_tokens - before[s].draft_tokens
                accepted = st.draft_accepted - before[s].draft_accepted
                per_round = [a / b for a, b in zip(tok_per_s[s], tok_per_s["plain"])]
                speedup = spread(per_round) | {"median": spread(tok_per_s[s])["median"] /
                                               spread(tok_per_s["plain"])["median"]}
                rows.append({"model": name, "model_file": path.name, "clients": n, "setup": s,
                             "gen_tok_per_s": spread(tok_per_s[s])["median"], "tok_per_s": spread(tok_per_s[s]),
                             "speedup": speedup, "drafted": drafted, "accepted": accepted,
                             "acceptance": accepted / drafted if drafted else 0.0,
                             "same_text": all(t == reference for t in texts[s])})
    finally:
        for e in engines.values():
            e.close()
    return rows, settings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,falcon-h1-graft,qwen35-small",
                    help="bench model names: smollm2, grafts (falcon-h1-graft, granitehybrid-graft-q4_k_m), zoo")
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--rounds", type=int, default=3, help="each round runs both setups, the order alternating")
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="speculative", help="results stem in --results-dir")
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="where the results go (default bench/results)")
    args = ap.parse_args()
    prov, rows, settings = measure_models(args, measure)
    commit = (prov["commit"] or "?")[:12] + (" (dirty tree)" if prov["dirty"] else "")
    md = [f"Prompt-lookup speculative decoding on a copy task: {args.n_gen} greedy tokens per client, "
          f"{args.threads} threads, batch-invariant kernels and flash attention on both sides; {args.rounds} "
          f"round(s), the order alternating, after a warm-up; median over rounds [min-max]; commit {commit}; "
          f"{prov['cpu_model']}.", "",
          "| model | clients | setup | generated tok/s | speedup vs plain | drafts accepted / proposed | "
          "same text as plain |", "|---|---:|---|---:|---:|---:|---|"]
    md += [f"| {r['model']} | {r['clients']} | {r['setup']} | {fmt_spread(r['tok_per_s'], '{:.1f}')} "
           f"| {fmt_spread(r['speedup'])}x | {r['accepted']} / {r['drafted']} ({r['acceptance']:.0%}) "
           f"| {'yes' if r['same_text'] else 'NO'} |" for r in rows]
    write_results(args.out, {"provenance": prov, "rounds": args.rounds, "n_gen": args.n_gen, "threads": args.threads,
                             "clients": [int(x) for x in args.clients.split(",")], "engines": settings, "rows": rows}, "\n".join(md) + "\n",
                  args.results_dir)
    lines(args.out, rows, series="setup", x="clients", y=lambda r: r["gen_tok_per_s"],
          y_range=lambda r: (r["tok_per_s"]["min"], r["tok_per_s"]["max"]),
          title="prompt-lookup speculative decoding", xlabel="concurrent sequences", ylabel="generated tokens/s",
          results_dir=args.results_dir)
    return 0 if all(r["same_text"] for r in rows) else 1


if __name__ == "__main__":
    run_main(main)
