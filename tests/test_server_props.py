"""llama-server's `GET /props` and `GET /slots` on our server (issue #29), and `GET /slots/prefix_cache`.

/props tells how the model is served (context, slots, the chat template, batch invariance, flash
attention, the build) with llama-server's field names; /slots what each of the Engine's sequences
is doing while requests run: idle, or decoding a prompt of so many tokens, so many generated, so
many taken from the prefix cache, whose entries /slots/prefix_cache lists with their sizes.
"""

from __future__ import annotations

import contextlib

import pytest

from conftest import zoo_path

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from pyllama_ssm.bindings import has  # noqa: E402
from pyllama_ssm.server.process import ServerProcess  # noqa: E402

N_CTX = 2048
PROMPT = "A hybrid model keeps two memories: a recurrent state and a cache of keys. " * 6
LONG = {"max_tokens": 1500, "min_tokens": 1500, "temperature": 0, "stream": True}


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--model", str(zoo_path("qwen35")), "--model_alias", "qwen", "--n_ctx", str(N_CTX),
                       "--n_parallel", "2", "--n_threads", "2", "--verbose", "false") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@contextlib.contextmanager
def decoding(client: httpx.Client, prompt: str):
    """A long streamed completion, its first chunk read: its sequence is decoding until the block ends."""
    with client.stream("POST", "/v1/completions", json={"prompt": prompt, **LONG}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: a dropped iterator closes the response, which cancels the request
        assert next(lines).startswith("data: ")
        yield


def test_props_say_how_the_model_is_served(client):
    props = client.get("/props").json()
    assert props["total_slots"] == props["n_parallel"] == 2
    assert props["n_ctx"] == props["default_generation_settings"]["n_ctx"] == N_CTX
    assert props["model_alias"] == "qwen" and props["model_path"] == str(zoo_path("qwen35"))
    assert "<|im_start|>" in props["chat_template"] and props["eos_token"]
    assert props["batch_invariant"] is has("llama_set_batch_invariant") and props["flash_attn"] == "auto"
    assert props["build_info"].startswith("pyllama-ssm ") and props["endpoint_slots"] is True
    assert props["prefix_cache"]["entries_max"] > 0 and props["fim_tokens"]["pre"] == -1
    assert props["default_generation_settings"]["params"]["temperature"] == 0.8
    assert client.get("/props", params={"model": "qwen"}).json() == props


def test_slots_follow_the_requests(client):
    idle = client.get("/slots").json()
    assert [(s["id"], s["state"], s["is_processing"], s["n_ctx"]) for s in idle] == \
        [(0, "idle", False, N_CTX), (1, "idle", False, N_CTX)]
    warm = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0}).json()
    n_prompt = warm["usage"]["prompt_tokens"]
    entries = client.get("/slots/prefix_cache").json()
    assert entries["model"] == "qwen" and entries["entries"] and entries["bytes"] > 0
    assert all(0 < e["n_tokens"] <= n_prompt + 2 and e["bytes"] > 0 for e in entries["entries"])
    assert entries["bytes"] == sum(e["bytes"] for e in entries["entries"]) <= entries["bytes_max"]
    with decoding(client, PROMPT):
        slots = client.get("/slots").json()
        (busy,) = [s for s in slots if s["is_processing"]]
        assert busy["state"] == "decode" and busy["n_prompt_tokens"] == n_prompt
        assert 0 < busy["n_prompt_tokens_cache"] < n_prompt  # the prefix the first request left
        assert busy["n_prompt_tokens_processed"] == n_prompt - busy["n_prompt_tokens_cache"]
        assert busy["n_decoded"] >= 1 and busy["next_token"][0]["n_decoded"] == busy["n_decoded"]
        assert busy["n_remain"] == 1500 - busy["n_decoded"]
        assert client.get("/slots", params={"fail_on_no_slot": "1"}).status_code == 200
        with decoding(client, "Another prompt entirely."):
            assert all(s["is_processing"] for s in client.get("/slots").json())
            r = client.get("/slots", params={"fail_on_no_slot": "1"})
            assert r.status_code == 503 and r.json()["error"]["message"] == "no slot available"
