"""A grammar with min_tokens, logit biases and logits processors: every request ends, none aborts.

llama.cpp's grammar sampler throws ("Unexpected empty grammar stack after
accepting piece") when it is made to accept a token it rejects, and the throw
crosses its C API: the process aborts.  min_tokens bans EOS; once a grammar is
complete EOS is all it allows, so every logit was -inf, greedy took token 0 and
the server died.  Now the sampler accepts no token the grammar rejects: a
completed grammar ends the generation ("stop", even before min_tokens, as
llama.cpp ends a completed grammar) and a grammar left with no allowed token at
all fails its request with a ValueError naming the grammar.

The checks that crashed the process run in a child process (run_with_build), so
a regression fails a test instead of killing pytest.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_with_build, zoo_path

GRAMMARS = {  # GBNF -> (regex of a complete output, regex of a prefix of one)
    'root ::= "a"': ("a", "a?"),
    'root ::= "a"+': ("a+", "a*"),
    'root ::= "yes" | "no"': ("yes|no", "|y|ye|yes|n|no"),
    'root ::= [0-9]+': ("[0-9]+", "[0-9]*"),
}

# min_tokens with a grammar that completes at once, through Llama.create_completion; prints JSON
LLAMA_CHILD = r"""
import json, sys
import numpy as np
from pyllama_ssm import Llama, LlamaGrammar
from pyllama_ssm.llama import LogitsProcessorList, MinTokensLogitsProcessor
path, n_parallel = sys.argv[1], int(sys.argv[2])
llm = Llama(path, n_ctx=256, n_parallel=n_parallel, verbose=False)
eos = llm.token_eos()
one_a = LlamaGrammar.from_string('root ::= "a"', verbose=False)
out = {}
def run(name, **kw):
    try:
        r = llm.create_completion("hi", max_tokens=8, grammar=kw.pop("grammar", one_a), **kw)
        out[name] = [r["choices"][0]["text"], r["choices"][0]["finish_reason"], r["usage"]["completion_tokens"]]
    except ValueError as e:
        out[name] = ["error", str(e)]
min5 = lambda: LogitsProcessorList([MinTokensLogitsProcessor(5, eos)])
for name, kw in {"greedy": dict(temperature=0), "dist": dict(temperature=0.8, seed=1),
                 "plain dist": dict(temperature=-1, seed=1), "mirostat": dict(temperature=0.8, mirostat_mode=1, seed=1),
                 "mirostat2": dict(temperature=0.8, mirostat_mode=2, seed=1),
                 "penalties": dict(temperature=0, repeat_penalty=1.3, presence_penalty=0.5)}.items():
    run("min_tokens " + name, logits_processor=min5(), **kw)
run("eos banned by logit_bias", temperature=0, logit_bias={eos: float("-inf")})
run("more than min_tokens", temperature=0, logits_processor=min5(),
    grammar=LlamaGrammar.from_string('root ::= "a"+', verbose=False))
# nothing the grammar allows is left, and it is not complete: an error, not an abort
run("only eos left", temperature=0, logits_processor=lambda ids, s: np.where(np.arange(len(s)) == eos, 0, -np.inf))
run("nan logits", temperature=0.8, logits_processor=lambda ids, s: np.full_like(s, np.nan))
run("after the errors", temperature=0, logits_processor=min5())  # the same Llama serves on
print(json.dumps(out))
"""


@pytest.mark.parametrize("n_parallel", [1, 4])
def test_min_tokens_with_a_completed_grammar_ends_the_generation(n_parallel):
    got = json.loads(run_with_build("patched", LLAMA_CHILD, str(zoo_path("qwen35")), str(n_parallel),
                                    timeout=300).splitlines()[-1])
    for name in ("min_tokens greedy", "min_tokens dist", "min_tokens plain dist", "min_tokens mirostat",
                 "min_tokens mirostat2", "min_tokens penalties", "eos banned by logit_bias", "after the errors"):
        assert got[name] == ["a", "stop", 1], (name, got[name])
    # a grammar that can go on still gives min_tokens tokens
    text, reason, n = got["more than min_tokens"]
    assert set(text) == {"a"} and n >= 5 and reason in ("stop", "length"), got["more than min_tokens"]
    for name in ("only eos left", "nan logits"):
        assert got[name][0] == "error" and got[name][1].startswith("grammar: no token the grammar allows"), got[name]


ENGINE_CHILD = r"""
import json, sys
import numpy as np
from pyllama_ssm import Model
from pyllama_ssm.engine import Engine
from pyllama_ssm.sampling import SamplingParams
model = Model(sys.argv[1])
eos = model.token_eos
def min_tokens(k):
    def ban(generated, logits):
        if len(generated) < k:
            logits[eos] = -np.inf
        return logits
    return ban
