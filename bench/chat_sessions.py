"""Concurrent multi-turn chats (issue #18): U users, K turns each, every server side by side.

    python bench/chat_sessions.py [--models qwen35-small] [--users 8,32] [--turns 6] [--rounds 1]
        [--servers pyllama-ssm,llama-server,llama-server-unified,example-server,llama-cpp-python]
        [--time-cap 300] [--threads 2]

Every user holds one conversation: a system prompt of --system-tokens tokens
(the same for all users), then K turns; each turn sends the whole history plus a
new user message of 50-300 tokens (seeded: the same for every server) to
/v1/chat/completions on 127.0.0.1 and streams an answer of up to --max-tokens
tokens (greedy, repeat_penalty 1.0; no ignore_eos, which not every server
accepts: an answer that ends early is counted as short).  Users start
--stagger seconds apart and think 0.2-1 s between turns (seeded).

Servers (the same model, n_ctx, threads; a fresh process per run; the order
rotates each round):
  pyllama-ssm            python -m pyllama_ssm.server --n_parallel U
  llama-server           the pin's llama-server at its defaults (slots and KV layout its own)
  llama-server-unified   llama-server --parallel U --kv-unified
  example-server         llama-cpp-python 0.3.36's batched example server (examples/server/server.py
                         of the pinned sdist, config: n_seq_max 2U, kv_unified), over the pristine library
  llama-cpp-python       stock `llama_cpp.server` (one request at a time): its run stops at --time-cap
                         seconds, and what completed is reported
n_ctx is room for every user's whole conversation at once.

Measured per server, model and U: time to first token (first streamed content)
p50/p95 for turn 1 and for turns 2..K and p50 by turn; generated tokens/s over
the run; prompt tokens the server computed / new prompt tokens (a turn's new
tokens: its prompt less the previous turn's prompt and answer; turn 1: the whole
prompt; prompts counted with the model's tokenizer and chat template here), from
each server's own counters:
  pyllama-ssm        /extras/stats: tokens decoded less tokens generated (whole run), and per turn the
                     prompt tokens less usage.prompt_tokens_details.cached_tokens (stream_options.include_usage)
  llama-server       timings.prompt_n of each response (per turn)
  example-server     /metrics llamacpp:prompt_tokens_total (whole run only)
  llama-cpp-python   its log's "prompt eval time ... / N tokens" per request (whole run only)
peak RSS of the server's process tree (sampled every 0.25 s, and the main process's
VmHWM); host memory its prompt cache holds at the end (ours: /extras/stats
cached_bytes; llama-server: the last "cache state" of --cache-ram and the context
checkpoints alive in its slots, from its log; example server: inside its context,
one sequence id per checkpoint, no extra host memory); failed requests.
Writes bench/results/chat_sessions.{json,md,png} (the plot: TTFT p50 by turn).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.load import (RESULTS, MiB, BenchError, Progress, Server, percentile, proc_memory, run_main,  # noqa: E402
                        stream_events, target, tree_rss, write_results, zoo_model)
from pyllama_ssm.engine.scheduler import common_prefix  # noqa: E402

# name -> (server kind, parallel: "U" = the user count, 0 = the server's default, kv_unified)
SERVERS = {"pyllama-ssm": ("pyllama-ssm", "U", False),
           "llama-server": ("llama-server", 0, False),
           "llama-server-unified": ("llama-server", "U", True),
           "example-server": ("example-server", "U", True),
           "llama-cpp-python": ("llama-cpp-python", 1, False)}
WORDS = ("state space model recurrent memory attention token sequence batch cache prefix shared pool server client "
         "stream request answer context layer weight vector matrix kernel river mountain city garden music window "
         "engine planet orbit signal market harbor forest winter summer library theorem proof question story "
         "journey bridge lantern compass marble violin canvas meadow thunder").split()


# -- the conversations ------------------------------------------------------------------------------

class Tokenizer:
    """The model's tokenizer and chat template, to count each request's prompt tokens as the servers see them."""

    def __init__(self, path: Path):
        import jinja2
        from pyllama_ssm.gguf import read
        from pyllama_ssm.model import Model
        meta = read(path).metadata
        self.model = Model(str(path), vocab_only=True)
        env = jinja2.Environment()
        env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(msg))
        self.template = env.from_string(meta.get("tokenizer.chat_template") or "")

    def count(self, text: str) -> int:
        return len(self.model.tokenize(text, add_special=False))

    def prompt_tokens(self, messages: list[dict]) -> int:
        return len(self.prompt_ids(messages))

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.template.render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="")
        return self.model.tokenize(text, add_special=True, parse_special=True)

    def ids(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_special=False)

    def close(self) -> None:
        self.model.close()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(n, 1)))


def script(tok: Tokenizer, users: int, turns: int, system_tokens: int, seed: int) -> dict:
    """The system prompt and every user's messages and think times, seeded: the same for every server."""
    per_word = tok.count(words(random.Random(seed), 2000)) / 2000
    rng = random.Random(seed)
    system = "You are a helpful assistant. Background notes follow. " + words(rng, int(system_tokens / per_word))
    msgs = [[f"User {u}, turn {k + 1}: " + words(rng, int(rng.randint(50, 300) / per_word)) for k in range(turns)]
            for u in range(users)]
    think = [[rng.uniform(0.2, 1.0) for _ in range(turns)] for _ in range(users)]
    return {"system": system, "system_tokens": tok.count(system), "messages": msgs, "think": think}


