"""The low-level layer and the thin wrappers: lifetimes, state, memory ops, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import pyllama_ssm as ps
from conftest import ROOT, run_with_build, zoo_model, zoo_names, zoo_path
from pyllama_ssm.bindings import ffi, lib


def test_ffi_and_lib_use_llama_h_names():
    params = lib.llama_context_default_params()
    assert params.n_seq_max == 1 and ffi.sizeof("struct llama_context_params") > 0
    assert lib.LLAMA_TOKEN_NULL == -1
    assert ps.BUILD == "patched"


def test_upstream_build_through_the_same_code():
    out = run_with_build("upstream", "import pyllama_ssm as ps, pyllama_ssm.bindings as b;"
                                     "print(ps.BUILD, b.has('llama_memory_report_get'), b.has('llama_decode'))")
    assert out.split() == ["upstream", "False", "True"]


@pytest.mark.parametrize("name", zoo_names("stateful")[:2] + ["llama"] if zoo_names() else [])
def test_sequence_state_round_trip_is_bit_identical(name):
    model = zoo_model(name)
    prompt, more = model.tokenize("Save me and bring me back"), model.tokenize(" later", add_special=False)
    with ps.Context(model, n_ctx=256, n_seq_max=2) as ctx:
        ctx.decode_tokens(prompt, seq_id=0)
        saved = ctx.seq_state(0)
        want = ctx.decode_tokens(more, seq_id=0)
        ctx.seq_rm(0)
        assert ctx.seq_pos_max(0) == -1
        ctx.set_seq_state(1, saved)  # into another sequence
        assert ctx.seq_pos_max(1) == len(prompt) - 1
        got = ctx.decode_tokens(more, seq_id=1)
    assert np.array_equal(got, want)


def test_memory_ops_and_clear():
    model = zoo_model("llama")
    with ps.Context(model, n_ctx=256, n_seq_max=2) as ctx:
        toks = model.tokenize("one two three four")
        ctx.decode_tokens(toks, seq_id=0)
        ctx.seq_cp(0, 1)
        assert ctx.seq_pos_max(1) == len(toks) - 1
        assert ctx.seq_rm(1, 2, -1)
        assert ctx.seq_pos_max(1) == 1 and ctx.seq_pos_max(0) == len(toks) - 1
        ctx.seq_keep(0)
        assert ctx.seq_pos_max(1) == -1
        ctx.clear()
        assert ctx.seq_pos_max(0) == -1


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ps.ModelLoadError, match="no such file"):
        ps.Model(tmp_path / "missing.gguf")
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(ps.ModelLoadError, match="not a GGUF file"):
        ps.Model(bad)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(zoo_path("llama").read_bytes()[:5000])
    with pytest.raises(ps.ModelLoadError, match="truncated"):  # validated before llama.cpp sees it
        ps.Model(cut)
    model = zoo_model("llama")
    with pytest.raises(ps.TokenError, match="out of range"):
        model.detokenize([model.n_vocab])
    with pytest.raises(ps.ContextError, match="n_seq_max=300"):
        ps.Context(model, n_seq_max=300)
    with ps.Context(model, n_ctx=256) as ctx:
        with pytest.raises(ps.ContextError, match="seq_id 3 out of range"):
            ctx.decode_tokens([1, 2], seq_id=3)
        with pytest.raises(ps.TokenError, match="out of range"):
            ctx.decode_tokens([1, -5])
        with pytest.raises(ps.MemoryFullError, match="exceed the context"):
            ctx.decode_tokens([1] * (ctx.n_ctx + 1))
        with pytest.raises(ps.StateError):
            ctx.set_seq_state(0, b"\x01\x02\x03")
        assert ctx.decode_tokens([1, 2]).shape == (model.n_vocab,), "the context still works"
    with pytest.raises(TypeError):
        ps.Context(model, no_such_param=1)


def test_closed_objects_refuse_use():
    model = ps.Model(zoo_path("llama"))
    ctx = ps.Context(model, n_ctx=256)
    ctx.close()
    with pytest.raises(ValueError, match="closed"):
        ctx.decode_tokens([1])
    orphan = ps.Context(model, n_ctx=256)
    model.close()  # closes its contexts first: no context outlives the weights
    with pytest.raises(ValueError, match="closed"):
        orphan.seq_pos_max(0)
    with pytest.raises(ValueError, match="closed"):
        model.n_layer


def test_logits_view_shares_the_context_buffer():
    model = zoo_model("llama")
    with ps.Context(model, n_ctx=256) as ctx:
        copied = ctx.decode_tokens(model.tokenize("Hello"))
        view = ctx.logits(-1, copy=False)
        assert np.array_equal(view, copied) and not view.flags.owndata and not view.flags.writeable
        ctx.decode_tokens(model.tokenize(" world", add_special=False))
        assert not np.array_equal(view, copied), "the view follows the buffer: valid until the next decode"


def test_bulk_batch_rows_decode_as_one_token_at_a_time():
    """Batch.add_rows / add_sequence write many rows with numpy: the same batch as add() one token at a
    time (every field, several sequence ids per token too), the same logits after decode, and
    output_rows / all_logits find each output's row as llama_get_logits_ith does."""
    model = zoo_model("llama")
    prompt = model.tokenize("The quick brown fox jumps over the lazy dog")
    with ps.Batch(64, 2) as bulk, ps.Batch(64, 2) as single:
        bulk.add_sequence(prompt, 0, 1, logits_last=True)
        bulk.add_rows([5, 6], [7, 3], [0, 1])
        bulk.add(9, 4, [0, 1], logits=False)
        for k, t in enumerate(prompt):
            single.add(t, k, 1, logits=k == len(prompt) - 1)
        single.add(5, 7, 0, logits=True)
        single.add(6, 3, 1, logits=True)
        single.add(9, 4, [0, 1])
        n = len(prompt) + 3
        assert bulk.n_tokens == single.n_tokens == n
        for field in ("token", "pos", "n_seq_id", "logits"):
            assert np.array_equal(getattr(bulk, field)[:n], getattr(single, field)[:n]), field
        raw = bulk.raw
        assert [raw.seq_id[i][0] for i in range(n)] == [1] * len(prompt) + [0, 1, 0]
        assert raw.seq_id[n - 1][1] == 1 and raw.token[n - 2] == 6 and raw.pos[n - 3] == 7
        assert list(bulk.output_rows()[[len(prompt) - 1, n - 3, n - 2]]) == [0, 1, 2] and bulk.n_outputs == 3
        bulk.clear()
        bulk.add_rows([1, 2], [0, 0], [0, 1])
        assert bulk.output_rows() is None and bulk.n_outputs == 2  # every token an output: row = index
        with pytest.raises(OverflowError, match="full"):
            bulk.add_sequence(list(range(64)), 0, 0)
    with ps.Context(model, n_ctx=256) as ctx, ps.Batch(64, 1) as batch:
        batch.add_sequence(prompt, 0, 0, logits_last=False)
        first = batch.add_rows(prompt[:3], [len(prompt), len(prompt) + 1, len(prompt) + 2], [0, 0, 0])
        ctx.decode(batch)
        rows = ctx.all_logits(3)
        for k in range(3):
            assert np.array_equal(rows[batch.output_rows()[first + k]], ctx.logits(first + k))
        assert rows[0].argmax() == ctx.logits(first).argmax()
        for bad in (model.n_vocab, -1):  # refused by name before llama.cpp sees it
            batch.clear()
            batch.add_rows([1, bad], [0, 1], [0, 0])
            with pytest.raises(ps.DecodeError, match=f"batch token 1: id {bad} out of range"):
                ctx.decode(batch)


