"""bench/chat_sessions.py's own parts: the seeded conversations and what it reads from servers' logs.

The bench itself starts five servers and runs for minutes; here, only what its
figures rest on: the same script for every server, prompts counted through the
model's chat template, and the log lines it turns into cache bytes and computed
prompt tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.chat_sessions import MiB, Tokenizer, log_figures, script  # noqa: E402

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
