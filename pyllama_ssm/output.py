"""What a generation reports, by one set of rules for every path that produces it (the Engine, the
drop-in Llama's own loop, the server's streams):

- text from token bytes: a token's bytes may end inside a multi-byte UTF-8 character that the next
  token completes; only that incomplete tail waits, everything before it goes out at once;
- stop strings: a streamed tail waits only while it could still become the start of a stop string;
- logprobs: log-softmax of the model's raw logits in float32 (llama-cpp-python's arithmetic), the top k
  by logprob, ties to the higher token id (as sorting (logprob, id) descending does).

TextStream applies the first two to one generation as it streams; where llama-cpp-python's own loop
decides otherwise (the drop-in's n_parallel=1 path, which must give stock's chunks), its policy says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Literal, TypeVar

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


ENGINE, STOCK = "engine", "llama-cpp-python"


class TextStream:
    """One generation's text as it streams: the bytes of its tokens into text, the stop strings, and what
    went out.  What may go out is what no stop string can still claim; a stop string cuts the text before
    it and ends the stream (stopped); finish() says the text is whole, so nothing more waits.

    policy ENGINE (the Engine, for every request): the text is str, grown by add() a token at a time.  A
    token's bytes that end inside a character wait (pending) for the next token; all before them goes out
    at once, one piece per token.  A stop string is looked for only where the last token could have
    completed it.

    policy STOCK (the drop-in's n_parallel=1 loop: llama-cpp-python's chunks, byte for byte): the text is
    bytes, detokenized whole at each token and given to update().  While it ends inside a multi-byte
    character stock skips the token altogether (no stop search, no chunk, no max_tokens check) for as many
    tokens as the character lacks bytes (waits); a stop string is looked for in the whole text; pieces are
    decoded with errors="ignore"; with logprobs by_token() sends one piece per token.
    """

    __slots__ = ("stops", "stock", "text", "emitted", "final", "stopped", "pending", "waits", "tokens_sent")

    def __init__(self, stops: Sequence[str], policy: Literal["engine", "llama-cpp-python"] = ENGINE):
        if policy not in (ENGINE, STOCK):
            raise ValueError(f"policy={policy!r}: expected {ENGINE!r} or {STOCK!r}")
        self.stock = policy == STOCK
        self.stops: list = [s.encode("utf-8") for s in stops] if self.stock else list(stops)
        self.text: str | bytes = b"" if self.stock else ""
        self.emitted = 0        # characters (STOCK: bytes) of text already sent: the offset of the next piece
        self.final = False      # the text is whole: nothing waits for a stop string or a character
        self.stopped = False    # a stop string cut the text
        self.pending = b""      # ENGINE: the bytes of a character the next token completes
        self.waits = 0          # STOCK: tokens stock still skips for an incomplete character
        self.tokens_sent = 0    # STOCK: tokens whose pieces were sent (by_token's, and the caller's otherwise)

    # -- ENGINE ----------------------------------------------------------------------------
    def add(self, token: int, vocab) -> str:
        """Token's text joins the text (vocab: a Model, whose token_text caches the texts of whole-character
        pieces); returns what may go out now: after a stop string, all that was not sent before it."""
        if self.pending or (text := vocab.token_text(token)) is None:
            text, self.pending = complete_text(self.pending + vocab.token_to_piece(token))
        if not self.stops:  # the common case: all of it goes out
            self.text += text
            self.emitted = len(self.text)
            return text
        self.text += text
        self._cut(self.emitted)
        return self.take()

    # -- STOCK -----------------------------------------------------------------------------
    def update(self, text: bytes, can_wait: bool = True) -> bool:
        """The whole text after one more token.  False: stock skips this token, the text ending inside a
        multi-byte character (can_wait=False where no next token can complete it)."""
        self.text = text
        for k, char in enumerate(text[-3:]):  # stock's test, byte for byte
            k = 3 - k
            for num, pattern in ((2, 192), (3, 224), (4, 240)):
                if num > k and pattern & char == pattern:
                    self.waits = num - k
        if self.waits > 0 and can_wait:
            self.waits -= 1
            return False
        self._cut(0)
        return True

    def by_token(self, tokens: Sequence[int], piece: Callable[[int], bytes]) -> Iterator[tuple[int, str, int]]:
        """The pieces that may go out, one per token (stock's chunks with logprobs): (the token's index in
        tokens, the text shown for it, the length in characters of the text sent before it); a token goes
        only whole, but the final text may cut the last one."""
        text = self.text
        while self.tokens_sent < len(tokens):
            i = self.tokens_sent
            data = piece(tokens[i])
            if self.final:
                if self.emitted >= len(text):
                    return
                shown = data[: len(text) - self.emitted]
            elif self.emitted + len(data) > len(text) - stop_hold(text, self.stops):
                return
            else:
                shown = data
            offset = len(text[: self.emitted].decode("utf-8", errors="ignore"))
            self.emitted, self.tokens_sent = self.emitted + len(data), i + 1
            yield i, shown.decode("utf-8", errors="ignore"), offset

    # -- both ------------------------------------------------------------------------------
    def _cut(self, since: int) -> None:
        """Cut the text before the first stop string (in the order given) found at or after `since` less its
        length (before that a stop string would have been found already)."""
        text = self.text
        for s in self.stops:
            at = text.find(s, max(0, since - len(s)))
            if at >= 0:
                self.text, self.stopped, self.final = text[:at], True, True
                return

    def finish(self, text: str | bytes | None = None) -> None:
        """The text is whole (STOCK: `text`, as stock's loop settles it): nothing more waits."""
        if text is not None:
            self.text = text
        self.final = True

    def take(self) -> str:
        """The next piece that may go out (possibly empty): all of the text not sent yet but a tail that
        could still become a stop string (STOCK: and a character still incomplete at its end; a byte that
        can never complete is dropped, as the final text drops it)."""
        text = self.text
        end = len(text)
        if not self.final:
            if self.stops:
                end -= stop_hold(text, self.stops)
            if self.stock:
                end -= incomplete_tail(text[:end])
        if end <= self.emitted:
            return ""
        piece = text[self.emitted:end]
        self.emitted = end
        return piece.decode("utf-8", errors="ignore") if self.stock else piece
