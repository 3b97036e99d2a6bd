"""Patch 0001 (memory report): the figures equal the hand formula and guard the seed.

The report is read from the allocated buffers; the formulas below come from
the model file alone (tensor shapes and hyperparameters read with gguf-py).
"""

from __future__ import annotations

import functools
import sys

import pytest

from conftest import ROOT, zoo_model, zoo_names, zoo_path

sys.path.insert(0, str(ROOT / "vendor" / "llama.cpp" / "gguf-py"))
import gguf  # noqa: E402

import pyllama_ssm as ps  # noqa: E402
from pyllama_ssm import memory  # noqa: E402

pytestmark = pytest.mark.skipif(not memory.available(), reason="memory report needs the patched build")

N_CTX = 1024
F16, F32 = 2, 4
# Recurrent layers whose state is conv (k-1 x conv channels) + ssm (d_state x d_inner), all F32.
MAMBA_FAMILY = {"mamba", "mamba2", "jamba", "falcon-h1", "granitehybrid", "nemotron_h"}


@functools.lru_cache(maxsize=None)
def reader(path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def tensors(path) -> dict[str, list[int]]:
    return {t.name: [int(x) for x in t.shape] for t in reader(path).tensors}


def field(path, key):
    f = reader(path).fields.get(key)
    return None if f is None else f.contents()


def kv_bytes_per_cell(shapes: dict[str, list[int]]) -> int | None:
    """Sum over attention layers of (K rows + V rows) x F16, from attn_k/attn_v shapes.

    None when an attention layer stores K/V in a fused or latent projection
    (attn_qkv outside recurrent layers, MLA's attn_kv_a_mqa): no plain shape to count.
    """
    layers: dict[str, set[str]] = {}
    for name in shapes:
        if name.startswith("blk."):
            blk, _, rest = name[4:].partition(".")
            layers.setdefault(blk, set()).add(rest)
    total = 0
    for blk, names in layers.items():
        recurrent = any(n.startswith(("ssm_", "time_mix", "shortconv")) for n in names)
        if "attn_k.weight" in names and "attn_v.weight" in names:
            total += (shapes[f"blk.{blk}.attn_k.weight"][1] + shapes[f"blk.{blk}.attn_v.weight"][1]) * F16
        elif "attn_kv_a_mqa.weight" in names or ("attn_qkv.weight" in names and not recurrent):
            return None
    return total


def rs_bytes_per_cell(path, arch: str, shapes: dict[str, list[int]]) -> int:
    d_state = field(path, f"{arch}.ssm.state_size")
    d_inner = field(path, f"{arch}.ssm.inner_size")
    total = 0
    for name, shape in shapes.items():
        if name.endswith(".ssm_conv1d.weight"):
            k, channels = shape[0], shape[1]
            total += ((k - 1) * channels + d_state * d_inner) * F32
    return total


@pytest.mark.parametrize("name", zoo_names())
def test_kv_matches_hand_formula(name):
    path = zoo_path(name)
    per_cell = kv_bytes_per_cell(tensors(path))
    model = zoo_model(name)
    with ps.Context(model, n_ctx=N_CTX, n_seq_max=1) as ctx:
        r = ctx.memory_report()
    if per_cell is None:
        pytest.skip(f"{name}: fused or latent attention, no plain K/V shapes to count")
    if per_cell == 0:
        assert r.kv_bytes == 0 and r.kv_cells_total == 0, f"{name} has no attention layers"
        return
    assert r.kv_cells_total == N_CTX
    assert r.kv_bytes_per_cell == per_cell
    assert r.kv_bytes == N_CTX * per_cell


@pytest.mark.parametrize("name", zoo_names())
def test_recurrent_matches_hand_formula(name):
    path = zoo_path(name)
    model = zoo_model(name)
    with ps.Context(model, n_ctx=N_CTX, n_seq_max=4) as ctx:
        r = ctx.memory_report()
    if not model.is_recurrent and not model.is_hybrid:
        assert r.rs_bytes == 0 and r.rs_cells_total == 0
        return
    assert r.rs_cells_total == 4
    assert r.rs_bytes == r.rs_cells_total * r.rs_bytes_per_cell
    if model.arch in MAMBA_FAMILY:
        assert r.rs_bytes_per_cell == rs_bytes_per_cell(path, model.arch, tensors(path))


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "split"])
@pytest.mark.parametrize("name", zoo_names())
def test_attention_kv_does_not_grow_with_n_seq_max(name, unified):
    """The seed regression guard: hybrid KV is sized to n_ctx, not n_ctx per sequence."""
    model = zoo_model(name)
    if not model.is_hybrid:
        pytest.skip(f"{name} is not a hybrid")
    reports = {}
    n_ctx = 8 * 512  # split streams get n_ctx / 8 cells each: keep that above upstream's 256-cell padding
    for n_seq in (1, 8):
        with ps.Context(model, n_ctx=n_ctx, n_seq_max=n_seq, kv_unified=unified) as ctx:
            reports[n_seq] = ctx.memory_report()
    assert reports[8].kv_bytes == reports[1].kv_bytes > 0
    assert reports[8].rs_bytes == 8 * reports[1].rs_bytes


def test_cells_used_and_shared_follow_decoding():
    name = "llama" if "llama" in zoo_names() else pytest.skip("no llama control model")
    model = zoo_model(name)
    with ps.Context(model, n_ctx=N_CTX, n_seq_max=4) as ctx:
        assert ctx.memory_report().kv_cells_used == 0
        prompt = model.tokenize("The quick brown fox jumps over the lazy dog")
        ctx.decode_tokens(prompt, seq_id=0)
        r = ctx.memory_report()
        assert r.kv_cells_used == len(prompt) and r.kv_cells_shared == 0
        ctx.seq_cp(0, 1)  # unified KV: the prefix cells now hold two sequences
        r = ctx.memory_report()
        assert r.kv_cells_used == len(prompt) and r.kv_cells_shared == len(prompt)
        ctx.decode_tokens(model.tokenize(" again", add_special=False), seq_id=1)
        assert ctx.memory_report().kv_cells_used > len(prompt)


def test_recurrent_cells_live_follow_sequences():
    rec = [n for n in zoo_names() if n in ("mamba", "mamba2")]
    if not rec:
        pytest.skip("no pure recurrent model in the zoo")
    model = zoo_model(rec[0])
    with ps.Context(model, n_ctx=N_CTX, n_seq_max=4) as ctx:
        assert ctx.memory_report().rs_cells_live == 0
        for s in range(3):
            ctx.decode_tokens(model.tokenize("hello world"), seq_id=s)
        assert ctx.memory_report().rs_cells_live == 3
        ctx.seq_rm(1)
        assert ctx.memory_report().rs_cells_live == 2


def test_report_totals_are_consistent():
    model = zoo_model(zoo_names()[0])
    with ps.Context(model, n_ctx=N_CTX, n_seq_max=2) as ctx:
        r = ctx.memory_report()
    assert r.weights_bytes == sum(b.weights for b in r.buffer_types) > 0
    assert r.memory_bytes == sum(b.memory for b in r.buffer_types) == r.kv_bytes + r.rs_bytes
    assert r.compute_bytes > 0 and r.output_bytes > 0
    assert "CPU" in {b.name for b in r.buffer_types}
    assert "MiB" in r.summary()
