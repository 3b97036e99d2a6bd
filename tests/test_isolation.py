"""Isolation under load: no conversation ever resumes from another one's state.

(llama-server's RAM prompt cache once restored an unrelated conversation under
concurrent load, upstream issue #27148.)  16 multi-turn conversations, each
with its own secret, run at once on few sequences and little memory: prefix
hits (the shared system prompt and each conversation's earlier turns),
evictions, preemption to host memory, and for n_parallel=1 the disk cache.
Every answer must equal the same prompt's answer alone (or part from it only
at a near-tie, where batching's rounding may decide), and every restored state
must hold a prefix of the request's own prompt: beyond the shared system
prompt, one that carries the request's own secret.  The Engine records the
prefix each sequence was restored from; a disk cache file must hold the state
of the key it was chosen for, of which a Llama keeps only the part it shares
with the prompt (a recurrent state: all or nothing).
"""

from __future__ import annotations

import random
import threading

import pytest

import pyllama_ssm as ps
from conftest import loaded_model, zoo_model, zoo_names, zoo_path
from pyllama_ssm.engine import Engine
from pyllama_ssm.llama_cache import LlamaDiskCache, longest_token_prefix
from pyllama_ssm.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)
TIE_NATS = 0.02  # as bench/soak.py: a top-2 log-probability gap that rounding may decide
SYSTEM = "System: you are the keeper of secrets. Never tell one conversation what another one said. " * 2
N_CONVERSATIONS, TURNS, N_GEN = 16, 3, 8
WORDS = "amber basalt cobalt dune ember fjord garnet harbor indigo jasper kelp lagoon".split()


def secrets() -> list[str]:
    rng = random.Random(27148)
    return [" ".join(rng.choice(WORDS) for _ in range(4)) + f" {i:02d}" for i in range(N_CONVERSATIONS)]


def shared_part(tokenize) -> list[int]:
    """What every conversation starts with; the secret's tokens come right after it."""
    return tokenize(SYSTEM) + tokenize("The secret is", False)


def opening(tokenize, secret: str) -> list[int]:
    return shared_part(tokenize) + tokenize(f" {secret}", False) + tokenize(". User: say it. Assistant:", False)


def conversation_of(tokenize, prompt: list[int], all_secrets: list[str]) -> int:
    return next(i for i, s in enumerate(all_secrets) if prompt[:len(opening(tokenize, s))] == opening(tokenize, s))


def next_turn(tokenize, prompt: list[int], answer: list[int], turn: int) -> list[int]:
    return prompt + answer + tokenize(f" User: and again, turn {turn}? Assistant:", False)


def converse(run, tokenize, secret: str) -> list[tuple[list[int], list[int]]]:
    """(prompt, answer tokens) of each turn; run(prompt) -> answer tokens."""
    prompt, out = opening(tokenize, secret), []
    for turn in range(TURNS):
        answer = run(prompt)
        out.append((prompt, answer))
        prompt = next_turn(tokenize, prompt, answer, turn + 1)
    return out


def check_restored(restored: list[int] | tuple[int, ...] | None, prompt: list[int], shared: int,
                   secret_tokens: list[int]) -> None:
    """A restored state holds a prefix of the prompt; past the shared system prompt, one with this secret."""
    if not restored:
        return
    restored = list(restored)
    assert restored == prompt[:len(restored)], "restored from a state that is not a prefix of the prompt"
    if len(restored) > shared + len(secret_tokens):
        text = restored[shared:shared + len(secret_tokens)]
        assert text == secret_tokens, "restored from another conversation's state"


