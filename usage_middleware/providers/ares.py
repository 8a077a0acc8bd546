"""AresProvider: charge ARES users in ARES credits, with their own OAuth access token.

Wire contract: ``/work/shared/reference/ares.md`` (the "ARES for Partners" docs).

* ``GET {base_url}/v1/user`` with ``Authorization: Bearer <user token>`` (§2): 200
  ``{"message": "Success", "user": {"id", "email", "credits"}}``; the fields at the top
  level are accepted too. 401 ``No token provided`` / ``Invalid token``, 403
  ``Token expired``.
* ``POST {base_url}/v1/partner/usage`` with the same bearer (§3): JSON
  ``{"client_id", "usage", "credits"}``; ``usage`` is a short description string (not a
  quantity), ``credits`` the number of credits deducted from the user (and earned by the
  partner). 200 ``{"message": "Success", "usage": {...}}``. What ARES answers for a user
  without enough credits is undocumented: any 4xx whose ``error`` mentions credits, or a
  402, is taken as "insufficient credits".

Errors raised here::

    PermanentProviderError
    ├── AresTokenError            401/403: the user's token was refused (code no_token,
    │                             invalid_token, token_expired or token_rejected)
    └── InsufficientCreditsError  the user cannot pay (code insufficient_credits)

Messages carry ARES's ``error`` text and the status, never a token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, TypeVar

import httpx
from asgiref.typing import HTTPScope
from cachetools import TTLCache

from ..errors import (
    ConfigurationError,
    PermanentProviderError,
    ProviderError,
    RetryableProviderError,
)
from ..models import UNLIMITED, Answer, Reservation, UsageEvent, check_feature
from ..provider import (
    FailurePolicy,
    Overage,
    clobber_refused,
    clobber_unsupported,
    on_another_loop,
    settle_units,
)
from ._http import charge_answer_error, loads, redirect_error, send, status_error, status_kind
from .remote import Charge, Entitlement, RemoteProvider
from .tokens import AccessToken, BearerTokenSource, TokenSource

__all__ = [
    "CREDITS_FEATURE",
    "AresProvider",
    "AresTokenError",
    "AresUser",
    "ChargeMode",
    "InsufficientCreditsError",
]

logger = logging.getLogger("usage_middleware.providers.ares")

#: When the user pays: ``"after"`` a successful response (through the outbox) or
#: ``"before"`` serving (the ARES docs' advice; no refund for a failed response).
ChargeMode = Literal["after", "before"]

#: The internal feature under which one user's credits are cached and accounted for, in
#: thousandths of a credit, across all of your features (a user has ONE balance).
CREDITS_FEATURE = "feature:ares:credits"

_MILLI = 1000
_T = TypeVar("_T")

_TOKEN_CODES = {
    "no token provided": "no_token",
    "invalid token": "invalid_token",
    "token expired": "token_expired",
}

NO_TOKEN_REASON = "no ARES access token for this user: sign in with ARES"
_SHORT = "not enough ARES credits"


class AresTokenError(PermanentProviderError):
    """ARES refused the user's access token (401/403), after one refresh where possible.

    ``code``: ``no_token``, ``invalid_token``, ``token_expired`` or ``token_rejected``.
    """


class InsufficientCreditsError(PermanentProviderError):
    """The user has fewer ARES credits than the usage costs (``code="insufficient_credits"``)."""


@dataclass(frozen=True, slots=True)
class AresUser:
    """The signed-in ARES user, from ``GET /v1/user`` (reference §2).

    Attributes:
        id: the ARES user id (a UUID in the docs), or ``None`` if absent.
        email: the user's email, or ``None``.
        credits: ARES credits the user has left (a number; may be fractional).
    """

    id: str | None
    email: str | None
    credits: int | float


class _Paid:
    """Reservation.token of a ``charge="before"`` reservation: ARES already deducted it."""

    __slots__ = ("credits",)

    def __init__(self, credits: int | float) -> None:
        self.credits = credits


def _scrub(text: str, *tokens: AccessToken | None) -> str:
    for token in tokens:
        if token is not None and token.value in text:
            text = text.replace(token.value, "<redacted>")
    return text


def _error_text(response: httpx.Response) -> str:
    try:
        body = loads(response.content)
    except ValueError:
        return ""
    if isinstance(body, dict):
        for key in ("error", "message"):
            value = body.get(key)
            if isinstance(value, str):
                return value[:200]
    return ""


def _ares_error(
    response: httpx.Response, what: str, token: AccessToken, base_url: str, cap: float
) -> ProviderError:
    """The typed error for a non-2xx ARES answer (never carrying the token), by the shared
    classification: a 404 is a routing 404 (no resource of ARES's is addressed by id, so
    a wrong base URL, not the charge's fault); ARES's own are insufficient credits (a 402,
    or a 4xx whose text mentions credits) and a refused token (401/403)."""
    status = response.status_code
    text = _scrub(_error_text(response), token)
    message = f"ARES {what}: {text}" if text else f"ARES {what}: HTTP {status}"
    permanent: type[PermanentProviderError] = PermanentProviderError
    retry: bool | None = None
    if 400 <= status < 500 and (status == 402 or "credit" in text.lower()):
        permanent, retry, code = InsufficientCreditsError, False, "insufficient_credits"
    elif status in (401, 403):
        permanent, code = AresTokenError, _TOKEN_CODES.get(text.strip().lower(), "token_rejected")
    elif status_kind(status) in ("retryable", "not_found"):
        code = None
    else:
        code = "rejected"
    return status_error(
        response,
        f"ARES {what}",
        base_url,
        message=message,
        code=code,
        cap=cap,
        retry=retry,
        permanent=permanent,
    )


def _number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _decimal(value: object, what: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ConfigurationError(f"{what} must be a number of credits, got {value!r}")
    try:
        number = Decimal(str(value))
    except InvalidOperation as exc:
        raise ConfigurationError(f"{what} must be a number of credits, got {value!r}") from exc
    if not number.is_finite() or number <= 0 or (number * _MILLI) % 1 != 0:
        raise ConfigurationError(
            f"{what} must be a positive number of credits with at most 3 decimals, got {value!r}"
        )
    return number


def _wire_number(value: Decimal) -> int | float:
    """A credit amount as a JSON number: an int when whole (the docs prefer integers)."""
    return int(value) if value == value.to_integral_value() else float(value)


class AresProvider(RemoteProvider):
    """Charge signed-in ARES users in ARES credits (joinares.com partner API).

    ARES acts for a user: every call carries that user's OAuth access token, which a
    :class:`~usage_middleware.providers.tokens.TokenSource` supplies:
    :class:`~usage_middleware.providers.tokens.BearerTokenSource` (default: the request's
    ``Authorization: Bearer`` header), ``CallableTokenSource`` (your async function) or
    ``ClerkTokenSource`` (Clerk's backend API, as in the ARES + Clerk guide).

    **Customer id.** The middleware's customer resolver must return an id naming exactly
    one ARES user, the one whose token the source gives: with ``ClerkTokenSource`` the
    Clerk user id (``user_2abc...``: the id Clerk is asked with); with the bearer source a
    stable id of the signed-in user (your session's user id, or the ARES user id). Never a
    shared id such as an organisation: ARES charges whoever owns the token, and this
    provider caches one credit balance and remembers one token per customer id.

    **can() / reserve().** ``GET /v1/user`` with the user's token; the user's ``credits``
    (under ``user``, or at the top level) are converted to units of the feature by its
    price: ``remaining = floor(credits / price)`` (default price: 1 credit per unit). The
    balance is cached and accounted for per *user*, across all features (one wallet),
    through :class:`RemoteProvider`'s cache, single-flight, local accounting, failure
    policy and circuit breaker. A user with too few credits is refused (``ok=False``,
    ``err=None``: the middleware's 402, never a 500); so is a request without a token, or
    whose token ARES refuses even after one refresh (``reason`` says which). A bearer token
    is checked with ARES the first time it is seen before it is trusted.

    **report().** One ``POST /v1/partner/usage`` per event (``max_batch = 1``):
    ``{"client_id": ARES_CLIENT_ID, "usage": <description of the feature, default its
    name>, "credits": units * price}``; the outbox sums the queued charges of one user and
    feature into one such event per flush window (``aggregates``). 401/403: the token is
    refreshed once through the token source, then the event is dead-lettered with ARES's
    reason. Insufficient credits and other 4xx: dead-lettered. 5xx, 429 and network
    errors: retried by the outbox. ARES has no idempotency key: a retry after a timeout
    that ARES did process charges the user twice (the at-least-once window of the outbox).

    **Tokens while events wait in the outbox.** Tokens are never written to the outbox.
    With ``ClerkTokenSource`` (or a callable that works without a request) delivery asks
    for the user's current token, whenever it happens. A bearer token is only known during
    a request, so the provider keeps, in memory only, the latest token ARES accepted per
    customer (for ``token_memory_ttl`` seconds). An event whose user has no usable token
    at delivery (the process restarted, or the remembered token expired and the user has
    not come back) is dead-lettered with code ``no_token`` / ``token_expired`` at once
    (retrying would stall the outbox for every other user); replay it with
    ``usage-middleware outbox retry`` after the user's next request.

    **Charging mode.** ``charge="after"`` (default): the user pays after the response was
    fully sent with a 2xx, through the durable outbox, like every other provider.
    ``charge="before"``: the ARES docs' advice; ``reserve()`` POSTs the usage before the
    route runs and only serves the request when ARES said "Success". A refused POST
    (insufficient credits, refused token, other 4xx) refuses the request with 402. **A
    request that then fails (error, 4xx/5xx, client gone) is NOT refunded: ARES has no
    refund endpoint.** When the POST cannot be made (ARES down, timeout) the request falls
    back to the ``"after"`` path: the check's failure policy applies and a served request
    is charged through the outbox afterwards.

    Args:
        tokens: where users' access tokens come from (default ``BearerTokenSource()``).
        client_id: your ARES client id (``client_id`` in usage POSTs); default the
            ``ARES_CLIENT_ID`` environment variable.
        base_url: the ARES API, default ``https://oauth.joinares.com``.
        prices: credits per unit by feature (``{"feature:video": 5}``); positive, at most
            3 decimals.
        default_price: credits per unit of any other feature (default 1).
        descriptions: the ``usage`` string sent per feature (default: the feature name),
            e.g. ``{"feature:video": "video generation"}``.
        charge: ``"after"`` or ``"before"`` (see above).
        token_memory_ttl: seconds a request's accepted token is remembered for delivery.
        failure_policy, feature_policy: as :class:`RemoteProvider`, per your features.
        **options: the rest of :class:`RemoteProvider`'s arguments (``client``,
            ``outbox``, ``cache_ttl``, ``deny_ttl``, ``cache_size``, ``timeout``, ...).
            ``feature_ttl`` is not supported: the cache holds one balance per user.

    Raises:
        ConfigurationError: no client id, a bad price, description or charge mode.
    """

    name = "ares"
    max_batch = 1
    #: Queued charges of one customer and feature go out summed, one report per window.
    aggregates = True
    #: No idempotency key reaches the provider: a resent charge may count twice.
    deduplicates = False
    #: ARES deducts on the POST itself: its balance includes a delivered charge at once.
    balance_lag = 0.0

    def __init__(
        self,
        *,
        tokens: TokenSource | None = None,
        client_id: str | None = None,
        base_url: str = "https://oauth.joinares.com",
        prices: Mapping[str, int | float | str | Decimal] | None = None,
        default_price: int | float | str | Decimal = 1,
        descriptions: Mapping[str, str] | None = None,
        charge: ChargeMode = "after",
        token_memory_ttl: float = 1800.0,
        failure_policy: FailurePolicy = "open",
        feature_policy: Mapping[str, FailurePolicy] | None = None,
        **options: Any,
    ) -> None:
        if "feature_ttl" in options:
            raise ConfigurationError(
                "AresProvider caches one credit balance per user, not per feature: "
                "use cache_ttl= instead of feature_ttl="
            )
        # The base sees one feature (the user's credits) and always fails open, so a
        # failed check holds the credits; the policy of *your* feature is applied here.
        super().__init__(
            failure_policy=failure_policy,
            feature_policy={CREDITS_FEATURE: "open"},
            **options,
        )
        self._feature_policies: dict[str, FailurePolicy] = {}
        for feature, policy in (feature_policy or {}).items():
            if policy not in ("open", "closed"):
                raise ConfigurationError(
                    f"feature_policy[{feature!r}] must be 'open' or 'closed', got {policy!r}"
                )
            self._feature_policies[check_feature(feature)] = policy
        cid = client_id if client_id is not None else os.environ.get("ARES_CLIENT_ID")
        if not cid:
            raise ConfigurationError(
                "AresProvider needs your ARES client id: set ARES_CLIENT_ID or pass client_id="
            )
        if charge not in ("after", "before"):
            raise ConfigurationError(f"charge must be 'after' or 'before', got {charge!r}")
        if not isinstance(base_url, str) or not base_url.startswith(("https://", "http://")):
            raise ConfigurationError(f"base_url must be an http(s) URL, got {base_url!r}")
        self.client_id = cid
        self.base_url = base_url.rstrip("/")
        self.charge: ChargeMode = charge
        self.tokens: TokenSource = tokens if tokens is not None else BearerTokenSource()
        self.default_price = _decimal(default_price, "default_price")
        self._prices = {
            check_feature(f): _decimal(p, f"prices[{f!r}]") for f, p in (prices or {}).items()
        }
        self._descriptions: dict[str, str] = {}
        for feature, text in (descriptions or {}).items():
            if not isinstance(text, str) or not text.strip():
                raise ConfigurationError(
                    f"descriptions[{feature!r}] must be a non-empty string, got {text!r}"
                )
            self._descriptions[check_feature(feature)] = text.strip()
        if CREDITS_FEATURE in self._prices or CREDITS_FEATURE in self._descriptions:
            raise ConfigurationError(f"{CREDITS_FEATURE} is reserved by AresProvider")
        if not token_memory_ttl > 0:
            raise ConfigurationError("token_memory_ttl must be > 0 seconds")
        size = options.get("cache_size", 10_000)
        # Latest token ARES accepted per customer (request-bound sources only); memory only.
        self._memory: TTLCache[str, AccessToken] = TTLCache(size, token_memory_ttl)
        # (customer, sha256(token)) pairs ARES has accepted: checked once per token.
        self._verified: TTLCache[tuple[str, bytes], bool] = TTLCache(size, token_memory_ttl)
        # A user read (or the failure) while checking a new token, handed to the fetch
        # that follows it: one check makes one call and takes at most one timeout.
        self._handoff: dict[str, tuple[AccessToken, AresUser | ProviderError, float]] = {}
        self._checks: dict[tuple[str, bytes], asyncio.Task[str | None]] = {}
        self._unit_milli: dict[str, int] = {}

    def __repr__(self) -> str:
        return (
            f"AresProvider(base_url={self.base_url!r}, charge={self.charge!r}, "
            f"tokens={self.tokens!r})"
        )

    # -- configuration helpers -------------------------------------------------------------

    def price(self, feature: str) -> Decimal:
        """Credits per unit of ``feature``."""
        return self._prices.get(feature, self.default_price)

    def credits_for(self, feature: str, units: int) -> int | float:
        """Credits ``units`` of ``feature`` cost, as sent in ``credits`` (int when whole)."""
        return _wire_number(self.price(feature) * units)

    def description(self, feature: str) -> str:
        """The ``usage`` string sent for ``feature``."""
        return self._descriptions.get(feature, feature)

    def policy(self, feature: str) -> FailurePolicy:
        """The failure policy of ``feature``."""
        return self._feature_policies.get(feature, self.failure_policy)

    def _milli(self, feature: str, units: int) -> int:
        """What ``units`` of ``feature`` cost in thousandths of a credit."""
        per_unit = self._unit_milli.get(feature)
        if per_unit is None:
            per_unit = self._unit_milli[feature] = int(self.price(feature) * _MILLI)
        return per_unit * units

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the HTTP client, delivery and the token source (inside the running loop)."""
        await super().open()
        await self.tokens.open()

    async def aclose(self) -> None:
        """Drain delivery (which still needs tokens), then close the token source."""
        checks = [t for t in self._checks.values() if not on_another_loop(t)]
        self._checks.clear()
        for task in checks:
            task.cancel()
        await asyncio.gather(*checks, return_exceptions=True)
        try:
            await super().aclose()
        finally:
            await self.tokens.aclose()

    # -- the wire -------------------------------------------------------------------------

    async def _send(
        self, method: str, path: str, token: AccessToken, json: object = None
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token.value}", "Accept": "application/json"}
        post = method != "GET"
        response = await send(
            self.http,
            method,
            self.base_url + path,
            what=f"ARES {method} {path}",
            max_body=self.max_body,
            # ARES has no idempotency key: a usage POST whose answer was lost is ambiguous.
            idempotent=not post,
            keep_oversized_success=post,
            headers=headers,
            json_body=json,
        )
        if status_kind(response.status_code) == "redirect":
            raise redirect_error(
                response, f"ARES {method} {path}", self.base_url, cap=self.max_retry_after
            )
        return response

    async def _get_user(self, token: AccessToken) -> AresUser:
        """``GET /v1/user`` (reference §2) -> the user and their credits."""
        response = await self._send("GET", "/v1/user", token)
        if not 200 <= response.status_code < 300:
            raise _ares_error(
                response, "refused GET /v1/user", token, self.base_url, self.max_retry_after
            )
        try:
            body = loads(response.content)
        except ValueError as exc:
            raise RetryableProviderError(
                "ARES answered GET /v1/user with a body that is not JSON (or has NaN/Infinity)",
                status=response.status_code,
                code="malformed_response",
                original_error=exc,
            ) from exc
        if not isinstance(body, dict):
            body = {}
        user = body.get("user")
        fields: dict[str, Any] = user if isinstance(user, dict) and "credits" in user else body
        credits = fields.get("credits")
        if not _number(credits):
            raise RetryableProviderError(
                "ARES answered GET /v1/user without a numeric 'credits'",
                status=response.status_code,
                code="malformed_response",
            )
        uid, email = fields.get("id"), fields.get("email")
        assert isinstance(credits, int | float)
        return AresUser(
            id=uid if isinstance(uid, str) else None,
            email=email if isinstance(email, str) else None,
            credits=credits,
        )

    async def _post_usage(self, token: AccessToken, feature: str, units: int) -> None:
        """``POST /v1/partner/usage`` (reference §3) for ``units`` of ``feature``."""
        body = {
            "client_id": self.client_id,
            "usage": self.description(feature),
            "credits": self.credits_for(feature, units),
        }
        response = await self._send("POST", "/v1/partner/usage", token, body)
        if not 200 <= response.status_code < 300:
            raise _ares_error(
                response, "refused the usage", token, self.base_url, self.max_retry_after
            )
        # A 2xx JSON object is a charge (§3: `{"message": "Success", "usage": {...}}`; the
        # message is only logged when missing); any other 2xx body is not ARES answering.
        error = charge_answer_error(response, "ARES POST /v1/partner/usage", self.base_url)
        if error is not None:
            raise error
        try:
            message = loads(response.content).get("message")
        except (ValueError, AttributeError):
            message = None
        if message != "Success":
            logger.debug("ARES usage answer %s without message 'Success'", response.status_code)

    # -- tokens ---------------------------------------------------------------------------

    async def _source(
        self, call: Callable[[], Awaitable[AccessToken | None]]
    ) -> AccessToken | None:
        try:
            return await call()
        except ProviderError:
            raise
        except Exception as exc:
            raise RetryableProviderError(
                f"ARES token source failed: {type(exc).__name__}", original_error=exc
            ) from exc

    async def _token(self, customer: str, scope: HTTPScope | None) -> AccessToken | None:
        """The token for a call: the source's, or (outside a request) the remembered one."""
        token = await self._source(lambda: self.tokens.get(customer, scope))
        if token is None and scope is None and self.tokens.request_bound:
            token = self._memory.get(customer)
        return token

    async def _replacement(
        self, customer: str, rejected: AccessToken, scope: HTTPScope | None
    ) -> AccessToken | None:
        """Another token after ``rejected`` was refused (one refresh), or ``None``."""
        if self._memory.get(customer) == rejected:
            del self._memory[customer]
        self._verified.pop((customer, _digest(rejected)), None)
        fresh = await self._source(lambda: self.tokens.refresh(customer, rejected, scope))
        if fresh is None and scope is None and self.tokens.request_bound:
            fresh = self._memory.get(customer)  # a newer token from a later request
        return None if fresh == rejected else fresh

    async def _with_token(
        self,
        customer: str,
        scope: HTTPScope | None,
        token: AccessToken,
        call: Callable[[AccessToken], Awaitable[_T]],
    ) -> tuple[_T, AccessToken]:
        """``call(token)``; on a refused token, once more with a replacement."""
        try:
            return await call(token), token
        except AresTokenError as exc:
            fresh = await self._replacement(customer, token, scope)
            if fresh is None:
                raise
            logger.info("ARES refused a user's token (%s); retrying with a refreshed one", exc.code)
            return await call(fresh), fresh

    def _accepted(self, customer: str, token: AccessToken, scope: HTTPScope | None) -> None:
        """ARES accepted ``token`` for ``customer``: trust it, remember it for delivery."""
        if self.tokens.request_bound:
            self._verified[(customer, _digest(token))] = True
            if scope is not None or customer not in self._memory:
                self._memory[customer] = token

    async def user(self, customer: str, *, scope: HTTPScope | None = None) -> AresUser:
        """The ARES user behind ``customer``'s token (``GET /v1/user``), uncached.

        Raises:
            ProviderError: no token (``code="no_token"``), ARES refused or unreachable.
        """
        token = await self._token(customer, scope)
        if token is None:
            raise AresTokenError(NO_TOKEN_REASON, code="no_token")
        user, used = await self._with_token(customer, scope, token, self._get_user)
        self._accepted(customer, used, scope)
        return user

    # -- RemoteProvider hooks -------------------------------------------------------------

    async def fetch(
        self, customer: str, feature: str, *, scope: HTTPScope | None = None
    ) -> Entitlement:
        """The user's credits from ``GET /v1/user``, in thousandths of a credit.

        Called by the cache for :data:`CREDITS_FEATURE`. No token, or a token ARES refuses
        after one refresh, is an entitlement of 0 with the reason.
        """
        token = await self._token(customer, scope)
        if token is None:
            return Entitlement(None, None, 0, reason=NO_TOKEN_REASON)
        handoff = self._handoff.pop(customer, None)
        if handoff is not None and handoff[0] == token and time.monotonic() - handoff[2] < 1.0:
            if isinstance(handoff[1], ProviderError):
                raise handoff[1]  # the token check just failed to reach ARES: no 2nd wait
            user = handoff[1]
        else:
            try:
                user, used = await self._with_token(customer, scope, token, self._get_user)
            except AresTokenError as exc:
                return Entitlement(None, None, 0, reason=_token_reason(exc))
            self._accepted(customer, used, scope)
        milli = math.floor(Decimal(str(user.credits)) * _MILLI)
        return Entitlement(None, None, int(milli), reason=_SHORT)

    async def send(self, events: Sequence[UsageEvent]) -> None:
        """``POST /v1/partner/usage`` for the one event (``max_batch = 1``). ARES cannot
        tell a duplicate: every delivered event counts (``None``).

        Raises:
            AresTokenError: no usable token for the user (code ``no_token``), or ARES
                refused it after one refresh.
            InsufficientCreditsError: the user cannot pay.
            PermanentProviderError: other 4xx, or a ``clobber`` event (ARES only deducts).
            RetryableProviderError: 5xx, 429, network errors, a failing token service, a 2xx
                whose body is not a JSON object (not ARES answering).
        """
        for event in events:
            if event.clobber:
                raise clobber_unsupported("ARES")
            if event.units == 0:
                continue
            token = await self._token(event.customer, None)
            if token is None:
                raise AresTokenError(
                    "no ARES access token for this user at delivery (the process restarted "
                    "or the token expired); replay with 'usage-middleware outbox retry' "
                    "after the user's next request",
                    code="no_token",
                )
            await self._with_token(event.customer, None, token, self._poster(event))

    def _poster(self, event: UsageEvent) -> Callable[[AccessToken], Awaitable[None]]:
        return lambda token: self._post_usage(token, event.feature, event.units)

    def charge_of(self, event: UsageEvent) -> Charge | None:
        """Local accounting is per user in thousandths of a credit: what ``event`` costs
        in :data:`CREDITS_FEATURE` (a clobber, which ARES refuses, costs nothing)."""
        if event.clobber or event.units <= 0 or event.feature == CREDITS_FEATURE:
            return None
        return (event.customer, CREDITS_FEATURE), self._milli(event.feature, event.units)

    # -- checks and reservations ----------------------------------------------------------

    def _translate(
        self, base: Answer, feature: str, units: int, *, ok: bool | None = None
    ) -> Answer:
        """Translate an answer about the user's credits into one about ``feature``."""
        remaining = base.remaining
        if remaining is not None and remaining < UNLIMITED:
            remaining = max(remaining, 0) // self._milli(feature, 1)
        reason = base.reason
        if reason == _SHORT:
            reason = (
                f"not enough ARES credits: this request costs "
                f"{self.credits_for(feature, units)} credit(s)"
            )
        return Answer(
            base.ok if ok is None else ok,
            base.customer,
            feature,
            units,
            remaining=remaining,
            err=base.err,
            reason=reason,
            cached=base.cached,
            age=base.age,
            retry_after=base.retry_after,
            provider=self,
        )

    def _refuse(self, customer: str, feature: str, units: int, reason: str) -> Answer:
        return Answer(False, customer, feature, units, remaining=0, reason=reason, provider=self)

    async def can(
        self, customer: str, feature: str, units: int = 1, *, scope: HTTPScope | None = None
    ) -> Answer:
        """Whether ``customer`` has the credits for ``units`` of ``feature`` (holds nothing).

        Never raises for a failed check: ``err`` is set and ``ok`` follows the feature's
        failure policy.
        """
        UsageEvent(customer, feature, units)  # validates all three
        base = await super().can(
            customer, CREDITS_FEATURE, self._milli(feature, units), scope=scope
        )
        if base.err is not None and self.policy(feature) == "closed":
            return self._closed(base, feature, units)
        return self._translate(base, feature, units)

    def _closed(self, base: Answer, feature: str, units: int) -> Answer:
        err = base.err
        after = err.retry_after if isinstance(err, ProviderError) else None
        return dataclasses.replace(
            self._translate(base, feature, units, ok=False), retry_after=max(1.0, after or 1.0)
        )

    async def reserve(
        self,
        customer: str,
        feature: str,
        units: int = 1,
        *,
        scope: HTTPScope | None = None,
        clobber: bool = False,
    ) -> Reservation:
        """Check and hold (``charge="after"``) or charge now (``charge="before"``).

        ``answer.ok`` False means nothing is held or charged: ``err`` None -> 402 (too few
        credits, no token, token refused), ``err`` set -> the check failed closed (503).
        """
        if clobber:
            raise clobber_refused(self)
        event = UsageEvent(customer, feature, units)  # validates all three
        if self.charge == "before":
            return await self._reserve_before(event, scope)
        return await self._reserve_after(event, scope)

    async def _reserve_after(self, event: UsageEvent, scope: HTTPScope | None) -> Reservation:
        customer, feature, units = event.customer, event.feature, event.units
        token: AccessToken | None = None
        if scope is not None and self.tokens.request_bound:
            try:
                token = await self.tokens.get(customer, scope)
            except Exception:
                token = None  # a failing callable: let the check fail and its policy decide
            else:
                if token is None:
                    return Reservation(
                        self._refuse(customer, feature, units, NO_TOKEN_REASON), event
                    )
                if (customer, _digest(token)) not in self._verified:
                    refused = await self._check_token(customer, token, scope)
                    if refused is not None:
                        refusal = self._refuse(customer, feature, units, refused)
                        return Reservation(refusal, event)
        held = await super().reserve(
            customer, CREDITS_FEATURE, self._milli(feature, units), scope=scope
        )
        self._handoff.pop(customer, None)
        answer = self._translate(held.answer, feature, units)
        if held.answer.err is not None and self.policy(feature) == "closed":
            await super().release(held)
            return Reservation(self._closed(held.answer, feature, units), event)
        return Reservation(answer, event, token=held.token)

    async def _check_token(
        self, customer: str, token: AccessToken, scope: HTTPScope | None
    ) -> str | None:
        """Check a request's token with ARES once before trusting it; the refusal reason.

        Concurrent checks of one new token share one ``GET /v1/user``.
        """
        key = (customer, _digest(token))
        if key in self._verified:
            return None
        task = self._checks.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._verify(customer, token, scope))
            self._checks[key] = task
            task.add_done_callback(functools.partial(self._check_done, key))
        return await asyncio.shield(task)

    def _check_done(self, key: tuple[str, bytes], task: asyncio.Task[str | None]) -> None:
        if self._checks.get(key) is task:
            del self._checks[key]

    async def _verify(
        self, customer: str, token: AccessToken, scope: HTTPScope | None
    ) -> str | None:
        try:
            async with asyncio.timeout(self.timeout):
                user, used = await self._with_token(customer, scope, token, self._get_user)
        except AresTokenError as exc:
            return _token_reason(exc)
        except Exception as exc:  # ARES unreachable: the check that follows fails (its policy)
            logger.debug("could not check a new ARES token", exc_info=True)
            # Unchecked, but the only token there is for delivering this user's charges.
            if self.tokens.request_bound and customer not in self._memory:
                self._memory[customer] = token
            # The fetch that follows fails with this at once instead of waiting again.
            failure = (
                exc
                if isinstance(exc, ProviderError)
                else RetryableProviderError(
                    f"ARES token check failed: {type(exc).__name__}"
                    + (f" after {self.timeout:g} s" if isinstance(exc, TimeoutError) else ""),
                    original_error=exc,
                )
            )
            self._handoff[customer] = (token, failure, time.monotonic())
            return None
        self._accepted(customer, used, scope)
        if used == token:
            self._handoff[customer] = (token, user, time.monotonic())
        return None

    async def _reserve_before(self, event: UsageEvent, scope: HTTPScope | None) -> Reservation:
        customer, feature, units = event.customer, event.feature, event.units
        if self.breaker.state == "open":
            return await self._reserve_after(event, scope)  # answers from the policy at once
        try:
            token = await self._token(customer, scope)
        except ProviderError:
            return await self._reserve_after(event, scope)
        if token is None:
            return Reservation(self._refuse(customer, feature, units, NO_TOKEN_REASON), event)
        credits = self.credits_for(feature, units)
        try:
            async with asyncio.timeout(self.timeout):
                _, used = await self._with_token(customer, scope, token, self._poster(event))
        except AresTokenError as exc:
            self.breaker.success()
            return Reservation(self._refuse(customer, feature, units, _token_reason(exc)), event)
        except InsufficientCreditsError:
            self.breaker.success()
            reason = f"not enough ARES credits: this request costs {credits} credit(s)"
            answer = dataclasses.replace(
                self._refuse(customer, feature, units, reason), remaining=None
            )
            return Reservation(answer, event)
        except PermanentProviderError as exc:
            self.breaker.success()
            logger.warning("ARES refused a usage charge for %s: %s", feature, exc)
            reason = f"ARES refused the charge: {exc.message}"
            return Reservation(self._refuse(customer, feature, units, reason), event)
        except (ProviderError, TimeoutError) as exc:
            self.breaker.failure()
            logger.warning(
                "ARES usage charge for %s failed (%s); checking and charging after the "
                "response instead",
                feature,
                exc if isinstance(exc, ProviderError) else "timeout",
            )
            return await self._reserve_after(event, scope)
        self.breaker.success()
        self._accepted(customer, used, scope)
        self.note_delivered([event])
        answer = Answer(True, customer, feature, units, provider=self)
        return Reservation(answer, event, token=_Paid(credits))

    def hold_units(self, feature: str, units: int) -> int:
        """Local accounting counts thousandths of a credit: what ``units`` of ``feature`` cost."""
        return self._milli(feature, units)

    async def commit(
        self, reservation: Reservation, *, units: int | None = None, overage: Overage = "cap"
    ) -> int:
        """Charge the actual ``units`` in credits (see :meth:`RemoteProvider.commit`).

        A ``charge="before"`` reservation was paid for the estimate when it was made:
        fewer units are not refunded (ARES has no refund endpoint; logged); more are
        charged as one more usage event under ``overage="charge"`` and not under
        ``"cap"`` (the estimate was all that was checked). Returns the units charged.
        """
        paid = reservation.token
        if not isinstance(paid, _Paid):
            # ARES refuses a usage its wallet cannot pay whole (402): the units the balance
            # covers go in one event, an overage beyond it in another (which ARES may refuse:
            # it then waits in the outbox's dead letters), so the covered part is never lost.
            if reservation.settled:
                return 0
            covered = await super().commit(reservation, units=units, overage="cap")
            actual = settle_units(reservation, units)
            if overage == "cap" or actual <= covered or self._delivery is None:
                return covered
            self._charge_extra(reservation, actual - covered)
            return actual
        if reservation.settled:
            return 0
        actual = settle_units(reservation, units)
        reservation.settled = True
        reserved = reservation.units
        if actual < reserved:
            logger.info(
                "%s: %s used %d of the %d unit(s) paid before the request; ARES has no refund "
                "endpoint, not refunded",
                self.name,
                reservation.feature,
                actual,
                reserved,
            )
        if actual <= reserved or overage == "cap" or self._delivery is None:
            return reserved
        self._charge_extra(reservation, actual - reserved)
        return actual

    async def prepare(
        self, reservation: Reservation, *, units: int | None = None, overage: Overage = "cap"
    ) -> None:
        """Write the charge the balance covers to the outbox (see :meth:`commit`)."""
        await super().prepare(reservation, units=units, overage="cap")

    def _charge_extra(self, reservation: Reservation, units: int) -> None:
        """Queue ``units`` more of the reservation's feature as their own usage event."""
        assert self._delivery is not None
        extra = UsageEvent(reservation.customer, reservation.feature, units)
        charge = self.charge_of(extra)
        if charge is not None:
            self._account(charge[0]).charge(self._clock(), charge[1])
        self._delivery.enqueue(extra)

    async def release(self, reservation: Reservation) -> None:
        """Give back a held reservation; a ``charge="before"`` one stays paid (no refund)."""
        paid = reservation.token
        if isinstance(paid, _Paid) and not reservation.settled:
            logger.info(
                "%s: request failed after ARES was charged %s credit(s) for %s; ARES has no "
                "refund endpoint, not refunded",
                self.name,
                paid.credits,
                reservation.feature,
            )
        await super().release(reservation)


def _digest(token: AccessToken) -> bytes:
    return hashlib.sha256(token.value.encode()).digest()


def _token_reason(exc: ProviderError) -> str:
    said = f" ({exc.code})" if exc.code else ""
    return f"ARES refused the user's access token{said}: sign in with ARES again"
