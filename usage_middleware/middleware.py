"""``UsageMiddleware``: charge a customer only for metered responses that reached them.

A pure ASGI middleware (no ``BaseHTTPMiddleware``). It does three things:

1. **Lifespan.** It opens the provider when the app receives ``lifespan.startup`` (so the
   app's own start-up code can use it) and closes it before forwarding
   ``lifespan.shutdown.complete``/``failed``. Every lifespan message is forwarded unchanged,
   except ``lifespan.startup.complete``, which becomes ``lifespan.startup.failed`` (with the
   reason) when the provider did not open or a ``@metered`` decorator is misplaced (see
   :mod:`usage_middleware.routes`); the app below is then shut down and the error raised
   (``TestClient`` raises it, uvicorn exits with it). Without a lifespan the provider opens
   on the first HTTP request, and again on the first request of each new event loop (it is
   closed and reopened there). The middleware does not close a provider when no lifespan
   arrives.
2. **Per-request state.** For each ``http`` request it puts one :class:`MeteringState` at
   ``scope["usage_middleware"]`` (:data:`SCOPE_KEY`). ``@metered`` finds it there, resolves
   the customer, reserves the units and records the reservations in it. If the key is
   already present (an outer ``UsageMiddleware``, e.g. around a mounted sub-app that has its
   own), this middleware passes the request through, so nothing is charged twice; the
   outermost middleware's provider and customer resolver apply.
3. **Settlement.** It wraps ``send`` (every message forwarded unchanged and unbuffered) and
   settles each reservation exactly once:

   * the final ``http.response.body`` (``more_body`` false) or ``http.response.pathsend``
     of a response whose status passes ``charge_if`` (2xx by default): ``provider.prepare``
     is awaited for every reservation just before that message is forwarded, and
     ``provider.commit`` after the app returns (an exception raised after the final body
     went out, e.g. by a background task, does not undo the charge);
   * anything else is released: a 4xx/5xx, an exception before or after the response
     started, a client disconnect (``http.disconnect`` seen, or ``send`` raising) before the
     final body was handed to the server, a cancelled request, a refused (402/401/503)
     request. A release for a disconnect is logged once at INFO ("client disconnected;
     not charged").

   A streaming response is charged once, at its end. ``commit``/``release`` errors are
   logged (logger ``usage_middleware``), never raised into the response.

   Servers drop ``send`` silently once the client is gone and a plain endpoint never calls
   ``receive``, so the middleware watches for ``http.disconnect`` itself while a metered
   request runs: it reads ``receive`` ahead of the app (at most one body chunk ahead; after
   the final body, only the disconnect) and hands every message it read to the app's own
   ``receive`` calls, in order (see :class:`MeteringState`). The request body is never
   buffered beyond that one chunk.

``websocket`` and other scopes pass through untouched.

**Free methods.** Requests whose method is in ``free_methods`` (default ``HEAD`` and
``OPTIONS``) are neither checked nor charged on metered routes: no customer is needed, the
endpoint runs unmetered. Starlette and FastAPI answer ``HEAD`` on a ``GET`` route by
running the ``GET`` handler and discarding its body, so a ``HEAD`` gets headers only and
nothing of value is given away (the handler's work is still done; meter ``HEAD`` with
``free_methods=()`` if that work is what you sell). Monitors and link checkers send
``HEAD``; charging them used up customers' quota.

``failure_policy`` covers provider exceptions the middleware itself sees (a provider that
raises from ``reserve`` or ``prepare`` instead of answering with ``Answer.err``):
``"closed"`` (default) refuses with 503 (``reserve``) or aborts the response before its
final body (``prepare``); ``"open"`` serves without charging that feature and logs an error.
Failed checks the provider reports in ``Answer.err`` follow the provider's own policy.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import problems
from ._utils import is_async_callable
from .errors import ConfigurationError
from .models import MAX_UNITS, Reservation
from .provider import FailurePolicy, Provider, ProviderState
from .routes import (
    clobber_endpoints,
    document_routes,
    install_openapi_hook,
    misplaced_endpoints,
)

if TYPE_CHECKING:
    from asgiref.typing import HTTPScope

    from .customers import CustomerResolver

__all__ = ["SCOPE_KEY", "MeteringState", "UsageMiddleware"]

#: The ASGI scope key under which the per-request :class:`MeteringState` travels.
SCOPE_KEY: Final = "usage_middleware"

#: ``Retry-After`` (seconds) for a 503 when neither the answer nor the error says.
DEFAULT_RETRY_AFTER: Final = 5.0

logger = logging.getLogger("usage_middleware")

_CUSTOMER_RE = re.compile(r"[^\s\x00-\x1f\x7f]{1,255}")
_METHOD_RE = re.compile(r"[A-Z0-9!#$%&'*+.^_`|~-]+")  # an RFC 9110 token, upper case


def _is_2xx(status: int) -> bool:
    return 200 <= status < 300


class UnitsSpec(Protocol):
    """One ``@metered`` feature as the middleware sees it (made by the decorator)."""

    @property
    def feature(self) -> str: ...

    @property
    def clobber(self) -> bool:
        """Whether the charge sets the period's usage (``@metered(..., clobber=True)``)."""

    @property
    def units(self) -> int:
        """The fixed units, used when :attr:`units_fn` is ``None``."""

    @property
    def units_fn(self) -> object | None:
        """The units callable, or ``None`` for fixed units."""

    async def units_for(self, request: Request) -> object:
        """What :attr:`units_fn` returns for this request (the middleware checks it)."""


