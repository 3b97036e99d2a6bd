"""The drop-in Llama: llama-cpp-python 0.3.36's high-level API over pyllama-ssm.

Llama(model_path, ...) takes llama_cpp.Llama's parameters (same names, defaults
and meaning) plus n_parallel; an unknown keyword is ignored with a warning, as
llama-cpp-python ignores it.

- n_parallel=1: one context, one sequence, driven from this object the way
  llama-cpp-python drives it (eval, sample, generate, n_tokens, input_ids,
  scores, prefix reuse between calls, save_state/load_state, set_cache), so the
  same calls give the same tokens.  Like llama-cpp-python, one call at a time.
- n_parallel>1: completions are requests to an Engine (one context, continuous
  batching, a shared prefix cache), so calls from several threads run at once,
  each on its own sequence.  The single-sequence methods (eval, sample,
  generate, save_state, load_state, set_cache) then say they need n_parallel=1.

A streamed completion or chat completion is a CompletionStream: an iterator of
chunks whose cancel() works from any thread.  rpc_servers puts layers on other
machines (pyllama_ssm.rpc).

Responses are llama_cpp.llama_types dicts.  suffix (fill-in-the-middle) lays the prompt out around the
model's FIM tokens as llama-server does (pyllama_ssm.fim; spm_infill=True puts the suffix first); a
vocabulary without them gets a ValueError naming the missing tokens.  Not supported, with a clear
error: draft_model (speculative decoding), lora_base.

What llama_cpp.llama defines beside the class lives in modules of its own and is re-exported here:
llama_callbacks (logits processors, stopping criteria), llama_tokenizer (LlamaTokenizer), llama_cache
(LlamaState with the caches) and cancellation (Cancellation, cancellation_scope, CompletionStream).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import os
import random
import sys
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import numpy.typing as npt

from . import fim, llama_chat_format, llama_grammar
from .batch import Batch
from .bindings import ffi, has, lib
from .cancellation import Cancellation, CompletionStream, cancellation_scope, current_cancellation
from .context import Context, default_threads
from .engine import Engine, EngineConfig
from .errors import PoolExhaustedError
from .llama_cache import BaseLlamaCache, LlamaCache, LlamaDiskCache, LlamaRAMCache, LlamaState, longest_token_prefix
from .llama_callbacks import (LogitsProcessor, LogitsProcessorList, MinTokensLogitsProcessor, StoppingCriteria,
                              StoppingCriteriaList, StopOnTokenIds)
from .llama_grammar import LlamaGrammar
from .llama_tokenizer import LlamaTokenizer
from .llama_types import *  # noqa: F403 - llama_cpp.llama re-exports the types too
from .llama_types import (ChatCompletionFunction, ChatCompletionRequestFunctionCall, ChatCompletionRequestMessage,
                          ChatCompletionRequestResponseFormat, ChatCompletionTool, ChatCompletionToolChoiceOption,
                          CompletionLogprobs, CreateChatCompletionResponse, CreateChatCompletionStreamResponse,
                          CreateCompletionResponse, CreateCompletionStreamResponse, CreateEmbeddingResponse)
from .model import Model
from .output import STOCK, TextStream, log_softmax, top_logprobs
from .sampling import Sampler, SamplingParams
from .stock_handles import BatchHandle, ContextHandle, ModelHandle, pointer

__all__ = ["Llama", "LlamaState", "LlamaTokenizer", "LogitsProcessor", "LogitsProcessorList", "StoppingCriteria",
           "StoppingCriteriaList", "MinTokensLogitsProcessor", "StopOnTokenIds", "LlamaGrammar", "BaseLlamaCache",
           "LlamaCache", "LlamaRAMCache", "LlamaDiskCache", "CompletionStream"]

_Cancellation = Cancellation  # the name it had here before it moved to cancellation.py


# -- the model ----------------------------------------------------------------------------
_UNLIMITED = (None, 0, -1)  # max_tokens values meaning "up to the context size" (llama-cpp-python)


def _one_at_a_time(method):
    """Serialize a single-sequence method on its Llama (see Llama._direct_lock)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._direct_lock:
            return method(self, *args, **kwargs)
    return wrapper


