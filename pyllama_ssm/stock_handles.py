"""Llama._model, _ctx and _batch: our Model, Context and Batch as llama-cpp-python's Llama exposes its own.

Code written for stock (its multimodal chat handlers, guidance, outlines) reads ctypes pointers from
them (`_model.model`, `_ctx.ctx`, `_batch.batch`) and calls stock's `_internals` methods on them
(`_ctx.kv_cache_clear()`, `_model.token_get_text(...)`).  The core classes know nothing of stock:
this layer, the drop-in's, adds what stock's code needs around them.
"""

from __future__ import annotations

import ctypes
import sys
from contextlib import ExitStack

from .batch import Batch
from .bindings import ffi
from .context import Context
from .model import Model

MARK = "__pyllama_ssm__"  # set on the llama_cpp package that as_llama_cpp.install() made


def installed() -> bool:
    """Whether `llama_cpp` is stock's package over our library (pyllama_ssm.install_as_llama_cpp())."""
    return getattr(sys.modules.get("llama_cpp"), MARK, False)


def pointer(cdata) -> ctypes.c_void_p:
    """A cffi pointer as the ctypes c_void_p that llama_cpp.llama_cpp's functions take."""
    return ctypes.c_void_p(int(ffi.cast("uintptr_t", cdata)) or None)


def stock_view(obj: Model | Context | Batch):
    """Stock's _internals object (LlamaModel, LlamaContext or LlamaBatch) over the same llama.cpp
    object as our Model, Context or Batch, owning nothing: its methods are stock's, on our pointers.
    None unless installed()."""
    if not installed():
        return None
    internals, low = sys.modules["llama_cpp._internals"], sys.modules["llama_cpp.llama_cpp"]
    if isinstance(obj, Model):
        view = object.__new__(internals.LlamaModel)
        view.path_model, view.params, view.verbose = str(obj.path), low.llama_model_default_params(), False
        view.model = pointer(obj.ptr)
        view.vocab = low.llama_model_get_vocab(view.model)
    elif isinstance(obj, Context):
        view = object.__new__(internals.LlamaContext)
        view.model, view.params, view.verbose = stock_view(obj.model), low.llama_context_default_params(), False
        view.ctx = pointer(obj.ptr)
        view.memory = low.llama_get_memory(view.ctx)
    elif isinstance(obj, Batch):
        view = object.__new__(internals.LlamaBatch)
        view._n_tokens, view.embd, view.n_seq_max, view.verbose = obj.capacity, 0, obj.n_seq_max, False
        view.batch = _ctypes_batch(obj)
    else:
        raise TypeError(f"no stock view of {type(obj).__name__}")
    view._exit_stack, view.sampler, view.custom_samplers = ExitStack(), None, []  # frees nothing: ours owns it
    return view


def _ctypes_batch(batch: Batch):
    return sys.modules["llama_cpp.llama_cpp"].llama_batch.from_address(
        int(ffi.cast("uintptr_t", ffi.addressof(batch.raw))))


class _Handle:
    """One of our objects as Llama exposes it: its own attributes, then (under install_as_llama_cpp())
    what stock's _internals object of the same kind adds, on the same llama.cpp object (stock_view).
    Llama builds one per object and uses the object itself (`core`) in its own code."""

    __slots__ = ("core",)

    def __init__(self, core):
        self.core = core

    def __getattr__(self, name: str):
        if name == "core":  # not set yet (copy, unpickling): no recursion through self.core
            raise AttributeError(name)
        if isinstance(own := getattr(type(self), name, None), property):
            return own.fget(self)  # one of ours that raised AttributeError: its message, not the core's
        try:
            return getattr(self.core, name)
        except AttributeError:
            if name.startswith("_") or (view := stock_view(self.core)) is None:
                raise
        return getattr(view, name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self.core!r}>"


def _ctypes_pointer(kind: str) -> property:
    return property(lambda self: pointer(self.core.ptr),
                    doc=f"The {kind} pointer as ctypes (llama_cpp.llama_cpp's {kind}_p), as stock's _internals has it.")


class ModelHandle(_Handle):
    """Llama._model: our Model, plus stock's _internals.LlamaModel."""

    __slots__ = ()
    core: Model
    model = _ctypes_pointer("llama_model")


class ContextHandle(_Handle):
    """Llama._ctx: our Context, plus stock's _internals.LlamaContext."""

    __slots__ = ()
    core: Context
    ctx = _ctypes_pointer("llama_context")


class BatchHandle(_Handle):
    """Llama._batch: our Batch, plus stock's _internals.LlamaBatch."""

    __slots__ = ()
    core: Batch

    @property
    def batch(self):
        """The same llama_batch as llama_cpp.llama_cpp's ctypes struct (stock's
        _internals.LlamaBatch.batch), aliasing this batch's memory; needs install_as_llama_cpp()."""
        if not installed():
            raise AttributeError("Llama._batch.batch is the ctypes llama_batch of llama_cpp.llama_cpp: "
                                 "call pyllama_ssm.install_as_llama_cpp() first")
        return _ctypes_batch(self.core)
