"""Soak the OpenAI-compatible server: many concurrent clients, mixed requests, nothing lost or leaked.

    python bench/soak.py --model build/models/qwen35-small.gguf            # starts its own server
    python bench/soak.py --url http://127.0.0.1:8000 --api-key KEY          # or drives a running one

Clients send greedy requests drawn from a fixed set of variants: short
prompts, long prompts, prompts sharing a long prefix, chat conversations;
streamed or not; some clients hang up mid-stream, some give up on a
non-streaming request after a short wait (abandoned), and some send a fuzzed
body (a variant with one field broken: out-of-range numbers, wrong types,
empty prompts, unknown fields, invalid JSON).  Pass criteria:
- no 5xx answer (429 is allowed: the client waits Retry-After and tries again);
- a fuzzed body gets 200 or a 4xx naming a field, never a hang;
- every completed answer equals what the same variant gives alone, asked after the load,
  or parts from it only where the lone run's two best tokens are within TIE_NATS
  (a near-tie: a batch of other sequences changes the kernels' rounding, ~1e-3 on
  logits, and may flip it; such answers are counted, not failed);
- at the end nothing is in flight, queued, running or preempted, no recurrent
  cell is live and the attention cells in use are at most the prefix cache's;
- RSS after the load is within --rss-slack of RSS after the warm-up.
Exit code 0 when all hold; the report is printed (and written with --json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.load import sse_lines  # noqa: E402

MiB = 1 << 20
TIE_NATS = 0.02  # log-probability gap under which rounding may decide between two tokens
WORDS = ("state space model recurrent memory attention token sequence batch cache prefix shared pool "
         "server client stream request answer context layer weight vector matrix kernel").split()


@dataclass(frozen=True)
class Variant:
    name: str
    route: str                # /v1/completions or /v1/chat/completions
    body: dict                # greedy, without "stream"


@dataclass
class Report:
    requests: int = 0
    completed: int = 0
    disconnected: int = 0
    abandoned: int = 0        # non-streaming requests whose client gave up before the answer
    fuzzed: int = 0           # fuzzed bodies sent (refused with 4xx or, when still valid, answered)
    retried_429: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    near_ties: int = 0        # answers that part from the lone run at a near-tie (not failures)
    server_errors: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    seconds: float = 0.0
    rss_warm_bytes: int | None = None
    rss_end_bytes: int | None = None
    rss_ok: bool = True

    @property
    def passed(self) -> bool:
        return not (self.mismatches or self.server_errors or self.leaks) and self.rss_ok and self.completed > 0

    def summary(self) -> str:
        rss = (f"RSS {self.rss_warm_bytes / MiB:.1f} -> {self.rss_end_bytes / MiB:.1f} MiB"
               if self.rss_warm_bytes and self.rss_end_bytes else "RSS n/a")
        return (f"{'PASS' if self.passed else 'FAIL'}: {self.requests} requests in {self.seconds:.1f}s "
                f"({self.requests / max(self.seconds, 1e-9):.1f} req/s, "
                f"{self.completion_tokens / max(self.seconds, 1e-9):.0f} generated tok/s), "
                f"{self.completed} completed, {self.disconnected} disconnected on purpose, "
                f"{self.abandoned} abandoned, {self.fuzzed} fuzzed, "
                f"{self.retried_429} retries after 429, statuses {self.statuses}, {rss}, "
                f"{len(self.mismatches)} mismatches ({self.near_ties} near-tie partings), "
                f"{len(self.server_errors)} server errors, {len(self.leaks)} leaks")


def variants(rng: random.Random, n: int, long_words: int) -> list[Variant]:
    """n greedy request variants: short, long, shared-prefix and chat, each small in max_tokens."""
    shared = " ".join(rng.choice(WORDS) for _ in range(long_words // 2))
    out = []
    for i in range(n):
        kind = ("short", "long", "shared", "chat")[i % 4]
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        max_tokens = rng.randint(4, 24)
        common = {"temperature": 0, "max_tokens": max_tokens, "seed": 1}
        if kind == "chat":
            body = {"messages": [{"role": "system", "content": shared},
                                 {"role": "user", "content": f"Question {i}: {words}?"}], **common}
            out.append(Variant(f"{kind}-{i}", "/v1/chat/completions", body))
            continue
        prompt = {"short": f"{i}: {words}",
                  "long": " ".join(rng.choice(WORDS) for _ in range(long_words)) + f" {i}",
                  "shared": f"{shared}\nQuestion {i}: {words}?"}[kind]
        out.append(Variant(f"{kind}-{i}", "/v1/completions", {"prompt": prompt, **common}))
    return out


# values past what llama.cpp accepts, of the wrong type, or empty (a fuzzed body breaks one field)
_BROKEN = [2**31, 2**63, -2**40, 1e39, -1e39, 4.2e190, -1, 0, "", "x", None, [], {}, True, [[]]]
_FIELDS = ["top_k", "temperature", "top_p", "min_p", "max_tokens", "seed", "repeat_penalty", "presence_penalty",
           "frequency_penalty", "mirostat_mode", "mirostat_tau", "mirostat_eta", "logprobs", "top_logprobs",
           "logit_bias", "stop", "n", "prompt", "messages", "grammar", "no_such_field"]


def fuzzed(rng: random.Random, v: Variant) -> tuple[str, bytes]:
    """The variant's body with one field broken, as raw bytes (sometimes not even JSON)."""
    body = dict(v.body)
    if rng.random() < 0.1:
        return v.route, json.dumps(body).encode()[:rng.randint(0, 40)]  # cut short: invalid JSON
    field, value = rng.choice(_FIELDS), rng.choice(_BROKEN)
    if field == "max_tokens" and value in (0, None):  # valid, and up to the whole context: not a fuzz case
        value = -1
    body[field] = value
    return v.route, json.dumps(body, allow_nan=True).encode()


