"""The CUDA build on an NVIDIA GPU: parity with upstream, memory on the device, the Engine.

Skipped unless the libraries were built with CUDA (`CUDA=1 make build`, recorded in
build/config.json; for an installed wheel, tools/gpu_wheel_check.sh: its library
has a GPU device) and `nvidia-smi -L` lists a GPU: CI has neither.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from conftest import INSTALLED, ROOT, ZOO, run_with_build, zoo_index, zoo_path
from parity.test_parity import run_driver


GPU_DEVICES = """
import pyllama_ssm as ps
print(sum(ps.lib.ggml_backend_dev_type(ps.lib.ggml_backend_dev_get(i)) == ps.lib.GGML_BACKEND_DEVICE_TYPE_GPU
          for i in range(ps.lib.ggml_backend_dev_count())))
"""


def _gpu_build() -> bool:
    if INSTALLED:
        if int(run_with_build("patched", GPU_DEVICES).split()[-1]) == 0:
            return False
    else:
        config = ROOT / "build" / "config.json"
        if not config.exists() or not json.loads(config.read_text()).get("cuda"):
            return False
    if not shutil.which("nvidia-smi"):
        return False
    probe = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return probe.returncode == 0 and "GPU" in probe.stdout


pytestmark = pytest.mark.skipif(not _gpu_build(), reason="needs the CUDA build (CUDA=1 make build) and an NVIDIA GPU")


def test_patched_matches_upstream_on_gpu(tmp_path):
    """Every zoo model fully offloaded: the series changes nothing a GPU computes."""
    paths = [ZOO / m["file"] for k, m in sorted(zoo_index()["models"].items()) if k.endswith("-tiny")]
    upstream = run_driver("upstream", tmp_path / "u.npz", paths, PARITY_N_GPU_LAYERS="999")
    patched = run_driver("patched", tmp_path / "p.npz", paths, PARITY_N_GPU_LAYERS="999")
    assert upstream.keys() <= patched.keys()
    worst = 0.0
    for key, a in upstream.items():
        b = patched[key]
        if key.endswith("/tokens"):
            assert (a == b).all(), f"{key}: greedy continuations differ"
        else:
            assert np.isfinite(b).all(), key
            worst = max(worst, float(np.max(np.abs(a - b))))
            assert np.max(np.abs(a - b)) <= 1e-4, key
    print(f"max |logit diff| upstream vs patched on the GPU: {worst:.3g}")


CHUNKED = """
import sys, json, pyllama_ssm as ps
m = ps.Model(sys.argv[1])
toks = m.tokenize("chunked prefill " * 60)[:192]
with ps.Context(m, n_ctx=1024, n_seq_max=2, n_batch=64) as ctx:
    for i in range(0, len(toks), 64):  # chunks 2 and 3 continue the sequence: states updated in place
        logits = ctx.decode_tokens(toks[i:i + 64], seq_id=0, pos0=i)
print(json.dumps(logits.tolist()))
"""


def test_inplace_with_cuda_backend_present(tmp_path):
    """CPU-resident states in a CUDA build: in-place ops stay on the CPU (CUDA reports them unsupported).

    Decoding (the mixed run) is exact. Prompt chunks of 64 tokens let the scheduler offload
    large matmuls to the GPU, and on the copy path the delta-net scan with them, while in
    place it stays on the CPU with its state: the same arithmetic on two devices, which
    round differently (measured on an H200: at most 1.8e-3 on logits of spread ~10).
    """
    paths = [zoo_path(name) for name in ("qwen35", "jamba", "nemotron_h")]  # delta net, mamba1, mamba2 scans
    env = {"PARITY_SNAPSHOTS": "1", "PARITY_MIXED_ONLY": "1", "PARITY_SINGLE_ONLY": ""}
    inplace = run_driver("patched", tmp_path / "i.npz", paths, LLAMA_RS_INPLACE="1", **env)
    copied = run_driver("patched", tmp_path / "c.npz", paths, LLAMA_RS_INPLACE="0", **env)
    for key in inplace:
        assert np.max(np.abs(inplace[key] - copied[key])) <= 1e-6, key
    for name in ("qwen35", "nemotron_h"):
        on, off = (np.array(json.loads(run_with_build("patched", CHUNKED, str(zoo_path(name)),
                                                       env={"LLAMA_RS_INPLACE": flag}).splitlines()[-1]))
                   for flag in ("1", "0"))
        assert np.max(np.abs(on - off)) <= 1e-2 * max(1.0, float(np.max(np.abs(off)))), name


def test_memory_report_on_gpu():
    """Offloaded weights, KV and recurrent state are accounted to the CUDA buffer type."""
    code = """
import sys, json, pyllama_ssm as ps
m = ps.Model(sys.argv[1], n_gpu_layers=999)
with ps.Context(m, n_ctx=4096, n_seq_max=8) as ctx:
    r = ctx.memory_report()
    print(json.dumps({"rs": r.rs_bytes, "kv": r.kv_bytes,
                      "bufs": [[b.name, b.weights, b.memory, b.compute] for b in r.buffer_types]}))
