"""The load driver every server benchmark shares: start a server, stream completions from N clients, measure.

    python bench/load.py --url http://127.0.0.1:8000 --clients 8 --requests 2 --max-tokens 32

Each client is an asyncio task with its own HTTP connection (httpx) that sends
its requests one after another to /v1/completions, streamed, greedy; a request
records its time to first token (first streamed chunk), its duration and its
completion tokens.  The same driver loads all three servers the benchmarks
compare (`Server` starts any of them on 127.0.0.1):

  pyllama-ssm       python -m pyllama_ssm.server --n_parallel N
  llama-cpp-python  python -m llama_cpp.server (stock 0.3.36, pyllama_ssm/_stock, over build/upstream/lib)
  llama-server      build/upstream/bin/llama-server --parallel N (upstream, from the pin; N = 0: its defaults)
  example-server    llama-cpp-python 0.3.36's batched example server (examples/server/server.py of the
                    pinned sdist, extracted into build/stock/examples/server, over build/upstream/lib)

Also here, for the benchmarks: the memory of a process (/proc), the
buffer sizes llama.cpp logs when it allocates them, a progress bar on stderr,
and the writer of bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# imported for its effect: os.environ gets pyllama-ssm's OpenMP wait (bindings.OPENMP_DEFAULTS)
# unless the caller chose one, and every child inherits it
import pyllama_ssm.bindings  # noqa: E402, F401 - after the path, for a fresh checkout

ZOO = ROOT / "build" / "models"
RESULTS = ROOT / "bench" / "results"
STOCK = ROOT / "pyllama_ssm" / "_stock"  # tools/stock.py: stock's llama_cpp package inside
UPSTREAM = ROOT / "build" / "upstream"
EXAMPLE_SERVER = ROOT / "build" / "stock" / "examples" / "server" / "server.py"  # tools/stock.py examples/server
MiB = 1 << 20
PROMPT = "Benchmark client {client}, request {request}: describe the weather in a city you like, in detail."


class BenchError(RuntimeError):
    """A server that did not come up, or a measurement that is missing: the benchmark stops."""


# -- processes ----------------------------------------------------------------------------------

def child_env(kind: str) -> dict[str, str]:
    """The environment of a child: pyllama-ssm or stock llama-cpp-python on the Python path.

    Every child's OpenMP workers wait as pyllama-ssm's do (the import above set os.environ; a short
    spin, then sleep: pyllama_ssm/bindings.py says why), stock llama-cpp-python and llama-server
    included, so that the libraries compare alike."""
    env = dict(os.environ)
    if kind == "llama-server":
        return env
    path = [str(ROOT)]
    if kind in ("llama-cpp-python", "example-server"):
        for args, there in (((), STOCK / "llama_cpp"), (("examples/server",), EXAMPLE_SERVER.parent)):
            if not there.exists():
                proc = subprocess.run([sys.executable, str(ROOT / "tools" / "stock.py"), *args],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    raise BenchError(f"stock llama-cpp-python's {there.name} could not be extracted:\n"
                                     f"{proc.stderr[-2000:]}")
        if not (UPSTREAM / "lib" / "libllama.so").exists():
            raise BenchError(f"stock llama-cpp-python needs {UPSTREAM}/lib/libllama.so: run `make build`")
        path.insert(0, str(STOCK))
        env["LLAMA_CPP_LIB_PATH"] = env["MTMD_CPP_LIB"] = str(UPSTREAM / "lib")  # the example server loads mtmd too
    env["PYTHONPATH"] = os.pathsep.join(path + [env.get("PYTHONPATH", "")])
    return env


def run_child(kind: str, code: str, *args: str, timeout: float = 900) -> tuple[dict, str]:
    """Run `python -c code args` under pyllama-ssm or stock llama-cpp-python; (the JSON object on its
    last stdout line, its stderr).  A failed child is a BenchError with the tail of its stderr."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=child_env(kind), timeout=timeout, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise BenchError(f"{kind} child {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1]), proc.stderr