class Llama:
    """A GGUF model with llama-cpp-python's API; n_parallel > 1 serves concurrent calls."""

    def __init__(
        self,
        model_path: str,
        *,
        # model
        n_gpu_layers: int = 0,
        split_mode: int = lib.LLAMA_SPLIT_MODE_LAYER,
        main_gpu: int = 0,
        tensor_split: Optional[list[float]] = None,
        vocab_only: bool = False,
        use_mmap: bool = True,
        use_mlock: bool = False,
        kv_overrides: Optional[dict[str, Union[bool, int, float, str]]] = None,
        rpc_servers: Optional[Union[str, list[str]]] = None,
        # context
        seed: int = lib.LLAMA_DEFAULT_SEED,
        n_ctx: int = 512,
        n_batch: int = 512,
        n_ubatch: int = 512,
        n_threads: Optional[int] = None,
        n_threads_batch: Optional[int] = None,
        rope_scaling_type: Optional[int] = lib.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED,
        pooling_type: int = lib.LLAMA_POOLING_TYPE_UNSPECIFIED,
        attention_type: int = lib.LLAMA_ATTENTION_TYPE_UNSPECIFIED,
        rope_freq_base: float = 0.0,
        rope_freq_scale: float = 0.0,
        yarn_ext_factor: float = -1.0,
        yarn_attn_factor: float = 1.0,
        yarn_beta_fast: float = 32.0,
        yarn_beta_slow: float = 1.0,
        yarn_orig_ctx: int = 0,
        logits_all: bool = False,
        embedding: bool = False,
        offload_kqv: bool = True,
        flash_attn: Optional[bool] = None,
        op_offload: Optional[bool] = None,
        swa_full: Optional[bool] = None,
        # sampling
        no_perf: bool = False,
        last_n_tokens_size: int = 64,
        # LoRA
        lora_base: Optional[str] = None,
        lora_scale: float = 1.0,
        lora_path: Optional[str] = None,
        # backend
        numa: Union[bool, int] = False,
        # chat
        chat_format: Optional[str] = None,
        chat_handler: Optional[llama_chat_format.LlamaChatCompletionHandler] = None,
        draft_model: Any = None,
        tokenizer: Any = None,
        # KV cache types (ggml_type)
        type_k: Optional[int] = None,
        type_v: Optional[int] = None,
        spm_infill: bool = False,
        verbose: bool = True,
        # pyllama-ssm
        n_parallel: int = 1,
        batch_invariant: Optional[bool] = None,  # None: on where the build has it (context.invariant_by_default)
        prefix_cache: Optional[int] = None,
        prefix_cache_bytes: Optional[int] = 256 << 20,
        draft_max_seqs: Optional[int] = None,
        **kwargs: Any,  # as llama-cpp-python: unknown keywords (LangChain's n_parts, f16_kv...) are ignored
    ):
        if kwargs:
            warnings.warn(f"Llama: ignoring unknown keyword argument(s) {', '.join(sorted(kwargs))} "
                          f"(as llama-cpp-python does)", stacklevel=2)
        self._init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__", "kwargs")}
        self._core_model = self._core_ctx = self._engine = self._core_batch = self._lora = None  # for close()
        self._model = self._ctx = self._batch = None  # stock's names for them (stock_handles)
        self._sampler: Optional[Sampler] = None  # the running generate()'s
        self.verbose = verbose
        if not isinstance(n_parallel, int) or n_parallel < 1:
            raise ValueError(f"n_parallel={n_parallel!r}: must be an int >= 1")
        if n_ctx < 0 or n_batch < 1 or n_ubatch < 1:
            raise ValueError(f"n_ctx={n_ctx}, n_batch={n_batch}, n_ubatch={n_ubatch}: n_ctx must be >= 0 "
                             f"(0 = the model's training context), batch sizes >= 1")
        if draft_model is not None and not callable(draft_model):
            raise ValueError(f"draft_model={draft_model!r}: expected a LlamaDraftModel (a callable from the token "
                             "ids so far to proposed next ids, e.g. llama_cpp.llama_speculative.LlamaPromptLookupDecoding)")
        if lora_base is not None:
            raise ValueError("lora_base: not supported (llama.cpp applies a LoRA to the loaded model itself)")
        if tensor_split is not None and len(tensor_split) > lib.llama_max_devices():
            raise ValueError(f"tensor_split: {len(tensor_split)} entries, at most {lib.llama_max_devices()} devices")
        if last_n_tokens_size < -1:
            raise ValueError(f"last_n_tokens_size={last_n_tokens_size}: must be >= -1")

        self.model_path = model_path
        self.n_parallel = n_parallel
        self.numa = (lib.GGML_NUMA_STRATEGY_DISTRIBUTE if numa else lib.GGML_NUMA_STRATEGY_DISABLED) \
            if isinstance(numa, bool) else numa
        if self.numa != lib.GGML_NUMA_STRATEGY_DISABLED:
            lib.llama_numa_init(self.numa)
        self.tensor_split = tensor_split
        self.kv_overrides = kv_overrides
        self.lora_base, self.lora_scale, self.lora_path = lora_base, lora_scale, lora_path
        self.last_n_tokens_size = last_n_tokens_size
        self.spm_infill = spm_infill
        self.draft_model = draft_model
        self.cache: Optional[BaseLlamaCache] = None
        self.chat_template_kwargs: dict[str, Any] = {}  # extra template variables (llama.cpp server's name)
        self._logits_all = logits_all if draft_model is None else True  # as stock: drafts are verified by row
        self._seed = seed or lib.LLAMA_DEFAULT_SEED
        self._seed_lock = threading.Lock()
        # n_parallel=1 is one call at a time, as in llama-cpp-python; threads that share the object
        # anyway take turns per llama.cpp call (interleaved state, but never two calls on one context)
        self._direct_lock = threading.RLock()
        self._generating: Optional[int] = None  # the thread whose generation holds _direct_lock
        self._reused = 0  # prompt tokens the last generation found evaluated (usage's cached_tokens)
        self._embed_lock = threading.Lock()  # embeddings decode on one context, one call at a time

        # as llama-cpp-python: no mmap with a LoRA; the arrays live as long as model_params refers to them
        self._model_overrides = self._model_params(split_mode, main_gpu, tensor_split,
                                                   use_mmap and lora_path is None, use_mlock, kv_overrides)
        with contextlib.ExitStack() as stack:  # anything opened is closed again if a later step fails
            self._core_model = Model(model_path, n_gpu_layers=0x7FFFFFFF if n_gpu_layers == -1 else n_gpu_layers,
                                vocab_only=vocab_only, overrides=self._model_overrides, rpc_servers=rpc_servers)
            stack.callback(self._core_model.close)
            if n_ctx == 0:
                n_ctx = self._core_model.n_ctx_train or 512  # a vocab-only file may not say
            self._n_ctx = n_ctx
            self.n_batch = min(n_ctx, n_batch)
            self.n_threads = n_threads or max(default_threads() // 2, 1)
            self.n_threads_batch = n_threads_batch or default_threads()
            context_params = dict(
                rope_scaling_type=lib.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED if rope_scaling_type is None
                else rope_scaling_type, pooling_type=pooling_type, attention_type=attention_type,
                rope_freq_base=rope_freq_base, rope_freq_scale=rope_freq_scale, yarn_ext_factor=yarn_ext_factor,
                yarn_attn_factor=yarn_attn_factor, yarn_beta_fast=yarn_beta_fast, yarn_beta_slow=yarn_beta_slow,
                yarn_orig_ctx=yarn_orig_ctx, offload_kqv=offload_kqv, no_perf=no_perf)
            for name, value in (("op_offload", op_offload), ("swa_full", swa_full), ("type_k", type_k),
                                ("type_v", type_v)):
                if value is not None:
                    context_params[name] = value
            # one default for every n_parallel, llama-server's (stock's is off): raising n_parallel must not
            # change a lone request's kernels, so its answer (issue #26)
            flash_attn_mode = "auto" if flash_attn is None else bool(flash_attn)
            # a rejected draft token is undone on recurrent memory from a snapshot of the pool (patched build)
            self._draft_snapshots = draft_model is not None and has("llama_memory_rs_snapshot") and \
                (self._core_model.is_recurrent or self._core_model.is_hybrid)
            # n_parallel == 1 (or embeddings): self._core_ctx, driven from here; n_parallel > 1: self._engine.
            # vocab_only: a tokenizer; with n_parallel == 1 a context too, as stock makes one (it holds
            # no weights and costs nothing), so _ctx.ctx exists for low-level callers
            if (n_parallel == 1 or embedding) and not (vocab_only and n_parallel > 1):
                # embeddings batch many inputs as sequences of one context, as llama-cpp-python does
                self._core_ctx = Context(self._core_model, n_ctx=n_ctx if n_parallel == 1 else self.n_batch,
                                    n_batch=self.n_batch, n_ubatch=min(self.n_batch, n_ubatch),
                                    n_seq_max=min(self.n_batch, lib.llama_max_parallel_sequences()) if embedding
                                    else 1, n_threads=self.n_threads, n_threads_batch=self.n_threads_batch,
                                    kv_unified=embedding, flash_attn=flash_attn_mode, embeddings=embedding,
                                    n_rs_pool=int(self._draft_snapshots),
                                    batch_invariant=batch_invariant, overrides=context_params)
                stack.callback(self._core_ctx.close)
                self._core_batch = Batch(self.n_batch, 1)
                stack.callback(self._core_batch.close)
            if not vocab_only and n_parallel > 1:
                # flash attention unless refused (llama-server's default): with batch_invariant, a request's
                # output then does not depend on the other sequences of the shared KV cache
                self._engine = Engine(self._core_model, EngineConfig(
                    n_ctx=n_ctx, parallel=n_parallel, n_batch=self.n_batch, n_ubatch=min(self.n_batch, n_ubatch),
                    n_threads=self.n_threads,
                    n_threads_batch=self.n_threads_batch, prefix_cache=prefix_cache,
                    prefix_cache_bytes=prefix_cache_bytes, flash_attn=flash_attn_mode,
                    batch_invariant=batch_invariant, context_overrides=context_params,
                    draft_model=draft_model, draft_max_seqs=draft_max_seqs))
                stack.callback(self._engine.close)
            self._lora = self._load_lora(lora_path, lora_scale) if lora_path else None
            stack.pop_all()
        # what code written for stock (its multimodal chat handlers, guidance) reads from Llama._model,
        # _ctx and _batch: ours, plus stock's _internals methods under install_as_llama_cpp()
        self._model = ModelHandle(self._core_model)
        self._ctx = ContextHandle(self._core_ctx) if self._core_ctx is not None else None
        self._batch = BatchHandle(self._core_batch) if self._core_batch is not None else None
        self.context_params = self._context.params if self._context is not None else None
        self.model_params = self._core_model.params
        self.tokenizer_ = tokenizer or LlamaTokenizer(self)
        self._n_vocab = self._core_model.n_vocab
        self._n_ctx = self.n_ctx()
        self._is_recurrent = self._core_model.is_recurrent
        self._is_hybrid = self._core_model.is_hybrid
        if self._core_ctx is not None and n_parallel == 1:
            self.n_tokens = 0
            self._requires_eval = True  # restored or truncated state must decode before sampling
            # sized to the context llama.cpp made (flash attention pads n_ctx to 256), not the one asked for
            self.input_ids: npt.NDArray[np.intc] = np.zeros((self._n_ctx,), dtype=np.intc)
            self.scores: npt.NDArray[np.single] = np.zeros(
                (self._n_ctx if logits_all else self.n_batch, self._n_vocab), dtype=np.single)
        self.metadata = self._core_model.metadata()
        self._init_chat(chat_format, chat_handler)
        if verbose:
            print(ffi.string(lib.llama_print_system_info()).decode(), file=sys.stderr)

    @staticmethod
    def _model_params(split_mode: int, main_gpu: int, tensor_split, use_mmap: bool, use_mlock: bool,
                      kv_overrides) -> dict[str, Any]:
        """llama_model_params fields beyond those Model takes by name."""
        load_mode = {(True, True): lib.LLAMA_LOAD_MODE_MMAP_MLOCK, (False, True): lib.LLAMA_LOAD_MODE_MLOCK,
                     (True, False): lib.LLAMA_LOAD_MODE_MMAP, (False, False): lib.LLAMA_LOAD_MODE_NONE}
        params: dict[str, Any] = dict(split_mode=split_mode, main_gpu=main_gpu,
                                      load_mode=load_mode[(bool(use_mmap), bool(use_mlock))])
        if tensor_split is not None:
            params["tensor_split"] = ffi.new("float[]", [float(x) for x in tensor_split] +
                                             [0.0] * (lib.llama_max_devices() - len(tensor_split)))
        if kv_overrides:
            params["kv_overrides"] = _kv_override_array(kv_overrides)
        return params

    def _load_lora(self, path: str, scale: float):
        if not Path(path).is_file():
            raise ValueError(f"lora_path {path}: no such file")
        adapter = lib.llama_adapter_lora_init(self._core_model.ptr, path.encode())
        if adapter == ffi.NULL:
            raise ValueError(f"lora_path {path}: llama.cpp could not load it as a LoRA adapter for this model")
        adapters, scales = ffi.new("struct llama_adapter_lora *[1]", [adapter]), ffi.new("float[1]", [scale])
        def apply(ctx) -> int:
            return lib.llama_set_adapters_lora(ctx.ptr, adapters, 1, scales)
        for ctx in filter(None, (self._core_ctx, self._engine and self._engine.ctx)):
            # the Engine's context only from its own thread, between steps
            rc = self._engine.call(lambda: apply(ctx)) if self._engine and ctx is self._engine.ctx else apply(ctx)
            if rc != 0:
                lib.llama_adapter_lora_free(adapter)
                raise ValueError(f"lora_path {path}: llama.cpp could not apply the adapter")
        return adapter

    def _init_chat(self, chat_format: Optional[str], chat_handler) -> None:
        """The model's own templates become handlers "chat_template.<name>"; pick the format."""
        eos, bos = self.token_eos(), self.token_bos()
        eos_text = ffi.string(lib.llama_vocab_get_text(self._core_model.vocab, eos)).decode() if eos != -1 else ""
        bos_text = ffi.string(lib.llama_vocab_get_text(self._core_model.vocab, bos)).decode() if bos != -1 else ""
        templates = {"chat_template." + k.removeprefix("tokenizer.chat_template."): v for k, v in
                     self.metadata.items() if k.startswith("tokenizer.chat_template.")}
        if "tokenizer.chat_template" in self.metadata:
            templates["chat_template.default"] = self.metadata["tokenizer.chat_template"]
        self._chat_handlers: dict[str, llama_chat_format.LlamaChatCompletionHandler] = {
            name: llama_chat_format.Jinja2ChatFormatter(template, eos_token=eos_text, bos_token=bos_text,
                                                        stop_token_ids=[eos]).to_chat_handler()
            for name, template in templates.items()}
        self.chat_handler = chat_handler
        self.chat_format = chat_format
        if chat_format is None and chat_handler is None:
            guessed = llama_chat_format.guess_chat_format_from_gguf_metadata(self.metadata)
            self.chat_format = guessed or ("chat_template.default" if "chat_template.default" in templates
                                           else "llama-2")
            self._say(f"Chat format: {self.chat_format}")

    def _say(self, message: str) -> None:
        if self.verbose:
            print(f"Llama: {message}", file=sys.stderr)

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Free the context(s) and the model; the object is unusable afterwards."""
        if getattr(self, "_core_model", None) is None:
            return
        if self._engine is not None:
            self._engine.close()
        if self._core_batch is not None:
            self._core_batch.close()
        if self._core_ctx is not None:
            self._core_ctx.close()
        if self._lora is not None:
            lib.llama_adapter_lora_free(self._lora)
        self._core_model.close()
        self._core_model = self._model = None

    def __enter__(self) -> "Llama":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self._init_kwargs, "seed": self._seed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    # -- facts -----------------------------------------------------------------------------
    @property
    def ctx(self):
        """The llama_context pointer of the single-sequence context, as ctypes: what stock's
        Llama.ctx is, for llama_cpp.llama_cpp's functions (the cffi one: self._core_ctx.ptr)."""
        return pointer(self._direct("ctx").ptr)

    @property
    def model(self):
        """The llama_model pointer, as ctypes (stock's Llama.model; the cffi one: self._core_model.ptr)."""
        return pointer(self._core_model.ptr)

    @property
    def engine(self) -> Optional[Engine]:
        """The Engine serving completions when n_parallel > 1 (its stats(), memory()); None otherwise."""
        return self._engine

    @property
    def _context(self) -> Optional[Context]:
        """The context completions run on (the Engine's with n_parallel > 1); None with vocab_only."""
        return self._engine.ctx if self._engine is not None else self._core_ctx

    def _require_context(self, what: str) -> Context:
        if self._core_model is None:
            raise ValueError("Llama is closed")
        if self._context is None or self.model_params.vocab_only:
            raise ValueError(f"{what}: this Llama holds only a vocabulary (vocab_only=True)")
        return self._context

    def n_ctx(self) -> int:
        return self._context.n_ctx if self._context is not None else self._n_ctx

    def n_embd(self) -> int:
        return self._core_model.n_embd

    def n_vocab(self) -> int:
        return self._core_model.n_vocab

    def token_bos(self) -> int:
        return self._core_model.token_bos

    def token_eos(self) -> int:
        return self._core_model.token_eos

    def token_nl(self) -> int:
        return lib.llama_vocab_nl(self._core_model.vocab)

    def pooling_type(self) -> int:
        ctx = self._require_context("pooling_type")
        read = lambda: lib.llama_pooling_type(ctx.ptr)  # noqa: E731
        return self._engine.call(read) if self._engine is not None and ctx is self._engine.ctx else read()

    def tokenizer(self) -> LlamaTokenizer:
        return LlamaTokenizer(self)

    def set_seed(self, seed: int) -> None:
        self._seed = seed

    # -- tokens ----------------------------------------------------------------------------
    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """utf-8 bytes -> token ids."""
        return self.tokenizer_.tokenize(text, add_bos, special)

    def detokenize(self, tokens: list[int], prev_tokens: Optional[list[int]] = None, special: bool = False) -> bytes:
        """Token ids -> utf-8 bytes (out-of-range ids raise TokenError)."""
        return self.tokenizer_.detokenize(tokens, prev_tokens=prev_tokens, special=special)

    # -- the single sequence (n_parallel=1) -------------------------------------------------
    def _direct(self, what: str) -> Context:
        self._require_context(what)
        if self._engine is not None:
            raise ValueError(f"{what}: the single-sequence API needs n_parallel=1 (this Llama serves "
                             f"{self.n_parallel} sequences through its Engine; use create_completion)")
        return self._core_ctx

    @property
    def _input_ids(self) -> npt.NDArray[np.intc]:
        return self.input_ids[: self.n_tokens]

    @property
    def _scores(self) -> npt.NDArray[np.single]:
        return self.scores[: self.n_tokens, :]

    @property
    def eval_tokens(self) -> deque[int]:
        return deque(self.input_ids[: self.n_tokens].tolist(), maxlen=self._n_ctx)

    @property
    def eval_logits(self) -> deque[list[float]]:
        return deque(self.scores[: self.n_tokens, :].tolist(), maxlen=self._n_ctx if self._logits_all else 1)

    def set_cache(self, cache: Optional[BaseLlamaCache]) -> None:
        """Save states after completions and resume from the longest cached prefix (n_parallel=1)."""
        if cache is not None:
            self._direct("set_cache")
            # ours or llama_cpp.llama_cache's (stock's, under install_as_llama_cpp()): a mapping from
            # token sequences to LlamaStates, looked up by longest prefix
            if not all(hasattr(cache, m) for m in ("__getitem__", "__setitem__", "__contains__", "cache_size")):
                raise TypeError(f"set_cache: expected a LlamaRAMCache or LlamaDiskCache, got {type(cache).__name__}")
        self.cache = cache

    @_one_at_a_time
    def reset(self) -> None:
        """Forget the evaluated tokens (recurrent memory cannot be truncated, so it is cleared)."""
        if self._engine is not None:
            return  # the Engine keeps no per-object sequence
        self.n_tokens = 0
        self._requires_eval = True
        if self._is_recurrent or self._is_hybrid:
            self._core_ctx.clear(True)

    @_one_at_a_time
    def eval(self, tokens: Sequence[int]) -> None:
        """Decode tokens after the n_tokens already evaluated."""
        ctx = self._direct("eval")
        tokens = [self._core_model.check_token(int(t)) for t in tokens]
        if self.n_tokens + len(tokens) > self._n_ctx:
            raise ValueError(f"eval: {self.n_tokens} + {len(tokens)} tokens exceed the context window of {self._n_ctx}")
        ctx.seq_rm(0, self.n_tokens, -1)
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            n_past, n = self.n_tokens, len(chunk)
            self._core_batch.clear()
            for k, tok in enumerate(chunk):
                self._core_batch.add(tok, n_past + k, 0, logits=self._logits_all or k == n - 1)
            ctx.decode(self._core_batch)
            self.input_ids[n_past:n_past + n] = chunk
            if self._logits_all:
                rows = ffi.buffer(lib.llama_get_logits(ctx.ptr), n * self._n_vocab * 4)
                self.scores[n_past:n_past + n, :] = np.frombuffer(rows, np.single).reshape(n, self._n_vocab)
            self.n_tokens += n
            self._requires_eval = False

    def _sampling_params(self, *, temp: float, top_k: int, top_p: float, min_p: float, typical_p: float,
                         repeat_penalty: float, frequency_penalty: float, presence_penalty: float,
                         mirostat_mode: int, mirostat_tau: float, mirostat_eta: float,
                         grammar: Optional[LlamaGrammar] = None, logit_bias: Optional[dict] = None,
                         logits_processor: Optional[LogitsProcessor] = None,
                         prompt_tokens: Sequence[int] = (), seed: Optional[int] = None) -> SamplingParams:
        """The sampler chain llama-cpp-python builds for these arguments, seeded with the current seed.

        A logits processor sees the evaluated tokens (n_parallel=1) or the prompt and the tokens
        generated so far (n_parallel>1), and the raw logits, as llama-cpp-python gives them.
        """
        if grammar is not None:
            # ours, or stock's (llama_cpp.LlamaGrammar after install_as_llama_cpp(), what LangChain and
            # stock's chat handlers build): both hold the GBNF text in _grammar
            if not isinstance(getattr(grammar, "_grammar", None), str):
                raise TypeError(f"grammar: expected a LlamaGrammar, got {type(grammar).__name__}")
            llama_grammar.check(grammar._grammar, self._core_model.vocab)
        bias = {}
        for key, value in (logit_bias or {}).items():
            try:
                tok = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"logit_bias: key {key!r} is not a token id") from None
            bias[self._core_model.check_token(tok)] = float(value)
        processor = None
        if logits_processor is not None:
            if self._engine is None:
                processor = lambda generated, logits: logits_processor(self._input_ids, logits)  # noqa: E731
            else:
                prompt = np.asarray(prompt_tokens, dtype=np.intc)
                processor = lambda generated, logits: logits_processor(  # noqa: E731
                    np.concatenate([prompt, np.asarray(generated, dtype=np.intc)]), logits)
        return SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
                              repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                              presence_penalty=presence_penalty, penalty_last_n=self.last_n_tokens_size,
                              mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta,
                              logit_bias=bias, grammar=grammar._grammar if grammar is not None else None,
                              seed=self._seed if seed is None else seed, logits_processor=processor)

    @_one_at_a_time
    def sample(self, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
               temp: float = 0.80, repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
               presence_penalty: float = 0.0, tfs_z: float = 1.0, mirostat_mode: int = 0, mirostat_eta: float = 0.1,
               mirostat_tau: float = 5.0, penalize_nl: bool = True,
               logits_processor: Optional[LogitsProcessorList] = None, grammar: Optional[LlamaGrammar] = None,
               idx: Optional[int] = None) -> int:
        """Sample a token from the logits of evaluated position idx (default: the last one).

        Inside generate() the generator's sampler is used; otherwise a one-off sampler from
        these arguments (tfs_z and penalize_nl are accepted and unused, as in llama-cpp-python).
        """
        ctx = self._direct("sample")
        if self.n_tokens == 0:
            raise ValueError("sample: nothing evaluated yet (call eval first)")
        if idx is not None and not 0 <= idx < self.n_tokens:
            raise ValueError(f"sample: idx={idx} outside the {self.n_tokens} evaluated positions")
        sampler = self._sampler
        if sampler is None:
            sampler = Sampler(self._core_model, self._sampling_params(
                temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p, repeat_penalty=repeat_penalty,
                frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, mirostat_mode=mirostat_mode,
                mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, grammar=grammar,
                logits_processor=logits_processor))
        try:
            return sampler.sample(ctx.ptr, idx - self.n_tokens if idx is not None else -1)
        finally:
            if sampler is not self._sampler:
                sampler.close()

    def generate(self, tokens: Sequence[int], top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 typical_p: float = 1.0, temp: float = 0.80, repeat_penalty: float = 1.0, reset: bool = True,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0, tfs_z: float = 1.0,
                 mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                 penalize_nl: bool = True, logits_processor: Optional[LogitsProcessorList] = None,
                 stopping_criteria: Optional[StoppingCriteriaList] = None,
                 grammar: Optional[LlamaGrammar] = None) -> Iterator[int]:
        """Tokens generated after `tokens`; send() a list of tokens to append them to the sequence.

        With reset=True the longest prefix shared with the evaluated tokens is kept when the
        memory can be truncated there (recurrent memory cannot: it is re-evaluated).
        """
        self._direct("generate")
        params = self._sampling_params(
            temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p, repeat_penalty=repeat_penalty,
            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, mirostat_mode=mirostat_mode,
            mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, grammar=grammar, logits_processor=logits_processor)
        return self._generate(tokens, params, reset, stopping_criteria)

    def _generate(self, tokens: Sequence[int], params: SamplingParams, reset: bool = True,
                  stopping_criteria: Optional[StoppingCriteria] = None) -> Iterator[int]:
        sampler = Sampler(self._core_model, params)  # sample() uses it while this generator runs
        try:
            yield from self._generate_with(sampler, list(tokens), reset, stopping_criteria)
        finally:
            if self._sampler is sampler:
                self._sampler = None
            sampler.close()

    def _generate_with(self, sampler: Sampler, tokens: list[int], reset: bool,
                       stopping_criteria: Optional[StoppingCriteria]) -> Iterator[int]:
        # a generation owns the single sequence until it ends: other threads wait their turn
        if self._generating == threading.get_ident():
            raise RuntimeError("a generation of this Llama is still open on this thread (finish or close its "
                               "stream first; n_parallel > 1 serves several at once)")
        with self._direct_lock:
            self._generating = threading.get_ident()
            try:
                yield from self._generate_locked(sampler, tokens, reset, stopping_criteria)
            finally:
                self._generating = None

    def _generate_locked(self, sampler: Sampler, tokens: list[int], reset: bool,
                         stopping_criteria: Optional[StoppingCriteria]) -> Iterator[int]:
        if reset and self.n_tokens > 0:
            longest = longest_token_prefix(self._input_ids.tolist(), tokens)
            consumed = longest == len(tokens)
            if consumed and self.n_tokens == len(tokens) and not self._requires_eval:
                reset, tokens, reuse = False, [], 0  # the logits of the whole prompt are live: sample at once
                self._reused = longest
                self._say("generate: full prompt already evaluated")
            else:  # with nothing left to decode, replay one token to refresh the logits
                reuse = longest - 1 if consumed else longest
            if reuse > 0 and self._core_ctx.seq_rm(0, reuse, -1):
                self._reused = reuse
                reset, tokens = False, tokens[reuse:]
                self.n_tokens = reuse
                self._requires_eval = True
                self._say(f"generate: {reuse} prefix tokens reused, {len(tokens)} to evaluate")
        if reset:
            self.reset()
            self._reused = 0
        sample_idx = self.n_tokens + len(tokens) - 1
        drafted = False
        while True:
            undo = self._undo_point() if drafted else None
            try:
                self.eval(tokens)
                while sample_idx < self.n_tokens:
                    self._sampler = sampler
                    token = self.sample(idx=sample_idx)
                    sample_idx += 1
                    if stopping_criteria is not None and stopping_criteria(
                            self._input_ids[:sample_idx], self._scores[sample_idx - self.n_tokens, :]):
                        return
                    sent = yield token
                    tokens = [token] + list(sent or [])
                    if sample_idx < self.n_tokens and token != self._input_ids[sample_idx]:
                        # a rejected draft, or the caller diverged from what is evaluated: cut there
                        tokens = self._truncate(sample_idx, undo) + tokens
                        break
            finally:
                if undo is not None and undo[1] is not None:
                    self._core_ctx.release(undo[1])
            drafted = False
            if self.draft_model is not None:  # proposed tokens are evaluated (and verified) with the next
                room = self._n_ctx - self.n_tokens - len(tokens)
                ids = np.concatenate([self._input_ids[:self.n_tokens], np.asarray(tokens, dtype=np.intc)])
                draft = [int(t) for t in np.asarray(self.draft_model(ids)).ravel()[:max(room, 0)]]
                tokens, drafted = tokens + draft, bool(draft)

    def _undo_point(self) -> Optional[tuple[int, Optional[int]]]:
        """Where a rejected draft goes back to: (n_tokens, a snapshot of the recurrent state, or None
        for attention-only memory, whose tail is simply removed); None when it cannot be had."""
        if not (self._is_recurrent or self._is_hybrid):
            return self.n_tokens, None
        if not self._draft_snapshots:  # the upstream build: replay from the start instead
            return None
        try:
            return self.n_tokens, self._core_ctx.snapshot(0)
        except PoolExhaustedError:  # the pool's one cell is taken: replay instead
            return None

    def _truncate(self, n: int, undo: Optional[tuple[int, Optional[int]]]) -> list[int]:
        """Keep the first n evaluated tokens; returns those that must be evaluated again first.
        Recurrent memory cannot drop a tail: it goes back to the undo point (or to nothing)."""
        self._requires_eval = True
        if self._core_ctx.seq_rm(0, n, -1):
            self.n_tokens = n
            return []
        start = undo[0] if undo is not None and undo[1] is not None else 0
        replay = self.input_ids[start:n].tolist()
        if undo is not None and undo[1] is not None:
            self._core_ctx.restore(undo[1], 0)
            self._core_ctx.seq_rm(0, start, -1)
        else:
            self._core_ctx.clear(True)
        self.n_tokens = start
        return replay

    @_one_at_a_time
    def save_state(self) -> LlamaState:
        ctx = self._direct("save_state")
        data = ctx.state()
        return LlamaState(input_ids=self.input_ids.copy(), scores=self._scores.copy(), n_tokens=self.n_tokens,
                          llama_state=data, llama_state_size=len(data), seed=self._seed)

    @_one_at_a_time
    def load_state(self, state: LlamaState) -> None:
        ctx = self._direct("load_state")
        if not isinstance(state, LlamaState):
            raise TypeError(f"load_state: expected a LlamaState, got {type(state).__name__}")
        if state.input_ids.shape != self.input_ids.shape or state.scores.shape[1:] != (self._n_vocab,):
            raise ValueError(f"load_state: the state is from a context of {state.input_ids.shape[0]} tokens and "
                             f"{state.scores.shape[1:]} logits, this one has {self._n_ctx} and {self._n_vocab}")
        ctx.set_state(state.llama_state)
        self.scores[: len(state.scores), :] = state.scores
        self.scores[len(state.scores):, :] = 0.0
        self.input_ids = state.input_ids.copy()
        self.n_tokens = state.n_tokens
        self._requires_eval = True
        self._seed = state.seed

    # -- embeddings ---------------------------------------------------------------------------
    def _embedding_ctx(self) -> Context:
        self._require_context("embed")
        if self._core_ctx is None or not self._core_ctx.params.embeddings:
            raise RuntimeError("Llama model must be created with embedding=True to compute embeddings")
        return self._core_ctx

    def create_embedding(self, input: Union[str, list[str]], model: Optional[str] = None) -> CreateEmbeddingResponse:
        embeds, total = self.embed(input, return_count=True)
        embeds = embeds if isinstance(input, list) else [embeds]
        return {"object": "list", "model": model if model is not None else self.model_path,
                "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(embeds)],
                "usage": {"prompt_tokens": total, "total_tokens": total}}

    def embed(self, input: Union[str, list[str]], normalize: bool = False, truncate: bool = True,
              return_count: bool = False):
        """Embeddings of each input: a vector per input, or a vector per token when the model
        pools nothing (LLAMA_POOLING_TYPE_NONE).  Inputs are batched as sequences of one decode;
        concurrent calls take turns."""
        with self._embed_lock:
            return self._embed(input, normalize, truncate, return_count)

    def _embed(self, input: Union[str, list[str]], normalize: bool, truncate: bool, return_count: bool):
        ctx = self._embedding_ctx()
        inputs = [input] if isinstance(input, str) else input
        if not isinstance(inputs, list) or not all(isinstance(s, str) for s in inputs):
            raise TypeError("embed: input must be a string or a list of strings")
        n_embd, pooled = self.n_embd(), lib.llama_pooling_type(ctx.ptr) != lib.LLAMA_POOLING_TYPE_NONE
        data: list = []
        sizes: list[int] = []
        total = 0

        def decode_batch() -> None:
            ctx.clear()
            ctx.decode(self._core_batch)
            self._core_batch.clear()
            if pooled:
                vectors = [np.frombuffer(ffi.buffer(_embeddings(lib.llama_get_embeddings_seq(ctx.ptr, i)),
                                                    n_embd * 4), np.single) for i in range(len(sizes))]
            else:
                rows = np.frombuffer(ffi.buffer(_embeddings(lib.llama_get_embeddings(ctx.ptr)),
                                                sum(sizes) * n_embd * 4), np.single).reshape(-1, n_embd)
                starts = np.cumsum([0] + sizes)
                vectors = [rows[a:b] for a, b in zip(starts, starts[1:])]
            for v in vectors:
                if normalize:
                    norm = np.linalg.norm(v, axis=-1, keepdims=True)
                    v = np.where(norm == 0, v, v / np.where(norm == 0, 1, norm))
                data.append(v.tolist())
            sizes.clear()

        self._core_batch.clear()
        for text in inputs:
            tokens = self.tokenize(text.encode("utf-8"))
            if truncate:
                tokens = tokens[: self.n_batch]
            if not tokens:
                raise ValueError(f"embed: input {text!r} has no tokens")
            if len(tokens) > self.n_batch:
                raise ValueError(f"embed: input of {len(tokens)} tokens exceeds n_batch={self.n_batch} "
                                 f"(pass truncate=True or raise n_batch)")
            total += len(tokens)
            if sum(sizes) + len(tokens) > self.n_batch or len(sizes) >= ctx.n_seq_max:
                decode_batch()
            for pos, tok in enumerate(tokens):
                self._core_batch.add(tok, pos, len(sizes), logits=True)
            sizes.append(len(tokens))
        decode_batch()
        ctx.clear()
        self.reset()
        output = data[0] if isinstance(input, str) else data
        return (output, total) if return_count else output

    # -- completions --------------------------------------------------------------------------
    def _prompt_tokens(self, prompt: Union[str, list[int]]) -> list[int]:
        """BOS/EOS around a text prompt as llama-cpp-python adds them; token prompts are taken as given."""
        if isinstance(prompt, str):
            vocab = self._core_model.vocab
            bos, sep, eos = self.token_bos(), lib.llama_vocab_sep(vocab), self.token_eos()
            end = sep if sep != -1 else eos
            head = [bos] if lib.llama_vocab_get_add_bos(vocab) and bos != -1 else []
            tail = [end] if (lib.llama_vocab_get_add_eos(vocab) or sep != -1) and end != -1 else []
            body = self.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) if prompt else []
            tokens = head + body + tail
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            tokens = [self._core_model.check_token(int(t)) for t in prompt]
        else:
            raise TypeError(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}")
        if not tokens:
            raise ValueError("prompt: empty (no tokens, and the model adds no BOS)")
        if tokens[:2] == [self.token_bos()] * 2:
            warnings.warn("prompt starts with two BOS tokens; the chat template or the prompt already adds one",
                          RuntimeWarning, stacklevel=3)
        if len(tokens) >= self._n_ctx:
            raise ValueError(f"Requested tokens ({len(tokens)}) exceed context window of {self._n_ctx}")
        return tokens

    def _token_logprobs(self, token: int, offset: int, logprob: float,
                        top: Iterable[tuple[int, float]]) -> tuple[str, int, float, dict[str, float]]:
        """(text, text offset, logprob, top alternatives by text) of one token, as llama-cpp-python reports it."""
        text = self.detokenize([token]).decode("utf-8", errors="ignore")
        alternatives = {self.detokenize([t]).decode("utf-8", errors="ignore"): float(lp) for t, lp in top}
        alternatives[text] = float(logprob)
        return text, offset, float(logprob), alternatives

    def _completion_chunk(self, cid: str, created: int, model: str, text: str, logprobs=None,
                          finish_reason: Optional[str] = None) -> CreateCompletionStreamResponse:
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}]}

    @staticmethod
    def _stream_logprobs(entry: tuple[str, int, float, dict[str, float]]) -> CompletionLogprobs:
        text, offset, logprob, top = entry
        return {"tokens": [text], "text_offset": [offset], "token_logprobs": [logprob], "top_logprobs": [top]}

    def create_completion(self, prompt: Union[str, list[int]], suffix: Optional[str] = None,
                          max_tokens: Optional[int] = 16, temperature: float = 0.8, top_p: float = 0.95,
                          min_p: float = 0.05, typical_p: float = 1.0, logprobs: Optional[int] = None,
                          echo: bool = False, stop: Optional[Union[str, list[str]]] = [],
                          frequency_penalty: float = 0.0, presence_penalty: float = 0.0, repeat_penalty: float = 1.0,
                          top_k: int = 40, stream: bool = False, seed: Optional[int] = None, tfs_z: float = 1.0,
                          mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                          model: Optional[str] = None, stopping_criteria: Optional[StoppingCriteriaList] = None,
                          logits_processor: Optional[LogitsProcessorList] = None,
                          grammar: Optional[LlamaGrammar] = None, logit_bias: Optional[dict[int, float]] = None,
                          prefix_checkpoints: Sequence[int] = (),
                          ) -> Union[CreateCompletionResponse, Iterator[CreateCompletionStreamResponse]]:
        """Complete a prompt (text, or token ids taken as given).

        max_tokens None, 0 or -1: up to the context size.  logprobs=k reports each token's
        log-probability and the k best alternatives (n_parallel=1 needs logits_all=True).
        stream=True returns a CompletionStream of chunks: closing or cancelling it early (cancel()
        from any thread) frees the sequence.  Bad arguments raise ValueError/TypeError before
        anything runs.  prefix_checkpoints (ours; n_parallel > 1): prompt positions where later
        prompts are likely to part from this one, kept in the prefix cache (chat handlers pass the
        end of the system message and of the last turn).
        """
        self._require_context("create_completion")
        prefix = prompt
        if suffix is not None:  # fill-in-the-middle: the prompt is the prefix (text, or token ids as given)
            if not isinstance(suffix, str):
                raise TypeError(f"suffix: expected a string, got {type(suffix).__name__}")
            prompt = fim.infill_tokens(self._core_model, prompt, suffix, spm=self.spm_infill)
        prompt_tokens = self._prompt_tokens(prompt)
        room = self._n_ctx - len(prompt_tokens)
        if max_tokens in _UNLIMITED:
            max_tokens = room
        elif not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens={max_tokens!r}: must be a positive int (None, 0 or -1: up to the context)")
        max_tokens = min(max_tokens, room)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) for s in stops):
            raise TypeError("stop: expected a string or a list of strings")
        if logprobs is not None:
            if not isinstance(logprobs, int) or not 0 <= logprobs <= self._n_vocab:
                raise ValueError(f"logprobs={logprobs!r}: must be an int in 0..{self._n_vocab}")
            if self._engine is None and not self._logits_all:
                raise ValueError("logprobs is not supported for models created with logits_all=False")
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        with self._seed_lock:  # llama-cpp-python draws each call's seed from the previous one
            call_seed = seed if seed is not None else random.Random(self._seed).randint(0, 2**32)
            params = self._sampling_params(
                temp=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
                repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, grammar=grammar,
                logit_bias=logit_bias, logits_processor=logits_processor, prompt_tokens=prompt_tokens,
                seed=call_seed)
            self._seed = call_seed
        head = (f"cmpl-{uuid.uuid4()}", int(time.time()), model if model is not None else self.model_path)
        echo_text = "" if not echo else prefix if isinstance(prefix, str) else \
            self.detokenize(prompt_tokens).decode("utf-8", errors="ignore")
        # inside create_chat_completion, the chat stream's cancellation
        cancellation = current_cancellation() or Cancellation()
        request = _Request(prompt, prompt_tokens, max_tokens, stops, logprobs, echo, echo_text, stream, cancellation,
                           tuple(prefix_checkpoints))
        if self._engine is not None:
            out = self._engine_completion(request, params, head, stopping_criteria)
        else:
            out = self._direct_completion(request, params, head, stopping_criteria)
        return CompletionStream(out, cancellation) if stream else next(out)

    __call__ = create_completion

    def _direct_completion(self, r: "_Request", params: SamplingParams, head: tuple[str, int, str],
                           stopping_criteria: Optional[StoppingCriteriaList]) -> Iterator[Any]:
        """llama-cpp-python's completion loop on the single sequence, token for token."""
        self._direct("create_completion")
        if self.cache is not None:
            self._resume_from_cache(r.prompt_tokens)
        completion: list[int] = [] if len(r.prompt) > 0 else [self.token_bos()]
        stream = TextStream(r.stop, policy=STOCK)  # the text, detokenized whole at each token as stock does
        echo = r.stream and r.echo  # streamed echo: the prompt's chunk comes once the prompt is evaluated
        finish_reason, end = "length", None
        for token in self._generate(r.prompt_tokens, params, stopping_criteria=stopping_criteria):
            if r.cancellation.is_set:
                return
            if echo:
                echo = False
                yield self._completion_chunk(*head, r.echo_text, self._direct_logprobs(r, []) if r.logprobs
                                             is not None else None)
            if self._core_model.is_eog(token):
                stream.finish(self.detokenize(completion, prev_tokens=r.prompt_tokens))
                finish_reason, end = "stop", token
                break
            completion.append(token)
            # stock skips a token whose text ends inside a multi-byte character (the max_tokens check too),
            # but not past the context: the next token would have no logits row (nor a cell)
            if not stream.update(self.detokenize(completion, prev_tokens=r.prompt_tokens),
                                 can_wait=len(r.prompt_tokens) + len(completion) < self._n_ctx):
                continue
            if stream.stopped:
                finish_reason = "stop"
                break
            if r.stream:
                yield from self._stream_direct(r, head, completion, stream)
            if len(completion) >= r.max_tokens:
                stream.finish()
                break
        else:  # the generation ended itself (a stopping criterion): stock's text is empty but for the check below
            stream.finish(b"")
        if stopping_criteria is not None and stopping_criteria(self._input_ids, self._scores[-1, :]):
            stream.finish(self.detokenize(completion, prev_tokens=r.prompt_tokens))
            finish_reason = "stop"
        r.cancellation.usage = _usage(len(r.prompt_tokens), len(completion), self._reused)
        r.cancellation.tokens = list(completion)
        if echo:  # stopped before its first token
            yield self._completion_chunk(*head, r.echo_text)
        if r.stream:
            yield from self._stream_direct(r, head, completion, stream)
            yield self._completion_chunk(*head, "", finish_reason=finish_reason)
        if self.cache is not None:
            self.cache[r.prompt_tokens + completion] = self.save_state()
        if r.stream:
            return
        text_str = stream.text.decode("utf-8", errors="ignore")
        choice_logprobs = self._direct_logprobs(r, completion, end) if r.logprobs is not None else None
        yield {**self._completion_chunk(*head, r.echo_text + text_str, choice_logprobs,
                                        finish_reason),
               "usage": _usage(len(r.prompt_tokens), len(completion))}

    def _resume_from_cache(self, prompt_tokens: list[int]) -> None:
        try:
            state = self.cache[prompt_tokens]
        except KeyError:
            self._say("cache miss")
            return
        cached = longest_token_prefix(state.input_ids[: state.n_tokens].tolist(), prompt_tokens)
        if cached > longest_token_prefix(self._input_ids.tolist(), prompt_tokens):
            self.load_state(state)
            self._say("cache hit")

    def _stream_direct(self, r: "_Request", head, completion: list[int],
                       stream: TextStream) -> Iterator[CreateCompletionStreamResponse]:
        """The chunks that became safe to send: text no stop string can still claim."""
        if r.logprobs is None:
            piece = stream.take()
            if piece:
                yield self._completion_chunk(*head, piece)
            return
        # with logprobs, one chunk per token (the last one cut at the end of the final text)
        for i, shown, offset in stream.by_token(completion, lambda token: self.detokenize([token])):
            token = completion[i]
            row = Llama.logits_to_logprobs(self._scores[len(r.prompt_tokens) + i - 1, :])
            entry = self._token_logprobs(token, len(r.prompt) + offset, row[token], top_logprobs(row, r.logprobs))
            yield self._completion_chunk(*head, shown, self._stream_logprobs(entry))

    def _direct_logprobs(self, r: "_Request", completion: list[int], end: Optional[int] = None) -> CompletionLogprobs:
        """The logprobs of a finished completion, from the scores of logits_all: row j holds the
        logits after token j, so it scores token j + 1 (the last row: the end-of-generation token `end`)."""
        first = 0 if r.echo else len(r.prompt_tokens)
        base = max(first - 1, 0)  # the first row needed: no log-softmax over rows nobody reads
        rows = Llama.logits_to_logprobs(self._scores[base:])
        tokens = r.prompt_tokens + completion + ([end] if end is not None else [])
        scored = [(None, None) if i == 0 else
                  (float(rows[i - 1 - base][tokens[i]]), top_logprobs(rows[i - 1 - base], r.logprobs))
                  for i in range(first, len(tokens))]
        return self._logprobs_of(r, completion, scored, end)

    def _logprobs_of(self, r: "_Request", completion: list[int],
                     scored: list[tuple[Optional[float], Optional[Iterable[tuple[int, float]]]]],
                     end: Optional[int] = None) -> CompletionLogprobs:
        """OpenAI's completion logprobs: one entry per token of the completion, preceded with echo=True by
        one per prompt token; `scored` holds each one's (logprob, top alternatives).  Deliberately unlike
        llama-cpp-python, which scores each echoed prompt token with the logits at its own position (the
        prediction of the next token): here token i is scored given tokens 0..i-1, so loglikelihoods
        (lm-eval) are right.  The first prompt token has none; a BOS that the tokenizer added to a text
        prompt is not listed, and one the caller sent as a token id is.  With echo=True the end-of-generation
        token `end` that stopped the completion is listed last (no text), as vLLM lists it: lm-eval asks
        max_tokens=1 and drops the last entry as the generated token, which without it is a prompt token."""
        tokens = (r.prompt_tokens + completion + ([end] if end is not None else [])) if r.echo else completion
        skip = int(r.echo and isinstance(r.prompt, str) and r.prompt_tokens[:1] == [self.token_bos()])
        base = 0 if r.echo else len(r.prompt)
        out: CompletionLogprobs = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
        for i in range(skip, len(tokens)):
            offset = base + len(self.detokenize(tokens[skip:i]).decode("utf-8", errors="ignore"))
            logprob, top = scored[i]
            text = self.detokenize([tokens[i]]).decode("utf-8", errors="ignore")
            if logprob is not None:
                text, offset, logprob, top = self._token_logprobs(tokens[i], offset, logprob, top)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(top)
        return out

    def _engine_completion(self, r: "_Request", params: SamplingParams, head: tuple[str, int, str],
                           stopping_criteria: Optional[StoppingCriteriaList]) -> Iterator[Any]:
        """The request as one sequence of the Engine, shaped as llama-cpp-python's responses."""
        for criteria in stopping_criteria or []:
            # the Engine ends a sequence at any end-of-generation token; other criteria need Python per token
            if not (isinstance(criteria, StopOnTokenIds) and all(map(self._core_model.is_eog, criteria.token_ids))):
                raise ValueError("stopping_criteria: arbitrary criteria need n_parallel=1")
        return self._engine_responses(r, params, head)

    def _engine_responses(self, r: "_Request", params: SamplingParams, head: tuple[str, int, str]) -> Iterator[Any]:
        if r.cancellation.is_set:  # cancelled before its first next(): never submitted
            return
        req = self._engine.submit(r.prompt_tokens, params, max_tokens=r.max_tokens, stop=r.stop, logprobs=r.logprobs,
                                  prompt_logprobs=r.echo and r.logprobs is not None, checkpoints=r.checkpoints)
        r.cancellation.on_set(req.cancel)
        try:
            if r.stream:
                sent = 0  # characters of text streamed (the Engine's stream holds back and cuts stop strings)
                echo = r.echo
                for chunk in req:
                    if r.cancellation.is_set:
                        return
                    if echo:  # the prompt is scored once its prefill ended, before the first token
                        echo = False
                        yield self._completion_chunk(*head, r.echo_text, self._engine_echo_logprobs(r, req))
                    lp = None
                    if r.logprobs is not None and chunk.logprob is not None:
                        lp = self._stream_logprobs(self._token_logprobs(
                            chunk.token, len(r.prompt) + sent, chunk.logprob, chunk.top_logprobs.items()))
                    if chunk.text or lp is not None:
                        sent += len(chunk.text)
                        yield self._completion_chunk(*head, chunk.text, lp)
                if r.cancellation.is_set:
                    return
                result = req.result()
                if echo:  # no token came (max_tokens=0)
                    yield self._completion_chunk(*head, r.echo_text, self._engine_echo_logprobs(r, req))
                r.cancellation.tokens = _completion_of(self, result)
                r.cancellation.usage = _usage(len(r.prompt_tokens), len(r.cancellation.tokens),
                                              result.usage.cached_tokens)
                yield self._completion_chunk(*head, "", finish_reason=result.finish_reason)
                return
            result = req.result()
            completion = r.cancellation.tokens = _completion_of(self, result)
            r.cancellation.usage = _usage(len(r.prompt_tokens), len(completion), result.usage.cached_tokens)
            lp = None
            if r.logprobs is not None:
                scored = [(lp_, top.items()) for lp_, top in zip(result.logprobs, result.top_logprobs)]
                if r.echo:
                    scored = [(lp_, top and top.items()) for lp_, top in
                              zip(result.prompt_logprobs, result.prompt_top_logprobs)] + scored
                end = result.tokens[-1] if len(result.tokens) > len(completion) else None
                lp = self._logprobs_of(r, completion, scored, end)
            yield {**self._completion_chunk(*head, r.echo_text + result.text, lp,
                                            result.finish_reason),
                   "usage": _usage(len(r.prompt_tokens), len(completion))}
        finally:
            if not req.done:  # the caller stopped reading: free the sequence
                req.cancel()

    def _engine_echo_logprobs(self, r: "_Request", req) -> Optional[CompletionLogprobs]:
        if r.logprobs is None:
            return None
        scored = [(lp_, top and top.items()) for lp_, top in zip(req.prompt_logprobs, req.prompt_top_logprobs)]
        return self._logprobs_of(r, [], scored)

    def create_chat_completion(
        self, messages: list[ChatCompletionRequestMessage], functions: Optional[list[ChatCompletionFunction]] = None,
        function_call: Optional[ChatCompletionRequestFunctionCall] = None,
        tools: Optional[list[ChatCompletionTool]] = None, tool_choice: Optional[ChatCompletionToolChoiceOption] = None,
        temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
        typical_p: float = 1.0, stream: bool = False, stop: Optional[Union[str, list[str]]] = [],
        seed: Optional[int] = None, response_format: Optional[ChatCompletionRequestResponseFormat] = None,
        max_tokens: Optional[int] = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
        repeat_penalty: float = 1.0, tfs_z: float = 1.0, mirostat_mode: int = 0, mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1, model: Optional[str] = None,
        logits_processor: Optional[LogitsProcessorList] = None, grammar: Optional[LlamaGrammar] = None,
        logit_bias: Optional[dict[int, float]] = None, logprobs: Optional[bool] = None,
        top_logprobs: Optional[int] = None,
    ) -> Union[CreateChatCompletionResponse, Iterator[CreateChatCompletionStreamResponse]]:
        """Answer a conversation with the chat handler, or the chat format (by default the model's template).

        response_format {"type": "json_object"} or {"type": "json_schema", ...} and a named
        tool_choice constrain the output with a grammar.
        """
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise TypeError("messages: expected a list of {'role': ..., 'content': ...} dicts")
        handler = (self.chat_handler or self._chat_handlers.get(self.chat_format)
                   or llama_chat_format.get_chat_completion_handler(self.chat_format))
        # the completions the handler starts share the chat stream's cancellation
        with cancellation_scope(current_cancellation() or Cancellation()) as cancellation:
            out = handler(
                llama=self, messages=messages, functions=functions, function_call=function_call, tools=tools,
                tool_choice=tool_choice, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                typical_p=typical_p, logprobs=logprobs, top_logprobs=top_logprobs, stream=stream, stop=stop,
                seed=seed, response_format=response_format, max_tokens=max_tokens, presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty, tfs_z=tfs_z,
                mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, model=model,
                logits_processor=logits_processor, grammar=grammar, logit_bias=logit_bias,
                **self.chat_template_kwargs)
            return CompletionStream(out, cancellation) if stream else out

    def create_chat_completion_openai_v1(self, *args: Any, **kwargs: Any):
        """create_chat_completion() as the openai package's ChatCompletion (or chunk) objects."""
        try:
            from openai.types.chat import ChatCompletion, ChatCompletionChunk
        except ImportError:
            raise ImportError("create_chat_completion_openai_v1 needs the openai package: pip install openai") from None
        if kwargs.get("stream", False):
            return (ChatCompletionChunk(**chunk) for chunk in self.create_chat_completion(*args, **kwargs))
        return ChatCompletion(**self.create_chat_completion(*args, **kwargs))

    # -- helpers llama-cpp-python exposes -------------------------------------------------------
    @staticmethod
    def logits_to_logprobs(logits: Union[npt.NDArray[np.single], list], axis: int = -1) -> npt.NDArray[np.single]:
        """log_softmax in float32, as llama-cpp-python computes it (pyllama_ssm.output's, for every path)."""
        return log_softmax(np.asarray(logits), axis=axis)

    @staticmethod
    def longest_token_prefix(a: Sequence[int], b: Sequence[int]) -> int:
        return longest_token_prefix(a, b)

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: Optional[str], additional_files: Optional[list] = None,
                        local_dir: Optional[Union[str, os.PathLike]] = None,
                        local_dir_use_symlinks: Union[bool, Literal["auto"]] = "auto",
                        cache_dir: Optional[Union[str, os.PathLike]] = None, **kwargs: Any) -> "Llama":
        """Download a GGUF file (glob `filename`) from the Hugging Face hub, then load it."""
        try:
            from huggingface_hub import HfFileSystem, hf_hub_download
        except ImportError:
            raise ImportError("Llama.from_pretrained needs the huggingface-hub package "
                              "(pip install huggingface-hub); or download the GGUF file and pass its path as "
                              "Llama(model_path=...)") from None
        try:
            files = [str(Path(f["name"] if isinstance(f, dict) else f).relative_to(repo_id))
                     for f in HfFileSystem().ls(repo_id, recursive=True)]
        except Exception as e:  # the hub client raises many kinds of network errors
            raise ConnectionError(f"Llama.from_pretrained({repo_id!r}): the Hugging Face hub is not reachable "
                                  f"({type(e).__name__}: {e}); download the GGUF file yourself and pass its "
                                  f"path as Llama(model_path=...)") from e

        def download(pattern: str) -> str:
            matches = [f for f in files if fnmatch.fnmatch(f, pattern)]
            if len(matches) != 1:
                raise ValueError(f"{repo_id}: {len(matches)} files match {pattern!r} (need exactly one); "
                                 f"files: {json.dumps(files)}")
            path = Path(matches[0])
            return hf_hub_download(repo_id=repo_id, filename=path.name, subfolder=str(path.parent),
                                   local_dir=local_dir, local_dir_use_symlinks=local_dir_use_symlinks,
                                   cache_dir=cache_dir)

        model_path = download(filename)
        for pattern in additional_files or []:  # further shards, next to the first one
            download(pattern)
        return cls(model_path=model_path, **kwargs)


