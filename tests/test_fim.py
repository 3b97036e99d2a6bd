"""Fill-in-the-middle prompts (pyllama_ssm.fim): llama-server's layout around a vocabulary's FIM tokens.

On the vocabularies that ship with llama.cpp: StarCoder's (<fim_prefix>/<fim_suffix>/<fim_middle>, no
repo or file separator), Refact's (a <reponame> token), DeepSeek-Coder's (its own FIM tokens and a BOS),
GPT-2's (none: a ValueError naming what is missing).  The layout against the pin's llama-server itself
is checked in tests/test_server_infill.py.
"""

from __future__ import annotations

import pytest

from conftest import ROOT
from pyllama_ssm import fim
from pyllama_ssm.bindings import lib
from pyllama_ssm.model import Model

VOCABS = ROOT / "vendor" / "llama.cpp" / "models"
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def vocab():
    models: dict[str, Model] = {}

    def load(name: str) -> Model:
        path = VOCABS / f"ggml-vocab-{name}.gguf"
        if not path.exists():
            pytest.skip(f"{path.name} missing: run `make build` (it extracts the pinned llama.cpp)")
        if name not in models:
            models[name] = Model(path, vocab_only=True)
        return models[name]

    yield load
    for model in models.values():
        model.close()


def text(model: Model, s: str) -> list[int]:
    return model.tokenize(s, add_special=False, parse_special=False)


def test_prefix_suffix_middle_around_the_fim_tokens(vocab):
    m = vocab("starcoder")
    t = fim.FimTokens.of(m.vocab)
    assert (t.rep, t.sep) == (-1, -1) and not t.missing
    got = fim.infill_tokens(m, PREFIX, SUFFIX)
    assert got == [t.pre, *text(m, PREFIX), t.suf, *text(m, SUFFIX), t.mid]
    assert m.detokenize(got, special=True).decode() == f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>"
    # the start of the middle follows the prefix; spm puts the suffix first
    assert fim.infill_tokens(m, PREFIX, SUFFIX, prompt="return") == \
        [t.pre, *text(m, PREFIX), *text(m, "return"), t.suf, *text(m, SUFFIX), t.mid]
    assert fim.infill_tokens(m, PREFIX, SUFFIX, spm=True) == [t.suf, *text(m, SUFFIX), t.pre, *text(m, PREFIX), t.mid]
    # token ids as the prefix are taken as given (what Llama.create_completion(prompt=[...], suffix=...) passes)
    assert fim.infill_tokens(m, [7, 8, 9], SUFFIX) == [t.pre, 7, 8, 9, t.suf, *text(m, SUFFIX), t.mid]


def test_markup_in_the_code_stays_text(vocab):
    m = vocab("starcoder")
    t = fim.FimTokens.of(m.vocab)
    got = fim.infill_tokens(m, "a = '<fim_suffix>'", "")
    assert got.count(t.suf) == 1 and got[-2:] == [t.suf, t.mid]


def test_extra_context_without_a_file_separator(vocab):
    m = vocab("starcoder")
    t = fim.FimTokens.of(m.vocab)
    extra = [{"filename": "util.py", "text": "def sub(a, b): return a - b\n"}, {"text": "X = 1\n"}]
    got = fim.infill_tokens(m, PREFIX, SUFFIX, extra=extra)
    head = text(m, fim.SNIPPET) + text(m, extra[0]["text"]) + text(m, fim.SNIPPET) + text(m, extra[1]["text"])
    assert got == [*head, t.pre, *text(m, PREFIX), t.suf, *text(m, SUFFIX), t.mid]


def test_a_repo_token_opens_the_prompt(vocab):
    m = vocab("refact")
    t = fim.FimTokens.of(m.vocab)
    assert t.rep != -1 and t.sep == -1
    got = fim.infill_tokens(m, PREFIX, SUFFIX, extra=[{"filename": "a.py", "text": "A = 1\n"}])
    assert got == [t.rep, *text(m, "myproject\n"), *text(m, fim.SNIPPET), *text(m, "A = 1\n"),
                   t.pre, *text(m, PREFIX), t.suf, *text(m, SUFFIX), t.mid]


