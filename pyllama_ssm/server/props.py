"""llama-server's introspection routes: `GET /props` (how a model is served) and `GET /slots` (what each of
its sequences is doing), shaped as llama-server's where the fields mean the same, with ours beside them.

Clients and dashboards read these: the context size and the number of slots to size their requests,
the chat template, whether a slot is free.  A slot here is one of the Engine's sequences: idle, or
running a request in its prefill or its decode, with the prompt's length, the tokens generated and
the prompt prefix it took from the prefix cache; `GET /slots/prefix_cache` lists what that cache
holds (each entry's tokens, the bytes it adds, its hits).  `?model=ALIAS` picks the model on a server
of several (llama-server's router takes the same parameter); the default is the first.
"""

from __future__ import annotations

from typing import Any, Optional

import anyio
from fastapi import APIRouter, Request

from .. import __version__
from ..bindings import BUILD, ffi, lib
from ..context import invariant_by_default
from ..engine import SlotView
from .errors import ERROR_RESPONSES, unavailable
from .generation import registry_of, settings_of
from .registry import ServedModel
from .schemas import CreateCompletionRequest

router = APIRouter(responses=ERROR_RESPONSES)


def _token_text(served: ServedModel, token: int) -> str:
    if token == -1:
        return ""
    return served.llama.detokenize([token], special=True).decode("utf-8", errors="replace")


def _flash_attn(served: ServedModel) -> str:
    """What the context was created with: "auto" (llama.cpp enables it where the backend can), "enabled" or
    "disabled"."""
    params = served.llama.context_params  # of the context completions run on (the Engine's with n_parallel > 1)
    return ffi.string(lib.llama_flash_attn_type_name(params.flash_attn_type)).decode()


def props(request: Request, served: ServedModel) -> dict[str, Any]:
    """llama-server's /props for one model, and ours: n_parallel, batch invariance, flash attention, the
    prefix cache's bounds, the FIM tokens."""
    llama, settings = served.llama, served.settings
    defaults = CreateCompletionRequest.model_fields
    limit = settings_of(request).max_tokens_limit
    params = {name: defaults[name].default for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                                                         "presence_penalty", "frequency_penalty", "mirostat_tau",
                                                         "mirostat_eta")}
    params.update(n_predict=limit if limit is not None else -1, seed=settings.seed, mirostat=0,
                  stream=False, spm_infill=settings.spm_infill)
    engine = served.engine
    fim = llama.fim_tokens
    return {
        "default_generation_settings": {"params": params, "n_ctx": llama.n_ctx()},
        "total_slots": settings.n_parallel,
        "model_alias": served.alias,
        "model_path": settings.model,
        "modalities": {"vision": False, "audio": False, "video": False},
        "chat_template": llama.metadata.get("tokenizer.chat_template", ""),
        "bos_token": _token_text(served, llama.token_bos()),
        "eos_token": _token_text(served, llama.token_eos()),
        "build_info": f"pyllama-ssm {__version__} ({BUILD} llama.cpp)",
        "endpoint_slots": True, "endpoint_props": False, "endpoint_metrics": True, "is_sleeping": False,
        # ours
        "n_ctx": llama.n_ctx(), "n_parallel": settings.n_parallel, "n_batch": settings.n_batch,
        "batch_invariant": invariant_by_default(settings.batch_invariant), "flash_attn": _flash_attn(served),
        "prefix_cache": None if engine is None else {"entries_max": engine.n_cache,
                                                     "bytes_max": engine.cache.max_bytes if engine.n_cache else 0},
        "fim_tokens": {name: getattr(fim, name) for name in ("pre", "suf", "mid", "pad", "rep", "sep")},
        "system_info": ffi.string(lib.llama_print_system_info()).decode("utf-8", errors="replace"),
    }


# -- the Engine's sequences ---------------------------------------------------------------------------
def _slot_dict(seq: int, view: SlotView | None) -> dict[str, Any]:
    """One sequence of Engine.slots() in llama-server's /slots field names."""
    if view is None:
        return {"id": seq, "state": "idle"}
    return {"id": seq, "state": view.state, "id_task": view.request_id, "n_prompt_tokens": view.prompt_tokens,
            "n_prompt_tokens_processed": max(0, view.computed - view.cached_tokens),
            "n_prompt_tokens_cache": view.cached_tokens, "n_decoded": view.generated,
            "n_remain": max(0, view.max_tokens - view.generated)}


def slots(served: ServedModel) -> list[dict[str, Any]]:
    """llama-server's /slots entries for one model's sequences."""
    n_ctx = served.llama.n_ctx()
    if served.engine is None:  # n_parallel=1: one sequence, driven by one request at a time
        busy = served.in_flight > 0
        seqs = [{"id": 0, "state": "busy" if busy else "idle"}]
    else:
        seqs = [_slot_dict(seq, view) for seq, view in enumerate(served.engine.slots())]
    out = []
    for seq in seqs:
        processing = seq["state"] != "idle"
        entry = {"id": seq["id"], "n_ctx": n_ctx, "speculative": served.settings.draft_model is not None,
                 "is_processing": processing, "model": served.alias, **seq}
        if "n_decoded" in seq:
            entry["next_token"] = [{"has_next_token": processing, "n_remain": seq["n_remain"],
                                    "n_decoded": seq["n_decoded"]}]
        out.append(entry)
    return out


def prefix_cache(served: ServedModel) -> dict[str, Any]:
    engine = served.engine
    if engine is None or not engine.n_cache:
        return {"model": served.alias, "entries": [], "entries_max": 0, "bytes": 0, "bytes_max": 0}
    entries = [{"n_tokens": e.n_tokens, "bytes": e.bytes, "hits": e.hits} for e in engine.prefix_entries()]
    return {"model": served.alias, "entries": entries, "entries_max": engine.n_cache,
            "bytes": sum(e["bytes"] for e in entries), "bytes_max": engine.cache.max_bytes}


@router.get("/props", summary="Server and model properties (llama-server's)", tags=["llama-server"])
async def get_props(request: Request, model: Optional[str] = None) -> dict[str, Any]:
    served = registry_of(request).get(model)
    return await anyio.to_thread.run_sync(props, request, served)


@router.get("/slots", summary="What each sequence is doing (llama-server's)", tags=["llama-server"])
async def get_slots(request: Request, model: Optional[str] = None,
                    fail_on_no_slot: Optional[str] = None) -> list[dict[str, Any]]:
    served = registry_of(request).get(model)
    out = await anyio.to_thread.run_sync(slots, served)
    if fail_on_no_slot and not any(not s["is_processing"] for s in out):
        raise unavailable("no slot available")
    return out


@router.get("/slots/prefix_cache", summary="What the prefix cache holds", tags=["llama-server"])
async def get_prefix_cache(request: Request, model: Optional[str] = None) -> dict[str, Any]:
    served = registry_of(request).get(model)
    return await anyio.to_thread.run_sync(prefix_cache, served)
