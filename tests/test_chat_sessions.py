"""bench/chat_sessions.py's own parts: the seeded conversations and what it reads from servers' logs.

The bench itself starts five servers and runs for minutes; here, only what its
figures rest on: the same script for every server, prompts counted through the
model's chat template, the log lines it turns into cache bytes and computed
prompt tokens, and how a capped run's unfinished requests count.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.chat_sessions import MiB, Tokenizer, checks, compare, log_figures, script, summarize  # noqa: E402

MODEL = ROOT / "build" / "models" / "qwen35-tiny.gguf"


@pytest.fixture(scope="module")
def tok():
    if not MODEL.exists():
        pytest.skip(f"{MODEL} is missing: python tests/models/generate.py")
    t = Tokenizer(MODEL)
    yield t
    t.close()


def test_script_is_seeded_and_sized(tok):
    a = script(tok, users=3, turns=4, system_tokens=1500, seed=18)
    assert a == script(tok, users=3, turns=4, system_tokens=1500, seed=18)
    assert a != script(tok, users=3, turns=4, system_tokens=1500, seed=19)
    assert 1350 <= a["system_tokens"] <= 1650
    sizes = [tok.count(m) for user in a["messages"] for m in user]
    assert min(sizes) >= 40 and max(sizes) <= 340, sizes
    assert len({m for user in a["messages"] for m in user}) == 12  # every message its own
    assert all(0.2 <= t <= 1.0 for user in a["think"] for t in user)


def test_prompt_tokens_follow_the_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    n = tok.prompt_tokens(messages)
    # ChatML: <|im_start|>system\n...<|im_end|>\n<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n
    assert n > tok.count("Be brief.") + tok.count("Hello there") + 6
    longer = messages + [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "More"}]
    assert tok.prompt_tokens(longer) > n


def test_llama_server_log_gives_checkpoints_and_cache():
    log = "\n".join([
        "slot update_slots: id  0 | task 3 | created context checkpoint 1 of 32 (pos_min = 0, pos_max = 99, "
        "n_tokens = 100, size = 2.500 MiB)",
        "slot update_slots: id  1 | task 4 | created context checkpoint 1 of 32 (pos_min = 0, pos_max = 99, "
        "n_tokens = 100, size = 2.500 MiB)",
        "slot update_slots: id  0 | task 9 | erasing old context checkpoint (pos_min = 0, pos_max = 99, "
        "n_tokens = 100, size = 2.500 MiB)",
        "srv  update:  - cache state: 3 prompts, 12.000 MiB (limits: 8192.000 MiB, 16384 tokens, 8000 est)"])
    out = log_figures("llama-server", log)
    assert out["checkpoints_created"] == 2 and out["checkpoint_mib"] == 2.5
    assert out["checkpoints_live_bytes"] == int(2.5 * MiB)
    assert out["cache_ram_prompts"] == 3 and out["cache_ram_bytes"] == 12 * MiB
    assert out["cache_bytes"] == int(2.5 * MiB) + 12 * MiB


def test_llama_cpp_python_log_gives_prompt_evals():
    log = ("llama_perf_context_print: prompt eval time =     120.50 ms /   428 tokens (    0.28 ms per token)\n"
           "llama_perf_context_print:        eval time =      50.00 ms /     7 runs\n"
           "llama_perf_context_print: prompt eval time =      99.00 ms /    61 tokens (    1.62 ms per token)\n")
    assert log_figures("llama-cpp-python", log) == {"computed": 489, "prompt_evals": 2, "cache_bytes": 0}


def _run(server: str, records: list[dict], seconds: float, capped: bool) -> dict:
    return {"server": server, "records": records, "seconds": seconds, "capped": capped, "peak_rss": 1 << 30,
            "cache_bytes": 0}


def _done(user: int, turn: int, ttft: float) -> dict:
    return {"user": user, "turn": turn, "start": 0.0, "new_tokens": 10, "parted_tokens": 10, "ttft": ttft,
            "seconds": ttft + 1, "tokens": 8, "finish": "length"}


def test_a_capped_runs_waiting_requests_count_as_lower_bounds():
    """A server the time cap stopped served only some requests; timing those alone (the survivors, which it
    served first) made it look fast.  A request still waiting counts as at least what it had waited, one
    cut mid-answer as its first token's time (and its streamed tokens in tokens/s), and a figure resting
    on the former is a lower bound: our ratio to it an upper bound, which meets a lower-is-better target
    only from below."""
    import argparse
    args = argparse.Namespace(users_now=4, turns=2)
    ours = [_run("pyllama-ssm", [_done(u, k, 1.0 + u) for u in range(4) for k in (1, 2)], 30, False)]
    waiting = [{"user": u, "turn": 1, "start": 0.0, "new_tokens": 10, "parted_tokens": 10, "error": "cut",
                "cut": True, "ttft_atleast": 100.0} for u in (2, 3)]
    mid_answer = {"user": 1, "turn": 1, "start": 0.0, "new_tokens": 10, "parted_tokens": 10, "error": "cut",
                  "cut": True, "first_token": 50.0, "streamed": 5}
    theirs = [_run("llama-server", [_done(0, 1, 20.0), mid_answer] + waiting, 100, True)]
    rows = [summarize(ours, args, 100), summarize(theirs, args, 100)]
    slow = rows[1]
    # turn 1: 20, 50 (cut mid-answer), >= 100, >= 100: the median rests on a wait still going on
    assert slow["completed"] == 1 and slow["ttft_turn1_p50"] == 75.0 and slow["ttft_turn1_p50_atleast"]
    assert slow["tokens"] == 8 + 5, "what it streamed before the cap counts in its tokens/s"
    assert rows[0]["ttft_turn1_p50"] == 2.5 and not rows[0]["ttft_turn1_p50_atleast"]
    ratio = next(c for c in compare(rows) if c["metric"] == "ttft_turn1_p50")["ratio"]
    assert ratio["median"] == 2.5 / 75.0 and ratio["bound"] == "at most"
    verdict = next(c for c in checks(rows, compare(rows)) if c["target"].startswith("TTFT p50 turn 1"))["verdict"]
    assert verdict.startswith("met (the ratio is at most this")


def test_sse_lines_end_at_cr_and_lf_only():
    """llama-server's JSON leaves U+2028, U+0085 or \\x1c raw in a token's text; httpx's aiter_lines ends lines
    there too (str.splitlines), which cut a random model's answer into broken JSON and failed the request."""
    import asyncio

    from bench.load import sse_lines

    class Response:
        async def aiter_text(self):
            for part in ['data: {"a": "x\u2028y\x85"}\r', '\ndata: "p\x1cq', '"\n\ndata: [DONE]']:
                yield part

    async def lines():
        return [line async for line in sse_lines(Response()) if line]
    assert asyncio.run(lines()) == ['data: {"a": "x\u2028y\x85"}', 'data: "p\x1cq"', "data: [DONE]"]


