"""A shared system prompt and 8 clients: time to first token and memory, with and without the prefix cache.

    python bench/shared_prefix.py [--models qwen35-small] [--prefix-tokens 2048] [--clients 8] [--max-tokens 16]

Every client's prompt is the same system prompt of --prefix-tokens tokens
followed by its own question.  Client 1 arrives alone and is served; then
clients 2..N arrive together.  The Engine runs twice, each time in a fresh
process with the same context size (room for every client's full prompt):
  cache     Engine(prefix_cache=32), the default: client 1 leaves the prefix's states in the cache
            (recurrent snapshots, and the prefix's attention cells, shared)
  no cache  Engine(prefix_cache=0): every client prefills the whole system prompt
Measured: the time to first token of client 1 and of clients 2..N (p50/p95),
the prompt tokens served from the cache, and the memory in use at its peak while
clients 2..N run (read every 20 ms through Engine.call, on the engine thread
between steps): attention cells and recurrent cells (live + snapshots) from the memory
report, times their size, and the process's peak RSS.
Target (issue #6): clients 2..N at least 5x faster to their first token with the
cache than without it (and, with the cache, than client 1).
Writes bench/results/shared_prefix.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.load import (MiB, BenchError, Progress, run_child, run_main, target, write_results,  # noqa: E402
                        zoo_model)

TARGET = 5.0

# One Engine: client 1, then clients 2..N at once, the memory they use read as they sample.
CHILD = r"""
import json, statistics, sys, threading, time
from bench.load import percentile, proc_memory
from pyllama_ssm.engine import Engine
from pyllama_ssm.sampling import SamplingParams
path, (n_ctx, prefix_tokens, clients, max_tokens, cache, threads) = sys.argv[1], map(int, sys.argv[2:])
WORDS = ("state space model recurrent memory attention token sequence batch cache prefix shared pool "
         "server client stream request answer context layer weight vector matrix kernel").split()
GREEDY = SamplingParams(temperature=0)

with Engine(path, n_ctx=n_ctx, parallel=clients, n_threads=threads, prefix_cache=cache) as engine:
    model = engine.model
    text = "You are a helpful assistant. " + " ".join(WORDS[i * 7 % len(WORDS)] for i in range(prefix_tokens))
    system = model.tokenize(text)[:prefix_tokens]
    prompts = [system + model.tokenize(f"\nClient {c}: what is a {WORDS[c]}?", add_special=False)
               for c in range(clients)]
    engine.generate("warm up", GREEDY, max_tokens=2)

    peak = {"kv_cells": 0, "rs_cells": 0}

    def sample_memory():
        # runs on the engine thread (Engine.call), between steps: the memory in use at that moment
        rep = engine.ctx.memory_report()
        rs_cells = rep.rs_cells_live
        if cache:  # the snapshot pool: live states and the cache's snapshots
            pool = engine.ctx.pool_stats()
            rs_cells = pool.n_cells_live + pool.n_cells_snapshot
        peak["kv_cells"] = max(peak["kv_cells"], rep.kv_cells_used)
        peak["rs_cells"] = max(peak["rs_cells"], rs_cells)

    def watch(done: threading.Event):
        while not done.wait(0.02):
            engine.call(sample_memory)

    def serve(batch, params):
        # submit together; per request the seconds to its first token, then its completion
        t0 = time.perf_counter()
        reqs = [engine.submit(p, params, max_tokens=max_tokens) for p in batch]
        firsts = [None] * len(reqs)
        def first(i):
            next(iter(reqs[i]))
            firsts[i] = time.perf_counter() - t0
        waiters = [threading.Thread(target=first, args=(i,)) for i in range(len(reqs))]
        for w in waiters: w.start()
        for w in waiters: w.join()
        return firsts, [r.result() for r in reqs]

    (ttft_first,), (done_first,) = serve(prompts[:1], GREEDY)
    done = threading.Event()
    watcher = threading.Thread(target=watch, args=(done,))
    watcher.start()
    try:
        ttft_rest, done_rest = serve(prompts[1:], GREEDY)
    finally:
        done.set()
        watcher.join()
    engine.call(sample_memory)
    report = engine.memory().report
    print(json.dumps({
        "prompt_tokens": len(prompts[0]), "n_ctx": engine.n_ctx,
        "ttft_first": ttft_first, "ttft_rest": ttft_rest,
        "ttft_rest_p50": percentile(ttft_rest, 50), "ttft_rest_p95": percentile(ttft_rest, 95),
        "cached_tokens_first": done_first.usage.cached_tokens,
        "cached_tokens_rest": statistics.mean(c.usage.cached_tokens for c in done_rest),
        "kv_cells_peak": peak["kv_cells"], "rs_cells_peak": peak["rs_cells"],
        "kv_bytes_peak": peak["kv_cells"] * report.kv_bytes_per_cell,
        "rs_bytes_peak": peak["rs_cells"] * report.rs_bytes_per_cell,
        **proc_memory()}))
