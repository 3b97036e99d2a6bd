"""A token batch for llama_decode: tokens, positions, sequence ids, output flags."""

from __future__ import annotations

from collections.abc import Iterable

from .bindings import lib


class Batch:
    """Fixed-capacity llama_batch.  Use as a context manager or call close()."""

    _free = lib.llama_batch_free  # kept on the class: __del__ may run after module teardown

    def __init__(self, capacity: int, n_seq_max: int = 1):
        if capacity < 1:
            raise ValueError(f"batch capacity {capacity}: must be at least 1")
        self.capacity = capacity
        self.n_seq_max = n_seq_max
        self._b = lib.llama_batch_init(capacity, 0, n_seq_max)
        self._open = True

    @property
    def raw(self):
        if not self._open:
            raise ValueError("batch is closed")
        return self._b

    @property
    def n_tokens(self) -> int:
        return self._b.n_tokens

    def __len__(self) -> int:
        return self._b.n_tokens

    def clear(self) -> None:
        self._b.n_tokens = 0

    def add(self, token: int, pos: int, seq_ids: int | Iterable[int] = 0, logits: bool = False) -> int:
        """Append one token; returns its index in the batch (the logits index if requested)."""
        b = self.raw
        i = b.n_tokens
        if i >= self.capacity:
            raise OverflowError(f"batch is full ({self.capacity} tokens)")
        ids = [seq_ids] if isinstance(seq_ids, int) else list(seq_ids)
        if not 1 <= len(ids) <= self.n_seq_max:
            raise ValueError(f"token at pos {pos}: {len(ids)} sequence ids, batch allows 1..{self.n_seq_max}")
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = len(ids)
        for k, s in enumerate(ids):
            b.seq_id[i][k] = s
        b.logits[i] = bool(logits)
        b.n_tokens = i + 1
        return i

    def add_sequence(self, tokens: Iterable[int], pos0: int, seq_id: int, logits_last: bool = True) -> int:
        """Append tokens at positions pos0.. of one sequence; returns the last index."""
        toks = list(tokens)
        last = -1
        for k, t in enumerate(toks):
            last = self.add(t, pos0 + k, seq_id, logits_last and k == len(toks) - 1)
        return last

    def close(self) -> None:
        if self._open:
            self._free(self._b)
            self._open = False

    def __enter__(self) -> "Batch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