# -- one run: one server, one model, U users ----------------------------------------------------------

async def chat_turn(client: httpx.AsyncClient, messages: list[dict], max_tokens: int, usage_per_turn: bool) -> dict:
    # plain greedy for every server (llama-cpp-python and ours default to a 1.1 repeat penalty)
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "repeat_penalty": 1.0, "stream": True}
    if usage_per_turn:  # ours: the last chunk's usage says how much of the prompt the prefix cache served
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    ttft, chunks, finish, text, timings, usage = None, 0, None, [], None, None
    async for data in stream_events(client, "/v1/chat/completions", body):
        timings = data.get("timings") or timings  # llama-server: prompt_n (computed), cache_n (reused)
        usage = data.get("usage") or usage
        for choice in data.get("choices") or []:
            finish = choice.get("finish_reason") or finish
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                chunks += 1
                text.append(piece)
    seconds = time.perf_counter() - t0
    if finish is None:
        raise BenchError("the stream ended without a finish reason")
    tokens = (usage or {}).get("completion_tokens") or (timings or {}).get("predicted_n") or \
        (max_tokens if finish == "length" else chunks)
    computed, reused = (timings or {}).get("prompt_n"), (timings or {}).get("cache_n")
    if usage_per_turn and usage and "prompt_tokens_details" in usage:
        reused = usage["prompt_tokens_details"].get("cached_tokens") or 0
        computed = usage["prompt_tokens"] - reused
    return {"ttft": ttft if ttft is not None else seconds, "seconds": seconds, "tokens": tokens, "finish": finish,
            "text": "".join(text), "computed": computed, "reused": reused}


