"""The drop-in pyllama_ssm.Llama on zoo models: llama-cpp-python's API, shapes and errors.

Side-by-side equality with stock llama-cpp-python is tests/parity/test_llama_parity.py;
this file pins our own behaviour: every method, stream == non-stream, stops, echo,
logprobs, grammars, chat templates of several families, tools, embeddings, state and
caches, n_parallel > 1 under threads and asyncio, and clear errors for bad input.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import pickle
import sys
import threading
import time
import warnings

import numpy as np
import pytest

from conftest import ROOT, zoo_path
from pyllama_ssm import Llama, LlamaGrammar, TokenError, ffi, install_as_llama_cpp, lib
from pyllama_ssm import llama_chat_format as chat_format
from pyllama_ssm.llama import LlamaState, LogitsProcessorList, MinTokensLogitsProcessor, StoppingCriteriaList
from pyllama_ssm.llama_cache import LlamaDiskCache, LlamaRAMCache

PROMPT = "Hello world"
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
          "required": ["ok", "color"]}


def text_of(response) -> str:
    return response["choices"][0]["text"]


def joined(chunks) -> tuple[str, str]:
    chunks = list(chunks)
    return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]


@pytest.fixture(scope="module")
def llm():
    with Llama(str(zoo_path("llama")), n_ctx=512, logits_all=True, verbose=False) as model:
        yield model


@pytest.fixture(scope="module")
def par():
    # the kernels of n_parallel=1 (stock's flash_attn=False), so outputs compare token for token
    with Llama(str(zoo_path("llama")), n_ctx=512, n_parallel=4, flash_attn=False, verbose=False) as model:
        yield model


# -- construction ---------------------------------------------------------------------------
def test_constructor_takes_llama_cpp_python_parameters(llm):
    path = str(zoo_path("llama"))
    with Llama(path, n_ctx=0, n_batch=64, n_ubatch=32, n_threads=1, n_threads_batch=1, seed=7, flash_attn=False,
               rope_freq_base=0.0, yarn_ext_factor=-1.0, type_k=lib.GGML_TYPE_F16, swa_full=True, op_offload=True,
               use_mlock=False, last_n_tokens_size=32, verbose=False) as m:
        assert m.n_ctx() == m._model.n_ctx_train  # n_ctx=0: the model's training context
        assert m.n_batch == 64 and m.context_params.n_ubatch == 32 and m.context_params.type_k == lib.GGML_TYPE_F16
        assert m._seed == 7
    # keywords llama-cpp-python 0.3.36 ignores (LangChain passes n_parts, f16_kv...): ignored, with a warning
    with pytest.warns(UserWarning, match="f16_kv, n_parts"):
        Llama(path, n_ctx=64, n_parts=-1, f16_kv=True, verbose=False).close()
    assert (llm.n_ctx(), llm.n_vocab(), llm.n_embd()) == (512, 32000, llm._model.n_embd)
    assert (llm.token_bos(), llm.token_eos()) == (1, 2)
    assert llm.metadata["general.architecture"] == "llama" and llm.model_path == path
    assert llm.chat_format == "chat_template.default"  # the GGUF's own template


def test_kv_overrides_reach_the_loader():
    with Llama(str(zoo_path("llama")), kv_overrides={"tokenizer.ggml.add_bos_token": False}, verbose=False) as m:
        assert m.tokenize(b"Hi")[0] != m.token_bos()
    with pytest.raises(TypeError, match="kv_overrides"):
        Llama(str(zoo_path("llama")), kv_overrides={"x": [1]}, verbose=False)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"n_parallel": 0}, ValueError, "n_parallel"),
    ({"draft_model": object()}, ValueError, "draft_model"),
    ({"lora_base": "base.gguf"}, ValueError, "lora_base"),
    ({"lora_path": "/nonexistent/adapter.gguf"}, ValueError, "lora_path"),
    ({"n_batch": 0}, ValueError, "n_batch"),
    ({"tensor_split": [1.0] * 64}, ValueError, "tensor_split"),
])
def test_constructor_rejects_what_cannot_apply(kwargs, error, match):
    with pytest.raises(error, match=match):
        Llama(str(zoo_path("llama")), verbose=False, **kwargs)


def test_missing_model_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        Llama(str(tmp_path / "absent.gguf"), verbose=False)


def test_from_pretrained_says_the_hub_is_unreachable():
    with pytest.raises((ImportError, ConnectionError), match="huggingface|hub"):
        Llama.from_pretrained("someone/some-model-GGUF", "*q4_0.gguf", verbose=False)


def test_close_and_context_manager():
    m = Llama(str(zoo_path("llama")), n_ctx=64, verbose=False)
    with m:
        assert m.create_completion(PROMPT, max_tokens=2, temperature=0)["usage"]["completion_tokens"] == 2
    for call in (lambda: m.create_completion(PROMPT), lambda: m.tokenize(b"x"), lambda: m.detokenize([1])):
        with pytest.raises(ValueError, match="closed"):
            call()
    m.close()  # twice is fine


def test_pickle_recreates_the_model(llm):
    clone = pickle.loads(pickle.dumps(llm))
    try:
        assert clone.n_ctx() == llm.n_ctx() and clone._logits_all
        assert text_of(clone(PROMPT, max_tokens=4, temperature=0)) == text_of(llm(PROMPT, max_tokens=4, temperature=0))
    finally:
        clone.close()


# -- tokens ---------------------------------------------------------------------------------
def test_tokenize_detokenize(llm):
    tokens = llm.tokenize(b"Hello World")
    assert tokens[0] == llm.token_bos() and llm.detokenize(tokens) == b"Hello World"
    assert llm.tokenize(b"Hello World", add_bos=False) == tokens[1:]
    assert llm.tokenize(b"x</s>", special=True)[-1] == llm.token_eos()
    assert llm.tokenize(b"x</s>")[-1] != llm.token_eos()
    with pytest.raises(TokenError, match="out of range"):
        llm.detokenize([llm.n_vocab()])
    with pytest.raises(TypeError, match="bytes"):
        llm.tokenize("text")


def test_vocab_only_is_a_tokenizer():
    with Llama(str(zoo_path("llama")), vocab_only=True, verbose=False) as m:
        assert m.detokenize(m.tokenize(b"Hello World")) == b"Hello World"
        assert m._ctx.ctx.value is not None  # stock makes a context even for a vocabulary (its tests read it)
        for call in (lambda: m(PROMPT), lambda: m.eval([1]), lambda: m.embed("x")):
            with pytest.raises(ValueError, match="vocab_only"):
                call()


# -- completions ----------------------------------------------------------------------------
def test_completion_shape(llm):
    out = llm.create_completion(PROMPT, max_tokens=8, temperature=0)
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"}
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert set(out["choices"][0]) == {"text", "index", "logprobs", "finish_reason"}
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}
    assert llm(PROMPT, max_tokens=8, temperature=0)["choices"] == out["choices"]


def test_stream_equals_non_stream(llm, par):
    for model in (llm, par):
        for kwargs in ({}, {"stop": [" para"]}, {"logprobs": 2}):
            whole = model.create_completion(PROMPT, max_tokens=12, temperature=0, **kwargs)
            text, reason = joined(model.create_completion(PROMPT, max_tokens=12, temperature=0, stream=True,
                                                          **kwargs))
            assert (text, reason) == (text_of(whole), whole["choices"][0]["finish_reason"]), kwargs


def test_stop_strings_cut_the_text(llm, par):
    full = text_of(llm(PROMPT, max_tokens=16, temperature=0))
    stop = full[10:14]
    for model in (llm, par):
        out = model(PROMPT, max_tokens=16, temperature=0, stop=[stop, "never-there"])
        assert text_of(out) == full[: full.index(stop)] and out["choices"][0]["finish_reason"] == "stop"
        text, reason = joined(model(PROMPT, max_tokens=16, temperature=0, stop=stop, stream=True))
        assert (text, reason) == (full[: full.index(stop)], "stop")


def test_echo_and_unlimited_max_tokens(llm):
    out = llm(PROMPT, max_tokens=4, temperature=0, echo=True)
    assert text_of(out).startswith(PROMPT) and len(text_of(out)) > len(PROMPT)
    tokens = llm.tokenize(PROMPT.encode())
    assert text_of(llm(tokens, max_tokens=4, temperature=0, echo=True)).startswith(PROMPT)
    with Llama(str(zoo_path("llama")), n_ctx=32, verbose=False) as small:  # llama.cpp pads n_ctx to 256
        for unlimited in (None, -1):
            out = small(PROMPT, max_tokens=unlimited, temperature=0)
            assert out["usage"]["total_tokens"] == small.n_ctx() or out["choices"][0]["finish_reason"] == "stop"


def test_logprobs_shape(llm, par):
    for model in (llm, par):
        out = model(PROMPT, max_tokens=6, temperature=0, logprobs=3)
        lp = out["choices"][0]["logprobs"]
        assert set(lp) == {"tokens", "text_offset", "token_logprobs", "top_logprobs"}
        assert len(lp["tokens"]) == out["usage"]["completion_tokens"] == 6
        assert "".join(lp["tokens"]) == text_of(out)
        assert lp["text_offset"][0] == len(PROMPT) and lp["text_offset"] == sorted(lp["text_offset"])
        for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
            assert isinstance(logprob, float) and logprob <= 0 and 1 <= len(top) <= 4 and top[token] == logprob
            assert logprob == pytest.approx(max(top.values()), abs=1e-6)  # greedy: the best token
    echoed = llm(PROMPT, max_tokens=2, temperature=0, logprobs=1, echo=True)["choices"][0]["logprobs"]
    # the BOS the tokenizer added is not reported; the first token reported is scored given it
    assert len(echoed["tokens"]) == 2 + 2 and echoed["token_logprobs"][0] <= 0
    ids = llm.tokenize(PROMPT.encode())  # token ids sent: every one is reported, the first has no logprob
    echoed = llm(ids, max_tokens=2, temperature=0, logprobs=1, echo=True)["choices"][0]["logprobs"]
    assert echoed["token_logprobs"][0] is None and len(echoed["tokens"]) == len(ids) + 2


def test_logprobs_are_the_models_whatever_a_logits_processor_does(llm, par):
    """Both modes report the raw distribution's logprobs (stock's), not the processed one's."""
    def force(ids, logits):
        logits[7] += 50.0  # token 7 wins every step
        return logits
    runs = [model(PROMPT, max_tokens=4, temperature=0, logprobs=1, logits_processor=LogitsProcessorList([force]))
            ["choices"][0]["logprobs"]["token_logprobs"] for model in (llm, par)]
    assert all(v < -1.0 for v in runs[0] + runs[1]), runs  # token 7 is not likely by itself
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-2)  # flash attention on one side only


