"""A token batch for llama_decode: tokens, positions, sequence ids, output flags.

The arrays are this object's own (not llama_batch_init's): each token's sequence ids lie in one
contiguous block, so that numpy views of all of them write many rows at once (a step of 32 decoding
sequences, a prompt chunk of 2048 tokens) instead of one cffi store per field and token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from .bindings import ffi


class Batch:
    """Fixed-capacity llama_batch of tokens (no embeddings).  close() is kept for the context-manager
    protocol; the memory is Python's and goes with the object."""

    def __init__(self, capacity: int, n_seq_max: int = 1):
        if capacity < 1:
            raise ValueError(f"batch capacity {capacity}: must be at least 1")
        if n_seq_max < 1:
            raise ValueError(f"n_seq_max {n_seq_max}: must be at least 1")
        self.capacity = capacity
        self.n_seq_max = n_seq_max
        self._arrays = arrays = (ffi.new("llama_token[]", capacity), ffi.new("llama_pos[]", capacity),
                                 ffi.new("int32_t[]", capacity), ffi.new("llama_seq_id[]", capacity * n_seq_max),
                                 ffi.new("llama_seq_id *[]", capacity + 1), ffi.new("int8_t[]", capacity))
        token, pos, n_seq_id, seq_ids, seq_ptrs, logits = arrays
        self.token = np.frombuffer(ffi.buffer(token), dtype=np.int32)
        self.pos = np.frombuffer(ffi.buffer(pos), dtype=np.int32)
        self.n_seq_id = np.frombuffer(ffi.buffer(n_seq_id), dtype=np.int32)
        self.logits = np.frombuffer(ffi.buffer(logits), dtype=np.int8)
        # token i's sequence ids: seq_ids[i * n_seq_max ...]; first_seq the first of each
        self.seq_ids = np.frombuffer(ffi.buffer(seq_ids), dtype=np.int32)
        self.first_seq = self.seq_ids[::n_seq_max]
        ptrs = np.frombuffer(ffi.buffer(seq_ptrs), dtype=np.uintp)
        ptrs[:capacity] = int(ffi.cast("uintptr_t", seq_ids)) + np.arange(capacity, dtype=np.uintp) * (4 * n_seq_max)
        ptrs[capacity] = 0  # NULL-terminated, as llama_batch_init's
        self._b = ffi.new("llama_batch *", {"n_tokens": 0, "token": token, "embd": ffi.NULL, "pos": pos,
                                            "n_seq_id": n_seq_id, "seq_id": seq_ptrs, "logits": logits})
        self.n_outputs = 0  # tokens with logits added through this object's methods
        self._open = True

    @property
    def raw(self):
        """The llama_batch struct (for llama_decode, which takes it by value)."""
        if not self._open:
            raise ValueError("batch is closed")
        return self._b[0]

    @property
    def n_tokens(self) -> int:
        return self._b.n_tokens

    def __len__(self) -> int:
        return self._b.n_tokens

    def clear(self) -> None:
        self._b.n_tokens = 0
        self.n_outputs = 0

    def _reserve(self, n: int, what: str) -> int:
        if not self._open:
            raise ValueError("batch is closed")
        i = self._b.n_tokens
        if i + n > self.capacity:
            raise OverflowError(f"batch is full ({self.capacity} tokens): no room for {what}")
        return i

    def add(self, token: int, pos: int, seq_ids: int | Iterable[int] = 0, logits: bool = False) -> int:
        """Append one token; returns its index in the batch (the logits index if requested)."""
        ids = [seq_ids] if isinstance(seq_ids, int) else list(seq_ids)
        if not 1 <= len(ids) <= self.n_seq_max:
            raise ValueError(f"token at pos {pos}: {len(ids)} sequence ids, batch allows 1..{self.n_seq_max}")
        i = self._reserve(1, f"the token at pos {pos}")
        self.token[i] = token
        self.pos[i] = pos
        self.n_seq_id[i] = len(ids)
        if len(ids) == 1:
            self.first_seq[i] = ids[0]
        else:
            self.seq_ids[i * self.n_seq_max:i * self.n_seq_max + len(ids)] = ids
        self.logits[i] = bool(logits)
        self.n_outputs += bool(logits)
        self._b.n_tokens = i + 1
        return i

    def add_rows(self, tokens: Sequence[int], positions: Sequence[int], seq_ids: Sequence[int],
                 logits: bool = True) -> int:
        """Append one token per entry (token, position, sequence id), e.g. a step's decode tokens;
        returns the index of the first."""
        n = len(tokens)
        if n == 1:  # numpy's slice assignment costs more than the items for one
            return self.add(tokens[0], positions[0], seq_ids[0], logits)
        i = self._reserve(n, f"{n} rows")
        self.token[i:i + n] = tokens
        self.pos[i:i + n] = positions
        self.n_seq_id[i:i + n] = 1
        self.first_seq[i:i + n] = seq_ids
        self.logits[i:i + n] = bool(logits)
        self.n_outputs += n if logits else 0
        self._b.n_tokens = i + n
        return i

    def add_sequence(self, tokens: Sequence[int], pos0: int, seq_id: int, logits_last: bool = True) -> int:
        """Append tokens at positions pos0.. of one sequence; returns the last index."""
        n = len(tokens)
        if n == 0:
            return -1
        i = self._reserve(n, f"{n} tokens of sequence {seq_id}")
        self.token[i:i + n] = tokens
        self.pos[i:i + n] = np.arange(pos0, pos0 + n, dtype=np.int32)
        self.n_seq_id[i:i + n] = 1
        self.first_seq[i:i + n] = seq_id
        self.logits[i:i + n] = 0
        self.logits[i + n - 1] = bool(logits_last)
        self.n_outputs += bool(logits_last)
        self._b.n_tokens = i + n
        return i + n - 1

    def output_rows(self) -> np.ndarray | None:
        """For each token of the batch, its row among the outputs (the tokens with logits, in batch
        order: what llama_get_logits returns after a decode), meaningful where logits is set; None
        when every token is an output (the row is the index: a step of decode tokens alone)."""
        n = self._b.n_tokens
        if self.n_outputs == n:
            return None
        return np.cumsum(self.logits[:n], dtype=np.int32) - 1

    def close(self) -> None:
        self._open = False

    def __enter__(self) -> "Batch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