def test_paced_turns_are_due_on_a_schedule_and_waits_count_from_then(tok, monkeypatch):
    """--pace: a turn is sent when due (u * stagger + k * pace + the think times before it), or as soon as the
    previous answer came when that was later, and its TTFT counts from when it was due: a server that falls
    behind is charged for it, and one that keeps up gets the same arrivals as any other."""
    import argparse
    import asyncio
    import json
    import time

    import httpx

    import bench.chat_sessions as cs

    sent = []

    async def app(scope, receive, send):  # an OpenAI chat server whose first answer takes 1 s
        body = json.loads((await receive())["body"])
        sent.append(time.perf_counter())
        await asyncio.sleep(1.0 if len(body["messages"]) == 2 else 0.02)
        events = [{"choices": [{"delta": {"content": "hi"}, "finish_reason": None}]},
                  {"choices": [{"delta": {}, "finish_reason": "stop"}]}]
        payload = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": payload.encode()})

    class Client(httpx.AsyncClient):
        def __init__(self, **kw):
            super().__init__(transport=httpx.ASGITransport(app=app), **kw)

    monkeypatch.setattr(cs.httpx, "AsyncClient", Client)
    conv = {"system": "Be brief.", "messages": [["one", "two", "three"]], "think": [[0.1, 0.1, 0.1]]}
    args = argparse.Namespace(users_now=1, turns=3, stagger=0.0, pace=0.5, max_tokens=4, request_timeout=30)
    out = asyncio.run(cs.drive("http://test", conv, tok, args, cap=None))
    first, second, third = sorted(out["records"], key=lambda r: r["turn"])
    assert [r["due"] for r in (first, second, third)] == pytest.approx([0.0, 0.6, 1.2])
    # the first answer came after 1 s: the second turn went then, 0.4 s late, and its wait counts the lateness
    assert second["start"] == pytest.approx(1.0, abs=0.15) and second["late"] == pytest.approx(0.4, abs=0.15)
    assert second["ttft"] >= second["late"]
    # the third was due after the second's answer: sent on time
    assert third["late"] < 0.05 and sent[2] - sent[0] == pytest.approx(1.2, abs=0.1)
