"""A small FastAPI app metered on the embedded SQLite ledger.

Run it from the repository root::

    usage-middleware --pricing examples/pricing.json subscribe org:acme plan:free@1
    uvicorn examples.fastapi_app:app
    curl -X POST -H 'x-customer: org:acme' -H 'content-type: application/json' \\
        -d '{"text": "hello"}' http://127.0.0.1:8000/convert

Environment: ``USAGE_DB`` (the ledger file, default ``usage.db``) and ``USAGE_PRICING``
(default: the ``pricing.json`` next to this file).

Routes:

* ``POST /convert``: ``feature:convert``, one unit per successful request.
* ``POST /summarize?pages=N``: ``feature:pages``, N units (a units callable parses the query
  with the route's own parser; any other N is FastAPI's 422, not charged).
* ``POST /generate``: ``feature:generate``, not in the free plan: only credits fund it there
  (``usage-middleware grant org:acme feature:generate 10``).
* ``POST /chat``: ``feature:tokens``, billed by tokens. A chat completion streamed as
  server-sent events (OpenAI's chunk format, a final ``usage`` chunk, ``data: [DONE]``)
  from a stand-in model. The estimate (prompt tokens + ``max_tokens``) is reserved before
  the model runs, so a customer without that many tokens left gets a 402 and the model
  never starts; the stream reports each token as it goes; at its end the customer is
  charged the tokens actually used and the rest of the estimate is released. A client
  that hangs up half-way is charged the tokens generated until then (``charge_partial``).
* ``GET /health``: not metered.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from usage_middleware import LocalLedger, Usage, UsageMiddleware, metered
from usage_middleware.customers import customer_from_header

PRICING = os.environ.get("USAGE_PRICING") or str(Path(__file__).with_name("pricing.json"))
DB = os.environ.get("USAGE_DB") or "usage.db"

ledger = LocalLedger(DB, pricing=PRICING)

app = FastAPI(title="usage-middleware example")

# UsageMiddleware opens the ledger at start-up (the ASGI lifespan) and closes it at shutdown.
# The customer id comes from the `x-customer` request header. The header helper trusts
# whoever sends it, so only use it behind an authenticating proxy or gateway that sets the
# header itself and strips it from client requests. Otherwise use customer_from_user()
# with Starlette's AuthenticationMiddleware, or your own resolver.
app.add_middleware(UsageMiddleware, provider=ledger, customer=customer_from_header("x-customer"))


class ConvertIn(BaseModel):
    text: str


#: ``?pages=N``: 1 to 1000 in ASCII digits (no sign, space, ``_`` or ``.``). FastAPI checks
#: it (a 422 before any check, nothing charged) and page_count() parses it, for the route
#: and for its units alike: the units charged are always the pages served.
PAGES = "^(1000|[1-9][0-9]{0,2})$"


def page_count(raw: str) -> int:
    """The page count in ``raw``; ValueError unless it matches PAGES."""
    if re.fullmatch(PAGES, raw) is None:
        raise ValueError("pages must be a whole number from 1 to 1000")
    return int(raw)


def pages(request: Request) -> int:
    """Units for /summarize: page_count() of the same `pages` value the route gets (default 1).

    A ValueError would be answered with a 400 problem before any check; FastAPI has
    already refused such a value with its 422, so it does not happen."""
    return page_count(request.query_params.get("pages", "1"))


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/convert")
@metered("feature:convert")
async def convert(body: ConvertIn) -> dict[str, str]:
    return {"converted": body.text.upper()}


@app.post("/summarize")
@metered("feature:pages", units=pages)
def summarize(pages: Annotated[str, Query(pattern=PAGES)] = "1") -> dict[str, object]:
    # A plain `def` endpoint: FastAPI runs it in the threadpool, metered all the same.
    n = page_count(pages)
    return {"pages": n, "summary": f"{n} page(s), summarised"}


@app.post("/generate")
@metered("feature:generate")
async def generate() -> dict[str, str]:
    return {"generated": "a short poem about metering"}


class ChatIn(BaseModel):
    prompt: str = Field(min_length=1, max_length=4000)
    max_tokens: int = Field(default=32, ge=1, le=256)


#: Seconds between two tokens of the stand-in model (a real model takes about as long).
TOKEN_DELAY = 0.02


def count_tokens(text: str) -> int:
    """The stand-in tokenizer: one token per word."""
    return len(text.split())


async def chat_estimate(request: Request) -> int:
    """Units reserved for /chat before the model runs: prompt tokens plus ``max_tokens``,
    the most the request can use. (FastAPI has validated the body already: a bad one is
    its 422, never charged.)"""
    body = ChatIn.model_validate(await request.json())
    return count_tokens(body.prompt) + body.max_tokens


async def stand_in_model(prompt: str, max_tokens: int) -> AsyncIterator[str]:
    """A stand-in for a language model: echoes the prompt's words three times over, one
    token at a time, stopping at ``max_tokens``."""
    for token in (prompt.split() * 3)[:max_tokens]:
        await asyncio.sleep(TOKEN_DELAY)
        yield token


def sse(data: object) -> str:
    return f"data: {json.dumps(data)}\n\n"


@app.post("/chat")
@metered("feature:tokens", units=chat_estimate, charge_partial=True)
async def chat(body: ChatIn, usage: Usage) -> StreamingResponse:
    prompt_tokens = count_tokens(body.prompt)
    usage.set(prompt_tokens)  # the prompt is read whatever happens next

    async def events() -> AsyncIterator[str]:
        completion = 0
        async for token in stand_in_model(body.prompt, body.max_tokens):
            usage.add(1)  # reported as it streams: a hang-up is charged what was generated
            completion += 1
            yield sse(
                {
                    "object": "chat.completion.chunk",
                    "choices": [{"delta": {"content": token + " "}}],
                }
            )
        total = prompt_tokens + completion
        yield sse(
            {
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion,
                    "total_tokens": total,
                },
            }
        )
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
