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
import functools
import hashlib
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


def example_server_config(model: Path, n_ctx: int, parallel: int, threads: int, port: int, n_batch: int = 512,
                          n_ubatch: int = 512) -> Path:
    """The example server's JSON config for a local model (its README's format), written beside it.
    n_seq_max 2 x parallel: each prompt checkpoint it keeps takes a sequence id of its own."""
    config = {"server": {"host": "127.0.0.1", "port": port},
              "model": {"alias": model.stem, "path": str(model), "n_ctx": n_ctx, "n_seq_max": 2 * max(parallel, 1),
                        "n_batch": n_batch, "n_ubatch": n_ubatch, "threads": threads, "threads_batch": threads,
                        "kv_unified": True}}
    path = EXAMPLE_SERVER.parent / f"bench-{port}.json"
    path.write_text(json.dumps(config, indent=1))
    return path


FLASH_ATTN = ("auto", "on", "off")


@functools.lru_cache(maxsize=None)
def llama_server_help() -> str:
    """The pin's llama-server --help (which flags this build has)."""
    binary = UPSTREAM / "bin" / "llama-server"
    if not binary.exists():
        raise BenchError(f"{binary} is missing: run `make build`")
    proc = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr


def server_command(kind: str, model: Path, n_ctx: int, parallel: int, threads: int, port: int,
                   kv_unified: bool = False, extra: tuple[str, ...] = (), *, n_batch: int | None = None,
                   n_ubatch: int | None = None, flash_attn: str | None = None) -> list[str]:
    """The command line of one server: the same model, context, threads and port for all
    (llama-server with parallel 0: its own defaults for slots and KV layout); `extra`: more
    pyllama-ssm options (--batch_invariant true, ...).  n_batch, n_ubatch, flash_attn ("auto", "on",
    "off"): passed to the server when given, else each server's own default (pyllama-ssm 512/512/auto,
    llama-server 2048/512/auto, llama_cpp.server 512/512/off, the example server 512/512)."""
    if flash_attn is not None and flash_attn not in FLASH_ATTN:
        raise ValueError(f"flash_attn={flash_attn!r}: expected one of {', '.join(FLASH_ATTN)}")
    if kind == "pyllama-ssm":
        cmd = [sys.executable, "-m", "pyllama_ssm.server", "--model", str(model), "--n_ctx", str(n_ctx),
               "--n_parallel", str(parallel), "--n_threads", str(threads), "--n_threads_batch", str(threads),
               "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--n_batch", str(n_batch)] if n_batch else []
        cmd += ["--n_ubatch", str(n_ubatch)] if n_ubatch else []
        cmd += ["--flash_attn", "true" if flash_attn == "on" else "false"] if flash_attn in ("on", "off") else []
        return cmd + list(extra)
    if extra:
        raise ValueError(f"extra options are for pyllama-ssm, not {kind}")
    if kind == "llama-cpp-python":
        # one request at a time whatever the clients (no parallel flag); by default a new request ends the
        # stream in progress, which no one serving several clients wants: they queue instead
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_ctx", str(n_ctx),
               "--n_threads", str(threads), "--n_threads_batch", str(threads), "--interrupt_requests", "false",
               "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--n_batch", str(n_batch)] if n_batch else []
        cmd += ["--n_ubatch", str(n_ubatch)] if n_ubatch else []
        # its flag is a bool (default off); llama.cpp's auto enables flash attention on the CPU
        cmd += ["--flash_attn", "false" if flash_attn == "off" else "true"] if flash_attn else []
        return cmd
    if kind == "llama-server":  # -lv 4: the buffer sizes are logged
        binary = UPSTREAM / "bin" / "llama-server"
        if not binary.exists():
            raise BenchError(f"{binary} is missing: run `make build`")
        cmd = [str(binary), "-m", str(model), "-c", str(n_ctx), "-t", str(threads),
               "-tb", str(threads), "--host", "127.0.0.1", "--port", str(port), "-lv", "4"]
        if parallel:
            cmd += ["--parallel", str(parallel)]
            if kv_unified:
                cmd.append("--kv-unified")
            elif "--no-kv-unified" in llama_server_help():  # else split is already its default for N slots
                cmd.append("--no-kv-unified")
        cmd += ["-b", str(n_batch)] if n_batch else []
        cmd += ["-ub", str(n_ubatch)] if n_ubatch else []
        cmd += ["-fa", flash_attn] if flash_attn else []
        return cmd
    if kind == "example-server":
        return [sys.executable, str(EXAMPLE_SERVER), "-C", str(example_server_config(
            model, n_ctx, parallel, threads, port, n_batch or 512, n_ubatch or 512))]
    raise ValueError(f"server kind {kind!r}: expected pyllama-ssm, llama-cpp-python, llama-server or example-server")


