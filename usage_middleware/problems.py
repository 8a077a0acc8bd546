"""RFC 9457 ``application/problem+json`` responses for refused metered requests.

Five problems, each a Starlette :class:`~starlette.responses.Response` built on the spot
(a refusal is rare next to a success, and building one costs one ``json.dumps``):

* 400 :data:`INVALID_UNITS`: the units of the request could not be determined from its
  input (the ``units`` callable raised ``ValueError``/``KeyError``) or are out of range
  (not 1 to :data:`~usage_middleware.models.MAX_UNITS`);
* 401 :data:`CUSTOMER_REQUIRED`: no customer id for a metered route, or a malformed one
  (with the middleware's ``WWW-Authenticate`` challenge, ``Bearer`` by default);
* 402 :data:`QUOTA_EXCEEDED`: the provider said no (``Answer.ok`` False, no ``err``);
* 500 :data:`UNITS_FUNCTION_ERROR`: the ``units`` callable returned something that is
  not an int (a bug in the endpoint's ``@metered``; logged);
* 503 :data:`BILLING_UNAVAILABLE`: the check itself failed closed (with ``Retry-After``);
* 400 :data:`INVALID_IDEMPOTENCY_KEY`: a malformed ``Idempotency-Key`` header;
* 409 :data:`IDEMPOTENCY_KEY_IN_USE`: a request with the same ``Idempotency-Key`` is
  still in flight (draft-ietf-httpapi-idempotency-key-header section 2.7);
* 422 :data:`IDEMPOTENCY_KEY_REUSED`: the ``Idempotency-Key`` was used for a request with
  another body (charged, or in flight) (the draft's section 2.7);
* 413 :data:`IDEMPOTENCY_BODY_TOO_LARGE`: a request with an ``Idempotency-Key`` has a body
  longer than :data:`~usage_middleware.idempotency.MAX_BODY` (or it ended early: 400).

Every problem carries ``Cache-Control: no-store`` and, except 401 and the
``Idempotency-Key`` problems, a ``feature`` member.

The 402 body carries ``feature``, ``units`` (asked for), ``limit``, ``used`` and
``remaining`` (units of usage, ``null`` where the provider does not know) and, when the
provider gave one, ``reason``. When the limit is known and not
:data:`~usage_middleware.models.UNLIMITED`, the 402 also carries the
``RateLimit-Policy`` / ``RateLimit`` fields of draft-ietf-httpapi-ratelimit-headers
(the current draft's Structured Field syntax)::

    RateLimit-Policy: "feature:convert";q=100
    RateLimit: "feature:convert";r=0

The policy name is the feature, ``q`` the plan's limit for the period and ``r`` the units
still available (allowance plus credits). ``w`` and ``t`` are left out: the provider's
answer carries no period. Successful responses are never touched (no ``Retry-After``, no
RateLimit fields).
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

from starlette.responses import Response

from .models import UNLIMITED, Answer

__all__ = [
    "BILLING_UNAVAILABLE",
    "CUSTOMER_REQUIRED",
    "IDEMPOTENCY_BODY_TOO_LARGE",
    "IDEMPOTENCY_KEY_IN_USE",
    "IDEMPOTENCY_KEY_REUSED",
    "INVALID_IDEMPOTENCY_KEY",
    "INVALID_UNITS",
    "MAX_RETRY_AFTER",
    "MISPLACED_DECORATOR",
    "PROBLEM_JSON",
    "QUOTA_EXCEEDED",
    "UNITS_FUNCTION_ERROR",
    "billing_unavailable",
    "customer_required",
    "idempotency_body_too_large",
    "idempotency_key_in_use",
    "idempotency_key_reused",
    "invalid_idempotency_key",
    "invalid_units",
    "misplaced_decorator",
    "problem",
    "quota_exceeded",
    "units_function_error",
]

#: The media type of every problem body (RFC 9457 section 3).
PROBLEM_JSON = "application/problem+json"

#: ``type`` of the 402 problem: the provider refused the units asked for.
QUOTA_EXCEEDED = "tag:usage-middleware,2025:quota-exceeded"
#: ``type`` of the 401 problem: no (usable) customer id for a metered route.
CUSTOMER_REQUIRED = "tag:usage-middleware,2025:customer-required"
#: ``type`` of the 503 problem: the entitlement check failed and the policy is closed.
BILLING_UNAVAILABLE = "tag:usage-middleware,2025:billing-unavailable"
#: ``type`` of the 400 problem: the request's units are undeterminable or out of range.
INVALID_UNITS = "tag:usage-middleware,2025:invalid-units"
#: ``type`` of the 500 problem: a ``units`` callable returned a non-int (a server bug).
UNITS_FUNCTION_ERROR = "tag:usage-middleware,2025:units-function-error"
#: ``type`` of the 500 problem: a function given to ``@metered`` was registered unwrapped.
MISPLACED_DECORATOR = "tag:usage-middleware,2025:misplaced-decorator"

#: ``type`` of the 400 problem: the ``Idempotency-Key`` header is malformed.
INVALID_IDEMPOTENCY_KEY = "tag:usage-middleware,2025:invalid-idempotency-key"
#: ``type`` of the 409 problem: a request with the same ``Idempotency-Key`` is in flight.
IDEMPOTENCY_KEY_IN_USE = "tag:usage-middleware,2025:idempotency-key-in-use"
#: ``type`` of the 422 problem: the ``Idempotency-Key`` was used for another request body.
IDEMPOTENCY_KEY_REUSED = "tag:usage-middleware,2025:idempotency-key-reused"
#: ``type`` of the 413 problem: the body of a request with an ``Idempotency-Key`` is too
#: long to fingerprint (the 400 for a body that ended early has it too).
IDEMPOTENCY_BODY_TOO_LARGE = "tag:usage-middleware,2025:idempotency-body-too-large"

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def problem(
    status: int,
    type_: str,
    title: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    **members: Any,
) -> Response:
    """An ``application/problem+json`` response with ``status``, RFC 9457 members and extras.

    ``members`` are extension members added after ``detail`` (JSON-serialisable values).
    """
    body: dict[str, Any] = {"type": type_, "title": title, "status": status, "detail": detail}
    body.update(members)
    return Response(
        _dumps(body).encode(), status_code=status, headers=headers, media_type=PROBLEM_JSON
    )


def quota_exceeded(answer: Answer, units: int) -> Response:
    """402 for a refused ``answer`` on ``units`` units of ``answer.feature``.

    ``limit``/``used``/``remaining`` come from the answer (``null`` where unknown).
    ``remaining`` is derived from ``limit - used`` when the provider left it out.
    """
    feature = answer.feature
    limit, used, remaining = answer.limit, answer.used, answer.remaining
    if remaining is None and limit is not None and used is not None and limit != UNLIMITED:
        remaining = max(0, limit - used)
    headers: dict[str, str] = {"Cache-Control": "no-store"}
    if limit is not None and limit != UNLIMITED:
        headers["RateLimit-Policy"] = f'"{feature}";q={limit}'
        if remaining is not None:
            headers["RateLimit"] = f'"{feature}";r={max(0, remaining)}'
    if remaining is None:
        detail = f"{feature}: this request needs {units} unit(s) and the plan does not allow it"
    else:
        detail = f"{feature}: this request needs {units} unit(s); {remaining} left"
    members: dict[str, Any] = {
        "feature": feature,
        "units": units,
        "limit": limit,
        "used": used,
        "remaining": remaining,
    }
    if answer.reason:
        members["reason"] = answer.reason
    return problem(402, QUOTA_EXCEEDED, "Payment Required", detail, headers=headers, **members)


def customer_required(
    detail: str = "this route is metered and needs one customer id; the request has none",
    *,
    www_authenticate: str | None = None,
) -> Response:
    """401 for a metered request whose customer could not be identified.

    ``www_authenticate``, when given, is sent as the ``WWW-Authenticate`` challenge that
    RFC 9110 section 15.5.2 requires on a 401 (e.g. ``"Bearer"``).
    """
    headers = {"Cache-Control": "no-store"}
    if www_authenticate is not None:
        headers["WWW-Authenticate"] = www_authenticate
    return problem(401, CUSTOMER_REQUIRED, "Unauthorized", detail, headers=headers)


#: Most seconds a 503's ``Retry-After`` asks a client to wait (a provider's own
#: ``Retry-After`` is never passed on raw).
MAX_RETRY_AFTER: Final = 300


def billing_unavailable(feature: str, retry_after: float) -> Response:
    """503 with ``Retry-After`` for a check that failed closed.

    Whole seconds from 1 to :data:`MAX_RETRY_AFTER`; a non-finite or non-positive value
    is 1.
    """
    if not math.isfinite(retry_after) or retry_after <= 0:
        seconds = 1
    else:
        seconds = max(1, min(MAX_RETRY_AFTER, math.ceil(retry_after)))
    return problem(
        503,
        BILLING_UNAVAILABLE,
        "Service Unavailable",
        f"{feature}: the usage check could not be made; retry later",
        headers={"Retry-After": str(seconds), "Cache-Control": "no-store"},
        feature=feature,
    )


def invalid_units(feature: str, detail: str, **members: Any) -> Response:
    """400 for a request whose units of ``feature`` are undeterminable or out of range."""
    return problem(
        400,
        INVALID_UNITS,
        "Bad Request",
        f"{feature}: {detail}",
        headers={"Cache-Control": "no-store"},
        feature=feature,
        **members,
    )


def units_function_error(feature: str, endpoint: str, returned: str) -> Response:
    """500 for a ``units`` callable of ``endpoint`` that returned a ``returned`` (type name)."""
    return problem(
        500,
        UNITS_FUNCTION_ERROR,
        "Internal Server Error",
        f"{feature}: the units function of {endpoint} returned a {returned}, not an int; "
        "this is a bug in the server's @metered(units=...)",
        headers={"Cache-Control": "no-store"},
        feature=feature,
        endpoint=endpoint,
    )


def misplaced_decorator(endpoint: str) -> Response:
    """500 for ``endpoint``, given to ``@metered`` but called without its wrapper."""
    return problem(
        500,
        MISPLACED_DECORATOR,
        "Internal Server Error",
        f"{endpoint} is metered but was called without its @metered wrapper (is @metered "
        "above the route decorator?); put @metered(...) directly above the function, below "
        "@app.get(...)/@router.post(...). This is a bug in the server, not the request.",
        headers={"Cache-Control": "no-store"},
        endpoint=endpoint,
    )


def invalid_idempotency_key(detail: str) -> Response:
    """400 for a malformed ``Idempotency-Key`` header (``detail`` says how)."""
    return problem(
        400,
        INVALID_IDEMPOTENCY_KEY,
        "Bad Request",
        f"{detail}; send 1-255 printable ASCII characters, e.g. "
        'Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"',
        headers={"Cache-Control": "no-store"},
    )


def idempotency_key_in_use() -> Response:
    """409 for a request whose ``Idempotency-Key`` a request still in flight holds."""
    return problem(
        409,
        IDEMPOTENCY_KEY_IN_USE,
        "Conflict",
        "a request with this Idempotency-Key is still being processed; retry once it "
        "has finished (it will not be charged again if it was charged)",
        headers={"Cache-Control": "no-store", "Retry-After": "1"},
    )


def idempotency_key_reused() -> Response:
    """422 for a request whose ``Idempotency-Key`` was used for a request with another body."""
    return problem(
        422,
        IDEMPOTENCY_KEY_REUSED,
        "Unprocessable Content",
        "this Idempotency-Key was used for a request with another body within the last "
        "24 hours; use a new key for a new request (a retry must repeat the request exactly)",
        headers={"Cache-Control": "no-store"},
    )


def idempotency_body_too_large(limit: int, *, ended: bool = False) -> Response:
    """413 for a request with an ``Idempotency-Key`` whose body exceeds ``limit`` bytes;
    400 (``ended``) for one whose body ended early (the client disconnected)."""
    if ended:
        return problem(
            400,
            IDEMPOTENCY_BODY_TOO_LARGE,
            "Bad Request",
            "the request body ended before it was complete",
            headers={"Cache-Control": "no-store"},
        )
    return problem(
        413,
        IDEMPOTENCY_BODY_TOO_LARGE,
        "Content Too Large",
        f"a request with an Idempotency-Key may have a body of at most {limit} bytes; "
        "send a larger one without the header",
        headers={"Cache-Control": "no-store"},
        limit=limit,
    )
