"""The served models: one Llama(n_parallel=P) per configured alias, and admission to it.

Each model admits n_parallel running requests plus max_queued_requests waiting
ones; a request beyond that is refused at once (429 with Retry-After) instead
of queueing without bound.  Models are chosen by alias only (a single model
by any name): nothing a client sends is ever opened as a path.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import anyio

from ..engine import Engine
from ..llama import Llama, LlamaDiskCache, LlamaRAMCache
from .chat import ChatTemplate
from .errors import ApiError, unavailable
from .settings import ModelSettings

logger = logging.getLogger("pyllama_ssm.server")

# chat formats that need a CLIP model or a HuggingFace download: not served here
_UNSUPPORTED_CHAT_FORMATS = {"llava-1-5", "llava-1-6", "obsidian", "mtmd", "gemma4", "moondream", "nanollava",
                             "llama-3-vision-alpha", "minicpm-v-2.6", "qwen2.5-vl", "hf-autotokenizer"}


def parse_kv_overrides(items: list[str]) -> dict[str, bool | int | float | str]:
    """'key=type:value' strings (type bool, int, float or str) as Llama's kv_overrides."""
    out: dict[str, bool | int | float | str] = {}
    for item in items:
        key, sep, typed = item.partition("=")
        kind, sep2, value = typed.partition(":")
        if not (key and sep and sep2):
            raise ValueError(f"kv_overrides: {item!r} is not key=type:value")
        if kind == "bool":
            out[key] = value.lower() in ("true", "1")
        elif kind in ("int", "float"):
            try:
                out[key] = int(value) if kind == "int" else float(value)
            except ValueError:
                raise ValueError(f"kv_overrides: {item!r}: {value!r} is not an {kind}") from None
        elif kind == "str":
            out[key] = value
        else:
            raise ValueError(f"kv_overrides: {item!r}: type must be bool, int, float or str, not {kind!r}")
    return out


