"""Concurrent multi-turn chats (issue #18): U users, K turns each, every server side by side.

    python bench/chat_sessions.py [--models qwen35-small,falcon-h1-graft] [--users 8,32] [--turns 6] [--rounds 3]
        [--servers pyllama-ssm,llama-server,llama-server-unified,llama-server-default] [--time-cap 300]
        [--threads 2] [--n-batch 512] [--n-ubatch 512] [--flash-attn auto] [--out chat_sessions]
        [--results-dir bench/results]

Every user holds one conversation: a system prompt of --system-tokens tokens
(the same for all users), then K turns; each turn sends the whole history plus a
new user message of 50-300 tokens (seeded: the same for every server) to
/v1/chat/completions on 127.0.0.1 and streams an answer of up to --max-tokens
tokens (greedy, repeat_penalty 1.0; no ignore_eos, which not every server
accepts: an answer that ends early is counted as short).  Users start
--stagger seconds apart and think 0.2-1 s between turns (seeded).  That loop is closed: a server that
answers faster is sent the next turns sooner, so it serves more turns per second than a slower one,
in bursts of users its lockstep decoding keeps together.  --pace S opens it: user u's turn k is due at
u * stagger + k * S plus its think times so far, and is sent then (or, if its previous answer has not
come by then, as soon as it does); its TTFT counts from when it was due, so a server that falls behind
is charged for it.  Every server that keeps up then gets the same arrivals.

Servers (the same model, n_ctx, threads; a fresh process per run, which answers one
warm-up request before the measured conversations; the order rotates each round):
  pyllama-ssm            python -m pyllama_ssm.server --n_parallel U
  llama-server           the pin's llama-server --parallel U --no-kv-unified (split KV: n_ctx / U per slot)
  llama-server-unified   llama-server --parallel U --kv-unified (one KV pool for all slots)
  llama-server-default   llama-server at its defaults (4 slots, unified KV, its own -b/-ub/-fa): how it
                         runs out of the box, queueing users beyond its slots; a secondary entry
  example-server         llama-cpp-python 0.3.36's batched example server (examples/server/server.py
                         of the pinned sdist, config: n_seq_max 2U, kv_unified), over the pristine library
  llama-cpp-python       stock `llama_cpp.server` (one request at a time): its run stops at --time-cap
                         seconds, and what completed is reported
The default runs the first four; the last two only when named in --servers (hours at U = 32).
n_ctx is room for every user's whole conversation at once.  --n-batch, --n-ubatch and
--flash-attn go to every server but llama-server-default (the example server takes no flash
attention setting); the JSON records each server's full command line and the settings it
reports (llama.cpp's context log, or our /props), the git commit (and whether the tree was
dirty, with a digest of the difference), the build keys, the CPU model and flags.

Measured per server, model and U, for each round (the table: median over rounds [min-max]):
time to first token (the first streamed text: content, or reasoning_content where the chat template
opens a thinking block, as nemotron_h's does) p50 for turn 1 and for turns 2..K (p95 and p50 by
turn: every round's requests pooled); generated tokens/s over the run; prompt tokens the server
computed / new prompt tokens (a turn's new tokens: its prompt less the previous turn's prompt and
answer; turn 1: the whole prompt; prompts counted with the model's tokenizer and chat template
here), from each server's own counters:
  pyllama-ssm        /extras/stats: tokens decoded less tokens generated (whole run), and per turn the
                     prompt tokens less usage.prompt_tokens_details.cached_tokens (stream_options.include_usage)
  llama-server       timings.prompt_n of each response (per turn)
  example-server     /metrics llamacpp:prompt_tokens_total (whole run only)
  llama-cpp-python   its log's "prompt eval time ... / N tokens" per request (whole run only)
and beside it the token-exact ratio (the tokens after where each prompt parts from the
previous turn's prompt and answer tokens: what differs from the plain ratio where an answer's
text tokenizes into other tokens than were generated, as random weights' answers do; real
text, SmolLM2's or the grafts', re-tokenizes as generated); peak RSS of the server's process
tree (sampled every 0.25 s, and the main process's VmHWM); host memory its prompt cache holds
at the end (ours: /extras/stats cached_bytes, the recurrent snapshots of cached prefixes, their
attention cells staying in the context's KV cache; llama-server: the last "cache state" of
--cache-ram and the context checkpoints alive in its slots, from its log; example server:
inside its context, one sequence id per checkpoint, no extra host memory); failed requests.
For each metric the summary names pyllama-ssm's ratio to the better of the two same-U
llama-server configurations (and per round, the rounds being interleaved), then to the others.
Writes <results-dir>/<out>.{json,md,png} (the plot: TTFT p50 by turn).  --merge adds this run's
tables to an earlier <out>.json only when both ran the same code (commit and tree digest), builds,
CPU, threads and workload settings; it refuses otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.load import (FLASH_ATTN, RESULTS, MiB, BenchError, Progress, Server, check_unchanged,  # noqa: E402
                        fmt_spread, percentile, proc_memory, provenance, run_main, same_code, spread,
                        stream_events, target, tree_rss, write_results, zoo_model)
from pyllama_ssm.engine.scheduler import common_prefix  # noqa: E402

# name -> (server kind, parallel: "U" = the user count, 0 = the server's default, kv_unified)
SERVERS = {"pyllama-ssm": ("pyllama-ssm", "U", False),
           "llama-server": ("llama-server", "U", False),
           "llama-server-unified": ("llama-server", "U", True),
           "llama-server-default": ("llama-server", 0, False),
           "example-server": ("example-server", "U", True),
           "llama-cpp-python": ("llama-cpp-python", 1, False)}
DEFAULT_SERVERS = ("pyllama-ssm", "llama-server", "llama-server-unified", "llama-server-default")
SAME_U = ("llama-server", "llama-server-unified")  # llama-server configured for U users: ours is held to the better
AS_IS = ("llama-server-default",)  # at the server's own defaults: no --n-batch/--n-ubatch/--flash-attn
WARM_UP = [{"role": "user", "content": "Warm-up request: name one colour."}]
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

async def chat_turn(client: httpx.AsyncClient, messages: list[dict], max_tokens: int, usage_per_turn: bool,
                    seen: dict | None = None) -> dict:
    """One streamed turn; `seen` gets "first_token" (seconds) as soon as it comes and "streamed" (chunks of
    text so far), which a request the time cap cuts mid-answer still has."""
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
            delta = choice.get("delta") or {}
            piece = delta.get("content")
            # the first token's text, answer or reasoning: a thinking template's answer (every token of a
            # random model's) streams as reasoning_content from both servers, and without it the first
            # token would be timed at the end of the request
            if ttft is None and (piece or delta.get("reasoning_content")):
                ttft = time.perf_counter() - t0
                if seen is not None:
                    seen["first_token"] = ttft
            if seen is not None and (piece or delta.get("reasoning_content")):
                seen["streamed"] = seen.get("streamed", 0) + 1
            if piece:
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
        due = u * args.stagger  # --pace: when its next turn is due
        await asyncio.sleep(due)
        history = [{"role": "system", "content": conv["system"]}]
        prev_prompt = prev_answer = 0
        reusable: list[int] = []  # the previous prompt, and its answer's tokens where the text gives them back
        async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout) as client:
            for k in range(args.turns):
                ready = time.perf_counter() - t_start  # --pace: late past this is the server's, not the driver's
                history.append({"role": "user", "content": conv["messages"][u][k]})
                ids = tok.prompt_ids(history)
                prompt = len(ids)
                rec = {"user": u, "turn": k + 1, "start": time.perf_counter() - t_start, "prompt_tokens": prompt,
                       "new_tokens": prompt if k == 0 else max(prompt - prev_prompt - prev_answer, 1),
                       # token-exact: what follows where this prompt parts from the tokens the server computed
                       # for the previous turn (a template may render the history unlike the generation
                       # prompt; random weights' answers tokenize differently when sent back as text)
                       "parted_tokens": max(prompt - common_prefix(reusable, ids, prompt), 1)}
                if args.pace:  # the wait counts from when the turn was due
                    rec["due"], rec["late"] = due, max(ready - due, 0.0)
                records.append(rec)
                try:
                    rec.update(await chat_turn(client, history, args.max_tokens, usage_per_turn, seen=rec))
                    rec["ttft"] += rec.get("late", 0.0)
                except (httpx.HTTPError, BenchError, json.JSONDecodeError) as e:
                    rec["error"] = f"{type(e).__name__}: {e}"[:300]
                    return  # the conversation cannot go on without its answer
                answer = rec.pop("text")
                history.append({"role": "assistant", "content": answer})
                prev_prompt, prev_answer = prompt, rec["tokens"]
                # the answer's tokens are its text's when the counts agree (re-tokenizing merges differently)
                again = tok.ids(answer)
                reusable = ids + (again if len(again) == rec["tokens"] else [])
                if k + 1 < args.turns and args.pace:
                    due += args.pace + conv["think"][u][k]
                    await asyncio.sleep(max(due - (time.perf_counter() - t_start), 0.0))
                elif k + 1 < args.turns:
                    await asyncio.sleep(conv["think"][u][k])

    tasks = [asyncio.create_task(user(u)) for u in range(args.users_now)]
    done, pending = await asyncio.wait(tasks, timeout=cap)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for t in done:
        if t.exception() is not None:
            raise t.exception()
    seconds = time.perf_counter() - t_start
    for rec in records:  # requests the cap cut short
        if "ttft" not in rec and "error" not in rec:
            rec["error"] = "cut by the time cap"
            rec["cut"] = True
            if "first_token" not in rec:  # still waiting: its first token comes later than this, if ever
                rec["ttft_atleast"] = seconds - rec.get("due", rec["start"])
            else:
                rec["first_token"] += rec.get("late", 0.0)
    return {"records": records, "seconds": seconds, "capped": bool(pending)}


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


async def warm_up(url: str, timeout: float) -> float:
    """One short request before the measured conversations (weights paged in, first graphs built): seconds."""
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        await chat_turn(client, WARM_UP, 4, False)
    return time.perf_counter() - t0


def run_one(name: str, model: Path, conv: dict, tok: Tokenizer, args: argparse.Namespace) -> dict:
    kind, parallel, unified = SERVERS[name]
    parallel = args.users_now if parallel == "U" else parallel
    cap = args.time_cap
    extra = tuple(args.ours_args.split()) if kind == "pyllama-ssm" else ()
    tuned = {} if name in AS_IS else {"n_batch": args.n_batch, "n_ubatch": args.n_ubatch,
                                      "flash_attn": None if kind == "example-server" else args.flash_attn}
    with Server(kind, model, n_ctx=args.n_ctx, parallel=parallel, threads=args.threads, kv_unified=unified,
                extra=extra, timeout=300, **tuned) as server:
        try:
            warm = asyncio.run(warm_up(server.url, args.request_timeout))
        except (httpx.HTTPError, BenchError, json.JSONDecodeError) as e:
            raise BenchError(f"{name}: the warm-up request failed: {type(e).__name__}: {e}\n"
                             f"{server.log()[-3000:]}") from None
        settings = server.settings()
        warm_log = len(server.log())  # llama_cpp.server's prompt evals are counted after the warm-up's
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
        logged = log_figures(kind, log[warm_log:] if kind == "llama-cpp-python" else log)
        command = server.cmd
    recs = out["records"]
    ok = [r for r in recs if "error" not in r]
    run = {"server": name, "kind": kind, "parallel": parallel, "kv_unified": unified if parallel else None,
           "extra_args": list(extra), "command": command, "settings": settings, "warmup_seconds": warm,
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
    if not ok and not (out["capped"] and any(r.get("cut") for r in recs)):  # a capped run's waits still count
        raise BenchError(f"{name} on {model.name}: no request completed; first error: "
                         f"{recs[0].get('error') if recs else 'none sent'}")
    return run


# -- summary ----------------------------------------------------------------------------------------

def waits(recs: list[dict], turns) -> list[tuple[float, bool]]:
    """The first-token waits of requests in `turns`, each (seconds, censored): the completed requests', those
    of requests the time cap cut mid-answer, and, censored, the time a request cut before its first token
    had waited (its wait is at least that).  Leaving the cut ones out would time only the survivors of a
    capped run, the requests a slow server served first."""
    out = [(r["ttft"], False) for r in recs if "error" not in r and r["turn"] in turns]
    out += [(r["first_token"], False) for r in recs if r.get("cut") and "first_token" in r and r["turn"] in turns]
    return out + [(r["ttft_atleast"], True) for r in recs if r.get("cut") and "ttft_atleast" in r
                  and r["turn"] in turns]


def wait_percentile(values: list[tuple[float, bool]], p: float) -> tuple[float | None, bool]:
    """(the p-th percentile, whether it is only a lower bound: it rests on a censored wait)."""
    if not values:
        return None, False
    value = percentile([v for v, _ in values], p)
    return value, percentile([math.inf if c else v for v, c in values], p) != value


def pooled(runs: list[dict], args: argparse.Namespace, system_tokens: int) -> dict:
    """One row per server for a model and U: every round's requests pooled."""
    recs = [r for run in runs for r in run["records"]]
    ok = [r for r in recs if "error" not in r]
    first, rest = waits(recs, {1}), waits(recs, range(2, args.turns + 1))
    # with what a capped run streamed for the requests it cut mid-answer (a chunk per token)
    tokens = sum(r["tokens"] for r in ok) + sum(r.get("streamed", 0) for r in recs if r.get("cut"))
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
           "ttft_by_turn_p50": [wait_percentile(waits(recs, {k}), 50)[0] for k in range(1, args.turns + 1)],
           "new_tokens": new, "new_tokens_rest": sum(r["new_tokens"] for r in ok if r["turn"] > 1),
           # the least a server can compute: every new token once, the shared system prompt once per run
           "ideal_tokens": new_sent - sum(max(sum(1 for r in run["records"] if r["turn"] == 1) - 1, 0)
                                          for run in runs) * system_tokens,
           "peak_rss": max(run["peak_rss"] for run in runs),
           "cache_bytes": max((run.get("cache_bytes") or 0) for run in runs)}
    # "_atleast": the figure is a lower bound (a capped run's requests still waiting count as what they waited)
    for key, values, p in (("ttft_turn1_p50", first, 50), ("ttft_turn1_p95", first, 95), ("ttft_rest_p50", rest, 50),
                           ("ttft_rest_p95", rest, 95)):
        row[key], row[f"{key}_atleast"] = wait_percentile(values, p)
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


