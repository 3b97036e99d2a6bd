"""lm-eval through the server: a multiple-choice task's loglikelihoods at n_parallel 1 and 4, against
the library's own logits.

    python bench/lm_eval_check.py [--items 32] [--concurrent 4] [--threads 2]

lm-eval's `local-completions` model asks /v1/completions for `echo=true, logprobs=1, max_tokens=1` on
the token ids of context + continuation, and sums `token_logprobs[ctxlen:-1]`: that is right only if
token i is scored by the logits at position i-1, index 0 is the first token's (absent) score, and one
entry follows the prompt's even when the model's next token is end-of-generation (listed, no text), as
our server answers (README, "Drop-in llama-cpp-python").  The task is bench/lm_eval_task/ (32 short
questions, four choices each, a local JSONL file).  Setups (one server each, SmolLM2-135M-Instruct Q4_1):
- p1:           --n_parallel 1 (no flash attention: llama_cpp.server's default), lm-eval num_concurrent 1
- p1-fa:        --n_parallel 1 --flash_attn true, num_concurrent 1: the same kernels as the ones below
- p4:           --n_parallel 4 --batch_invariant false (flash attention: auto, on; llama.cpp's fastest kernel
                per shape), num_concurrent 4 (the requests overlap: the peak of requests in flight is
                reported, with the Engine's prefix-cache hits)
- p4-invariant: --n_parallel 4 --batch_invariant true --flash_attn true (the default kernels)

Checks: (a) every request's loglikelihood equal across setups (max |difference| vs p1 and p1-fa); (b) each equal to
the direct computation within 1e-3: lm-eval's own split of the pair (its `_encode_pair`: trailing spaces of
the context move to the continuation, tokens(context + continuation) is cut after len(tokens(context)),
no BOS), then the sum over the continuation tokens of log softmax(logits at the position before)[token],
from one decode of the whole sequence with the library (a fresh context, flash attention on or off as the
server had it: on SmolLM2 the two kernels differ by up to 0.25 on one loglikelihood); (c) accuracy.

No tokenizer hub here: lm-eval's loglikelihood needs a tokenizer to find ctxlen (tokenizer_backend=None
refuses), and its `remote` backend asks vLLM's /tokenize and /tokenizer_info, which llama_cpp.server (so
ours) does not offer.  So `local-completions` gets, in place of that remote tokenizer, the served GGUF's
own vocabulary loaded in this process: the requests are token ids, as with a HuggingFace tokenizer.

Prints a table, writes bench/results/lm_eval_check.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import ZOO, BenchError, Server, run_main, write_results  # noqa: E402
from pyllama_ssm import Batch, Context, Model  # noqa: E402

MODEL = ZOO / "smollm2-135m-instruct-q4_1.gguf"
TASK = ROOT / "bench" / "lm_eval_task" / "tiny_qa.yaml"
TOL = 1e-3
INVARIANT = ("--batch_invariant", "true", "--flash_attn", "true")
FA = ("--flash_attn", "true")
FAST = ("--batch_invariant", "false")


def setups(n: int) -> dict[str, tuple[int, tuple[str, ...], int, bool]]:
    """name: (n_parallel, server options, lm-eval num_concurrent, flash attention); the lone ones first.
    Without --flash_attn the server has it off at n_parallel 1 and on ("auto") above."""
    return {"p1": (1, (), 1, False), "p1-fa": (1, FA, 1, True), f"p{n}": (n, FAST, n, True),
            f"p{n}-invariant": (n, INVARIANT, n, True)}


class LibraryTokenizer:
    """What lm-eval's RemoteTokenizer offers (encode, batch_decode, eos/bos), from the GGUF's vocabulary;
    encode as vLLM's /tokenize with add_special_tokens=false: no BOS, special tokens parsed."""

    def __init__(self, model: Model):
        self.model = model
        self.eos_token_id, self.bos_token_id = model.token_eos, model.token_bos
        self.eos_token = model.detokenize([model.token_eos], special=True).decode("utf-8", "replace")

    def encode(self, text: str | list[str]) -> list[int] | list[list[int]]:
        if isinstance(text, str):
            return self.model.tokenize(text, add_special=False, parse_special=True)
        return [self.encode(t) for t in text]

    def batch_decode(self, tokens: list[list[int]]) -> list[str]:
        return [self.model.detokenize(t).decode("utf-8", "replace") for t in tokens]