_CONTEXT = re.compile(r"llama_context:\s+(n_ctx|n_ctx_seq|n_seq_max|n_batch|n_ubatch|flash_attn|kv_unified)"
                      r"\s+=\s+(\S+)")
_FA_RESOLVED = re.compile(r"Flash Attention (?:was auto, set to )?(enabled|disabled)")


def context_settings(log: str) -> dict:
    """What llama.cpp logged as it created the (first) context: n_ctx, n_batch, n_ubatch, flash_attn
    (as asked, and as resolved where "auto" was), kv_unified, n_seq_max; {} when the log has none."""
    out: dict = {}
    for m in _CONTEXT.finditer(log):
        key, value = m.groups()
        if key not in out:
            out[key] = int(value) if value.isdigit() else value
    if m := _FA_RESOLVED.search(log):
        out["flash_attn_resolved"] = m.group(1)
    return out


class Server:
    """One server process on a free loopback port, ready when /v1/models answers; stop() on exit."""

    def __init__(self, kind: str, model: Path, *, n_ctx: int, parallel: int, threads: int,
                 kv_unified: bool = False, extra: tuple[str, ...] = (), timeout: float = 180,
                 n_batch: int | None = None, n_ubatch: int | None = None, flash_attn: str | None = None):
        self.kind = kind
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = child_env(kind)  # first: it extracts the stock code a command may need
        self.cmd = cmd = server_command(kind, model, n_ctx, parallel, threads, port, kv_unified, extra,
                                        n_batch=n_batch, n_ubatch=n_ubatch, flash_attn=flash_attn)
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

    def settings(self) -> dict:
        """The settings the server runs with, as it reports them: llama.cpp's context log (llama-server,
        llama_cpp.server), or /props (pyllama-ssm: n_batch, flash_attn, n_parallel; n_ubatch as given, else
        its default 512); while it runs."""
        out = context_settings(self.log())
        if self.kind == "pyllama-ssm":
            props = httpx.get(f"{self.url}/props", timeout=30).json()
            out |= {k: props.get(k) for k in ("n_ctx", "n_parallel", "n_batch", "flash_attn", "batch_invariant",
                                               "prefix_cache")}
            given = int(self.cmd[self.cmd.index("--n_ubatch") + 1]) if "--n_ubatch" in self.cmd else 512
            out["n_ubatch"] = min(given, out["n_batch"])  # its settings' default 512, at most n_batch
        return out

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


SSE_LINE_END = re.compile(r"\r\n|\r|\n")


async def sse_lines(r: httpx.Response) -> AsyncIterator[str]:
    """A streamed response's lines, ended as server-sent events end them: at CR, LF or CRLF only.  httpx's
    aiter_lines also ends a line at U+2028, U+0085 or \\x1c (str.splitlines), which llama-server's JSON
    leaves raw in a token's text: a random model's answer then failed as a cut JSON object."""
    rest = ""
    async for text in r.aiter_text():
        *lines, rest = SSE_LINE_END.split(rest + text)
        for line in lines:
            yield line
    if rest:
        yield rest


