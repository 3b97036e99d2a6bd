"""The CPU kernels users' machines pick: ggml's AMX path (patches 0008, 0010, 0011) and the quantized formats.

On Sapphire Rapids class CPUs (amx_int8), ggml moves Q4_0, Q4_1, Q8_0 and K-quant weights into an
AMX buffer: prompts (several rows) run on AMX tiles, single-row steps on its AVX512-VNNI gemv.
Upstream's tile path dies with SIGILL there; patch 0008 fixes it, in both builds (patches/pristine:
the parity reference must not crash either).  Each run below is a child process,
so a fault fails one test with its exit status instead of ending the session.  Where the CPU has no
AMX the same comparisons run (extra buffer types: the repacked kernels), and the test says which.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from conftest import AMX, ROOT, run_with_build

SMOLLM2 = ROOT / "build" / "models" / "smollm2-135m-instruct-q4_1.gguf"
PROMPT = "The capital of France is a city on the Seine. Its most famous tower is called"

# Loads the model with or without ggml's extra buffer types (AMX, repacked weights), decodes a
# prompt (many rows: AMX tiles / repacked gemm) then the 8 tokens of a fixed continuation one at a
# time (gemv), and prints each step's argmax and logits and the weight buffers llama.cpp reported.
RUN = """
import json, logging, sys
records = []
class Keep(logging.Handler):
    def emit(self, r): records.append(r.getMessage())
logging.getLogger("pyllama_ssm.llama").addHandler(Keep()); logging.getLogger("pyllama_ssm.llama").setLevel(logging.DEBUG)
import pyllama_ssm as ps
path, extra, prompt = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
# flash attention off: the matmul kernels alone (attention's own kernel: test_decode_attention_...)
with ps.Model(path, overrides={"use_extra_bufts": extra}) as m, \
        ps.Context(m, n_ctx=512, n_batch=512, flash_attn=False) as ctx:
    toks = m.tokenize(prompt)
    logits = ctx.decode_tokens(toks, seq_id=0)
    out, rows = [], []
    for i, t in enumerate(m.tokenize(" Paris, on the river Seine, is famous", add_special=False)[:8]):
        out.append(int(logits.argmax()))
        rows.append([float(x) for x in logits])
        logits = ctx.decode_tokens([t], seq_id=0, pos0=len(toks) + i)
sizes = {r.split(" model buffer size")[0].split(":")[-1].strip(): float(r.split("=")[-1].split()[0])
         for r in records if "model buffer size" in r}
print(json.dumps({"tokens": out, "logits": rows, "buffers": sorted(sizes), "buffer_mib": sizes}))
"""


def run(path, extra: bool, build: str = "patched") -> dict:
    return json.loads(run_with_build(build, RUN, str(path), "1" if extra else "0", PROMPT).splitlines()[-1])


def quantized_models() -> list[tuple]:
    """(quantized file, its f16 original): SmolLM2 as shipped (Q4_1) and in the formats users download, a
    real-text hybrid, and a recurrent and a hybrid zoo family (tests/models/graft.py, `make models`)."""
    import graft
    smollm2_f16 = graft.graft_path("smollm2", "f16")
    return [(SMOLLM2, smollm2_f16)] + [(graft.graft_path("smollm2", f), smollm2_f16) for f in ("q4_0", "q8_0", "q4_k_m")] \
        + [(graft.graft_path("falcon-h1", "q4_k_m"), graft.graft_path("falcon-h1", "f16"))] \
        + [(graft.graft_path(z, f), ROOT / "build" / "models" / f"{z}.gguf")
           for z in graft.ZOO_QUANTIZED for f in graft.ZOO_FORMATS]


def error(run_: dict, ref: dict) -> float:
    """Mean over the steps of the largest logprob error of the reference's 10 likeliest tokens."""
    worst = []
    for got, want in zip(run_["logits"], ref["logits"]):
        top = sorted(range(len(want)), key=want.__getitem__)[-10:]
        worst.append(max(abs(logprob(got, t) - logprob(want, t)) for t in top))
    return sum(worst) / len(worst)


