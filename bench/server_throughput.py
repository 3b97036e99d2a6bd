"""Aggregate throughput of N concurrent clients: pyllama-ssm's server vs llama-cpp-python's vs llama-server.

    python bench/server_throughput.py [--models qwen35-small] [--clients 1,4,8] [--max-tokens 32]
                                      [--requests 2] [--rounds 2]

Three OpenAI-compatible servers on 127.0.0.1, the same model, context, thread
count, prompts and greedy sampling, driven by the same load script (bench/load.py):
  pyllama-ssm       python -m pyllama_ssm.server --n_parallel N
  llama-cpp-python  python -m llama_cpp.server (stock 0.3.36): one request at a time
  llama-server      upstream llama-server --parallel N (its default split KV: n_ctx / N per slot)
For each N, a fresh server answers one warm-up request, then N clients each
stream --requests completions of --max-tokens tokens one after another.  Rounds
interleave the servers so that the load of other users of the machine hits them
alike; the table gives medians over rounds: generated tokens/s over the whole
load, time to first token p50/p95, and ratios.
Targets (issue #6) at 8 clients: >= 4x llama-cpp-python's server, >= 0.9x llama-server.
Writes bench/results/server_throughput.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import plot  # noqa: E402
from bench.load import (BenchError, Progress, Server, client_prompts, run_load, run_main, target,  # noqa: E402
                        write_results, zoo_model)

SERVERS = ("pyllama-ssm", "llama-cpp-python", "llama-server")
TARGETS = {"llama-cpp-python": 4.0, "llama-server": 0.9}  # pyllama-ssm / other at 8 clients, at least


def measure(kind: str, model: Path, clients: int, args: argparse.Namespace) -> dict:
    with Server(kind, model, n_ctx=args.n_ctx, parallel=clients, threads=args.threads) as srv:
        asyncio.run(run_load(srv.url, [["warm up"]], 4))
        r = asyncio.run(run_load(srv.url, client_prompts(clients, args.requests), args.max_tokens))
    return {"tokens": r.tokens, "seconds": r.seconds, "tok_per_s": r.tok_per_s, "ttft_p50": r.ttft_p50,
            "ttft_p95": r.ttft_p95, "finish_reasons": sorted({s.finish_reason for s in r.samples})}


def summarize(runs: dict[tuple[str, int, str], list[dict]]) -> list[dict]:
    """Medians over rounds per (model, clients, server), with pyllama-ssm's ratio to each other server."""
    rows = []
    for (model, clients, kind), samples in runs.items():
        rows.append({"model": model, "clients": clients, "server": kind,
                     **{k: statistics.median(s[k] for s in samples) for k in ("tok_per_s", "ttft_p50", "ttft_p95")},
                     "tokens": samples[0]["tokens"], "rounds": samples})
    ours = {(r["model"], r["clients"]): r["tok_per_s"] for r in rows if r["server"] == "pyllama-ssm"}
    for r in rows:
        base = ours.get((r["model"], r["clients"])) if r["server"] != "pyllama-ssm" else None
        r["ours_over_this"] = None if base is None else base / r["tok_per_s"]
        bound = TARGETS.get(r["server"]) if r["clients"] == 8 and base is not None else None
        r["target"] = None if bound is None else f">= {bound:g}x"
        r["verdict"] = None if bound is None else target(r["ours_over_this"], bound, at_least=True)
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"Aggregate throughput, {args.requests} streamed greedy requests of {args.max_tokens} tokens per client, "
             f"n_ctx {args.n_ctx}, {args.threads} threads, median of {args.rounds} round(s)", "",
             "| model | clients | server | tok/s | TTFT p50 ms | TTFT p95 ms | pyllama-ssm / this | target | |",
             "|---|---:|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        ratio = f"{r['ours_over_this']:.2f}x" if r["ours_over_this"] is not None else ""
        lines.append(f"| {r['model']} | {r['clients']} | {r['server']} | {r['tok_per_s']:.1f} "
                     f"| {r['ttft_p50'] * 1000:.0f} | {r['ttft_p95'] * 1000:.0f} | {ratio} | {r['target'] or ''} "
                     f"| {r['verdict'] or ''} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen35-small")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--servers", default=",".join(SERVERS), help=f"a subset of {','.join(SERVERS)}")
    args = ap.parse_args()
    models = {name: zoo_model(name) for name in args.models.split(",")}
    levels = [int(n) for n in args.clients.split(",")]
    servers = args.servers.split(",")
    if unknown := set(servers) - set(SERVERS):
        raise BenchError(f"--servers: unknown {', '.join(sorted(unknown))} (known: {', '.join(SERVERS)})")
    jobs = [(name, n, kind) for name in models for n in levels for kind in servers]
    progress = Progress(len(jobs) * args.rounds)
    runs: dict[tuple[str, int, str], list[dict]] = {}
    for _ in range(args.rounds):
        for name, n, kind in jobs:  # interleaved: every server sees the machine's load alike
            progress.show(f"{name} N={n} {kind}")
            runs.setdefault((name, n, kind), []).append(measure(kind, models[name], n, args))
            progress.advance()
    progress.close()
    rows = summarize(runs)
    write_results("server_throughput", {"machine": platform.platform(), "cpus": os.cpu_count(), **vars(args),
                                        "rows": rows}, markdown(rows, args))
    plot.lines("server_throughput", rows, series="server", x="clients", y=lambda r: r["tok_per_s"],
               title=f"{args.max_tokens} tokens/request", xlabel="concurrent clients", ylabel="generated tokens/s")
    return 0


if __name__ == "__main__":
    run_main(main)
