"""A model split across machines through llama.cpp's RPC backend: two ggml-rpc-server processes on 127.0.0.1.

On both builds, the logits of a prompt and the greedy tokens (with their
log-probabilities) of two sequences decoded together by the Engine equal a
local run; the server takes --rpc_servers too.  Endpoints that are malformed,
closed, silent or not RPC servers raise an error naming them, within the
timeout, where llama.cpp itself would abort the process.
"""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, run_with_build, zoo_path

from pyllama_ssm import Llama, Model, rpc
from pyllama_ssm.errors import RpcError
from pyllama_ssm.server.process import ServerProcess

RPC_SERVER = ROOT / "build" / "upstream" / "bin" / "ggml-rpc-server"
SERVER_MEMORY = 2 << 30  # address space of each rpc-server: the tiny model needs tens of MiB
TOLERANCE = 1e-4

# local run vs layer 0 on the first server, the other layers and the output on the second
COMPARE = r"""
import json, logging, sys
import numpy as np
from pyllama_ssm import Model
from pyllama_ssm.bindings import ffi, lib
from pyllama_ssm.context import Context
from pyllama_ssm.engine import Engine
from pyllama_ssm.sampling import SamplingParams

path, endpoints = sys.argv[1], sys.argv[2].split(",")
buffers = []  # llama.cpp's "<device> model buffer size = ..." lines: where the weights went
handler = logging.Handler()
handler.emit = lambda record: buffers.append(record.getMessage()) if "model buffer size" in record.getMessage() else None
logging.getLogger("pyllama_ssm.llama").addHandler(handler)
logging.getLogger("pyllama_ssm.llama").setLevel(logging.DEBUG)
split = ffi.new("float[]", [1.0, 2.0] + [0.0] * (lib.llama_max_devices() - 2))

def run(**model_kw):
    with Model(path, **model_kw) as model:
        # flash attention off: the servers are the pristine build's, patch 0009 changes its decode order
        with Context(model, n_ctx=256, n_seq_max=1, flash_attn=False) as ctx:
            logits = np.array(ctx.decode_tokens(model.tokenize("The state of the art is"), seq_id=0), np.float64)
        with Engine(model, n_ctx=512, parallel=2, n_batch=64, flash_attn=False) as engine:
            # submitted from the engine thread between two steps, both join the same first step in both runs:
            # another batch composition alone changes the rounding (~1e-4 in logprobs)
            reqs = engine.call(lambda: [engine.submit(p, SamplingParams(temperature=0), max_tokens=6, logprobs=1)
                                         for p in ("Hello world", "Once upon a time in a recurrent network")])
            done = [r.result(timeout=120) for r in reqs]
    return logits, [r.tokens for r in done], np.array([r.logprobs for r in done])

# the RPC servers' CPU backends have no extra buffer types (AMX, repacked weights): the same plain kernels here
local_logits, local_tokens, local_lp = run(overrides={"use_extra_bufts": False})
remote_logits, remote_tokens, remote_lp = run(n_gpu_layers=999, rpc_servers=endpoints, overrides={"tensor_split": split})
print(json.dumps({"logits_diff": float(np.abs(local_logits - remote_logits).max()),
                  "logprob_diff": float(np.abs(local_lp - remote_lp).max()),
                  "local_tokens": local_tokens, "remote_tokens": remote_tokens,
                  "rpc_buffers": [b for b in buffers if "RPC" in b]}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _small_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (SERVER_MEMORY, SERVER_MEMORY))


@pytest.fixture(scope="module")
def endpoints():
    """Two rpc-servers (one CPU thread, 2 GiB of address space each), killed at the end."""
    if not RPC_SERVER.exists():
        pytest.skip("ggml-rpc-server is not built: run `make build`")
    procs: list[subprocess.Popen] = []
    try:
        found = []
        for _ in range(2):
            port = free_port()
            procs.append(subprocess.Popen([str(RPC_SERVER), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                          preexec_fn=_small_address_space))
            found.append(f"127.0.0.1:{port}")
        for endpoint, proc in zip(found, procs):
            deadline = time.monotonic() + 10
            while True:
                try:
                    rpc.probe(endpoint, 1.0)
                    break
                except RpcError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        proc.kill()
                        pytest.fail(f"ggml-rpc-server on {endpoint} did not start: {proc.communicate()[1]}")
                    time.sleep(0.05)
        yield found
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("build", ["upstream", "patched"])
def test_split_across_two_rpc_servers_gives_the_local_logits(endpoints, build):
    out = json.loads(run_with_build(build, COMPARE, str(zoo_path("qwen35")), ",".join(endpoints), timeout=300))
    assert out["logits_diff"] <= TOLERANCE and out["logprob_diff"] <= TOLERANCE, out
    assert out["remote_tokens"] == out["local_tokens"] and all(len(t) == 6 for t in out["local_tokens"])
    for endpoint in endpoints:  # weights went to both machines
        assert any(endpoint in line for line in out["rpc_buffers"]), out["rpc_buffers"]


def test_the_server_serves_a_split_model(endpoints):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    body = {"prompt": "The state of the art", "temperature": 0, "max_tokens": 8}
    with Llama(str(zoo_path("qwen35")), n_ctx=512, n_parallel=2, verbose=False) as local:
        expected = local.create_completion(**body)["choices"][0]["text"]
    with ServerProcess("--model", str(zoo_path("qwen35")), "--n_ctx", "512", "--n_parallel", "2", "--n_threads", "2",
                       "--n_gpu_layers", "999", "--rpc_servers", ",".join(endpoints), "--verbose", "false") as server:
        answer = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    assert answer["choices"][0]["text"] == expected


# -- endpoints that do not work ------------------------------------------------------------------------

@pytest.mark.parametrize("servers", ["localhost", "127.0.0.1:", ":50052", "127.0.0.1:http", "127.0.0.1:0",
                                     "127.0.0.1:70000", "127.0.0.1:1:2", "", "127.0.0.1:5,127.0.0.1:5"])
def test_malformed_endpoints_are_value_errors_naming_them(servers):
    with pytest.raises(ValueError, match="rpc_servers") as caught:
        Model(zoo_path("qwen35"), rpc_servers=servers)
    assert servers.split(",")[0] in str(caught.value)


def test_rpc_servers_of_the_wrong_type_are_type_errors():
    for servers in (5, ["127.0.0.1:5", 6]):
        with pytest.raises(TypeError, match="rpc_servers"):
            Model(zoo_path("qwen35"), rpc_servers=servers)


def test_nothing_listening_is_an_rpc_error_naming_the_endpoint():
    endpoint = f"127.0.0.1:{free_port()}"
    with pytest.raises(RpcError, match=f"cannot reach {endpoint}"):
        Llama(str(zoo_path("qwen35")), n_gpu_layers=999, rpc_servers=endpoint, verbose=False)


@pytest.fixture
def listener():
    """A TCP port that accepts connections; answer(conn) runs on each, if set."""
    sock = socket.create_server(("127.0.0.1", 0))
    handlers: list = []

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            for handle in handlers:
                handle(conn)

    threading.Thread(target=serve, daemon=True).start()
    yield f"127.0.0.1:{sock.getsockname()[1]}", handlers
    sock.close()


def test_a_silent_endpoint_times_out(listener, monkeypatch):
    endpoint, _ = listener  # accepts, never answers HELLO (llama.cpp would wait forever)
    monkeypatch.setattr(rpc, "TIMEOUT_S", 0.5)
    t0 = time.monotonic()
    with pytest.raises(RpcError, match=f"{endpoint} did not answer within 0.5s"):
        Model(zoo_path("qwen35"), n_gpu_layers=999, rpc_servers=endpoint)
    assert time.monotonic() - t0 < 3


@pytest.mark.parametrize("answer,error", [
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "answered HELLO with .* not a ggml-rpc-server"),
    (b"", "broke off the HELLO handshake: it closed the connection")])
def test_an_endpoint_that_is_not_an_rpc_server(listener, answer, error):
    endpoint, handlers = listener
    handlers.append(lambda conn: (conn.sendall(answer), conn.close()))
    with pytest.raises(RpcError, match=f"rpc_servers: {endpoint} {error}"):
        Model(zoo_path("qwen35"), n_gpu_layers=999, rpc_servers=[endpoint])


def test_the_server_refuses_to_start_on_a_bad_endpoint():
    pytest.importorskip("fastapi")
    endpoint = f"127.0.0.1:{free_port()}"
    proc = subprocess.run([sys.executable, "-m", "pyllama_ssm.server", "--model", str(zoo_path("qwen35")),
                           "--rpc_servers", endpoint], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1 and f"cannot reach {endpoint}" in proc.stderr, proc.stderr