_LOGPROBS = {"/v1/completions": {"logprobs": 2},
             "/v1/chat/completions": {"logprobs": True, "top_logprobs": 2}}


def token_gaps(route: str, data: dict) -> list[tuple[int, float]]:
    """(offset in the answer text, gap between the two most likely tokens) for each generated token."""
    choice = data["choices"][0]
    if route.endswith("chat/completions"):
        out, offset = [], 0
        for tok in choice["logprobs"]["content"]:
            out.append((offset, _top2_gap(t["logprob"] for t in tok["top_logprobs"])))
            offset += len(tok["token"])
        return out
    lp = choice["logprobs"]  # completions: offsets count from the answer's first token (no echo)
    base = lp["text_offset"][0] if lp["text_offset"] else 0
    return [(off - base, _top2_gap(top.values())) for off, top in zip(lp["text_offset"], lp["top_logprobs"])]


def _top2_gap(logprobs) -> float:
    best = sorted(logprobs, reverse=True) + [float("-inf")]
    return best[0] - best[1]


def parts_at_near_tie(text: str, alone: str, gaps: list[tuple[int, float]]) -> bool:
    """True when text leaves alone at a token whose two best candidates were within TIE_NATS."""
    at = next((i for i, (a, b) in enumerate(zip(text, alone)) if a != b), min(len(text), len(alone)))
    token = [gap for offset, gap in gaps if offset <= at]
    return bool(token) and token[-1] <= TIE_NATS


def answer_of(route: str, data: dict) -> tuple[str, str]:
    choice = data["choices"][0]
    text = choice["message"]["content"] if route.endswith("chat/completions") else choice["text"]
    return text or "", choice["finish_reason"]


async def one_request(client: httpx.AsyncClient, v: Variant, mode: str,
                      rng: random.Random) -> tuple[int, tuple[str, str] | None, int]:
    """(status, (text, finish_reason) or None when disconnected on purpose, completion tokens)."""
    if mode == "fuzz":
        route, content = fuzzed(rng, v)
        r = await client.post(route, content=content, headers={"Content-Type": "application/json"})
        if r.status_code == 200:
            return 200, None, 0
        return r.status_code, (r.text, content.decode(errors="replace")), 0
    if mode == "abandon":  # give up after a short wait: leaving closes the connection
        try:
            # gone before any answer can come: within 2-20 ms (a prefix-cache hit on a tiny model answers in
            # tens of ms)
            r = await client.post(v.route, json=v.body, timeout=httpx.Timeout(120, read=rng.uniform(0.002, 0.02)))
        except httpx.ReadTimeout:
            return 200, None, 0
        if r.status_code != 200:
            return r.status_code, (r.text, ""), 0
        data = r.json()
        return 200, answer_of(v.route, data), data["usage"]["completion_tokens"]
    if mode == "plain":
        r = await client.post(v.route, json=v.body)
        if r.status_code != 200:
            return r.status_code, (r.text, ""), 0
        data = r.json()
        return 200, answer_of(v.route, data), data["usage"]["completion_tokens"]
    async with client.stream("POST", v.route, json={**v.body, "stream": True}) as r:
        if r.status_code != 200:
            return r.status_code, ((await r.aread()).decode(), ""), 0
        text, finish, n = [], "", 0
        async for line in sse_lines(r):
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                return 200, ("".join(text), finish), n
            data = json.loads(payload)
            if "error" in data:
                return 599, (payload, ""), n  # an error after the 200: counted as a server error
            choice = data["choices"][0]
            piece = choice["delta"].get("content") if "delta" in choice else choice["text"]
            text.append(piece or "")
            n += 1
            finish = choice.get("finish_reason") or finish
            if mode == "disconnect" and n >= 2:
                return 200, None, n  # leaving the block closes the connection mid-stream
        return 599, ("stream ended without [DONE]", ""), n