out = {}
with Engine(model, n_ctx=512, parallel=4) as e:
    reqs = {f"t={t}": e.submit("hi", SamplingParams(temperature=t, seed=3, grammar='root ::= "a"',
                                                    logits_processor=min_tokens(5)), max_tokens=8, logprobs=2)
            for t in (0, 0.8, -1)}
    reqs["bias"] = e.submit("hi", SamplingParams(temperature=0, grammar='root ::= "yes" | "no"',
                                                 logit_bias={eos: float("-inf")}), max_tokens=8)
    reqs["dead end"] = e.submit("hi", SamplingParams(temperature=0, grammar='root ::= "a"', logits_processor=(
        lambda g, s: np.where(np.arange(len(s)) == eos, 0, -np.inf))), max_tokens=8)
    reqs["after"] = e.submit("hello", SamplingParams(temperature=0), max_tokens=4)
    for name, r in reqs.items():
        try:
            c = r.result(timeout=120)
            out[name] = [c.text, c.finish_reason, c.tokens, c.logprobs]
        except ValueError as err:
            out[name] = ["error", str(err)]
print(json.dumps(out))
"""


def test_engine_ends_a_completed_grammar_before_min_tokens():
    got = json.loads(run_with_build("patched", ENGINE_CHILD, str(zoo_path("qwen35")), timeout=300).splitlines()[-1])
    for t in ("t=0", "t=0.8", "t=-1"):
        text, reason, tokens, logprobs = got[t]
        # the grammar's "a", then the end it allows (EOS, returned without being accepted into the grammar)
        assert (text, reason) == ("a", "stop") and len(tokens) == 2, got[t]
        assert len(logprobs) == 2 and all(lp <= 0 for lp in logprobs), got[t]
    assert got["bias"][:2] in (["yes", "stop"], ["no", "stop"]), got["bias"]
    assert got["dead end"][0] == "error" and got["dead end"][1].startswith("grammar: "), got["dead end"]
    assert got["after"][1] == "length" and len(got["after"][2]) == 4, got["after"]


# random sampling parameters with each grammar: no abort, and what comes out follows the grammar
SWEEP_CHILD = r"""
import json, random, sys
import numpy as np
from pyllama_ssm import Llama, LlamaGrammar
from pyllama_ssm.llama import LogitsProcessorList, MinTokensLogitsProcessor
path, grammars = sys.argv[1], json.loads(sys.argv[2])
llm = Llama(path, n_ctx=256, verbose=False)
eos, n_vocab = llm.token_eos(), llm.n_vocab()
rng = random.Random(1234)
out = []
for i in range(48):
    gbnf = grammars[i % len(grammars)]
    kw = dict(temperature=rng.choice([0, 0, 0.7, 1.5, -1]), top_k=rng.choice([0, 1, 40]), top_p=rng.choice([0.5, 1.0]),
              min_p=rng.choice([0.0, 0.05]), mirostat_mode=rng.choice([0, 0, 1, 2]), seed=rng.randrange(1000),
              repeat_penalty=rng.choice([1.0, 1.3]), frequency_penalty=rng.choice([0.0, 0.5]),
              max_tokens=rng.choice([1, 4, 12]))
    bias = {}
    if rng.random() < 0.4:
        bias[eos] = rng.choice([float("-inf"), -100.0, 100.0])
    for _ in range(rng.choice([0, 3])):
        bias[rng.randrange(n_vocab)] = rng.choice([float("-inf"), 50.0])
    processors = LogitsProcessorList()
    if rng.random() < 0.6:
        processors.append(MinTokensLogitsProcessor(rng.choice([1, 3, 20]), eos))
    try:
        r = llm.create_completion(rng.choice(["hi", "1 2 3", "Answer:"]), grammar=LlamaGrammar.from_string(
            gbnf, verbose=False), logit_bias=bias, logits_processor=processors or None, **kw)
        out.append([gbnf, r["choices"][0]["text"], r["choices"][0]["finish_reason"]])
    except ValueError as e:
        out.append([gbnf, "error", str(e)])
