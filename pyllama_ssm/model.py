"""A loaded GGUF model: weights, vocabulary, metadata."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import _runtime, gguf, rpc, sizing
from .bindings import ffi, lib, set_fields
from .errors import ModelLoadError, TokenError


def _load_on_own_thread(path: Path, params: Any) -> tuple[Any, str]:
    """llama_model_load_from_file on a thread that ends with the load, and the errors it logged.

    Loading runs OpenMP work (ggml's AMX buffer converts weights with `omp parallel`), and libgomp keeps
    a team of threads for every thread that ran one, for that thread's lifetime.  Once a process's teams
    hold more threads than it has CPUs, libgomp stops spinning at ggml's barriers (with
    OMP_WAIT_POLICY=passive it sleeps at once, ~1,000 times a decode step): a team left behind by the
    loading thread made every decode step of the Engine's thread 3x slower on 2 cores (the falcon-h1
    graft, one sequence: 51 ms against 16).  A thread that ends takes its team with it."""
    out: list[Any] = []

    def load() -> None:
        try:
            _runtime.clear_errors()  # llama.cpp logs on the loading thread; its errors are collected there
            ptr = lib.llama_model_load_from_file(str(path).encode(), params)
            out.append((ptr, _runtime.take_errors() if ptr == ffi.NULL else ""))
        except BaseException as e:  # noqa: BLE001 - raised on the caller's thread below
            out.append(e)

    loader = threading.Thread(target=load, name="pyllama-ssm-load")
    loader.start()
    loader.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


class Model:
    """A model loaded from a GGUF file.  Use as a context manager or call close()."""

    _free = lib.llama_model_free  # kept on the class: __del__ may run after module teardown

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int = 0, use_mmap: bool = True,
                 vocab_only: bool = False, check_tensors: bool = False, overrides: Mapping[str, Any] | None = None,
                 rpc_servers: str | Sequence[str] | None = None):
        """overrides: further llama_model_params fields by name (the drop-in Llama passes
        llama-cpp-python's: split_mode, load_mode, kv_overrides, ...); arrays must outlive the call.
        rpc_servers: 'host:port,...' or a list of them, ggml-rpc-server endpoints whose devices take
        layers (n_gpu_layers) before the local GPUs; each is checked first (pyllama_ssm.rpc)."""
        _runtime.init()
        self.path = Path(path)
        self.n_gpu_layers = n_gpu_layers
        self.rpc_servers = rpc.parse(rpc_servers) if rpc_servers is not None else []
        parsed = gguf.read(self.path)  # a corrupt file must not reach llama.cpp, which may abort on it
        try:  # what the context preflight needs, without parsing the file again
            self.facts: sizing.ModelFacts | None = sizing.facts_of(parsed)
        except ValueError:  # an architecture sizing does not model
            self.facts = None
        params = lib.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        if not use_mmap:  # else keep upstream's default (auto-detected)
            params.load_mode = lib.LLAMA_LOAD_MODE_NONE
        params.vocab_only = vocab_only
        params.check_tensors = check_tensors
        set_fields(params, overrides or {}, "llama_model_params")
        if self.rpc_servers:  # the RPC devices first, as llama.cpp orders them, then the local GPUs
            self._devices = ffi.new("ggml_backend_dev_t[]", [*rpc.connect(self.rpc_servers), *rpc.local_devices(),
                                                             ffi.NULL])
            params.devices = self._devices
        self.params = params
        ptr, errors = _load_on_own_thread(self.path, params)
        if ptr == ffi.NULL:
            rpc.release(self.rpc_servers)
            raise ModelLoadError(f"{self.path}: llama.cpp could not load the model: {errors or 'no reason given'}")
        self._ptr = ptr
        self._contexts: weakref.WeakSet = weakref.WeakSet()  # closed before the weights go
        self.vocab = lib.llama_model_get_vocab(ptr)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self._texts: dict[int, str | None] = {}  # token_text's
        self._eog: dict[int, bool] = {}  # is_eog's
        self._eog_tokens: tuple[int, ...] | None = None

    # -- lifetime ------------------------------------------------------------
    @property
    def ptr(self):
        if self._ptr is None:
            raise ValueError(f"model {self.path} is closed")
        return self._ptr

    def close(self) -> None:
        if getattr(self, "_ptr", None) is not None:
            for ctx in list(self._contexts):
                ctx.close()
            self._free(self._ptr)
            self._ptr = None
            if self.rpc_servers:
                rpc.release(self.rpc_servers)

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # -- facts ----------------------------------------------------------------
    @property
    def arch(self) -> str:
        return self.meta("general.architecture") or "?"

    @property
    def n_ctx_train(self) -> int:
        return lib.llama_model_n_ctx_train(self.ptr)

    @property
    def n_embd(self) -> int:
        return lib.llama_model_n_embd(self.ptr)

    @property
    def n_layer(self) -> int:
        return lib.llama_model_n_layer(self.ptr)

    @property
    def n_params(self) -> int:
        return lib.llama_model_n_params(self.ptr)

    @property
    def size_bytes(self) -> int:
        return lib.llama_model_size(self.ptr)

    @property
    def is_recurrent(self) -> bool:
        return bool(lib.llama_model_is_recurrent(self.ptr))

    @property
    def is_hybrid(self) -> bool:
        return bool(lib.llama_model_is_hybrid(self.ptr))

    def description(self) -> str:
        buf = ffi.new("char[256]")
        lib.llama_model_desc(self.ptr, buf, 256)
        return ffi.string(buf).decode("utf-8", "replace")

    def meta(self, key: str) -> str | None:
        buf = ffi.new("char[4096]")
        n = lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, 4096)
        return None if n < 0 else ffi.string(buf).decode("utf-8", "replace")

    def metadata(self) -> dict[str, str]:
        out = {}
        key, val = ffi.new("char[256]"), ffi.new("char[65536]")
        for i in range(lib.llama_model_meta_count(self.ptr)):
            if lib.llama_model_meta_key_by_index(self.ptr, i, key, 256) < 0:
                continue
            if lib.llama_model_meta_val_str_by_index(self.ptr, i, val, 65536) < 0:
                continue
            out[ffi.string(key).decode()] = ffi.string(val).decode("utf-8", "replace")
        return out

    def chat_template(self, name: str | None = None) -> str | None:
        p = lib.llama_model_chat_template(self.ptr, name.encode() if name else ffi.NULL)
        return None if p == ffi.NULL else ffi.string(p).decode("utf-8", "replace")

    # -- vocabulary -------------------------------------------------------------
    @property
    def token_bos(self) -> int:
        return lib.llama_vocab_bos(self.vocab)

    @property
    def token_eos(self) -> int:
        return lib.llama_vocab_eos(self.vocab)

    def is_eog(self, token: int) -> bool:
        eog = self._eog.get(token)  # asked of every generated token: cached as token_text
        if eog is None:
            eog = self._eog[token] = bool(lib.llama_vocab_is_eog(self.vocab, token))
        return eog

    @property
    def eog_tokens(self) -> tuple[int, ...]:
        """Every end-of-generation token (EOS, EOT, <|im_end|>, <|endoftext|>, ...), found once."""
        if self._eog_tokens is None:
            self._eog_tokens = tuple(t for t in range(self.n_vocab) if lib.llama_vocab_is_eog(self.vocab, t))
        return self._eog_tokens

    def check_token(self, token: int) -> int:
        if not isinstance(token, int) or isinstance(token, bool):
            raise TokenError(f"token {token!r}: not an int")
        if not 0 <= token < self.n_vocab:
            raise TokenError(f"token id {token} out of range: the vocabulary has {self.n_vocab} tokens")
        return token

    def tokenize(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        cap = len(data) + 8
        buf = ffi.new("llama_token[]", cap)
        n = lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = ffi.new("llama_token[]", cap)
            n = lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise TokenError(f"text of {len(data)} bytes could not be tokenized (code {n})")
        return list(ffi.unpack(buf, n))

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        self.check_token(token)
        buf = ffi.new("char[64]")
        n = lib.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ffi.new("char[]", -n)
            n = lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return ffi.buffer(buf, n)[:]

    def token_text(self, token: int) -> str | None:
        """The text of token's piece when its bytes are whole UTF-8 characters, else None (the piece
        ends inside a character, or holds bytes that are none): streaming's common case, cached."""
        text = self._texts.get(token, False)
        if text is False:
            piece = self.token_to_piece(token)
            try:
                text = piece.decode("utf-8")  # strict: a partial or invalid sequence takes the slow path
            except UnicodeDecodeError:
                text = None
            self._texts[token] = text
        return text

    def detokenize(self, tokens: list[int], *, special: bool = False) -> bytes:
        for t in tokens:
            self.check_token(t)
        if not tokens:
            return b""
        arr = ffi.new("llama_token[]", tokens)
        cap = max(64, len(tokens) * 8)
        buf = ffi.new("char[]", cap)
        n = lib.llama_detokenize(self.vocab, arr, len(tokens), buf, cap, False, special)
        if n < 0:
            cap = -n
            buf = ffi.new("char[]", cap)
            n = lib.llama_detokenize(self.vocab, arr, len(tokens), buf, cap, False, special)
        return ffi.buffer(buf, n)[:]

    def __repr__(self) -> str:
        state = "closed" if self._ptr is None else self.description()
        return f"<Model {self.path.name} {state}>"