class MeteringState:
    """Per-request metering state, at ``scope["usage_middleware"]``.

    Attributes:
        middleware: the :class:`UsageMiddleware` metering this request.
        reservations: reservations held for this request (``None`` until ``@metered``
            reserves); the middleware settles and clears them.
        status: the response status once ``http.response.start`` went out, else ``None``.
        denied: the request was refused (401/402/503); nothing is charged.
        disconnected: the client disconnected before the final body was handed to the
            server (``http.disconnect`` seen by the app or by the middleware's own watch).
        ended: the final body (or ``http.response.pathsend``) was handed to the server.
        charge: the final body of a chargeable response was sent after ``prepare``.

    It is also the ``receive`` the app sees (:meth:`receive`). Servers drop ``send``
    silently once the client is gone, and a plain endpoint never calls ``receive``, so
    without help the middleware would charge a client that gave up (a timeout) before the
    response was ready. Once the request holds reservations, :meth:`watch` (scheduled with
    ``call_soon``, so it runs when the request first yields to the event loop) starts a
    task that calls the server's ``receive`` and keeps each message it gets in a buffer
    that :meth:`receive` hands to the app first, in order: nothing is taken from the app.
    The task reads at most one body chunk ahead (then stops until the app has read the body
    to its end) and, after the final body, waits for ``http.disconnect``. A request that
    never yields to the event loop is not watched: the server cannot learn of a disconnect
    while it runs. Under an ASGI 2.4 server (``send`` raises ``OSError`` once the client
    is gone) nothing is watched: the final body's ``send`` tells.
    """

    __slots__ = (
        "_app_reading",
        "_buffer",
        "_error",
        "_handle",
        "_receive",
        "_started",
        "_task",
        "_waiter",
        "_wanted",
        "charge",
        "denied",
        "disconnected",
        "ended",
        "middleware",
        "reservations",
        "status",
    )

    def __init__(self, middleware: UsageMiddleware, receive: Receive | None = None) -> None:
        self.middleware = middleware
        self.reservations: list[Reservation] | None = None
        self.status: int | None = None
        self.denied = False
        self.disconnected = False
        self.ended = False
        self.charge = False
        self._receive = receive
        self._buffer: deque[Message] | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._waiter: asyncio.Future[None] | None = None
        self._app_reading = 0  # the app's own receive calls in flight
        self._wanted = False
        self._error: BaseException | None = None
        self._handle: asyncio.Handle | None = None

    async def receive(self) -> Message:
        """The app's ``receive``: messages read ahead first, then the server's own."""
        buffer = self._buffer
        while not buffer:
            if self._task is None:
                error = self._error
                if error is not None:
                    self._error = None
                    raise error
                self._app_reading += 1
                try:
                    message = await self._receive()  # type: ignore[misc]
                finally:
                    self._app_reading -= 1
                self._seen(message)
                if self._wanted and not _is_chunk(message):
                    self.watch()
                return message
            waiter = self._waiter
            if waiter is None or waiter.done():
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(waiter)  # the app's cancellation leaves the watch running
            buffer = self._buffer
        message = buffer.popleft()
        if self._wanted and not buffer and not _is_chunk(message):
            self.watch()
        return message

    def _seen(self, message: Message) -> None:
        if message["type"] == "http.disconnect" and not self.ended:
            self.disconnected = True

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def watch_soon(self) -> None:
        """Watch for a disconnect from the request's first yield to the event loop on."""
        if self._handle is None and self._receive is not None:
            self._handle = asyncio.get_running_loop().call_soon(self.watch)

    def watch(self) -> None:
        """Start watching for a disconnect, unless done, pointless, or the app is reading."""
        self._wanted = True
        if (
            self._task is not None
            or self._app_reading
            or self._error is not None
            or self.ended
            or self.disconnected
        ):
            return
        buffer = self._buffer
        if buffer and (buffer[-1]["type"] != "http.request" or _is_chunk(buffer[-1])):
            return  # a chunk waits for the app (or the input is over)
        self._started = False
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        self._started = True
        receive = self._receive
        assert receive is not None
        buffer = self._buffer
        if buffer is None:
            buffer = self._buffer = deque()
        try:
            while True:
                message = await receive()
                self._seen(message)
                buffer.append(message)
                self._wake()
                if message["type"] != "http.request" or _is_chunk(message):
                    return  # the input is over, or a chunk waits for the app to read it
        except Exception as exc:
            self._error = exc  # the app's next receive raises it
        finally:
            self._task = None
            self._wake()

    async def before_final_body(self) -> None:
        """Let a watch started in this loop turn take its first step (see its reads)."""
        if self._task is not None and not self._started:
            await asyncio.sleep(0)

    def close(self) -> None:
        """Stop watching: the request is over."""
        self._wanted = False
        handle = self._handle
        if handle is not None:
            handle.cancel()
        task = self._task
        if task is not None:
            self._task = None
            task.cancel()


