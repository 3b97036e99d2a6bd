"""Patch 0002 (rs-pool): snapshot semantics, rollback, exhaustion, memory goal.

Every check compares against a fresh decode of the same tokens in a new
context, on every recurrent and hybrid model of the zoo.
"""

from __future__ import annotations

import numpy as np
import pytest

import pyllama_ssm as ps
from conftest import zoo_index, zoo_model, zoo_names
from pyllama_ssm.bindings import has

pytestmark = pytest.mark.skipif(not has("llama_memory_rs_snapshot"), reason="snapshots need the patched build")

TOL = 1e-6  # the reference decodes the same chunks with the same batch shapes: only exact reuse passes
PREFIX = "The shared recurrent pool stores one prefix for many clients"
CONTINUATIONS = [" and each", " while one", " so that a", " but every"]


def fresh(model: ps.Model, *chunks: list[int]) -> np.ndarray:
    """Logits after decoding the chunks one decode call each, in a new context."""
    with ps.Context(model, n_ctx=512, n_seq_max=1) as ctx:
        for chunk in chunks:
            logits = ctx.decode_tokens(chunk, seq_id=0)
        return logits


def fresh_batch(model: ps.Model, prefix: list[int], conts: list[list[int]]) -> list[np.ndarray]:
    """Each sequence prefilled on its own, then all continuations in one batch."""
    with ps.Context(model, n_ctx=1024, n_seq_max=len(conts)) as ctx, ps.Batch(64, 1) as batch:
        for s in range(len(conts)):
            ctx.decode_tokens(prefix, seq_id=s)
        last = [batch.add_sequence(c, len(prefix), s) for s, c in enumerate(conts)]
        ctx.decode(batch)
        return [ctx.logits(i) for i in last]


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.max(np.abs(a - b))) <= TOL


def toks(model, text, bos=False):
    return model.tokenize(text, add_special=bos)


@pytest.mark.parametrize("name", zoo_names("stateful"))
def test_restore_continues_like_a_fresh_decode(name):
    model = zoo_model(name)
    prefix, a, b = toks(model, PREFIX, True), toks(model, CONTINUATIONS[0]), toks(model, CONTINUATIONS[1])
    with ps.Context(model, n_ctx=512, n_seq_max=2, n_rs_pool=2) as ctx:
        ctx.decode_tokens(prefix, seq_id=0)
        h = ctx.snapshot(0)
        assert ctx.snapshot_pos(h) == len(prefix) - 1
        got_a = ctx.decode_tokens(a, seq_id=0)  # seq 0 moves on: copy on write, the snapshot stays
        ctx.restore(h, 1)
        assert ctx.seq_pos_max(1) == len(prefix) - 1
        got_b = ctx.decode_tokens(b, seq_id=1)
    assert close(got_a, fresh(model, prefix, a))
    assert close(got_b, fresh(model, prefix, b))


@pytest.mark.parametrize("name", zoo_names("stateful"))
def test_many_sequences_share_one_snapshot_after_its_origin_is_gone(name):
    model = zoo_model(name)
    prefix = toks(model, PREFIX, True)
    conts = [toks(model, c) for c in CONTINUATIONS]
    n = len(conts)
    with ps.Context(model, n_ctx=1024, n_seq_max=n, n_rs_pool=1) as ctx:
        ctx.decode_tokens(prefix, seq_id=0)
        h = ctx.snapshot(0)
        ctx.seq_rm(0)  # the origin leaves; the snapshot (and a hybrid's attention prefix) stays
        for s in range(n):
            ctx.restore(h, s)
        stats = ctx.pool_stats()
        assert stats.n_cells_live == 1 and stats.n_snapshots == 1, "one stored state shared by all"
        if model.is_hybrid:
            r = ctx.memory_report()
            assert r.kv_cells_used == len(prefix), "the attention prefix is stored once"
            assert r.kv_cells_shared == len(prefix)
        with ps.Batch(64, 1) as batch:
            last = [batch.add_sequence(c, len(prefix), s) for s, c in enumerate(conts)]
            ctx.decode(batch)
            got = [ctx.logits(i) for i in last]
        ctx.release(h)
        assert ctx.pool_stats().n_snapshots == 0
    want = fresh_batch(model, prefix, conts)
    for s in range(n):
        assert close(got[s], want[s]), f"sequence {s}"