async def drive(url: str, conv: dict, tok: Tokenizer, args: argparse.Namespace, cap: float | None,
                usage_per_turn: bool = False) -> dict:
    """All users' conversations against one server; (records, wall seconds, whether the cap stopped it)."""
    records: list[dict] = []
    t_start = time.perf_counter()

    async def user(u: int) -> None:
        await asyncio.sleep(u * args.stagger)
        history = [{"role": "system", "content": conv["system"]}]
        prev_prompt = prev_answer = 0
        reusable: list[int] = []  # the previous prompt, and its answer's tokens where the text gives them back
        async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout) as client:
            for k in range(args.turns):
                history.append({"role": "user", "content": conv["messages"][u][k]})
                ids = tok.prompt_ids(history)
                prompt = len(ids)
                rec = {"user": u, "turn": k + 1, "start": time.perf_counter() - t_start, "prompt_tokens": prompt,
                       "new_tokens": prompt if k == 0 else max(prompt - prev_prompt - prev_answer, 1),
                       # token-exact: what follows where this prompt parts from the tokens the server computed
                       # for the previous turn (a template may render the history unlike the generation
                       # prompt; random weights' answers tokenize differently when sent back as text)
                       "parted_tokens": max(prompt - common_prefix(reusable, ids, prompt), 1)}
                records.append(rec)
                try:
                    rec.update(await chat_turn(client, history, args.max_tokens, usage_per_turn))
                except (httpx.HTTPError, BenchError, json.JSONDecodeError) as e:
                    rec["error"] = f"{type(e).__name__}: {e}"[:300]
                    return  # the conversation cannot go on without its answer
                answer = rec.pop("text")
                history.append({"role": "assistant", "content": answer})
                prev_prompt, prev_answer = prompt, rec["tokens"]
                # the answer's tokens are its text's when the counts agree (re-tokenizing merges differently)
                again = tok.ids(answer)
                reusable = ids + (again if len(again) == rec["tokens"] else [])
                if k + 1 < args.turns:
                    await asyncio.sleep(conv["think"][u][k])

    tasks = [asyncio.create_task(user(u)) for u in range(args.users_now)]
    done, pending = await asyncio.wait(tasks, timeout=cap)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for t in done:
        if t.exception() is not None:
            raise t.exception()
    for rec in records:  # requests the cap cut short
        if "ttft" not in rec and "error" not in rec:
            rec["error"] = "cut by the time cap"
            rec["cut"] = True
    return {"records": records, "seconds": time.perf_counter() - t_start, "capped": bool(pending)}


class RssWatch:
    """The peak RSS of a process tree, sampled on a thread."""

    def __init__(self, pid: int, every: float = 0.25):
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, tree_rss(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, tree_rss(self.pid))


def _ours(url: str) -> dict:
    model = next(iter(httpx.get(f"{url}/extras/stats", timeout=30).json()["models"].values()))
    eng, mem = model["engine"] or {}, model["memory"] or {}
    return {"computed": eng.get("tokens_decoded", 0) - eng.get("tokens_generated", 0),
            "prefix_hits": eng.get("prefix_hits"), "prefix_misses": eng.get("prefix_misses"),
            "cache_bytes": mem.get("cached_bytes"), "cached_prefixes": mem.get("cached_prefixes"),
            "memory": {k: mem.get(k) for k in ("weights_bytes", "kv_bytes", "rs_bytes", "compute_bytes",
                                              "kv_cells_total", "rs_cells_total")}}


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    m = re.search(rf"^{re.escape(name)}\s+([0-9.eE+-]+)$", text, re.M)
    if not m:
        raise BenchError(f"{url}/metrics has no {name}")
    return float(m.group(1))


def counters(kind: str, url: str) -> dict:
    """The server's own counters that can be read over HTTP (before and after a run)."""
    if kind == "pyllama-ssm":
        return _ours(url)
    if kind == "example-server":
        return {"computed": _metric(url, "llamacpp:prompt_tokens_total")}
    return {}


_CHECKPOINT = re.compile(r"(created|erasing old|erasing|erased invalidated) context checkpoint.*size = ([0-9.]+) MiB")
_CACHE_STATE = re.compile(r"cache state: (\d+) prompts, ([0-9.]+) MiB \(limits: ([0-9.]+) MiB")
_PROMPT_EVAL = re.compile(r"^\s*(?:llama_perf_context_print:\s*)?prompt eval time =\s*[0-9.]+ ms /\s*(\d+) tokens", re.M)


