"""install_as_llama_cpp(): stock llama-cpp-python 0.3.36's whole package over our libllama.

Each case runs in its own process (one libllama, one `llama_cpp` per process).  The low-level
layer is compared with stock itself: the same driver, using only `llama_cpp.llama_cpp` and
`llama_cpp._internals`, runs under stock (on the pristine library) and under pyllama-ssm (on
the same pristine library, and on the patched one), on SmolLM2's real weights.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from conftest import ROOT, child_env, run_with_build, zoo_path
from parity.stock import run_ours, run_stock

SMOLLM2 = ROOT / "build" / "models" / "smollm2-135m-instruct-q4_1.gguf"

# stock's tests/test_llama.py::test_real_model, minus its Qwen3.5 token ids, greedy, plus the ctypes calls
# guidance and outlines make on Llama.model / Llama.ctx
LOW_LEVEL = r"""
import ctypes, json, sys
import numpy as np
import llama_cpp
import llama_cpp._internals as internals
path = sys.argv[1]
params = llama_cpp.llama_model_default_params()
model = internals.LlamaModel(path_model=path, params=params, verbose=False)
cparams = llama_cpp.llama_context_default_params()
cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 64, 64, 64
context = internals.LlamaContext(model=model, params=cparams, verbose=False)
tokens = model.tokenize(b"The quick brown fox jumps over the lazy dog. The quick brown fox jumps ", add_bos=True, special=True)
prompt = list(tokens)
batch = internals.LlamaBatch(n_tokens=len(tokens), embd=0, n_seq_max=1, verbose=False)
sampler = internals.LlamaSampler()
sampler.add_greedy()
n_eval, out = 0, []
for _ in range(6):
    batch.set_batch(tokens, n_past=n_eval, logits_all=False)
    context.decode(batch)
    n_eval += len(tokens)
    tokens = [sampler.sample(context, -1)]
    out += tokens
result = {"prompt": prompt, "out": out, "text": model.detokenize(out, special=True).decode(),
          "n_ctx": llama_cpp.llama_n_ctx(context.ctx), "sizeof_ctx_params": ctypes.sizeof(cparams)}
model.close()
# the Llama-level handles, driven by the ctypes API (guidance's LlamaCpp does this)
llm = llama_cpp.Llama(path, n_ctx=64, verbose=False)
vocab = llama_cpp.llama_model_get_vocab(llm.model)
b = llama_cpp.llama_batch_init(len(prompt), 0, 1)
b.n_tokens = len(prompt)
for i, t in enumerate(prompt):
    b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = t, i, 1, 0, i == len(prompt) - 1
llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), -1, 0, -1)
assert llama_cpp.llama_decode(llm.ctx, b) == 0
n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
result["ctypes_argmax"] = int(np.argmax(logits))
llama_cpp.llama_batch_free(b)
buf = ctypes.create_string_buffer(64)
n = llama_cpp.llama_token_to_piece(vocab, out[0], buf, 64, 0, False)
result["piece"] = buf.raw[:n].decode(errors="replace")
print(json.dumps(result))
"""


def test_low_level_api_matches_stock_on_real_weights():
    if not SMOLLM2.exists():
        pytest.skip(f"{SMOLLM2} missing: run `make models`")
    stock = json.loads(run_stock(LOW_LEVEL, str(SMOLLM2)))
    for build in ("upstream", "patched"):
        ours = json.loads(run_ours(LOW_LEVEL, str(SMOLLM2), build=build))
        assert ours == stock, build
    assert stock["ctypes_argmax"] == stock["out"][0] and stock["text"].strip()


ONE_LIBRARY = r"""
import re, sys
import pyllama_ssm
llama_cpp = pyllama_ssm.install_as_llama_cpp()
import llama_cpp.mtmd_cpp as mtmd
from llama_cpp.llama_chat_format import Llava15ChatHandler
maps = open("/proc/self/maps").read()
print(sorted(set(re.findall(r"\S*/lib(?:llama|mtmd)\.so\S*", maps))))
print(mtmd.mtmd_default_marker().decode())
try:
    Llava15ChatHandler(clip_model_path="/nonexistent/mmproj.gguf", verbose=False)
except Exception as e:
    print(type(e).__name__, e)
"""


def test_one_libllama_per_process_and_mtmd_beside_it():
    lines = run_ours(ONE_LIBRARY).strip().splitlines()
    mapped = eval(lines[0])  # noqa: S307 - our own subprocess's list
    libdir = ROOT / "build" / "patched" / "lib"
    assert [p for p in mapped if "/libllama.so" in p] == [str((libdir / "libllama.so").resolve())]
    assert any(p.startswith(str(libdir)) and "/libmtmd.so" in p for p in mapped)
    assert lines[1] == "<__media__>"
    assert lines[2].startswith("ValueError") and "/nonexistent/mmproj.gguf" in lines[2]  # stock's own error


# -- layering: the core knows nothing of the drop-in ---------------------------------------------
CORE = ("_runtime", "batch", "bindings", "context", "errors", "gguf", "hparams", "limits", "memory", "model", "rpc",
        "sampling", "sizing")
ABOVE = ("as_llama_cpp", "stock_handles", "llama", "llama_cache", "llama_callbacks", "llama_chat_format",
         "llama_grammar", "llama_speculative", "llama_tokenizer", "llama_types", "cancellation", "chat_convert",
         "chat_function_calling", "chat_handlers", "chat_templates", "engine", "server", "session", "completion",
         "embeddings", "llama_setup")


def imports(path):
    """The modules a file imports, anywhere in it (function-local imports too); relative ones as pyllama_ssm.X."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module
        elif isinstance(node, ast.ImportFrom):
            yield from ([f"pyllama_ssm.{node.module}"] if node.module else
                        [f"pyllama_ssm.{alias.name}" for alias in node.names])


