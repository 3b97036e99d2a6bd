"""llama-server's own routes on our server: `POST /completion` (and `/completions`), `/tokenize`,
`/detokenize`, `/apply-template` (pyllama_ssm.server.native).

Each answer is checked against the pin's own llama-server (build/upstream/bin/llama-server) on the same
model, the falcon-h1 graft (real text, SmolLM2's tokenizer and chat template): the same tokens and pieces,
the same text, the same rendered prompt, and for /completion the same prompt tokens and, greedy on one
sequence with the kernels llama-server runs (batch invariance and flash attention off on both), the same
answer for each prompt form.  Then what llama-server's clients rely on beyond that: streamed pieces that
end with the totals, several prompts answered as a list, logit_bias and ignore_eos, n_probs' token
probabilities (the same tokens and top tokens as llama-server's), and clear 400s.
"""

from __future__ import annotations

import itertools
import json

import pytest

from conftest import llama_server

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import graft  # noqa: E402

from pyllama_ssm.server.process import ServerProcess  # noqa: E402

N_CTX, N_BATCH = 2048, 512
GREEDY = {"temperature": 0, "n_predict": 8, "return_tokens": True}
# a special token written out, an emoji in pieces that are not whole UTF-8, a space-led text
TEXTS = ["The capital of France is", "<|im_start|>user\nHi 🫠<|im_end|>", " tokens and  spaces"]
MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]


@pytest.fixture(scope="module")
def model():
    path = graft.graft_path("falcon-h1", "f16")
    if not path.exists():
        pytest.skip(f"{path.name} missing: run `make models`")
    return str(path)


@pytest.fixture(scope="module")
def ours(model):
    with ServerProcess("--model", model, "--n_ctx", str(N_CTX), "--n_batch", str(N_BATCH), "--n_parallel", "2",
                       "--n_threads", "2", "--batch_invariant", "false", "--flash_attn", "false",
                       "--verbose", "false") as s:
        yield s


@pytest.fixture(scope="module")
def upstream(model):
    with llama_server(model, "-c", str(N_CTX), "-b", str(N_BATCH), "-np", "1", "-t", "2", "-fa", "off") as url:
        yield url


def post(url: str, route: str, **body) -> dict:
    r = httpx.post(url + route, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("body", [
    *({"content": t} for t in TEXTS),
    {"content": TEXTS[1], "with_pieces": True},
    {"content": TEXTS[0], "add_special": True, "with_pieces": True},
    {"content": TEXTS[1], "parse_special": False},
    {"content": [1, "and then", 2]},
], ids=["plain", "special", "spaces", "pieces", "bos-pieces", "special-as-text", "mixed"])
def test_tokenize_as_llama_server(ours, upstream, body):
    got = post(ours.url, "/tokenize", **body)
    assert got == post(upstream, "/tokenize", **body)
    assert got["tokens"]  # not trivially equal
    if body.get("with_pieces") and "🫠" in body["content"]:
        assert any(isinstance(t["piece"], list) for t in got["tokens"])  # bytes of a partial character


def test_detokenize_as_llama_server(ours, upstream):
    for text in TEXTS:
        tokens = post(upstream, "/tokenize", content=text, add_special=True)["tokens"]
        got = post(ours.url, "/detokenize", tokens=tokens)
        assert got == post(upstream, "/detokenize", tokens=tokens) and got["content"]
    r = httpx.post(ours.url + "/detokenize", json={"tokens": [10**9]}, timeout=30)
    assert r.status_code == 400 and "tokens" in r.json()["error"]["message"]


def test_apply_template_as_llama_server(ours, upstream):
    got = post(ours.url, "/apply-template", messages=MESSAGES)
    assert got == post(upstream, "/apply-template", messages=MESSAGES)
    assert got["prompt"].endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("prompt", [
    "The three primary colours are",
    [1, 504, 3469],
    ["The three primary", 8045, " are"],
], ids=["text", "ids", "mixed"])
def test_completion_as_llama_server(ours, upstream, prompt):
    got, want = post(ours.url, "/completion", prompt=prompt, **GREEDY), post(upstream, "/completion", prompt=prompt,
                                                                             **GREEDY)
    for key in ("content", "tokens", "prompt", "tokens_evaluated", "tokens_predicted", "stop_type", "stop"):
        assert got[key] == want[key], key
    assert len(got["tokens"]) == 8 and got["stop_type"] == "limit"
    assert got["timings"]["predicted_n"] == 8 and got["generation_settings"]["n_predict"] == 8


def test_completion_streams_pieces_then_the_totals(ours):
    with httpx.stream("POST", ours.url + "/completions", json={"prompt": "Once upon a time", "stream": True,
                                                                **GREEDY}, timeout=120) as r:
        assert r.status_code == 200
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]
    *pieces, last = events
    assert pieces and not any(p["stop"] for p in pieces) and last["stop"] is True
    whole = post(ours.url, "/completion", prompt="Once upon a time", **GREEDY)
    assert "".join(p["content"] for p in pieces) == whole["content"]
    assert last["tokens_predicted"] == whole["tokens_predicted"] == 8


