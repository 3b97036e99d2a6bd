"""The drop-in Llama: llama-cpp-python 0.3.36's high-level API over pyllama-ssm.

Llama(model_path, ...) takes llama_cpp.Llama's parameters (same names, defaults and meaning) plus
n_parallel; an unknown keyword is ignored with a warning, as llama-cpp-python ignores it.  Llama is a
facade: the signature, the lifetime of what it loads, and the dispatch of each call:

- n_parallel=1: a Session (pyllama_ssm.session) drives the one context and its one sequence as
  llama-cpp-python does (eval, sample, generate, n_tokens, input_ids, scores, prefix reuse, save/load_state,
  set_cache): the same calls, the same tokens, one call at a time; completions go to its inline Engine.
- n_parallel>1: completions are requests to an Engine (continuous batching, a shared prefix cache),
  so calls from several threads run at once; the single-sequence methods say they need n_parallel=1.

A completion is checked and shaped by pyllama_ssm.completion on both paths into typed results (results),
made llama-cpp-python's dicts by create_completion and returned as they are by complete() (chats: chat_call);
streamed, a CompletionStream whose cancel() works from any thread.  Embeddings: pyllama_ssm.embeddings; the setup
from llama-cpp-python's arguments: pyllama_ssm.llama_setup.  Not supported, with a clear error: lora_base.
What llama_cpp.llama defines beside the class lives in modules of its own and is re-exported here:
llama_callbacks, llama_tokenizer, llama_cache and cancellation.
"""

from __future__ import annotations

import contextlib
import random
import sys
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt

from . import completion as completion_mod
from . import chat_call, embeddings, fim, llama_chat_format, llama_setup
from .bindings import ffi, has, lib
from .cancellation import Cancellation, CompletionStream
from .context import Context, default_threads
from .engine import Engine
from .llama_cache import BaseLlamaCache, LlamaCache, LlamaDiskCache, LlamaRAMCache, LlamaState, longest_token_prefix
from .llama_callbacks import (LogitsProcessor, LogitsProcessorList, MinTokensLogitsProcessor, StoppingCriteria,
                              StoppingCriteriaList, StopOnTokenIds)
from .llama_grammar import LlamaGrammar
from .llama_tokenizer import LlamaTokenizer
from .llama_types import *  # noqa: F403 - llama_cpp.llama re-exports the types too
from .llama_types import (ChatCompletionFunction, ChatCompletionRequestFunctionCall, ChatCompletionRequestMessage,
                          ChatCompletionRequestResponseFormat, ChatCompletionTool, ChatCompletionToolChoiceOption,
                          CreateChatCompletionResponse, CreateChatCompletionStreamResponse,
                          CreateCompletionResponse, CreateCompletionStreamResponse, CreateEmbeddingResponse)
from .model import Model
from .output import log_softmax
from .results import CompletionEvent
from .sampling import SamplingParams
from .session import Session, state_property as _session_state
from .stock_handles import BatchHandle, ContextHandle, ModelHandle, pointer

__all__ = ["Llama", "LlamaState", "LlamaTokenizer", "LogitsProcessor", "LogitsProcessorList", "StoppingCriteria",
           "StoppingCriteriaList", "MinTokensLogitsProcessor", "StopOnTokenIds", "LlamaGrammar", "BaseLlamaCache",
           "LlamaCache", "LlamaRAMCache", "LlamaDiskCache", "CompletionStream"]