"""


def measure(model: Path, cache: int, args: argparse.Namespace) -> dict:
    n_ctx = args.clients * (args.prefix_tokens + 64 + args.max_tokens)  # every client's full prompt fits
    out, _ = run_child("pyllama-ssm", CHILD, str(model), str(n_ctx), str(args.prefix_tokens), str(args.clients),
                       str(args.max_tokens), str(cache), str(args.threads))
    if cache and not out["cached_tokens_rest"]:
        raise BenchError(f"{model.name}: with the prefix cache, clients 2..{args.clients} got no cached tokens")
    return out


def markdown(rows: list[dict], checks: list[dict], args: argparse.Namespace) -> str:
    n = args.clients
    lines = [f"Shared system prompt of {args.prefix_tokens} tokens, {n} clients ({args.max_tokens} tokens each): "
             f"client 1 alone, then clients 2..{n} together", "",
             f"| model | prefix cache | TTFT client 1 ms | TTFT 2..{n} p50 ms | TTFT 2..{n} p95 ms "
             f"| cached tokens 2..{n} | KV in use MiB | recurrent in use MiB | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'on' if r['cache'] else 'off'} | {r['ttft_first'] * 1000:.0f} "
                     f"| {r['ttft_rest_p50'] * 1000:.0f} | {r['ttft_rest_p95'] * 1000:.0f} "
                     f"| {r['cached_tokens_rest']:.0f} / {r['prompt_tokens']} | {r['kv_bytes_peak'] / MiB:.1f} "
                     f"| {r['rs_bytes_peak'] / MiB:.1f} | {r['peak_rss'] / MiB:.1f} |")
    lines += ["", "| model | ratio (TTFT p50) | value | target | |", "|---|---|---:|---|---|"]
    for c in checks:
        lines.append(f"| {c['model']} | {c['ratio']} | {c['value']:.1f}x | >= {TARGET:g}x | {c['verdict']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen35-small")
    ap.add_argument("--prefix-tokens", type=int, default=2048)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    if args.clients < 2:
        raise BenchError(f"--clients {args.clients}: at least 2 (client 1, then the others)")
    models = {name: zoo_model(name) for name in args.models.split(",")}
    progress = Progress(2 * len(models))
    rows, checks = [], []
    for name, path in models.items():
        runs = {}
        for cache in (8, 0):
            progress.show(f"{name} prefix cache {'on' if cache else 'off'}")
            runs[cache] = measure(path, cache, args)
            rows.append({"model": name, "cache": cache, **runs[cache]})
            progress.advance()
        on, off = runs[8], runs[0]
        n = args.clients
        for ratio, value in ((f"2..{n} without cache / with cache", off["ttft_rest_p50"] / on["ttft_rest_p50"]),
                             (f"client 1 / 2..{n}, with cache", on["ttft_first"] / on["ttft_rest_p50"])):
            checks.append({"model": name, "ratio": ratio, "value": value, "verdict": target(value, TARGET, True)})
    progress.close()
    write_results("shared_prefix", {"machine": platform.platform(), "cpus": os.cpu_count(), **vars(args),
                                    "rows": rows, "ratios": checks}, markdown(rows, checks, args))
    return 0


if __name__ == "__main__":
    run_main(main)
