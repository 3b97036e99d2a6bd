"""Aggregate decode throughput of the Engine: N concurrent requests vs one after another.

    python bench/engine_throughput.py [--models qwen35-small,jamba-small] [--n-gen 64]

For each model and each concurrency N in 1, 4, 8, 16 it runs N greedy requests
at once on one Engine, then the same N requests one after another on the same
Engine, in the same process and back to back (these machines are shared and
noisy: compare the ratio, not the absolute numbers).  It also reports the
Python overhead per step: step wall time minus time inside llama_decode.

Prints a table, writes bench/results/engine_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import logging  # noqa: E402

from pyllama_ssm import Model  # noqa: E402

logging.getLogger("pyllama_ssm.llama").setLevel(logging.ERROR)
from pyllama_ssm.engine import Engine  # noqa: E402
from pyllama_ssm.sampling import SamplingParams  # noqa: E402

ZOO = ROOT / "build" / "models"
GREEDY = SamplingParams(temperature=0)
PROMPT = "Benchmark request {i}: describe the weather in a city you like."


def run(engine: Engine, n: int, n_gen: int, concurrent: bool) -> dict:
    prompts = [PROMPT.format(i=i) for i in range(n)]
    s0 = engine.stats()
    t0 = time.perf_counter()
    if concurrent:
        reqs = [engine.submit(p, GREEDY, max_tokens=n_gen) for p in prompts]
        done = [r.result() for r in reqs]
    else:
        done = [engine.generate(p, GREEDY, max_tokens=n_gen) for p in prompts]
    wall = time.perf_counter() - t0
    s1 = engine.stats()
    generated = sum(len(c.tokens) for c in done)
    step = s1.step_seconds - s0.step_seconds
    decode = s1.decode_seconds - s0.decode_seconds
    return {"tokens": generated, "seconds": wall, "tok_per_s": generated / wall,
            "steps": s1.steps - s0.steps, "python_overhead": 0.0 if step == 0 else 1 - decode / step}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen35-small,jamba-small")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine_throughput.json")
    args = ap.parse_args()
    index = json.loads((ZOO / "index.json").read_text())["models"]
    levels = [int(x) for x in args.concurrency.split(",")]
    results = []
    print(f"{'model':<16} {'N':>3} {'concurrent tok/s':>17} {'sequential tok/s':>17} {'ratio':>6} {'py overhead':>12}")
    for name in args.models.split(","):
        if name not in index:
            print(f"{name}: not in the zoo (python tests/models/generate.py --size small)", file=sys.stderr)
            continue
        with Model(ZOO / index[name]["file"]) as model:
            with Engine(model, n_ctx=max(levels) * (args.n_gen + 32), parallel=max(levels), prefix_cache=0) as e:
                e.generate("warm up", GREEDY, max_tokens=4)
                for n in levels:
                    conc = run(e, n, args.n_gen, concurrent=True)
                    seq = run(e, n, args.n_gen, concurrent=False)
                    ratio = conc["tok_per_s"] / seq["tok_per_s"]
                    results.append({"model": name, "n": n, "concurrent": conc, "sequential": seq, "ratio": ratio})
                    print(f"{name:<16} {n:>3} {conc['tok_per_s']:>17.1f} {seq['tok_per_s']:>17.1f} {ratio:>6.2f} "
                          f"{conc['python_overhead']:>11.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "n_gen": args.n_gen, "results": results},
                                   indent=1) + "\n")
    print(f"wrote {args.out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