def log_figures(kind: str, log: str) -> dict:
    """What a server's log tells: llama-server's checkpoints and prompt cache, llama_cpp.server's prompt evals."""
    if kind == "llama-server":
        live, count, size = 0.0, 0, 0.0
        for m in _CHECKPOINT.finditer(log):
            mib = float(m.group(2))
            if m.group(1) == "created":
                live, count, size = live + mib, count + 1, max(size, mib)
            else:
                live -= mib
        state = _CACHE_STATE.findall(log)
        out = {"checkpoints_created": count, "checkpoint_mib": size, "checkpoints_live_bytes": int(live * MiB)}
        if state:
            prompts, mib, limit = state[-1]
            out |= {"cache_ram_prompts": int(prompts), "cache_ram_bytes": int(float(mib) * MiB),
                    "cache_ram_limit_bytes": int(float(limit) * MiB)}
        out["cache_bytes"] = out["checkpoints_live_bytes"] + out.get("cache_ram_bytes", 0)
        return out
    if kind == "llama-cpp-python":
        evals = [int(n) for n in _PROMPT_EVAL.findall(log)]
        return {"computed": sum(evals), "prompt_evals": len(evals), "cache_bytes": 0}
    return {}


def run_one(name: str, model: Path, conv: dict, tok: Tokenizer, args: argparse.Namespace) -> dict:
    kind, parallel, unified = SERVERS[name]
    parallel = args.users_now if parallel == "U" else parallel
    cap = args.time_cap
    extra = tuple(args.ours_args.split()) if kind == "pyllama-ssm" else ()
    with Server(kind, model, n_ctx=args.n_ctx, parallel=parallel, threads=args.threads, kv_unified=unified,
                extra=extra, timeout=300) as server:
        before = counters(kind, server.url)
        watch = RssWatch(server.proc.pid)
        try:
            out = asyncio.run(drive(server.url, conv, tok, args, cap, usage_per_turn=kind == "pyllama-ssm"))
        finally:
            peak_tree = watch.stop()
        after = counters(kind, server.url)
        main_peak = proc_memory(server.proc.pid)["peak_rss"]
        server.stop()
        log = server.log()
        logged = log_figures(kind, log)
    recs = out["records"]
    ok = [r for r in recs if "error" not in r]
    run = {"server": name, "kind": kind, "parallel": parallel, "extra_args": list(extra),
           "seconds": out["seconds"], "capped": out["capped"],
           "records": recs, "peak_rss": max(peak_tree, main_peak), **logged}
    if "computed" in before:
        run["computed"] = after["computed"] - before["computed"]
    if kind == "pyllama-ssm":
        run |= {k: after[k] for k in ("prefix_hits", "prefix_misses", "cache_bytes", "cached_prefixes", "memory")}
    if kind == "llama-server":
        run["computed"] = sum(r["computed"] or 0 for r in ok)
    if kind == "example-server":
        run["cache_bytes"] = 0  # its checkpoints are sequences of the context (n_seq_max), not host copies
    failed = [r for r in recs if "error" in r and not r.get("cut")]
    if failed:  # the server's last words say why (a crash, a full context)
        run["log_tail"] = log[-4000:]
        print(f"\n{name}: {len(failed)} failed request(s), first: {failed[0]['error']}", file=sys.stderr)
    if not ok:
        raise BenchError(f"{name} on {model.name}: no request completed; first error: "
                         f"{recs[0].get('error') if recs else 'none sent'}")
    return run


# -- summary ----------------------------------------------------------------------------------------