def test_streamed_echo_with_logprobs_on_any_n_parallel(llm, par):
    """The first chunk of an echoed stream is the prompt with its logprobs, as the whole answer has them."""
    for model in (llm, par):
        whole = model(PROMPT, max_tokens=3, temperature=0, logprobs=1, echo=True)["choices"][0]
        chunks = [c["choices"][0] for c in model(PROMPT, max_tokens=3, temperature=0, logprobs=1, echo=True,
                                                 stream=True)]
        assert chunks[0]["text"] == PROMPT and "".join(c["text"] for c in chunks) == whole["text"]
        n = len(chunks[0]["logprobs"]["tokens"])
        assert n >= 2 and chunks[0]["logprobs"]["tokens"] == whole["logprobs"]["tokens"][:n]
        assert chunks[0]["logprobs"]["token_logprobs"] == pytest.approx(whole["logprobs"]["token_logprobs"][:n],
                                                                        abs=1e-4)


def test_stream_sends_text_as_soon_as_its_bytes_are_complete():
    """A token ending inside a UTF-8 character holds back only that character: on a random model the
    answer is full of broken byte sequences, and still arrives about one chunk per token."""
    for n_parallel in (1, 2):
        with Llama(str(zoo_path("qwen35")), n_ctx=512, n_parallel=n_parallel, verbose=False) as model:
            for prompt in ("Hello", "日本語のテキスト"):
                whole = model(prompt, max_tokens=64, temperature=0)
                pieces = [c["choices"][0]["text"] for c in model(prompt, max_tokens=64, temperature=0, stream=True)]
                assert "".join(pieces) == text_of(whole)
                tokens = whole["usage"]["completion_tokens"]
                # was 38 and 28 chunks of 64 tokens (one held back everything after it until the end)
                assert len([p for p in pieces if p]) >= tokens - 4, (n_parallel, prompt, pieces)