def lm_eval_model(model: Model, url: str, concurrent: int):
    """lm-eval's local-completions on url, tokenizing with the library (see the module docstring)."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    # max_retries=1: a refused request stops the run instead of being retried into a timeout
    lm = LocalCompletionsAPI(base_url=f"{url}/v1/completions", model=MODEL.stem, tokenizer_backend=None,
                             num_concurrent=concurrent, max_retries=1, max_length=2048, timeout=600)
    lm.tokenizer, lm.tokenizer_backend, lm.tokenized_requests = LibraryTokenizer(model), "remote", True
    return lm


def task_config(items: int) -> dict:
    config = yaml.safe_load(TASK.read_text())
    files = config["dataset_kwargs"]["data_files"]
    files["test"] = str(ROOT / files["test"])  # the YAML's path is relative to the repository root
    config["metadata"]["items"] = items
    return config


class PeakInFlight:
    """The most requests the server had in flight at once, polled from /extras/stats."""

    def __init__(self, url: str):
        self.url, self.peak, self._stop = url, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        with httpx.Client(timeout=5) as c:
            while not self._stop.wait(0.01):
                try:
                    models = c.get(f"{self.url}/extras/stats").json()["models"]
                except httpx.HTTPError:  # a busy moment: the next poll counts
                    continue
                self.peak = max(self.peak, *(m["in_flight"] for m in models.values()))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return httpx.get(f"{self.url}/extras/stats", timeout=5).json()


def run_lm_eval(model: Model, url: str, concurrent: int, items: int) -> dict:
    """One lm-eval run of the task: accuracy, and per request (document, choice) the pair and its result."""
    from lm_eval import simple_evaluate

    lm = lm_eval_model(model, url, concurrent)
    watch = PeakInFlight(url)
    t0 = time.perf_counter()
    try:
        out = simple_evaluate(model=lm, tasks=[task_config(items)], limit=items, bootstrap_iters=0,
                              log_samples=True, verbosity="ERROR")
    except Exception as e:  # lm-eval raises what the server answered (a refusal, a shape it cannot parse)
        raise BenchError(f"lm-eval failed on {url}: {type(e).__name__}: {e}") from e
    finally:
        stats = watch.stop()
    seconds = time.perf_counter() - t0
    name = task_config(items)["task"]
    requests = []
    for sample in out["samples"][name]:
        for choice, (args, (ll, greedy)) in enumerate(zip(sample["arguments"], sample["filtered_resps"])):
            context, continuation = (args["arg_0"], args["arg_1"]) if isinstance(args, dict) else args
            requests.append({"doc": sample["doc_id"], "choice": choice, "context": context,
                             "continuation": continuation, "loglikelihood": float(ll), "is_greedy": bool(greedy)})
    engine = next(iter(stats["models"].values()))["engine"] or {}
    return {"acc": out["results"][name]["acc,none"], "acc_norm": out["results"][name]["acc_norm,none"],
            "seconds": seconds, "peak_in_flight": watch.peak, "prefix_hits": engine.get("prefix_hits"),
            "requests": sorted(requests, key=lambda r: (r["doc"], r["choice"])), "lm": lm}


def direct_loglikelihood(model: Model, context: list[int], continuation: list[int], flash_attn: bool) -> float:
    """sum over the continuation of log P(token | every token before it), from one decode of the whole."""
    tokens = context + continuation
    with Context(model, n_ctx=512, flash_attn=flash_attn) as ctx, Batch(len(tokens), 1) as batch:
        batch.add_sequence(tokens, 0, 0, logits_last=False)
        for i in range(len(tokens)):
            batch.raw.logits[i] = True
        ctx.decode(batch)
        total = 0.0
        for i in range(len(context), len(tokens)):
            row = ctx.logits(i - 1).astype(np.float64)
            total += row[tokens[i]] - (row.max() + np.log(np.exp(row - row.max()).sum()))
    return float(total)


def max_diff(a: list[float], b: list[float]) -> float:
    return float(np.max(np.abs(np.subtract(a, b))))


def check(items: int, runs_of: dict[str, tuple], threads: int) -> dict:
    """Run every setup, then compare: the figures main() and tests/test_lm_eval.py report."""
    if not MODEL.exists():
        raise BenchError(f"{MODEL} is missing: run `make models` (tests/models/real.py)")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task is a local file: never wait on the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's progress bars
    runs = {}
    with Model(MODEL) as model:
        for name, (parallel, options, concurrent, _) in runs_of.items():
            with Server("pyllama-ssm", MODEL, n_ctx=2048, parallel=parallel, threads=threads,
                        extra=options) as server:
                runs[name] = run_lm_eval(model, server.url, concurrent, items)
                runs[name].update(n_parallel=parallel, options=" ".join(options), concurrent=concurrent)
        first = next(iter(runs.values()))
        pairs = [first["lm"]._encode_pair(r["context"], r["continuation"]) for r in first["requests"]]
        direct = {fa: [direct_loglikelihood(model, c, x, fa) for c, x in pairs]
                  for fa in sorted({flash for *_, flash in runs_of.values()})}
    values = {name: [r["loglikelihood"] for r in run["requests"]] for name, run in runs.items()}
    lone = [name for name, run in runs.items() if run["n_parallel"] == 1]
    rows = []
    for name, run in runs.items():
        if [(r["doc"], r["choice"], r["continuation"]) for r in run["requests"]] != \
                [(r["doc"], r["choice"], r["continuation"]) for r in first["requests"]]:
            raise BenchError(f"{name}: lm-eval's requests differ from the first setup's")
        rows.append({"setup": name, "n_parallel": run["n_parallel"], "options": run["options"],
                     "concurrent": run["concurrent"], "requests": len(values[name]), "seconds": run["seconds"],
                     "peak_in_flight": run["peak_in_flight"], "prefix_hits": run["prefix_hits"],
                     "acc": run["acc"], "acc_norm": run["acc_norm"],
                     "max_diff": {other: max_diff(values[name], values[other]) for other in lone},
                     "flash_attn": runs_of[name][3],
                     "max_diff_vs_direct": max_diff(values[name], direct[runs_of[name][3]]),
                     "is_greedy_as_first": [r["is_greedy"] for r in run["requests"]]
                     == [r["is_greedy"] for r in first["requests"]]})
    per_request = [{"doc": r["doc"], "choice": r["choice"], "continuation": r["continuation"], "tokens": c + x,
                    "ctxlen": len(c), **{f"direct_{'fa' if fa else 'no_fa'}": d[i] for fa, d in direct.items()},
                    **{name: run["requests"][i]["loglikelihood"] for name, run in runs.items()}}
                   for i, (r, (c, x)) in enumerate(zip(first["requests"], pairs))]
    return {"model": MODEL.name, "task": TASK.stem, "items": items, "tolerance": TOL, "rows": rows,
            "requests": per_request}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=32, help="questions of the task to run (at most 32)")
    ap.add_argument("--concurrent", type=int, default=4, help="lm-eval num_concurrent and n_parallel of p4")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise BenchError("lm-eval is not installed: pip install -e .[eval]") from None
    data = check(args.items, setups(args.concurrent), args.threads)
    md = [f"lm-eval `local-completions` through the server, {data['model']}, task {data['task']} "
          f"({data['items']} questions, {data['rows'][0]['requests']} loglikelihood requests)", "",
          "| setup | n_parallel | server options | num_concurrent | peak in flight | prefix hits | seconds | "
          "max diff vs p1 | max diff vs p1-fa | max diff vs direct (same flash attention) | acc | acc_norm |",
          "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['setup']} | {r['n_parallel']} | {r['options'] or '-'} | {r['concurrent']} | {r['peak_in_flight']} | "
           f"{r['prefix_hits'] if r['prefix_hits'] is not None else '-'} | {r['seconds']:.1f} | "
           f"{r['max_diff']['p1']:.2g} | {r['max_diff']['p1-fa']:.2g} | {r['max_diff_vs_direct']:.2g} | "
           f"{r['acc']:.3f} | {r['acc_norm']:.3f} |" for r in data["rows"]]
    drift = [r for r in data["rows"] if r["n_parallel"] > 1 and "--batch_invariant false" in r["options"]]
    md += ["", f"Lone and batch-invariant setups must equal the direct computation within {TOL}; "
               + "".join(f"{r['setup']} (batch_invariant off) may drift with what runs beside each request: "
                         f"{sum(abs(q[r['setup']] - q['direct_fa']) > TOL for q in data['requests'])} of "
                         f"{r['requests']} requests off by more than {TOL}. " for r in drift)
           + "Flash attention on vs off (direct computations) differs by up to "
           f"{max(abs(q['direct_fa'] - q['direct_no_fa']) for q in data['requests']):.2g}."]
    write_results("lm_eval_check", data, "\n".join(md) + "\n")
    bad = [r["setup"] for r in data["rows"] if r["max_diff_vs_direct"] > TOL and r not in drift]
    if bad:
        print(f"off the direct computation by more than {TOL}: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    run_main(main)
