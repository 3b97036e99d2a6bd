"""Patch 0005 (rs-inplace) takes effect: a decode step of several sequences reads and
writes the recurrent states where they lie.

The parity tests show that in place and copy give the same logits, which they would
also do if the in-place path were never taken. This counts the graph's operations
instead (llama.cpp's eval callback sees every node of the step): with the states
updated in place no node gathers a recurrent state out of the memory (GET_ROWS) or
copies one back (CPY); with LLAMA_RS_INPLACE=0, upstream's path, both happen.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_with_build, zoo_path, zoo_names
from pyllama_ssm.bindings import has

pytestmark = pytest.mark.skipif(not has("llama_memory_rs_snapshot"), reason="in-place updates need the patched build")

N_SEQS = 4

# Prefill N_SEQS prompts, then count the nodes of one decode step (one token per
# sequence) that gather from or copy into the recurrent memory, by state kind:
# "s" the scan states (ssm, delta net, wkv), "r" the conv and token-shift states.
CENSUS = r"""
import json, sys
import pyllama_ssm as ps
from pyllama_ssm.bindings import ffi, lib

path, n = sys.argv[1], int(sys.argv[2])
counts = {"nodes": 0, "gather_s": 0, "store_s": 0, "gather_r": 0, "store_r": 0}
recording = False

# the recurrent memory's tensors by name; plamo2's graph renames its own (cb on the memory tensor)
MEMORY = {"cache_s_l": "s", "cache_r_l": "r", "mamba_ssm_states": "s", "mamba_conv1d_state": "r"}

def memory_kind(t):
    root = t.view_src if t.view_src != ffi.NULL else t  # ggml keeps view_src at the root tensor
    name = ffi.string(root.name).decode()
    return next((kind for prefix, kind in MEMORY.items() if name.startswith(prefix)), None)

@ffi.callback("ggml_backend_sched_eval_callback")
def census(t, ask, user_data):
    if recording:
        counts["nodes"] += 1
        if t.op == lib.GGML_OP_GET_ROWS and (kind := memory_kind(t.src[0])):
            counts["gather_" + kind] += 1
        elif t.op == lib.GGML_OP_CPY and (kind := memory_kind(t.src[1])):
            counts["store_" + kind] += 1
    return False  # observe only: the step computes as one graph

model = ps.Model(path)
with ps.Context(model, n_ctx=512, n_seq_max=n, overrides={"cb_eval": census}) as ctx, ps.Batch(256, n) as batch:
    pos = []
    for s in range(n):
        prompt = model.tokenize(f"Sequence {s} says")
        batch.add_sequence(prompt, 0, s)
        pos.append(len(prompt))
    ctx.decode(batch)
    batch.clear()
    for s in range(n):
        batch.add(model.tokenize(" more", add_special=False)[0], pos[s], s, logits=True)
    recording = True
    ctx.decode(batch)
print(json.dumps(counts))
"""


def census(name: str, inplace: bool) -> dict[str, int]:
    out = run_with_build("patched", CENSUS, str(zoo_path(name)), str(N_SEQS),
                         env={"LLAMA_RS_INPLACE": "1" if inplace else "0"})
    return json.loads(out.splitlines()[-1])


@pytest.mark.parametrize("name", zoo_names("stateful"))
def test_decode_updates_states_in_place(name):
    inplace, copied = census(name, True), census(name, False)
    assert inplace["nodes"] > 0 and copied["nodes"] > 0, (inplace, copied)

    # upstream's path gathers the states or copies them back (mamba's scan gathers by itself)
    assert copied["gather_s"] + copied["store_s"] + copied["gather_r"] > 0, copied
    # in place: the scan states are neither gathered nor stored ...
    assert inplace["gather_s"] == 0 and inplace["store_s"] == 0, inplace
    # ... and conv states are read where they lie; rwkv's token shifts keep the gather
    # (they are read after their store is scheduled), as the patch says
    if not name.startswith("rwkv"):
        assert inplace["gather_r"] == 0, inplace
    assert inplace["nodes"] < copied["nodes"], (inplace, copied)