class UsageMiddleware:
    """Meter ``@metered`` routes of ``app`` against ``provider`` (see the module docstring).

    Args:
        app: the ASGI app.
        provider: the billing provider; ``None`` builds a
            :class:`~usage_middleware.ledger.LocalLedger` with its defaults (``usage.db``).
            The middleware opens it (lifespan start-up or first request) and closes it at
            lifespan shutdown.
        customer: required; a sync or async callable of the request returning the customer
            id or ``None`` (see :mod:`usage_middleware.customers`).
        charge_if: ``status -> bool``: which final statuses are charged (default 2xx).
        failure_policy: ``"closed"`` or ``"open"``: what to do when ``reserve``/``prepare``
            raise (see the module docstring).
        free_methods: a set of upper-case HTTP method names that are neither checked nor
            charged on metered routes (see the module docstring); ``()`` meters them all.
        www_authenticate: the ``WWW-Authenticate`` challenge sent with every 401 (no or
            malformed customer), as RFC 9110 section 15.5.2 requires; e.g. ``"Bearer"``
            (default) or ``'Basic realm="api"'``. A non-empty single-line string.

    Raises:
        ConfigurationError: an argument is missing or of the wrong kind (the message names
            the fix).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        provider: Provider | None = None,
        customer: CustomerResolver | None = None,
        charge_if: Callable[[int], bool] = _is_2xx,
        failure_policy: FailurePolicy = "closed",
        free_methods: Collection[str] = frozenset({"HEAD", "OPTIONS"}),
        www_authenticate: str = "Bearer",
    ) -> None:
        if not callable(app):
            raise ConfigurationError(f"UsageMiddleware(app): app must be an ASGI app, got {app!r}")
        if customer is None:
            raise ConfigurationError(
                "UsageMiddleware needs customer=: a callable of the request returning the "
                "customer id, e.g. app.add_middleware(UsageMiddleware, "
                "customer=customer_from_user()) (from usage_middleware.customers)"
            )
        if not callable(customer):
            raise ConfigurationError(
                f"UsageMiddleware(customer=...) must be a callable of the request, got {customer!r}"
            )
        if not callable(charge_if):
            raise ConfigurationError(
                "UsageMiddleware(charge_if=...) must be a callable of the status code, "
                f"got {charge_if!r}"
            )
        if failure_policy not in ("open", "closed"):
            raise ConfigurationError(
                f"UsageMiddleware(failure_policy=...) must be 'open' or 'closed', "
                f"got {failure_policy!r}"
            )
        if (
            isinstance(free_methods, str | bytes)
            or not isinstance(free_methods, Collection)
            or not all(
                isinstance(m, str) and _METHOD_RE.fullmatch(m) is not None for m in free_methods
            )
        ):
            raise ConfigurationError(
                "UsageMiddleware(free_methods=...) must be a set of upper-case HTTP method "
                f"names such as {{'HEAD', 'OPTIONS'}}, or () to meter every method; "
                f"got {free_methods!r}"
            )
        if (
            not isinstance(www_authenticate, str)
            or not www_authenticate.strip()
            or any(c in www_authenticate for c in "\r\n\x00")
        ):
            raise ConfigurationError(
                "UsageMiddleware(www_authenticate=...) must be a non-empty single-line "
                f"challenge such as 'Bearer', got {www_authenticate!r}"
            )
        if provider is None:
            from .ledger.local import LocalLedger

            provider = LocalLedger()
        elif not isinstance(provider, Provider):
            raise ConfigurationError(
                "UsageMiddleware(provider=...) must be a usage_middleware Provider "
                f"(e.g. LocalLedger()), got {provider!r}"
            )
        self.app = app
        self.provider = provider
        self.customer = customer
        self.charge_if = charge_if
        self.failure_policy = failure_policy
        self.free_methods = frozenset(free_methods)
        self.www_authenticate = www_authenticate
        self._customer_is_async = is_async_callable(customer)
        self._open_loop: asyncio.AbstractEventLoop | None = None
        self._open_lock: asyncio.Lock | None = None
        self._open_lock_loop: asyncio.AbstractEventLoop | None = None
        self._routes_checked = False
        self._background: set[asyncio.Task[None]] = set()
        try:
            document_routes(app)
        except Exception:  # documentation is best effort; never break start-up
            logger.exception("usage_middleware: could not document metered routes")

    # -- ASGI entry ------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type != "http":
            if scope_type == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if SCOPE_KEY in scope:
            await self.app(scope, receive, send)
            return
        if not self._opened:
            await self._ensure_open()
        if not self._routes_checked:
            self._check_routes()

        state = MeteringState(self, receive)
        scope[SCOPE_KEY] = state
        charge_if = self.charge_if

        async def send_wrapper(message: Message) -> None:
            message_type = message["type"]
            if message_type == "http.response.start":
                state.status = message["status"]
            elif (
                message_type == "http.response.body" and not message.get("more_body", False)
            ) or message_type == "http.response.pathsend":
                if (
                    state.reservations
                    and not state.denied
                    and not state.charge
                    and state.status is not None
                    and charge_if(state.status)
                ):
                    await state.before_final_body()
                    # charged only if the client is still there when the final body goes
                    # to the server (which drops it silently otherwise)
                    if not state.disconnected and await self._prepare(state):
                        if not state.disconnected:
                            state.ended = True
                            try:
                                await send(message)
                            except OSError:  # an ASGI 2.4 server: the client is gone
                                state.disconnected = True
                                raise
                            state.charge = True
                            return
                state.ended = True
            await send(message)

        try:
            await self.app(scope, state.receive, send_wrapper)
        finally:
            state.close()
            if state.reservations:
                if state.disconnected and not state.charge and not state.denied:
                    logger.info(
                        "usage_middleware: client disconnected; not charged: %s",
                        _endpoint_name(scope),
                    )
                await self._settle(state, state.charge)

    # -- reservations (called by @metered) ---------------------------------------------------

    async def authorize(
        self, state: MeteringState, request: Request, specs: Sequence[UnitsSpec]
    ) -> Response | None:
        """Resolve the customer and reserve every feature of ``specs``, all or nothing.

        Returns ``None`` when the endpoint may run (the reservations are in ``state``), or
        the refusal to send instead: 401 (no or malformed customer), 402 (a feature was
        refused), 503 (a check failed closed), 400/500 (bad units, see
        :mod:`usage_middleware.decorator`). Holds taken before a refusal are released by
        the middleware after the refusal is sent. A request whose method is in
        ``free_methods`` returns ``None`` at once: nothing is checked or reserved.
        """
        if request.scope["method"] in self.free_methods:
            return None
        customer: Any = self.customer(request)
        if self._customer_is_async or (
            customer is not None
            and not isinstance(customer, str)
            and hasattr(customer, "__await__")
        ):
            customer = await customer
        if customer is None:
            state.denied = True
            return problems.customer_required(www_authenticate=self.www_authenticate)
        if not isinstance(customer, str) or _CUSTOMER_RE.fullmatch(customer) is None:
            state.denied = True
            return problems.customer_required(
                "the customer id of this request is malformed",
                www_authenticate=self.www_authenticate,
            )

        units_of: Sequence[int]
        if len(specs) == 1 and specs[0].units_fn is None:  # the common case, cheaply
            units_of = (specs[0].units,)
        else:
            units_of = []
            for spec in specs:
                if spec.units_fn is None:
                    units_of.append(spec.units)
                    continue
                units = await self._units(request, spec)
                if isinstance(units, Response):
                    state.denied = True
                    return units
                units_of.append(units)

        provider = self.provider
        scope: HTTPScope = request.scope  # type: ignore[assignment]
        for spec, units in zip(specs, units_of, strict=True):
            try:
                if getattr(spec, "clobber", False):
                    reservation = await provider.reserve(
                        customer, spec.feature, units, scope=scope, clobber=True
                    )
                else:
                    reservation = await provider.reserve(customer, spec.feature, units, scope=scope)
            except Exception as exc:
                if self.failure_policy == "open":
                    logger.exception(
                        "usage_middleware: reserve(%s, %s) raised; failing open, not charged",
                        customer,
                        spec.feature,
                    )
                    continue
                logger.exception(
                    "usage_middleware: reserve(%s, %s) raised; failing closed (503)",
                    customer,
                    spec.feature,
                )
                state.denied = True
                return problems.billing_unavailable(spec.feature, _retry_after(exc, None))
            if reservation.ok:
                if state.reservations is None:
                    state.reservations = [reservation]
                    if not _send_raises(scope):
                        state.watch_soon()  # from the route's first yield on
                else:
                    state.reservations.append(reservation)
                continue
            state.denied = True
            answer = reservation.answer
            if answer.err is not None:
                return problems.billing_unavailable(
                    spec.feature, _retry_after(answer.err, answer.retry_after)
                )
            return problems.quota_exceeded(answer, units)
        return None

    async def _units(self, request: Request, spec: UnitsSpec) -> int | Response:
        """The units ``spec``'s callable gives for ``request``, or the 400/500 to send."""
        feature = spec.feature
        try:
            value = await spec.units_for(request)
        except (ValueError, KeyError) as exc:
            logger.info(
                "usage_middleware: the units of %s for %s %s could not be determined: %r",
                feature,
                request.method,
                request.url.path,
                exc,
            )
            return problems.invalid_units(
                feature, "the units this request uses could not be determined from its input"
            )
        if isinstance(value, bool) or not isinstance(value, int):
            endpoint = _endpoint_name(request.scope)
            logger.error(
                "usage_middleware: the units function %r of @metered(%r) on %s returned %r "
                "(%s), not an int from 1 to MAX_UNITS; answering 500",
                spec.units_fn,
                feature,
                endpoint,
                value,
                type(value).__name__,
            )
            return problems.units_function_error(feature, endpoint, type(value).__name__)
        if not 0 < value <= MAX_UNITS:
            return problems.invalid_units(
                feature,
                f"this request would use {value} units; units must be from 1 to {MAX_UNITS}",
                units=value,
            )
        return value

    # -- settlement ---------------------------------------------------------------------------

    async def _prepare(self, state: MeteringState) -> bool:
        """``provider.prepare`` every reservation; whether the response may be charged."""
        reservations = state.reservations or ()
        try:
            for reservation in reservations:
                await self.provider.prepare(reservation)
        except Exception:
            if self.failure_policy == "closed":
                logger.exception(
                    "usage_middleware: prepare() raised; aborting the response before its end"
                )
                raise
            logger.exception("usage_middleware: prepare() raised; failing open, not charged")
            return False
        return True

    async def _settle(self, state: MeteringState, charge: bool) -> None:
        """Commit (``charge``) or release every reservation of ``state``, each once."""
        reservations = state.reservations or []
        state.reservations = None
        settle = self.provider.commit if charge else self.provider.release
        for index, reservation in enumerate(reservations):
            try:
                await settle(reservation)
            except asyncio.CancelledError:
                # Finish the rest outside this (cancelled) task; providers mark what they
                # already settled, so the interrupted one is not settled twice.
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
        async def finish() -> None:
            settle = self.provider.commit if charge else self.provider.release
            for reservation in reservations:
                if reservation.settled:
                    continue
                try:
                    await settle(reservation)
                except Exception:
                    logger.exception("usage_middleware: settling after cancellation failed")

        task = asyncio.get_running_loop().create_task(finish())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def _opened(self) -> bool:
        """Whether the provider was opened by this middleware on the running event loop."""
        loop = self._open_loop
        return loop is not None and loop is asyncio.get_running_loop()

    async def _ensure_open(self) -> None:
        """Open the provider on the running loop (once; concurrent callers wait).

        Opened on another loop before, without a lifespan to close it (pytest-asyncio runs
        each test on its own loop; ``TestClient`` without ``with`` uses one loop per
        request), the provider is closed and opened again here, so its loop-bound parts
        (clients, tasks, locks) belong to this loop.
        """
        loop = asyncio.get_running_loop()
        if self._open_lock is None or self._open_lock_loop is not loop:
            self._open_lock, self._open_lock_loop = asyncio.Lock(), loop
        async with self._open_lock:
            if self._opened:
                return
            provider = self.provider
            if self._open_loop is not None and provider.state is ProviderState.OPEN:
                logger.info(
                    "usage_middleware: %s was opened on another event loop; reopening it here",
                    type(provider).__name__,
                )
                try:
                    await provider.aclose()
                except Exception:
                    logger.exception("usage_middleware: closing the provider failed")
            await provider.open()
            self._open_loop = loop

    def _check_routes(self) -> None:
        """Raise ``ConfigurationError`` if a ``@metered`` decorator is misplaced."""
        misplaced = misplaced_endpoints(self.app)
        if misplaced:
            raise ConfigurationError(
                "@metered sits above the route decorator, so the registered endpoint is "
                "not metered: " + ", ".join(misplaced) + ". Put @metered(...) directly "
                "above the function, below @app.get(...)/@router.post(...)."
            )
        if not self.provider.supports_clobber:
            clobbering = clobber_endpoints(self.app)
            if clobbering:
                raise ConfigurationError(
                    f"@metered(..., clobber=True) on {', '.join(clobbering)} needs a provider "
                    f"that can set usage (TierProvider); {type(self.provider).__name__} only "
                    "adds. Drop clobber=True or change the provider."
                )
        try:
            document_routes(self.app)
            install_openapi_hook()
        except Exception:  # documentation is best effort; never break a request
            logger.exception("usage_middleware: could not document metered routes")
        self._routes_checked = True

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Open the provider at start-up, close it at shutdown (see the module docstring).

        When start-up fails here (the provider did not open, or a route check failed) the
        app below has already started: the server gets ``lifespan.startup.failed`` with the
        reason, the app below gets ``lifespan.shutdown`` (so its own shutdown code runs and
        it returns; its ``shutdown.complete`` is not forwarded), the provider is closed,
        and the error is raised, as Starlette's router does. So ``TestClient`` raises it
        and uvicorn exits with the message instead of waiting for ever.
        """
        startup_error: BaseException | None = None
        failure: BaseException | None = None  # startup.failed was sent in our name

        async def receive_wrapper() -> Message:
            nonlocal startup_error
            if failure is not None:
                return {"type": "lifespan.shutdown"}
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._ensure_open()
                except Exception as exc:
                    logger.exception("usage_middleware: the provider did not open")
                    startup_error = exc
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal failure
            message_type = message["type"]
            if failure is not None:
                return  # the app below shutting down after our startup.failed
            if message_type == "lifespan.startup.complete":
                error = startup_error
                if error is None:
                    try:
                        self._check_routes()
                    except ConfigurationError as exc:
                        error = exc
                if error is not None:
                    failure = error
                    await send(
                        {
                            "type": "lifespan.startup.failed",
                            "message": f"usage_middleware: {type(error).__name__}: {error}",
                        }
                    )
                    return
            elif message_type in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self._close_provider()
            await send(message)

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            if failure is not None:
                await self._close_provider()
        if failure is not None:
            raise failure

    async def _close_provider(self) -> None:
        try:
            await self.provider.aclose()
        except Exception:
            logger.exception("usage_middleware: closing the provider failed")
        self._open_loop = None


_SEND_RAISES: dict[str, bool] = {}


def _send_raises(scope: Any) -> bool:
    """Whether the server promises (ASGI spec 2.4+) that ``send`` raises ``OSError`` once
    the client is gone; then the final body's ``send`` tells, and no watch is needed."""
    asgi = scope.get("asgi")
    spec = asgi.get("spec_version", "2.0") if asgi else "2.0"
    raises = _SEND_RAISES.get(spec)
    if raises is None:
        try:
            major, minor = (int(part) for part in str(spec).split(".")[:2])
            raises = (major, minor) >= (2, 4)
        except ValueError:
            raises = False
        if len(_SEND_RAISES) < 16:
            _SEND_RAISES[spec] = raises
    return raises


def _is_chunk(message: Message) -> bool:
    """Whether ``message`` is a request body chunk that more chunks follow."""
    return message["type"] == "http.request" and bool(message.get("more_body", False))


def _endpoint_name(scope: Scope) -> str:
    """``module.qualname`` of the routed endpoint plus its method and route path."""
    endpoint = scope.get("endpoint")
    name = getattr(endpoint, "__qualname__", None) or repr(endpoint)
    module = getattr(endpoint, "__module__", None)
    if module:
        name = f"{module}.{name}"
    return f"{name} ({scope.get('method', '?')} {_route_path(scope)})"


def _route_path(scope: Scope) -> str:
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
