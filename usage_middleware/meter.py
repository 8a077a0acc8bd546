"""One request's metering: :class:`Meter` at ``scope["usage_middleware"]`` (:data:`SCOPE_KEY`).

:class:`~usage_middleware.UsageMiddleware` puts a :class:`Meter` in the scope of every HTTP
request; ``@metered`` calls :meth:`Meter.authorize` with its :class:`MeteredFeature` specs;
the middleware calls :meth:`Meter.prepare` just before a chargeable final body and
:meth:`Meter.settle` when the request is over. See ``docs/architecture.md`` ("Edge").
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from starlette.requests import Request
from starlette.responses import Response

from . import problems, telemetry
from ._utils import is_async_callable
from .errors import ConfigurationError
from .models import CUSTOMER_RE, MAX_UNITS, Reservation
from .provider import Provider

if TYPE_CHECKING:
    from asgiref.typing import HTTPScope

    from .customers import CustomerResolver

__all__ = [
    "SCOPE_KEY",
    "HoldWatcher",
    "Meter",
    "MeterConfig",
    "MeteredFeature",
    "ProviderErrorPolicy",
    "UnitsFunction",
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

logger = logging.getLogger("usage_middleware")


class UnitsFunction(Protocol):
    """``(request) -> int``, sync or async: the units one request uses (1 to MAX_UNITS).

    Raise ``ValueError`` (or ``KeyError``) for bad or missing client input: the request
    answers 400. Returning a non-int is a bug: 500.
    """

    def __call__(self, request: Request, /) -> int | Awaitable[int]: ...


class MeteredFeature:
    """One metered feature of an endpoint: what ``@metered(feature, units, clobber=)`` says.

    Args:
        feature: the feature name (validated by the caller).
        units: fixed units (an int, validated by the caller) or a :class:`UnitsFunction`.
        clobber: the charge sets the period's usage instead of adding to it.
    """

    __slots__ = ("clobber", "feature", "units", "units_async", "units_fn")

    def __init__(self, feature: str, units: int | UnitsFunction, clobber: bool = False) -> None:
        self.feature = feature
        self.clobber = clobber
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


class MeterConfig:
    """What every request's :class:`Meter` shares; built once by the middleware.

    Attributes:
        provider: the billing provider.
        customer: the customer resolver.
        charge_if: ``status -> bool``, which final statuses are charged.
        on_provider_error: see :data:`ProviderErrorPolicy`.
        free_methods: methods neither checked nor charged.
        www_authenticate: the challenge sent with every 401.
    """

    __slots__ = (
        "background",
        "charge_if",
        "customer",
        "customer_is_async",
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
    ) -> None:
        self.provider = provider
        self.customer = customer
        self.customer_is_async = is_async_callable(customer)
        self.charge_if = charge_if
        self.on_provider_error = on_provider_error
        self.free_methods = free_methods
        self.www_authenticate = www_authenticate
        #: Settling tasks that outlive a cancelled request (kept referenced).
        self.background: set[asyncio.Task[None]] = set()


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
        denied: the request was refused (400/401/402/500/503); nothing is charged.
        charged: the final body of a chargeable response went out after :meth:`prepare`.
        watcher: told (``watch_soon()``) when the first units are held, or ``None``.
    """

    __slots__ = ("charged", "config", "denied", "reservations", "status", "watcher")

    def __init__(self, config: MeterConfig, watcher: HoldWatcher | None = None) -> None:
        self.config = config
        self.watcher = watcher
        self.reservations: list[Reservation] | None = None
        self.status: int | None = None
        self.denied = False
        self.charged = False

    # -- before the endpoint -------------------------------------------------------------------

    async def authorize(
        self, request: Request, features: Sequence[MeteredFeature]
    ) -> Response | None:
        """Resolve the customer and reserve every feature of ``features``, all or nothing.

        Returns ``None`` when the endpoint may run (the holds are in :attr:`reservations`),
        or the refusal to send instead: 401 (no or malformed customer), 402 (a feature was
        refused), 503 (a check failed closed), 400/500 (bad units). Holds taken before a
        refusal are released by :meth:`settle`. A request whose method is in
        ``free_methods`` returns ``None`` at once: nothing is checked or held.
        """
        config = self.config
        if request.scope["method"] in config.free_methods:
            return None
        customer: Any = config.customer(request)
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
        scope: HTTPScope = request.scope  # type: ignore[assignment]
        for feature, units in zip(features, units_of, strict=True):
            started = time.perf_counter()
            try:
                if feature.clobber:
                    reservation = await provider.reserve(
                        customer, feature.feature, units, scope=scope, clobber=True
                    )
                else:
                    reservation = await provider.reserve(
                        customer, feature.feature, units, scope=scope
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
        try:
            for reservation in self.reservations or ():
                await prepare(reservation)
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

        If the request is cancelled while settling, the rest is finished in a background
        task (providers mark what they settled, so nothing is settled twice).
        """
        reservations = self.reservations or []
        self.reservations = None
        charge = self.charged
        provider = self.config.provider
        settle = provider.commit if charge else provider.release
        for index, reservation in enumerate(reservations):
            try:
                await settle(reservation)
                telemetry.settled(reservation.feature, reservation.units, charge)
            except asyncio.CancelledError:
                self._finish_later(reservations[index:], charge)
                raise
            except Exception:
                logger.exception(
                    "usage_middleware: %s(%s, %s, %d units) failed",
                    "commit" if charge else "release",
                    reservation.customer,
                    reservation.feature,
                    reservation.units,
                )

    def _finish_later(self, reservations: list[Reservation], charge: bool) -> None:
        provider = self.config.provider
        settle = provider.commit if charge else provider.release

        async def finish() -> None:
            for reservation in reservations:
                if reservation.settled:
                    continue
                try:
                    await settle(reservation)
                    telemetry.settled(reservation.feature, reservation.units, charge)
                except Exception:
                    logger.exception("usage_middleware: settling after cancellation failed")

        background = self.config.background
        task = asyncio.get_running_loop().create_task(finish())
        background.add(task)
        task.add_done_callback(background.discard)


_FAILED: Final = {"open": telemetry.FAILED_OPEN, "closed": telemetry.FAILED_CLOSED}


def _outcome(reservation: Reservation) -> str:
    """The check outcome of a reservation, for telemetry (never builds a lazy answer)."""
    if reservation.failed:
        return telemetry.FAILED_OPEN if reservation.ok else telemetry.FAILED_CLOSED
    return telemetry.ALLOWED if reservation.ok else telemetry.REFUSED


async def _units(request: Request, feature: MeteredFeature) -> int | Response:
    """The units ``feature``'s callable gives for ``request``, or the 400/500 to send."""
    fn = feature.units_fn
    assert fn is not None
    try:
        value: Any = fn(request)
        if feature.units_async or inspect.isawaitable(value):
            value = await value
    except (ValueError, KeyError) as exc:
        if isinstance(exc, ConfigurationError):
            raise  # a bad setting, not bad input (ConfigurationError is a ValueError)
        logger.info(
            "usage_middleware: the units of %s for %s %s could not be determined: %r",
            feature.feature,
            request.method,
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