def summarize(runs: list[dict], args: argparse.Namespace, system_tokens: int) -> dict:
    """One row per server for a model and U: every round's requests pooled."""
    recs = [r for run in runs for r in run["records"]]
    ok = [r for r in recs if "error" not in r]
    first = [r["ttft"] for r in ok if r["turn"] == 1]
    rest = [r["ttft"] for r in ok if r["turn"] > 1]
    tokens = sum(r["tokens"] for r in ok)
    seconds = sum(run["seconds"] for run in runs)
    new = sum(r["new_tokens"] for r in ok)
    # the counters of a run count the requests it cut or lost too: so does the denominator of their ratio
    new_sent = sum(r["new_tokens"] for r in recs)
    row = {"server": runs[0]["server"], "rounds": len(runs),
           "planned": len(runs) * args.users_now * args.turns, "completed": len(ok),
           "failed": sum(1 for r in recs if "error" in r and not r.get("cut")),
           "cut": sum(1 for r in recs if r.get("cut")), "capped": any(run["capped"] for run in runs),
           "short": sum(1 for r in ok if r["finish"] != "length"),
           "tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds,
           "ttft_turn1_p50": percentile(first, 50) if first else None,
           "ttft_turn1_p95": percentile(first, 95) if first else None,
           "ttft_rest_p50": percentile(rest, 50) if rest else None,
           "ttft_rest_p95": percentile(rest, 95) if rest else None,
           "ttft_by_turn_p50": [percentile(t, 50) if (t := [r["ttft"] for r in ok if r["turn"] == k]) else None
                                for k in range(1, args.turns + 1)],
           "new_tokens": new, "new_tokens_rest": sum(r["new_tokens"] for r in ok if r["turn"] > 1),
           # the least a server can compute: every new token once, the shared system prompt once per run
           "ideal_tokens": new_sent - sum(max(sum(1 for r in run["records"] if r["turn"] == 1) - 1, 0)
                                          for run in runs) * system_tokens,
           "peak_rss": max(run["peak_rss"] for run in runs),
           "cache_bytes": max((run.get("cache_bytes") or 0) for run in runs)}
    if all("computed" in run for run in runs):
        # a capped run's counters include requests it cut short: the ratio then reads high
        row["computed"] = sum(run["computed"] for run in runs)
        row["computed_per_new"] = row["computed"] / new_sent if new_sent else None
        row["computed_per_ideal"] = row["computed"] / row["ideal_tokens"] if row["ideal_tokens"] else None
    per_request = [r for r in ok if r.get("computed") is not None]
    if per_request and len(per_request) == len(ok):
        rest_recs = [r for r in ok if r["turn"] > 1]
        if rest_recs:
            row["computed_per_new_rest"] = sum(r["computed"] for r in rest_recs) / row["new_tokens_rest"]
            if all("parted_tokens" in r for r in rest_recs):  # runs before it was measured lack it
                row["computed_per_parted_rest"] = sum(r["computed"] for r in rest_recs) / \
                    sum(r["parted_tokens"] for r in rest_recs)
            row["computed_per_new_by_turn"] = [
                sum(r["computed"] for r in ok if r["turn"] == k) / max(sum(r["new_tokens"] for r in ok
                                                                          if r["turn"] == k), 1)
                for k in range(1, args.turns + 1)]
    for key in ("prefix_hits", "prefix_misses", "cached_prefixes", "checkpoints_created", "checkpoint_mib",
                "cache_ram_bytes", "cache_ram_limit_bytes", "checkpoints_live_bytes"):
        values = [run[key] for run in runs if run.get(key) is not None]
        if values:
            row[key] = max(values)
    return row