def test_the_bos_goes_after_the_extra_context(vocab):
    m = vocab("deepseek-coder")
    t = fim.FimTokens.of(m.vocab)
    bos = lib.llama_vocab_bos(m.vocab)
    assert lib.llama_vocab_get_add_bos(m.vocab)
    assert fim.infill_tokens(m, PREFIX, SUFFIX) == [bos, t.pre, *text(m, PREFIX), t.suf, *text(m, SUFFIX), t.mid]
    got = fim.infill_tokens(m, PREFIX, SUFFIX, extra=[{"text": "A = 1\n"}])
    assert got[:got.index(bos)] == text(m, fim.SNIPPET) + text(m, "A = 1\n")


def test_llama_servers_cuts_to_a_batch_and_the_context(vocab):
    m = vocab("starcoder")
    t = fim.FimTokens.of(m.vocab)
    prefix, suffix = "x = 1\n" * 200, "y = 2\n" * 200
    extra = [{"filename": "f", "text": "z = 3\n" * 200}]
    pre, suf, head = text(m, prefix), text(m, suffix), text(m, fim.SNIPPET) + text(m, extra[0]["text"])
    got = fim.infill_tokens(m, prefix, suffix, prompt="w", extra=extra, limits=fim.Limits(n_batch=64, n_ctx=256))
    n_extra = 256 - 64 + 2  # n_ctx - n_batch - 2 * n_predict, n_predict = -1
    assert got == [*head[-n_extra:], t.pre, *pre[-48:], *text(m, "w"), t.suf, *suf[:16 - 3], t.mid]


def test_a_vocabulary_without_fim_tokens_is_refused_by_name(vocab):
    m = vocab("gpt-2")
    with pytest.raises(ValueError, match=r"suffix: .*no <fim_pre> \(prefix\), <fim_suf> \(suffix\), "
                                         r"<fim_mid> \(middle\) token"):
        fim.infill_tokens(m, PREFIX, SUFFIX)


def test_llama_create_completion_fills_in_the_middle():
    """The drop-in's suffix= takes the same layout, on one sequence and on the Engine (llama-cpp-python's API)."""
    from conftest import zoo_path
    from pyllama_ssm import Llama

    answers = []
    for n_parallel in (1, 4):
        with Llama(str(zoo_path("granitehybrid")), n_ctx=512, n_parallel=n_parallel, verbose=False) as m:
            try:
                got = m.create_completion(PREFIX, suffix=SUFFIX, temperature=0, max_tokens=8)
            except ValueError as e:
                if "not supported" in str(e):  # pyllama_ssm/llama.py still refuses suffix
                    pytest.skip("Llama.create_completion does not take suffix yet (the llama.py change of #29)")
                raise
            laid_out = m.create_completion(fim.infill_tokens(m._model, PREFIX, SUFFIX), temperature=0, max_tokens=8)
            assert got["choices"][0]["text"] == laid_out["choices"][0]["text"]
            assert got["usage"] == laid_out["usage"]
            streamed = m.create_completion(PREFIX, suffix=SUFFIX, temperature=0, max_tokens=8, stream=True)
            assert "".join(c["choices"][0]["text"] for c in streamed) == got["choices"][0]["text"]
            echoed = m.create_completion(PREFIX, suffix=SUFFIX, temperature=0, max_tokens=8, echo=True)
            assert echoed["choices"][0]["text"] == PREFIX + got["choices"][0]["text"]
            answers.append(got["choices"][0]["text"])
    assert answers[0] == answers[1]
    with Llama(str(zoo_path("llama")), n_ctx=256, verbose=False) as m, \
            pytest.raises(ValueError, match=r"suffix: .*no <fim_pre> \(prefix\)"):
        m.create_completion("x", suffix="y")
