"""Memory vs parallel clients at a fixed context: pyllama-ssm vs llama-cpp-python instances vs llama-server.

    python bench/memory_clients.py [--models qwen35-small,jamba-small] [--clients 1,2,4,8,16] [--n-ctx 8192]

For each model and each number of clients N, every client served one greedy
request of --max-tokens tokens, then the memory is read:
  pyllama-ssm            one Engine: one context of n_ctx tokens shared by N sequences (its default prefix cache)
  llama-cpp-python xN    stock llama-cpp-python, N Llama(n_ctx) objects in one process, one per client
                         (how its users serve N clients at once: one Llama runs one sequence)
  llama-server unified   upstream llama-server --parallel N -c n_ctx --kv-unified: n_ctx shared
  llama-server split     upstream llama-server --parallel N -c n_ctx --no-kv-unified: n_ctx / N per slot
Two measures, none estimated:
  buffers   what the library allocated (weights, attention KV, recurrent states, compute, output): our
            memory report (patch 0001) for pyllama-ssm, the buffer sizes llama.cpp logs as it allocates
            them for the others
  peak RSS  the process's VmHWM from /proc, read while everything is still loaded
  PSS       its proportional set size: RSS counts the mmapped weights of N llama-cpp-python models
            N times, PSS once, as the page cache holds them (on a GPU each would hold its own copy).
            Each model is read from a private copy, so that no other process's mapping of the zoo
            file (tests running alongside) takes a share of its pages.
Targets (issue #6): pyllama-ssm at 8 clients <= 1.15x its memory at 1 client; >= 5x less than 8
llama-cpp-python instances.  Writes bench/results/memory_clients.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import plot  # noqa: E402
from bench.load import (MiB, BenchError, Progress, Server, client_prompts, logged_buffers,  # noqa: E402
                        run_child, run_load, run_main, target, write_results, zoo_model)

SETUPS = ("pyllama-ssm", "llama-cpp-python xN", "llama-server unified", "llama-server split")

# One Engine serving N clients; its memory report and its own /proc numbers as one JSON line.
ENGINE_CHILD = r"""
import json, sys
from bench.load import PROMPT, proc_memory
from pyllama_ssm.engine import Engine
from pyllama_ssm.sampling import SamplingParams
path, (n_ctx, clients, threads, max_tokens) = sys.argv[1], map(int, sys.argv[2:])
with Engine(path, n_ctx=n_ctx, parallel=clients, n_threads=threads) as engine:
    reqs = [engine.submit(PROMPT.format(client=c, request=0), SamplingParams(temperature=0), max_tokens=max_tokens)
            for c in range(clients)]
    for r in reqs:
        r.result()
    rep = engine.memory().report
    buffers = {"weights": rep.weights_bytes, "kv": rep.kv_bytes, "rs": rep.rs_bytes, "compute": rep.compute_bytes,
               "output": rep.output_bytes, "total": rep.total_bytes}
    print(json.dumps({"buffers": buffers, **proc_memory()}))
"""

# N stock Llama objects in one process, one request each; the buffer sizes are in its verbose log.
STOCK_CHILD = r"""
import json, sys
import llama_cpp
from bench.load import PROMPT, proc_memory
path, (n_ctx, clients, threads, max_tokens) = sys.argv[1], map(int, sys.argv[2:])
llms = [llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=True)
        for _ in range(clients)]
for c, llm in enumerate(llms):
    llm.create_completion(PROMPT.format(client=c, request=0), max_tokens=max_tokens, temperature=0)