@pytest.mark.parametrize("name", zoo_names("stateful"))
def test_rollback_by_partial_seq_rm_at_a_snapshot(name):
    model = zoo_model(name)
    prefix, x, y = toks(model, PREFIX, True), toks(model, CONTINUATIONS[2]), toks(model, CONTINUATIONS[3])
    p = len(prefix)
    with ps.Context(model, n_ctx=512, n_seq_max=1, n_rs_pool=1) as ctx:
        ctx.decode_tokens(prefix, seq_id=0)
        ctx.snapshot(0)
        ctx.decode_tokens(x, seq_id=0)
        assert not ctx.seq_rm(0, p - 2, -1), "no snapshot at p - 3: refused"
        assert ctx.seq_pos_max(0) == p + len(x) - 1, "a refused seq_rm changes nothing"
        assert ctx.seq_rm(0, p, -1), "snapshot at p - 1: rollback"
        assert ctx.seq_pos_max(0) == p - 1
        got = ctx.decode_tokens(y, seq_id=0)
    assert close(got, fresh(model, prefix, y))


@pytest.mark.parametrize("name", zoo_names("stateful")[:3])
def test_pool_exhaustion_is_an_error_and_corrupts_nothing(name):
    model = zoo_model(name)
    prefix, a = toks(model, PREFIX, True), toks(model, CONTINUATIONS[0])
    with ps.Context(model, n_ctx=512, n_seq_max=2, n_rs_pool=1) as ctx:
        ctx.decode_tokens(prefix, seq_id=0)
        ctx.decode_tokens(prefix, seq_id=1)
        h = ctx.snapshot(0)
        with pytest.raises(ps.PoolExhaustedError, match="n_rs_pool"):
            ctx.snapshot(1)
        assert ctx.pool_stats().n_snapshots == 1
        assert ctx.pool_stats().n_demand <= ctx.pool_stats().n_cells
        got0 = ctx.decode_tokens(a, seq_id=0)
        got1 = ctx.decode_tokens(a, seq_id=1)
        ctx.release(h)
    want = fresh(model, prefix, a)
    assert close(got0, want) and close(got1, want)


def test_snapshot_errors_name_the_reason():
    names = zoo_names("stateful")
    if not names:
        pytest.skip("no recurrent model in the zoo")
    model = zoo_model(names[0])
    with ps.Context(model, n_ctx=256, n_seq_max=2, n_rs_pool=1) as ctx:
        with pytest.raises(ps.SnapshotError, match="no state yet"):
            ctx.snapshot(0)
        with pytest.raises(ps.SnapshotError, match="unknown or released"):
            ctx.restore(7, 0)
        with pytest.raises(ps.ContextError, match="out of range"):
            ctx.snapshot(5)
        ctx.decode_tokens(toks(model, PREFIX, True), seq_id=0)
        h = ctx.snapshot(0)
        ctx.release(h)
        with pytest.raises(ps.SnapshotError, match="unknown or released"):
            ctx.release(h)


def test_attention_only_model_has_no_snapshots():
    if "llama-tiny" not in zoo_index()["models"]:
        pytest.skip("no llama control model")
    model = zoo_model("llama")
    with ps.Context(model, n_ctx=256, n_seq_max=1) as ctx:
        ctx.decode_tokens(toks(model, PREFIX, True), seq_id=0)
        with pytest.raises(ps.SnapshotError, match="no recurrent state"):
            ctx.snapshot(0)


def test_hybrid_with_split_kv_is_refused():
    hybrids = zoo_names("hybrid")
    if not hybrids:
        pytest.skip("no hybrid model in the zoo")
    model = zoo_model(hybrids[0])
    with ps.Context(model, n_ctx=512, n_seq_max=2, n_rs_pool=1, kv_unified=False) as ctx:
        ctx.decode_tokens(toks(model, PREFIX, True), seq_id=0)
        with pytest.raises(ps.SnapshotError, match="kv_unified=False"):
            ctx.snapshot(0)


@pytest.mark.parametrize("name", [n for n in ("mamba2", "qwen35", "jamba") if n in zoo_names("stateful")])
def test_memory_goal_8_live_plus_prefix_plus_4_rollbacks_cost_13_cells(name):
    """8 sequences share a prefix snapshot, 4 keep a rollback point: 8 + 1 + 4 cells, not 8 x (1 + 4)."""
    model = zoo_model(name)
    prefix = toks(model, PREFIX, True)
    with ps.Context(model, n_ctx=2048, n_seq_max=8, n_rs_pool=5) as ctx:
        ctx.decode_tokens(prefix, seq_id=0)
        shared = ctx.snapshot(0)
        for s in range(8):
            ctx.restore(shared, s)
        for s in range(8):
            ctx.decode_tokens(toks(model, CONTINUATIONS[s % 4]), seq_id=s)
        rollbacks = [ctx.snapshot(s) for s in range(4)]
        for s in range(4):
            ctx.decode_tokens(toks(model, " next"), seq_id=s)
        stats = ctx.pool_stats()
        report = ctx.memory_report()
        for h in rollbacks + [shared]:
            ctx.release(h)
    assert (stats.n_cells_live, stats.n_cells_snapshot, stats.n_snapshots) == (8, 5, 5)
    assert stats.n_cells == report.rs_cells_total == 13 and stats.n_cells_free == 0
    assert report.rs_bytes == 13 * report.rs_bytes_per_cell
    with ps.Context(model, n_ctx=2048, n_seq_max=8, n_rs_seq=4) as upstream_style:
        rows = upstream_style.memory_report()
    if rows.rs_n_rs_seq == 4:  # the arch supports upstream's per-token rollback
        assert rows.rs_bytes == 40 * report.rs_bytes_per_cell


