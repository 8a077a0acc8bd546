"""The same metered API as ``fastapi_app.py``, on plain Starlette (no FastAPI needed).

Run it from the repository root::

    usage-middleware --pricing examples/pricing.json subscribe org:acme plan:free@1
    uvicorn examples.starlette_app:app

Environment: ``USAGE_DB`` (the ledger file, default ``usage.db``) and ``USAGE_PRICING``
(default: the ``pricing.json`` next to this file).

Routes: ``POST /convert`` (``feature:convert``, one unit), ``POST /summarize?pages=N``
(``feature:pages``, N units; the route reads N with its units callable, so they agree, and
any other N is a 400 problem, not charged), ``POST /generate`` (``feature:generate``,
credit-funded on the free plan), ``POST /chat`` (``feature:tokens``, billed by the tokens a
stand-in model streamed: the estimate, prompt tokens + ``max_tokens``, is reserved before
the model runs, and the units are read from the stream's final OpenAI-style ``usage``
event with ``units_from=usage_from_sse()``), ``GET /health`` (not metered).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from usage_middleware import LocalLedger, UsageMiddleware, metered, usage_from_sse
from usage_middleware.customers import customer_from_header

PRICING = os.environ.get("USAGE_PRICING") or str(Path(__file__).with_name("pricing.json"))
DB = os.environ.get("USAGE_DB") or "usage.db"

ledger = LocalLedger(DB, pricing=PRICING)


def pages(request: Request) -> int:
    """Units for /summarize: the `pages` query parameter, a whole number from 1 to 1000
    (default 1). Anything else raises ValueError, which UsageMiddleware answers with a 400
    problem before any check (nothing is reserved or charged)."""
    raw = request.query_params.get("pages", "1")
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 1000:
        raise ValueError("pages must be a whole number from 1 to 1000")
    return int(raw)


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


@metered("feature:convert")
async def convert(request: Request) -> JSONResponse:
    try:
        body = await request.json()
    except ValueError:
        body = None
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str):
        return JSONResponse({"detail": "send {'text': '...'}"}, status_code=400)
    return JSONResponse({"converted": text.upper()})


@metered("feature:pages", units=pages)
def summarize(request: Request) -> JSONResponse:
    # A plain `def` endpoint: Starlette runs it in the threadpool, metered all the same.
    # `pages` was validated by the units function before the check.
    n = pages(request)
    return JSONResponse({"pages": n, "summary": f"{n} page(s), summarised"})


@metered("feature:generate")
async def generate(request: Request) -> JSONResponse:
    return JSONResponse({"generated": "a short poem about metering"})


async def chat_input(request: Request) -> tuple[str, int]:
    """The prompt and ``max_tokens`` (1 to 256, default 32) of a /chat body; ValueError
    (a 400 problem, nothing reserved) for anything else."""
    body = await request.json()
    prompt = body.get("prompt") if isinstance(body, dict) else None
    max_tokens = body.get("max_tokens", 32) if isinstance(body, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("send {'prompt': '...', 'max_tokens': 32}")
    if type(max_tokens) is not int or not 1 <= max_tokens <= 256:
        raise ValueError("max_tokens must be a whole number from 1 to 256")
    return prompt, max_tokens


async def chat_estimate(request: Request) -> int:
    """Units reserved for /chat before the model runs: prompt tokens plus ``max_tokens``."""
    prompt, max_tokens = await chat_input(request)
    return len(prompt.split()) + max_tokens


async def stand_in_model(prompt: str, max_tokens: int) -> AsyncIterator[str]:
    """A stand-in for a language model: the prompt's words three times over, one token at
    a time, at most ``max_tokens``."""
    for token in (prompt.split() * 3)[:max_tokens]:
        await asyncio.sleep(0.02)
        yield token


@metered("feature:tokens", units=chat_estimate, units_from=usage_from_sse())
async def chat(request: Request) -> StreamingResponse:
    prompt, max_tokens = await chat_input(request)

    async def events() -> AsyncIterator[str]:
        completion = 0
        async for token in stand_in_model(prompt, max_tokens):
            completion += 1
            chunk = {"choices": [{"delta": {"content": token + " "}}], "usage": None}
            yield f"data: {json.dumps(chunk)}\n\n"
        prompt_tokens = len(prompt.split())
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }
        # OpenAI's last chunk (stream_options={"include_usage": true}): read by usage_from_sse
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/convert", convert, methods=["POST"]),
        Route("/summarize", summarize, methods=["POST"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/chat", chat, methods=["POST"]),
    ],
    middleware=[
        # UsageMiddleware opens the ledger at start-up (the lifespan), closes it at shutdown.
        # The customer id comes from the `x-customer` header, which the helper trusts:
        # only use it behind an authenticating proxy that sets the header itself and
        # strips it from client requests (or use customer_from_user() with Starlette's
        # AuthenticationMiddleware).
        Middleware(UsageMiddleware, provider=ledger, customer=customer_from_header("x-customer")),
    ],
)