def test_several_prompts_answer_as_a_list_in_order(ours):
    prompts = ["The capital of France is", "One, two, three,", "The capital of France is"]
    answers = post(ours.url, "/completion", prompt=prompts, **GREEDY)
    assert [a["index"] for a in answers] == [0, 1, 2]
    alone = [post(ours.url, "/completion", prompt=p, **GREEDY)["content"] for p in prompts[:2]]
    assert [a["content"] for a in answers] == [*alone, alone[0]]


def test_logit_bias_and_ignore_eos(ours, upstream):
    base = post(ours.url, "/completion", prompt="The capital of France is", **GREEDY)
    first = base["tokens"][0]
    for bias in ([[first, False]], {str(first): -100}):
        banned = post(ours.url, "/completion", prompt="The capital of France is", logit_bias=bias, **GREEDY)
        assert banned["tokens"][0] != first
    # a chat turn the model ends ("The capital of France is Paris."): ignore_eos makes it run to n_predict
    chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ended = post(ours.url, "/completion", prompt=chat, temperature=0, n_predict=64)
    assert ended["stop_type"] == "eos" and ended["tokens_predicted"] < 64
    forced = post(ours.url, "/completion", prompt=chat, temperature=0, n_predict=64, ignore_eos=True)
    assert forced["stop_type"] == "limit" and forced["tokens_predicted"] == 64
    # every end-of-generation token, not EOS (<|im_end|>, 2) alone: <|endoftext|> (0) pushed up still never
    # comes, as with llama-server (whose ignore_eos biases them all to -inf after the request's own biases)
    pushed = {"prompt": chat, "logit_bias": [[0, 100]], "ignore_eos": True, **GREEDY}
    got = post(ours.url, "/completion", **pushed)
    assert got["stop_type"] == "limit" and not {0, 2, 4} & set(got["tokens"])
    assert got["tokens"] == post(upstream, "/completion", **pushed)["tokens"]
    plain = post(ours.url, "/completion", **(pushed | {"ignore_eos": False}))  # without it: ends at once
    assert plain["stop_type"] == "eos" and plain["tokens"] == [0]  # the end token listed, as llama-server does
    assert plain["tokens"] == post(upstream, "/completion", **(pushed | {"ignore_eos": False}))["tokens"]


TIE = 0.05  # logprobs: the two builds' f16 products differ in their last bits (by 1e-3 to 1e-2 after 60 tokens)


def _same_top(ours: list[dict], theirs: list[dict]) -> bool:
    """The same top tokens (id, text, bytes) and logprobs, but where two of them tie within TIE, whose order
    the builds' last bits decide, as does which of them makes the cut."""
    by_id = {t["id"]: t for t in theirs}
    for k, t in enumerate(ours):
        other = by_id.get(t["id"])
        if other is None:  # only a near-tie with the last one theirs kept may be left out of theirs
            if abs(t["logprob"] - theirs[-1]["logprob"]) > TIE:
                return False
        elif (other["token"], other["bytes"]) != (t["token"], t["bytes"]) or abs(other["logprob"] - t["logprob"]) > TIE:
            return False
        elif abs(theirs[k]["logprob"] - t["logprob"]) > TIE:  # out of place beyond a tie
            return False
    return len(ours) == len(theirs)


