"""Logits processors and stopping criteria, as llama_cpp.llama defines them.

A completion calls each with the tokens so far and the last logits: a processor
returns the logits to sample from, a criterion whether to stop.  Their own
module because the chat formats build them too (a template's stop tokens) and
need nothing else of Llama; pyllama_ssm.llama re-exports every name, where
llama-cpp-python's users import them from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Optional

import numpy as np
import numpy.typing as npt

LogitsProcessor = Callable[[npt.NDArray[np.intc], npt.NDArray[np.single]], npt.NDArray[np.single]]
StoppingCriteria = Callable[[npt.NDArray[np.intc], npt.NDArray[np.single]], bool]


class LogitsProcessorList(list):
    def __call__(self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


class StoppingCriteriaList(list):
    def __call__(self, input_ids: npt.NDArray[np.intc], logits: npt.NDArray[np.single]) -> bool:
        return any([criteria(input_ids, logits) for criteria in self])


class MinTokensLogitsProcessor:
    """Forbids the EOS token until min_tokens tokens were generated."""

    def __init__(self, min_tokens: int, token_eos: int):
        self.min_tokens = min_tokens
        self.token_eos = token_eos
        self.prompt_tokens: Optional[int] = None

    def __call__(self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        if self.prompt_tokens is None:
            self.prompt_tokens = len(input_ids)
        if len(input_ids) - self.prompt_tokens < self.min_tokens:
            scores[self.token_eos] = -np.inf
        return scores


class StopOnTokenIds:
    """Stops when the last evaluated token is one of token_ids (what chat templates ask for EOS)."""

    def __init__(self, token_ids: Iterable[int]):
        self.token_ids = frozenset(token_ids)

    def __call__(self, input_ids: npt.NDArray[np.intc], logits: npt.NDArray[np.single]) -> bool:
        return len(input_ids) > 0 and int(input_ids[-1]) in self.token_ids