"""
    report = json.loads(run_with_build("patched", code, str(zoo_path("qwen35"))).splitlines()[-1])
    cuda = [b for b in report["bufs"] if b[0].upper().startswith("CUDA") and "HOST" not in b[0].upper()]
    assert cuda, report
    assert sum(b[1] for b in cuda) > 0, "no weights on the GPU"
    assert sum(b[2] for b in cuda) >= report["rs"] + report["kv"], "KV and recurrent state not on the GPU"


def test_engine_on_gpu():
    """Four concurrent greedy requests on the GPU follow the same requests run one by one: equal, or parting
    only where the lone run's two best tokens are within rounding of each other.  GPU kernels sum in
    orders that depend on the batch (batch invariance covers the CPU backend only), and the zoo's random
    weights have near-ties; a wrong state would part at a clear winner."""
    code = """
import sys, json
import pyllama_ssm as ps
from pyllama_ssm.engine import Engine
from pyllama_ssm.sampling import SamplingParams
m = ps.Model(sys.argv[1], n_gpu_layers=999)
prompts = [f"Request {i} asks about the sea" for i in range(4)]
g = SamplingParams(temperature=0)
with Engine(m, n_ctx=2048, parallel=4, prefix_cache=0) as e:
    together = [r.result().tokens for r in [e.submit(p, g, max_tokens=24) for p in prompts]]
    alone = [e.generate(p, g, max_tokens=24, logprobs=2) for p in prompts]
print(json.dumps([together, [[c.tokens, [sorted(t.values(), reverse=True) for t in c.top_logprobs]] for c in alone]]))
"""
    together, alone = json.loads(run_with_build("patched", code, str(zoo_path("qwen35"))).splitlines()[-1])
    for got, (want, tops) in zip(together, alone):
        assert len(got) == len(want) == 24
        k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if k is not None:
            gap = tops[k][0] - tops[k][1]
            assert gap < 0.02, f"parted at token {k} where the lone run's best token led by {gap:.3g}"


SPECULATIVE = """
import sys, json
import pyllama_ssm as ps  # before numpy: see the README's GPU section
import numpy as np
from pyllama_ssm.sampling import SamplingParams
path, n_parallel = sys.argv[1], int(sys.argv[2])
prompts = ["Once upon a time there", "The weather today is", "def main():"]

def llama(draft=None):
    return ps.Llama(path, n_ctx=512, n_gpu_layers=999, n_parallel=n_parallel, draft_model=draft, verbose=False)

def greedy(llm, ids, logprobs=None):
    if llm.engine is None:
        out = []
        for p in ids:
            out.append([])
            for t in llm.generate(p, temp=0.0, top_k=1):
                out[-1].append(t)
                if len(out[-1]) == 20:
                    break
        return out, None
    reqs = [llm.engine.submit(p, SamplingParams(temperature=0.0), max_tokens=20, logprobs=logprobs) for p in ids]
    done = [r.result(timeout=120) for r in reqs]
    tops = [[sorted(t.values(), reverse=True) for t in c.top_logprobs] for c in done] if logprobs else None
    return [c.tokens for c in done], tops

plain = llama()
ids = [plain.tokenize(p.encode()) for p in prompts]
reference, tops = greedy(plain, ids, logprobs=2 if plain.engine else None)
plain.close()
calls = [0]
def oracle(seen):  # the reference continuation, 4 tokens, the third one wrong
    calls[0] += 1
    seen = seen.tolist()
    for p, ref in zip(ids, reference):
        if seen[:len(p)] == p:
            out = ref[len(seen) - len(p):len(seen) - len(p) + 4]
            if len(out) > 2:
                out[2] = (out[2] + 1) % 100
            return np.array(out, dtype=np.intc)
    return np.array([], dtype=np.intc)
drafted = llama(oracle)
got, _ = greedy(drafted, ids)
stats = drafted.engine.stats() if drafted.engine else None
drafted.close()
print(json.dumps({"reference": reference, "tops": tops, "got": got, "calls": calls[0],
                  "drafted": stats and [stats.draft_tokens, stats.draft_accepted]}))
"""


@pytest.mark.parametrize("n_parallel", [1, 3])
@pytest.mark.parametrize("name", ["qwen35", "nemotron_h", "llama"])
def test_speculative_on_gpu(name, n_parallel):
    """Drafts verified and undone fully offloaded: rejected tokens' recurrent states go back to a pool
    snapshot on the device, attention cells are removed.  Greedy output with the oracle draft follows
    the plain run, parting (Engine only: the verification batch sums in another order on the GPU) only
    where the plain run's two best tokens are within rounding."""
    out = json.loads(run_with_build("patched", SPECULATIVE, str(zoo_path(name)), str(n_parallel)).splitlines()[-1])
    assert out["calls"] >= 3, out
    if out["drafted"]:
        assert 0 < out["drafted"][1] < out["drafted"][0], out["drafted"]  # some accepted, some undone
    for i, (got, want) in enumerate(zip(out["got"], out["reference"])):
        assert len(got) == len(want) == 20
        k = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if k is not None:
            assert out["tops"], f"prompt {i}: parted at token {k} with n_parallel=1"
            gap = out["tops"][i][k][0] - out["tops"][i][k][1]
            assert gap < 0.02, f"prompt {i}: parted at token {k} where the plain run's best led by {gap:.3g}"
