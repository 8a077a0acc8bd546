"""One request's metering: :class:`Meter` at ``scope["usage_middleware"]`` (:data:`SCOPE_KEY`).

:class:`~usage_middleware.UsageMiddleware` puts a :class:`Meter` in the scope of every HTTP
request (and of every websocket of an app with a metered websocket route); ``@metered``
and ``Metered`` (the FastAPI dependency) call :meth:`Meter.authorize` with their
:class:`MeteredFeature` specs (built by :func:`make_spec`); the middleware calls
:meth:`Meter.authorize_default` before routing (``default=``), :meth:`Meter.prepare` just
before a chargeable final body and :meth:`Meter.settle` when the request is over. See
``docs/architecture.md`` ("Edge").
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn, Protocol

from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import Response

from . import problems, telemetry
from ._utils import is_async_callable
from .errors import ConfigurationError
from .idempotency import MAX_BODY, KeyClaim, body_fingerprint, parse_idempotency_key
from .models import CUSTOMER_RE, MAX_UNITS, Reservation, check_feature
from .provider import Overage, Provider
from .routes import route_specs
from .units import ResponseUsage, UnitsMeter

if TYPE_CHECKING:
    from asgiref.typing import HTTPScope

    from .customers import CustomerResolver

__all__ = [
    "NORMAL_CLOSE_CODES",
    "SCOPE_KEY",
    "HoldWatcher",
    "Meter",
    "MeterConfig",
    "MeteredFeature",
    "ProviderErrorPolicy",
    "Refused",
    "UnitsFunction",
    "make_spec",
    "usage_of",
]

#: The ASGI scope key under which the per-request :class:`Meter` travels.
SCOPE_KEY: Final = "usage_middleware"

#: ``Retry-After`` (seconds) for a 503 when neither the answer nor the error says.
DEFAULT_RETRY_AFTER: Final = 5.0

#: What the middleware does when the provider *raises* from ``reserve``/``prepare``:
#: ``"closed"`` refuses (503, or the response is aborted before its final body),
#: ``"open"`` serves without charging that feature. (A failed check the provider answers
#: with ``Answer.err`` follows the provider's own ``failure_policy`` instead.)
ProviderErrorPolicy = Literal["open", "closed"]

#: Websocket close codes that end a connection normally (RFC 6455 section 7.4.1): 1000
#: normal closure and 1001 going away (a browser tab closed). A connection that ends with
#: any other code (1006 dropped, 1011 server error, 1008 policy, 1012 server restart,
#: application codes 3000-4999) is not charged, nor one closed without a code (1005):
#: uvicorn's wsproto server reports a dropped TCP connection as 1005 too.
NORMAL_CLOSE_CODES: Final = frozenset({1000, 1001})

logger = logging.getLogger("usage_middleware")


class UnitsFunction(Protocol):
    """``(request) -> int``, sync or async: the units one request uses (1 to MAX_UNITS).

    Raise ``ValueError`` (or ``KeyError``) for bad or missing client input: the request
    answers 400. Returning a non-int is a bug: 500.
    """

    def __call__(self, request: Request, /) -> int | Awaitable[int]: ...


class MeteredFeature:
    """One metered feature of an endpoint: what ``@metered(feature, units, ...)`` says.

    Args:
        feature: the feature name (validated by the caller).
        units: the estimate reserved: fixed units (an int, validated by the caller) or a
            :class:`UnitsFunction`.
        clobber: the charge sets the period's usage instead of adding to it.
        overage: see :data:`~usage_middleware.provider.Overage`.
        charge_partial: a request cut off (disconnect, error) is charged the units reported
            until then.
        units_from: where the actual units are read in the response, or ``None``.
    """

    __slots__ = (
        "charge_partial",
        "clobber",
        "feature",
        "overage",
        "units",
        "units_async",
        "units_fn",
        "units_from",
    )

    def __init__(
        self,
        feature: str,
        units: int | UnitsFunction,
        clobber: bool = False,
        *,
        overage: Overage = "cap",
        charge_partial: bool = False,
        units_from: ResponseUsage | None = None,
    ) -> None:
        self.feature = feature
        self.clobber = clobber
        self.overage: Overage = overage
        self.charge_partial = charge_partial
        self.units_from = units_from
        if callable(units):
            self.units = 0
            self.units_fn: UnitsFunction | None = units
            self.units_async = is_async_callable(units)
        else:
            self.units = units
            self.units_fn = None
            self.units_async = False

    def __repr__(self) -> str:
        units = self.units_fn if self.units_fn is not None else self.units
        return f"metered({self.feature!r}, units={units!r})"


def make_spec(
    feature: object,
    units: object = 1,
    clobber: object = False,
    *,
    where: str = "@metered",
    overage: object = "cap",
    charge_partial: object = False,
    units_from: object = None,
) -> MeteredFeature:
    """Validate the options once and build the :class:`MeteredFeature`.

    The one check behind ``@metered``, ``Metered`` (the FastAPI dependency) and
    ``UsageMiddleware(default=...)``; ``where`` names the caller in the error.

    Raises:
        ConfigurationError: a bad feature name (or a function where the name belongs),
            units that are not an int from 1 to ``MAX_UNITS`` or a callable of the request,
            a units callable that cannot take the request as its one positional argument,
            a non-bool ``clobber``; ``overage`` not ``"cap"``/``"charge"``, a non-bool
            ``charge_partial``, ``units_from`` not from ``usage_from_json``/``_sse``;
            ``clobber=True`` with any of those (clobber charges fixed units only).
    """
    if callable(feature):
        raise ConfigurationError(
            f'{where} needs a feature name: use {where}("feature:name") with parentheses, '
            f"not bare {where} on {getattr(feature, '__qualname__', feature)!r}"
        )
    check_feature(feature)
    assert isinstance(feature, str)
    if not callable(units) and (
        isinstance(units, bool) or not isinstance(units, int) or not 0 < units <= MAX_UNITS
    ):
        raise ConfigurationError(
            f"{where}({feature!r}, units={units!r}): units must be an int from 1 to "
            f"MAX_UNITS ({MAX_UNITS}) or a callable of the request returning one"
        )
    if callable(units):
        _check_units_callable(feature, units, where)
    if not isinstance(clobber, bool):
        raise ConfigurationError(f"{where}({feature!r}, clobber=...) must be a bool")
    if overage not in ("cap", "charge"):
        raise ConfigurationError(
            f"{where}({feature!r}, overage={overage!r}) must be 'cap' (charge at most what "
            "the budget still covers) or 'charge' (charge the actual units, the provider "
            "records the overage)"
        )
    if not isinstance(charge_partial, bool):
        raise ConfigurationError(f"{where}({feature!r}, charge_partial=...) must be a bool")
    if units_from is not None and not isinstance(units_from, ResponseUsage):
        raise ConfigurationError(
            f"{where}({feature!r}, units_from={units_from!r}) must be usage_from_json(...) "
            "or usage_from_sse(...) (from usage_middleware)"
        )
    if clobber and (units_from is not None or charge_partial or overage != "cap"):
        raise ConfigurationError(
            f"{where}({feature!r}, clobber=True) charges fixed units only: drop units_from=, "
            "charge_partial= and overage=, or drop clobber=True to charge the units the "
            "request actually used"
        )
    return MeteredFeature(
        feature,
        units,
        clobber,
        overage="charge" if overage == "charge" else "cap",
        charge_partial=charge_partial,
        units_from=units_from,
    )


def _check_units_callable(feature: str, units: Callable[..., Any], where: str) -> None:
    """Raise ``ConfigurationError`` unless ``units(request)`` is a valid call."""
    try:
        sig = inspect.signature(units)
    except (TypeError, ValueError):  # a builtin without a readable signature: trust it
        return
    try:
        sig.bind(None)
    except TypeError:
        raise ConfigurationError(
            f"{where}({feature!r}, units={units!r}): a units callable must accept exactly "
            f"one positional argument, the request, e.g. units=lambda request: "
            f"int(request.query_params['n']); its signature is {sig}"
        ) from None


class Refused(Exception):
    """A metered check refused a request outside an endpoint's return value.

    Raised by the FastAPI dependency form (and by ``@metered`` on a websocket endpoint);
    :class:`~usage_middleware.UsageMiddleware` catches it and sends :attr:`response` (a
    401/402/409/400/503 problem; on a websocket the handshake is denied with it, or
    closed with 1008). Nothing is held for a refused request.
    """

    def __init__(self, response: Response) -> None:
        super().__init__(f"refused with {response.status_code}")
        self.response = response


class MeterConfig:
    """What every request's :class:`Meter` shares; built once by the middleware.

    Attributes:
        provider: the billing provider.
        customer: the customer resolver.
        charge_if: ``status -> bool``, which final statuses are charged.
        on_provider_error: see :data:`ProviderErrorPolicy`.
        free_methods: methods neither checked nor charged.
        www_authenticate: the challenge sent with every 401.
        default: the features charged for an HTTP request no route-level metering covers
            (``UsageMiddleware(default=...)``), or ``()``.
        default_exclude: path prefixes the default does not apply to.
    """

    __slots__ = (
        "background",
        "charge_if",
        "customer",
        "customer_is_async",
        "default",
        "default_exclude",
        "free_methods",
        "on_provider_error",
        "provider",
        "www_authenticate",
    )

    def __init__(
        self,
        provider: Provider,
        customer: CustomerResolver,
        *,
        charge_if: Callable[[int], bool],
        on_provider_error: ProviderErrorPolicy,
        free_methods: frozenset[str],
        www_authenticate: str,
        default: tuple[MeteredFeature, ...] = (),
        default_exclude: tuple[str, ...] = (),
    ) -> None:
        self.provider = provider
        self.customer = customer
        self.customer_is_async = is_async_callable(customer)
        self.charge_if = charge_if
        self.on_provider_error = on_provider_error
        self.free_methods = free_methods
        self.www_authenticate = www_authenticate
        self.default = default
        self.default_exclude = default_exclude
        #: Settling tasks that outlive a cancelled request (kept referenced).
        self.background: set[asyncio.Task[None]] = set()

    def default_applies(self, scope: Any) -> bool:
        """Whether the ``default`` features meter this HTTP request (method and path)."""
        if not self.default or scope["method"] in self.free_methods:
            return False
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        for prefix in self.default_exclude:
            if path == prefix or path.startswith(prefix + "/"):
                return False
        return True


class HoldWatcher(Protocol):
    """What a :class:`Meter` tells when the request first holds units (the middleware's
    disconnect watch starts there)."""

    def watch_soon(self) -> None: ...


class Meter:
    """One request's metering: its holds, and whether they are charged or given back.

    Attributes:
        config: the middleware's :class:`MeterConfig`.
        reservations: the holds of this request (``None`` until :meth:`authorize` holds
            units); :meth:`settle` settles and clears them.
        status: the response status once ``http.response.start`` went out, else ``None``.
        denied: the request was refused (400/401/402/409/500/503); nothing is charged.
        charged: the final body of a chargeable response went out after :meth:`prepare`
            (a websocket: the connection ended normally).
        watcher: told (``watch_soon()``) when the first units are held, or ``None``.
        decided: the route-level specs decided so far (``None`` before the route's first
            check): the first check decides every feature of the route at once.
        default_holds: the holds of ``UsageMiddleware(default=...)`` taken before routing;
            released as soon as a route-level check covers the request.
        default_refusal: the default's refusal, deferred because the request's path is
            that of a metered route (see :meth:`authorize_default`).
        refusal: the refusal raised as :class:`Refused` (the middleware sends it).
        customer: the customer id once resolved.
        claim: ``(customer, route, key, fingerprint)`` of an ``Idempotency-Key`` this
            request claimed.
        replay: the request repeats a charged ``Idempotency-Key``: served, not charged.
        key_refused: the request was refused for its ``Idempotency-Key`` (400/409/413/422,
            or 503 when the claim failed closed): a refusal of ``default=`` that a route's
            own check never overrides (it would not claim the key again).
        features: the specs this request meters, by feature name (the route's, or the
            default's while it applies).
        usage: the request's :class:`~usage_middleware.units.UnitsMeter`, once asked for.
        readers: ``(feature, reader)`` reading the actual units in the response body
            (``units_from=``), from ``http.response.start`` on; ``None`` otherwise.
        reads: a feature of this request reads its units from the response.
    """

    __slots__ = (
        "charged",
        "claim",
        "config",
        "customer",
        "decided",
        "default_holds",
        "default_refusal",
        "denied",
        "features",
        "key_refused",
        "readers",
        "reads",
        "refusal",
        "replay",
        "reservations",
        "status",
        "usage",
        "watcher",
    )

    def __init__(self, config: MeterConfig, watcher: HoldWatcher | None = None) -> None:
        self.config = config
        self.watcher = watcher
        self.reservations: list[Reservation] | None = None
        self.status: int | None = None
        self.denied = False
        self.charged = False
        self.decided: tuple[MeteredFeature, ...] | None = None
        self.default_holds: list[Reservation] | None = None
        self.default_refusal: Response | None = None
        self.refusal: Response | None = None
        self.customer: str | None = None
        self.claim: tuple[str, str, str, str] | None = None
        self.replay = False
        self.key_refused = False
        self.features: dict[str, MeteredFeature] = _NO_FEATURES
        self.usage: UnitsMeter | None = None
        self.readers: list[tuple[str, Any]] | None = None
        self.reads = False

    # -- the actual units ----------------------------------------------------------------------

    def units_meter(self) -> UnitsMeter:
        """This request's :class:`~usage_middleware.units.UnitsMeter` (made on first use)."""
        usage = self.usage
        if usage is None:
            usage = self.usage = UnitsMeter(self._metered_features)
        return usage

    def _metered_features(self) -> dict[str, MeteredFeature]:
        return self.features

    def _note(self, specs: Sequence[MeteredFeature]) -> None:
        features = self.features
        if features is _NO_FEATURES:
            features = self.features = {}
        for spec in specs:
            features[spec.feature] = spec
            if spec.units_from is not None:
                self.reads = True

    def start_readers(self, headers: Any) -> None:
        """At ``http.response.start``: read the actual units of the ``units_from=``
        features in this response's body (when its content type is the one read)."""
        readers = None
        for name, spec in self.features.items():
            if spec.units_from is not None:
                reader = spec.units_from.reader(headers)
                if reader is not None:
                    readers = readers or []
                    readers.append((name, reader))
        self.readers = readers

    def feed_readers(self, chunk: bytes, final: bool) -> None:
        """A body chunk went by (``final``: the last): record the units found in it."""
        for name, reader in self.readers or ():
            try:
                units = reader.feed(chunk, final)
            except Exception:  # a reader must never break a response
                logger.exception("usage_middleware: reading the units of %s failed", name)
                continue
            if units is not None:
                self.units_meter().record(name, units)

    def _overage(self, reservation: Reservation) -> Overage:
        spec = self.features.get(reservation.feature)
        return "cap" if spec is None else spec.overage

    # -- before the endpoint -------------------------------------------------------------------

    async def authorize(
        self,
        request: HTTPConnection,
        features: Sequence[MeteredFeature],
        *,
        route: bool = True,
    ) -> Response | None:
        """Decide the route-level metering of this request: ``features`` and the rest.

        The route's first check (a ``Metered`` dependency or ``@metered``) decides every
        metered feature of the route at once (its ``Metered`` dependencies, then the
        endpoint's ``@metered`` features, see :func:`~usage_middleware.routes.route_specs`)
        with one all-or-nothing reservation; later checks of the same request find their
        features decided and return ``None``. The holds of the middleware's ``default=``
        are given back first: a covered route is not charged the default. (``route=False``:
        reserve ``features`` alone, as :meth:`authorize_default` does.)

        Resolves the customer and reserves every feature, all or nothing. Returns ``None``
        when the endpoint may run (the holds are in :attr:`reservations`), or the refusal
        to send instead: 401 (no or malformed customer), 402 (a feature was refused), 503
        (a check failed closed), 400/500 (bad units), 400 (a malformed
        ``Idempotency-Key``), 409 (an ``Idempotency-Key`` in use by a request in flight),
        422 (an ``Idempotency-Key`` used for another body), 413 (a body too long to
        fingerprint with an ``Idempotency-Key``).
        Holds taken before a refusal are released by :meth:`settle`. A request whose
        method is in ``free_methods`` returns ``None`` at once: nothing is checked or held.
        A request repeating a charged ``Idempotency-Key`` returns ``None`` holding nothing.
        """
        if route:
            decided = self.decided
            if decided is None:
                features = self.decided = route_specs(request.scope, tuple(features))
                if self.default_holds is not None or self.default_refusal is not None:
                    await self._uncover_default()
            else:
                features = tuple(feature for feature in features if feature not in decided)
                if not features:
                    return None
                self.decided = (*decided, *features)
        self._note(features)
        config = self.config
        scope = request.scope
        if scope.get("method") in config.free_methods or self.replay:
            return None
        customer: Any = self.customer
        if customer is None:
            customer = config.customer(request)  # type: ignore[arg-type]
            if config.customer_is_async or (
                customer is not None
                and not isinstance(customer, str)
                and hasattr(customer, "__await__")
            ):
                customer = await customer
            if customer is None:
                self.denied = True
                return problems.customer_required(www_authenticate=config.www_authenticate)
            if not isinstance(customer, str) or CUSTOMER_RE.fullmatch(customer) is None:
                self.denied = True
                return problems.customer_required(
                    "the customer id of this request is malformed",
                    www_authenticate=config.www_authenticate,
                )
            self.customer = customer
            if scope["type"] == "http":
                try:
                    key = parse_idempotency_key(scope["headers"])
                except ValueError as exc:
                    self.denied = self.key_refused = True
                    return problems.invalid_idempotency_key(str(exc))
                if key is not None:
                    refusal = await self._claim_key(customer, request, key)
                    if refusal is not None:
                        self.key_refused = True
                        return refusal
                    if self.replay:
                        return None

        units_of: Sequence[int]
        if len(features) == 1 and features[0].units_fn is None:  # the common case, cheaply
            units_of = (features[0].units,)
        else:
            units_of = []
            for feature in features:
                if feature.units_fn is None:
                    units_of.append(feature.units)
                    continue
                units = await _units(request, feature)
                if isinstance(units, Response):
                    self.denied = True
                    return units
                units_of.append(units)

        provider = config.provider
        http_scope: HTTPScope = scope  # type: ignore[assignment]
        for feature, units in zip(features, units_of, strict=True):
            started = time.perf_counter()
            try:
                if feature.clobber:
                    reservation = await provider.reserve(
                        customer, feature.feature, units, scope=http_scope, clobber=True
                    )
                else:
                    reservation = await provider.reserve(
                        customer, feature.feature, units, scope=http_scope
                    )
            except Exception as exc:
                telemetry.checked(feature.feature, _FAILED[config.on_provider_error], started)
                if config.on_provider_error == "open":
                    logger.exception(
                        "usage_middleware: reserve(%s, %s) raised; failing open, not charged",
                        customer,
                        feature.feature,
                    )
                    continue
                logger.exception(
                    "usage_middleware: reserve(%s, %s) raised; failing closed (503)",
                    customer,
                    feature.feature,
                )
                self.denied = True
                return problems.billing_unavailable(feature.feature, _retry_after(exc, None))
            telemetry.checked(feature.feature, _outcome(reservation), started)
            if reservation.ok:
                if self.reservations is None:
                    self.reservations = [reservation]
                    if self.watcher is not None:
                        self.watcher.watch_soon()
                else:
                    self.reservations.append(reservation)
                continue
            self.denied = True
            answer = reservation.answer
            if answer.err is not None:
                return problems.billing_unavailable(
                    feature.feature, _retry_after(answer.err, answer.retry_after)
                )
            return problems.quota_exceeded(answer, units)
        return None

    async def authorize_default(self, request: HTTPConnection, *, defer: bool) -> Response | None:
        """Reserve the middleware's ``default=`` features before routing (see
        :meth:`authorize`, which gives them back when the route meters itself).

        ``defer``: the request may be on a route that meters itself; a refusal is then
        kept in :attr:`default_refusal` instead of returned: a route-level check drops
        it, and the middleware sends it in place of the response otherwise. A refusal of
        the ``Idempotency-Key`` (claimed here, once per request) is returned at once: the
        route's own check would not see the key again.
        """
        refusal = await self.authorize(request, self.config.default, route=False)
        if self.reservations:
            self.default_holds = list(self.reservations)
        if refusal is not None and defer and not self.key_refused:
            self.default_refusal = refusal
            self.denied = False
            return None
        return refusal

    async def _uncover_default(self) -> None:
        self.default_refusal = None
        for spec in self.config.default:
            if self.features.get(spec.feature) is spec:
                del self.features[spec.feature]
        self.reads = any(spec.units_from is not None for spec in self.features.values())
        holds = self.default_holds
        if not holds:
            return
        self.default_holds = None
        reservations = self.reservations or []
        self.reservations = [r for r in reservations if r not in holds] or None
        provider = self.config.provider
        for reservation in holds:
            try:
                await provider.release(reservation)
                telemetry.settled(reservation.feature, reservation.units, False)
            except Exception:
                logger.exception("usage_middleware: releasing the default hold failed")

    async def _claim_key(self, customer: str, request: HTTPConnection, key: str) -> Response | None:
        """Claim the request's ``Idempotency-Key`` with its fingerprint (see
        ``idempotency.py``)."""
        scope = request.scope
        route = idempotency_route(scope)
        body = await _request_body(request)
        if isinstance(body, Response):
            self.denied = True
            return body
        if body is None:  # read by someone else and not kept: metered as without a key
            return None
        fingerprint = body_fingerprint(body)
        try:
            claim: KeyClaim = await self.config.provider.claim_key(
                customer, route, key, fingerprint=fingerprint
            )
        except Exception as exc:
            logger.exception("usage_middleware: claiming an Idempotency-Key failed")
            if self.config.on_provider_error == "open":
                return None  # metered as a request without a key
            self.denied = True
            return problems.billing_unavailable("idempotency", _retry_after(exc, None))
        if claim == "charged":
            self.replay = True  # served again, not charged again
            return None
        if claim == "busy":
            self.denied = True
            return problems.idempotency_key_in_use()
        if claim == "mismatch":  # another body: never served on this key's charge
            self.denied = True
            return problems.idempotency_key_reused()
        self.claim = (customer, route, key, fingerprint)
        return None

    def refuse(self, response: Response) -> NoReturn:
        """Raise :class:`Refused` for ``response`` (the middleware sends it)."""
        self.denied = True
        self.refusal = response
        raise Refused(response)

    # -- the final body ------------------------------------------------------------------------

    def chargeable(self) -> bool:
        """Whether the final body about to go out would be charged (holds, status ok)."""
        status = self.status
        return (
            bool(self.reservations)
            and not self.denied
            and not self.charged
            and status is not None
            and self.config.charge_if(status)
        )

    async def prepare(self) -> bool:
        """``provider.prepare`` every hold; whether the response may be charged.

        Raises what ``prepare`` raised under ``on_provider_error="closed"`` (the response
        is then aborted before its final body); ``"open"`` logs and returns ``False``.
        """
        prepare = self.config.provider.prepare
        usage = self.usage
        try:
            if usage is None:  # nothing reported: the estimate (no overage possible)
                for reservation in self.reservations or ():
                    await prepare(reservation, units=None, overage="cap")
            else:
                usage.frozen = True  # the units charged are decided now
                for reservation in self.reservations or ():
                    await prepare(
                        reservation,
                        units=usage.reported(reservation.feature),
                        overage=self._overage(reservation),
                    )
        except Exception:
            if self.config.on_provider_error == "closed":
                logger.exception(
                    "usage_middleware: prepare() raised; aborting the response before its end"
                )
                raise
            logger.exception("usage_middleware: prepare() raised; failing open, not charged")
            return False
        return True

    # -- after the response --------------------------------------------------------------------

    async def settle(self) -> None:
        """Commit (:attr:`charged`) or release every hold, each once; errors are logged.

        A charged request commits each hold with the units reported for its feature (the
        estimate when none were); one not charged releases them, except that a feature with
        ``charge_partial`` commits the units reported until then, if any. If the request is
        cancelled while settling, the rest is finished in a background task (providers mark
        what they settled, so nothing is settled twice).
        """
        reservations = self.reservations or []
        self.reservations = None
        charge = self.charged
        provider = self.config.provider
        claim = self.claim
        if claim is not None:
            self.claim = None
            try:
                # a partial charge leaves the key free: the client's retry, which wants
                # the whole response, is metered as a new request (never served free)
                await provider.finish_key(*claim[:3], charged=charge, fingerprint=claim[3])
            except Exception:
                logger.exception("usage_middleware: recording an Idempotency-Key failed")
        usage = self.usage
        if usage is None:  # nothing reported: commit the estimates or release (hot path)
            settle = provider.commit if charge else provider.release
            for index, reservation in enumerate(reservations):
                try:
                    await settle(reservation)
                    telemetry.settled(reservation.feature, reservation.units, charge)
                except asyncio.CancelledError:
                    rest = reservations[index:]
                    self._finish_later([(r, None if charge else -1, "cap") for r in rest])
                    raise
                except Exception:
                    logger.exception(
                        "usage_middleware: %s(%s, %s, %d units) failed",
                        "commit" if charge else "release",
                        reservation.customer,
                        reservation.feature,
                        reservation.units,
                    )
            return
        usage.frozen = True
        plan: list[tuple[Reservation, int | None, Overage]] = []
        for reservation in reservations:
            units = usage.reported(reservation.feature)
            if not charge:
                spec = self.features.get(reservation.feature)
                if spec is None or not spec.charge_partial or self.denied or not units:
                    units = -1  # released
            plan.append((reservation, units, self._overage(reservation)))
        for index, step in enumerate(plan):
            try:
                await _settle_one(provider, *step)
            except asyncio.CancelledError:
                self._finish_later(plan[index:])
                raise
            except Exception:
                reservation, units, _ = step
                logger.exception(
                    "usage_middleware: %s(%s, %s, %d units) failed",
                    "release" if units == -1 else "commit",
                    reservation.customer,
                    reservation.feature,
                    reservation.units if units is None or units < 0 else units,
                )

    def _finish_later(self, plan: list[tuple[Reservation, int | None, Overage]]) -> None:
        provider = self.config.provider

        async def finish() -> None:
            for step in plan:
                if step[0].settled:
                    continue
                try:
                    await _settle_one(provider, *step)
                except Exception:
                    logger.exception("usage_middleware: settling after cancellation failed")

        background = self.config.background
        task = asyncio.get_running_loop().create_task(finish())
        background.add(task)
        task.add_done_callback(background.discard)


async def _settle_one(
    provider: Provider, reservation: Reservation, units: int | None, overage: Overage
) -> None:
    """Release (``units == -1``) or commit one hold, and tell telemetry."""
    if units == -1:
        await provider.release(reservation)
        telemetry.settled(reservation.feature, reservation.units, False)
        return
    charged = await provider.commit(reservation, units=units, overage=overage)
    if not isinstance(charged, int):  # a provider written before commit returned units
        charged = reservation.units if units is None else units
    telemetry.settled(reservation.feature, charged, True)


def usage_of(connection: HTTPConnection) -> UnitsMeter:
    """The :class:`~usage_middleware.units.UnitsMeter` of this request (or websocket):
    report the units it actually used with ``.set(feature, units)``/``.add(...)``.

    A plain function of Starlette's ``Request``/``WebSocket``; in FastAPI declare a
    parameter ``usage: Usage`` (``Annotated[UnitsMeter, Depends(usage_of)]``).

    Raises:
        ConfigurationError: ``UsageMiddleware`` is not installed.
    """
    meter: Meter | None = connection.scope.get(SCOPE_KEY)
    if meter is None:
        raise ConfigurationError(
            "usage_of(request) needs UsageMiddleware: add "
            "app.add_middleware(UsageMiddleware, customer=...)"
        )
    return meter.units_meter()


#: ``Meter.features`` of a request nothing metered yet (shared, never written).
_NO_FEATURES: Final[dict[str, MeteredFeature]] = {}

_FAILED: Final = {"open": telemetry.FAILED_OPEN, "closed": telemetry.FAILED_CLOSED}


def _outcome(reservation: Reservation) -> str:
    """The check outcome of a reservation, for telemetry (never builds a lazy answer)."""
    if reservation.failed:
        return telemetry.FAILED_OPEN if reservation.ok else telemetry.FAILED_CLOSED
    return telemetry.ALLOWED if reservation.ok else telemetry.REFUSED


async def _units(request: HTTPConnection, feature: MeteredFeature) -> int | Response:
    """The units ``feature``'s callable gives for ``request``, or the 400/500 to send."""
    fn = feature.units_fn
    assert fn is not None
    try:
        value: Any = fn(request)  # type: ignore[arg-type]
        if feature.units_async or inspect.isawaitable(value):
            value = await value
    except (ValueError, KeyError) as exc:
        if isinstance(exc, ConfigurationError):
            raise  # a bad setting, not bad input (ConfigurationError is a ValueError)
        logger.info(
            "usage_middleware: the units of %s for %s %s could not be determined: %r",
            feature.feature,
            request.scope.get("method", "WEBSOCKET"),
            request.url.path,
            exc,
        )
        return problems.invalid_units(
            feature.feature,
            "the units this request uses could not be determined from its input",
        )
    if isinstance(value, bool) or not isinstance(value, int):
        endpoint = endpoint_name(request.scope)
        logger.error(
            "usage_middleware: the units function %r of @metered(%r) on %s returned %r "
            "(%s), not an int from 1 to MAX_UNITS; answering 500",
            fn,
            feature.feature,
            endpoint,
            value,
            type(value).__name__,
        )
        return problems.units_function_error(feature.feature, endpoint, type(value).__name__)
    if not 0 < value <= MAX_UNITS:
        return problems.invalid_units(
            feature.feature,
            f"this request would use {value} units; units must be from 1 to {MAX_UNITS}",
            units=value,
        )
    return value


async def _request_body(request: HTTPConnection) -> bytes | Response | None:
    """The body of a request with an ``Idempotency-Key``, kept on the ``Request`` (Starlette's
    own cache: the endpoint's ``await request.body()`` gets it); or the refusal: 413 beyond
    :data:`MAX_BODY` bytes, 400 when the client left mid-body. ``None``: the body was read
    already and not kept (a FastAPI form), so it cannot be fingerprinted (logged)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        return problems.idempotency_body_too_large(MAX_BODY)
    if not isinstance(request, Request):  # pragma: no cover - HTTP checks get a Request
        return None
    kept = request.__dict__.get("_body")
    if isinstance(kept, bytes):
        return kept if len(kept) <= MAX_BODY else problems.idempotency_body_too_large(MAX_BODY)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                return problems.idempotency_body_too_large(MAX_BODY)
            chunks.append(chunk)
    except ClientDisconnect:
        return problems.idempotency_body_too_large(MAX_BODY, ended=True)
    except RuntimeError:  # "Stream consumed": parsed (a form) without keeping the bytes
        logger.warning(
            "usage_middleware: the body of %s was read before its Idempotency-Key was "
            "claimed and not kept; metered as a request without the key",
            endpoint_name(request.scope),
        )
        return None
    body = request._body = b"".join(chunks)  # Starlette's cache of the body
    return body


def idempotency_route(scope: Any) -> str:
    """What an ``Idempotency-Key`` is scoped to besides the customer: method, path, query.

    The request's own path (below the server's root path) and a digest of its query, so a
    retry, which repeats the request, finds its key; ``/items/1`` and ``/items/2`` never
    share one, nor do ``?pages=1`` and ``?pages=9999`` (a reused key is no free pass).
    """
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    query: bytes = scope.get("query_string", b"")
    if query:
        path = f"{path}?{hashlib.sha256(query).hexdigest()[:32]}"
    return f"{scope['method']} {path}"


def endpoint_name(scope: Any) -> str:
    """``module.qualname`` of the routed endpoint plus its method and route path."""
    endpoint = scope.get("endpoint")
    name = getattr(endpoint, "__qualname__", None) or repr(endpoint)
    module = getattr(endpoint, "__module__", None)
    if module:
        name = f"{module}.{name}"
    return f"{name} ({scope.get('method', '?')} {_route_path(scope)})"


def _route_path(scope: Any) -> str:
    """The routed path template with its mount prefixes (``/a/items/{uid}``).

    Starlette records the innermost route in ``scope["route"]`` (newer versions), whose
    ``path`` is relative to its mount; each ``Mount`` appends its prefix to ``root_path``
    and keeps the server's own root path in ``app_root_path`` (set at the first mount, on
    every Starlette version we support), so the mount prefix is what lies between them.
    Without ``scope["route"]`` (older Starlette) this is the request's own path (which
    has every mount prefix) without the server's root path.
    """
    app_root_path = scope.get("app_root_path")
    root_path: str = scope.get("root_path", "")
    route_path = getattr(scope.get("route"), "path", None)
    if not isinstance(route_path, str):
        path: str = scope.get("path", "?")
        server_root = root_path if app_root_path is None else app_root_path
        if server_root and path.startswith(server_root):
            path = path[len(server_root) :]
        return path
    if app_root_path is None:  # no Mount on the way: root_path is the server's own
        return route_path
    if root_path.startswith(app_root_path):
        root_path = root_path[len(app_root_path) :]
    return root_path.rstrip("/") + route_path


def _retry_after(err: BaseException | None, retry_after: float | None) -> float:
    if retry_after is not None:
        return retry_after
    from_error = getattr(err, "retry_after", None)
    if isinstance(from_error, int | float):
        return float(from_error)
    return DEFAULT_RETRY_AFTER
