"""Fuzz: mutated and truncated zoo models never kill the process that loads them.

Seeds are zoo models with the vocabulary cut to a few hundred tokens (so one
case costs milliseconds, not the 18 MB copy of a full zoo file); everything
else, hyperparameters, tensors, tokenizer kind, is the zoo model's.  Each case
mutates one seed: a structural field set to an edge value (lengths, counts,
types, dimensions, offsets, integer hyperparameters), random bytes changed in
the header, metadata or tensor table, or the file cut at a random point.

One child process runs the cases in order and reports each outcome: refused by
gguf.read, refused by llama.cpp, or loaded (then a context decodes one token).
Anything else is a failure: another exception type, or the child dying by a
signal, an abort or a hang, in which case the case it was on is recorded and a
new child continues after it.  Cases come from (seed, index) alone, so a
failure is replayed with PYLLAMA_SSM_FUZZ_SEED / --replay.

    PYLLAMA_SSM_FUZZ_CASES=20000 make fuzz          # the long run
    python tests/test_gguf_fuzz.py --replay SEED INDEX  # one case, in this process
"""

from __future__ import annotations

import json
import os
import random
import selectors
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import gguf_writer as gw  # noqa: E402
from pyllama_ssm import gguf  # noqa: E402
from pyllama_ssm.errors import ModelLoadError  # noqa: E402

SEED = int(os.environ.get("PYLLAMA_SSM_FUZZ_SEED", "7"))
CASES = int(os.environ.get("PYLLAMA_SSM_FUZZ_CASES", "3000"))
SEED_MODELS = ("llama", "jamba", "rwkv6", "qwen35")  # attention, mamba hybrid, recurrent, gated-delta hybrid
VOCAB = 384            # tokens kept: specials, the 256 byte tokens, some pieces
CASE_TIMEOUT_S = 30.0  # no progress for this long is a hang


