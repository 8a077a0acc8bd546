"""Where :class:`~usage_middleware.providers.ares.AresProvider` gets a user's ARES access token.

ARES acts for a signed-in user: both partner endpoints take that user's OAuth access token as
``Authorization: Bearer`` and read the user from it (reference ``ares.md`` §2, §3). A
:class:`TokenSource` maps a customer id to that token:

- :class:`BearerTokenSource` reads it from the incoming request's ``Authorization: Bearer``
  header (the ASGI ``scope``). It only knows a token during a request.
- :class:`CallableTokenSource` asks your own ``async`` function (a session store, your
  OAuth client with its refresh-token flow, ...).
- :class:`ClerkTokenSource` asks Clerk's backend API, as in the ARES "Track usage with
  Clerk" guide (reference ``ares.md`` §1):
  ``GET /v1/users/{user_id}/oauth_access_tokens/oauth_custom_ares`` with
  ``CLERK_SECRET_KEY``. The customer id is then the Clerk user id. It works outside a
  request too (Clerk refreshes expired ARES tokens itself) and caches each token until
  shortly before its ``expires_at``.

Tokens travel as :class:`AccessToken`, whose ``repr``/``str`` never show the secret; no
source logs a token, a key, or puts one in an exception message.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from asgiref.typing import HTTPScope
from cachetools import TLRUCache

from .._utils import is_async_callable
from ..errors import (
    ConfigurationError,
    PermanentProviderError,
    ProviderError,
    RetryableProviderError,
)
from ._http import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_RETRY_AFTER,
    check_max_body,
    check_max_retry_after,
    loads,
    send,
    status_error,
)

__all__ = [
    "AccessToken",
    "BearerTokenSource",
    "CallableTokenSource",
    "ClerkTokenSource",
    "TokenSource",
]

logger = logging.getLogger("usage_middleware.providers.tokens")

#: Above this, Clerk's ``expires_at`` is taken as milliseconds (1e11 s is the year 5138).
_MS_THRESHOLD = 1e11


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A user's ARES access token; ``repr``/``str`` hide the secret.

    Attributes:
        value: the bearer token itself (never logged, never in a ``repr``).
        expires_at: when it expires, Unix time in seconds, or ``None`` when unknown.
    """

    value: str = field(repr=False)
    expires_at: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.value, str) or not self.value:
            raise ValueError("AccessToken.value must be a non-empty string")

    def expires_within(self, seconds: float, *, now: float | None = None) -> bool:
        """Whether the token expires within ``seconds`` from ``now`` (Unix seconds; default now)."""
        if self.expires_at is None:
            return False
        return self.expires_at - seconds <= (time.time() if now is None else now)


class TokenSource:
    """Base class: the ARES access token of a customer (a signed-in user).

    Subclasses override :meth:`get`, and :meth:`refresh` when they can do better than
    asking again.

    Class attributes:
        request_bound: ``True`` when the source may only know a token during the user's
            request (it reads the ASGI scope). :class:`AresProvider` then remembers, in
            memory only, the latest token seen per customer, so usage delivered after the
            response can still be sent.
    """

    request_bound: bool = False

    async def get(self, customer: str, scope: HTTPScope | None = None) -> AccessToken | None:
        """The token to call ARES with for ``customer``, or ``None`` when none is available.

        Args:
            customer: the customer id (for Clerk: the Clerk user id).
            scope: the request's ASGI scope, or ``None`` outside a request (delivery).

        Raises:
            ProviderError: the token service itself failed (network, bad secret key).
        """
        raise NotImplementedError

    async def refresh(
        self, customer: str, rejected: AccessToken, scope: HTTPScope | None = None
    ) -> AccessToken | None:
        """A token to use instead of ``rejected``, which ARES refused (401/403).

        Returns ``None`` when the source has no different token. The default asks
        :meth:`get` again.
        """
        token = await self.get(customer, scope)
        return None if token is None or token == rejected else token

    async def open(self) -> None:
        """Start what the source needs, inside the running event loop. Default: nothing."""

    async def aclose(self) -> None:
        """Release what the source holds. Idempotent. Default: nothing."""


