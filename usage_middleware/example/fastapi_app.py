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
* ``GET /health``: not metered.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Query, Request
from pydantic import BaseModel

from usage_middleware import LocalLedger, UsageMiddleware, metered
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
