"""Fill-in-the-middle on the server (issue #29): llama-server's `POST /infill`, and `suffix` on /v1/completions.

The prompt layout is checked against the pin's own llama-server (build/upstream/bin/llama-server) on
the same model, the zoo's granitehybrid (its StarCoder vocabulary has <fim_prefix>, <fim_suffix> and
<fim_middle>): both give the same prompt (the `prompt` field writes it out with its special tokens),
the same number of prompt tokens and, greedy on one sequence, the same completion.  Then what
code-completion clients rely on: streamed pieces ending with the totals, response_fields, n_indent,
the fields llama.vim sends, and a clear 400 for a model without FIM tokens.
"""

from __future__ import annotations

import json

import pytest

from conftest import llama_server, zoo_path

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from pyllama_ssm.server.process import ServerProcess  # noqa: E402

N_CTX, N_BATCH = 2048, 512
PREFIX, SUFFIX = "def fibonacci(n):\n    ", "\n    return a\n\nprint(fibonacci(10))\n"
EXTRA = [{"filename": "util.py", "text": "def square(x):\n    return x * x\n"}, {"text": "VALUE = 3\n"}]
GREEDY = {"temperature": 0, "n_predict": 8, "return_tokens": True}


@pytest.fixture(scope="module")
def model():
    return str(zoo_path("granitehybrid"))


@pytest.fixture(scope="module")
def ours(model):
    with ServerProcess("--model", model, "--n_ctx", str(N_CTX), "--n_batch", str(N_BATCH), "--n_parallel", "1",
                       "--n_threads", "2", "--verbose", "false") as s:
        yield s


@pytest.fixture(scope="module")
def upstream(model):
    with llama_server(model, "-c", str(N_CTX), "-b", str(N_BATCH), "-np", "1", "-t", "2", "-fa", "off") as url:
        yield url


def infill(url: str, **body) -> dict:
    r = httpx.post(url + "/infill", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("request_body", [
    {"input_prefix": PREFIX, "input_suffix": SUFFIX},
    {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": EXTRA, "prompt": "a, b = 0, 1"},
], ids=["prefix-suffix", "extra-and-prompt"])
def test_the_same_prompt_and_answer_as_llama_server(ours, upstream, request_body):
    theirs, mine = infill(upstream, **request_body, **GREEDY), infill(ours.url, **request_body, **GREEDY)
    assert mine["prompt"] == theirs["prompt"]
    assert "<fim_prefix>" in mine["prompt"] and mine["prompt"].endswith("<fim_middle>")
    assert mine["tokens_evaluated"] == theirs["tokens_evaluated"]
    assert (mine["tokens"], mine["tokens_predicted"], mine["stop_type"]) == \
        (theirs["tokens"], theirs["tokens_predicted"], theirs["stop_type"])
    # the same tokens; a piece that is not whole UTF-8 is dropped here, written as U+FFFD there
    assert mine["content"] == theirs["content"].replace("\ufffd", "")
    assert set(theirs) <= set(mine) | {"completion_probabilities"}, set(theirs) - set(mine)
    assert set(theirs["timings"]) <= set(mine["timings"])


def test_suffix_on_completions_is_the_same_prompt(ours, upstream):
    """llama-cpp-python's suffix: the prompt is the prefix; no extra context."""
    r = httpx.post(ours.url + "/v1/completions", json={"prompt": PREFIX, "suffix": SUFFIX, "temperature": 0,
                                                        "max_tokens": 8}, timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    theirs = infill(upstream, input_prefix=PREFIX, input_suffix=SUFFIX, **GREEDY)
    assert answer["usage"]["prompt_tokens"] == theirs["tokens_evaluated"]
    assert answer["choices"][0]["text"] == theirs["content"].replace("\ufffd", "")


def test_streamed_pieces_end_with_the_totals(ours):
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, **GREEDY}
    whole = infill(ours.url, **body)
    with httpx.stream("POST", ours.url + "/infill", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and "data: [DONE]" not in lines
    events = [json.loads(line.removeprefix("data: ")) for line in lines]
    pieces, last = events[:-1], events[-1]
    assert pieces and not any(p["stop"] for p in pieces) and last["stop"] is True
    assert "".join(p["content"] for p in pieces) == whole["content"] and last["content"] == ""
    assert last["tokens_predicted"] == whole["tokens_predicted"] == 8 and last["stop_type"] == "limit"
    assert last["timings"]["predicted_n"] == 8 and last["timings"]["prompt_n"] + last["timings"]["cache_n"] == \
        whole["tokens_evaluated"]


def test_what_llama_vim_sends(ours):
    code = "x = 1\n    y = 2\n  z = 3\nw = 4\n"
    forced = {"grammar": "root ::= " + json.dumps(code)}
    body = {"input_prefix": "if True:\n", "input_suffix": "", "input_extra": [], "prompt": "    ", "n_predict": 40,
            "temperature": 0, "stop": [], "n_indent": 4, "top_k": 40, "top_p": 0.99,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "t_max_prompt_ms": 500,
            "t_max_predict_ms": 60000, "response_fields": ["content", "timings/prompt_n", "timings/predicted_n",
                                                          "tokens_cached", "stop_type", "nowhere/at_all"], **forced}
    answer = infill(ours.url, **body)
    # the first line continues the prompt's; "  z" is indented less than 4: cut after its indentation
    assert answer == {"content": "x = 1\n    y = 2\n  ", "timings/prompt_n": answer["timings/prompt_n"],
                      "timings/predicted_n": answer["timings/predicted_n"],
                      "tokens_cached": answer["tokens_cached"], "stop_type": "limit"}
    streamed = httpx.post(ours.url + "/infill", json={**body, "stream": True, "response_fields": None}, timeout=120)
    events = [json.loads(line.removeprefix("data: ")) for line in streamed.text.splitlines() if line]
    assert "".join(e["content"] for e in events) == answer["content"]
    assert infill(ours.url, **{**body, "n_indent": 0, "response_fields": ["content"]})["content"] == code


def test_stop_words_and_return_tokens(ours):
    forced = {"grammar": 'root ::= "a = 1; b = 2; c = 3"'}
    answer = infill(ours.url, input_prefix="", input_suffix="", temperature=0, n_predict=30, stop=["b ="],
                    return_tokens=True, **forced)
    assert (answer["content"], answer["stop_type"], answer["stopping_word"]) == ("a = 1; ", "word", "b =")
    assert answer["tokens"] and len(answer["tokens"]) == answer["tokens_predicted"]


def test_a_model_without_fim_tokens_says_so():
    with ServerProcess("--model", str(zoo_path("qwen35")), "--n_ctx", "512", "--n_threads", "2",
                       "--verbose", "false") as server:
        r = httpx.post(server.url + "/infill", json={"input_prefix": "a", "input_suffix": "b"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        assert "no <fim_pre> (prefix), <fim_suf> (suffix), <fim_mid> (middle) token" in r.json()["error"]["message"]
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "suffix": "b", "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
        schema = httpx.get(server.url + "/openapi.json").json()
        assert "/infill" not in schema["paths"]
        assert schema["components"]["schemas"]["CreateCompletionRequest"]["properties"]["suffix"]["type"] == "null"