class BearerTokenSource(TokenSource):
    """The token the user's request carries: ``Authorization: Bearer <token>``.

    Use it when your client sends the user's ARES token itself. It knows a token only
    during a request (``scope`` is ``None`` at delivery time); see :class:`AresProvider`
    for how usage delivered later gets one.

    Args:
        header: the request header that carries the token (case-insensitive), e.g.
            ``"x-ares-token"`` if your app's own auth uses ``Authorization``.
        scheme: the auth scheme before the token (case-insensitive), or ``None`` when the
            header value is the bare token.
    """

    request_bound = True

    def __init__(self, *, header: str = "authorization", scheme: str | None = "Bearer") -> None:
        if not isinstance(header, str) or not header.strip():
            raise ConfigurationError("BearerTokenSource(header=...) must name a header")
        self._header = header.strip().lower().encode("latin-1")
        self._scheme = scheme.lower() if scheme else None

    def __repr__(self) -> str:
        return f"BearerTokenSource(header={self._header.decode()!r}, scheme={self._scheme!r})"

    async def get(self, customer: str, scope: HTTPScope | None = None) -> AccessToken | None:
        """The token in the request's header, or ``None`` (no scope, header, or token)."""
        if scope is None:
            return None
        for name, raw in scope.get("headers", ()):
            if name.lower() != self._header:
                continue
            value = raw.decode("latin-1").strip()
            if self._scheme is not None:
                scheme, _, value = value.partition(" ")
                if scheme.lower() != self._scheme:
                    return None
                value = value.strip()
            return AccessToken(value) if value else None
        return None

    async def refresh(
        self, customer: str, rejected: AccessToken, scope: HTTPScope | None = None
    ) -> AccessToken | None:
        """A request's header cannot be refreshed: the same header again, or ``None``."""
        return await super().refresh(customer, rejected, scope)


#: What a :class:`CallableTokenSource` function returns.
TokenResult = str | AccessToken | None
TokenFunc = Callable[..., Awaitable[TokenResult]]


def _takes_scope(func: Callable[..., Any]) -> bool:
    try:
        inspect.signature(func).bind("customer", None)
    except TypeError:
        return False
    except ValueError:  # no signature available (some builtins)
        return False
    return True


class CallableTokenSource(TokenSource):
    """Your own ``async`` function gives the token.

    Args:
        func: ``async def func(customer) -> str | AccessToken | None``, or
            ``async def func(customer, scope) -> ...`` when it needs the request (``scope``
            is ``None`` at delivery time). ``None`` means "no token for this user".
        refresh: optional ``async def refresh(customer) -> ...`` called after ARES rejected
            the token (e.g. your OAuth refresh-token flow, reference ``ares.md`` §1);
            default: call ``func`` again.
        request_bound: whether the token is only known during a request (see
            :attr:`TokenSource.request_bound`); default: whether ``func`` takes ``scope``.

    Raises:
        ConfigurationError: ``func`` or ``refresh`` is not an async callable.
    """

    def __init__(
        self,
        func: TokenFunc,
        *,
        refresh: Callable[[str], Awaitable[TokenResult]] | None = None,
        request_bound: bool | None = None,
    ) -> None:
        if not is_async_callable(func):
            raise ConfigurationError(
                "CallableTokenSource needs an async function: async def get_token(customer)"
            )
        if refresh is not None and not is_async_callable(refresh):
            raise ConfigurationError(
                "CallableTokenSource(refresh=...) needs an async function of the customer id"
            )
        self._func = func
        self._refresh = refresh
        self._with_scope = _takes_scope(func)
        self.request_bound = self._with_scope if request_bound is None else bool(request_bound)

    def __repr__(self) -> str:
        name = getattr(self._func, "__qualname__", type(self._func).__name__)
        return f"CallableTokenSource({name})"

    @staticmethod
    def _coerce(result: object) -> AccessToken | None:
        if result is None or isinstance(result, AccessToken):
            return result
        if isinstance(result, str):
            return AccessToken(result) if result else None
        raise PermanentProviderError(
            f"token function returned {type(result).__name__}, expected str | AccessToken | None",
            code="bad_token_source",
        )

    async def _call(self, call: Callable[[], Awaitable[TokenResult]]) -> AccessToken | None:
        try:
            result = await call()
        except ProviderError:
            raise
        except Exception as exc:
            # The message of a user exception may contain anything: keep only its type.
            raise RetryableProviderError(
                f"token function raised {type(exc).__name__}",
                code="token_source_error",
                original_error=exc,
            ) from exc
        return self._coerce(result)

    async def get(self, customer: str, scope: HTTPScope | None = None) -> AccessToken | None:
        """What ``func`` returns for ``customer`` (and ``scope`` when it takes one)."""
        if self._with_scope:
            return await self._call(lambda: self._func(customer, scope))
        return await self._call(lambda: self._func(customer))

    async def refresh(
        self, customer: str, rejected: AccessToken, scope: HTTPScope | None = None
    ) -> AccessToken | None:
        """What ``refresh`` (or ``func``) returns, or ``None`` if it is the rejected token."""
        refresh = self._refresh
        if refresh is None:
            return await super().refresh(customer, rejected, scope)
        token = await self._call(lambda: refresh(customer))
        return None if token is None or token == rejected else token


