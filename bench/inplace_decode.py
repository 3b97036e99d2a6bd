"""Patch 0005 (rs-inplace): decode throughput with recurrent states updated in place.

    python bench/inplace_decode.py [--models qwen35-small,...] [--weights f16,q4_0] [--seqs 1,8,16]
                                   [--steps 48] [--rounds 3] [--n-gpu-layers N --tag cuda]

Three libraries side by side, same models, prompts and thread count:
  upstream  the pristine pin (build/upstream)
  copy      our series with LLAMA_RS_INPLACE=0: upstream's path, which gathers the
            states into a temporary (get_rows) and copies the new ones back (cpy)
  inplace   our series as shipped: states read and updated where they lie
Each measurement is a child process (one libllama per process) that prefills n
prompts, then times `steps` decode steps of n tokens. Weights: f16 is the zoo
model as generated; q4_0, q8_0, ... are llama.cpp quantizations of it, made once
with llama_model_quantize and kept in build/models/quantized/. Quantized weights
are how models are served on CPUs, and they shrink the matmuls' share of a step,
so the states' share (what the patch removes) grows. Rounds interleave the three
libraries so that load from other users of the machine hits them alike; the table
shows medians over rounds and the ratios inplace/upstream and inplace/copy.

With perf on PATH (Debian's linux-perf), one more run per model at the largest n
is sampled for upstream and inplace, during the decode steps only, and the table
gives the share of samples in get_rows and in state copies (ggml's dup/cpy and
memmove): the time the patch removes.

With --n-gpu-layers the models are offloaded (CUDA build): states then live on the
device, where the patch keeps upstream's path, so inplace should equal copy.

Writes bench/results/inplace_decode[_TAG].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from load import ZOO, BenchError, Progress, child_env, run_main, write_results, zoo_model

LIBS = {  # name -> environment of the child
    "upstream": {"PYLLAMA_SSM_BUILD": "upstream"},
    "copy": {"PYLLAMA_SSM_BUILD": "patched", "LLAMA_RS_INPLACE": "0"},
    "inplace": {"PYLLAMA_SSM_BUILD": "patched", "LLAMA_RS_INPLACE": "1"},
}

# The child: prefill n prompts, time `steps` decode steps; with a perf control fifo,
# sample only the decode steps. Prints tokens/s.
CHILD = r"""
import json, os, sys, time
import pyllama_ssm as ps
path, n, steps, ngl = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ctl, ack = os.environ.get("PERF_CTL"), os.environ.get("PERF_ACK")

def perf(cmd):
    if ctl:
        with open(ctl, "w") as f: f.write(cmd + "\n")
        with open(ack) as f: f.read(5)

model = ps.Model(path, n_gpu_layers=ngl)
with ps.Context(model, n_ctx=4096, n_seq_max=n, n_batch=512) as ctx, ps.Batch(512, n) as batch:
    pos = []
    for s in range(n):
        prompt = model.tokenize(f"Sequence {s} of the benchmark tells a story about")
        batch.add_sequence(prompt, 0, s)
        pos.append(len(prompt))
    ctx.decode(batch)
    token = model.tokenize(" word", add_special=False)[0]
    for warm in range(4 + steps):
        if warm == 4:
            perf("enable")
            t0 = time.perf_counter()
        batch.clear()
        for s in range(n):
            batch.add(token, pos[s], s, logits=True)
            pos[s] += 1
        ctx.decode(batch)
    elapsed = time.perf_counter() - t0
    perf("disable")