IDLE_POOL = """
import json, sys
import pyllama_ssm as ps

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

model = ps.Model(sys.argv[1])
with ps.Context(model, n_ctx=256, n_seq_max=1, n_rs_pool=1) as probe:
    per_cell = probe.memory_report().rs_bytes_per_cell
n_pool = (256 << 20) // per_cell  # a 256 MiB pool
prompt = model.tokenize("The shared recurrent pool", add_special=True)
before = rss()
n_use = min(n_pool // 4, 1000)
with ps.Context(model, n_ctx=n_use + 64, n_seq_max=1, n_rs_pool=n_pool) as ctx:
    created = rss()
    ctx.decode_tokens(prompt, seq_id=0)
    pos = len(prompt)
    handles = []
    for i in range(n_use):  # each snapshot, then a write: the sequence moves to a fresh cell
        handles.append(ctx.snapshot(0))
        ctx.decode_tokens([prompt[-1]], seq_id=0, pos0=pos)
        pos += 1
    used = rss()
    ctx.clear()
    cleared = rss()
    pool = ctx.memory_report().rs_bytes
print(json.dumps({"pool": pool, "per_cell": per_cell, "n_used": len(handles) + 1,
                  "created": created - before, "used": used - created, "cleared": used - cleared}))
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/status")
def test_idle_pool_cells_cost_no_ram():
    """Patch 0006: resident memory follows the cells in use, not the pool's size."""
    import json

    from conftest import run_with_build, zoo_path
    r = json.loads(run_with_build("patched", IDLE_POOL, str(zoo_path("mamba2"))).splitlines()[-1])
    assert r["pool"] >= 250 << 20
    assert r["created"] < 0.1 * r["pool"], "an idle pool must not be resident"
    in_use = r["n_used"] * r["per_cell"]
    assert r["used"] > 0.5 * in_use, "cells in use are resident"
    assert r["cleared"] > 0.5 * in_use, "clearing the memory returns its pages"


UNUSED_KV = """
import json, sys
import pyllama_ssm as ps

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

model = ps.Model(sys.argv[1])
with ps.Context(model, n_ctx=256, n_seq_max=1) as probe:
    per_cell = probe.memory_report().kv_bytes_per_cell
prompt = model.tokenize("The old lighthouse keeper climbed the stairs every evening to light the lamp. " * 60)
before = rss()
with ps.Context(model, n_ctx=(256 << 20) // per_cell // 256 * 256, n_seq_max=1) as ctx:  # 256 MiB of KV
    created = rss()
    ctx.decode_tokens(prompt, seq_id=0)
    used = rss()
    ctx.clear()
    cleared = rss()
    kv = ctx.memory_report().kv_bytes
print(json.dumps({"kv": kv, "per_cell": per_cell, "n_used": len(prompt), "created": created - before,
                  "used": used - created, "cleared": used - cleared}))
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/status")
def test_unused_kv_cells_cost_no_ram():
    """Patch 0015: the KV cache's resident memory follows the cells in use, not n_ctx (a server sizes its
    context for every user's longest conversation; upstream clears it, so all of it is resident at once).
    On the falcon-h1 graft, attention and Mamba2 in every layer."""
    import json

    import graft
    from conftest import run_with_build
    path = graft.graft_path("falcon-h1", "q4_k_m")
    if not path.exists():
        pytest.skip(f"{path.name} missing: make models")
    r = json.loads(run_with_build("patched", UNUSED_KV, str(path)).splitlines()[-1])
    assert r["kv"] >= 250 << 20
    assert r["created"] < 0.25 * r["kv"], "an empty KV cache must not be resident"
    in_use = r["n_used"] * r["per_cell"]
    assert r["used"] > 0.5 * in_use, "cells in use are resident"
    assert r["cleared"] > 0.5 * in_use, "clearing the memory returns its pages"
