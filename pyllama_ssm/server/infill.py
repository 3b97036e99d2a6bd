"""llama-server's fill-in-the-middle route, `POST /infill`, for the code-completion clients that use it
(llama.vim, llama.vscode and the editors' plugins built on them).

The request's prefix, suffix, other files (input_extra) and the start of the middle (prompt) are laid
out around the model's FIM tokens by pyllama_ssm.fim, which builds the layout llama-server builds,
with its cuts to one batch and to the context, and are completed as a token prompt.  The answer is
llama-server's: content, tokens_predicted, tokens_evaluated, tokens_cached, stop_type ("eos", "word",
"limit"), stopping_word, prompt (the layout, special tokens written out), generation_settings and
timings, as its /completion (native.py, which this route shares: streaming, response_fields,
n_indent and t_max_predict_ms).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from .. import fim
from .errors import ERROR_RESPONSES, bad_request
from .generation import note_ignored, registry_of
from .native import STREAMED, NativeRequest, complete_native
from .schemas import RequestBody

router = APIRouter(responses=ERROR_RESPONSES)


class ExtraChunk(RequestBody):
    filename: str = Field(default="tmp", description="The file the text comes from.")
    text: str = Field(description="Its text (context for the completion).")


class InfillRequest(NativeRequest):
    input_prefix: str = Field(description="The code before the cursor.")
    input_suffix: str = Field(description="The code after the cursor.")
    input_extra: list[ExtraChunk] = Field(default_factory=list, description="Other files, as context.")
    prompt: str = Field(default="", description="The start of the middle, already written.")


@router.post("/infill", summary="Fill-in-the-middle (llama-server's)", tags=["llama-server"],
             responses=STREAMED)
async def infill(request: Request, body: InfillRequest) -> Any:
    served = registry_of(request).get(body.model)
    note_ignored(request, body)
    llama, settings = served.llama, served.settings
    try:
        tokens = llama.infill_tokens(body.input_prefix, body.input_suffix, prompt=body.prompt,
                                     extra=[chunk.model_dump() for chunk in body.input_extra], spm=settings.spm_infill,
                                     limits=fim.Limits(settings.n_batch, llama.n_ctx()))
    except ValueError as e:
        raise bad_request("model", f"{served.alias!r} cannot fill in the middle: "
                                   f"{str(e).removeprefix('suffix: ')}", code="not_supported") from None
    return await complete_native(request, served, body, tokens)