# per-round values: the table gives their median and range
SPREAD = ("ttft_turn1_p50", "ttft_rest_p50", "tok_per_s", "computed_per_new_rest", "computed_per_parted_rest",
          "computed_per_new", "peak_rss")


def summarize(runs: list[dict], args: argparse.Namespace, system_tokens: int) -> dict:
    """pooled() over every round, with each SPREAD metric the median of the rounds' values and their range."""
    row = pooled(runs, args, system_tokens)
    per_round = [pooled([run], args, system_tokens) for run in runs]
    row["spread"] = {}
    for key in SPREAD:
        values = [r.get(key) for r in per_round]
        if values and all(v is not None for v in values):
            row["spread"][key] = spread(values)
            row[key] = row["spread"][key]["median"]
            if any(r.get(f"{key}_atleast") for r in per_round):
                row[f"{key}_atleast"] = row["spread"][key]["atleast"] = True
    return row


# metric, label, whether higher is better
METRICS = (("ttft_turn1_p50", "TTFT p50 turn 1", False),
           ("ttft_rest_p50", "TTFT p50 turns 2..K", False),
           ("tok_per_s", "tokens/s", True),
           ("computed_per_new_rest", "computed / new prompt tokens, turns 2..K", False),
           ("computed_per_parted_rest", "computed / tokens after the parting (token-exact), turns 2..K", False),
           ("peak_rss", "peak RSS", False))