def proc_memory(pid: int | str = "self") -> dict[str, int]:
    """Peak RSS (VmHWM), RSS and PSS of a process, in bytes, from /proc.

    RSS counts a page once per mapping: N models loaded from one file in one process count the
    mmapped weights N times, though the page cache holds them once.  PSS divides each page among
    its mappings, so it counts them once (given a file no other process maps)."""
    fields = {}
    for name in ("status", "smaps_rollup"):
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "Pss"):
                    fields[key] = int(rest.split()[0]) * 1024
    return {"peak_rss": fields["VmHWM"], "rss": fields["VmRSS"], "pss": fields["Pss"]}


def tree_rss(pid: int) -> int:
    """RSS in bytes of a process and all its descendants now (0 for one that is gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total


_BUFFER = re.compile(r"\b(model|KV|RS|compute|output) buffer size =\s*([0-9.]+) MiB")
_BUFFER_KIND = {"model": "weights", "KV": "kv", "RS": "rs", "compute": "compute", "output": "output"}


def logged_buffers(log: str, loads: int) -> dict[str, int]:
    """Bytes per kind (weights, kv, rs, compute, output, total) from the buffer sizes llama.cpp logs as it
    allocates them, summed over `loads` model loads; a log with fewer loads, or no compute buffer, is a
    BenchError (a missing line must not read as zero bytes)."""
    sums = dict.fromkeys(_BUFFER_KIND.values(), 0.0)
    for line in log.splitlines():
        if m := _BUFFER.search(line):
            sums[_BUFFER_KIND[m.group(1)]] += float(m.group(2))
    weights = sum(1 for line in log.splitlines() if "model buffer size" in line and " 0.00 MiB" not in line)
    if weights < loads or not sums["compute"]:
        raise BenchError(f"expected the buffer sizes of {loads} model load(s) in the log, found {weights} "
                         f"(is the log level high enough?):\n{log[-2000:]}")
    out = {k: int(v * MiB) for k, v in sums.items()}
    out["total"] = sum(out.values())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def example_server_config(model: Path, n_ctx: int, parallel: int, threads: int, port: int) -> Path:
    """The example server's JSON config for a local model (its README's format), written beside it.
    n_seq_max 2 x parallel: each prompt checkpoint it keeps takes a sequence id of its own."""
    config = {"server": {"host": "127.0.0.1", "port": port},
              "model": {"alias": model.stem, "path": str(model), "n_ctx": n_ctx, "n_seq_max": 2 * max(parallel, 1),
                        "n_batch": 512, "n_ubatch": 512, "threads": threads, "threads_batch": threads,
                        "kv_unified": True}}
    path = EXAMPLE_SERVER.parent / f"bench-{port}.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def server_command(kind: str, model: Path, n_ctx: int, parallel: int, threads: int, port: int,
                   kv_unified: bool = False, extra: tuple[str, ...] = ()) -> list[str]:
    """The command line of one server: the same model, context, threads and port for all
    (llama-server with parallel 0: its own defaults for slots and KV layout); `extra`: more
    pyllama-ssm options (--batch_invariant true, ...)."""
    if kind == "pyllama-ssm":
        return [sys.executable, "-m", "pyllama_ssm.server", "--model", str(model), "--n_ctx", str(n_ctx),
                "--n_parallel", str(parallel), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                "--host", "127.0.0.1", "--port", str(port), *extra]
    if extra:
        raise ValueError(f"extra options are for pyllama-ssm, not {kind}")
    if kind == "llama-cpp-python":
        # one request at a time whatever the clients (no parallel flag); by default a new request ends the
        # stream in progress, which no one serving several clients wants: they queue instead
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_ctx", str(n_ctx),
                "--n_threads", str(threads), "--n_threads_batch", str(threads), "--interrupt_requests", "false",
                "--host", "127.0.0.1", "--port", str(port)]
    if kind == "llama-server":  # -lv 4: the buffer sizes are logged
        binary = UPSTREAM / "bin" / "llama-server"
        if not binary.exists():
            raise BenchError(f"{binary} is missing: run `make build`")
        cmd = [str(binary), "-m", str(model), "-c", str(n_ctx), "-t", str(threads),
               "-tb", str(threads), "--host", "127.0.0.1", "--port", str(port), "-lv", "4"]
        if parallel:
            cmd += ["--parallel", str(parallel), "--kv-unified" if kv_unified else "--no-kv-unified"]
        return cmd
    if kind == "example-server":
        return [sys.executable, str(EXAMPLE_SERVER), "-C", str(example_server_config(model, n_ctx, parallel,
                                                                                     threads, port))]
    raise ValueError(f"server kind {kind!r}: expected pyllama-ssm, llama-cpp-python, llama-server or example-server")


class Server:
    """One server process on a free loopback port, ready when /v1/models answers; stop() on exit."""

    def __init__(self, kind: str, model: Path, *, n_ctx: int, parallel: int, threads: int,
                 kv_unified: bool = False, extra: tuple[str, ...] = (), timeout: float = 180):
        self.kind = kind
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = child_env(kind)  # first: it extracts the stock code a command may need
        cmd = server_command(kind, model, n_ctx, parallel, threads, port, kv_unified, extra)
        self._log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"{kind} exited with code {self.proc.returncode} before serving:\n"
                                 f"{' '.join(cmd)}\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"{kind} did not serve {self.url}/v1/models within {timeout}s:\n"
                                 f"{' '.join(cmd)}\n{self.log()[-3000:]}")
            time.sleep(0.25)

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read()

    def memory(self) -> dict[str, int]:
        return proc_memory(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.close()


# -- load -------------------------------------------------------------------------------------------

@dataclass
class Sample:
    ttft: float        # seconds from sending the request to its first streamed token
    seconds: float     # the whole request
    tokens: int        # completion tokens
    finish_reason: str


@dataclass
class LoadResult:
    clients: int
    requests: int
    tokens: int
    seconds: float
    tok_per_s: float
    ttft_p50: float
    ttft_p95: float
    samples: list[Sample]


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def stream_events(client: httpx.AsyncClient, path: str, body: dict) -> AsyncIterator[dict]:
    """POST body to path, streamed: each server-sent event's JSON object until [DONE]; an HTTP error or
    an error event is a BenchError."""
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            raise BenchError(f"POST {path}: HTTP {r.status_code}: {(await r.aread()).decode()[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                return
            data = json.loads(payload)
            if "error" in data:
                raise BenchError(f"POST {path}: error in the stream: {payload[:500]}")
            yield data


async def stream_completion(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> Sample:
    # plain greedy for every server: llama-cpp-python's (and ours, as a drop-in) default to a 1.1
    # repeat penalty, llama-server to none, and the penalty costs a pass over the vocabulary
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "repeat_penalty": 1.0, "stream": True}
    t0 = time.perf_counter()
    ttft, chunks, finish, usage = None, 0, None, None
    async for data in stream_events(client, "/v1/completions", body):
        usage = data.get("usage") or usage
        choice = data["choices"][0]
        if choice.get("finish_reason"):
            finish = choice["finish_reason"]
        if choice.get("text"):
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            chunks += 1
    seconds = time.perf_counter() - t0
    if finish is None or ttft is None:
        raise BenchError(f"POST /v1/completions: the stream ended without a token or a finish reason ({prompt!r})")
    # "length" means exactly max_tokens; otherwise the server's usage, else one streamed chunk per token
    tokens = max_tokens if finish == "length" else usage["completion_tokens"] if usage else chunks
    return Sample(ttft, seconds, tokens, finish)


async def run_load(url: str, prompts: list[list[str]], max_tokens: int, timeout: float = 600) -> LoadResult:
    """One client per list of prompts, all at once; each sends its prompts one after another."""

    async def client_loop(mine: list[str]) -> list[Sample]:
        try:
            async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
                return [await stream_completion(client, p, max_tokens) for p in mine]
        except httpx.HTTPError as e:  # refused, reset, timed out: the server is gone or stuck
            raise BenchError(f"{url}/v1/completions: {type(e).__name__}: {e}") from None

    t0 = time.perf_counter()
    per_client = await asyncio.gather(*(client_loop(mine) for mine in prompts))
    seconds = time.perf_counter() - t0
    samples = [s for mine in per_client for s in mine]
    tokens = sum(s.tokens for s in samples)
    ttfts = [s.ttft for s in samples]
    return LoadResult(len(prompts), len(samples), tokens, seconds, tokens / seconds,
                      percentile(ttfts, 50), percentile(ttfts, 95), samples)


def client_prompts(clients: int, requests: int) -> list[list[str]]:
    """Distinct prompts, the same for every server: `requests` per client."""
    return [[PROMPT.format(client=c, request=r) for r in range(requests)] for c in range(clients)]


# -- reporting --------------------------------------------------------------------------------------

class Progress:
    """A progress bar on stderr: `[#####-----] 5/10 0:42 what is running`."""

    def __init__(self, total: int, width: int = 24):
        self.total, self.done, self.width = total, 0, width
        self.t0 = time.monotonic()

    def show(self, what: str) -> None:
        filled = self.width * self.done // max(self.total, 1)
        elapsed = int(time.monotonic() - self.t0)
        bar = "#" * filled + "-" * (self.width - filled)
        print(f"\r[{bar}] {self.done}/{self.total} {elapsed // 60}:{elapsed % 60:02d} {what:<48.48}",
              end="", file=sys.stderr, flush=True)

    def advance(self, what: str = "") -> None:
        self.done += 1
        self.show(what)

    def close(self) -> None:
        print(file=sys.stderr, flush=True)


def target(value: float, bound: float, at_least: bool) -> str:
    """'met' or 'missed' for a ratio against its target."""
    return "met" if (value >= bound if at_least else value <= bound) else "missed"


def write_results(stem: str, data: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=1, default=asdict) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown)
    print(markdown)
    print(f"wrote bench/results/{stem}.json and {stem}.md")


REAL_MODELS = {"smollm2": "smollm2-135m-instruct-q4_1"}  # tests/models/real.py (make models)


def zoo_model(name: str) -> Path:
    """A model by its bench name: a zoo file, or "smollm2" for the real-weights SmolLM2."""
    path = ZOO / f"{REAL_MODELS.get(name, name)}.gguf"
    if not path.exists():
        how = "make models" if name in REAL_MODELS else "python tests/models/generate.py --size small (make bench does it)"
        raise BenchError(f"{path} is missing: {how}")
    return path


def timed_requests(engine, prompts: list, n_gen: int, params=None, **submit) -> tuple[float, list]:
    """Submit every prompt to an Engine at once, its prefix cache emptied first (every round computes
    its prompts); (wall seconds until the last finished, their Completions)."""
    engine.cache.clear()
    t0 = time.perf_counter()
    reqs = [engine.submit(p, params, max_tokens=n_gen, **submit) for p in prompts]
    done = [r.result() for r in reqs]
    return time.perf_counter() - t0, done


def run_main(main: Callable[[], int]) -> NoReturn:
    """Exit with a benchmark's main(); a BenchError exits 1 with one clear message on stderr."""
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"\n{Path(sys.argv[0]).stem}: error: {e}", file=sys.stderr)
        sys.exit(1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="a running OpenAI-compatible server")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    r = asyncio.run(run_load(args.url.rstrip("/"), client_prompts(args.clients, args.requests), args.max_tokens))
    print(f"{r.clients} clients, {r.requests} requests, {r.tokens} tokens in {r.seconds:.2f}s: "
          f"{r.tok_per_s:.1f} tok/s, TTFT p50 {r.ttft_p50 * 1000:.0f} ms, p95 {r.ttft_p95 * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    run_main(main)
