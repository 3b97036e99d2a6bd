"""Context memory for N sequences: one shared pool vs upstream's layouts.

    python bench/memory_footprint.py [--models qwen35-tiny,jamba-tiny] [--n-ctx 65536]

For N = 1, 8, 16 it reads, through the memory report (patch 0001):
  pool      one context, n_seq_max=N, snapshot pool of N/2 + 1 cells (pyllama-ssm)
  rollback  one context, n_seq_max=N, n_rs_seq=4 (upstream per-sequence rollback rows)
  separate  N contexts of n_ctx/N each, one sequence each (one llama-cpp-python object per client)
All three hold the same attention capacity in total.  Prints a table, writes
bench/results/memory_footprint.json and a PNG plot when matplotlib is present.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import logging  # noqa: E402

from pyllama_ssm import Context, Model  # noqa: E402

logging.getLogger("pyllama_ssm.llama").setLevel(logging.ERROR)  # n_ctx > n_ctx_train warnings: intended

ZOO = ROOT / "build" / "models"
MiB = 1024 * 1024


def ctx_bytes(model: Model, **kw) -> dict:
    with Context(model, **kw) as ctx:
        r = ctx.memory_report()
    return {"kv": r.kv_bytes, "rs": r.rs_bytes, "compute": r.compute_bytes, "output": r.output_bytes,
            "total": r.kv_bytes + r.rs_bytes + r.compute_bytes + r.output_bytes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen35-tiny,jamba-tiny,mamba2-tiny")
    ap.add_argument("--n-ctx", type=int, default=65536)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory_footprint.json")
    args = ap.parse_args()
    index = json.loads((ZOO / "index.json").read_text())["models"]
    rows = []
    print("state = attention KV + recurrent states; total adds compute and output buffers (MiB)")
    print(f"{'model':<16}{'N':>4}{'pool state':>12}{'rollback state':>16}{'separate state':>16}"
          f"{'pool total':>12}{'separate total':>16}")
    for name in args.models.split(","):
        if name not in index:
            continue
        with Model(ZOO / index[name]["file"]) as model:
            for n in (1, 8, 16):
                pool = ctx_bytes(model, n_ctx=args.n_ctx, n_seq_max=n, n_rs_pool=n // 2 + 1, n_batch=512)
                rollback = ctx_bytes(model, n_ctx=args.n_ctx, n_seq_max=n, n_rs_seq=4, n_batch=512)
                one = ctx_bytes(model, n_ctx=max(256, args.n_ctx // n), n_seq_max=1, n_batch=512)
                separate = {k: v * n for k, v in one.items()}
                rows.append({"model": name, "n": n, "pool": pool, "rollback": rollback, "separate": separate})
                state = {k: (v["kv"] + v["rs"]) / MiB for k, v in (("pool", pool), ("rollback", rollback),
                                                                  ("separate", separate))}
                print(f"{name:<16}{n:>4}{state['pool']:>12.2f}{state['rollback']:>16.2f}{state['separate']:>16.2f}"
                      f"{pool['total'] / MiB:>12.2f}{separate['total'] / MiB:>16.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"n_ctx": args.n_ctx, "rows": rows}, indent=1) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {args.out.relative_to(ROOT)} (no matplotlib: no plot)")
        return 0
    fig, ax = plt.subplots(figsize=(7, 4))
    for layout, style in (("pool", "-o"), ("rollback", "--s"), ("separate", ":^")):
        for name in dict.fromkeys(r["model"] for r in rows):
            pts = [(r["n"], r[layout]["total"] / MiB) for r in rows if r["model"] == name]
            ax.plot(*zip(*pts), style, label=f"{name} {layout}")
    ax.set_xlabel("sequences")
    ax.set_ylabel("context memory (MiB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(f"wrote {args.out.relative_to(ROOT)} and {args.out.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
