"""Who pays for a request: customer resolvers for :class:`~usage_middleware.UsageMiddleware`.

A resolver is a sync or async callable of the Starlette :class:`~starlette.requests.Request`
returning the customer id (a string such as Tier's ``"org:acme"``) or ``None`` when the
request has no customer. It runs on every metered request, after routing and after every
other middleware (authentication included), inside the endpoint's ``@metered`` wrapper.

What the middleware makes of the result:

* a valid id (:func:`~usage_middleware.models.check_customer`): the request is metered
  for it;
* ``None``: 401 ``application/problem+json`` (never 402 or 500);
* a malformed id (whitespace, control characters, empty, longer than 255): also 401, with
  a detail saying the id is malformed; the request is not metered and not served;
* an exception: it propagates like any other bug in the endpoint (500).

Resolvers should be cheap: they run on the event loop. A sync resolver must not block.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from starlette.requests import Request

from .errors import ConfigurationError

__all__ = ["CustomerResolver", "customer_from_header", "customer_from_user"]


class CustomerResolver(Protocol):
    """``(request) -> str | None``, sync or async: the customer id of a request."""

    def __call__(self, request: Request, /) -> str | Awaitable[str | None] | None: ...


def customer_from_user(attr: str = "identity") -> CustomerResolver:
    """Resolve the customer from Starlette's ``request.user`` (``AuthenticationMiddleware``).

    Args:
        attr: the attribute of the authenticated user holding the customer id
            (``"identity"`` for Starlette's ``SimpleUser``; e.g. ``"org_id"`` for your own
            ``BaseUser`` subclass). A non-string value is passed through ``str()``.

    Returns a sync resolver: ``None`` for an unauthenticated user (the route answers 401),
    else ``getattr(request.user, attr)``.

    Raises (when the resolver runs):
        ConfigurationError: the request has no ``user`` in its scope, i.e.
            ``AuthenticationMiddleware`` is not installed.
    """
    if not isinstance(attr, str) or not attr.isidentifier():
        raise ConfigurationError(
            f"customer_from_user(attr=...) must name an attribute of request.user, got {attr!r}"
        )

    def resolve(request: Request, /) -> str | None:
        user = request.scope.get("user")
        if user is None:
            raise ConfigurationError(
                "customer_from_user() reads request.user, but the request has no user: add "
                "app.add_middleware(AuthenticationMiddleware, backend=...) "
                "(starlette.middleware.authentication)"
            )
        if not getattr(user, "is_authenticated", False):
            return None
        value = getattr(user, attr)
        if value is None:
            return None
        return value if isinstance(value, str) else str(value)

    resolve.__qualname__ = resolve.__name__ = f"customer_from_user({attr!r})"
    return resolve


def customer_from_header(name: str, *, prefix: str = "") -> CustomerResolver:
    """Resolve the customer from a request header, e.g. ``X-Customer-Id``.

    .. warning::
        This trusts the caller: any client can send any header and be billed as anyone.
        Use it only behind an authenticating proxy or API gateway that sets the header
        itself and strips it from incoming requests.

    Args:
        name: the header name (case-insensitive), e.g. ``"X-Customer-Id"``.
        prefix: prepended to the header's value, e.g. ``"org:"`` turns ``acme`` into
            ``org:acme``.

    Returns a sync resolver: ``None`` when the header is missing or empty, or appears
    more than once (the route answers 401), else ``prefix + value`` with surrounding
    whitespace stripped. The value is decoded as UTF-8 (so ``org:äcme`` sent as UTF-8
    matches the id subscribed with the CLI); bytes that are not valid UTF-8 give ``None``.
    A repeated header is refused rather than read first-copy-wins:
    a proxy that appends its own header instead of replacing the client's would otherwise
    let the client pick who is billed.

    Raises:
        ConfigurationError: ``name`` is not a header name or ``prefix`` not a string.
    """
    if not isinstance(name, str) or not name or any(c in name for c in " \t\r\n:"):
        raise ConfigurationError(
            f"customer_from_header(name) needs a header name such as 'X-Customer-Id', got {name!r}"
        )
    if not isinstance(prefix, str):
        raise ConfigurationError(f"customer_from_header(prefix=...) must be a str, got {prefix!r}")
    key = name.lower().encode("latin-1")

    def resolve(request: Request, /) -> str | None:
        found: bytes | None = None
        for k, v in request.scope["headers"]:
            if k == key:
                if found is not None:
                    return None  # sent twice: which copy is the proxy's is unknowable
                found = v
        if found is None:
            return None
        try:
            value = found.decode("utf-8").strip()
        except UnicodeDecodeError:
            return None
        return prefix + value if value else None

    resolve.__qualname__ = resolve.__name__ = f"customer_from_header({name!r})"
    return resolve
