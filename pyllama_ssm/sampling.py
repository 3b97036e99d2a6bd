"""Sampling parameters and llama.cpp sampler chains built from them.

The chain follows llama-cpp-python's (logit bias, penalties, grammar, then
greedy at temperature 0, the plain seeded distribution below 0, mirostat, or
top-k, typical, top-p, min-p, temperature and the seeded distribution) so the
same parameters pick the same tokens.  A Python logits processor, when given,
rewrites a copy of the raw logits before the chain sees them (the context's
buffer keeps the model's own).

A grammar is a hard constraint: the sampler never accepts a token it rejects
(llama.cpp's grammar throws on one, across its C API: an abort).  When the
logit bias or a logits processor (min_tokens' ban on EOS) leaves no token it
allows, the generation ends there if the grammar is complete (an EOG token is
returned, not accepted: finish reason "stop", even before min_tokens, as
llama.cpp ends a completed grammar), else sample() raises ValueError.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import limits
from .bindings import ffi, lib
from .model import Model

DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None
    seed: int | None = None
    # (tokens sampled so far, raw logits) -> logits; runs on the decoding thread before the chain
    logits_processor: Callable[[list[int], np.ndarray], np.ndarray] | None = None

    def __post_init__(self):
        """Every number within what llama.cpp accepts (pyllama_ssm.limits), as an int or a float."""
        for name in _NUMERIC:
            object.__setattr__(self, name, limits.check(name, getattr(self, name)))
        if self.seed is not None:
            object.__setattr__(self, "seed", limits.check("seed", self.seed))
        bias = {}
        for tok, value in dict(self.logit_bias).items():
            tok = limits.check("logit_bias", tok, "token")
            value = float(value) if value == float("-inf") else limits.check(f"logit_bias[{tok}]", value, "logit_bias")
            bias[tok] = value
        object.__setattr__(self, "logit_bias", bias)


# llama_token_data as numpy sees it, to fill a candidates array from the logits in one pass
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
assert _TOKEN_DATA.itemsize == ffi.sizeof("llama_token_data")

_NUMERIC = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "frequency_penalty",
            "presence_penalty", "penalty_last_n", "mirostat_mode", "mirostat_tau", "mirostat_eta")


class Sampler:
    """One llama_sampler chain (per sequence: penalties and grammar keep state)."""

    _free = lib.llama_sampler_free  # kept on the class: __del__ may run after module teardown

    def __init__(self, model: Model, params: SamplingParams):
        self.params = params
        self._n_vocab = model.n_vocab
        self._generated: list[int] = []  # what the logits processor is shown
        self._vocab = model.vocab
        self._grammar = ffi.NULL  # the chain's grammar sampler (the chain owns it), when there is one
        self._candidates = None   # (llama_token_data[n_vocab], numpy view, ids): see _sample_checked
        self._one = None          # llama_token_data[1] and its array: one token through the grammar
        p = params
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        self._chain = chain
        add = lambda s: lib.llama_sampler_chain_add(chain, s)  # noqa: E731 - the chain owns s
        n_vocab = model.n_vocab
        if p.logit_bias:
            for tok in p.logit_bias:
                model.check_token(tok)
            biases = ffi.new("llama_logit_bias[]", [(t, b) for t, b in p.logit_bias.items()])
            add(lib.llama_sampler_init_logit_bias(n_vocab, len(p.logit_bias), biases))
        # llama.cpp's test: a window of <= 0 tokens (-1 too) or neutral factors disable the penalties
        penalties = p.penalty_last_n > 0 and (p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty)
        if penalties:
            add(lib.llama_sampler_init_penalties(n_vocab, p.penalty_last_n, p.repeat_penalty,
                                                 p.frequency_penalty, p.presence_penalty))
        if p.grammar:
            g = lib.llama_sampler_init_grammar(model.vocab, p.grammar.encode(), b"root")
            if g == ffi.NULL:
                self.close()
                raise ValueError("grammar: llama.cpp could not parse the GBNF grammar")
            add(g)
            self._grammar = g
        # Greedy, with or without penalties: llama_sampler_sample would copy all n_vocab logits
        # into candidates (~0.4 ms per token for 150k) to pick the first maximum. numpy's argmax
        # reads the context's buffer instead. Penalties change only the logits of the last
        # penalty_last_n sampled tokens (the window), so the first maximum is among the window and
        # the raw first maximum when that is outside it: the chain runs on those few candidates,
        # sorted by id as in the full array, and on the full vocabulary only otherwise.
        plain = p.temperature == 0 and not (p.logit_bias or p.grammar or p.logits_processor)
        self.greedy = plain and not penalties  # the first maximum of the raw logits alone: callers may batch it
        self._window: deque[int] | None = deque(maxlen=p.penalty_last_n) if plain and penalties else None
        seed = DEFAULT_SEED if p.seed is None else p.seed & 0xFFFFFFFF
        if p.temperature < 0:
            add(lib.llama_sampler_init_dist(seed))
        elif p.temperature == 0:
            add(lib.llama_sampler_init_greedy())
        elif p.mirostat_mode == 1:
            add(lib.llama_sampler_init_mirostat(n_vocab, seed, p.mirostat_tau, p.mirostat_eta, 100))
        elif p.mirostat_mode == 2:
            add(lib.llama_sampler_init_mirostat_v2(seed, p.mirostat_tau, p.mirostat_eta))
        else:
            add(lib.llama_sampler_init_top_k(p.top_k))
            add(lib.llama_sampler_init_typical(p.typical_p, 1))
            add(lib.llama_sampler_init_top_p(p.top_p, 1))
            add(lib.llama_sampler_init_min_p(p.min_p, 1))
            add(lib.llama_sampler_init_temp(p.temperature))
            add(lib.llama_sampler_init_dist(seed))

    def sample(self, ctx_ptr, idx: int) -> int:
        """Sample from batch output idx and accept the token into the chain's state."""
        if self.greedy:
            return int(self._logits(ctx_ptr, idx).argmax())  # the first maximum, as llama's greedy
        if self._window is not None:
            token = self._sample_penalized(ctx_ptr, idx)
            self._window.append(token)
            return token
        processor = self.params.logits_processor
        if processor is None and self._grammar == ffi.NULL:
            return lib.llama_sampler_sample(self._chain, ctx_ptr, idx)
        logits = self._logits(ctx_ptr, idx)
        if processor is not None:
            # on a copy: the context's buffer keeps the model's logits, for whoever reads them next (a
            # prompt whose evaluation is reused samples from them again)
            logits = processor(self._generated, logits.copy())
        token = self._sample_checked(logits)
        if processor is not None:
            self._generated.append(token)
        return token

    def _sample_checked(self, logits) -> int:
        """llama_sampler_sample's steps on these logits (candidates, the chain, accept), with a check
        before accepting: the chosen token must have a logit above -inf (not NaN) and the grammar must
        allow it.  When none is left, a completed grammar ends the generation (see the module's doc)."""
        if self._candidates is None:
            data = ffi.new("llama_token_data[]", self._n_vocab)
            self._candidates = (data, np.frombuffer(ffi.buffer(data), dtype=_TOKEN_DATA),
                                np.arange(self._n_vocab, dtype=np.int32))
        data, view, ids = self._candidates
        view["id"] = ids
        view["logit"] = logits
        view["p"] = 0.0
        cur = ffi.new("llama_token_data_array *", (data, self._n_vocab, -1, False))
        lib.llama_sampler_apply(self._chain, cur)
        chosen = cur.data[cur.selected] if 0 <= cur.selected < cur.size else None
        if self._grammar == ffi.NULL:
            if chosen is None:  # llama_sampler_sample asserts (aborts) here
                raise ValueError("logits_processor: no token left to sample")
        elif chosen is None or not chosen.logit > -np.inf or not self._grammar_allows(chosen.id):  # -inf, NaN
            end = self._grammar_end()
            if end is None:
                raise ValueError("grammar: no token the grammar allows is left to sample: the logit_bias or the "
                                 "logits processor ruled out every one")
            return end  # not accepted: the generation ends with it
        lib.llama_sampler_accept(self._chain, chosen.id)
        return chosen.id

    def _grammar_allows(self, token: int) -> bool:
        """Whether the grammar, in its current state, accepts token next (its own test, on one candidate)."""
        if self._one is None:
            one = ffi.new("llama_token_data[]", 1)
            self._one = (one, ffi.new("llama_token_data_array *", (one, 1, -1, False)))
        one, arr = self._one
        one[0].id, one[0].logit, one[0].p = token, 0.0, 0.0
        arr.size, arr.selected, arr.sorted = 1, -1, False
        lib.llama_sampler_apply(self._grammar, arr)
        return one[0].logit != float("-inf")

    def _grammar_end(self) -> int | None:
        """An end-of-generation token when the grammar is complete (it allows every EOG token alike,
        once a stack is empty), else None."""
        eog = next((t for t in (lib.llama_vocab_eos(self._vocab), lib.llama_vocab_eot(self._vocab))
                    if 0 <= t < self._n_vocab and lib.llama_vocab_is_eog(self._vocab, t)), None)
        if eog is None:  # neither is set: any token of the EOG set
            eog = next((t for t in range(self._n_vocab) if lib.llama_vocab_is_eog(self._vocab, t)), None)
        return eog if eog is not None and self._grammar_allows(eog) else None

    def _sample_penalized(self, ctx_ptr, idx: int) -> int:
        """Penalties then greedy, on the window and the raw first maximum (see __init__)."""
        logits = self._logits(ctx_ptr, idx)
        top = int(np.argmax(logits))
        if top in self._window:  # penalized itself: the next best may be anywhere
            return lib.llama_sampler_sample(self._chain, ctx_ptr, idx)
        ids = sorted({top, *self._window})
        data = ffi.new("llama_token_data[]", [(t, float(logits[t]), 0.0) for t in ids])
        candidates = ffi.new("llama_token_data_array *", (data, len(ids), -1, False))
        lib.llama_sampler_apply(self._chain, candidates)
        token = data[candidates.selected].id
        lib.llama_sampler_accept(self._chain, token)
        return token

    def _logits(self, ctx_ptr, idx: int) -> np.ndarray:
        """Batch output idx's logits: a view of the context's own buffer."""
        p = lib.llama_get_logits_ith(ctx_ptr, idx)
        if p == ffi.NULL:
            raise ValueError(f"no logits for batch output {idx}")
        return np.frombuffer(ffi.buffer(p, self._n_vocab * 4), dtype=np.float32)

    def close(self) -> None:
        if self._chain is not None:
            self._free(self._chain)
            self._chain = None

    def __del__(self) -> None:
        self.close()
