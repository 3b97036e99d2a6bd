"""The OpenAI-compatible app: its construction, its lifespan and its OpenAPI schema.

Each request is admitted to its model (or refused with 429), then runs on a
worker thread inside that model's Llama(n_parallel=P): P requests decode
together in one batch, the rest wait in the Engine's queue.  Streams are
server-sent events ending with `data: [DONE]`; a client that goes away
cancels its request, streaming or not, which frees the sequence at the
Engine's next step (queued, in its prefill or generating).  The OpenAPI
schema states every bound the server enforces, the model-dependent ones
included, and the error answers each route may give.

The routes live by API (openai.py: llama_cpp.server's OpenAI routes; anthropic.py,
infill.py, props.py, ui.py; extras.py: tokenize, health, stats, metrics), and
generation.py runs a model call for all of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .. import __version__
from ..bindings import lib
from . import anthropic, errors, extras, infill, native, openai, props, responses, ui
from .registry import ModelRegistry, ServedModel
from .security import ApiKeyMiddleware, BodyLimitMiddleware
from .settings import ModelSettings, ServerSettings


def create_app(server_settings: ServerSettings, model_settings: list[ModelSettings]) -> FastAPI:
    """The app; its lifespan loads every model before serving and closes them on shutdown."""
    registry = ModelRegistry(model_settings, server_settings.max_queued_requests)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(registry.load)
        try:
            yield
        finally:
            # in-flight requests had shutdown_timeout to finish; closing cancels what is left
            await anyio.to_thread.run_sync(registry.close)

    app = FastAPI(title="pyllama-ssm: OpenAI-compatible API", version=__version__,
                  root_path=server_settings.root_path, lifespan=lifespan)
    app.state.registry = registry
    app.state.settings = server_settings
    app.state.noted = set()  # ignored request fields already noted in the log
    app.state.responses = responses.ResponseStore()  # stored responses, for previous_response_id
    errors.install(app)
    for routes in (openai.router, extras.router, anthropic.router, infill.router, native.router, props.router,
                   ui.router):
        app.include_router(routes)
    app.openapi = lambda: _openapi(app)
    # the last added runs first: CORS (answers preflights), then the key, then the size limit
    app.add_middleware(BodyLimitMiddleware, limit=server_settings.max_request_bytes)
    if server_settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=server_settings.api_key)
    if server_settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=server_settings.cors_origins,
                           allow_credentials="*" not in server_settings.cors_origins,
                           allow_methods=["*"], allow_headers=["*"])
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with what depends on the loaded models and the settings: the bounds marked
    x-limit (token ids below the smallest vocabulary, max_tokens_limit) and the rules below."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    registry: ModelRegistry = app.state.registry
    schema = FastAPI.openapi(app)
    if not registry.models:  # not loaded yet: do not keep a schema without the model bounds
        app.openapi_schema = None
        return schema
    models = list(registry.models.values())
    n_vocab = min(served.llama.n_vocab() for served in models)
    _fill_bounds(schema, {"token": n_vocab - 1, "logprobs": n_vocab,
                          "max_tokens": app.state.settings.max_tokens_limit})
    _add_model_rules(schema, models, n_vocab)
    return schema


def _fill_bounds(node: Any, bounds: dict[str, int | None], limit: str | None = None) -> None:
    if isinstance(node, dict):
        limit = node.get("x-limit", limit)
        if limit is not None and bounds.get(limit) is not None and node.get("type") == "integer":
            node["maximum"] = min(node.get("maximum", bounds[limit]), bounds[limit])
        for value in node.values():
            _fill_bounds(value, bounds, limit)
    elif isinstance(node, list):
        for value in node:
            _fill_bounds(value, bounds, limit)


def _add_model_rules(schema: dict[str, Any], models: list[ServedModel], n_vocab: int) -> None:
    """The refusals that depend on the served models, as schema rules."""
    bodies = schema["components"]["schemas"]
    completion, chat = bodies["CreateCompletionRequest"], bodies["CreateChatCompletionRequest"]
    native = bodies["CompletionRequest"]["properties"]["logit_bias"]  # llama-server's: {"token id": bias}
    next(form for form in native["anyOf"] if form.get("type") == "object")["propertyNames"] = {
        "pattern": _numbers_below(n_vocab)}
    for body in (completion, chat):  # logit_bias keys: token ids, or any text with logit_bias_type=tokens
        body.setdefault("allOf", []).append({
            "if": {"required": ["logit_bias_type"], "properties": {"logit_bias_type": {"const": "tokens"}}},
            "else": {"properties": {"logit_bias": {"propertyNames": {"pattern": _numbers_below(n_vocab)}}}}})
    if any(served.engine is None and not served.settings.logits_all for served in models):
        # n_parallel=1 without logits_all keeps no logits to report
        completion["properties"]["logprobs"] = {"type": "null", "description": "Not with logits_all=false."}
        chat["properties"]["logprobs"] = {"enum": [False, None], "description": "Not with logits_all=false."}
    if not all(served_fim(served) for served in models):  # a vocabulary without FIM tokens: no fill-in-the-middle
        completion["properties"]["suffix"] = {"type": "null", "description": "The model has no FIM tokens."}
        schema["paths"].pop("/infill", None)
    embedders = [served for served in models if served.settings.embedding]
    if not embedders:  # every embedding request would be refused: the route is not offered
        schema["paths"].pop("/v1/embeddings", None)
    elif any(served.llama.pooling_type() == lib.LLAMA_POOLING_TYPE_NONE for served in embedders):
        # a vector per token has no single base64 encoding
        bodies["CreateEmbeddingRequest"]["properties"]["encoding_format"]["anyOf"][0]["enum"] = ["float"]


def served_fim(served: ServedModel) -> bool:
    """Whether the model's vocabulary has the tokens fill-in-the-middle needs."""
    return not served.llama.fim_tokens.missing


def _numbers_below(n: int) -> str:
    """A regular expression for the decimal numbers 0..n-1 (no leading zeros, no sign)."""
    top = str(n - 1)
    parts = ["0"] + ([f"[1-9][0-9]{{0,{len(top) - 2}}}"] if len(top) > 1 else [])  # fewer digits than top
    for i, digit in enumerate(top):  # as many digits: top's first i, a smaller one, then any
        low = 1 if i == 0 else 0
        if int(digit) - 1 >= low:
            parts.append(f"{top[:i]}[{low}-{int(digit) - 1}][0-9]{{{len(top) - i - 1}}}")
    return f"^({'|'.join([*parts, top])})$"