class Llama:
    """A GGUF model with llama-cpp-python's API; n_parallel > 1 serves concurrent calls."""

    def __init__(
        self,
        model_path: str,
        *,
        # model
        n_gpu_layers: int = 0, split_mode: int = lib.LLAMA_SPLIT_MODE_LAYER, main_gpu: int = 0,
        tensor_split: Optional[list[float]] = None, vocab_only: bool = False, use_mmap: bool = True,
        use_mlock: bool = False, kv_overrides: Optional[dict[str, Union[bool, int, float, str]]] = None,
        rpc_servers: Optional[Union[str, list[str]]] = None,
        # context
        seed: int = lib.LLAMA_DEFAULT_SEED, n_ctx: int = 512, n_batch: int = 512, n_ubatch: int = 512,
        n_threads: Optional[int] = None, n_threads_batch: Optional[int] = None,
        rope_scaling_type: Optional[int] = lib.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED,
        pooling_type: int = lib.LLAMA_POOLING_TYPE_UNSPECIFIED,
        attention_type: int = lib.LLAMA_ATTENTION_TYPE_UNSPECIFIED, rope_freq_base: float = 0.0,
        rope_freq_scale: float = 0.0, yarn_ext_factor: float = -1.0, yarn_attn_factor: float = 1.0,
        yarn_beta_fast: float = 32.0, yarn_beta_slow: float = 1.0, yarn_orig_ctx: int = 0,
        logits_all: bool = False, embedding: bool = False, offload_kqv: bool = True, flash_attn: Optional[bool] = None,
        op_offload: Optional[bool] = None, swa_full: Optional[bool] = None,
        # sampling
        no_perf: bool = False, last_n_tokens_size: int = 64,
        # LoRA
        lora_base: Optional[str] = None, lora_scale: float = 1.0, lora_path: Optional[str] = None,
        # backend
        numa: Union[bool, int] = False,
        # chat
        chat_format: Optional[str] = None, chat_handler: Optional[llama_chat_format.LlamaChatCompletionHandler] = None,
        draft_model: Any = None, tokenizer: Any = None,
        # KV cache types (ggml_type)
        type_k: Optional[int] = None, type_v: Optional[int] = None,
        spm_infill: bool = False, verbose: bool = True,
        # pyllama-ssm
        # batch_invariant None: on where the build has it (context.invariant_by_default)
        n_parallel: int = 1, batch_invariant: Optional[bool] = None, prefix_cache: Optional[int] = None,
        prefix_cache_bytes: Optional[int] = 256 << 20, draft_max_seqs: Optional[int] = None,
        **kwargs: Any,  # as llama-cpp-python: unknown keywords (LangChain's n_parts, f16_kv...) are ignored
    ):
        if kwargs:
            warnings.warn(f"Llama: ignoring unknown keyword argument(s) {', '.join(sorted(kwargs))} "
                          f"(as llama-cpp-python does)", stacklevel=2)
        self._init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__", "kwargs")}
        self._core_model = self._core_ctx = self._engine = self._core_batch = self._lora = None  # for close()
        self._session: Optional[Session] = None
        self._model = self._ctx = self._batch = None  # stock's names for them (stock_handles)
        self.verbose = verbose
        llama_setup.check_arguments(n_parallel, n_ctx, n_batch, n_ubatch, draft_model, lora_base, tensor_split,
                                    last_n_tokens_size)
        context_params = llama_setup.context_params(self._init_kwargs)  # checked before anything loads
        self.model_path, self.n_parallel = model_path, n_parallel
        self.numa = llama_setup.init_numa(numa)
        self.tensor_split, self.kv_overrides = tensor_split, kv_overrides
        self.lora_base, self.lora_scale, self.lora_path = lora_base, lora_scale, lora_path
        self.last_n_tokens_size, self.spm_infill, self.draft_model = last_n_tokens_size, spm_infill, draft_model
        self.chat_template_kwargs: dict[str, Any] = {}  # extra template variables (llama.cpp server's name)
        self._logits_all = logits_all if draft_model is None else True  # as stock: drafts are verified by row
        self._seed = seed or lib.LLAMA_DEFAULT_SEED
        # a call's seed is drawn from the last one; embeddings decode on one context, one call at a time
        self._seed_lock, self._embed_lock = threading.Lock(), threading.Lock()

        # as llama-cpp-python: no mmap with a LoRA; the arrays live as long as model_params refers to them
        self._model_overrides = llama_setup.model_params(split_mode, main_gpu, tensor_split, use_mmap and lora_path
                                                         is None, use_mlock, kv_overrides)
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
            # one flash attention default for every n_parallel, llama-server's (stock's is off): raising
            # n_parallel must not change a lone request's kernels, so its answer (issue #26)
            flash_attn_mode = "auto" if flash_attn is None else bool(flash_attn)
            # a rejected draft token is undone on recurrent memory from a snapshot of the pool (patched build)
            draft_snapshots = draft_model is not None and has("llama_memory_rs_snapshot") and \
                (self._core_model.is_recurrent or self._core_model.is_hybrid)
            self._core_ctx, self._core_batch, single, self._engine = llama_setup.open_runtime(
                stack, self._core_model, n_parallel=n_parallel, n_ctx=n_ctx, n_batch=self.n_batch, n_ubatch=n_ubatch,
                n_threads=self.n_threads, n_threads_batch=self.n_threads_batch, embedding=embedding,
                vocab_only=vocab_only, flash_attn=flash_attn_mode, batch_invariant=batch_invariant,
                overrides=context_params, draft_snapshots=draft_snapshots,
                engine=dict(prefix_cache=prefix_cache, prefix_cache_bytes=prefix_cache_bytes,
                            draft_model=draft_model, draft_max_seqs=draft_max_seqs))
            if lora_path:
                self._lora = llama_setup.load_lora(self._core_model, lora_path, lora_scale, self._core_ctx, self._engine)
            stack.pop_all()
        # what code written for stock (its multimodal chat handlers, guidance) reads from Llama._model,
        # _ctx and _batch: ours, plus stock's _internals methods under install_as_llama_cpp()
        self._model = ModelHandle(self._core_model)
        self._ctx = ContextHandle(self._core_ctx) if self._core_ctx is not None else None
        self._batch = BatchHandle(self._core_batch) if self._core_batch is not None else None
        self.context_params = self._context.params if self._context is not None else None
        self.model_params = self._core_model.params
        self.tokenizer_ = tokenizer or LlamaTokenizer(self)
        self._n_vocab, self._n_ctx = self._core_model.n_vocab, self.n_ctx()
        self._is_recurrent, self._is_hybrid = self._core_model.is_recurrent, self._core_model.is_hybrid  # stock's
        if self._core_ctx is not None and n_parallel == 1:
            ref = weakref.ref(self)  # the Session must not keep its Llama alive (close() on __del__)
            self._session = Session(
                self._core_model, self._core_ctx, self._core_batch, n_batch=self.n_batch,
                logits_all=self._logits_all, score_rows=self._n_ctx if logits_all else self.n_batch,
                draft_model=draft_model, draft_snapshots=draft_snapshots, engine=single,
                say=lambda message: (llama := ref()) is not None and llama._say(message))
        self.metadata = self._core_model.metadata()
        self._chat_handlers = llama_setup.chat_handlers(self._core_model, self.metadata)
        self.chat_handler, self.chat_format = chat_handler, chat_format
        if chat_format is None and chat_handler is None:
            self.chat_format = llama_setup.default_chat_format(self.metadata, self._chat_handlers)
            self._say(f"Chat format: {self.chat_format}")
        if verbose:
            print(ffi.string(lib.llama_print_system_info()).decode(), file=sys.stderr)

    def _say(self, message: str) -> None:
        if self.verbose:
            print(f"Llama: {message}", file=sys.stderr)

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Free the context(s) and the model; the object is unusable afterwards."""
        if getattr(self, "_core_model", None) is None:
            return
        for runtime in (self._engine, self._session):  # before the context they run on
            if runtime is not None:
                runtime.close()
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
        return pointer(self._single("ctx").ctx.ptr)

    @property
    def model(self):
        """The llama_model pointer, as ctypes (stock's Llama.model; the cffi one: self._core_model.ptr)."""
        return pointer(self._core_model.ptr)

    @property
    def engine(self) -> Optional[Engine]:
        """The Engine serving completions when n_parallel > 1 (its stats(), memory()); None otherwise."""
        return self._engine

    @property
    def session(self) -> Optional[Session]:
        """The single sequence when n_parallel = 1 (what eval, sample, generate... run on); None otherwise."""
        return self._session

    @property
    def fim_tokens(self) -> fim.FimTokens:
        """The vocabulary's fill-in-the-middle tokens (-1 for each it lacks)."""
        return fim.FimTokens.of(self._core_model.vocab)

    def infill_tokens(self, prefix: Union[str, list[int]], suffix: str, spm: Optional[bool] = None,
                      **kw: Any) -> list[int]:
        """The fill-in-the-middle prompt as token ids: fim.infill_tokens's (spm None: spm_infill)."""
        return fim.infill_tokens(self._core_model, prefix, suffix, spm=self.spm_infill if spm is None else spm, **kw)

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

    # -- the single sequence (n_parallel=1): the Session's ---------------------------------------
    def _single(self, what: str) -> Session:
        self._require_context(what)
        if self._session is None:
            raise ValueError(f"{what}: the single-sequence API needs n_parallel=1 (this Llama serves "
                             f"{self.n_parallel} sequences through its Engine; use create_completion)")
        return self._session

    n_tokens = _session_state("n_tokens", "How many tokens of input_ids are evaluated.")
    input_ids = _session_state("input_ids", "The evaluated tokens (the first n_tokens of n_ctx).")
    scores = _session_state("scores", "The logits of each evaluated position (logits_all), or of the last batch.")

    _input_ids = _session_state("evaluated", "input_ids[:n_tokens]", settable=False)
    _scores = _session_state("evaluated_scores", "scores[:n_tokens]", settable=False)
    eval_tokens = _session_state("eval_tokens", "The evaluated tokens as a deque (stock's).", settable=False)
    eval_logits = _session_state("eval_logits", "Their logits as a deque (stock's).", settable=False)

    def set_cache(self, cache: Optional[BaseLlamaCache]) -> None:
        """Save states after completions and resume from the longest cached prefix (n_parallel=1)."""
        if cache is not None:
            self._single("set_cache").set_cache(cache)
        elif self._session is not None:
            self._session.cache = None

    cache = property(lambda self: self._session.cache if self._session is not None else None, set_cache,
                     doc="The cache of states set_cache() set (stock's attribute; assigning it sets it too).")

    def reset(self) -> None:
        """Forget the evaluated tokens (recurrent memory cannot be truncated, so it is cleared)."""
        if self._session is not None:  # the Engine keeps no per-object sequence
            self._session.reset()

    def eval(self, tokens: Sequence[int]) -> None:
        """Decode tokens after the n_tokens already evaluated."""
        self._single("eval").eval(tokens)

    def _sampling_params(self, *, seed: Optional[int] = None, prompt_tokens: Optional[Sequence[int]] = None,
                         **arguments: Any) -> SamplingParams:
        """The sampler chain llama-cpp-python builds for these arguments, seeded with the current seed.  A logits
        processor sees the evaluated tokens (sample, generate) or a completion's prompt and tokens generated."""
        if prompt_tokens is None:
            seen = lambda generated: self._input_ids  # noqa: E731
        else:
            prompt = np.asarray(prompt_tokens, dtype=np.intc)
            seen = lambda generated: np.concatenate([prompt, np.asarray(generated, dtype=np.intc)])  # noqa: E731
        return completion_mod.sampling_params(self._core_model, penalty_last_n=self.last_n_tokens_size,
                                              seed=self._seed if seed is None else seed, seen=seen, **arguments)

    def sample(self, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
               temp: float = 0.80, repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
               presence_penalty: float = 0.0, tfs_z: float = 1.0, mirostat_mode: int = 0, mirostat_eta: float = 0.1,
               mirostat_tau: float = 5.0, penalize_nl: bool = True,
               logits_processor: Optional[LogitsProcessorList] = None, grammar: Optional[LlamaGrammar] = None,
               idx: Optional[int] = None) -> int:
        """A token from the logits of evaluated position idx (default: the last one): by generate()'s sampler
        inside it, else by these arguments (tfs_z, penalize_nl: accepted and unused, as in llama-cpp-python)."""
        return self._single("sample").sample(idx, lambda: self._sampling_params(
            temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p, repeat_penalty=repeat_penalty,
            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, mirostat_mode=mirostat_mode,
            mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, grammar=grammar,
            logits_processor=logits_processor))

    def generate(self, tokens: Sequence[int], top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 typical_p: float = 1.0, temp: float = 0.80, repeat_penalty: float = 1.0, reset: bool = True,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0, tfs_z: float = 1.0,
                 mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                 penalize_nl: bool = True, logits_processor: Optional[LogitsProcessorList] = None,
                 stopping_criteria: Optional[StoppingCriteriaList] = None,
                 grammar: Optional[LlamaGrammar] = None) -> Iterator[int]:
        """Tokens generated after `tokens`; send() a list of tokens to append them to the sequence.  reset=True
        keeps the longest prefix shared with the evaluated tokens where the memory can be cut there."""
        session = self._single("generate")
        params = self._sampling_params(
            temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p, repeat_penalty=repeat_penalty,
            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, mirostat_mode=mirostat_mode,
            mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, grammar=grammar, logits_processor=logits_processor)
        return session.generate(tokens, params, reset, stopping_criteria)

    def save_state(self) -> LlamaState:
        return self._single("save_state").save_state(self._seed)

    def load_state(self, state: LlamaState) -> None:
        self._seed = self._single("load_state").load_state(state)

    # -- embeddings ---------------------------------------------------------------------------
    def create_embedding(self, input: Union[str, list[str]], model: Optional[str] = None) -> CreateEmbeddingResponse:
        embeds, total = self.embed(input, return_count=True)
        return embeddings.embedding_response(embeds, total, input, model if model is not None else self.model_path)

    def embed(self, input: Union[str, list[str]], normalize: bool = False, truncate: bool = True,
              return_count: bool = False):
        """Embeddings of each input: a vector per input, or a vector per token when the model
        pools nothing (LLAMA_POOLING_TYPE_NONE).  Inputs are batched as sequences of one decode;
        concurrent calls take turns."""
        with self._embed_lock:
            self._require_context("embed")
            if self._core_ctx is None or not self._core_ctx.params.embeddings:
                raise RuntimeError("Llama model must be created with embedding=True to compute embeddings")
            output, total = embeddings.embed(self._core_ctx, self._core_batch, self.n_batch, self.tokenize,
                                             input, normalize, truncate)
            self.reset()  # the Session's tokens are gone from the context
        return (output, total) if return_count else output

    # -- completions --------------------------------------------------------------------------
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
        arguments = {k: v for k, v in locals().items() if k != "self"}
        return self._run(arguments, Cancellation(), typed=False)

    def complete(self, *args: Any, cancellation: Optional[Cancellation] = None, **kwargs: Any) -> Any:
        """create_completion's call answered with typed results: a CompletionResult, or with stream=True a
        CompletionStream of CompletionEvents (the last carries it).  cancellation: stops it, set from any thread."""
        arguments = chat_call.arguments(Llama.create_completion, self, args, kwargs)
        return self._run(arguments, cancellation or Cancellation(), typed=True)

    def _run(self, a: dict[str, Any], cancellation: Cancellation, typed: bool) -> Any:
        self._require_context("create_completion")
        request = completion_mod.request(
            self._core_model, self.tokenize, self.detokenize, self._n_ctx, spm_infill=self.spm_infill,
            logits_all=self._engine is not None or self._logits_all, cancellation=cancellation,
            name=a["model"] if a["model"] is not None else self.model_path,
            **{k: a[k] for k in completion_mod.REQUEST_ARGUMENTS})
        with self._seed_lock:  # llama-cpp-python draws each call's seed from the previous one
            call_seed = a["seed"] if a["seed"] is not None else random.Random(self._seed).randint(0, 2**32)
            params = self._sampling_params(temp=a["temperature"], prompt_tokens=request.prompt_tokens, seed=call_seed,
                                           **{k: a[k] for k in completion_mod.SAMPLING_ARGUMENTS})
            self._seed = call_seed
        if self._engine is not None:
            events = completion_mod.engine_completion(self._engine, self._core_model, request, params,
                                                      a["stopping_criteria"])
        else:
            events = self._single("create_completion").complete(self, request, params, a["stopping_criteria"])
        if a["stream"]:
            return CompletionStream(events, cancellation, shape=None if typed else CompletionEvent.as_chunk)
        result = next(events)
        return result if typed else result.as_response()

    __call__ = create_completion

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
        arguments = {k: v for k, v in locals().items() if k != "self"}
        return self._chat(arguments, Cancellation(), typed=False)

    def chat_complete(self, *args: Any, cancellation: Optional[Cancellation] = None, **kwargs: Any) -> Any:
        """create_chat_completion's call with the completion behind the answer (the handler's last): a ChatResult,
        or with stream=True a CompletionStream of chat chunks whose `result` it is once ended (cancellation: ditto)."""
        arguments = chat_call.arguments(Llama.create_chat_completion, self, args, kwargs)
        return self._chat(arguments, cancellation or Cancellation(), typed=True)

    def _chat(self, a: dict[str, Any], cancellation: Cancellation, typed: bool) -> Any:
        handler = (self.chat_handler or self._chat_handlers.get(self.chat_format)
                   or llama_chat_format.get_chat_completion_handler(self.chat_format))
        return chat_call.run(self, handler, a, self.chat_template_kwargs, cancellation, typed)

    def create_chat_completion_openai_v1(self, *args: Any, **kwargs: Any):
        """create_chat_completion() as the openai package's ChatCompletion (or chunk) objects."""
        return chat_call.openai_v1(self.create_chat_completion, args, kwargs)

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
                        local_dir=None, local_dir_use_symlinks="auto", cache_dir=None, **kwargs: Any) -> "Llama":
        """Download a GGUF file (glob `filename`) from the Hugging Face hub, then load it."""
        return cls(model_path=llama_setup.download(repo_id, filename, additional_files, local_dir,
                                                   local_dir_use_symlinks, cache_dir), **kwargs)