def run_all(run_one, tokenize, all_secrets: list[str]) -> list[list[tuple[list[int], list[int]]]]:
    results: list = [None] * len(all_secrets)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            results[i] = converse(run_one, tokenize, all_secrets[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(all_secrets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert all(r is not None for r in results), "a conversation did not finish"
    return results


def check_answer(answer: list[int], alone: ps.engine.Completion, what: str) -> bool:
    """answer equals the same prompt's answer alone, or parts from it at a near-tie (returns True then).

    A batch of other sequences, or a prefix computed in another chunk, changes the kernels'
    rounding (~1e-3 on logits): that may flip two candidates within TIE_NATS, never more.
    """
    if answer == alone.tokens:
        return False
    k = next((i for i, (a, b) in enumerate(zip(answer, alone.tokens)) if a != b), min(len(answer), len(alone.tokens)))
    best = sorted(alone.top_logprobs[k].values(), reverse=True) if k < len(alone.top_logprobs) else [0.0]
    gap = best[0] - best[1] if len(best) > 1 else float("inf")
    assert gap <= TIE_NATS, f"{what}: parts from the prompt's answer alone at token {k}, not a near-tie ({gap:.4f})"
    return True


# roomy: the cache keeps most conversations' earlier turns (hits on them, some evictions);
# tight: memory for about two sequences of four (swaps to host, the cache cleared for room)
SETUPS = {"roomy": {"n_ctx": 2048, "prefix_cache": 40}, "tight": {"n_ctx": 192, "prefix_cache": 8}}


# llama.cpp's default kernels, and batch-invariant ones (patch 0007): with those, load and prefix hits
# must not change an answer at all, so no near-tie parting is allowed
KERNELS = {"default": {}, "invariant": {"flash_attn": True, "batch_invariant": True}}


GRAFT = "falcon-h1-graft"  # real text (tests/models/graft.py): answers with clear margins, no near-ties


def isolation_model(name: str) -> ps.Model:
    if name != GRAFT:
        return zoo_model(name)
    import graft
    path = graft.graft_path("falcon-h1", "q4_k_m")
    if not path.exists():
        pytest.skip(f"{path.name} missing: run `make models`")
    # with ggml's extra buffers (AMX, repacked), as Engine and Llama load it for batch_invariant too
    return loaded_model(path)


# the graft with the invariant kernels only: on real weights llama.cpp's default kernels part answers
# under load by more than a near-tie (0.086 nats measured; the drift issue #26 is about)
@pytest.mark.parametrize("name,setup,kernels", [(n, s, k) for n in zoo_names() if n in ("qwen35", "llama", "mamba2")
                                                for s in SETUPS if not (n == "mamba2" and s == "tight")
                                                for k in KERNELS] + [(GRAFT, "roomy", "invariant")])
def test_concurrent_conversations_never_restore_each_other(name, setup, kernels):
    model = isolation_model(name)
    tokenize = lambda text, special=True: model.tokenize(text, add_special=special)  # noqa: E731
    all_secrets = secrets()
    shared = len(shared_part(tokenize))
    done: list[tuple[list[int], ps.engine.Request, int]] = []  # (prompt, request, conversation)
    with Engine(model, parallel=4, **SETUPS[setup], **KERNELS[kernels]) as e:  # 4 sequences for 16 conversations
        evictions = 0
        evict_one = e.cache.evict_one

        def counting_evict() -> bool:
            nonlocal evictions
            evictions += 1
            return evict_one()

        e.cache.evict_one = counting_evict

        def run_one(prompt: list[int]) -> list[int]:
            req = e.submit(prompt, GREEDY, max_tokens=N_GEN)
            tokens = req.result(timeout=120).tokens
            done.append((prompt, req, conversation_of(tokenize, prompt, all_secrets)))
            return tokens

        run_all(run_one, tokenize, all_secrets)
        hits = e.stats().prefix_hits
    near_ties = 0
    with Engine(model, n_ctx=512, parallel=1, prefix_cache=0, **KERNELS[kernels]) as alone:
        for prompt, req, i in done:
            done_req = req.result()
            check_restored(done_req.restored_from, prompt, shared, tokenize(f" {all_secrets[i]}", False))
            near_ties += check_answer(done_req.tokens, alone.generate(prompt, GREEDY, max_tokens=N_GEN, logprobs=2),
                                      f"conversation {i}")
    own = sum(1 for _, req, _ in done if req.result().restored_from and len(req.result().restored_from) > shared)
    preempted = sum(req.result().preemptions for _, req, _ in done)
    print(f"{name} {setup} {kernels}: {len(done)} answers, {near_ties} near-tie partings, {hits} prefix hits ({own} on a "
          f"conversation's own turns), {evictions} evictions, {preempted} swaps to host")
    assert len(done) == N_CONVERSATIONS * TURNS and near_ties <= (0 if kernels == "invariant" else len(done) // 8)
    # the load did what it is meant to: hits on earlier turns and evictions, or swaps to host
    assert evictions >= 1
    if setup == "roomy":
        assert own >= N_CONVERSATIONS, "few prefix hits on a conversation's own turns"
    else:
        assert preempted >= 1, "no sequence was swapped out to host memory"


class RecordingDiskCache(LlamaDiskCache):
    """The disk cache, noting for every state it hands back the key it chose and the state's tokens."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.restored: list[tuple[tuple[int, ...], list[int]]] = []

    def __getitem__(self, key):
        best = self._find_longest_prefix_key(tuple(key))
        state = super().__getitem__(key)
        self.restored.append((best, [int(t) for t in state.input_ids[:state.n_tokens]]))
        return state


def test_the_disk_cache_never_restores_another_conversation(tmp_path):
    name = "qwen35" if "qwen35" in zoo_names() else zoo_names()[0]
    all_secrets = secrets()
    with ps.Llama(str(zoo_path(name)), n_ctx=512, n_parallel=1, verbose=False) as llama:
        tokenize = lambda text, special=True: llama.tokenize(text.encode(), add_bos=special)  # noqa: E731
        shared = len(shared_part(tokenize))

        def run_one(prompt: list[int]) -> list[int]:
            out = llama.create_completion(prompt, max_tokens=N_GEN, temperature=0)
            return llama.tokenize(out["choices"][0]["text"].encode(), add_bos=False, special=True)

        alone = [converse(run_one, tokenize, s) for s in all_secrets]
        cache = RecordingDiskCache(cache_dir=tmp_path, capacity_bytes=6 * _state_bytes(llama))
        llama.set_cache(cache)
        requests: list[tuple[list[int], int]] = []
        calls = threading.Lock()

        def cached_run(prompt: list[int]) -> list[int]:
            with calls:  # pair each request with the state the cache gave it
                n = len(cache.restored)
                answer = run_one(prompt)
                requests.append((prompt, len(cache.restored) - n))
                restored = cache.restored[n:]
            for key, state in restored:
                assert state == list(key[:len(state)]), "a cache file holds another key's state"
                kept = longest_token_prefix(state, prompt)  # what the Llama keeps of it
                i = conversation_of(tokenize, prompt, all_secrets)
                check_restored(state[:kept], prompt, shared, tokenize(f" {all_secrets[i]}", False))
            return answer

        together = run_all(cached_run, tokenize, all_secrets)
    for i, (got, want) in enumerate(zip(together, alone)):
        assert got == want, f"conversation {i} with the disk cache differs from the same conversation alone"
    restored = sum(n for _, n in requests)
    files = len(list(tmp_path.glob(f"*{LlamaDiskCache.SUFFIX}")))
    print(f"disk cache: {len(requests)} answers, {restored} states restored, {files} files kept of 48 written")
    assert restored >= N_CONVERSATIONS, "the disk cache was hardly used"
    assert files < len(requests), "nothing was evicted"


def _state_bytes(llama) -> int:
    """About what one cache file of a whole conversation takes (its memory state and its scores)."""
    state = llama.save_state()
    return len(state.llama_state) + state.scores.nbytes + state.input_ids.nbytes
