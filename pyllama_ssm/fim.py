"""Fill-in-the-middle prompts: llama.cpp's layout of prefix, suffix and extra context around the FIM tokens.

One function builds them, for the drop-in's `create_completion(prompt, suffix=...)` and for the
server's `/infill` and `suffix` alike, so both give the model the tokens llama-server gives it
(tools/server/server-common.cpp, format_prompt_infill):

    [<fim_rep>myproject\\n]                          when the vocabulary has a repo token
    [<fim_sep>{filename}\\n{text}] per extra chunk    ("\\n\\n--- snippet ---\\n\\n" without a sep token)
    [<fim_sep>filename\\n]                           when the vocabulary has a sep token
    [BOS]                                           when the vocabulary adds one
    <fim_pre>{prefix}{prompt}<fim_suf>{suffix}<fim_mid>

With `spm` (llama-server's --spm-infill, llama-cpp-python's Llama(spm_infill=True)) the suffix part
comes first: `<fim_suf>{suffix}<fim_pre>{prefix}{prompt}<fim_mid>`.  The extra chunks go before the
BOS, as upstream puts them.  Prefix, suffix and extra text are tokenized as plain text (a `<fim_pre>`
written in the code stays text); `prompt`, the start of the middle, is tokenized with special tokens.

llama-server also cuts the parts to fit a batch (the last 3/4 n_batch of the prefix, the first
n_batch/4 of the suffix, minus the prompt) and the extra context to what the context leaves; the
drop-in keeps them whole, as llama-cpp-python does (`limits=None`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Optional, Union

from .bindings import lib

NULL = -1  # LLAMA_TOKEN_NULL
SNIPPET = "\n\n--- snippet ---\n\n"  # upstream's chunk separator where the vocabulary has no <fim_sep>


@dataclass(frozen=True)
class FimTokens:
    """A vocabulary's fill-in-the-middle tokens (-1: the vocabulary has none)."""

    pre: int
    suf: int
    mid: int
    pad: int
    rep: int
    sep: int

    @classmethod
    def of(cls, vocab) -> "FimTokens":
        """The tokens of a llama_vocab pointer (Model.vocab)."""
        return cls(lib.llama_vocab_fim_pre(vocab), lib.llama_vocab_fim_suf(vocab), lib.llama_vocab_fim_mid(vocab),
                   lib.llama_vocab_fim_pad(vocab), lib.llama_vocab_fim_rep(vocab), lib.llama_vocab_fim_sep(vocab))

    @property
    def missing(self) -> list[str]:
        """The tokens a fill-in-the-middle prompt needs that the vocabulary lacks."""
        return [name for name, tok in (("<fim_pre> (prefix)", self.pre), ("<fim_suf> (suffix)", self.suf),
                                       ("<fim_mid> (middle)", self.mid)) if tok == NULL]

    def check(self, what: str = "suffix") -> None:
        """A ValueError naming what is missing when the vocabulary cannot do fill-in-the-middle."""
        if self.missing:
            raise ValueError(f"{what}: fill-in-the-middle needs the model's FIM tokens; its vocabulary has no "
                             f"{', '.join(self.missing)} token")


@dataclass(frozen=True)
class Limits:
    """llama-server's cuts: prefix and suffix within one batch, the extra context within the context."""

    n_batch: int
    n_ctx: int
    n_predict: int = -1


def infill_tokens(model, prefix: Union[str, list[int]], suffix: str, *, prompt: str = "",
                  extra: Iterable[Mapping[str, str]] = (), spm: bool = False,
                  limits: Optional[Limits] = None) -> list[int]:
    """The fill-in-the-middle prompt of `model` (a pyllama_ssm Model: its vocab and tokenize()) as token ids.

    prefix: text, or token ids taken as given.  extra: {"filename", "text"} chunks of other files
    (llama-server's input_extra).  A ValueError names the FIM tokens the vocabulary lacks.
    """
    fim = FimTokens.of(model.vocab)
    fim.check()

    def text(s: str) -> list[int]:
        return model.tokenize(s, add_special=False, parse_special=False) if s else []

    head: list[int] = []
    if fim.rep != NULL:
        head += [fim.rep, *text("myproject\n")]
    for chunk in extra:
        if fim.sep != NULL:
            head += [fim.sep, *text(chunk.get("filename", "tmp") + "\n")]
        else:
            head += text(SNIPPET)
        head += text(chunk.get("text", ""))
    if fim.sep != NULL:
        head += [fim.sep, *text("filename\n")]

    pre, suf = (text(prefix) if isinstance(prefix, str) else list(prefix)), text(suffix)
    middle = model.tokenize(prompt, add_special=False, parse_special=True) if prompt else []
    if limits is not None:  # upstream's cuts (ratio prefix:suffix = 3:1 of a batch)
        n_pre = min(len(pre), 3 * (limits.n_batch // 4))
        n_suf = min(len(suf), max(0, limits.n_batch // 4 - (2 + len(middle))))
        n_extra = min(max(0, limits.n_ctx - limits.n_batch - 2 * limits.n_predict), len(head))
        pre, suf, head = pre[len(pre) - n_pre:], suf[:n_suf], head[len(head) - n_extra:]
    first, second = [fim.pre, *pre, *middle], [fim.suf, *suf]
    if spm:
        first, second = second, first
    bos = [lib.llama_vocab_bos(model.vocab)] if lib.llama_vocab_get_add_bos(model.vocab) else []
    return [*head, *bos, *first, *second, fim.mid]