def test_stream_holds_back_only_a_tail_that_may_begin_a_stop_string(llm, par):
    """Stock's rule, on both paths: a stop string that the text does not approach delays nothing, so
    the chunks are those of the same stream without it (the Engine held back len(stop) - 1 characters)."""
    for model in (llm, par):
        kw = dict(max_tokens=16, temperature=0, stream=True)
        free = [c["choices"][0]["text"] for c in model(PROMPT, **kw)]
        stopped = [c["choices"][0]["text"] for c in model(PROMPT, stop=["\x07never"], **kw)]
        assert stopped == free and len(free) > 8, (model.n_parallel, free, stopped)


def test_logprobs_need_logits_all_with_one_sequence():
    with Llama(str(zoo_path("llama")), n_ctx=64, verbose=False) as m:
        with pytest.raises(ValueError, match="logits_all"):
            m(PROMPT, max_tokens=2, logprobs=1)


def test_sampling_is_seeded(llm):
    kw = dict(max_tokens=12, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    assert text_of(llm(PROMPT, seed=1, **kw)) == text_of(llm(PROMPT, seed=1, **kw))
    assert text_of(llm(PROMPT, seed=1, **kw)) != text_of(llm(PROMPT, seed=2, **kw))
    # without a seed, each call draws the next from the previous one, from the constructor's seed
    runs = []
    for _ in range(2):
        with Llama(str(zoo_path("llama")), n_ctx=64, seed=5, verbose=False) as m:
            runs.append([text_of(m(PROMPT, **kw)) for _ in range(2)])
    assert runs[0] == runs[1] and runs[0][0] != runs[0][1]
    for mode in (1, 2):
        assert text_of(llm(PROMPT, seed=3, mirostat_mode=mode, **kw)) == text_of(llm(PROMPT, seed=3,
                                                                                      mirostat_mode=mode, **kw))


def test_logit_bias_and_logits_processor_steer_tokens(llm, par):
    target = llm.tokenize(b"zebra", add_bos=False)[0]
    piece = llm.detokenize([target]).decode()
    for model in (llm, par):
        assert text_of(model(PROMPT, max_tokens=3, temperature=0, logit_bias={str(target): 100.0})) == piece * 3

        def force(input_ids, scores):
            scores[target] += 1000.0
            return scores
        assert text_of(model(PROMPT, max_tokens=2, temperature=0,
                             logits_processor=LogitsProcessorList([force]))) == piece * 2
        # EOS is the only choice, but held back for 3 tokens
        eos_only = {str(t): -1000.0 for t in range(model.n_vocab()) if t != model.token_eos()}
        out = model(PROMPT, max_tokens=8, temperature=0, logit_bias=eos_only,
                    logits_processor=LogitsProcessorList([MinTokensLogitsProcessor(3, model.token_eos())]))
        assert out["usage"]["completion_tokens"] == 3 and out["choices"][0]["finish_reason"] == "stop"


def test_grammar_forces_json(llm, par):
    grammar = LlamaGrammar.from_json_schema(json.dumps(SCHEMA))
    for model in (llm, par):
        for temperature in (0.0, 0.9):
            out = model("Answer in JSON:", max_tokens=64, temperature=temperature, seed=11, grammar=grammar)
            value = json.loads(text_of(out))
            assert set(value) == {"ok", "color"} and value["color"] in ("red", "green")
            assert out["choices"][0]["finish_reason"] == "stop"
    yes_no = LlamaGrammar.from_string('root ::= "yes" | "no"')
    assert text_of(llm(PROMPT, max_tokens=8, grammar=yes_no, temperature=0.8)) in ("yes", "no")


def test_grammar_from_file_and_named(tmp_path):
    from pyllama_ssm import llama_grammar
    path = tmp_path / "g.gbnf"
    path.write_text('root ::= "a"+\n')
    assert LlamaGrammar.from_file(path)._grammar == 'root ::= "a"+\n'
    assert "root" in llama_grammar.JSON_GBNF and "root" in llama_grammar.LIST_GBNF
    with pytest.raises(ValueError, match="cannot read"):
        LlamaGrammar.from_file(tmp_path / "absent.gbnf")


# -- chat -----------------------------------------------------------------------------------
CHAT_MODELS = ["llama", "falcon-h1", "granitehybrid", "kimi-linear", "lfm2", "nemotron_h", "qwen35", "rwkv7"]


@pytest.mark.parametrize("name", CHAT_MODELS)
def test_chat_uses_the_model_template(name):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    with Llama(str(zoo_path(name)), n_ctx=1024, verbose=False) as m:
        formatter = chat_format.Jinja2ChatFormatter(m.metadata["tokenizer.chat_template"],
                                                    eos_token=m.detokenize([m.token_eos()], special=True).decode(),
                                                    bos_token=m.detokenize([m.token_bos()], special=True).decode())
        prompt = formatter(messages=messages).prompt
        assert "Hi there" in prompt
        out = m.create_chat_completion(messages, max_tokens=4, temperature=0)
        assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
        assert out["choices"][0]["message"]["role"] == "assistant"
        assert out["usage"]["prompt_tokens"] == len(m.tokenize(prompt.encode(), add_bos=False, special=True))
        chunks = list(m.create_chat_completion(messages, max_tokens=4, temperature=0, stream=True))
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
            out["choices"][0]["message"]["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]


@pytest.mark.parametrize("name", ["nemotron_h", "qwen35", "jamba"])
def test_chat_turns_compute_only_where_the_next_prompt_parts(name):
    """On recurrent memory a state exists only where it was saved.  A chat prompt keeps prefix-cache
    entries at the end of its system message and of its last turn (before the generation prompt), so
    the next turn, and another user on the same system prompt, compute only from where their prompt
    parts from this one: not from the last 64-token checkpoint before it, not from the start of an
    answer that tokenizes differently when sent back as text (random weights), and not from before a
    generation prompt that the history renders otherwise (nemotron_h's template drops `<think>`)."""
    system = {"role": "system", "content": "Background notes. " + "The lantern bridge crosses the meadow. " * 12}
    with Llama(str(zoo_path(name)), n_ctx=2048, n_parallel=2, verbose=False) as m:
        formatter = chat_format.Jinja2ChatFormatter(m.metadata["tokenizer.chat_template"],
                                                    eos_token=m.detokenize([m.token_eos()], special=True).decode(),
                                                    bos_token=m.detokenize([m.token_bos()], special=True).decode())

        def tokens(messages):
            return m.tokenize(formatter(messages=messages).prompt.encode(), add_bos=False, special=True)

        def computed(messages, max_tokens=2):
            before = m.engine.stats()
            out = m.create_chat_completion(messages, max_tokens=max_tokens, temperature=0)
            after = m.engine.stats()
            # every generated token but the last was fed back
            n = (after.tokens_decoded - before.tokens_decoded) - (after.tokens_generated - before.tokens_generated - 1)
            return n, out["choices"][0]["message"]["content"]

        first = [system, {"role": "user", "content": "Tell me about the river and the old mill"}]
        _, answer = computed(first, max_tokens=6)
        second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the sea?"}]
        other = [system, {"role": "user", "content": "Something else entirely"}]
        for later in (second, other):
            a, b = tokens(first), tokens(later)
            parts_at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            n, _ = computed(later)
            # at most what follows the parting (less where the answer's own tokens are reused); the
            # other user parts inside the user turn's header, a few tokens after the system message's end
            assert 0 < n <= len(b) - parts_at + (4 if later is other else 0), (name, n, len(b) - parts_at)
        # what each conversation keeps: the shared system prompt, then per user its turn boundary and, where
        # the answer tokenizes back into itself, its tail; not the 64-token checkpoints on the way
        assert len(m.engine.cache.entries) <= 5, sorted(map(len, m.engine.cache.entries))


def test_named_chat_formats():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    expected = {
        "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n",
        "llama-2": "[INST] <<SYS>>\nS\n<</SYS>> U [/INST]",
        "llama-3": "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>"
                   "\n\nU<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "mistral-instruct": "[INST] U [/INST]",
        "gemma": "<start_of_turn>user\nU<end_of_turn>\n<start_of_turn>model\n",
        "phi-3": "<|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|assistant|>\n",
        "zephyr": "<|system|>\nS</s>\n<|user|>\n\nU</s>\n<|assistant|>\n\n",
        "qwen": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n",
        "vicuna": "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the user's questions. USER: U ASSISTANT:",
        "alpaca": "S\n\n### Instruction: U\n\n",
    }
    formats = {"chatml": chat_format.format_chatml, "llama-2": chat_format.format_llama2,
               "llama-3": chat_format.format_llama3, "mistral-instruct": chat_format.format_mistral_instruct,
               "gemma": chat_format.format_gemma, "phi-3": chat_format.format_phi3, "zephyr": chat_format.format_zephyr,
               "qwen": chat_format.format_qwen, "vicuna": chat_format.format_vicuna, "alpaca": chat_format.format_alpaca}
    for name, prompt in expected.items():
        assert formats[name](messages=messages).prompt == prompt, name
        assert callable(chat_format.get_chat_completion_handler(name))
    with pytest.raises(ValueError, match="unknown"):
        chat_format.get_chat_completion_handler("no-such-format")
    assert chat_format.guess_chat_format_from_gguf_metadata(
        {"tokenizer.chat_template": chat_format.CHATML_CHAT_TEMPLATE}) == "chatml"


def test_chat_format_and_handler_choice(llm):
    path = str(zoo_path("llama"))
    messages = [{"role": "user", "content": "Hi"}]
    with Llama(path, n_ctx=256, chat_format="chatml", verbose=False) as m:
        out = m.create_chat_completion(messages, max_tokens=2, temperature=0)
        assert out["usage"]["prompt_tokens"] == len(m.tokenize(chat_format.format_chatml(messages=messages)
                                                               .prompt.encode(), special=True))
    seen = {}

    def handler(*, llama, messages, **kwargs):
        seen.update(kwargs, n=len(messages))
        return {"handled": True}
    with Llama(path, n_ctx=64, chat_handler=handler, verbose=False) as m:
        m.chat_template_kwargs = {"enable_thinking": False}
        assert m.create_chat_completion(messages, temperature=0.5) == {"handled": True}
    assert seen["n"] == 1 and seen["temperature"] == 0.5 and seen["enable_thinking"] is False
    with pytest.raises(TypeError, match="messages"):
        llm.create_chat_completion("Hi")


def test_tool_choice_and_response_format(llm, par):
    tools = [{"type": "function", "function": {"name": "paint", "parameters": SCHEMA}}]
    messages = [{"role": "user", "content": "Paint it"}]
    for model in (llm, par):
        out = model.create_chat_completion(messages, tools=tools, max_tokens=64, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "paint"}})
        choice = out["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        call = choice["message"]["tool_calls"][0]
        assert call["type"] == "function" and call["function"]["name"] == "paint"
        assert set(json.loads(call["function"]["arguments"])) == {"ok", "color"}
        for fmt in ({"type": "json_object", "schema": SCHEMA},
                    {"type": "json_schema", "json_schema": {"name": "paint", "schema": SCHEMA}}):
            content = model.create_chat_completion(messages, response_format=fmt, max_tokens=64, temperature=0)
            assert set(json.loads(content["choices"][0]["message"]["content"])) == {"ok", "color"}
    with pytest.raises(ValueError, match="no tool named"):
        llm.create_chat_completion(messages, tools=tools, tool_choice={"type": "function", "function": {"name": "x"}})


def test_chatml_function_calling():
    tools = [{"type": "function", "function": {"name": "paint", "parameters": SCHEMA}}]
    messages = [{"role": "system", "content": "You paint."}, {"role": "user", "content": "Paint it"}]
    with Llama(str(zoo_path("llama")), n_ctx=1024, chat_format="chatml-function-calling", verbose=False) as m:
        named = m.create_chat_completion(messages, tools=tools, max_tokens=48, temperature=0,
                                         tool_choice={"type": "function", "function": {"name": "paint"}})
        assert json.loads(named["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])["color"] in \
            ("red", "green")
        auto = m.create_chat_completion(messages, tools=tools, tool_choice="auto", max_tokens=16, temperature=0)
        message = auto["choices"][0]["message"]
        assert message["role"] == "assistant" and (message.get("tool_calls") or isinstance(message["content"], str))
        plain = m.create_chat_completion(messages, max_tokens=4, temperature=0)
        assert plain["choices"][0]["message"]["content"] is not None


# -- n_parallel > 1 -------------------------------------------------------------------------
PROMPTS = ["Hello world", "The quick brown fox", "Once upon a time", "In the beginning"]


def test_parallel_threads_match_sequential_calls(llm, par):
    sequential = [text_of(llm(p, max_tokens=12, temperature=0)) for p in PROMPTS]
    results: list = [None] * len(PROMPTS)

    def run(i):
        results[i] = text_of(par(PROMPTS[i], max_tokens=12, temperature=0))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == sequential
    assert par._engine.stats().steps > 0


def test_parallel_async_streams_via_threads(par):
    async def stream(prompt):
        chunks = await asyncio.to_thread(lambda: list(par(prompt, max_tokens=8, temperature=0, stream=True)))
        return "".join(c["choices"][0]["text"] for c in chunks)

    async def main():
        return await asyncio.gather(*(stream(p) for p in PROMPTS))
    assert asyncio.run(main()) == [text_of(par(p, max_tokens=8, temperature=0)) for p in PROMPTS]


def test_parallel_stream_closed_early_frees_its_sequence(par):
    stream = par(PROMPT, max_tokens=200, temperature=0, stream=True)
    next(stream)
    stream.close()
    assert par(PROMPT, max_tokens=2, temperature=0)["usage"]["completion_tokens"] == 2
    assert par._engine.stats().running == 0


def read_in_threads(streams) -> tuple[list[threading.Thread], list[list]]:
    chunks: list[list] = [[] for _ in streams]
    readers = [threading.Thread(target=chunks[i].extend, args=(s,)) for i, s in enumerate(streams)]
    for reader in readers:
        reader.start()
    return readers, chunks


@pytest.mark.parametrize("n_parallel", [1, 2])
def test_a_stream_cancelled_from_another_thread_ends_at_once(n_parallel):
    """cancel() while readers wait in next(): running or queued (n_parallel=2), nothing more comes."""
    endless = LlamaGrammar.from_string('root ::= "a" root', verbose=False)
    with Llama(str(zoo_path("llama")), n_ctx=4096, n_parallel=n_parallel, verbose=False) as llm:
        assert (llm.engine is None) == (n_parallel == 1)
        streams = [llm(f"{i} {PROMPT}", max_tokens=3000, grammar=endless, stream=True) for i in range(n_parallel)]
        if n_parallel > 1:  # one completion and one chat wait in the Engine's queue behind them
            streams += [llm("queued", max_tokens=3000, stream=True),
                        llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=3000, stream=True)]
        readers, chunks = read_in_threads(streams)
        deadline = time.monotonic() + 30
        while not all(chunks[:n_parallel]) or (llm.engine is not None and llm.engine.stats().queued < 2):
            assert time.monotonic() < deadline, [len(c) for c in chunks]
            time.sleep(0.001)
        for stream in streams:
            stream.cancel()
        for reader in readers:
            reader.join(5)
            assert not reader.is_alive(), "a cancelled stream kept its reader waiting"
        assert all(len(c) < 200 for c in chunks), [len(c) for c in chunks]
        assert all(s.cancelled and next(s, None) is None for s in streams)
        if llm.engine is not None:
            assert llm.engine.stats().running == llm.engine.stats().queued == 0
            assert chunks[2:] == [[], []], "the queued requests started"
        assert llm(PROMPT, max_tokens=2, temperature=0)["usage"]["completion_tokens"] == 2


def test_parallel_mode_refuses_the_single_sequence_api(par):
    for call in (lambda: par.eval([1]), lambda: par.sample(), lambda: par.generate([1]),
                 lambda: par.save_state(), lambda: par.set_cache(LlamaRAMCache())):
        with pytest.raises(ValueError, match="n_parallel=1"):
            call()
    with pytest.raises(ValueError, match="stopping_criteria"):
        par(PROMPT, max_tokens=2, stopping_criteria=StoppingCriteriaList([lambda ids, logits: False]))


def test_parallel_recurrent_and_hybrid_models():
    for name in ("mamba", "falcon-h1"):
        path = str(zoo_path(name))
        with Llama(path, n_ctx=512, verbose=False) as one, Llama(path, n_ctx=512, n_parallel=2, verbose=False) as two:
            expected = [text_of(one(p, max_tokens=6, temperature=0)) for p in PROMPTS[:2]]
            results: list = [None, None]
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(
                i, text_of(two(PROMPTS[i], max_tokens=6, temperature=0)))) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert results == expected, name


# -- the single sequence: eval, sample, generate, state, caches -------------------------------
def test_eval_sample_generate(llm):
    tokens = llm.tokenize(PROMPT.encode())
    llm.reset()
    llm.eval(tokens)
    assert llm.n_tokens == len(tokens) and llm.input_ids[: llm.n_tokens].tolist() == tokens
    assert llm.scores.shape == (512, llm.n_vocab()) and list(llm.eval_tokens) == tokens
    first = llm.sample(temp=0.0)
    assert first == int(np.argmax(llm.scores[len(tokens) - 1]))
    generated = []
    for token in llm.generate(tokens, temp=0.0):
        generated.append(token)
        if len(generated) == 5:
            break
    assert generated[0] == first
    assert llm.n_tokens == len(tokens) + 4  # the last generated token is not evaluated yet
    completion = llm(PROMPT, max_tokens=5, temperature=0)
    assert llm.detokenize(generated).decode() == text_of(completion)
    with pytest.raises(ValueError, match="exceed"):
        llm.eval([1] * 600)
    with pytest.raises(TokenError):
        llm.eval([llm.n_vocab()])


def test_generate_reuses_the_evaluated_prefix(llm):
    tokens = llm.tokenize(PROMPT.encode())
    llm.reset()
    llm.eval(tokens + llm.tokenize(b" and more", add_bos=False))
    resets = []
    original = llm.reset
    llm.reset = lambda: (resets.append(1), original())[1]
    try:
        first = next(llm.generate(tokens, temp=0.0))
    finally:
        del llm.reset
    assert resets == [] and llm.n_tokens == len(tokens)
    llm.reset()
    assert first == next(llm.generate(tokens, temp=0.0))


def test_save_and_load_state(llm):
    llm.reset()
    state = None
    out = []
    for _ in range(2):
        llm(PROMPT, max_tokens=3, temperature=0)
        if state is None:
            state = llm.save_state()
            assert isinstance(state, LlamaState) and state.llama_state_size == len(state.llama_state) > 0
        out.append(text_of(llm("Other words", max_tokens=6, temperature=0)))
        llm.load_state(state)
    assert out[0] == out[1] and llm.n_tokens == state.n_tokens
    with pytest.raises(TypeError, match="LlamaState"):
        llm.load_state({"state": b""})


def test_ram_cache_resumes_a_prompt(llm):
    cache = LlamaRAMCache(capacity_bytes=1 << 30)
    path = str(zoo_path("falcon-h1"))
    with Llama(path, n_ctx=128, verbose=False) as writer, Llama(path, n_ctx=128, verbose=False) as reader:
        writer.set_cache(cache)
        expected = text_of(writer(PROMPT, max_tokens=4, temperature=0))
        assert len(cache.cache_state) == 1 and cache.cache_size > 0
        reader.set_cache(cache)
        loads = []
        original = reader.load_state
        reader.load_state = lambda state: (loads.append(1), original(state))[1]
        assert text_of(reader(PROMPT, max_tokens=4, temperature=0)) == expected and loads == [1]
    small = LlamaRAMCache(capacity_bytes=0)
    small[(1, 2)] = llm.save_state()
    assert len(small.cache_state) == 0  # over capacity: evicted at once
    with pytest.raises(TypeError, match="LlamaRAMCache"):
        llm.set_cache({})


def test_disk_cache_writes_atomically_and_survives_bad_entries(tmp_path, llm):
    cache = LlamaDiskCache(cache_dir=tmp_path)
    llm.reset()
    llm(PROMPT, max_tokens=2, temperature=0)
    state = llm.save_state()
    key = llm.input_ids[: llm.n_tokens].tolist()
    cache[key] = state
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(LlamaDiskCache.SUFFIX)] == []  # no temp left
    loaded = LlamaDiskCache(cache_dir=tmp_path)[key + [5]]  # a fresh instance reads what the first wrote
    assert loaded.n_tokens == state.n_tokens and loaded.llama_state == state.llama_state
    assert np.array_equal(loaded.input_ids, state.input_ids) and np.array_equal(loaded.scores, state.scores)
    (tmp_path / ("f" * 40 + LlamaDiskCache.SUFFIX)).write_bytes(b"PK\x03\x04 truncated")
    entry = next(p for p in tmp_path.iterdir() if p.name != "f" * 40 + LlamaDiskCache.SUFFIX)
    entry.write_bytes(entry.read_bytes()[:100])  # truncate the real entry after its key was indexed
    with pytest.warns(RuntimeWarning, match="damaged|not a readable"):
        with pytest.raises(KeyError):
            cache[key]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert key not in cache  # reported once, then a plain miss
    with pytest.warns(RuntimeWarning, match="not a readable"):  # a new instance reports the foreign file too
        LlamaDiskCache(cache_dir=tmp_path, capacity_bytes=0)[key] = state  # over capacity: evicted at once
    assert not any(p.name.endswith(LlamaDiskCache.SUFFIX) and p.stat().st_size > 100 for p in tmp_path.iterdir())


