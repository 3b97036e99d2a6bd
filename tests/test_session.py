"""The drop-in's layout (issue #27, "one runtime"): Llama is a facade over what runs each call.

n_parallel=1: the single-sequence API (eval, sample, generate, n_tokens, input_ids, scores, state,
caches) is the Session's (pyllama_ssm.session), and a completion is a request to the Session's inline
Engine of one sequence, which continues from what the sequence holds and leaves it there, so its tokens
are generate()'s; n_parallel>1: an Engine and no Session.  Speculative undo is one function
(engine.speculative.rewind) for both.  No module over 600 lines, llama.py about 500.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT, zoo_path
from pyllama_ssm import Llama
from pyllama_ssm.llama_callbacks import LogitsProcessorList, StoppingCriteriaList
from pyllama_ssm.batch import Batch
from pyllama_ssm.context import Context
from pyllama_ssm.engine import Engine, EngineConfig, speculative
from pyllama_ssm.engine.request import Continuation
from pyllama_ssm.model import Model
from pyllama_ssm.sampling import SamplingParams
from pyllama_ssm.session import Session

GREEDY = SamplingParams(temperature=0)

PROMPT = "Hello world"


@pytest.fixture(scope="module")
def llm():
    with Llama(str(zoo_path("llama")), n_ctx=512, logits_all=True, verbose=False) as model:
        yield model


def test_one_sequence_is_a_session_and_many_an_engine(llm):
    assert isinstance(llm.session, Session) and llm.engine is None
    with Llama(str(zoo_path("llama")), n_ctx=256, n_parallel=2, verbose=False) as par:
        assert par.session is None and par.engine is not None
        with pytest.raises(ValueError, match="n_parallel=1"):
            par.eval([1])
        with pytest.raises(AttributeError):
            par.n_tokens  # noqa: B018 - stock has no such state on a many-sequence object either


def test_the_single_sequence_state_is_the_sessions(llm):
    tokens = llm.tokenize(PROMPT.encode())
    llm.reset()
    llm.eval(tokens)
    session = llm.session
    assert session.n_tokens == llm.n_tokens == len(tokens)
    assert llm.input_ids is session.input_ids and llm.scores is session.scores
    assert llm._input_ids.tolist() == tokens and list(llm.eval_tokens) == tokens
    llm.n_tokens = 1  # what stock's multimodal handlers do after evaluating an image themselves
    assert session.n_tokens == 1
    llm.n_tokens = len(tokens)


def test_a_completion_is_the_sessions_generate(llm):
    """A completion is a request to the Session's inline Engine: its tokens are generate()'s, and afterwards
    the Session holds the prompt and what was evaluated of them (stock's state after a completion), their
    logits in scores (logits_all) as eval() leaves them."""
    prompt_tokens = llm.tokenize(PROMPT.encode())
    steps = llm.session.engine.stats().steps
    done = llm.complete(PROMPT, max_tokens=8, temperature=0)
    assert llm.session.engine.stats().steps > steps and llm.session.engine.inline
    kept_scores = llm.session.evaluated_scores.copy()
    completion, finish = list(done.tokens), done.finish_reason
    assert completion and done.usage.completion_tokens == len(completion)
    evaluated = completion[:-1] if finish == "length" else completion  # an end token is sampled, not evaluated
    assert llm.session.evaluated.tolist() == prompt_tokens + evaluated
    llm.reset()
    generator = llm.generate(prompt_tokens, temp=0.0)
    assert [next(generator) for _ in completion] == completion
    generator.close()
    llm.reset()
    llm.eval(prompt_tokens + evaluated)
    assert (llm.session.evaluated_scores == kept_scores).all()  # batch-invariant: every row bit for bit


def test_the_next_completion_continues_from_the_memory(llm):
    """The prefix the memory holds is not computed again (usage's cached_tokens), and the answer is the
    one computed from scratch."""
    first = llm.complete(PROMPT, max_tokens=6, temperature=0)
    prompt = llm.tokenize(PROMPT.encode()) + list(first.tokens)
    again = llm.complete(prompt, max_tokens=6, temperature=0)
    assert first.finish_reason == "length"  # the memory holds the prompt and all its tokens but the last
    assert again.usage.cached_tokens == len(prompt) - 1
    llm.reset()
    assert llm.complete(prompt, max_tokens=6, temperature=0).tokens == again.tokens


@pytest.mark.parametrize("name", ["llama", "mamba"])
def test_an_inline_engine_continues_a_sequence_and_leaves_its_memory(name):
    """Engine(context=, inline=True): no thread, the reader runs the steps; a Continuation starts after the
    resident tokens and leaves the memory as it ended, closed early included, so the next one goes on
    from there and gets what one request over the whole prompt gets."""
    with Model(str(zoo_path(name))) as model, Context(model, n_ctx=256, batch_invariant=True) as ctx, \
            Engine(model, EngineConfig(n_ctx=256, parallel=1, prefix_cache=0), context=ctx, inline=True) as engine:
        assert engine._thread is None
        prompt = model.tokenize("one two three four five", add_special=True)
        whole = engine.generate(prompt + [11, 12], GREEDY, max_tokens=5, continues=Continuation()).tokens
        ctx.seq_rm(0)
        req = engine.submit(prompt, GREEDY, max_tokens=50, continues=Continuation())
        next(iter(req))  # one token: the prompt is in memory, the token sampled and not fed
        req.cancel()
        assert req.result().finish_reason == "cancelled" and req.result().n_past == len(prompt)
        assert ctx.seq_pos_max(0) == len(prompt) - 1  # kept
        rest = engine.generate(prompt + [11, 12], GREEDY, max_tokens=5, continues=Continuation(len(prompt))).tokens
        assert rest == whole
        with pytest.raises(ValueError, match="continues"):
            engine.submit(prompt, GREEDY, continues=Continuation(len(prompt)))  # all resident needs live logits
        with pytest.raises(ValueError, match="context: holds 1 sequences, this config needs 2"):
            Engine(model, EngineConfig(n_ctx=256, parallel=2, prefix_cache=0), context=ctx, inline=True)
    with Model(str(zoo_path(name))) as model, Engine(model, n_ctx=256, parallel=2) as threaded:
        with pytest.raises(ValueError, match="inline Engine of one sequence"):
            threaded.submit([1, 2], GREEDY, continues=Continuation())


def test_stopping_criteria_and_logits_processors_see_stocks_evaluated_tokens(llm):
    """A completion's stopping criteria and logits processors are shown what stock's loop has evaluated
    when it samples: the prompt and the tokens generated before; a criterion that holds ends the completion
    without the token just sampled ("stop"), and stock asks it once more after its loop."""
    prompt = llm.tokenize(PROMPT.encode())
    seen, asked = [], []

    def processor(ids, logits):
        seen.append(list(ids))
        return logits

    def criteria(ids, logits):
        asked.append(list(ids))
        return len(ids) >= len(prompt) + 3

    out = llm.create_completion(prompt, max_tokens=10, temperature=0, logits_processor=LogitsProcessorList([processor]),
                                stopping_criteria=StoppingCriteriaList([criteria]))
    assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == 3
    assert len(seen) == 4 and asked[:4] == seen and seen[0] == prompt
    assert [len(ids) for ids in seen] == [len(prompt) + k for k in range(4)]
    assert asked[4] == seen[3] == llm._input_ids.tolist()  # asked again after the loop: what the memory holds


@pytest.mark.parametrize("name", ["llama", "mamba"])
def test_rewind_cuts_attention_and_restores_recurrent_memory(name):
    """The one speculative undo: attention drops the tail's cells; recurrent memory cannot, and goes back
    to a snapshot (the patched build's pool), or answers None without one."""
    with Model(str(zoo_path(name))) as model:
        recurrent = model.is_recurrent or model.is_hybrid
        with Context(model, n_ctx=64, n_rs_pool=1 if recurrent else 0) as ctx:
            tokens = model.tokenize("one two three four five six", add_special=True)
            with Batch(64, 1) as batch:
                batch.add_sequence(tokens[:3], 0, 0, logits_last=False)
                ctx.decode(batch)
                snapshot = speculative.snapshot_or_none(ctx, 0) if recurrent else None
                batch.clear()
                batch.add_sequence(tokens[3:], 3, 0, logits_last=True)
                ctx.decode(batch)
            if not recurrent:
                assert speculative.rewind(ctx, 0, 4, 3, None) == 4
                assert ctx.seq_pos_max(0) == 3
                return
            assert speculative.rewind(ctx, 0, 4, 3, None) is None  # no tail can be dropped, nothing changed
            assert ctx.seq_pos_max(0) == len(tokens) - 1
            if snapshot is None:
                pytest.skip("no snapshot pool on this build")
            assert speculative.rewind(ctx, 0, 4, 3, snapshot) == 3  # back to position 3: token 3 replays
            assert ctx.seq_pos_max(0) == 2
            ctx.release(snapshot)


def test_no_module_over_600_lines_and_llama_a_facade():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for p in (ROOT / "pyllama_ssm").rglob("*.py") if "_stock" not in p.parts}
    assert max(sizes.values()) <= 600, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    assert sizes[str(Path("pyllama_ssm") / "llama.py")] <= 510