def _seconds(expires_at: object) -> float | None:
    """Clerk's ``expires_at`` (seconds or milliseconds, reference §1) as Unix seconds."""
    if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
        return None
    value = float(expires_at)
    if not math.isfinite(value) or value <= 0:
        return None
    return value / 1000.0 if value > _MS_THRESHOLD else value


def _clerk_error(response: httpx.Response) -> tuple[str | None, str]:
    """``(code, message)`` from a Clerk error body ``{"errors": [{message, code, ...}]}``."""
    try:
        body = loads(response.content)
        first = body["errors"][0]
        code = first.get("code")
        message = first.get("message") or first.get("long_message") or ""
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None, ""
    return (code if isinstance(code, str) else None), str(message)[:200]


#: Clerk codes meaning "this user has no usable ARES token" (re-authentication needed).
_NO_TOKEN_CODES = frozenset(
    {"oauth_token_retrieval_error", "oauth_missing_refresh_token", "resource_not_found"}
)


class ClerkTokenSource(TokenSource):
    """The user's ARES token from Clerk's backend API (customer id = Clerk user id).

    Endpoint: ``GET {base_url}/v1/users/{user_id}/oauth_access_tokens/oauth_{provider}``
    with ``Authorization: Bearer <CLERK_SECRET_KEY>`` (reference ``ares.md`` §1). The
    answer is a list of ``{token, provider, scopes, expires_at, ...}`` (or
    ``{"data": [...], "total_count": n}``); the first item with a token is used.
    ``expires_at`` may be seconds or milliseconds. Clerk refreshes an expired ARES token
    itself when it holds a refresh token.

    Each token is cached per user until ``refresh_margin`` seconds before its
    ``expires_at`` (``ttl_without_expiry`` seconds when Clerk gives none); concurrent
    look-ups for one user make one Clerk call.

    "No token" (``None``, so the user is refused with 402): an empty list, 404, or 422
    ``oauth_token_retrieval_error`` / ``oauth_missing_refresh_token`` (the user must sign
    in with ARES again).

    Args:
        secret_key: Clerk secret key; default the ``CLERK_SECRET_KEY`` environment variable.
        provider: the custom OAuth provider as Clerk's SDK names it (``"custom_ares"``);
            ``oauth_`` is prefixed on the wire unless already there.
        base_url: Clerk's API, default ``https://api.clerk.com``.
        client: an ``httpx.AsyncClient`` to use (not closed by :meth:`aclose`); default:
            one created in :meth:`open` and owned.
        timeout: seconds per Clerk call.
        refresh_margin: seconds before ``expires_at`` when a cached token is dropped.
        ttl_without_expiry: seconds to cache a token Clerk gives no ``expires_at`` for.
        cache_size: most users whose tokens are cached.
        max_body: most bytes of a Clerk answer read (default 1 MiB); a longer one fails
            the look-up (retryable).
        max_retry_after: most seconds of Clerk's ``Retry-After`` passed on (default 300).

    Raises:
        ConfigurationError: no secret key.
        RetryableProviderError (from :meth:`get`): Clerk unreachable, 429, 5xx, bad body.
        PermanentProviderError (from :meth:`get`): Clerk refused the key (401/403), other 4xx.
    """

    def __init__(
        self,
        *,
        secret_key: str | None = None,
        provider: str = "custom_ares",
        base_url: str = "https://api.clerk.com",
        client: httpx.AsyncClient | None = None,
        timeout: float = 2.0,
        refresh_margin: float = 30.0,
        ttl_without_expiry: float = 60.0,
        cache_size: int = 10_000,
        max_body: int = DEFAULT_MAX_BODY,
        max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
    ) -> None:
        self._max_body = check_max_body(max_body)
        self._max_retry_after = check_max_retry_after(max_retry_after)
        key = secret_key if secret_key is not None else os.environ.get("CLERK_SECRET_KEY")
        if not key:
            raise ConfigurationError(
                "ClerkTokenSource needs Clerk's secret key: set CLERK_SECRET_KEY or pass "
                "secret_key="
            )
        if not provider or "/" in provider:
            raise ConfigurationError(f"ClerkTokenSource(provider={provider!r}) is not a name")
        self._secret_key = key
        self.provider = provider
        self.wire_provider = provider if provider.startswith("oauth_") else f"oauth_{provider}"
        self.base_url = base_url.rstrip("/")
        self._client = client
        self._owns_client = client is None
        self._timeout = timeout
        self._margin = refresh_margin
        self._ttl_without_expiry = ttl_without_expiry
        self._cache: TLRUCache[str, AccessToken] = TLRUCache(
            maxsize=cache_size, ttu=self._expiry, timer=time.time
        )
        self._inflight: dict[str, asyncio.Task[AccessToken | None]] = {}
        #: Clerk calls made (for tests and stats).
        self.calls = 0

    def __repr__(self) -> str:
        return f"ClerkTokenSource(provider={self.provider!r}, base_url={self.base_url!r})"

    def _expiry(self, _key: str, token: AccessToken, now: float) -> float:
        if token.expires_at is None:
            return now + self._ttl_without_expiry
        return token.expires_at - self._margin

    async def open(self) -> None:
        """Create the owned HTTP client (inside the running loop)."""
        self._http()

    async def aclose(self) -> None:
        """Close the owned HTTP client. Idempotent."""
        for task in list(self._inflight.values()):
            task.cancel()
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        return self._client

    async def get(self, customer: str, scope: HTTPScope | None = None) -> AccessToken | None:
        """The cached token, or one fetched from Clerk (one call per user at a time)."""
        token = self._cache.get(customer)
        if token is not None:
            return token
        return await self._single_flight(customer)

    async def refresh(
        self, customer: str, rejected: AccessToken, scope: HTTPScope | None = None
    ) -> AccessToken | None:
        """Drop ``rejected`` from the cache and ask Clerk again; ``None`` if Clerk gives it back."""
        if self._cache.get(customer) == rejected:
            self._cache.pop(customer, None)
        token = await self._single_flight(customer)
        if token == rejected:
            self._cache.pop(customer, None)
            return None
        return token

    async def _single_flight(self, customer: str) -> AccessToken | None:
        task = self._inflight.get(customer)
        if task is None:
            task = asyncio.ensure_future(self._fetch(customer))
            task.add_done_callback(_retrieve)
            self._inflight[customer] = task
            task.add_done_callback(lambda t: self._forget(customer, t))
        return await asyncio.shield(task)

    def _forget(self, customer: str, task: asyncio.Task[AccessToken | None]) -> None:
        if self._inflight.get(customer) is task:
            del self._inflight[customer]

    async def _fetch(self, customer: str) -> AccessToken | None:
        url = (
            f"{self.base_url}/v1/users/{quote(customer, safe='')}"
            f"/oauth_access_tokens/{quote(self.wire_provider, safe='')}"
        )
        self.calls += 1
        response = await send(
            self._http(),
            "GET",
            url,
            what="Clerk token look-up",
            max_body=self._max_body,
            headers={
                "Authorization": f"Bearer {self._secret_key}",
                "Accept": "application/json",
            },
            request_timeout=self._timeout,
        )
        status = response.status_code
        if status >= 300:
            code, message = _clerk_error(response)
            if status in (404, 422) and (code in _NO_TOKEN_CODES or status == 404):
                logger.info(
                    "Clerk has no usable %s token for a user (status %s, code %s)",
                    self.wire_provider,
                    status,
                    code,
                )
                return None
            text = (
                f"Clerk refused the token look-up: {message}"
                if message
                else ("Clerk refused the token look-up")
            )
            raise status_error(
                response,
                "Clerk token look-up",
                self.base_url,
                message=text,
                code=code,
                cap=self._max_retry_after,
            )
        return self._parse(customer, response)

    def _parse(self, customer: str, response: httpx.Response) -> AccessToken | None:
        try:
            body = loads(response.content)
        except ValueError as exc:
            raise RetryableProviderError(
                "Clerk answered with a body that is not JSON (or has NaN/Infinity)",
                status=response.status_code,
                code="malformed_response",
                original_error=exc,
            ) from exc
        items = body.get("data") if isinstance(body, dict) else body
        if not isinstance(items, list):
            raise RetryableProviderError(
                "Clerk answered without a list of tokens",
                status=response.status_code,
                code="malformed_response",
            )
        for item in items:
            if not isinstance(item, dict):
                continue
            value = item.get("token")
            if isinstance(value, str) and value:
                token = AccessToken(value, _seconds(item.get("expires_at")))
                self._cache[customer] = token
                return token
        return None


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a single-flight task's exception as retrieved (its waiters may be gone)."""
    if not task.cancelled():
        task.exception()