def test_core_modules_import_nothing_above_them():
    """bindings, model, context, batch and the rest of the core import none of the drop-in, the Engine
    or the server, and never look for llama_cpp."""
    above = {"pyllama_ssm", *(f"pyllama_ssm.{name}" for name in ABOVE)}
    for name in CORE:
        path = ROOT / "pyllama_ssm" / f"{name}.py"
        upward = [m for m in imports(path) if m.split(".")[0] == "llama_cpp" or ".".join(m.split(".")[:2]) in above]
        assert upward == [], name
        assert "sys.modules" not in path.read_text(), name


CORE_UNDER_INSTALL = r"""
import json, sys
import pyllama_ssm.batch, pyllama_ssm.context, pyllama_ssm.model, pyllama_ssm.sampling
above = {f"pyllama_ssm.{name}" for name in sys.argv[2].split(",")}
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "llama_cpp" or m in above)
import pyllama_ssm
pyllama_ssm.install_as_llama_cpp()
model = pyllama_ssm.Model(sys.argv[1], vocab_only=True)
ctx = pyllama_ssm.Context(model, n_ctx=64)
batch = pyllama_ssm.Batch(8)
stock = {"Model": ["token_get_text", "model"], "Context": ["kv_cache_clear", "ctx"], "Batch": ["set_batch", "batch"]}
answered = [f"{type(o).__name__}.{n}" for o in (model, ctx, batch) for n in stock[type(o).__name__] if hasattr(o, n)]
forwarding = [c.__name__ for c in (type(model), type(ctx), type(batch)) if hasattr(c, "__getattr__")]
print(json.dumps({"loaded": loaded, "answered": answered, "forwarding": forwarding}))
"""


def test_core_objects_are_the_same_under_install():
    """Importing the core loads neither llama_cpp nor the drop-in, and install_as_llama_cpp() changes no
    core object: stock's _internals methods answer only on Llama._model, _ctx and _batch (stock_handles)."""
    out = run_with_build("patched", CORE_UNDER_INSTALL, str(zoo_path("llama")), ",".join(ABOVE))
    assert json.loads(out) == {"loaded": [], "answered": [], "forwarding": []}


ERRORS = r"""
import sys
import pyllama_ssm
pyllama_ssm.install_as_llama_cpp()
import llama_cpp
try:
    llama_cpp.Llama(sys.argv[1], verbose=False)
except Exception as e:
    print(type(e).__name__, "|", e)
"""


def test_llama_cpp_errors_still_name_their_reason(tmp_path):
    """Stock's _logger takes llama.cpp's log callback; ours is put back, so a load error keeps its cause."""
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(zoo_path("llama").read_bytes()[:4096])
    out = run_ours(ERRORS, str(bad)).strip()
    assert out.startswith("ModelLoadError |") and "truncated.gguf" in out, out


def test_refuses_when_another_llama_cpp_is_imported():
    code = ("import sys, types; sys.modules['llama_cpp'] = types.ModuleType('llama_cpp')\n"
            "import pyllama_ssm\n"
            "try:\n    pyllama_ssm.install_as_llama_cpp()\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env("patched"),
                         cwd=ROOT, timeout=120).stdout
    assert "llama_cpp is already imported" in out and "before anything imports llama_cpp" in out


def test_switch_for_programs_that_cannot_call_install(tmp_path):
    """python -m pyllama_ssm.as_llama_cpp PROGRAM: an unedited llama-cpp-python script runs on pyllama-ssm."""
    program = tmp_path / "tool.py"
    program.write_text("import sys, llama_cpp\n"
                       "llm = llama_cpp.Llama(sys.argv[1], n_ctx=128, verbose=False)\n"
                       "print(type(llm).__module__, llama_cpp.llama_cpp.__name__,"
                       " llm.create_completion('Hi', max_tokens=2, temperature=0)['usage']['completion_tokens'])\n")
    env = {**child_env("patched"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pyllama_ssm.as_llama_cpp", str(program), str(zoo_path("qwen35"))],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["pyllama_ssm.llama", "llama_cpp.llama_cpp", "2"]
    usage = subprocess.run([sys.executable, "-m", "pyllama_ssm.as_llama_cpp"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=60)
    assert usage.returncode == 2 and "-m MODULE" in usage.stderr