# -- embeddings -----------------------------------------------------------------------------
def test_embeddings():
    path = str(zoo_path("llama"))
    with Llama(path, n_ctx=128, embedding=True, pooling_type=lib.LLAMA_POOLING_TYPE_MEAN, verbose=False) as m:
        one = m.embed("Hello world")
        both = m.embed(["Hello world", "Another prompt"])
        assert len(one) == m.n_embd() and np.allclose(both[0], one, atol=1e-5)
        assert np.linalg.norm(m.embed("Hello world", normalize=True)) == pytest.approx(1.0, abs=1e-5)
        response = m.create_embedding(["a", "b"])
        assert [d["index"] for d in response["data"]] == [0, 1] and response["usage"]["prompt_tokens"] == 4
        assert m(PROMPT, max_tokens=2, temperature=0)["usage"]["completion_tokens"] == 2  # still completes
    with Llama(path, n_ctx=128, embedding=True, n_parallel=2, verbose=False) as m:  # per-token (no pooling)
        per_token = m.embed("Hello world")
        assert len(per_token) == len(m.tokenize(b"Hello world")) and len(per_token[0]) == m.n_embd()
        texts = ["alpha beta", "gamma delta epsilon"]
        expected = {t: m.embed(t) for t in texts}
        mismatches = []
        threads = [threading.Thread(target=lambda t=t: mismatches.extend(
            t for _ in range(5) if not np.allclose(m.embed(t), expected[t], atol=1e-6))) for t in texts * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert mismatches == []  # concurrent calls take turns on the embedding context
    with Llama(path, n_ctx=64, verbose=False) as m, pytest.raises(RuntimeError, match="embedding=True"):
        m.embed("x")


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    ({"prompt": "word " * 600}, ValueError, "exceed context window"),
    ({"prompt": [1, 32000]}, TokenError, "out of range"),
    ({"prompt": [1, -1]}, TokenError, "out of range"),
    ({"prompt": 3.5}, TypeError, "prompt"),
    ({"max_tokens": -5}, ValueError, "max_tokens"),
    ({"suffix": "end"}, ValueError, "suffix"),
    ({"stop": [1]}, TypeError, "stop"),
    ({"logit_bias": {"x": 1.0}}, ValueError, "logit_bias"),
    ({"logit_bias": {99999: 1.0}}, TokenError, "out of range"),
    ({"top_p": 2.0}, ValueError, "top_p"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"grammar": 'root ::= "a"'}, TypeError, "LlamaGrammar"),
    ({"grammar": LlamaGrammar(_grammar="root ::= <undefined-token>")}, ValueError, "grammar"),
    ({"logprobs": -1}, ValueError, "logprobs"),
])
def test_bad_completion_arguments(llm, par, kwargs, error, match):
    args = {"prompt": PROMPT, "max_tokens": 2, **kwargs}
    for model in (llm, par):
        with pytest.raises(error, match=match):
            model.create_completion(**args)
        with pytest.raises(error, match=match):
            model.create_completion(**args, stream=True)  # refused before the first chunk
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_token'"):
        llm.create_completion(PROMPT, max_token=3)