async def stream_events(client: httpx.AsyncClient, path: str, body: dict) -> AsyncIterator[dict]:
    """POST body to path, streamed: each server-sent event's JSON object until [DONE]; an HTTP error or
    an error event is a BenchError."""
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            raise BenchError(f"POST {path}: HTTP {r.status_code}: {(await r.aread()).decode()[:500]}")
        async for line in sse_lines(r):
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


def write_results(stem: str, data: dict, markdown: str, results_dir: Path = RESULTS) -> None:
    """<results_dir>/<stem>.json and .md (bench/results unless a script's --results-dir says otherwise)."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{stem}.json").write_text(json.dumps(data, indent=1, default=asdict) + "\n")
    (results_dir / f"{stem}.md").write_text(markdown)
    print(markdown)
    print(f"wrote {shown(results_dir / stem)}.json and {stem}.md")


def shown(path: Path) -> str:
    """A path as printed: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def spread(values: list[float]) -> dict:
    """Per-round values, their median and range: {"median", "min", "max", "rounds"}."""
    import statistics
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": list(values)}


def fmt_spread(s: dict | None, fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    """A spread() as "median [min-max]" (the median alone for one round); "-" for none."""
    if not s:
        return "-"
    med = fmt.format(s["median"] * scale)
    if len(s["rounds"]) < 2:
        return med
    return f"{med} [{fmt.format(s['min'] * scale)}-{fmt.format(s['max'] * scale)}]"


# -- what a run ran on ------------------------------------------------------------------------------

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def _git(*args: str) -> str:
    proc = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
    return proc.stdout if proc.returncode == 0 else ""


def provenance(threads: int | None = None) -> dict:
    """Where and on what code a run ran: the git commit and whether the tree differs from it (anything
    outside bench/results, with a digest of the difference: tracked changes and untracked files), the
    builds' keys, the CPU model and its flags of interest, the OpenMP and malloc environment."""
    import platform
    outside = ["--", ".", ":(exclude)bench/results"]
    status = _git("status", "--porcelain", *outside)
    digest = hashlib.sha256(_git("diff", "HEAD", "--binary", *outside).encode())
    for name in sorted(_git("ls-files", "--others", "--exclude-standard", *outside).split("\n")):
        if name and (ROOT / name).is_file():
            digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
    cpu, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not cpu:
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    builds = {}
    for build in ("patched", "upstream"):
        key = ROOT / "build" / build / "BUILD_KEY"
        builds[build] = key.read_text().strip() if key.exists() else None
    return {"commit": _git("rev-parse", "HEAD").strip() or None, "dirty": bool(status.strip()),
            "dirty_files": status.splitlines()[:50], "diff_sha256": digest.hexdigest() if status.strip() else None,
            "build_keys": builds, "cpu_model": cpu, "cpu_flags": {f: f in flags for f in CPU_FLAGS},
            "cpus": os.cpu_count(), "threads": threads, "machine": platform.platform(),
            "python": platform.python_version(),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "MALLOC_", "LLAMA_",
                                                                         "PYLLAMA_SSM_"))}}


def check_unchanged(start: dict) -> dict:
    """start, with "changed_during_run" (why) when the code, builds or CPU differ now from when the run began:
    every server process imports the working tree as it is when it starts, so edits made during a long run
    reach some of its runs and not others."""
    why = same_code(start, provenance(start.get("threads")))
    if why:
        print(f"\nwarning: the tree changed during the run ({why}): its figures mix code", file=sys.stderr)
        return start | {"changed_during_run": why}
    return start


def same_code(a: dict | None, b: dict | None) -> str | None:
    """Why two runs' provenance() do not describe the same code on the same CPU and threads (None: they do)."""
    if not a or not b:
        return "one of them records no commit (a run from before provenance was recorded)"
    for key in ("commit", "diff_sha256", "build_keys", "cpu_model", "threads"):
        if a.get(key) != b.get(key):
            return f"{key} differs: {a.get(key)!r} vs {b.get(key)!r}"
    return None