@pytest.mark.parametrize("env, expected", [
    ({}, {"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "1000"}),  # a short spin, then sleep
    ({"OMP_WAIT_POLICY": "active"}, {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": None}),  # the user's wins
    ({"GOMP_SPINCOUNT": "50"}, {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "50"}),
])
def test_openmp_wait_defaults_leave_the_users_settings(env, expected):
    """Set on import, before libgomp reads them; a user's own setting of either wins alone."""
    code = "import os, json, pyllama_ssm; print(json.dumps({k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')}))"
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=True).stdout
    assert json.loads(out.splitlines()[-1]) == expected


def test_llama_cpp_errors_explain_only_their_own_threads_failure():
    """A failure's message quotes what llama.cpp logged on the failing thread, not another's."""
    import threading

    from pyllama_ssm import _runtime
    _runtime.init()
    _runtime.clear_errors()
    other: dict[str, str] = {}

    def load_missing():
        _runtime.clear_errors()
        assert lib.llama_model_load_from_file(b"/nonexistent/model.gguf", lib.llama_model_default_params()) == ffi.NULL
        other["errors"] = _runtime.take_errors()
    t = threading.Thread(target=load_missing)
    t.start()
    t.join()
    assert "/nonexistent/model.gguf" in other["errors"]
    assert _runtime.take_errors() == ""


def test_batch_invariance_on_the_upstream_build_is_refused_by_name():
    code = """
import pyllama_ssm as ps
from conftest import zoo_path
m = ps.Model(zoo_path("llama"))
try:
    ps.Context(m, n_ctx=256, batch_invariant=True)
except ps.ContextError as e:
    print(e)
"""
    out = run_with_build("upstream", "import sys; sys.path.insert(0, 'tests')\n" + code)
    assert "batch_invariant=True" in out and "patched build" in out