def shrink(src: Path, dst: Path) -> list[gw.Field]:
    """Write src with its vocabulary cut to VOCAB tokens; returns the structural fields of dst."""
    g = gguf.read(src)
    n_vocab = len(g.metadata["tokenizer.ggml.tokens"])
    md = dict(g.metadata)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        md[key] = md[key][:VOCAB]
    md[f"{g.arch}.vocab_size"] = VOCAB
    tensors = []
    for t in gw.tensors_of(g):
        if t.name in ("token_embd.weight", "output.weight") and t.shape[-1] == n_vocab:
            t = gw.Tensor(t.name, t.shape[:-1] + (VOCAB,), t.type_id, t.data[:len(t.data) // n_vocab * VOCAB])
        tensors.append(t)
    return gw.rewrite(g, dst, md, tensors)


def edge_values(size: int, old: int, rng: random.Random) -> list[int]:
    top = 1 << (8 * size)
    values = [0, 1, 2, top - 1, top >> 1, (top >> 1) - 1, old + 1, old - 1, old * 2, old >> 1,
              rng.randrange(top), rng.randrange(1024), 513, 4096]
    return [v % top for v in values]


def mutate(raw: bytes, fields: list[dict], rng: random.Random) -> tuple[bytes, str]:
    """One mutation of a seed file and its description."""
    data = bytearray(raw)
    header_end = max(f["offset"] + f["size"] for f in fields)
    kind = rng.choices(["field", "bytes", "truncate", "string"], weights=[50, 25, 15, 10])[0]
    if kind == "field":
        f = rng.choice(fields)
        old = int.from_bytes(data[f["offset"]:f["offset"] + f["size"]], "little")
        new = rng.choice(edge_values(f["size"], old, rng))
        data[f["offset"]:f["offset"] + f["size"]] = new.to_bytes(f["size"], "little")
        return bytes(data), f"{f['label']}: {old} -> {new}"
    if kind == "bytes":
        spots = sorted(rng.randrange(header_end) for _ in range(rng.randint(1, 8)))
        for at in spots:
            data[at] = rng.randrange(256)
        return bytes(data), f"random bytes at {spots}"
    if kind == "truncate":
        cut = rng.randrange(header_end) if rng.random() < 0.7 else rng.randrange(len(data))
        return bytes(data[:cut]), f"cut at byte {cut} of {len(data)}"
    f = rng.choice([f for f in fields if f["label"].startswith("length of")])  # a string's content
    length = int.from_bytes(data[f["offset"]:f["offset"] + 8], "little")
    if length:
        at = f["offset"] + 8 + rng.randrange(length)
        data[at] = rng.choice(b"\x00\xff.a_ ")
    return bytes(data), f"content of {f['label'][10:]} changed"


def make_case(seed_dir: Path, seed: int, index: int) -> tuple[bytes, str]:
    rng = random.Random(f"{seed}:{index}")
    name = SEED_MODELS[index % len(SEED_MODELS)]
    fields = json.loads((seed_dir / f"{name}.json").read_text())
    data, what = mutate((seed_dir / f"{name}.gguf").read_bytes(), fields, rng)
    return data, f"{name}: {what}"


def run_case(path: Path) -> str:
    """The outcome of loading one file: 'py', 'c', 'ok', or 'bug: ...'."""
    import pyllama_ssm as ps
    try:
        gguf.read(path)
    except ModelLoadError:
        return "py"
    except Exception as e:  # noqa: BLE001 - any other exception is a finding
        return f"bug: gguf.read raised {type(e).__name__}: {e}"
    try:
        with ps.Model(path) as model, ps.Context(model, n_ctx=256, n_batch=32, n_ubatch=32) as ctx:
            ctx.decode_tokens([model.token_bos if 0 <= model.token_bos < model.n_vocab else 0])
    except ModelLoadError:
        return "c"
    except ps.PyllamaError:
        return "ok"  # loaded; the context or decode refused cleanly
    except Exception as e:  # noqa: BLE001
        return f"bug: {type(e).__name__}: {e}"
    return "ok"


def child(seed_dir: Path, seed: int, start: int, stop: int) -> None:
    scratch = seed_dir / f"case-{os.getpid()}.gguf"
    for i in range(start, stop):
        data, _ = make_case(seed_dir, seed, i)
        scratch.write_bytes(data)
        print("CASE", i, run_case(scratch), flush=True)


def fuzz(seed_dir: Path, seed: int, n: int) -> tuple[Counter, list[str]]:
    """Run n cases in as few child processes as the deaths allow; returns outcome counts and failures."""
    counts: Counter = Counter()
    failures: list[str] = []
    start = 0
    env = {**os.environ, "GGML_NO_BACKTRACE": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    while start < n:
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(seed_dir), str(seed), str(start), str(n)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        hung = False
        while True:
            if not sel.select(CASE_TIMEOUT_S):
                hung = True
                proc.kill()
                break
            line = proc.stdout.readline()
            if not line:
                break
            if not line.startswith("CASE "):  # ggml's backtrace of an abort, say
                continue
            _, i, outcome = line.rstrip("\n").split(" ", 2)
            start = int(i) + 1
            counts[outcome.split(":")[0]] += 1
            if outcome.startswith("bug"):
                failures.append(f"case {i} ({make_case(seed_dir, seed, int(i))[1]}): {outcome}")
        rc = proc.wait()
        if start < n and (hung or rc != 0):
            why = f"hung for {CASE_TIMEOUT_S:.0f} s" if hung else f"child died with exit status {rc}"
            failures.append(f"case {start} ({make_case(seed_dir, seed, start)[1]}): {why}")
            counts["died"] += 1
            start += 1
    return counts, failures


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory):
    from conftest import zoo_path
    d = tmp_path_factory.mktemp("fuzz-seeds")
    for name in SEED_MODELS:
        fields = shrink(zoo_path(name), d / f"{name}.gguf")
        (d / f"{name}.json").write_text(json.dumps([f.__dict__ for f in fields]))
    return d


def test_seeds_load(seed_dir):
    """The unmutated seeds are valid models: the mutations start from something llama.cpp accepts."""
    for name in SEED_MODELS:
        assert run_case(seed_dir / f"{name}.gguf") == "ok", name


def test_mutated_models_never_kill_the_process(seed_dir):
    counts, failures = fuzz(seed_dir, SEED, CASES)
    print(f"\nfuzz seed {SEED}: {CASES} cases: {dict(counts)}")
    assert not failures, (f"seed {SEED} (replay: python tests/test_gguf_fuzz.py --replay {SEED} INDEX):\n"
                          + "\n".join(failures[:20]))
    # the run exercised both lines of defence and the loader itself
    assert counts["py"] > CASES // 4 and counts["c"] + counts["ok"] > CASES // 20, dict(counts)


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    elif sys.argv[1] == "--replay":  # rebuilds the seeds, then runs one case here, where a debugger can see it
        import tempfile
        from conftest import zoo_path
        d = Path(tempfile.mkdtemp())
        for name in SEED_MODELS:
            (d / f"{name}.json").write_text(json.dumps([f.__dict__ for f in shrink(zoo_path(name), d / f"{name}.gguf")]))
        data, what = make_case(d, int(sys.argv[2]), int(sys.argv[3]))
        (d / "case.gguf").write_bytes(data)
        print(what, "->", flush=True)
        print(run_case(d / "case.gguf"))