print(json.dumps(proc_memory()))
"""


def measure(setup: str, model: Path, n_ctx: int, clients: int, threads: int, max_tokens: int) -> dict:
    """{"ctx_per_client", "buffers": {weights, kv, rs, compute, output, total}, "peak_rss", "rss", "pss"}."""
    args = (str(model), str(n_ctx), str(clients), str(threads), str(max_tokens))
    if setup == "pyllama-ssm":
        return {"ctx_per_client": n_ctx, **run_child("pyllama-ssm", ENGINE_CHILD, *args)[0]}
    if setup == "llama-cpp-python xN":
        mem, log = run_child("llama-cpp-python", STOCK_CHILD, *args)
        return {"ctx_per_client": n_ctx, "buffers": logged_buffers(log, clients), **mem}
    unified = setup == "llama-server unified"
    with Server("llama-server", model, n_ctx=n_ctx, parallel=clients, threads=threads, kv_unified=unified) as srv:
        asyncio.run(run_load(srv.url, client_prompts(clients, 1), max_tokens))
        mem = srv.memory()
        buffers = logged_buffers(srv.log(), 1)
    return {"ctx_per_client": n_ctx if unified else n_ctx // clients, "buffers": buffers, **mem}


def ratios(rows: list[dict], model: str) -> list[dict]:
    """The two targets of issue #6 at 8 clients (and how llama-server compares), per measure."""
    at = {(r["setup"], r["clients"]): r for r in rows if r["model"] == model}
    out = []
    checks = [("pyllama-ssm 8 / 1 clients", ("pyllama-ssm", 8), ("pyllama-ssm", 1), 1.15, False),
              ("llama-cpp-python x8 / pyllama-ssm 8", ("llama-cpp-python xN", 8), ("pyllama-ssm", 8), 5.0, True),
              ("llama-server unified 8 / pyllama-ssm 8", ("llama-server unified", 8), ("pyllama-ssm", 8), None, True),
              ("llama-server split 8 / pyllama-ssm 8", ("llama-server split", 8), ("pyllama-ssm", 8), None, True)]
    for name, num, den, bound, at_least in checks:
        if num not in at or den not in at:
            continue
        for measure_name, get in (("buffers", lambda r: r["buffers"]["total"]), ("peak RSS", lambda r: r["peak_rss"]),
                                  ("PSS", lambda r: r["pss"])):
            value = get(at[num]) / get(at[den])
            out.append({"model": model, "ratio": name, "measure": measure_name, "value": value,
                        "target": None if bound is None else f"{'>=' if at_least else '<='} {bound:g}x",
                        "verdict": "" if bound is None else target(value, bound, at_least)})
    return out


def markdown(rows: list[dict], checks: list[dict], n_ctx: int) -> str:
    m = lambda b: f"{b / MiB:.1f}"  # noqa: E731
    lines = [f"Memory vs clients at n_ctx {n_ctx} (MiB; buffers from the libraries' own accounting, RSS and PSS "
             f"from /proc after every client was served)", "",
             "| model | setup | clients | ctx/client | weights | KV | recurrent | compute+output | buffers total "
             "| peak RSS | PSS |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = r["buffers"]
        lines.append(f"| {r['model']} | {r['setup']} | {r['clients']} | {r['ctx_per_client']} | {m(b['weights'])} "
                     f"| {m(b['kv'])} | {m(b['rs'])} | {m(b['compute'] + b['output'])} | {m(b['total'])} "
                     f"| {m(r['peak_rss'])} | {m(r['pss'])} |")
    lines += ["", "| model | ratio | measure | value | target | |", "|---|---|---|---:|---|---|"]
    for c in checks:
        lines.append(f"| {c['model']} | {c['ratio']} | {c['measure']} | {c['value']:.2f}x | {c['target'] or ''} "
                     f"| {c['verdict']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen35-small,jamba-small")
    ap.add_argument("--clients", default="1,2,4,8,16")
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--setups", default=",".join(SETUPS), help=f"a subset of {','.join(SETUPS)}")
    args = ap.parse_args()
    models = {name: zoo_model(name) for name in args.models.split(",")}
    levels = [int(n) for n in args.clients.split(",")]
    setups = args.setups.split(",")
    if unknown := set(setups) - set(SETUPS):
        raise BenchError(f"--setups: unknown {', '.join(sorted(unknown))} (known: {', '.join(SETUPS)})")
    progress = Progress(len(models) * len(levels) * len(setups))
    rows = []
    with tempfile.TemporaryDirectory(prefix="memory_clients-") as tmp:
        for name, zoo_path in models.items():
            private = Path(tmp, zoo_path.name)
            shutil.copyfile(zoo_path, private)
            for n in levels:
                for setup in setups:
                    progress.show(f"{name} {setup} N={n}")
                    rows.append({"model": name, "setup": setup, "clients": n,
                                 **measure(setup, private, args.n_ctx, n, args.threads, args.max_tokens)})
                    progress.advance()
            private.unlink()
    progress.close()
    checks = [c for name in models for c in ratios(rows, name)]
    write_results("memory_clients", {"machine": platform.platform(), "cpus": os.cpu_count(), "n_ctx": args.n_ctx,
                                     "max_tokens": args.max_tokens, "rows": rows, "ratios": checks},
                  markdown(rows, checks, args.n_ctx))
    plot.lines("memory_clients", rows, series="setup", x="clients", y=lambda r: r["peak_rss"] / MiB,
               title=f"n_ctx {args.n_ctx}", xlabel="clients", ylabel="peak RSS (MiB)")
    return 0


if __name__ == "__main__":
    run_main(main)