@dataclass
class _Request:
    """One completion's checked arguments."""

    prompt: Union[str, list[int]]
    prompt_tokens: list[int]
    max_tokens: int
    stop: list[str]
    logprobs: Optional[int]
    echo: bool
    echo_text: str   # the prompt's text when echo=True, else ""
    stream: bool
    cancellation: Cancellation
    checkpoints: tuple[int, ...] = ()  # prompt positions worth a prefix-cache entry


def _embeddings(ptr):
    if ptr == ffi.NULL:
        raise RuntimeError("llama.cpp produced no embeddings for this model and pooling type")
    return ptr


def _usage(prompt: int, completion: int, cached: Optional[int] = None) -> dict[str, int]:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached is not None:
        usage["cached_tokens"] = cached
    return usage


def _completion_of(llama: Llama, result) -> list[int]:
    """An Engine result's completion tokens, without the end-of-generation token that ended it."""
    return result.tokens[:-1] if result.tokens and llama._core_model.is_eog(result.tokens[-1]) else result.tokens


def _kv_override_array(overrides: dict[str, Union[bool, int, float, str]]):
    """llama_model_kv_override[] (zero-terminated) for Llama(kv_overrides=...)."""
    arr = ffi.new("struct llama_model_kv_override[]", len(overrides) + 1)
    for item, (key, value) in zip(arr, overrides.items()):
        raw = key.encode("utf-8")
        if not 0 < len(raw) < 128:
            raise ValueError(f"kv_overrides: key {key!r} must be 1..127 bytes")
        item.key = raw
        if isinstance(value, bool):
            item.tag, item.val_bool = lib.LLAMA_KV_OVERRIDE_TYPE_BOOL, value
        elif isinstance(value, int):
            item.tag, item.val_i64 = lib.LLAMA_KV_OVERRIDE_TYPE_INT, value
        elif isinstance(value, float):
            item.tag, item.val_f64 = lib.LLAMA_KV_OVERRIDE_TYPE_FLOAT, value
        elif isinstance(value, str):
            data = value.encode("utf-8")
            if len(data) >= 128:
                raise ValueError(f"kv_overrides: value of {key!r} is {len(data)} bytes, at most 127")
            item.tag, item.val_str = lib.LLAMA_KV_OVERRIDE_TYPE_STR, data
        else:
            raise TypeError(f"kv_overrides: value of {key!r} must be bool, int, float or str, "
                            f"not {type(value).__name__}")
    return arr