print(json.dumps(out))
"""


def test_no_sampling_parameters_abort_a_grammar():
    import re
    got = json.loads(run_with_build("patched", SWEEP_CHILD, str(zoo_path("qwen35")), json.dumps(list(GRAMMARS)),
                                    timeout=300).splitlines()[-1])
    assert len(got) == 48
    for gbnf, text, reason in got:
        whole, prefix = GRAMMARS[gbnf]
        if text == "error":  # a -inf bias took every token the grammar allowed
            assert reason.startswith("grammar: no token the grammar allows"), (gbnf, reason)
        elif reason == "stop":
            assert re.fullmatch(whole, text), (gbnf, text)
        else:
            assert reason == "length" and re.fullmatch(prefix, text), (gbnf, text, reason)


def test_a_logits_processor_leaves_the_context_logits_alone():
    """n_parallel=1 samples a prompt evaluated by the call before from the context's logits: a logits
    processor of that call (here: EOS at once, so nothing else was evaluated) must not have rewritten
    them."""
    import numpy as np

    from pyllama_ssm import Llama
    with Llama(str(zoo_path("qwen35")), n_ctx=256, verbose=False) as llm:
        eos = llm.token_eos()
        plain = llm.create_completion("hi", max_tokens=3, temperature=0)["choices"][0]["text"]
        def only_eos(ids, scores):
            return np.where(np.arange(len(scores)) == eos, 0, -np.inf).astype(np.single)
        forced = llm.create_completion("hi", max_tokens=3, temperature=0, logits_processor=only_eos)
        assert forced["choices"][0]["text"] == "" and forced["choices"][0]["finish_reason"] == "stop"
        assert llm.create_completion("hi", max_tokens=3, temperature=0)["choices"][0]["text"] == plain != ""


def test_server_answers_min_tokens_with_a_completed_grammar():
    """The issue's request: the server died with SIGABRT.  Now it answers, and answers the next one."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from pyllama_ssm.server.process import ServerProcess
    body = {"prompt": "hi", "max_tokens": 8, "min_tokens": 5, "grammar": 'root ::= "a"', "temperature": 0}
    for n_parallel in ("1", "4"):
        with ServerProcess("--model", str(zoo_path("qwen35")), "--n_ctx", "512", "--n_threads", "2",
                           "--n_parallel", n_parallel, "--verbose", "false") as server:
            with httpx.Client(base_url=server.url, timeout=60) as c:
                r = c.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                assert [(ch["text"], ch["finish_reason"]) for ch in r.json()["choices"]] == [("a", "stop")]
                chat = c.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "min_tokens": 5,
                    "grammar": 'root ::= "yes" | "no"', "temperature": 0.7, "seed": 5})
                assert chat.status_code == 200 and chat.json()["choices"][0]["finish_reason"] == "stop", chat.text
                with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
                    events = [line for line in s.iter_lines() if line.startswith("data: ")]
                assert events[-1] == "data: [DONE]"
                assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
            assert server.proc.poll() is None, server.output()