REAL_MODELS = {"smollm2": "smollm2-135m-instruct-q4_1"}  # tests/models/real.py (make models)
GRAFT_FORMAT = "f16"  # a graft named without its format: tests/models/graft.py's graft_path default


def _grafts() -> dict[str, dict]:
    """build/models/grafts.json's models (tests/models/graft.py): {} before `make models` wrote it."""
    path = ZOO / "grafts.json"
    return json.loads(path.read_text())["models"] if path.exists() else {}


def model_stem(name: str) -> str:
    """The file stem of a bench model name: "smollm2" (SmolLM2-135M-Instruct Q4_1 as shipped), a name of
    build/models/grafts.json with or without its format ("falcon-h1-graft" = "falcon-h1-graft-f16",
    "granitehybrid-graft-q4_k_m", "smollm2-q8_0", "qwen35-tiny-q4_0"), else a zoo name (index.json)."""
    if name in REAL_MODELS:
        return REAL_MODELS[name]
    grafts = _grafts()
    if name.startswith("smollm2-") and f"smollm2-135m-instruct-{name[8:]}" in grafts:
        name = f"smollm2-135m-instruct-{name[8:]}"
    for candidate in (name, f"{name}-{GRAFT_FORMAT}"):
        if candidate in grafts:
            return Path(grafts[candidate]["file"]).stem
    return name


def measure_models(args, measure) -> tuple[dict, list, dict]:
    """The in-process benches' common run: every model of --models at every --clients level through
    measure(name, path, levels, args) -> (rows, settings); returns (provenance, rows, settings by model)."""
    if args.rounds < 1:
        raise BenchError("--rounds must be at least 1")
    levels = [int(x) for x in args.clients.split(",")]
    models = {name: zoo_model(name) for name in args.models.split(",")}
    prov = provenance(args.threads)
    rows, settings = [], {}
    for name, path in models.items():
        got, settings[name] = measure(name, path, levels, args)
        rows += got
    return prov, rows, settings


def zoo_model(name: str) -> Path:
    """A model by its bench name (model_stem): a zoo file, a graft or quantized file, or SmolLM2."""
    path = ZOO / f"{model_stem(name)}.gguf"
    if not path.exists():
        how = "make models" if name in REAL_MODELS or "graft" in name or "smollm2" in name else \
            "python tests/models/generate.py --size small (make bench does it)"
        known = sorted(_grafts())
        raise BenchError(f"{path} is missing: {how}" + (f" (grafts.json names: {', '.join(known)})" if known else ""))
    return path


def timed_requests(engine, prompts: list, n_gen: int, params=None, **submit) -> tuple[float, list]:
    """Submit every prompt to an Engine at once, its prefix cache emptied first (every round computes
    its prompts); (wall seconds until the last finished, their Completions)."""
    engine.cache.clear()
    t0 = time.perf_counter()
    reqs = [engine.submit(p, params, max_tokens=n_gen, **submit) for p in prompts]
    done = [r.result() for r in reqs]
    return time.perf_counter() - t0, done


def engine_settings(engine) -> dict:
    """The settings an Engine's context was created with (n_ctx, n_batch, n_ubatch, threads, flash attention
    as asked: auto, enabled, disabled), its sequences, batch invariance and its model's file."""
    from pyllama_ssm.bindings import ffi, lib
    p = engine.ctx.params
    return {"model_file": engine.model.path.name, "n_ctx": p.n_ctx, "parallel": engine.config.parallel,
            "n_batch": p.n_batch, "n_ubatch": p.n_ubatch, "n_threads": p.n_threads,
            "n_threads_batch": p.n_threads_batch,
            "flash_attn": ffi.string(lib.llama_flash_attn_type_name(p.flash_attn_type)).decode(),
            "batch_invariant": engine.ctx.batch_invariant}  # as resolved (config's None: the build's default)


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
