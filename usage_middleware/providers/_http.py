"""HTTP details the remote providers share: one way to call, cap, parse and classify.

Every provider's HTTP call (Tier, Spaire, ARES, and Clerk's token look-up) goes through
:func:`send`, which

* reads the answer as a stream and stops past ``max_body`` bytes (decoded), so a huge or
  endless answer costs at most that much memory and never a long parse on the event loop;
* turns every transport failure into a :class:`~usage_middleware.errors.RetryableProviderError`,
  marked ``ambiguous`` when the request may have reached the provider (read timeout, a
  connection reset or protocol error after sending) and the call is not idempotent;

and :func:`loads` parses JSON strictly (``NaN``/``Infinity`` refused), :func:`status_kind`
classifies a status the same way for every provider, :func:`status_error` turns a non-2xx
answer into the typed error by that classification (a provider only parses its own error
body and names its few exceptions), :func:`retry_after` reads a capped ``Retry-After``.

Classification (:func:`status_kind`), the one rule every provider starts from:

=========================  =============  ==================================================
status                     kind           handling
=========================  =============  ==================================================
2xx                        ``success``
3xx                        ``redirect``   retryable, logged as an error naming the base URL
                                          (providers follow no redirects: it is a
                                          misconfigured base URL, not the event's fault)
404                        ``not_found``  retryable unless the provider recognises its own
                                          "no such resource" answer (a routing 404, plain
                                          ``{"detail": "Not Found"}``, is a wrong base URL)
408, 425, 429, 5xx         ``retryable``
401, 403                   ``auth``       the provider decides (credentials or token)
other 4xx                  ``rejected``   permanent: the request itself is at fault
other (1xx)                ``retryable``
=========================  =============  ==================================================
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final, Literal

import httpx

from ..errors import (
    ConfigurationError,
    PermanentProviderError,
    ProviderError,
    RetryableProviderError,
)

__all__ = [
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_RETRY_AFTER",
    "StatusKind",
    "check_max_body",
    "check_max_retry_after",
    "loads",
    "redirect_error",
    "retry_after",
    "send",
    "status_error",
    "status_kind",
]

logger = logging.getLogger("usage_middleware.providers")

#: Bytes of an answer read before the call is abandoned (1 MiB).
DEFAULT_MAX_BODY: Final = 1 << 20
#: Seconds a provider's ``Retry-After`` may ask for at most (5 minutes).
DEFAULT_MAX_RETRY_AFTER: Final = 300.0

#: Transport errors raised before the request left: a resend cannot count it twice.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)

#: Seconds between two error lines about one base URL answering with redirects.
_REDIRECT_LOG_INTERVAL: Final = 60.0
_redirect_logged: dict[str, float] = {}

StatusKind = Literal["success", "redirect", "not_found", "retryable", "auth", "rejected"]


def check_max_body(value: object) -> int:
    """``max_body`` validated: an int >= 1024 bytes (raises ConfigurationError)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1024:
        raise ConfigurationError(f"max_body must be an int >= 1024 bytes, got {value!r}")
    return value


