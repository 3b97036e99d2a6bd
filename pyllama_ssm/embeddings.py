"""Llama.embed and create_embedding: inputs batched as sequences of one decode, as llama-cpp-python does.

The context is the Llama's embedding one (Llama(embedding=True)); with n_parallel=1 it is also the
Session's, which is reset after each call (its evaluated tokens are gone).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional, Union

import numpy as np

from .batch import Batch
from .bindings import ffi, lib
from .context import Context


def embed(ctx: Context, batch: Batch, n_batch: int, tokenize: Callable[[bytes], list[int]],
          input: Union[str, list[str]], normalize: bool, truncate: bool):
    """(the embeddings of each input, the tokens they took): a vector per input, or a vector per token when
    the model pools nothing (LLAMA_POOLING_TYPE_NONE).  The context is cleared afterwards."""
    n_embd = ctx.model.n_embd
    inputs = [input] if isinstance(input, str) else input
    if not isinstance(inputs, list) or not all(isinstance(s, str) for s in inputs):
        raise TypeError("embed: input must be a string or a list of strings")
    pooled = lib.llama_pooling_type(ctx.ptr) != lib.LLAMA_POOLING_TYPE_NONE
    data: list = []
    sizes: list[int] = []
    total = 0

    def decode_batch() -> None:
        ctx.clear()
        ctx.decode(batch)
        batch.clear()
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

    batch.clear()
    for text in inputs:
        tokens = tokenize(text.encode("utf-8"))
        if truncate:
            tokens = tokens[:n_batch]
        if not tokens:
            raise ValueError(f"embed: input {text!r} has no tokens")
        if len(tokens) > n_batch:
            raise ValueError(f"embed: input of {len(tokens)} tokens exceeds n_batch={n_batch} "
                             f"(pass truncate=True or raise n_batch)")
        total += len(tokens)
        if sum(sizes) + len(tokens) > n_batch or len(sizes) >= ctx.n_seq_max:
            decode_batch()
        for pos, tok in enumerate(tokens):
            batch.add(tok, pos, len(sizes), logits=True)
        sizes.append(len(tokens))
    decode_batch()
    ctx.clear()
    return data[0] if isinstance(input, str) else data, total


def embedding_response(embeds, total: int, input: Union[str, list[str]], model: Optional[str]):
    embeds = embeds if isinstance(input, list) else [embeds]
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(embeds)],
            "usage": {"prompt_tokens": total, "total_tokens": total}}


def _embeddings(ptr):
    if ptr == ffi.NULL:
        raise RuntimeError("llama.cpp produced no embeddings for this model and pooling type")
    return ptr