def test_invalid_grammar_text():
    with pytest.raises(ValueError, match="cannot parse"):
        LlamaGrammar.from_string("root ::= undefined_rule")
    with pytest.raises(ValueError, match="empty"):
        LlamaGrammar.from_string("  ")
    with pytest.raises(ValueError, match="json_schema"):
        LlamaGrammar.from_json_schema("{not json")


# -- import llama_cpp -------------------------------------------------------------------------
def test_install_as_llama_cpp():
    """llama_cpp is stock's whole package over our libllama, with our Llama (tests/test_as_llama_cpp.py
    drives it further)."""
    before = {k: v for k, v in sys.modules.items() if k == "llama_cpp" or k.startswith("llama_cpp.")}
    try:
        package = install_as_llama_cpp()
        import llama_cpp
        import llama_cpp._internals
        import llama_cpp.llama_cpp as low
        from llama_cpp import ChatCompletionRequestUserMessage, Llama as LlamaCpp
        from llama_cpp.llama_grammar import JSON_GBNF
        assert package is llama_cpp and install_as_llama_cpp() is llama_cpp  # idempotent
        assert LlamaCpp is Llama and llama_cpp.llama.Llama is Llama and llama_cpp.__version__ == "0.3.36"
        assert llama_cpp.LLAMA_POOLING_TYPE_MEAN == lib.LLAMA_POOLING_TYPE_MEAN and "root" in JSON_GBNF
        assert ChatCompletionRequestUserMessage(role="user", content="x") == {"role": "user", "content": "x"}
        assert low.__file__.startswith(str(ROOT / "pyllama_ssm" / "_stock"))  # stock's code, not ours
        assert low.llama_max_parallel_sequences() == lib.llama_max_parallel_sequences()
        llm = Llama(model_path=str(zoo_path("qwen35")), n_ctx=256, verbose=False)
        try:
            assert low.llama_n_ctx(llm.ctx) == llm.n_ctx() and llm._ctx.ctx.value == llm.ctx.value
            assert low.llama_vocab_n_tokens(low.llama_model_get_vocab(llm.model)) == llm.n_vocab()
            assert llm._model.token_get_text(llm.token_eos()) == ffi.string(
                lib.llama_vocab_get_text(llm._model.vocab, llm.token_eos())).decode()  # stock's method
            # what stock's multimodal chat handlers use: _ctx.kv_cache_clear() (stock's), _batch.batch
            llm.eval(llm.tokenize(b"Hello"))
            memory = low.llama_get_memory(llm._ctx.ctx)
            assert low.llama_memory_seq_pos_max(memory, 0) >= 0
            llm._ctx.kv_cache_clear()
            assert low.llama_memory_seq_pos_max(memory, 0) == -1
            assert isinstance(llm._batch.batch, low.llama_batch) and ctypes.addressof(llm._batch.batch) == \
                int(ffi.cast("uintptr_t", ffi.addressof(llm._batch.raw)))
        finally:
            llm.close()
    finally:
        for name in [k for k in sys.modules if k == "llama_cpp" or k.startswith("llama_cpp.")]:
            del sys.modules[name]
        sys.modules.update(before)