def logprob(logits: list[float], token: int) -> float:
    top = max(logits)
    return logits[token] - top - math.log(sum(math.exp(x - top) for x in logits))


@pytest.mark.parametrize("path,original", quantized_models(), ids=lambda p: p.name)
def test_fast_cpu_kernels_are_as_accurate_as_the_plain_ones(path, original, capsys):
    """AMX (or repacked) kernels run without a fault and stay as close to the f16 original as ggml's
    plain kernels do.  They are other sums, not the same ones: on a Xeon with AMX, SmolLM2 Q8_0's logprobs
    are 0.30 (AMX) and 0.23 (plain) from f16's on average, Q4_0's 1.92 and 2.07, and either may pick
    another token on a near-tie; a faulty tile configuration or kernel is off by tens."""
    if not path.exists() or not original.exists():
        pytest.skip(f"{path.name} missing: run `make models`")
    fast, plain, ref = run(path, True), run(path, False), run(original, False)
    e_fast, e_plain = error(fast, ref), error(plain, ref)
    with capsys.disabled():
        print(f"\n  {path.name}: weight buffers {fast['buffers']} (AMX on this CPU: {AMX}) vs {plain['buffers']}; "
              f"logprob error vs f16: {e_fast:.3f} fast, {e_plain:.3f} plain")
    if AMX:
        assert "AMX" in fast["buffers"], f"expected ggml's AMX buffer on an amx_int8 CPU, got {fast['buffers']}"
    assert e_fast <= 1.25 * e_plain + 0.05, f"fast kernels {e_fast:.3f} from f16, plain ones {e_plain:.3f}"


@pytest.mark.skipif(not AMX, reason="ggml's AMX buffer needs a CPU with AMX (amx_int8)")
def test_q5_0_weights_run_on_amx():
    """Patch 0010: a Q4_K_M model's Q5_0 tensors (SmolLM2's 576-wide projections, whose rows K-quants
    cannot hold) go to ggml's AMX buffer, packed as Q8_0 (34 bytes per 32 weights), with the rest of
    its products; before, only its Q4_K/Q6_K/Q8_0 tensors did and the Q5_0 ones ran ggml's per-row
    vec_dot.  Their results: test_fast_cpu_kernels_are_as_accurate_as_the_plain_ones."""
    import graft
    from pyllama_ssm import gguf
    path = graft.graft_path("smollm2", "q4_k_m")
    if not path.exists():
        pytest.skip(f"{path.name} missing: run `make models`")
    q5_0 = sum(t.nbytes for t in gguf.read(path, check_data=False).tensors if t.type.name == "q5_0")
    assert q5_0 > 0, f"{path.name}: no Q5_0 tensor to place"
    amx = run(path, True)["buffer_mib"].get("AMX", 0.0) * (1 << 20)
    assert amx >= q5_0 * 34 / 22, f"AMX buffer {amx / (1 << 20):.1f} MiB, the Q5_0 weights as Q8_0 alone " \
        f"{q5_0 * 34 / 22 / (1 << 20):.1f} MiB"