def llama_kwargs(s: ModelSettings) -> dict[str, Any]:
    """Llama's keyword arguments for one model's settings (what llama_cpp.server passes, plus n_parallel)."""
    for name in ("clip_model_path", "hf_pretrained_model_name_or_path", "hf_tokenizer_config_path"):
        if getattr(s, name) is not None:
            raise ValueError(f"{name}: not supported by pyllama_ssm.server (model {s.alias!r})")
    if s.chat_format in _UNSUPPORTED_CHAT_FORMATS:
        raise ValueError(f"chat_format={s.chat_format!r}: multimodal and HuggingFace chat formats "
                         f"are not supported by pyllama_ssm.server (model {s.alias!r})")
    kwargs = s.model_dump(exclude={
        "model", "model_alias", "hf_model_repo_id", "kv_overrides", "chat_template_kwargs", "cache", "cache_type",
        "cache_size", "clip_model_path", "hf_pretrained_model_name_or_path", "hf_tokenizer_config_path",
        "draft_model", "draft_model_num_pred_tokens", "mul_mat_q", "reasoning_format", "parse_tool_calls"})  # mul_mat_q: accepted, ignored as stock does
    kwargs["kv_overrides"] = parse_kv_overrides(s.kv_overrides) if s.kv_overrides else None
    if s.draft_model is not None:  # llama_cpp.server's one method
        if s.draft_model != "prompt-lookup-decoding":
            raise ValueError(f"draft_model={s.draft_model!r}: the speculative decoding method must be "
                             f"'prompt-lookup-decoding' (model {s.alias!r})")
        from ..llama_speculative import LlamaPromptLookupDecoding
        kwargs["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=s.draft_model_num_pred_tokens)
    return kwargs


def load_llama(s: ModelSettings) -> Llama:
    """A Llama for these settings, with its cache and chat template arguments."""
    kwargs = llama_kwargs(s)
    if s.hf_model_repo_id is not None:
        model = Llama.from_pretrained(repo_id=s.hf_model_repo_id, filename=s.model, **kwargs)
    else:
        model = Llama(model_path=s.model, **kwargs)
    if s.chat_template_kwargs:
        model.chat_template_kwargs = dict(s.chat_template_kwargs)
    if s.cache and s.n_parallel > 1:
        logger.warning("model %r: --cache applies to n_parallel=1; with n_parallel=%d the Engine's shared prefix "
                       "cache serves repeated prefixes", s.alias, s.n_parallel)
    elif s.cache:
        cache_cls = LlamaDiskCache if s.cache_type == "disk" else LlamaRAMCache
        model.set_cache(cache_cls(capacity_bytes=s.cache_size))
    return model


@dataclass
class ServedModel:
    """One alias: its Llama and the requests admitted to it."""

    alias: str
    settings: ModelSettings
    llama: Llama
    capacity: int                     # n_parallel + max_queued_requests
    in_flight: int = 0
    served: int = 0
    refused: int = 0
    limiter: anyio.CapacityLimiter = field(init=False)  # a worker thread for every admitted request
    generation_lock: Optional[anyio.Semaphore] = field(init=False)  # n_parallel=1: one completion at a time
    embedding_lock: anyio.Semaphore = field(init=False)  # embeddings share one context and batch
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    chat: Optional[ChatTemplate] = field(init=False)  # its Jinja chat template (None: a named chat format)

    def __post_init__(self) -> None:
        self.chat = ChatTemplate.of(self.llama)
        self.limiter = anyio.CapacityLimiter(self.capacity)
        # a semaphore, not a lock: a stream releases it from another task than the one that took it
        self.embedding_lock = anyio.Semaphore(1)
        self.generation_lock = self.embedding_lock if self.settings.n_parallel == 1 else None

    @property
    def engine(self) -> Optional[Engine]:
        """The Engine of an n_parallel > 1 model (None for n_parallel=1, which drives one sequence itself)."""
        return self.llama.engine

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        with self._lock:
            if self.in_flight >= self.capacity:
                self.refused += 1
                raise unavailable(f"model {self.alias!r}: {self.in_flight} requests in flight, the queue is full "
                                  f"(n_parallel={self.settings.n_parallel} + max_queued_requests); retry later", 429)
            self.in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1
                self.served += 1


class ModelRegistry:
    """The configured models by alias; the first is the default."""

    def __init__(self, settings: list[ModelSettings], max_queued_requests: int):
        if not settings:
            raise ValueError("models: none configured")
        aliases = [s.alias for s in settings]
        if len(set(aliases)) != len(aliases):
            raise ValueError(f"model_alias: aliases must be unique, got {aliases}")
        self._settings = settings
        self._max_queued = max_queued_requests
        self.models: dict[str, ServedModel] = {}
        self.closing = False
        self._close_lock = threading.Lock()

    @property
    def aliases(self) -> list[str]:
        return [s.alias for s in self._settings]

    def load(self) -> None:
        """Load every model not loaded yet (before serving); a failure closes what was loaded."""
        try:
            for s in self._settings:
                if s.alias in self.models:
                    continue
                logger.info("loading model %r from %s (n_parallel=%d, n_ctx=%d)", s.alias, s.model, s.n_parallel,
                            s.n_ctx)
                self.models[s.alias] = ServedModel(s.alias, s, load_llama(s), s.n_parallel + self._max_queued)
        except BaseException:
            self.close()
            raise

    def get(self, alias: Optional[str]) -> ServedModel:
        """The model named alias; a server of one model answers under any name, as llama_cpp.server does
        (clients send their own default, "gpt-3.5-turbo"...)."""
        if self.closing:
            raise unavailable("the server is shutting down")
        if alias is None or len(self._settings) == 1:
            alias = self._settings[0].alias
        served = self.models.get(alias)
        if served is None:
            if alias in self.aliases:
                raise unavailable(f"model {alias!r} is not loaded")
            raise ApiError(404, f"model: {alias!r} is not served here (models: {', '.join(self.aliases)})",
                           param="model", code="model_not_found")
        return served

    def begin_shutdown(self, grace_s: float) -> None:
        """Refuse new requests now; after grace_s, close the models, which cancels what still runs."""
        if self.closing:
            return
        self.closing = True
        timer = threading.Timer(grace_s, self.close)
        timer.daemon = True
        timer.start()

    def close(self) -> None:
        with self._close_lock:
            self.closing = True
            for served in self.models.values():
                served.llama.close()
            self.models.clear()