def checks(rows: list[dict]) -> list[dict]:
    """Issue #18 point 5: pyllama-ssm against llama-server at its defaults and the example server."""
    by = {r["server"]: r for r in rows}
    ours, out = by.get("pyllama-ssm"), []
    if ours is None:
        return out

    def add(what: str, value: float | None, bound: float, at_least: bool) -> None:
        if value is not None:
            out.append({"target": what, "value": value, "bound": f"{'>=' if at_least else '<='} {bound:.3g}",
                        "verdict": target(value, bound, at_least)})

    if "computed_per_new_rest" in ours:
        add("pyllama-ssm computed / new prompt tokens, turns 2..K", ours["computed_per_new_rest"], 1.05, False)
        add("pyllama-ssm computed / tokens after the parting (token-exact), turns 2..K",
            ours.get("computed_per_parted_rest"), 1.05, False)
    for ref, tput in (("llama-server", 1.2), ("example-server", 2.0)):
        if (r := by.get(ref)) is None:
            continue
        if ours["ttft_rest_p50"] and r["ttft_rest_p50"]:
            add(f"TTFT p50 turns 2..K / {ref}'s", ours["ttft_rest_p50"] / r["ttft_rest_p50"], 1 / 3, False)
        add(f"tokens/s / {ref}'s", ours["tok_per_s"] / r["tok_per_s"], tput, True)
    if (r := by.get("llama-server")) is not None:
        if ours["ttft_turn1_p50"] and r["ttft_turn1_p50"]:
            add("TTFT p50 turn 1 / llama-server's", ours["ttft_turn1_p50"] / r["ttft_turn1_p50"], 1.1, False)
        add("peak RSS / llama-server's", ours["peak_rss"] / r["peak_rss"], 1.0, False)
    return out


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def markdown(tables: list[dict], args: argparse.Namespace) -> str:
    lines = [f"Multi-turn chats: {args.turns} turns per user, system prompt ~{args.system_tokens} tokens, user "
             f"messages 50-300 tokens, answers of up to {args.max_tokens} tokens (greedy), users {args.stagger:g} s "
             f"apart, 0.2-1 s think time; {args.threads} threads, {args.rounds} round(s). TTFT in seconds; computed/new: prompt tokens the server computed / new "
             f"prompt tokens (turn 1: the whole prompt) of every request sent, from its own counters (- where it "
             f"reports none); t2..K exact: turns 2..K's computed prompt tokens / the tokens after where each "
             f"prompt parts from the previous turn's prompt and answer tokens (an answer counts as reusable "
             f"when its text tokenizes back into as many tokens as were generated); "
             f"ideal: every new token once, the system prompt once.", ""]
    for t in tables:
        lines += [f"### {t['model']}, U = {t['users']} (n_ctx {t['n_ctx']}, system prompt {t['system_tokens']} "
                  f"tokens, time cap {t.get('time_cap', args.time_cap):g} s)", "",
                  "| server | done / planned | failed | short | TTFT t1 p50 | t1 p95 | TTFT t2..K p50 | t2..K p95 "
                  "| tok/s | computed/new all | t2..K | t2..K exact | computed/ideal | peak RSS MiB | cache MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in t["rows"]:
            done = f"{r['completed']} / {r['planned']}" + (" (capped)" if r["capped"] else "")
            lines.append(f"| {r['server']} | {done} | {r['failed']} | {r['short']} | {_s(r['ttft_turn1_p50'])} "
                         f"| {_s(r['ttft_turn1_p95'])} | {_s(r['ttft_rest_p50'])} | {_s(r['ttft_rest_p95'])} "
                         f"| {r['tok_per_s']:.1f} | {_s(r.get('computed_per_new'))} "
                         f"| {_s(r.get('computed_per_new_rest'))} | {_s(r.get('computed_per_parted_rest'))} "
                         f"| {_s(r.get('computed_per_ideal'))} "
                         f"| {r['peak_rss'] / MiB:.0f} | {r['cache_bytes'] / MiB:.1f} |")
        lines += ["", "TTFT p50 by turn (s): " + "; ".join(
            f"{r['server']} " + " / ".join(_s(v) for v in r["ttft_by_turn_p50"]) for r in t["rows"])]
        if t["checks"]:
            lines += ["", "| issue #18 target | value | target | |", "|---|---:|---|---|"]
            lines += [f"| {c['target']} | {c['value']:.2f} | {c['bound']} | {c['verdict']} |" for c in t["checks"]]
        lines.append("")
    return "\n".join(lines)


def merge(old: list[dict], new: list[dict], args: argparse.Namespace) -> list[dict]:
    """--merge: the earlier tables, with this invocation's servers' runs in place of theirs (same model and U)."""
    fresh = {(t["model"], t["users"]): t for t in new}
    out = []
    for t in old:
        if (n := fresh.pop((t["model"], t["users"]), None)) is None:
            out.append(t)
            continue
        runs = {**t["runs"], **n["runs"]}
        args.users_now = n["users"]
        rows = [summarize(runs[s], args, n["system_tokens"]) for s in SERVERS if s in runs]
        out.append({**n, "rows": rows, "checks": checks(rows), "runs": runs})
    return out + list(fresh.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen35-small", help="zoo names (smollm2: the real SmolLM2-135M-Instruct)")
    ap.add_argument("--users", default="8,32", help="comma-separated user counts U")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--rounds", type=int, default=1, help="each round runs every server once, the order rotated")
    ap.add_argument("--system-tokens", type=int, default=1500)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--stagger", type=float, default=0.3, help="seconds between two users' first turns")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--time-cap", type=float, default=300, help="seconds one run may take; then it stops")
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--ours-args", default="", help="more pyllama-ssm server flags, e.g. \"--n_batch 2048\"")
    ap.add_argument("--out", default="chat_sessions", help="results stem in bench/results")
    ap.add_argument("--merge", action="store_true",
                    help="keep bench/results/<out>.json's runs of the models, U and servers not run now")
    ap.add_argument("--render", action="store_true",
                    help="run nothing: rebuild bench/results/<out>.{md,png} and its rows from the runs in <out>.json")
    args = ap.parse_args()
    if args.render:
        return render(args)
    servers = args.servers.split(",")
    if unknown := [s for s in servers if s not in SERVERS]:
        raise BenchError(f"--servers: unknown {unknown}; expected some of {list(SERVERS)}")
    users = [int(u) for u in args.users.split(",")]
    if args.turns < 1 or min(users) < 1:
        raise BenchError("--turns and --users must be at least 1")
    models = {name: zoo_model(name) for name in args.models.split(",")}
    progress = Progress(len(models) * len(users) * args.rounds * len(servers))
    tables = []
    for name, path in models.items():
        tok = Tokenizer(path)
        for u in users:
            args.users_now = u
            conv = script(tok, u, args.turns, args.system_tokens, args.seed)
            # room for every conversation at once: system prompt, K messages of <= 300 tokens and answers
            per_user = conv["system_tokens"] + args.turns * (300 * 1.3 + args.max_tokens + 16) + 64
            args.n_ctx = int(-(-u * per_user // 1024) * 1024)
            runs: dict[str, list[dict]] = {s: [] for s in servers}
            for rnd in range(args.rounds):
                order = servers[rnd % len(servers):] + servers[:rnd % len(servers)]
                for s in order:
                    progress.show(f"{name} U={u} round {rnd + 1} {s}")
                    runs[s].append(run_one(s, path, conv, tok, args) | {"round": rnd + 1})
                    progress.advance()
            rows = [summarize(runs[s], args, conv["system_tokens"]) for s in servers]
            tables.append({"model": name, "users": u, "n_ctx": args.n_ctx, "system_tokens": conv["system_tokens"],
                           "time_cap": args.time_cap,
                           "rows": rows, "checks": checks(rows), "runs": runs})
        tok.close()
    progress.close()
    stem_json = RESULTS / f"{args.out}.json"
    if args.merge and stem_json.exists():
        tables = merge(json.loads(stem_json.read_text())["tables"], tables, args)
    write(tables, args)
    return 0


def render(args: argparse.Namespace) -> int:
    """--render: every table's rows and checks again from its stored runs, with the settings they ran with."""
    data = json.loads((RESULTS / f"{args.out}.json").read_text())
    for key in ("turns", "system_tokens", "max_tokens", "stagger", "threads", "rounds", "time_cap"):
        setattr(args, key, data[key])
    for t in data["tables"]:
        args.users_now = t["users"]
        t["rows"] = [summarize(runs, args, t["system_tokens"]) for runs in t["runs"].values()]
        t["checks"] = checks(t["rows"])
    write(data["tables"], args)
    return 0


def write(tables: list[dict], args: argparse.Namespace) -> None:
    args_out = {k: v for k, v in vars(args).items() if k not in ("users_now", "n_ctx", "render", "merge")}
    write_results(args.out, {"machine": platform.platform(), "cpus": os.cpu_count(), **args_out, "tables": tables},
                  markdown(tables, args))
    from bench.plot import lines
    plot_rows = [{"model": f"{t['model']} U={t['users']}", "server": r["server"], "turn": k + 1, "ttft": v}
                 for t in tables for r in t["rows"] for k, v in enumerate(r["ttft_by_turn_p50"]) if v is not None]
    lines(args.out, plot_rows, series="server", x="turn", y=lambda r: r["ttft"], title="TTFT p50 by turn",
          xlabel="turn", ylabel="time to first token, s", log2_x=False)


if __name__ == "__main__":
    run_main(main)
