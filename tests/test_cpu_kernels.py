"""The CPU kernels users' machines pick: ggml's AMX path (patch 0008) and the quantized formats.

On Sapphire Rapids class CPUs (amx_int8), ggml moves Q4_0, Q4_1, Q8_0 and K-quant weights into an
AMX buffer: prompts (several rows) run on AMX tiles, single-row steps on its AVX512-VNNI gemv.
Upstream's tile path dies with SIGILL there; patch 0008 fixes it.  Each run below is a child process,
so a fault fails one test with its exit status instead of ending the session.  Where the CPU has no
AMX the same comparisons run (extra buffer types: the repacked kernels), and the test says which.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import ROOT, cpu_flags, run_with_build

AMX = {"amx_tile", "amx_int8"} <= cpu_flags()
SMOLLM2 = ROOT / "build" / "models" / "smollm2-135m-instruct-q4_1.gguf"
PROMPT = "The capital of France is a city on the Seine. Its most famous tower is called"

# Loads the model with or without ggml's extra buffer types (AMX, repacked weights), decodes a
# prompt (many rows: AMX tiles / repacked gemm) then 8 greedy tokens one at a time (gemv), and
# prints the tokens, every step's logits and the weight buffers llama.cpp reported.
RUN = """
import json, logging, sys
records = []
class Keep(logging.Handler):
    def emit(self, r): records.append(r.getMessage())
logging.getLogger("pyllama_ssm.llama").addHandler(Keep()); logging.getLogger("pyllama_ssm.llama").setLevel(logging.DEBUG)
import pyllama_ssm as ps
path, extra, prompt = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
with ps.Model(path, overrides={"use_extra_bufts": extra}) as m, ps.Context(m, n_ctx=512, n_batch=512) as ctx:
    toks = m.tokenize(prompt)
    logits = ctx.decode_tokens(toks, seq_id=0)
    out, rows = [], []
    for i in range(8):
        t = int(logits.argmax())
        out.append(t)
        rows.append([float(x) for x in logits])
        logits = ctx.decode_tokens([t], seq_id=0, pos0=len(toks) + i)
bufs = sorted({r.split(" model buffer size")[0].split(":")[-1].strip() for r in records if "model buffer size" in r})
print(json.dumps({"tokens": out, "logits": rows, "buffers": bufs}))
"""


def run(path, extra: bool) -> dict:
    return json.loads(run_with_build("patched", RUN, str(path), "1" if extra else "0", PROMPT).splitlines()[-1])


def quantized_models() -> list:
    """SmolLM2 as shipped (Q4_1) and in the formats users download, where `make models` made them."""
    models = [SMOLLM2]
    try:
        import graft
        models += [p for fmt in ("q4_0", "q8_0", "q4_k_m") if (p := graft.smollm2_path(fmt)).exists()]
    except (ImportError, AttributeError):
        pass
    return models


@pytest.mark.parametrize("path", quantized_models(), ids=lambda p: p.name)
def test_fast_cpu_kernels_give_the_reference_tokens(path, capsys):
    """AMX (or repacked) kernels run without a fault and give the greedy tokens of ggml's plain kernels."""
    if not path.exists():
        pytest.skip(f"{path.name} missing: run `make models`")
    fast, plain = run(path, True), run(path, False)
    with capsys.disabled():
        print(f"\n  {path.name}: weight buffers {fast['buffers']} (AMX on this CPU: {AMX}) vs {plain['buffers']}")
    if AMX and "q4_1" in path.name:
        assert "AMX" in fast["buffers"], f"expected ggml's AMX buffer on an amx_int8 CPU, got {fast['buffers']}"
    assert fast["tokens"] == plain["tokens"]
    # Two correct kernels, not one: AMX quantizes the activations and sums the blocks its own way.
    # SmolLM2 Q4_1 on a Xeon with AMX: chosen tokens' logprobs within 0.065 of the plain kernels',
    # the whole vocabulary's logits within 1.08 (its tail, at -25).  A faulty tile configuration or
    # kernel gives other tokens or logits off by tens.
    worst_lp = max(abs(logprob(ra, t) - logprob(rb, t)) for ra, rb, t in zip(fast["logits"], plain["logits"], fast["tokens"]))
    worst = max(abs(a - b) for ra, rb in zip(fast["logits"], plain["logits"]) for a, b in zip(ra, rb))
    assert worst_lp < 0.15 and worst < 2.0, f"fast vs plain kernels: logprob {worst_lp:.3g}, logits {worst:.3g} apart"


def logprob(logits: list[float], token: int) -> float:
    top = max(logits)
    return logits[token] - top - math.log(sum(math.exp(x - top) for x in logits))
