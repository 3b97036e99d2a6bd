"""Aggregate throughput of N concurrent clients: pyllama-ssm's server vs llama-server configured for N
clients (split KV and unified), llama-server at its defaults, and llama-cpp-python's server.

    python bench/server_throughput.py [--models qwen35-small,falcon-h1-graft] [--clients 1,4,8] [--max-tokens 32]
        [--requests 2] [--rounds 3] [--threads 2] [--n-batch 512] [--n-ubatch 512] [--flash-attn auto]
        [--out server_throughput] [--results-dir bench/results]

OpenAI-compatible servers on 127.0.0.1, the same model, context, thread count, prompts and
greedy sampling, driven by the same load script (bench/load.py):
  pyllama-ssm            python -m pyllama_ssm.server --n_parallel N
  llama-server           the pin's llama-server --parallel N --no-kv-unified (split KV: n_ctx / N per slot)
  llama-server-unified   llama-server --parallel N --kv-unified
  llama-server-default   llama-server at its defaults (4 slots, unified KV, its own -b/-ub/-fa): secondary
  llama-cpp-python       python -m llama_cpp.server (stock 0.3.36): one request at a time
--n-batch, --n-ubatch and --flash-attn go to every server but llama-server-default.  For each
N, a fresh server answers one warm-up request, then N clients each stream --requests
completions of --max-tokens tokens one after another.  Each round runs every server once per
model and N, the order rotated from round to round, so that the load of other users of the
machine hits them alike.  The table gives the median over rounds and its range [min-max]:
generated tokens/s over the whole load, time to first token p50/p95; for each metric,
pyllama-ssm's ratio to the better of the two llama-server configurations for N clients (and
per round), and to the others.  The JSON records each server's command line and the settings
it reports, the git commit (and whether the tree was dirty), the builds, the CPU and its flags.
Targets (issue #6) at 8 clients: >= 4x llama-cpp-python's server, >= 0.9x the better same-N
llama-server.  Writes <results-dir>/<out>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import plot  # noqa: E402
from bench.load import (FLASH_ATTN, RESULTS, BenchError, Progress, Server, check_unchanged,  # noqa: E402
                        client_prompts, fmt_spread, provenance, run_load, run_main, spread, target,
                        write_results, zoo_model)

# name -> (server kind, parallel: "N" = the clients, 0 = the server's default, kv_unified)
SERVERS = {"pyllama-ssm": ("pyllama-ssm", "N", False),
           "llama-server": ("llama-server", "N", False),
           "llama-server-unified": ("llama-server", "N", True),
           "llama-server-default": ("llama-server", 0, False),
           "llama-cpp-python": ("llama-cpp-python", "N", False)}
SAME_N = ("llama-server", "llama-server-unified")
AS_IS = ("llama-server-default",)
TARGETS = {"llama-cpp-python": 4.0, "llama-server (better same-N)": 0.9}  # pyllama-ssm / other at 8 clients
# metric, label, whether higher is better
METRICS = (("tok_per_s", "tokens/s", True), ("ttft_p50", "TTFT p50", False), ("ttft_p95", "TTFT p95", False))


def measure(name: str, model: Path, clients: int, args: argparse.Namespace) -> dict:
    kind, parallel, unified = SERVERS[name]
    tuned = {} if name in AS_IS else {"n_batch": args.n_batch, "n_ubatch": args.n_ubatch,
                                      "flash_attn": args.flash_attn}
    with Server(kind, model, n_ctx=args.n_ctx, parallel=clients if parallel == "N" else parallel,
                threads=args.threads, kv_unified=unified, **tuned) as srv:
        warm = asyncio.run(run_load(srv.url, [["warm up"]], 4))
        settings = srv.settings()
        r = asyncio.run(run_load(srv.url, client_prompts(clients, args.requests), args.max_tokens))
    return {"tokens": r.tokens, "seconds": r.seconds, "tok_per_s": r.tok_per_s, "ttft_p50": r.ttft_p50,
            "ttft_p95": r.ttft_p95, "finish_reasons": sorted({s.finish_reason for s in r.samples}),
            "warmup_seconds": warm.seconds, "command": srv.cmd, "settings": settings}


def _ratio(ours: dict, other: dict, key: str) -> dict:
    """pyllama-ssm's / the other's: of the medians, and per round (round i of both ran side by side)."""
    per = [a[key] / b[key] for a, b in zip(ours["rounds"], other["rounds"])]
    return {"median": ours[key] / other[key], "min": min(per), "max": max(per), "rounds": per}


def summarize(runs: dict[tuple[str, int, str], list[dict]]) -> list[dict]:
    """Medians and ranges over rounds per (model, clients, server), with pyllama-ssm's ratio to each other
    server and, for each metric, to the better same-N llama-server."""
    rows = []
    for (model, clients, name), samples in runs.items():
        rows.append({"model": model, "clients": clients, "server": name,
                     **{k: spread([s[k] for s in samples])["median"] for k, _, _ in METRICS},
                     "spread": {k: spread([s[k] for s in samples]) for k, _, _ in METRICS},
                     "tokens": samples[0]["tokens"], "rounds": samples})
    by = {(r["model"], r["clients"], r["server"]): r for r in rows}
    for r in rows:
        ours = by.get((r["model"], r["clients"], "pyllama-ssm"))
        r["ours_over_this"] = None if ours is None or r is ours else _ratio(ours, r, "tok_per_s")
        r["vs_best_same_n"] = {}
        if r is not ours:
            continue
        for key, label, higher in METRICS:
            same = [by[k] for s in SAME_N if (k := (r["model"], r["clients"], s)) in by]
            if same:
                best = (max if higher else min)(same, key=lambda x: x[key])
                r["vs_best_same_n"][key] = {"server": best["server"], "value": best["spread"][key],
                                            **_ratio(r, best, key)}
    for r in rows:
        r["target"] = r["verdict"] = None
        if r["clients"] != 8:
            continue
        if r["server"] == "llama-cpp-python" and r["ours_over_this"]:
            bound, value = TARGETS["llama-cpp-python"], r["ours_over_this"]["median"]
        elif r["server"] == "pyllama-ssm" and "tok_per_s" in r["vs_best_same_n"]:
            bound, value = TARGETS["llama-server (better same-N)"], r["vs_best_same_n"]["tok_per_s"]["median"]
        else:
            continue
        r["target"] = f">= {bound:g}x"
        r["verdict"] = target(value, bound, at_least=True)
    return rows


def _ratio_cell(ratio: dict | None) -> str:
    if not ratio:
        return ""
    return f"{ratio['median']:.2f}x" + (f" [{ratio['min']:.2f}-{ratio['max']:.2f}]" if len(ratio["rounds"]) > 1 else "")


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    prov = args.provenance
    commit = (prov.get("commit") or "?")[:12] + (" (dirty tree)" if prov.get("dirty") else "") + \
        (f" (CHANGED during the run: {prov['changed_during_run']})" if prov.get("changed_during_run") else "")
    lines = [f"Aggregate throughput, {args.requests} streamed greedy requests of {args.max_tokens} tokens per client, "
             f"n_ctx {args.n_ctx}, {args.threads} threads, n_batch {args.n_batch}, n_ubatch {args.n_ubatch}, flash "
             f"attention {args.flash_attn} (all but llama-server-default); {args.rounds} round(s), interleaved, the "
             f"order rotated, each server warmed up with one request; median over rounds [min-max]; commit {commit}; "
             f"{prov.get('cpu_model', '?')}.", "",
             "| model | clients | server | tok/s | TTFT p50 ms | TTFT p95 ms | pyllama-ssm / this (tok/s) | target | |",
             "|---|---:|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        target_, verdict, ratio = r["target"] or "", r["verdict"] or "", _ratio_cell(r["ours_over_this"])
        if r["server"] == "pyllama-ssm" and (best := r["vs_best_same_n"].get("tok_per_s")):
            ratio = f"{_ratio_cell(best)} vs {best['server']}"
            target_ = f"{target_} the better same-N llama-server" if target_ else ""
        lines.append(f"| {r['model']} | {r['clients']} | {r['server']} "
                     f"| {fmt_spread(r['spread']['tok_per_s'], '{:.1f}')} "
                     f"| {fmt_spread(r['spread']['ttft_p50'], '{:.0f}', 1000)} "
                     f"| {fmt_spread(r['spread']['ttft_p95'], '{:.0f}', 1000)} | {ratio} "
                     f"| {target_} | {verdict} |")
    ours = [r for r in rows if r["server"] == "pyllama-ssm" and r["vs_best_same_n"]]
    if ours:
        lines += ["", "pyllama-ssm against the better of llama-server and llama-server-unified for the same N, per "
                      "metric (ratio of medians [per-round range]):", "",
                  "| model | clients | metric | pyllama-ssm | better same-N llama-server | ratio |",
                  "|---|---:|---|---:|---|---:|"]
        for r in ours:
            for key, label, _ in METRICS:
                if c := r["vs_best_same_n"].get(key):
                    fmt, scale = ("{:.1f}", 1.0) if key == "tok_per_s" else ("{:.0f}", 1000.0)
                    unit = "" if key == "tok_per_s" else " ms"
                    lines.append(f"| {r['model']} | {r['clients']} | {label}{unit} "
                                 f"| {fmt_spread(r['spread'][key], fmt, scale)} "
                                 f"| {c['server']} {fmt_spread(c['value'], fmt, scale)} | {_ratio_cell(c)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen35-small",
                    help="bench model names: zoo (qwen35-small), grafts (falcon-h1-graft, granitehybrid-graft-q4_k_m), "
                         "smollm2")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--n-batch", type=int, default=512,
                    help="every server's logical batch (not llama-server-default's)")
    ap.add_argument("--n-ubatch", type=int, default=512,
                    help="every server's physical batch (not llama-server-default's)")
    ap.add_argument("--flash-attn", choices=FLASH_ATTN, default="auto",
                    help="every server's flash attention (not llama-server-default's; llama_cpp.server: auto = on)")
    ap.add_argument("--rounds", type=int, default=3, help="each round runs every server once, the order rotated")
    ap.add_argument("--servers", default=",".join(SERVERS), help=f"a subset of {','.join(SERVERS)}")
    ap.add_argument("--out", default="server_throughput", help="results stem in --results-dir")
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="where the results go (default bench/results)")
    args = ap.parse_args()
    models = {name: zoo_model(name) for name in args.models.split(",")}
    levels = [int(n) for n in args.clients.split(",")]
    servers = args.servers.split(",")
    if unknown := set(servers) - set(SERVERS):
        raise BenchError(f"--servers: unknown {', '.join(sorted(unknown))} (known: {', '.join(SERVERS)})")
    if args.rounds < 1:
        raise BenchError("--rounds must be at least 1")
    args.provenance = provenance(args.threads)
    progress = Progress(len(models) * len(levels) * len(servers) * args.rounds)
    runs: dict[tuple[str, int, str], list[dict]] = {(m, n, s): [] for m in models for n in levels for s in servers}
    for rnd in range(args.rounds):
        order = servers[rnd % len(servers):] + servers[:rnd % len(servers)]
        for name in models:
            for n in levels:
                for s in order:  # interleaved and rotated: every server sees the machine's load alike
                    progress.show(f"round {rnd + 1} {name} N={n} {s}")
                    runs[(name, n, s)].append(measure(s, models[name], n, args) | {"round": rnd + 1})
                    progress.advance()
    progress.close()
    args.provenance = check_unchanged(args.provenance)
    rows = summarize(runs)
    meta = {k: v for k, v in vars(args).items() if k not in ("provenance", "results_dir")}
    write_results(args.out, {"provenance": args.provenance, "machine": args.provenance["machine"],
                             "cpus": os.cpu_count(), **meta,
                             "model_files": {name: path.name for name, path in models.items()}, "rows": rows},
                  markdown(rows, args), args.results_dir)
    plot.lines(args.out, rows, series="server", x="clients", y=lambda r: r["tok_per_s"],
               y_range=lambda r: (r["spread"]["tok_per_s"]["min"], r["spread"]["tok_per_s"]["max"]),
               title=f"{args.max_tokens} tokens/request", xlabel="concurrent clients", ylabel="generated tokens/s",
               results_dir=args.results_dir)
    return 0


if __name__ == "__main__":
    run_main(main)
