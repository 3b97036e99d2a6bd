"""The routes beside the APIs: tokenize, detokenize (llama_cpp.server's /extras), health, statistics,
Prometheus metrics."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from . import errors, stats
from .errors import ERROR_RESPONSES
from .generation import check_tokens, registry_of
from .schemas import DetokenizeInputRequest, TokenizeInputRequest

router = APIRouter(responses=ERROR_RESPONSES)


@router.post("/extras/tokenize", summary="Tokenize", tags=["Extras"])
async def tokenize(request: Request, body: TokenizeInputRequest) -> dict[str, list[int]]:
    llama = registry_of(request).get(body.model).llama
    return {"tokens": await anyio.to_thread.run_sync(lambda: llama.tokenize(body.input.encode("utf-8"),
                                                                             special=True))}


@router.post("/extras/tokenize/count", summary="Tokenize Count", tags=["Extras"])
async def count_query_tokens(request: Request, body: TokenizeInputRequest) -> dict[str, int]:
    llama = registry_of(request).get(body.model).llama
    tokens = await anyio.to_thread.run_sync(lambda: llama.tokenize(body.input.encode("utf-8"), special=True))
    return {"count": len(tokens)}


@router.post("/extras/detokenize", summary="Detokenize", tags=["Extras"])
async def detokenize(request: Request, body: DetokenizeInputRequest) -> dict[str, str]:
    llama = registry_of(request).get(body.model).llama
    check_tokens("tokens", body.tokens, llama.n_vocab())
    text = await anyio.to_thread.run_sync(lambda: llama.detokenize(body.tokens))
    return {"text": text.decode("utf-8", errors="replace")}


@router.get("/health", summary="Health", tags=["Extras"])
async def health(request: Request) -> JSONResponse:
    registry = registry_of(request)
    if registry.closing:
        return errors.unavailable("the server is shutting down").response()
    for served in registry.models.values():
        if served.engine is not None and served.engine.failure is not None:
            return errors.unavailable(f"model {served.alias!r}: the engine stopped "
                                      f"({type(served.engine.failure).__name__}: {served.engine.failure})").response()
    return JSONResponse({"status": "ok"})


@router.get("/extras/stats", summary="Engine statistics and memory", tags=["Extras"])
async def get_stats(request: Request) -> dict[str, Any]:
    return await anyio.to_thread.run_sync(stats.collect, registry_of(request))


@router.get("/metrics", summary="Prometheus metrics", tags=["Extras"], responses={
    200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def get_metrics(request: Request) -> PlainTextResponse:
    snapshot = await anyio.to_thread.run_sync(stats.collect, registry_of(request))
    return PlainTextResponse(stats.prometheus(snapshot), media_type="text/plain; version=0.0.4")
