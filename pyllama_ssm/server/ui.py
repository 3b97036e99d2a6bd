"""The chat page at `/`: one static HTML file (static/chat.html) with its own small script.

It talks to the server it came from: it streams answers from /v1/chat/completions (fetch and a
ReadableStream over the server-sent events) and shows, per answer, the tokens per second and the
prompt tokens the prefix cache supplied.  Nothing is built and nothing is fetched from elsewhere;
the page needs no API key to load (it is static) and asks for one when the server has one.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@functools.cache
def page() -> str:
    return resources.files(__package__).joinpath("static", "chat.html").read_text(encoding="utf-8")


@router.get("/", include_in_schema=False)
async def chat_page() -> HTMLResponse:
    return HTMLResponse(page())