def _ratio(ours: dict, other: dict, key: str) -> dict | None:
    """pyllama-ssm's value / the other's: of the medians, and per round (the rounds ran interleaved, so round
    i of one server ran beside round i of the other)."""
    if not other.get(key) or ours.get(key) is None:
        return None
    out = {"median": ours[key] / other[key]}
    # the other's figure a lower bound: the ratio is at most this (ours: at least)
    if other.get(f"{key}_atleast") and not ours.get(f"{key}_atleast"):
        out["bound"] = "at most"
    elif ours.get(f"{key}_atleast") and not other.get(f"{key}_atleast"):
        out["bound"] = "at least"
    elif ours.get(f"{key}_atleast"):
        out["bound"] = "unknown"
    a, b = ours["spread"].get(key), other["spread"].get(key)
    if a and b and len(a["rounds"]) == len(b["rounds"]) and all(b["rounds"]):
        per = [x / y for x, y in zip(a["rounds"], b["rounds"])]
        out |= {"min": min(per), "max": max(per), "rounds": per}
    return out


def compare(rows: list[dict]) -> list[dict]:
    """For each metric: pyllama-ssm against the better of the two same-U llama-server configurations (by
    the median), and its ratio to every other server."""
    by = {r["server"]: r for r in rows}
    ours, out = by.get("pyllama-ssm"), []
    if ours is None:
        return out
    for key, label, higher in METRICS:
        if ours.get(key) is None:
            continue
        same = [by[s] for s in SAME_U if s in by and by[s].get(key)]
        best = (max if higher else min)(same, key=lambda r: r[key]) if same else None
        entry = {"metric": key, "label": label, "higher_is_better": higher, "ours": ours["spread"].get(key),
                 "best_same_u": best and best["server"], "best": best and best["spread"].get(key),
                 "ratio": best and _ratio(ours, best, key),
                 "others": {r["server"]: _ratio(ours, r, key) for r in rows
                            if r["server"] != "pyllama-ssm" and r is not best and r.get(key)}}
        out.append(entry)
    return out


