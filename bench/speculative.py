"""Speculative decoding with prompt lookup (draft_model=LlamaPromptLookupDecoding) on a task whose
output repeats its input: rewriting a given text.

    python bench/speculative.py [--models smollm2,qwen35-small] [--clients 1,8] [--rounds 2] [--n-gen 128]

Setups (one Engine each on the same loaded model, batch-invariant kernels, same requests, rounds
interleaved; compare the ratios, these machines are shared): plain, and lookup (LlamaPromptLookupDecoding, num_pred_tokens 10,
llama_cpp.server's default).  Workload per client: its own ~150-token paragraph to copy, greedy,
n-gen tokens, all clients at once.  Reported: generated tokens/s, speedup over plain, draft tokens
accepted / proposed, and whether every answer equals the plain one (it must: greedy).  On the
random-weight hybrids the text is not a copy, so few drafts are proposed or accepted: those rows
show what verification and rollback cost, not a speedup.

Prints a table, writes bench/results/speculative.{json,md,png}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import run_main, timed_requests, write_results, zoo_model  # noqa: E402
from bench.plot import lines  # noqa: E402
from pyllama_ssm import Model  # noqa: E402
from pyllama_ssm.engine import Engine  # noqa: E402
from pyllama_ssm.llama_speculative import LlamaPromptLookupDecoding  # noqa: E402
from pyllama_ssm.sampling import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0)
SUBJECTS = ["the harbour", "the old mill", "the library", "the mountain pass", "the orchard", "the market square",
            "the lighthouse", "the river crossing"]


def prompts(n: int) -> list[str]:
    out = []
    for i in range(n):
        subject = SUBJECTS[i % len(SUBJECTS)]
        text = (f"In the morning {subject} was quiet. People came slowly, one by one, and each of them stopped "
                f"to look at {subject} as if seeing it for the first time. By noon {subject} was full of voices, "
                f"carts and children, and the smell of bread drifted over everything. In the evening the light "
                f"turned gold, the crowd thinned, and {subject} was quiet again until the next day.")
        out.append(f"<|im_start|>user\nRewrite the following text exactly as it is, word for word:\n\n{text}"
                   f"<|im_end|>\n<|im_start|>assistant\n")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,qwen35-small")
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n-gen", type=int, default=128)
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    rows = []
    for name in args.models.split(","):
        with Model(zoo_model(name)) as model:
            setups = {"plain": None, "lookup": LlamaPromptLookupDecoding(num_pred_tokens=10)}
            # batch-invariant kernels on both: a verification batch then computes what single steps do,
            # so every answer must be the plain one's (with llama.cpp's default kernels they drift, as
            # they do with concurrency: bench/batch_invariance.py)
            engines = {s: Engine(model, n_ctx=max(levels) * 512, parallel=max(levels), draft_model=d,
                                 flash_attn=True, batch_invariant=True) for s, d in setups.items()}
            try:
                for n in levels:
                    batch = prompts(n)
                    times: dict[str, list[float]] = {s: [] for s in setups}
                    texts: dict[str, list[str]] = {}
                    generated = 0
                    before = {s: e.stats() for s, e in engines.items()}
                    for _ in range(args.rounds):
                        for s, e in engines.items():
                            seconds, done = timed_requests(e, batch, args.n_gen, GREEDY)
                            times[s].append(seconds)
                            texts[s] = [c.text for c in done]
                            generated = sum(len(c.tokens) for c in done)
                    base = statistics.median(times["plain"])
                    for s, e in engines.items():
                        st = e.stats()
                        drafted = st.draft_tokens - before[s].draft_tokens
                        accepted = st.draft_accepted - before[s].draft_accepted
                        t = statistics.median(times[s])
                        rows.append({"model": name, "clients": n, "setup": s, "seconds": t,
                                     "gen_tok_per_s": generated / t, "speedup": base / t, "drafted": drafted,
                                     "accepted": accepted, "acceptance": accepted / drafted if drafted else 0.0,
                                     "same_text": texts[s] == texts["plain"]})
            finally:
                for e in engines.values():
                    e.close()
    md = ["| model | clients | setup | generated tok/s | speedup vs plain | drafts accepted / proposed | "
          "same text as plain |", "|---|---:|---|---:|---:|---:|---|"]
    md += [f"| {r['model']} | {r['clients']} | {r['setup']} | {r['gen_tok_per_s']:.1f} | {r['speedup']:.2f}x | "
           f"{r['accepted']} / {r['drafted']} ({r['acceptance']:.0%}) | {'yes' if r['same_text'] else 'NO'} |"
           for r in rows]
    write_results("speculative", {"rounds": args.rounds, "n_gen": args.n_gen, "rows": rows}, "\n".join(md) + "\n")
    lines("speculative", rows, series="setup", x="clients", y=lambda r: r["gen_tok_per_s"],
          title="prompt-lookup speculative decoding", xlabel="concurrent sequences", ylabel="generated tokens/s")
    return 0 if all(r["same_text"] for r in rows) else 1


if __name__ == "__main__":
    run_main(main)