async def load(url: str, headers: dict, plan: list[tuple[Variant, str]], clients: int, report: Report,
               results: list[tuple[Variant, tuple[str, str]]], on_warm, seed: int = 0) -> None:
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    warm_at = len(plan) // 4
    done = 0

    async def client_loop(k: int) -> None:
        nonlocal done
        rng = random.Random(seed * 1000 + k)
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
            while not queue.empty():
                v, mode = queue.get_nowait()
                while True:
                    status, answer, n = await one_request(client, v, mode, rng)
                    if status != 429:
                        break
                    report.retried_429 += 1
                    await asyncio.sleep(1)
                report.requests += 1
                report.statuses[str(status)] = report.statuses.get(str(status), 0) + 1
                report.completion_tokens += n
                report.fuzzed += mode == "fuzz"
                if status >= 500:
                    report.server_errors.append(f"{v.name} ({mode}): {status} {answer[0][:300]}")
                elif mode == "fuzz":
                    if status != 200 and not _names_a_field(answer[0]):
                        report.mismatches.append(f"{v.name} (fuzz {answer[1][:200]}): {status} names no field: "
                                                 f"{answer[0][:300]}")
                elif status != 200:
                    report.mismatches.append(f"{v.name} ({mode}): unexpected {status} {answer[0][:300]}")
                elif answer is None:
                    report.abandoned += mode == "abandon"
                    report.disconnected += mode == "disconnect"
                else:
                    report.completed += 1
                    results.append((v, answer))
                done += 1
                if done == warm_at:
                    await on_warm()

    await asyncio.gather(*(client_loop(k) for k in range(clients)))


def _names_a_field(text: str) -> bool:
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return bool(error.get("param"))


async def stats(client: httpx.AsyncClient) -> dict:
    r = await client.get("/extras/stats")
    r.raise_for_status()
    return r.json()


def leaks(snapshot: dict) -> list[str]:
    out = []
    for alias, m in snapshot["models"].items():
        if m["in_flight"]:
            out.append(f"{alias}: {m['in_flight']} requests still in flight")
        for key in ("queued", "running", "preempted"):
            if m["engine"] and m["engine"][key]:
                out.append(f"{alias}: {m['engine'][key]} sequences still {key}")
        mem = m["memory"]
        if mem and mem["rs_cells_live"]:
            out.append(f"{alias}: {mem['rs_cells_live']} recurrent cells still live")
        if mem and mem["kv_cells_used"] > mem["kv_cells_cached_max"]:
            out.append(f"{alias}: {mem['kv_cells_used']} attention cells used, the prefix cache holds at most "
                       f"{mem['kv_cells_cached_max']}")
    return out