print(json.dumps({"tok_per_s": n * steps / elapsed}))
"""


# The quantizer: llama_model_quantize from f16 to the named llama.cpp file type.
QUANTIZE = r"""
import sys
from pyllama_ssm.bindings import ffi, lib
src, dst, ftype = sys.argv[1], sys.argv[2], sys.argv[3]
params = ffi.new("llama_model_quantize_params *", lib.llama_model_quantize_default_params())
params.ftype = getattr(lib, "LLAMA_FTYPE_MOSTLY_" + ftype.upper())
sys.exit(lib.llama_model_quantize(src.encode(), dst.encode(), params))
"""


def model_file(name: str, weights: str) -> Path:
    """The zoo model with the given weights, quantized once (again when the zoo model changes)."""
    src = zoo_model(name)
    if weights == "f16":
        return src
    dst = ZOO / "quantized" / f"{name}-{weights}.gguf"
    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    dst.parent.mkdir(exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    out = subprocess.run([sys.executable, "-c", QUANTIZE, str(src), str(tmp), weights],
                         env=lib_env("inplace"), capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BenchError(f"quantizing {src.name} to {weights} failed (rc {out.returncode}):\n{out.stderr[-2000:]}")
    tmp.replace(dst)
    return dst


def lib_env(lib: str) -> dict[str, str]:
    return {**child_env("pyllama-ssm"), **LIBS[lib]}


def measure(lib: str, model: Path, n: int, steps: int, ngl: int) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), str(n), str(steps), str(ngl)], env=lib_env(lib),
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise BenchError(f"{lib} {model.name} n={n} failed:\n{out.stderr[-2000:]}")
    return float(json.loads(out.stdout.splitlines()[-1])["tok_per_s"])


def profile(lib: str, model: Path, n: int, steps: int, ngl: int) -> dict[str, float]:
    """Shares of perf's cpu-clock samples during the decode steps (perf's control fifo)."""
    with tempfile.TemporaryDirectory() as tmp:
        ctl, ack, data = Path(tmp, "ctl"), Path(tmp, "ack"), Path(tmp, "perf.data")
        os.mkfifo(ctl)
        os.mkfifo(ack)
        env = {**lib_env(lib), "PERF_CTL": str(ctl), "PERF_ACK": str(ack)}
        subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-D", "-1", f"--control=fifo:{ctl},{ack}",
                        "-o", str(data), "--", sys.executable, "-c", CHILD, str(model), str(n), str(steps), str(ngl)],
                       env=env, capture_output=True, text=True, check=True, timeout=900)
        report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", "symbol"],
                                capture_output=True, text=True, check=True).stdout
    shares = {"get_rows": 0.0, "copies": 0.0}
    for line in report.splitlines():
        parts = line.split()
        if not parts or not parts[0].endswith("%"):
            continue
        pct, symbol = float(parts[0].rstrip("%")), " ".join(parts[2:])
        if "get_rows" in symbol:
            shares["get_rows"] += pct
        elif any(s in symbol for s in ("forward_dup", "forward_cpy", "memmove", "memcpy")):
            shares["copies"] += pct
    return shares


def gpu_name() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return out.stdout.strip() or None


def markdown(results: dict) -> str:
    rows = ["| model | weights | seqs | upstream tok/s | copy tok/s | inplace tok/s | inplace / upstream "
            "| inplace / copy |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["throughput"]:
        rows.append(f"| {r['model']} | {r['weights']} | {r['seqs']} | {r['upstream']:.1f} | {r['copy']:.1f} "
                    f"| {r['inplace']:.1f} | {r['inplace'] / r['upstream']:.2f}x | {r['inplace'] / r['copy']:.2f}x |")
    if results["profile"]:
        rows += ["", "| model | weights | seqs | lib | get_rows % | copies % | state traffic % |",
                 "|---|---|---:|---|---:|---:|---:|"]
        for p in results["profile"]:
            rows.append(f"| {p['model']} | {p['weights']} | {p['seqs']} | {p['lib']} | {p['get_rows']:.1f} "
                        f"| {p['copies']:.1f} | {p['get_rows'] + p['copies']:.1f} |")
    return "\n".join(rows) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen35-small,jamba-small,granitehybrid-small,nemotron_h-small,rwkv7-small")
    ap.add_argument("--weights", default="f16,q4_0", help="f16 (the zoo's) and/or llama.cpp quantizations")
    ap.add_argument("--seqs", default="1,8,16")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-profile", action="store_true", help="skip the perf sampling")
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="offload layers (CUDA build)")
    ap.add_argument("--tag", default="", help="suffix of the result files, e.g. cuda")
    args = ap.parse_args()
    models = {(m, w): model_file(m, w) for m in args.models.split(",") for w in args.weights.split(",")}
    seqs = [int(n) for n in args.seqs.split(",")]

    jobs = [(m, w, n) for m, w in models for n in seqs]
    samples: dict[tuple[str, str, int, str], list[float]] = {}
    progress = Progress(len(jobs) * args.rounds * len(LIBS))
    for _ in range(args.rounds):
        for m, w, n in jobs:
            for lib in LIBS:  # interleaved: the libraries share whatever load the machine has
                progress.show(f"{m} {w} n={n} {lib}")
                samples.setdefault((m, w, n, lib), []).append(
                    measure(lib, models[m, w], n, args.steps, args.n_gpu_layers))
                progress.advance()
    progress.close()
    throughput = [{"model": m, "weights": w, "seqs": n,
                   **{lib: statistics.median(samples[(m, w, n, lib)]) for lib in LIBS},
                   "samples": {lib: samples[(m, w, n, lib)] for lib in LIBS}} for m, w, n in jobs]

    prof = []
    if not args.no_profile and shutil.which("perf"):
        for m, w in models:
            for lib in ("upstream", "inplace"):
                shares = profile(lib, models[m, w], max(seqs), args.steps, args.n_gpu_layers)
                prof.append({"model": m, "weights": w, "seqs": max(seqs), "lib": lib, **shares})
    elif not args.no_profile:
        print("perf not found: no profile (apt-get install linux-perf)", file=sys.stderr)

    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": gpu_name()},
               "n_gpu_layers": args.n_gpu_layers, "steps": args.steps, "rounds": args.rounds,
               "throughput": throughput, "profile": prof}
    write_results("inplace_decode" + (f"_{args.tag}" if args.tag else ""), results, markdown(results))
    return 0


if __name__ == "__main__":
    run_main(main)