def checks(rows: list[dict], comparison: list[dict], paced: bool = False) -> list[dict]:
    """Issue #18's reuse targets, issue #28's against the better same-U llama-server for each metric, and
    issue #18's against the example server.  paced (--pace): the schedule sets how many tokens a second
    are asked for, so tokens/s is no verdict on the servers (a closed-loop run's is)."""
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
    # issue #28's targets, against llama-server configured for the same users
    bounds = {"ttft_rest_p50": (0.5, False), "tok_per_s": (1.5, True), "ttft_turn1_p50": (0.2, False),
              "peak_rss": (0.8, False)}
    for c in comparison:
        if c["metric"] in bounds and c["ratio"]:
            bound, at_least = bounds[c["metric"]]
            add(f"{c['label']} / the better same-U llama-server's ({c['best_same_u']})", c["ratio"]["median"],
                bound, at_least)
            if paced and c["metric"] == "tok_per_s":
                out[-1]["verdict"] = "no verdict (paced: the schedule sets the tokens asked for per second)"
            if (how := c["ratio"].get("bound")) is not None:  # a lower-is-better wait against a capped run
                meets = out[-1]["verdict"] == "met"
                out[-1]["verdict"] = ("met" if meets and how == "at most" else
                                      "missed" if not meets and how == "at least" else "unknown") + \
                    f" (the ratio is {how} this: a capped run's waits count the requests still waiting)"
    if (r := by.get("example-server")) is not None:
        if ours["ttft_rest_p50"] and r["ttft_rest_p50"]:
            add("TTFT p50 turns 2..K / example-server's", ours["ttft_rest_p50"] / r["ttft_rest_p50"], 1 / 3, False)
        add("tokens/s / example-server's", ours["tok_per_s"] / r["tok_per_s"], 2.0, True)
    return out


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _cell(r: dict, key: str, fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    """A row's metric as "median [min-max]" over rounds, or its pooled value (one round, or an old run);
    ">= " where it is a lower bound."""
    at_least = ">= " if r.get(f"{key}_atleast") else ""
    if s := r.get("spread", {}).get(key):
        return at_least + fmt_spread(s, fmt, scale)
    return "-" if r.get(key) is None else at_least + fmt.format(r[key] * scale)


def _spread_cell(s: dict, fmt: str, scale: float) -> str:
    return (">= " if s.get("atleast") else "") + fmt_spread(s, fmt, scale)


def _ratio_cell(ratio: dict | None) -> str:
    if not ratio:
        return "-"
    prefix = {"at most": "<= ", "at least": ">= ", "unknown": "? "}.get(ratio.get("bound"), "")
    return prefix + f"{ratio['median']:.2f}x" + (f" [{ratio['min']:.2f}-{ratio['max']:.2f}]"
                                                 if len(ratio.get("rounds", ())) > 1 else "")


def _as_run(run: dict) -> str:
    """How a server ran, from its first run's settings: slots and KV layout, batch sizes, flash attention."""
    st = run.get("settings") or {}
    slots = st.get("n_parallel") or run.get("parallel") or st.get("n_seq_max") or "default"
    parts = [f"{slots} slot" + ("" if slots == 1 else "s")]
    if "kv_unified" in st:
        parts.append("unified KV" if str(st["kv_unified"]).lower() in ("true", "1") else
                     f"split KV ({st.get('n_ctx_seq')} cells per slot)")
    if st.get("n_batch"):
        parts.append(f"n_batch {st['n_batch']}, n_ubatch {st.get('n_ubatch', '?')}")
    if st.get("flash_attn"):
        resolved = st.get("flash_attn_resolved")
        parts.append(f"flash attention {st['flash_attn']}" + (f" ({resolved})" if resolved and
                                                               st["flash_attn"] == "auto" else ""))
    return f"{run['server']}: " + ", ".join(parts)


def markdown(tables: list[dict], args: argparse.Namespace) -> str:
    prov = getattr(args, "provenance", None) or {}
    commit = (prov.get("commit") or "?")[:12] + (" (dirty tree)" if prov.get("dirty") else "") + \
        (f" (CHANGED during the run: {prov['changed_during_run']})" if prov.get("changed_during_run") else "")
    warmed = all(run.get("warmup_seconds") is not None for t in tables for runs in t["runs"].values() for run in runs)
    lines = [f"Multi-turn chats: {args.turns} turns per user, system prompt ~{args.system_tokens} tokens, user "
             f"messages 50-300 tokens, answers of up to {args.max_tokens} tokens (greedy), users {args.stagger:g} s "
             f"apart, " + (f"open loop: each user's turns due every {args.pace:g} s plus 0.2-1 s, TTFT counted "
                           f"from then (turns sent over {LATE:g} s late: {_late(tables)}); " if getattr(args, "pace", 0) else
                           "0.2-1 s think time; ") +
             f"{args.threads} threads, n_batch {getattr(args, 'n_batch', None) or '-'}, "
             f"n_ubatch {getattr(args, 'n_ubatch', None) or '-'}, flash attention "
             f"{getattr(args, 'flash_attn', None) or '-'} (all but llama-server-default); {args.rounds} round(s), "
             f"interleaved{', each server warmed up with one request' if warmed else ', no warm-up'}; "
             f"commit {commit}; {prov.get('cpu_model', '?')}. Figures are the median over rounds [min-max]; "
             f"TTFT in seconds. computed/new: prompt tokens the server computed / new prompt tokens "
             f"(a turn's prompt less the previous prompt and answer; turn 1: the whole prompt), from its own "
             f"counters (- where it reports none); exact: turns 2..K's computed prompt tokens / the tokens after "
             f"where each prompt parts from the previous turn's prompt and answer tokens (an answer counts as "
             f"reusable when its text tokenizes back into as many tokens as were generated); ideal: every new "
             f"token once, the system prompt once; prompt cache: host memory the server's prompt cache holds "
             f"beyond its context at the end (ours: recurrent snapshots; llama-server: --cache-ram and "
             f"checkpoints).", ""]
    for t in tables:
        lines += [f"### {t['model']}, U = {t['users']} (n_ctx {t['n_ctx']}, system prompt {t['system_tokens']} "
                  f"tokens, time cap {t.get('time_cap', args.time_cap):g} s)", "",
                  "| server | done / planned | failed | short | TTFT t1 p50 | TTFT t2..K p50 | t2..K p95 | tok/s "
                  "| computed/new t2..K | t2..K exact | computed/new all | computed/ideal | peak RSS MiB "
                  "| prompt cache MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in t["rows"]:
            done = f"{r['completed']} / {r['planned']}" + (" (capped)" if r["capped"] else "")
            lines.append(f"| {r['server']} | {done} | {r['failed']} | {r['short']} | {_cell(r, 'ttft_turn1_p50')} "
                         f"| {_cell(r, 'ttft_rest_p50')} | {_cell(r, 'ttft_rest_p95')} "
                         f"| {_cell(r, 'tok_per_s', '{:.1f}')} "
                         f"| {_cell(r, 'computed_per_new_rest')} | {_cell(r, 'computed_per_parted_rest')} "
                         f"| {_cell(r, 'computed_per_new')} | {_s(r.get('computed_per_ideal'))} "
                         f"| {_cell(r, 'peak_rss', '{:.0f}', 1 / MiB)} | {r['cache_bytes'] / MiB:.1f} |")
        lines += ["", "TTFT p50 by turn (s, every round pooled): " + "; ".join(
            f"{r['server']} " + " / ".join(_s(v) for v in r["ttft_by_turn_p50"]) for r in t["rows"])]
        as_run = [_as_run(runs[0]) for runs in t["runs"].values() if runs]
        if as_run:
            lines += ["", "As run: " + "; ".join(as_run) + "."]
        if t.get("comparison"):
            lines += ["", "| pyllama-ssm / | the better same-U llama-server | ratio [per round] | others |",
                      "|---|---|---:|---|"]
            for c in t["comparison"]:
                fmt, scale = {"peak_rss": ("{:.0f}", 1 / MiB), "tok_per_s": ("{:.1f}", 1.0)}.get(c["metric"],
                                                                                               ("{:.2f}", 1.0))
                best = f"{c['best_same_u']} {_spread_cell(c['best'], fmt, scale)}" if c["best_same_u"] else "-"
                others = "; ".join(f"{name} {_ratio_cell(v)}" for name, v in c["others"].items() if v)
                lines.append(f"| {c['label']}: {_spread_cell(c['ours'], fmt, scale)} | {best} "
                             f"| {_ratio_cell(c['ratio'])} | {others} |")
        if t["checks"]:
            lines += ["", "| target (issues #18, #28) | value | target | |", "|---|---:|---|---|"]
            lines += [f"| {c['target']} | {c['value']:.2f} | {c['bound']} | {c['verdict']} |" for c in t["checks"]]
        lines.append("")
    return "\n".join(lines)


# settings a table's figures depend on: tables merged into one file must share them
WORKLOAD = ("turns", "system_tokens", "max_tokens", "stagger", "seed", "rounds", "time_cap", "n_batch", "n_ubatch",
            "flash_attn", "ours_args", "pace")


LATE = 0.25  # seconds


def _late(tables: list[dict]) -> str:
    """--pace: per server, how many turns were sent more than LATE s after they were due (the previous answer came
    late; less is the driver's own event loop on these shared cores)."""
    late: dict[str, list[int]] = {}
    for t in tables:
        for name, runs in t["runs"].items():
            recs = [r for run in runs for r in run["records"] if "late" in r]
            late.setdefault(name, [0, 0])
            late[name][0] += sum(r["late"] > LATE for r in recs)
            late[name][1] += len(recs)
    return ", ".join(f"{name} {n} of {total}" for name, (n, total) in late.items())


def merge(old: dict, new: list[dict], args: argparse.Namespace, path: Path) -> list[dict]:
    """--merge: the earlier tables, with this invocation's servers' runs in place of theirs (same model and U);
    refused unless both ran the same code (commit, tree digest, builds) on the same CPU with the same threads
    and workload."""
    why = same_code(old.get("provenance"), args.provenance)
    if why is None and (changed := old["provenance"].get("changed_during_run")
                        or args.provenance.get("changed_during_run")):
        why = f"the tree changed during a run: {changed}"
    if why is None and (diff := [k for k in WORKLOAD if old.get(k) != getattr(args, k)]):
        why = "settings differ: " + ", ".join(f"{k} {old.get(k)!r} vs {getattr(args, k)!r}" for k in diff)
    if why:
        raise BenchError(f"--merge: {path} holds runs unlike this one ({why}); refusing to put them in one "
                         f"table: run them again together, or write to another --out")
    fresh = {(t["model"], t["users"]): t for t in new}
    out = []
    for t in old["tables"]:
        if (n := fresh.pop((t["model"], t["users"]), None)) is None:
            out.append(t)
            continue
        runs = {**t["runs"], **n["runs"]}
        args.users_now = n["users"]
        rows = [summarize(runs[s], args, n["system_tokens"]) for s in SERVERS if s in runs]
        comparison = compare(rows)
        out.append({**n, "rows": rows, "comparison": comparison, "checks": checks(rows, comparison, bool(args.pace)),
                    "runs": runs})
    return out + list(fresh.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen35-small",
                    help="bench model names: zoo (qwen35-small), grafts with or without a format (falcon-h1-graft, "
                         "granitehybrid-graft-q4_k_m), smollm2 (the real SmolLM2-135M-Instruct)")
    ap.add_argument("--users", default="8,32", help="comma-separated user counts U")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--servers", default=",".join(DEFAULT_SERVERS), help=f"some of {','.join(SERVERS)}")
    ap.add_argument("--rounds", type=int, default=3, help="each round runs every server once, the order rotated")
    ap.add_argument("--system-tokens", type=int, default=1500)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--stagger", type=float, default=0.3, help="seconds between two users' first turns")
    ap.add_argument("--pace", type=float, default=0.0,
                    help="open loop: seconds between a user's turns, TTFT counted from when each is due (0: "
                         "closed loop, each turn sent its think time after the previous answer)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--n-batch", type=int, default=512,
                    help="every server's logical batch (not llama-server-default's)")
    ap.add_argument("--n-ubatch", type=int, default=512,
                    help="every server's physical batch (not llama-server-default's)")
    ap.add_argument("--flash-attn", choices=FLASH_ATTN, default="auto",
                    help="every server's flash attention (not llama-server-default's, nor the example server's)")
    ap.add_argument("--time-cap", type=float, default=300, help="seconds one run may take; then it stops")
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--ours-args", default="", help="more pyllama-ssm server flags, e.g. \"--batch_invariant true\"")
    ap.add_argument("--out", default="chat_sessions", help="results stem in --results-dir")
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="where the results go (default bench/results)")
    ap.add_argument("--merge", action="store_true",
                    help="keep <results-dir>/<out>.json's runs of the models, U and servers not run now (refused "
                         "unless they ran the same code, CPU, threads and settings)")
    ap.add_argument("--render", action="store_true",
                    help="run nothing: rebuild <results-dir>/<out>.{md,png} and its rows from the runs in <out>.json")
    args = ap.parse_args()
    if args.render:
        return render(args)
    servers = args.servers.split(",")
    if unknown := [s for s in servers if s not in SERVERS]:
        raise BenchError(f"--servers: unknown {unknown}; expected some of {list(SERVERS)}")
    users = [int(u) for u in args.users.split(",")]
    if args.turns < 1 or min(users) < 1 or args.rounds < 1:
        raise BenchError("--turns, --users and --rounds must be at least 1")
    models = {name: zoo_model(name) for name in args.models.split(",")}
    args.provenance = provenance(args.threads)
    args.model_files = {name: path.name for name, path in models.items()}
    stem_json = args.results_dir / f"{args.out}.json"
    old = json.loads(stem_json.read_text()) if args.merge and stem_json.exists() else None
    if old is not None:  # refuse before hours of runs, not after
        merge(old, [], args, stem_json)
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
            comparison = compare(rows)
            tables.append({"model": name, "model_file": path.name, "users": u, "n_ctx": args.n_ctx,
                           "system_tokens": conv["system_tokens"], "time_cap": args.time_cap, "rows": rows,
                           "comparison": comparison, "checks": checks(rows, comparison, bool(args.pace)),
                           "runs": runs})
        tok.close()
    progress.close()
    args.provenance = check_unchanged(args.provenance)
    if old is not None:
        try:
            tables = merge(old, tables, args, stem_json)
            args.model_files = {**old.get("model_files", {}), **args.model_files}
        except BenchError as e:  # keep what ran, beside the file it may not join
            print(f"\n{e}\nwriting this run alone as {args.out}.unmerged", file=sys.stderr)
            args.out += ".unmerged"
            write(tables, args)
            return 1
    write(tables, args)
    return 0


