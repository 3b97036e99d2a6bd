"""Prompt caches for Llama.set_cache(), as llama_cpp.llama_cache offers them.

A cache maps token sequences to saved LlamaStates; a lookup returns the state
whose key shares the longest prefix with the prompt, and the completion resumes
from it when that beats what the context already holds.  Entries are evicted
least recently used first to stay within capacity_bytes.

The disk cache keeps one file per entry (numpy .npz, no pickle), written to a
temporary file and renamed into place, so a crash never leaves a half-written
entry under a real name; a file that is truncated or not ours is reported with a
RuntimeWarning and treated as a miss.

Why ours and not stock's: stock's module imports its package as the top-level `llama_cpp`, so it
exists only under install_as_llama_cpp() (as_llama_cpp.py), where it is `llama_cpp.llama_cache` and
Llama.set_cache takes its caches too.  Ours is also safer on disk: stock's disk cache unpickles
whatever diskcache holds, ours reads numpy arrays only and reports a file it cannot read as a miss.

LlamaState, what an entry holds (Llama.save_state's result), is defined here, since the disk cache
builds it and it needs nothing of Llama; pyllama_ssm.llama re-exports it.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import tempfile
import warnings
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

Key = tuple[int, ...]


@dataclass(eq=False)
class LlamaState:
    """A saved context (memory bytes) with the Python-side state that goes with it."""

    input_ids: npt.NDArray[np.intc]
    scores: npt.NDArray[np.single]
    n_tokens: int
    llama_state: bytes
    llama_state_size: int
    seed: int


def longest_token_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _best_key(keys, key: Key) -> Key | None:
    """The key sharing the longest (non-empty) prefix with `key`."""
    best, best_len = None, 0
    for k in keys:
        n = longest_token_prefix(k, key)
        if n > best_len:
            best, best_len = k, n
    return best


class BaseLlamaCache(ABC):
    """Base class of the caches: capacity in bytes and the mapping protocol."""

    def __init__(self, capacity_bytes: int = (2 << 30)):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes={capacity_bytes}: must be >= 0")
        self.capacity_bytes = capacity_bytes

    @property
    @abstractmethod
    def cache_size(self) -> int: ...

    @abstractmethod
    def _find_longest_prefix_key(self, key: Key) -> Key | None: ...

    @abstractmethod
    def __getitem__(self, key: Sequence[int]) -> "LlamaState": ...

    def __contains__(self, key: Sequence[int]) -> bool:
        return self._find_longest_prefix_key(tuple(key)) is not None

    @abstractmethod
    def __setitem__(self, key: Sequence[int], value: "LlamaState") -> None: ...


class LlamaRAMCache(BaseLlamaCache):
    """States kept in process memory."""

    def __init__(self, capacity_bytes: int = (2 << 30)):
        super().__init__(capacity_bytes)
        self.cache_state: collections.OrderedDict[Key, LlamaState] = collections.OrderedDict()

    @property
    def cache_size(self) -> int:
        return sum(state.llama_state_size for state in self.cache_state.values())

    def _find_longest_prefix_key(self, key: Key) -> Key | None:
        return _best_key(self.cache_state, key)

    def __getitem__(self, key: Sequence[int]) -> "LlamaState":
        best = self._find_longest_prefix_key(tuple(key))
        if best is None:
            raise KeyError("no cached state shares a prefix with these tokens")
        self.cache_state.move_to_end(best)
        return self.cache_state[best]

    def __setitem__(self, key: Sequence[int], value: "LlamaState") -> None:
        key = tuple(key)
        self.cache_state.pop(key, None)
        self.cache_state[key] = value
        while self.cache_state and self.cache_size > self.capacity_bytes:
            self.cache_state.popitem(last=False)


LlamaCache = LlamaRAMCache  # the older name


class LlamaDiskCache(BaseLlamaCache):
    """States kept as files in cache_dir, shared by every process that uses the directory."""

    SUFFIX = ".llstate.npz"
    FORMAT = 1

    def __init__(self, cache_dir: str | os.PathLike = ".cache/llama_cache", capacity_bytes: int = (2 << 30)):
        super().__init__(capacity_bytes)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._keys: dict[Path, Key] = {}   # entry file -> its key, read once per file
        self._bad: set[Path] = set()       # unreadable files, reported once

    def _path(self, key: Key) -> Path:
        digest = hashlib.sha256(np.asarray(key, dtype=np.int64).tobytes()).hexdigest()
        return self.cache_dir / f"{digest[:40]}{self.SUFFIX}"

    def _entries(self) -> dict[Path, Key]:
        """The valid entries now on disk (other processes may add or remove some)."""
        present = set(self.cache_dir.glob(f"*{self.SUFFIX}"))
        for path in list(self._keys):
            if path not in present:
                del self._keys[path]
        self._bad &= present
        for path in present - self._keys.keys() - self._bad:
            try:
                with np.load(path, allow_pickle=False) as f:
                    self._keys[path] = tuple(int(t) for t in f["key"])
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                self._bad.add(path)
                warnings.warn(f"{path}: not a readable pyllama-ssm cache entry ({type(e).__name__}: {e}); "
                              f"ignored", RuntimeWarning, stacklevel=3)
        return self._keys

    @property
    def cache_size(self) -> int:
        return sum(p.stat().st_size for p in self._entries() if p.exists())

    def _find_longest_prefix_key(self, key: Key) -> Key | None:
        return _best_key(self._entries().values(), key)

    def __getitem__(self, key: Sequence[int]) -> "LlamaState":
        key = tuple(key)
        entries = self._entries()
        best = _best_key(entries.values(), key)
        if best is None:
            raise KeyError("no cached state shares a prefix with these tokens")
        path = self._path(best)
        try:
            with np.load(path, allow_pickle=False) as f:
                if int(f["format"]) != self.FORMAT:
                    raise ValueError(f"format {int(f['format'])}, expected {self.FORMAT}")
                state = LlamaState(input_ids=f["input_ids"], scores=f["scores"], n_tokens=int(f["n_tokens"]),
                                   llama_state=f["llama_state"].tobytes(), llama_state_size=int(f["llama_state_size"]),
                                   seed=int(f["seed"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            warnings.warn(f"{path}: damaged cache entry ({type(e).__name__}: {e}); treated as a miss",
                          RuntimeWarning, stacklevel=2)
            entries.pop(path, None)
            self._bad.add(path)
            raise KeyError("the matching cached state is damaged") from e
        os.utime(path)  # mtime orders eviction: least recently used first
        return state

    def __setitem__(self, key: Sequence[int], value: "LlamaState") -> None:
        key = tuple(key)
        buf = io.BytesIO()
        np.savez(buf, format=np.int64(self.FORMAT), key=np.asarray(key, dtype=np.int64),
                 input_ids=value.input_ids, scores=value.scores, n_tokens=np.int64(value.n_tokens),
                 llama_state=np.frombuffer(value.llama_state, dtype=np.uint8),
                 llama_state_size=np.int64(value.llama_state_size), seed=np.int64(value.seed))
        path = self._path(key)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._keys[path] = key
        self._evict()

    def _evict(self) -> None:
        files = sorted((p for p in self._entries() if p.exists()), key=lambda p: p.stat().st_mtime)
        size = sum(p.stat().st_size for p in files)
        for path in files:
            if size <= self.capacity_bytes:
                break
            size -= path.stat().st_size
            path.unlink(missing_ok=True)
            self._keys.pop(path, None)
