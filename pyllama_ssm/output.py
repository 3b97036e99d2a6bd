"""What a generation reports, by one set of rules for every path that produces it (the Engine, the
drop-in Llama's own loop, the server's streams):

- text from token bytes: a token's bytes may end inside a multi-byte UTF-8 character that the next
  token completes; only that incomplete tail waits, everything before it goes out at once;
- stop strings: a streamed tail waits only while it could still become the start of a stop string;
- logprobs: log-softmax of the model's raw logits in float32 (llama-cpp-python's arithmetic), the top k
  by logprob, ties to the higher token id (as sorting (logprob, id) descending does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

_Text = TypeVar("_Text", str, bytes)


def incomplete_tail(data: bytes) -> int:
    """How many bytes at the end of data start a multi-byte UTF-8 character that more bytes may complete."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 == 0x80:  # continuation byte: its lead is further back
            continue
        need = 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
        return back if back < need else 0
    return 0


def complete_text(data: bytes) -> tuple[str, bytes]:
    """(the text of data up to an incomplete last character, the bytes held back); bytes that can never
    form a character are dropped, as llama-cpp-python's errors="ignore" does."""
    end = len(data) - incomplete_tail(data)
    return data[:end].decode("utf-8", errors="ignore"), data[end:]


def stop_hold(text: _Text, stops: Sequence[_Text]) -> int:
    """How many characters (bytes) at the end of text could still begin one of the stop strings."""
    return max((n for s in stops for n in range(min(len(s), len(text)), 0, -1) if text.endswith(s[:n])), default=0)


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """log_softmax in float32, as llama-cpp-python computes it (rows of -inf stay finite where they can)."""
    maxs = np.amax(logits, axis=axis, keepdims=True)
    maxs[~np.isfinite(maxs)] = 0
    shifted = np.subtract(logits, maxs, dtype=np.single)
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def top_logprobs(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k best (token, logprob) of one row, best first, ties to the higher token id; without sorting
    the whole vocabulary (a partition finds the k-th value, only the tokens at or above it are sorted)."""
    if k <= 0:
        return []
    if k < len(logprobs):
        kth = np.partition(logprobs, len(logprobs) - k)[len(logprobs) - k]
        candidates = np.flatnonzero(logprobs >= kth)
    else:
        candidates = np.arange(len(logprobs))
    order = candidates[np.lexsort((-candidates, -logprobs[candidates]))][:k]
    return [(int(t), float(logprobs[t])) for t in order]


def token_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, dict[int, float]]:
    """log P(token) and the k most likely tokens' logprobs, from one row of raw logits."""
    row = log_softmax(logits)
    return float(row[token]), dict(top_logprobs(row, k))