def render(args: argparse.Namespace) -> int:
    """--render: every table's rows and checks again from its stored runs, with the settings they ran with."""
    path = args.results_dir / f"{args.out}.json"
    if not path.exists():
        raise BenchError(f"--render: {path} is missing")
    data = json.loads(path.read_text())
    for key in ("turns", "system_tokens", "max_tokens", "stagger", "threads", "rounds", "time_cap"):
        setattr(args, key, data[key])
    args.pace = data.get("pace", 0.0)
    for key in ("n_batch", "n_ubatch", "flash_attn", "provenance", "model_files", "machine"):
        setattr(args, key, data.get(key))
    for t in data["tables"]:
        args.users_now = t["users"]
        renamed(t["runs"])
        t["runs"] = {s: t["runs"][s] for s in SERVERS if s in t["runs"]}
        t["rows"] = [summarize(runs, args, t["system_tokens"]) for runs in t["runs"].values()]
        t["comparison"] = compare(t["rows"])
        t["checks"] = checks(t["rows"], t["comparison"], bool(args.pace))
    write(data["tables"], args)
    return 0


def renamed(runs: dict[str, list[dict]]) -> None:
    """Runs stored before llama-server meant --parallel U: "llama-server" at its defaults (parallel 0) is
    llama-server-default now."""
    old = runs.get("llama-server")
    if old and all(run.get("parallel") == 0 for run in old) and "llama-server-default" not in runs:
        runs["llama-server-default"] = [run | {"server": "llama-server-default"} for run in runs.pop("llama-server")]


def write(tables: list[dict], args: argparse.Namespace) -> None:
    args_out = {k: v for k, v in vars(args).items()
                if k not in ("users_now", "n_ctx", "render", "merge", "results_dir", "provenance")}
    write_results(args.out, {"provenance": args.provenance, "machine": (args.provenance or {}).get("machine"),
                             "cpus": os.cpu_count(), **args_out, "tables": tables},
                  markdown(tables, args), args.results_dir)
    from bench.plot import lines
    plot_rows = [{"model": f"{t['model']} U={t['users']}", "server": r["server"], "turn": k + 1, "ttft": v}
                 for t in tables for r in t["rows"] for k, v in enumerate(r["ttft_by_turn_p50"]) if v is not None]
    lines(args.out, plot_rows, series="server", x="turn", y=lambda r: r["ttft"], title="TTFT p50 by turn",
          xlabel="turn", ylabel="time to first token, s", log2_x=False, results_dir=args.results_dir)


if __name__ == "__main__":
    run_main(main)