def check_max_retry_after(value: object) -> float:
    """``max_retry_after`` validated: finite seconds >= 1 (raises ConfigurationError)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 1
    ):
        raise ConfigurationError(f"max_retry_after must be >= 1 second, got {value!r}")
    return float(value)


def retry_after(response: httpx.Response, cap: float = DEFAULT_MAX_RETRY_AFTER) -> float | None:
    """Seconds to wait from a response's ``Retry-After`` header (RFC 9110 §10.2.3).

    Accepts delta-seconds or an HTTP date; returns ``None`` when the header is absent,
    unreadable, negative or not finite, and never more than ``cap`` seconds (a provider
    asking for decades is asking for ``cap``).
    """
    value = response.headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = max(0.0, (when - datetime.now(UTC)).total_seconds())
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, cap)


def status_kind(status: int) -> StatusKind:
    """The one classification of an HTTP status every provider starts from (module doc)."""
    if 200 <= status < 300:
        return "success"
    if 300 <= status < 400:
        return "redirect"
    if status == 404:
        return "not_found"
    if status in (408, 425, 429) or status >= 500:
        return "retryable"
    if status in (401, 403):
        return "auth"
    if 400 <= status < 500:
        return "rejected"
    return "retryable"


def redirect_error(
    response: httpx.Response, what: str, base_url: str, *, cap: float = DEFAULT_MAX_RETRY_AFTER
) -> RetryableProviderError:
    """A 3xx: retryable (the events are not at fault), logged as an error naming the
    base URL at most once a minute per base URL."""
    location = response.headers.get("location", "")[:200]
    now = time.monotonic()
    if now - _redirect_logged.get(base_url, -math.inf) >= _REDIRECT_LOG_INTERVAL:
        _redirect_logged[base_url] = now
        logger.error(
            "%s: HTTP %d redirect to %r; no redirect is followed: check the base URL %r",
            what,
            response.status_code,
            location,
            base_url,
        )
    return RetryableProviderError(
        f"{what}: HTTP {response.status_code} redirect (to {location or 'nowhere'}); "
        f"check the base URL {base_url}",
        status=response.status_code,
        code="redirect",
        retry_after=retry_after(response, cap),
    )


def status_error(
    response: httpx.Response,
    what: str,
    base_url: str,
    *,
    message: str,
    code: str | None = None,
    cap: float = DEFAULT_MAX_RETRY_AFTER,
    retry: bool | None = None,
    permanent: type[PermanentProviderError] = PermanentProviderError,
) -> ProviderError:
    """The typed error for a non-2xx answer: the one classification (module doc), applied.

    A 3xx is :func:`redirect_error`. Otherwise the error is retryable when ``retry`` says
    so, or, with ``retry=None``, when :func:`status_kind` is ``retryable`` or
    ``not_found`` (a routing 404: a provider that recognises its own "no such resource"
    answer passes ``retry=False``); ``auth`` and ``rejected`` are permanent, of type
    ``permanent`` (a provider's own subclass). Every error carries the status, ``code``,
    ``message`` (the provider's parsed error body) and the capped ``Retry-After``.

    Args:
        what: the call, for the redirect message (``"Tier /v1/limits"``).
        base_url: the provider's base URL, named by the redirect message.
        retry: the provider's own decision for this answer, when it knows better than
            the status (Tier's 401 is its sidecar's Stripe key: retryable).
    """
    status = response.status_code
    kind = status_kind(status)
    if kind == "redirect":
        return redirect_error(response, what, base_url, cap=cap)
    if retry is None:
        retry = kind in ("retryable", "not_found")
    cls: type[ProviderError] = RetryableProviderError if retry else permanent
    return cls(message, status=status, code=code, retry_after=retry_after(response, cap))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(content: bytes | str) -> Any:
    """Strict JSON: ``NaN``, ``Infinity`` and ``-Infinity`` are refused (``ValueError``)."""
    return json.loads(content, parse_constant=_reject_constant)


async def send(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    what: str,
    max_body: int = DEFAULT_MAX_BODY,
    idempotent: bool = True,
    keep_oversized_success: bool = False,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    content: bytes | None = None,
    json_body: Any = None,
    request_timeout: float | None = None,
) -> httpx.Response:
    """One request, its answer read as a stream of at most ``max_body`` bytes.

    Returns the response with its body read (``content``, ``json()``, ``text`` work).

    Raises:
        RetryableProviderError: a transport error (``original_error`` is the httpx
            exception; ``ambiguous`` when the request may have arrived and ``idempotent``
            is false), or an answer longer than ``max_body`` (code
            ``response_too_large``), unless it is a 2xx and ``keep_oversized_success``:
            then the response comes back with an empty body (for calls whose status is
            all that counts, such as a usage report that must not be resent).
    """
    kwargs: dict[str, Any] = {"headers": headers, "params": params}
    if json_body is not None:
        kwargs["json"] = json_body
    elif content is not None:
        kwargs["content"] = content
    if request_timeout is not None:
        kwargs["timeout"] = request_timeout
    try:
        async with client.stream(method, url, **kwargs) as response:
            chunks: list[bytes] = []
            size = 0
            over = False
            oversized = False
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > max_body:
                    over = True
                    break
                chunks.append(chunk)
    except _NOT_SENT as exc:
        raise RetryableProviderError(
            f"{what}: could not be reached ({type(exc).__name__})", original_error=exc
        ) from exc
    except httpx.HTTPError as exc:
        ambiguous = not idempotent
        note = "; it may have arrived and a resend may count it twice" if ambiguous else ""
        raise RetryableProviderError(
            f"{what}: {type(exc).__name__}{note}", original_error=exc, ambiguous=ambiguous
        ) from exc
    if over:
        if keep_oversized_success and response.is_success:
            logger.warning(
                "%s: answer larger than %d bytes ignored (status %d counts)",
                what,
                max_body,
                response.status_code,
            )
            chunks = []
            oversized = True
        else:
            raise RetryableProviderError(
                f"{what}: answer larger than {max_body} bytes (HTTP {response.status_code});"
                " abandoned",
                status=response.status_code,
                code="response_too_large",
            )
    # A plain response over the bytes read (already decoded: drop the encoding headers).
    kept = [
        (k, v)
        for k, v in response.headers.multi_items()
        if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")
    ]
    return httpx.Response(
        response.status_code,
        headers=kept,
        content=b"".join(chunks),
        request=response.request,
        extensions={
            "http_version": response.http_version.encode("ascii", "replace"),
            OVERSIZED: oversized,
        },
    )


#: In a :func:`send` response's ``extensions``: a 2xx whose body was too large and dropped.
OVERSIZED = "usage_middleware.oversized"


def charge_answer_error(
    response: httpx.Response, what: str, base_url: str
) -> RetryableProviderError | None:
    """Why a 2xx answer to a charge is not the provider's acknowledgement, or ``None``.

    A charge counts as delivered on a 2xx whose body is a JSON object (what Tier, ARES and
    Spaire document), or one too large to read (``keep_oversized_success``: the provider
    evidently took it, and resending could count it twice). Anything else (HTML, an empty
    body, JSON that is not an object) is not the provider answering: a wrong base URL, a
    proxy's or portal's page. The charge evidently never reached the provider, so it is a
    retryable failure (logged at WARNING naming ``base_url``), not a delivery.
    """
    if response.extensions.get(OVERSIZED):
        return None
    try:
        data = loads(response.content) if response.content else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        return None
    kind = response.headers.get("content-type", "no content type")
    logger.warning(
        "%s: HTTP %d answer is not a JSON object (%s, %d bytes): is %s the provider's base "
        "URL? Not counted as delivered; it will be retried",
        what,
        response.status_code,
        kind,
        len(response.content),
        base_url,
    )
    return RetryableProviderError(
        f"{what}: HTTP {response.status_code} answer is not a JSON object ({kind}); "
        f"is {base_url} the provider's base URL?",
        status=response.status_code,
        code="invalid_response",
    )
