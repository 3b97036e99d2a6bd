"""Where the Engine's time went, from a PYLLAMA_SSM_TRACE file (pyllama_ssm/engine/trace.py).

    PYLLAMA_SSM_TRACE=/tmp/engine.jsonl python bench/chat_sessions.py --servers pyllama-ssm ...
    python bench/trace_summary.py /tmp/engine.jsonl [--timeline FROM TO]

Prints, per request (numbered by Engine run and id): queued (submit to start in a sequence), prefix-cache hit, time to first token,
and the prefill steps it took; then the steps by kind (decode only, with a prompt chunk, how many
prompts per step) with their llama_decode time per token; --timeline prints every event between
two times (seconds from the first event), decode-only steps folded.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--timeline", nargs=2, type=float, metavar=("FROM", "TO"))
    args = ap.parse_args()
    events = [json.loads(line) for line in open(args.trace)]
    if not events:
        print("empty trace")
        return 1
    t0 = events[0]["t"]
    # a request is (the Engine's run, its id): ids restart in each process, whose events follow an "open"
    reqs: dict[tuple[int, int], dict] = defaultdict(dict)
    chunks: dict[tuple[int, int], int] = defaultdict(int)
    steps, run = [], 0
    for e in events:
        run += e["ev"] == "open"
        if "req" in e:
            reqs[run, e["req"]][e["ev"]] = e
        if e["ev"] == "step":
            steps.append(e)
            for req, _, _ in e["prefill"]:
                chunks[run, req] += 1
    print(f"{'run':>3} {'req':>4} {'arrived':>8} {'prompt':>6} {'cached':>6} {'queued':>7} {'ttft':>6} {'chunks':>6}")
    ttft = []
    for (run, r), d in sorted(reqs.items()):
        if "submit" not in d:
            continue
        sub = d["submit"]["t"]
        start, first = d.get("start", {}), d.get("first", {}).get("t")
        if first is not None:
            ttft.append(first - sub)
        print(f"{run:>3} {r:>4} {sub - t0:8.2f} {d['submit']['prompt']:>6} {start.get('cached', '-'):>6} "
              f"{start.get('t', sub) - sub:7.2f} {(first - sub) if first else float('nan'):6.2f} {chunks[run, r]:>6}")
    kinds: dict[str, list] = defaultdict(list)
    for s in steps:
        kinds["decode only" if not s["prefill"] else f"{len(s['prefill'])} prompt(s)"].append(s)
    span = events[-1]["t"] - t0
    busy = sum(s["decode_s"] for s in steps)
    print(f"\n{len(steps)} steps over {span:.1f} s, llama_decode {busy:.1f} s ({busy / span:.0%}); "
          f"TTFT p50 {statistics.median(ttft):.2f} s" if ttft else "")
    print(f"{'steps':<14} {'n':>5} {'decode s':>9} {'tokens/step':>11} {'ms/token':>9}")
    for kind, group in sorted(kinds.items()):
        secs, toks = sum(s["decode_s"] for s in group), sum(s["n"] for s in group)
        print(f"{kind:<14} {len(group):>5} {secs:9.2f} {toks / len(group):11.1f} {1000 * secs / toks:9.2f}")
    if args.timeline:
        lo, hi = args.timeline
        for e in events:
            t = e.get("t0", e["t"]) - t0
            if not lo <= t <= hi or (e["ev"] == "step" and not e["prefill"]):
                continue
            rest = {k: v for k, v in e.items() if k not in ("ev", "t", "t0")}
            print(f"{t:8.2f} {e['ev']:<6} {rest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