@pytest.mark.parametrize("body", [
    {"prompt": "The capital of France is", "n_probs": 5},
    # ended by <|im_end|>: its entry comes last, as llama-server lists it
    {"prompt": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
     "n_probs": 3, "n_predict": 64},
    # a stop string: its tokens are not listed; `logprobs` is n_probs' other name
    {"prompt": "One, two, three,", "stop": [" five"], "logprobs": 2},
], ids=["limit", "eos", "stop-word"])
def test_n_probs_as_llama_server(ours, upstream, body):
    got, want = (post(url, "/completion", **(GREEDY | body)) for url in (ours.url, upstream))
    assert got["tokens"] == want["tokens"] and got["stop_type"] == want["stop_type"]
    ours, theirs = got["completion_probabilities"], want["completion_probabilities"]
    assert [(p["id"], p["token"], p["bytes"]) for p in ours] == [(p["id"], p["token"], p["bytes"]) for p in theirs]
    n_top = body.get("n_probs") or body["logprobs"]
    for g, w in zip(ours, theirs):
        # the model's logprobs, not the sampler's (logit_bias, ignore_eos) nor another row's, which differ by far more
        assert g["logprob"] == pytest.approx(w["logprob"], abs=TIE) and g["logprob"] <= 0
        assert len(g["top_logprobs"]) == n_top and _same_top(g["top_logprobs"], w["top_logprobs"]), (g, w)
        assert g["top_logprobs"][0]["logprob"] >= g["logprob"]
    if body.get("n_predict") == 64:
        assert got["stop_type"] == "eos" and got["completion_probabilities"][-1]["id"] == got["tokens"][-1] == 2
        assert len(got["completion_probabilities"]) == len(got["tokens"]) == got["tokens_predicted"]
    if "stop" in body:
        assert got["stop_type"] == "word" and len(got["completion_probabilities"]) < len(got["tokens"])


def test_n_probs_streamed_one_token_per_piece(ours):
    body = {"prompt": "The capital of France is", "n_probs": 4, "stream": True, **GREEDY}
    with httpx.stream("POST", ours.url + "/completion", json=body, timeout=120) as r:
        assert r.status_code == 200
        *pieces, last = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [len(p["completion_probabilities"]) for p in pieces] == [1] * 8 and "completion_probabilities" not in last
    whole = post(ours.url, "/completion", **(body | {"stream": False}))
    assert [p["completion_probabilities"][0] for p in pieces] == whole["completion_probabilities"]
    assert "".join(p["content"] for p in pieces) == whole["content"]


def _stream(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url + "/completion", json=body | {"stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]


@pytest.mark.parametrize("body", [
    {"prompt": "The capital of France is"},
    {"prompt": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
     "n_predict": 64},
    {"prompt": "One, two, three,", "stop": [" five"]},
], ids=["limit", "eos", "stop-word"])
def test_streamed_pieces_carry_their_tokens_as_llama_server(ours, upstream, body):
    """Streamed, each piece lists the tokens it came with, the end-of-generation token and a stop string's
    included (llama-server sends one piece per token; a piece held back for a stop string comes with a later
    one of ours), and the totals list none, as llama-server's do."""
    (*pieces, last), (*theirs, their_last) = (_stream(url, GREEDY | body) for url in (ours.url, upstream))
    got = [t for p in pieces for t in p["tokens"]]
    assert got == [t for p in theirs for t in p["tokens"]] and last["tokens"] == their_last["tokens"] == []
    assert got == post(ours.url, "/completion", **(GREEDY | body))["tokens"] and len(got) == last["tokens_predicted"]
    assert [p["tokens_predicted"] for p in pieces] == list(itertools.accumulate(len(p["tokens"]) for p in pieces))
    if body.get("n_predict") == 64:
        assert last["stop_type"] == "eos" and pieces[-1]["tokens"][-1] == 2 and pieces[-1]["content"] == ""


@pytest.mark.parametrize("body, param", [
    ({"prompt": [1, 10**9]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [{"x": 1}, "text"]}, "prompt"),
    ({"prompt": ["a", "b"], "stream": True}, "stream"),
    ({"prompt": "a", "n_probs": -1}, "n_probs"),
    ({"prompt": "a", "n_probs": 2**31 - 2}, "n_probs"),  # an entry per top token and generated token: at most 1024
    ({"prompt": "a", "n_probs": 3, "post_sampling_probs": True}, "post_sampling_probs"),
    ({"prompt": "a", "logit_bias": [[1, "high"]]}, "logit_bias"),
], ids=["token-out-of-range", "empty", "not-a-prompt", "stream-several", "n-probs", "n-probs-huge",
        "post-sampling-probs", "bad-bias"])
def test_bad_requests_name_the_field(ours, body, param):
    r = httpx.post(ours.url + "/completion", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith(f"{param}")


def test_a_probability_entrys_text_stops_before_an_unfinished_character():
    """llama-server's validate_utf8: a piece ending inside a character (byte-level tokens of an emoji) shows the
    text before it and keeps every byte; -inf (a banned token) is the lowest float, as JSON has no infinity."""
    from pyllama_ssm.server.native import _entry
    emoji = "🫠".encode()
    assert _entry(7, b"ab" + emoji[:3], -1.5) == {"id": 7, "token": "ab", "bytes": list(b"ab" + emoji[:3]),
                                                  "logprob": -1.5}
    assert _entry(8, emoji, float("-inf"))["token"] == "🫠"
    assert _entry(8, emoji, float("-inf"))["logprob"] == -3.4028234663852886e38