@pytest.mark.skipif(not AMX, reason="ggml's AMX buffer needs a CPU with AMX (amx_int8)")
@pytest.mark.parametrize("fmt", ["q4_k_m", "q8_0"])
def test_weights_of_any_width_run_on_amx(fmt):
    """Patch 0011: every quantized projection goes to ggml's AMX buffer, whatever its out_features.  A
    Mamba2 in_proj has 2 * d_inner + 2 * n_groups * d_state + n_heads rows (the falcon-h1 graft's 2,450),
    not a multiple of the kernels' 32-column block: it used to stay in the CPU buffer and run
    llamafile's AVX sgemm, a quarter of the graft's weights and of its prompt time.  Packed padded with
    zero blocks, its products are test_fast_cpu_kernels_are_as_accurate_as_the_plain_ones'."""
    import graft
    from pyllama_ssm import gguf
    path = graft.graft_path("falcon-h1", fmt)
    if not path.exists():
        pytest.skip(f"{path.name} missing: run `make models`")
    # every matrix but the token embedding (its rows are looked up, so it stays in the CPU buffer)
    weights = [t for t in gguf.read(path, check_data=False).tensors
               if t.type.name in ("q5_0", "q8_0", "q4_k", "q6_k") and t.name != "token_embd.weight"]
    narrow = [t for t in weights if t.shape[1] % 32]
    assert narrow, f"{path.name}: no projection whose out_features are not a multiple of 32"
    as_packed = sum(t.nbytes * (34 / 22 if t.type.name == "q5_0" else 1) * (-(-t.shape[1] // 32) * 32) / t.shape[1]
                    for t in weights)
    amx = run(path, True)["buffer_mib"].get("AMX", 0.0) * (1 << 20)
    assert amx >= 0.99 * as_packed, f"AMX buffer {amx / (1 << 20):.1f} MiB, the model's projections as packed " \
        f"{as_packed / (1 << 20):.1f} MiB ({len(narrow)} of out_features not a multiple of 32)"


# Loads a model (mmap on, llama.cpp's extra buffer types on: its defaults) and prints how much of the
# file became resident and the weight buffers llama.cpp reported.
RESIDENT = """
import json, logging, sys
records = []
class Keep(logging.Handler):
    def emit(self, r): records.append(r.getMessage())
logging.getLogger("pyllama_ssm.llama").addHandler(Keep()); logging.getLogger("pyllama_ssm.llama").setLevel(logging.DEBUG)
import pyllama_ssm as ps
def rss_file():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssFile")) / 1024
before = rss_file()
mlock = sys.argv[2] == "1"  # as the server's --use_mlock default (stock's): the mapping locked in RAM
with ps.Model(sys.argv[1], overrides={"load_mode": 3} if mlock else None) as m:  # LLAMA_LOAD_MODE_MMAP_MLOCK
    after = rss_file()
sizes = {r.split(" model buffer size")[0].split(":")[-1].strip(): float(r.split("=")[-1].split()[0])
         for r in records if "model buffer size" in r}
print(json.dumps({"resident_mib": after - before, "buffer_mib": sizes}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssFile and MADV_DONTNEED are Linux's")
@pytest.mark.parametrize("mlock", [False, True], ids=["mmap", "mmap+mlock"])
@pytest.mark.parametrize("arch,fmt", [("smollm2", "q4_0"), ("falcon-h1", "q4_k_m")])
def test_weights_copied_out_of_the_mapping_are_not_resident_twice(arch, fmt, mlock):
    """Patch 0012: a weight that llama.cpp copies from the file mapping into another buffer (AMX's, or a
    repacked layout on AVX2) leaves the mapping's resident pages, right after its copy, or with the
    mapping locked (--mlock, the server's default as stock's) once loading ends.  Upstream keeps them
    mapped and resident, so every such weight counted twice in RSS (jamba-small: 279 MiB of the file
    resident beside its 225 MiB AMX buffer; 55 now)."""
    import graft
    path = graft.graft_path(arch, fmt)
    if not path.exists():
        pytest.skip(f"{path.name} missing: run `make models`")
    got = json.loads(run_with_build("patched", RESIDENT, str(path), "1" if mlock else "0").splitlines()[-1])
    mapped = got["buffer_mib"].get("CPU_Mapped", 0.0)
    copied = min(mapped, sum(v for k, v in got["buffer_mib"].items() if k != "CPU_Mapped"))
    if not copied:
        pytest.skip(f"no extra buffer type takes {path.name}'s weights on this CPU ({got['buffer_mib']})")
    assert got["resident_mib"] <= mapped - 0.8 * copied + 8, \
        f"{got['resident_mib']:.0f} MiB of {path.name} resident after load, {copied:.0f} of its {mapped:.0f} " \
        f"MiB copied into {got['buffer_mib']}"


# Loads a model (AMX: its weights converted with `omp parallel`) through pyllama_ssm's Model and the
# drop-in Llama, counting the process's threads before and after each load.
THREADS_AFTER_LOAD = """
import os, sys
import pyllama_ssm as ps
from pyllama_ssm import Llama
count = lambda: len(os.listdir("/proc/self/task"))
before = count()
ps.Model(sys.argv[1]).close()
model = count()
Llama(sys.argv[1], n_ctx=512, n_threads=2, verbose=False).close()
print(before, model, count())
"""


def test_loading_a_model_leaves_no_openmp_threads_behind():
    """Loading runs on a thread of its own that ends with it (model.py).  ggml's AMX buffer converts
    weights in an OpenMP team, and libgomp keeps a team for every thread that ran one: the loading
    thread's stayed beside the Engine thread's, and with more OpenMP threads than CPUs libgomp sleeps
    at every one of ggml's barriers instead of spinning (passive wait policy): decode steps of the
    server and of Llama(n_parallel > 1) ran 3x slower on 2 cores (the falcon-h1 graft, one sequence,
    51 ms against 16).  On a CPU whose load runs no OpenMP work this holds trivially."""
    import graft
    path = graft.graft_path("falcon-h1", "q4_k_m")
    if not path.exists():
        pytest.skip(f"{path.name} missing: run `make models`")
    before, model, llama = map(int, run_with_build("patched", THREADS_AFTER_LOAD, str(path)).split())
    assert model == before, f"ps.Model left {model - before} thread(s) behind"
    assert llama == before, f"Llama left {llama - before} thread(s) behind"


def test_pristine_build_runs_the_same_fast_kernels():
    """The parity reference carries the AMX fix too (patches/pristine): it runs SmolLM2 on the same
    kernels without a fault, bit for bit what the patched build computes for one sequence."""
    if not SMOLLM2.exists():
        pytest.skip("SmolLM2 missing: run `make models`")
    assert run(SMOLLM2, True, "upstream") == run(SMOLLM2, True, "patched")


# Eight sequences of different lengths in one unified KV cache (their cells interleave, each masks the
# others'), prefilled together, then 12 decode steps of all eight (8 query rows: below the tiled
# kernel's 64).  The tokens fed are fixed (the prompts' continuation), so every run computes the same
# positions; prints each decode step's logits for every sequence.
ATTENTION = """
import json, sys
import numpy as np
import pyllama_ssm as ps
path, fa = sys.argv[1], sys.argv[2] == "1"
texts = ["The capital of France is", "Once upon a time, in a land far away, there lived a", "def fib(n):",
         "Water boils at a temperature of", "The three primary colors are red,", "In 1969, the first humans",
         "My favourite fruit is the", "A haiku about the sea:"]
with ps.Model(path) as m, ps.Context(m, n_ctx=4096, n_seq_max=8, kv_unified=True, n_batch=512,
                                     flash_attn=fa) as ctx, ps.Batch(512, 1) as batch:
    prompts = [m.tokenize(t * (1 + i % 3)) for i, t in enumerate(texts)]
    for s, p in enumerate(prompts):
        batch.add_sequence(p, 0, s, logits_last=False)
    ctx.decode(batch)
    feed = m.tokenize(" and then, as the story goes, it was over", add_special=False)[:12]
    steps = []
    for k, tok in enumerate(feed):
        batch.clear()
        rows = [batch.add(tok, len(p) + k, s, logits=True) for s, p in enumerate(prompts)]
        ctx.decode(batch)
        steps.append([[float(x) for x in ctx.logits(r)] for r in rows])
print(json.dumps(steps))
"""


def attention_run(path, flash_attn: bool, build: str = "patched") -> np.ndarray:
    return np.array(json.loads(run_with_build(build, ATTENTION, str(path), "1" if flash_attn else "0").splitlines()[-1]))


def test_decode_attention_is_as_accurate_as_upstreams():
    """Decode steps of several sequences (patch 0009: one pass per KV head for the query heads sharing it,
    over each query's visible cells, F32 accumulation) stay as close to the unfused attention (flash
    attention off: KQ, softmax and KQV as separate F32 operations) as upstream's flash attention
    kernel does (F16 accumulation), over every logit of 11 steps of 8 sequences (the root mean square:
    the largest single difference is one chaotic outlier, upstream's or ours by machine); and no logit
    strays: SmolLM2 f16, 9 query heads on 3 KV heads, where a wrong head, cell or mask is off by whole
    logits.  Root mean square (largest) from the unfused logits, on an AMD EPYC: ours 0.0096 (0.064),
    upstream's 0.0102 (0.047); on a Xeon the largest were 0.020 and 0.032."""
    import graft
    f16 = graft.graft_path("smollm2", "f16")
    if not f16.exists():
        pytest.skip(f"{f16.name} missing: run `make models`")
    unfused = attention_run(f16, False)
    ours, upstream = attention_run(f16, True), attention_run(f16, True, "upstream")
    rms_ours, rms_upstream = (float(np.sqrt(np.mean((x - unfused) ** 2))) for x in (ours, upstream))
    e_ours, e_upstream = np.abs(ours - unfused).max(), np.abs(upstream - unfused).max()
    print(f"logit difference from the unfused attention, root mean square (largest): ours {rms_ours:.4f} "
          f"({e_ours:.4f}), upstream's {rms_upstream:.4f} ({e_upstream:.4f})")
    assert rms_ours <= rms_upstream, (rms_ours, rms_upstream)
    assert e_ours <= 2 * max(e_upstream, 0.02), (e_ours, e_upstream)
    # the same greedy tokens, but where the unfused logits nearly tie (within what the kernels may differ)
    picked = np.take_along_axis(unfused, ours.argmax(-1)[..., None], -1)[..., 0]
    assert (unfused.max(-1) - picked <= 2 * e_ours).all()


# Four copies of one prompt as four sequences of one step (a recurrent layer then multiplies a
# {K, 1, 4} batch by a 2D weight), then 8 decode steps of all four; prints each step's logits rows.
TWINS = """
import json, sys
import pyllama_ssm as ps
from pyllama_ssm.bindings import has
invariant = has("llama_set_batch_invariant")  # the patched build; upstream's kernels are the fast ones only
with ps.Model(sys.argv[1]) as m, ps.Context(m, n_ctx=1024, n_seq_max=4, kv_unified=True, flash_attn=True,
                                            batch_invariant=invariant) as ctx, ps.Batch(512, 1) as batch:
    p = m.tokenize("The capital of France is a city on the Seine. Its most famous tower is called")
    for s in range(4):
        batch.add_sequence(p, 0, s)
    ctx.decode(batch)
    steps = []
    for k, tok in enumerate(m.tokenize(" the Eiffel Tower, and it was built", add_special=False)[:8]):
        batch.clear()
        rows = [batch.add(tok, len(p) + k, s, logits=True) for s in range(4)]
        ctx.decode(batch)
        steps.append([[float(x) for x in ctx.logits(r)] for r in rows])
print(json.dumps(steps))
"""


@pytest.mark.parametrize("build", ["patched", "upstream"])
@pytest.mark.parametrize("name", ["qwen35-small.gguf", "qwen35-tiny-q4_0.gguf", "nemotron_h-small.gguf"])
def test_sequences_decoded_in_one_step_do_not_touch_each_other(name, build):
    """Copies of one sequence decoded together get the same logits.  Upstream's AMX product addressed
    every batch after the first with byte offsets added to float pointers and did not broadcast the
    weight (patch 0008, in both builds): on qwen35-small the second copy's logprobs were 0.6 from the
    first's.  The patched build's batch-invariant kernels give the copies equal logits, bit for bit;
    upstream's fast ones sum a row by its place in the batch (copies 1e-5 to 6e-4 apart), far below that."""
    path = ROOT / "build" / "models" / name
    if not path.exists():
        pytest.skip(f"{name} missing: run `make models`")
    steps = np.array(json.loads(run_with_build(build, TWINS, str(path)).splitlines()[-1]))
    assert np.isfinite(steps).all()
    for k, rows in enumerate(steps):
        for s in range(1, 4):
            diff = float(np.abs(rows[s] - rows[0]).max())
            assert diff == 0 if build == "patched" else diff < 1e-2, \
                f"step {k}: sequence {s}'s logits differ from sequence 0's by up to {diff:.3g}"