def test_threads_sharing_a_single_sequence_llama_never_crash_it():
    """n_parallel=1 is one call at a time; threads that share it anyway take turns, they do not crash it."""
    import threading
    llm = Llama(model_path=str(zoo_path("qwen35")), n_ctx=512, verbose=False)
    results, errors = [], []

    def work(i):
        try:
            results.append(llm.create_completion(f"Thread {i} says", max_tokens=8, temperature=0))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    llm.close()
    assert not errors and len(results) == 4
    assert all(r["choices"][0]["finish_reason"] in ("length", "stop") for r in results)


def test_completion_up_to_a_padded_context_scores_every_token():
    """Flash attention (now the default for n_parallel=1 too) pads n_ctx 128 to 256: the token and score
    buffers follow the context llama.cpp made, so a completion that fills it keeps every logprob."""
    with Llama(str(zoo_path("qwen35")), n_ctx=128, logits_all=True, verbose=False) as llm:
        assert llm.n_ctx() >= 128
        for stream in (False, True):
            out = llm.create_completion("Hello", max_tokens=None, logprobs=1, temperature=0, stream=stream)
            chunks = list(out) if stream else [out]
            lps = [lp for c in chunks if c["choices"][0]["logprobs"] for lp in c["choices"][0]["logprobs"]["token_logprobs"]]
            assert lps and all(v is not None and v <= 0 for v in lps)