async def soak(url: str, *, api_key: str | None = None, clients: int = 64, requests: int = 400,
               n_variants: int = 32, long_words: int = 300, disconnect_share: float = 0.15,
               abandon_share: float = 0.1, fuzz_share: float = 0.1, seed: int = 0,
               rss_slack_bytes: int = 64 * MiB, time_limit_s: float = 1800, exact: bool = False) -> Report:
    rng = random.Random(seed)
    vs = variants(rng, n_variants, long_words)
    answered = (1 - disconnect_share - abandon_share - fuzz_share) / 2
    modes = rng.choices(["plain", "stream", "disconnect", "abandon", "fuzz"],
                        weights=[answered, answered, disconnect_share, abandon_share, fuzz_share], k=requests)
    plan = [(rng.choice(vs), mode) for mode in modes]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    report = Report()
    results: list[tuple[Variant, tuple[str, str]]] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as admin:
        async def on_warm() -> None:
            report.rss_warm_bytes = (await stats(admin))["rss_bytes"]

        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(load(url, headers, plan, clients, report, results, on_warm, seed), time_limit_s)
        except asyncio.TimeoutError:  # a stuck server must not hang the soak: report what it holds
            report.seconds = time.perf_counter() - t0
            report.server_errors.append(f"the load did not finish within {time_limit_s:.0f}s "
                                        f"({report.requests}/{len(plan)} requests done); the server holds: "
                                        f"{json.dumps((await stats(admin))['models'])}")
            return report
        report.seconds = time.perf_counter() - t0
        # the streams cut on purpose are freed at the Engine's next step: give it a moment
        for _ in range(50):
            snapshot = await stats(admin)
            if not leaks(snapshot):
                break
            await asyncio.sleep(0.1)
        report.leaks = leaks(snapshot)
        report.rss_end_bytes = snapshot["rss_bytes"]
        if report.rss_warm_bytes and report.rss_end_bytes:
            report.rss_ok = report.rss_end_bytes - report.rss_warm_bytes <= rss_slack_bytes
        # each variant alone, one at a time: what every answer under load must equal
        alone: dict[str, tuple[str, str]] = {}
        ties: dict[str, list[tuple[int, float]]] = {}  # per variant: (text offset, top-2 gap) per token
        for v in {v.name: v for v, _ in results}.values():
            r = await admin.post(v.route, json={**v.body, **_LOGPROBS[v.route]})
            if r.status_code != 200:
                report.server_errors.append(f"{v.name} alone: {r.status_code} {r.text[:300]}")
                continue
            alone[v.name] = answer_of(v.route, r.json())
            ties[v.name] = token_gaps(v.route, r.json())
        for v, answer in results:
            if v.name not in alone or answer == alone[v.name]:
                continue
            if parts_at_near_tie(answer[0], alone[v.name][0], ties[v.name]):
                report.near_ties += 1
                if exact:
                    report.mismatches.append(f"{v.name} (near-tie): under load {answer!r}, alone {alone[v.name]!r}")
            else:
                report.mismatches.append(f"{v.name}: under load {answer!r}, alone {alone[v.name]!r}")
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server")
    where.add_argument("--model", help="start a server on this GGUF file")
    p.add_argument("--api-key")
    p.add_argument("--n-parallel", type=int, default=8)
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--variants", type=int, default=32)
    p.add_argument("--long-words", type=int, default=300, help="words in a long prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--disconnect-share", type=float, default=0.15, help="streams cut after two chunks")
    p.add_argument("--abandon-share", type=float, default=0.1, help="non-streaming requests given up on")
    p.add_argument("--fuzz-share", type=float, default=0.1, help="requests with one field broken")
    p.add_argument("--rss-slack-mib", type=int, default=64)
    p.add_argument("--time-limit", type=float, default=1800, help="seconds the load may take before it fails")
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--server-args", default="", help="more flags for the server it starts, e.g. "
                   "'--batch_invariant true --flash_attn true' (then run with --exact)")
    p.add_argument("--exact", action="store_true", help="a near-tie parting is a mismatch too (for "
                   "batch-invariant kernels, where load must not change an answer at all)")
    args = p.parse_args()

    def run(url: str) -> Report:
        return asyncio.run(soak(url, api_key=args.api_key, clients=args.clients, requests=args.requests,
                                n_variants=args.variants, long_words=args.long_words, seed=args.seed,
                                disconnect_share=args.disconnect_share, abandon_share=args.abandon_share,
                                fuzz_share=args.fuzz_share,
                                rss_slack_bytes=args.rss_slack_mib * MiB, time_limit_s=args.time_limit,
                                exact=args.exact))

    if args.url:
        report = run(args.url)
    else:
        from pyllama_ssm.server.process import ServerProcess

        flags = ["--model", args.model, "--n_ctx", str(args.n_ctx), "--n_parallel", str(args.n_parallel),
                 "--max_queued_requests", str(args.clients)]
        flags += args.server_args.split()
        with ServerProcess(*flags, *(["--api_key", args.api_key] if args.api_key else [])) as server:
            report = run(server.url)
    print(report.summary())
    for line in (report.server_errors + report.mismatches + report.leaks)[:20]:
        print("  ", line)
    if args.json:
        Path(args.json).write_text(json.dumps({**asdict(report), "passed": report.passed}, indent=1))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
