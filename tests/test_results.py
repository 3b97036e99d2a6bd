"""Typed results (issue #27 item 6): the runtime answers a completion with a CompletionResult (or
CompletionEvents), create_completion's dicts are made of them, and the server reads them, not a
side channel: no thread-local, no private import, no Llama private in pyllama_ssm/server.
"""

from __future__ import annotations

import ast

import pytest

from conftest import ROOT, zoo_path
from pyllama_ssm import Llama
from pyllama_ssm.cancellation import Cancellation
from pyllama_ssm.results import ChatResult, CompletionEvent, CompletionResult

PROMPT = "The quick brown fox jumps over the lazy dog. " * 6
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
SERVER = ROOT / "pyllama_ssm" / "server"


@pytest.fixture(scope="module", params=[1, 2], ids=["session", "engine"])
def llm(request):
    with Llama(str(zoo_path("llama")), n_ctx=512, n_parallel=request.param, chat_format="chatml", logits_all=True,
               verbose=False) as model:
        yield model


def test_the_dict_is_made_of_the_typed_result(llm):
    result = llm.complete(PROMPT, max_tokens=6, temperature=0)
    assert isinstance(result, CompletionResult) and len(result.tokens) == result.usage.completion_tokens
    assert result.usage.prompt_tokens == len(llm.tokenize(PROMPT.encode()))
    out = llm.create_completion(PROMPT, max_tokens=6, temperature=0)
    assert out["choices"] == result.as_response()["choices"] and out["usage"] == result.usage.as_dict()
    assert set(out["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}  # stock's shape


def test_a_streams_result_has_the_tokens_and_text_it_streamed(llm):
    whole = llm.complete(PROMPT, max_tokens=6, temperature=0)
    stream = llm.complete(PROMPT, max_tokens=6, temperature=0, stream=True)
    events = list(stream)
    assert all(isinstance(e, CompletionEvent) for e in events) and events[-1].result is stream.result
    assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
    result = stream.result
    assert result.tokens == whole.tokens and result.text == whole.text == "".join(e.text for e in events)
    assert result.finish_reason == whole.finish_reason == events[-1].finish_reason
    chunks = list(llm.create_completion(PROMPT, max_tokens=6, temperature=0, stream=True))
    assert [c["choices"] for c in chunks] == [e.as_chunk()["choices"] for e in events]


def test_streamed_events_score_their_tokens_by_id(llm):
    """With logprobs each event carries its token's TokenProbs (ids, which OpenAI's text-keyed layout loses: what
    /completion's n_probs reports), the last one the end-of-generation token's when one ended the completion."""
    events = list(llm.complete(PROMPT, max_tokens=6, temperature=0, stream=True, logprobs=3))
    scored = [p for e in events for p in e.probs]
    assert [p.token for p in scored] == list(events[-1].result.tokens) and len(scored) == 6  # ended by length
    for e in events:
        for p in e.probs:
            assert len(p.top) == 3 and p.top[0][1] >= p.logprob and e.logprobs["token_logprobs"] == [p.logprob]
            assert e.logprobs["top_logprobs"][0] == {llm.detokenize([t]).decode("utf-8", errors="ignore"): lp
                                                     for t, lp in p.top} | {e.logprobs["tokens"][0]: p.logprob}
    assert not any(e.probs for e in llm.complete(PROMPT, max_tokens=6, temperature=0, stream=True))
    eos = llm.token_eos()
    ended = list(llm.complete(PROMPT, max_tokens=6, temperature=0, stream=True, logprobs=2, logit_bias={eos: 100.0}))
    assert ended[-1].result.tokens == () and [p.token for p in ended[-1].probs] == [eos]
    assert ended[-1].probs[0].logprob < 0  # the model's, without the bias that chose it


@pytest.mark.parametrize("logprobs", [None, 2], ids=["text", "logprobs"])
def test_streamed_events_carry_each_generated_token_once(llm, logprobs):
    """The events' tokens are the completion's, in order, then the end-of-generation token that ended it (what
    /completion's streamed pieces list, as llama-server's do): a piece held back for a stop string or an
    unfinished character brings its tokens with a later one."""
    whole = llm.complete(PROMPT, max_tokens=8, temperature=0)
    stop = llm.detokenize(list(whole.tokens[5:7])).decode("utf-8", errors="ignore")
    eos = llm.token_eos()
    for kwargs, reason in (({}, "length"), ({"stop": [stop]}, "stop"), ({"logit_bias": {eos: 100.0}}, "stop")):
        events = list(llm.complete(PROMPT, max_tokens=8, temperature=0, stream=True, logprobs=logprobs, **kwargs))
        result = events[-1].result
        end = (result.end_token,) if result.end_token is not None else ()
        assert [t for e in events for t in e.tokens] == [*result.tokens, *end] and result.finish_reason == reason
        assert all(e.tokens for e in events if e.text)
    assert end == (eos,) and result.tokens == ()  # the last case: ended at once by the end-of-generation token


def test_a_repeated_prompt_reports_its_cached_tokens(llm):
    llm.complete(PROMPT, max_tokens=2, temperature=0)
    again = llm.complete(PROMPT, max_tokens=2, temperature=0)
    assert 0 < again.usage.cached_tokens <= again.usage.prompt_tokens


def test_a_chat_result_carries_the_completion_behind_it(llm):
    chat = llm.chat_complete(MESSAGES, max_tokens=5, temperature=0)
    assert isinstance(chat, ChatResult) and chat.completion is not None
    assert chat.response["usage"] == chat.completion.usage.as_dict()
    assert chat.response["choices"][0]["message"]["content"] == chat.completion.text
    stream = llm.chat_complete(MESSAGES, max_tokens=5, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[-1]["choices"][0]["finish_reason"] == chat.completion.finish_reason
    assert stream.result.tokens == chat.completion.tokens
    plain = llm.create_chat_completion(MESSAGES, max_tokens=5, temperature=0)
    assert plain["choices"] == chat.response["choices"]


def test_a_handler_gets_a_view_of_the_llama_with_the_calls_cancellation_and_results(llm):
    seen = []

    def handler(*, llama, messages, **kwargs):
        llama.written_by_handler = True  # a write reaches the Llama (stock's handlers set n_tokens)
        seen.append(llama.create_completion("One", max_tokens=2, temperature=0))
        return llama.create_completion(PROMPT, max_tokens=3, temperature=0)

    def streaming(*, llama, messages, **kwargs):
        return list(llama.create_completion(PROMPT, max_tokens=3, temperature=0, stream=True))

    llm.chat_handler = handler
    try:
        chat = llm.chat_complete(MESSAGES)
        llm.chat_handler = streaming
        cancelled = Cancellation()
        cancelled.set()
        stopped = llm.chat_complete(MESSAGES, cancellation=cancelled)
        ran = llm.chat_complete(MESSAGES)
    finally:
        llm.chat_handler = None
        vars(llm).pop("written_by_handler", None)
    # the last completion a handler runs is the chat's
    assert chat.completion.usage.completion_tokens == chat.response["usage"]["completion_tokens"]
    assert chat.completion.usage.prompt_tokens == len(llm.tokenize(PROMPT.encode()))
    assert seen[0]["usage"]["prompt_tokens"] != chat.completion.usage.prompt_tokens
    # the completions it starts share the call's cancellation
    assert stopped.response == [] and stopped.completion is None
    assert ran.response and ran.completion is not None and ran.completion.usage.completion_tokens == 3


def test_a_handlers_writes_reach_the_llama(llm):
    def handler(*, llama, messages, **kwargs):
        llama.written_by_handler = True
        return llama.create_completion(PROMPT, max_tokens=1)

    llm.chat_handler = handler
    try:
        llm.create_chat_completion(MESSAGES)
        assert vars(llm).pop("written_by_handler") is True
    finally:
        llm.chat_handler = None


def test_complete_takes_create_completions_arguments_only(llm):
    with pytest.raises(TypeError):
        llm.complete(PROMPT, no_such_argument=1)


# -- the server reads results, not side channels (static) ------------------------------------------------
def _server_modules():
    return [(path.name, ast.parse(path.read_text())) for path in sorted(SERVER.glob("*.py"))]


def test_the_server_uses_no_thread_local():
    for name, tree in _server_modules():
        for node in ast.walk(tree):
            assert not (isinstance(node, ast.Attribute) and node.attr == "local"), f"{name}: threading.local"
            if isinstance(node, ast.ImportFrom):
                assert "local" not in {a.name for a in node.names}, f"{name}: imports local"
                assert "cancellation_scope" not in {a.name for a in node.names}, name
    source = (ROOT / "pyllama_ssm" / "cancellation.py").read_text()
    assert "threading.local" not in source and "cancellation_scope" not in source


def test_the_server_imports_no_private_name_and_reads_no_llama_private():
    for name, tree in _server_modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{name}: imports {private} from {node.module}"
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                # its own objects' privates are its business; the Llama's are not
                assert not (isinstance(owner, ast.Name) and owner.id == "llama"), f"{name}: llama.{node.attr}"
                assert not (isinstance(owner, ast.Attribute) and owner.attr == "llama"), \
                    f"{name}: ….llama.{node.attr}"
