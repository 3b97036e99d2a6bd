"""The Engine's Python time per step: step wall time minus time inside llama_decode, by sequences decoding.

    python bench/step_overhead.py [--models qwen35-tiny,nemotron_h-tiny] [--seqs 1,8,32] [--rounds 3]
    python bench/step_overhead.py --baseline <commit>     # the same run on another commit, side by side

On a GPU a decode step takes milliseconds and what the Engine does around it in Python (the plan, the
batch, sampling the rows, text and streaming) is what bounds the step rate; on tiny models the CPU
shows it too.  For each model and each count N, N greedy requests (short prompts, --n-gen tokens each)
run at once on one Engine of --parallel sequences; the figure is the Engine's step time less its time in
llama_decode, per step, over the whole run (EngineStats.step_seconds, decode_seconds, steps).  On a GPU
llama_decode returns once the work is queued: the Engine waits for it right after (llama_synchronize),
inside decode_seconds, so the device's compute is not counted as Python.

--baseline REV measures the code of commit REV in a git worktree (build/step-overhead/REV, using this
checkout's compiled bindings: REV must have the same patch series and bindings sources, or
--borrow-bindings where this library only adds to REV's) in the same run, the two trees alternating
in each of the rounds (the order rotated), each in a child process of its own: these machines are
shared and noisy, so compare the ratio.  Work moved into the library leaves the Python figure and
shows in llama_decode's: the step column (both) says what the step gained.

Prints a table; writes bench/results/step_overhead.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = "--child" in sys.argv  # measures the package of another tree: nothing of this one is imported
if not CHILD:
    sys.path.insert(0, str(ROOT))
    from bench.load import RESULTS, BenchError, fmt_spread, provenance, run_main, spread, write_results
    from bench.plot import lines
else:
    RESULTS, run_main = None, lambda main: sys.exit(main())

ZOO = ROOT / "build" / "models"
PROMPT = "Request {i}: describe the weather in a city you like."
# what a worktree of another commit borrows from this checkout: the compiled bindings and stock's package
BORROWED = ("pyllama_ssm/_llama_patched*.so", "pyllama_ssm/_llama_upstream*.so", "pyllama_ssm/_llama_*.key",
            "pyllama_ssm/_cdef_*.h", "pyllama_ssm/_stock")
SAME_BINDINGS = ("patches", "tools/build_ffi.py", "tools/gen_cdef.py", "tools/build.py", "vendor/llama.cpp.lock")


def measure(tree: Path, models: list[str], seqs: list[int], n_gen: int, parallel: int) -> list[dict]:
    """In this process, the package of `tree`: one Engine per model, each N in turn."""
    sys.path.insert(0, str(tree))
    import logging

    import pyllama_ssm
    assert Path(pyllama_ssm.__file__).resolve().is_relative_to(tree.resolve()), pyllama_ssm.__file__

    from pyllama_ssm import Model
    from pyllama_ssm.engine import Engine
    from pyllama_ssm.sampling import SamplingParams
    logging.getLogger("pyllama_ssm").setLevel(logging.ERROR)
    greedy = SamplingParams(temperature=0)
    index = json.loads((ZOO / "index.json").read_text())["models"]
    out = []
    for name in models:
        with Model(ZOO / index[name]["file"]) as model, \
                Engine(model, n_ctx=parallel * (n_gen + 64), parallel=parallel, prefix_cache=0) as engine:
            engine.generate("warm up", greedy, max_tokens=8)
            for n in seqs:
                s0 = engine.stats()
                reqs = [engine.submit(PROMPT.format(i=i), greedy, max_tokens=n_gen) for i in range(n)]
                generated = sum(len(r.result().tokens) for r in reqs)
                s1 = engine.stats()
                steps = s1.steps - s0.steps
                step_s, decode_s = s1.step_seconds - s0.step_seconds, s1.decode_seconds - s0.decode_seconds
                out.append({"model": name, "seqs": n, "steps": steps, "generated": generated,
                            "python_ms": (step_s - decode_s) / steps * 1e3, "decode_ms": decode_s / steps * 1e3})
    return out


def worktree(rev: str, borrow: bool) -> Path:
    """A worktree of commit rev under build/step-overhead/, with this checkout's compiled bindings (refused
    when rev's patch series or bindings differ from this tree's, unless `borrow`)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    changed = git("diff", "--name-only", sha, "--", *SAME_BINDINGS)
    if changed and not borrow:
        raise BenchError(f"--baseline {rev}: its bindings differ from this checkout's ({', '.join(changed.split())}); "
                         f"build and run it in a checkout of its own, or pass --borrow-bindings when this "
                         f"checkout's library only adds to rev's (its code then runs on this library)")
    path = ROOT / "build" / "step-overhead" / sha[:12]
    if not path.exists():
        git("worktree", "add", "--detach", str(path), sha)
    for pattern in BORROWED:
        for src in ROOT.glob(pattern):
            dst = path / src.relative_to(ROOT)
            if not dst.exists():
                dst.symlink_to(src)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen35-tiny,nemotron_h-tiny")
    ap.add_argument("--seqs", default="1,8,32", help="requests decoding at once")
    ap.add_argument("--parallel", type=int, default=32, help="the Engine's sequences")
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", help="a commit measured beside this checkout, in the same rounds")
    ap.add_argument("--borrow-bindings", action="store_true",
                    help="run --baseline on this checkout's bindings although the patch series differs")
    ap.add_argument("--out", default="step_overhead", help="results stem in --results-dir")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # measure one tree, print JSON
    args = ap.parse_args()
    models, seqs = args.models.split(","), [int(x) for x in args.seqs.split(",")]
    if max(seqs) > args.parallel:
        raise BenchError(f"--seqs {args.seqs}: more than --parallel {args.parallel}")
    if args.child:
        print(json.dumps(measure(args.child, models, seqs, args.n_gen, args.parallel)))
        return 0
    index = json.loads((ZOO / "index.json").read_text())["models"]
    if missing := [m for m in models if m not in index]:
        raise BenchError(f"not in the zoo: {', '.join(missing)} (python tests/models/generate.py)")
    trees = {"this checkout": ROOT}
    if args.baseline:
        trees = {f"baseline {args.baseline}": worktree(args.baseline, args.borrow_bindings), **trees}
    runs: dict[str, list[list[dict]]] = {label: [] for label in trees}
    for r in range(args.rounds):
        order = list(trees)[r % len(trees):] + list(trees)[:r % len(trees)]
        for label in order:
            proc = subprocess.run([sys.executable, __file__, "--child", str(trees[label]), "--models", args.models,
                                   "--seqs", args.seqs, "--parallel", str(args.parallel), "--n-gen", str(args.n_gen)],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(trees[label])})
            if proc.returncode != 0:
                raise BenchError(f"{label}: the measuring child failed:\n{proc.stderr[-3000:]}")
            runs[label].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds}: {label} done", file=sys.stderr)
    rows = []
    for label, rounds in runs.items():
        for k, first in enumerate(rounds[0]):
            per = [rnd[k] for rnd in rounds]
            rows.append({"tree": label, "model": first["model"], "seqs": first["seqs"],
                         "python_ms": spread([p["python_ms"] for p in per]),
                         "decode_ms": spread([p["decode_ms"] for p in per]),
                         "step_ms": spread([p["python_ms"] + p["decode_ms"] for p in per]),
                         "steps": [p["steps"] for p in per], "generated": [p["generated"] for p in per]})
    base = {(r["model"], r["seqs"]): r for r in rows if r["tree"] != "this checkout"}
    for r in rows:
        b = base.get((r["model"], r["seqs"]))
        if b is not None and r is not b:
            r["vs_baseline"] = spread([a / c for a, c in zip(r["python_ms"]["rounds"], b["python_ms"]["rounds"])])
            r["step_vs_baseline"] = spread([a / c for a, c in zip(r["step_ms"]["rounds"], b["step_ms"]["rounds"])])
    prov = provenance()
    commit = (prov["commit"] or "?")[:12] + (" (dirty tree)" if prov["dirty"] else "")
    md = [f"Python per Engine step (step time less llama_decode), N greedy requests decoding {args.n_gen} tokens at "
          f"once on an Engine of {args.parallel} sequences; {args.rounds} rounds, trees alternating, each in its own "
          f"process; median [min-max]; commit {commit}; {prov['cpu_model']}.", "",
          "| tree | model | N | Python ms/step | vs baseline | llama_decode ms/step | step ms | vs baseline |",
          "|---|---|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['tree']} | {r['model']} | {r['seqs']} | {fmt_spread(r['python_ms'], '{:.3f}')} | "
           f"{fmt_spread(r['vs_baseline']) + 'x' if 'vs_baseline' in r else '-'} | "
           f"{fmt_spread(r['decode_ms'], '{:.2f}')} | {fmt_spread(r['step_ms'], '{:.2f}')} | "
           f"{fmt_spread(r['step_vs_baseline']) + 'x' if 'step_vs_baseline' in r else '-'} |" for r in rows]
    write_results(args.out, {"provenance": prov, "baseline": args.baseline, "rounds": args.rounds, "n_gen": args.n_gen,
                             "parallel": args.parallel, "rows": rows}, "\n".join(md) + "\n", args.results_dir)
    for r in rows:
        r["ms"] = r["python_ms"]["median"]
    lines(args.out, rows, series="tree", x="seqs", y=lambda r: r["ms"],
          y_range=lambda r: (r["python_ms"]["min"], r["python_ms"]["max"]), title="Python per step",
          xlabel="sequences decoding", ylabel="ms per step (step - llama_decode)", results_dir=args.results_dir)
    return 0


if __name__ == "__main__":
    run_main(main)
