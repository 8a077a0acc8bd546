"""``UsageMiddleware``: charge a customer only for metered responses that reached them.

::

    app.add_middleware(UsageMiddleware, provider=LocalLedger(), customer=customer_from_user())

A pure ASGI middleware. For every ``http`` request it puts a
:class:`~usage_middleware.meter.Meter` at ``scope["usage_middleware"]``; ``@metered``
reserves through it, and the middleware charges the holds once the final body of a
response that passes ``charge_if`` (2xx by default) was handed to the server, and gives
them back otherwise (an error, a 4xx/5xx, a refusal, a client that disconnected first).
A streaming response is charged once, at its end. A metered ``websocket`` connection is
charged when it ends normally (see :class:`UsageMiddleware`); other scopes pass through
untouched; a request that already carries a meter (an outer ``UsageMiddleware``) passes
through, so nothing is charged twice.

The provider is opened at lifespan start-up (or on the first request without a lifespan)
and closed at shutdown; a provider that does not open, or a misplaced ``@metered``, fails
start-up with the reason. How a request travels, the disconnect watch and the lifespan
handling are described in ``docs/architecture.md`` ("Edge: one request's path").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import types
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Coroutine
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ConfigurationError
from .meter import (
    NORMAL_CLOSE_CODES,
    SCOPE_KEY,
    Meter,
    MeterConfig,
    MeteredFeature,
    ProviderErrorPolicy,
    Refused,
    UnitsFunction,
    endpoint_name,
    make_spec,
)
from .provider import Provider, ProviderState
from .routes import (
    SPECS_ATTR,
    clobber_endpoints,
    covered_paths,
    document_routes,
    install_openapi_hook,
    is_metered_dependency,
    meters_websockets,
    misplaced_endpoints,
)

if TYPE_CHECKING:
    from .customers import CustomerResolver
    from .dependency import Metered

__all__ = ["SCOPE_KEY", "UsageMiddleware"]

logger = logging.getLogger("usage_middleware")

_METHOD_RE = re.compile(r"[A-Z0-9!#$%&'*+.^_`|~-]+")  # an RFC 9110 token, upper case

#: Paths ``default=`` does not meter unless ``default_exclude=`` says otherwise: a health
#: check and FastAPI's documentation pages (each with everything below it).
DEFAULT_EXCLUDE: tuple[str, ...] = ("/health", "/docs", "/redoc", "/openapi.json")

#: The most bytes of a websocket close reason (RFC 6455: 125 bytes of payload, 2 for the code).
_MAX_REASON = 123


def _is_2xx(status: int) -> bool:
    return 200 <= status < 300


class _ReceiveWatch:
    """One request's ``receive`` as the app sees it, watching for a client disconnect.

    Attributes:
        disconnected: the client disconnected before the final body was handed to the
            server (``http.disconnect`` seen by the app or by the watch).
        ended: the final body (or ``http.response.pathsend``) was handed to the server.

    Once the request holds units (:meth:`watch_soon`), a task reads the server's
    ``receive`` ahead of the app (at most one body chunk; after the final body only
    ``http.disconnect``) and hands every message it read to the app's own :meth:`receive`
    calls, in order; a request that reaches its final body without having yielded since
    the hold has no task: :meth:`before_final_body` asks the server without waiting. See
    ``docs/architecture.md`` ("The disconnect watch").
    """

    __slots__ = (
        "_app_reading",
        "_buffer",
        "_error",
        "_handle",
        "_peeked",
        "_quiet",
        "_receive",
        "_started",
        "_task",
        "_waiter",
        "_wanted",
        "disconnected",
        "ended",
    )

    def __init__(self, receive: Receive) -> None:
        self.disconnected = False
        self.ended = False
        self._receive = receive
        self._buffer: deque[Message] | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._waiter: asyncio.Future[None] | None = None
        self._app_reading = 0  # the app's own receive calls in flight
        self._wanted = False
        self._error: BaseException | None = None
        self._handle: asyncio.Handle | None = None
        self._quiet = False  # units held, and no event-loop turn since: no watch yet
        self._peeked = False  # what the server knew was read since the hold (while quiet)

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
                    message = await self._receive()
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

    def give_back(self, body: bytes) -> None:
        """Hand ``body``, read whole before the app ran (an ``Idempotency-Key``'s
        fingerprint), to the app's first :meth:`receive`."""
        if self._buffer is None:
            self._buffer = deque()
        self._buffer.appendleft({"type": "http.request", "body": body, "more_body": False})

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
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_soon(self._turned)
            self._quiet = True

    def _turned(self) -> None:
        """The event loop turned since the hold: the server may learn of a disconnect now."""
        self._quiet = False
        self.watch()

    def watch(self) -> None:
        """Start watching for a disconnect, unless done, pointless, or the app is reading."""
        self._wanted = True
        if not self._may_read():
            return
        self._started = False
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _may_read(self) -> bool:
        """Whether the watch may read the server's ``receive`` now: no watch running, the
        app not reading, nothing ended or failed, and no chunk waiting for the app (nor the
        input over)."""
        if (
            self._task is not None
            or self._app_reading
            or self._error is not None
            or self.ended
            or self.disconnected
        ):
            return False
        buffer = self._buffer
        return not (buffer and (buffer[-1]["type"] != "http.request" or _is_chunk(buffer[-1])))

    async def _run(self) -> None:
        self._started = True
        receive = self._receive
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

    def before_final_body(self) -> bool:
        """Learn what the server knows before the final body is judged (and again after
        ``prepare``, which may have waited); whether to wait one loop turn first.

        A request that has not yielded to the event loop since its units were held (a slow
        dependency or units callable ran *before* the hold, then the endpoint returned
        without awaiting) has no watch: the server's ``receive`` is asked once, without
        waiting (:meth:`_peek`), so a disconnect the server already knows of (uvicorn's
        ``receive`` answers ``http.disconnect`` at once) is seen before the charge. As long
        as the loop does not turn, the server learns nothing new, so that answer holds. A
        watch that was started but has not taken its first step gets one loop turn (the
        caller awaits it when this returns ``True``).
        """
        if self._quiet:
            if not self._peeked:
                self._peeked = True
                self._peek()
            return False
        return self._task is not None and not self._started

    def _peek(self) -> None:
        """Read, as the watch would, what the server's ``receive`` answers without waiting.

        Each ``receive`` call is stepped by hand in this task, as an eagerly started task
        would be (a bare yield, such as a checkpoint, is stepped over); a message it answers
        at once is kept for the app, a disconnect marks the request, an error goes to the
        app's next ``receive``; a call that would wait is cancelled where it waits, as the
        watch task is cancelled at the end of a request.
        """
        for _ in range(_PEEK_READS):
            if not self._may_read():
                return
            call = self._receive()
            if type(call) is not types.CoroutineType:
                call = _awaiting(call)
            try:
                waits_on = call.send(None)
                for _ in range(_PEEK_STEPS):
                    if waits_on is not None:
                        break
                    waits_on = call.send(None)  # a bare yield: nothing to wait for
            except StopIteration as answered:
                message: Message = answered.value
            except Exception as exc:
                self._error = exc  # the app's next receive raises it
                return
            else:
                _cancel_call(call, waits_on)
                return
            self._seen(message)
            buffer = self._buffer
            if buffer is None:
                buffer = self._buffer = deque()
            buffer.append(message)

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
    """Meter ``@metered`` routes of ``app`` against ``provider``.

    Args:
        app: the ASGI app.
        provider: the billing provider; ``None`` builds a
            :class:`~usage_middleware.ledger.LocalLedger` with its defaults (``usage.db``).
            The middleware opens it (lifespan start-up or first request) and closes it at
            lifespan shutdown.
        customer: required; a sync or async callable of the request returning the customer
            id or ``None`` (see :mod:`usage_middleware.customers`).
        charge_if: ``status -> bool``: which final statuses are charged (default 2xx).
        on_provider_error: ``"closed"`` (default) or ``"open"``: what to do when the
            provider *raises* from ``reserve`` or ``prepare`` (a bug, or a backend that
            fails without answering): ``"closed"`` answers 503 (``reserve``) or aborts the
            response before its final body (``prepare``); ``"open"`` serves without
            charging that feature and logs an error. Not to be confused with a provider's
            own ``failure_policy``, which covers an entitlement check that *failed* (the
            provider answers with ``Answer.err``) and whose default is the provider's.
        failure_policy: the former name of ``on_provider_error``, still accepted.
        free_methods: a set of upper-case HTTP method names that are neither checked nor
            charged on metered routes (default ``HEAD`` and ``OPTIONS``: no customer is
            needed, the endpoint runs unmetered); ``()`` meters them all.
        www_authenticate: the ``WWW-Authenticate`` challenge sent with every 401 (no or
            malformed customer), as RFC 9110 section 15.5.2 requires; e.g. ``"Bearer"``
            (default) or ``'Basic realm="api"'``. A non-empty single-line string.
        default: meter every HTTP request that no route-level metering covers: a feature
            name (1 unit), ``(feature, units)`` with units an int or a units callable
            of the request, or a ``Metered(feature, units=...)``. It is reserved before
            routing, for every request whose path is not excluded and whose method is not
            free, so every such request needs a
            customer (401 without one) and the default's units (402), also one that
            then answers 404 (not charged: not 2xx). On a route metered by ``@metered``
            or ``Metered`` the default hold is given back when the route's own check
            runs: the route is charged its own features, never the default as well, and
            a refused default does not refuse it (on a request whose method and path are
            those of a metered route, found by the start-up route walk, the default's
            refusal waits for the route's check). ``None`` (the default): off.
        default_exclude: path prefixes ``default`` does not apply to (each the path and
            everything below it: ``"/docs"`` covers ``/docs/oauth2-redirect``, not
            ``/docsx``), relative to the app's root path; default :data:`DEFAULT_EXCLUDE`.

    Websockets: a ``@metered`` (or ``Metered``) websocket route holds its units when the
    connection arrives. Refused, the handshake is denied with the problem response where
    the server offers the ASGI ``websocket.http.response`` extension (uvicorn does), else
    the connection is accepted and closed at once with code 1008 and the problem's title
    and detail as reason. A connection is charged once, when it ends normally: the app or
    the client closed it with a code of :data:`~usage_middleware.meter.NORMAL_CLOSE_CODES`
    (1000, 1001), or the app returned after accepting without closing (the middleware
    then closes it with 1000). A connection that is dropped (1006), closed with another
    code or without one (1005), or whose app raised before any close, is not charged;
    neither is one never accepted.

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
        on_provider_error: ProviderErrorPolicy | None = None,
        failure_policy: ProviderErrorPolicy | None = None,
        free_methods: Collection[str] = frozenset({"HEAD", "OPTIONS"}),
        www_authenticate: str = "Bearer",
        default: str | tuple[str, int | UnitsFunction] | Metered | None = None,
        default_exclude: Collection[str] = DEFAULT_EXCLUDE,
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
        policy = _provider_error_policy(on_provider_error, failure_policy)
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
        default_specs = _default_specs(default)
        exclude = _default_exclude(default_exclude)
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
        #: What every request's :class:`~usage_middleware.meter.Meter` shares.
        self.config = MeterConfig(
            provider,
            customer,
            charge_if=charge_if,
            on_provider_error=policy,
            free_methods=frozenset(free_methods),
            www_authenticate=www_authenticate,
            default=default_specs,
            default_exclude=exclude,
        )
        self._open_loop: asyncio.AbstractEventLoop | None = None
        self._open_lock: asyncio.Lock | None = None
        self._open_lock_loop: asyncio.AbstractEventLoop | None = None
        self._routes_checked = False
        #: Whether the app has a metered websocket route (found by the route walk): the
        #: websockets of an app without one pass through untouched.
        self._websockets = False
        #: Path patterns of metered HTTP routes (``default=`` defers its refusal there).
        self._covered: list[tuple[re.Pattern[str], frozenset[str] | None]] = []
        try:
            document_routes(app)
        except Exception:  # documentation is best effort; never break start-up
            logger.exception("usage_middleware: could not document metered routes")

    @property
    def on_provider_error(self) -> ProviderErrorPolicy:
        """``"closed"`` or ``"open"``: see the class docstring."""
        return self.config.on_provider_error

    #: The former name of :attr:`on_provider_error`.
    failure_policy = on_provider_error

    # -- ASGI entry ------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type != "http":
            if scope_type == "lifespan":
                await self._lifespan(scope, receive, send)
            elif scope_type == "websocket" and SCOPE_KEY not in scope:
                if not self._routes_checked:
                    self._check_routes()
                if self._websockets:
                    await self._websocket(scope, receive, send)
                else:
                    await self.app(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if SCOPE_KEY in scope:
            await self.app(scope, receive, send)
            return
        if self._open_loop is not asyncio.get_running_loop():  # not self._opened, inlined
            await self._ensure_open()
        if not self._routes_checked:
            self._check_routes()

        watch = _ReceiveWatch(receive)
        # From the route's first yield on, once units are held; an ASGI 2.4 server's
        # ``send`` raising tells instead.
        meter = Meter(self.config, None if _send_raises(scope) else watch)
        scope[SCOPE_KEY] = meter

        async def send_wrapper(message: Message) -> None:
            if meter.refusal is not None:
                return  # refused by a dependency: the app's own answer (a 500) is not sent
            message_type = message["type"]
            if meter.default_refusal is not None:  # no route-level check covered it after all
                if message_type == "http.response.start":
                    meter.refusal, meter.denied = meter.default_refusal, True
                    logger.warning(
                        "usage_middleware: %s is not metered although its path is that of a "
                        "metered route; its response was replaced by the default's refusal",
                        endpoint_name(scope),
                    )
                    return
            if message_type == "http.response.start":
                meter.status = message["status"]
                if meter.reads:
                    meter.start_readers(message.get("headers", ()))
            elif meter.readers is not None and message_type == "http.response.body":
                # units_from=: read the units as the body passes, before the charge below
                meter.feed_readers(message.get("body", b""), not message.get("more_body", False))
            if (
                message_type == "http.response.body" and not message.get("more_body", False)
            ) or message_type == "http.response.pathsend":
                if meter.chargeable():
                    if watch.before_final_body():
                        await asyncio.sleep(0)  # the watch's first step
                    # charged only if the client is still there when the final body goes
                    # to the server (which drops it silently otherwise)
                    if not watch.disconnected and await meter.prepare():
                        if watch.before_final_body():  # prepare waited: ask again
                            await asyncio.sleep(0)
                        if not watch.disconnected:
                            watch.ended = True
                            try:
                                await send(message)
                            except OSError:  # an ASGI 2.4 server: the client is gone
                                watch.disconnected = True
                                raise
                            meter.charged = True
                            return
                watch.ended = True
            await send(message)

        try:
            refusal: Response | None = None
            if self.config.default and self.config.default_applies(scope):
                request = Request(scope, watch.receive)
                refusal = await meter.authorize_default(request, defer=self._may_be_covered(scope))
                body = request.__dict__.get("_body")  # read for an Idempotency-Key
                if body is not None:
                    watch.give_back(body)
            if refusal is not None:
                await refusal(scope, watch.receive, send)
            else:
                try:
                    await self.app(scope, watch.receive, send_wrapper)
                except Refused as exc:  # a Metered dependency refused before the endpoint
                    if meter.status is not None:
                        raise
                    await exc.response(scope, watch.receive, send)
                else:
                    if meter.refusal is not None and meter.status is None:
                        await meter.refusal(scope, watch.receive, send)  # caught on the way
        finally:
            watch.close()
            if meter.reservations or meter.claim is not None:
                if watch.disconnected and not meter.charged and not meter.denied:
                    logger.info(
                        "usage_middleware: client disconnected; not charged: %s",
                        endpoint_name(scope),
                    )
                await meter.settle()

    def _may_be_covered(self, scope: Scope) -> bool:
        """Whether the request's method and path are those of a metered route."""
        if not self._covered:
            return False
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        method = scope["method"]
        return any(
            regex.match(path) is not None and (methods is None or method in methods)
            for regex, methods in self._covered
        )

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Meter a websocket connection (see the class docstring)."""
        if self._open_loop is not asyncio.get_running_loop():
            await self._ensure_open()
        meter = Meter(self.config)
        scope[SCOPE_KEY] = meter
        accepted = False
        denied = False
        close_code: int | None = None

        async def receive_wrapper() -> Message:
            nonlocal close_code
            message = await receive()
            if message["type"] == "websocket.disconnect" and close_code is None:
                close_code = message.get("code", 1005)
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal accepted, denied, close_code
            message_type = message["type"]
            if message_type == "websocket.accept":
                accepted = True
            elif message_type == "websocket.close":
                if close_code is None:
                    close_code = message.get("code", 1000)
            elif message_type.startswith("websocket.http.response"):
                denied = True
            await send(message)

        returned = False
        try:
            try:
                await self.app(scope, receive_wrapper, send_wrapper)
                returned = True
                if accepted and close_code is None:
                    # returned without closing: close normally, as the ASGI spec asks of
                    # the server (uvicorn 0.32 leaves such a connection open)
                    close_code = 1000
                    with contextlib.suppress(Exception):
                        await send({"type": "websocket.close", "code": 1000, "reason": ""})
            except Refused as exc:
                if accepted or denied:
                    raise
                await _deny_websocket(scope, receive, send, exc.response)
        finally:
            if meter.reservations:
                ended_normally = (
                    close_code in NORMAL_CLOSE_CODES if close_code is not None else returned
                )
                if accepted and not denied and not meter.denied and ended_normally:
                    try:
                        meter.charged = await meter.prepare()
                    except Exception:  # logged by prepare; the connection is over
                        meter.charged = False
                elif accepted:
                    logger.info(
                        "usage_middleware: websocket ended abnormally (code %s); not charged: %s",
                        close_code,
                        endpoint_name(scope),
                    )
                await meter.settle()

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
        self._websockets = meters_websockets(self.app)
        if self.config.default:
            self._covered = covered_paths(self.app)
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


#: How many messages :meth:`_ReceiveWatch._peek` reads at most (a body, a disconnect).
_PEEK_READS = 4
#: How many bare yields (``await asyncio.sleep(0)``) one peeked ``receive`` call may make.
_PEEK_STEPS = 8


async def _awaiting(awaitable: Awaitable[Message]) -> Message:
    return await awaitable


def _cancel_call(call: Coroutine[Any, Any, Message], waits_on: object) -> None:
    """Cancel a ``receive`` call stepped by hand where it waits on ``waits_on``, as a
    task's cancellation would (the future it waits on is cancelled, then the call)."""
    cancel = getattr(waits_on, "cancel", None)
    if cancel is not None:
        cancel()
    try:
        call.throw(asyncio.CancelledError())
    except (asyncio.CancelledError, StopIteration):
        return
    except Exception:
        logger.debug("usage_middleware: a cancelled receive raised", exc_info=True)
        return
    call.close()  # it went on waiting


def _is_chunk(message: Message) -> bool:
    """Whether ``message`` is a request body chunk that more chunks follow."""
    return message["type"] == "http.request" and bool(message.get("more_body", False))


def _provider_error_policy(
    on_provider_error: object, failure_policy: object
) -> ProviderErrorPolicy:
    """The middleware's ``on_provider_error`` from it or its former name ``failure_policy``."""
    if on_provider_error is not None and failure_policy is not None:
        if on_provider_error != failure_policy:
            raise ConfigurationError(
                "UsageMiddleware got on_provider_error= and its former name failure_policy= "
                "with different values; pass on_provider_error= only"
            )
    name, value = (
        ("failure_policy", failure_policy)
        if on_provider_error is None and failure_policy is not None
        else ("on_provider_error", on_provider_error)
    )
    if value is None:
        return "closed"
    if value == "open":
        return "open"
    if value == "closed":
        return "closed"
    raise ConfigurationError(
        f"UsageMiddleware({name}=...) must be 'open' or 'closed', got {value!r}"
    )


async def _deny_websocket(scope: Scope, receive: Receive, send: Send, response: Response) -> None:
    """Refuse a websocket handshake with ``response`` (the denial-response extension), or
    accept and close at once with 1008 and the problem's title and detail as reason."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await response(scope, receive, send)  # Starlette prefixes the messages for a websocket
        return
    reason = f"{response.status_code}"
    try:
        body = json.loads(bytes(response.body))
        reason = f"{response.status_code} {body['title']}: {body['detail']}"
    except (ValueError, KeyError, TypeError):
        pass
    encoded = reason.encode("utf-8")[:_MAX_REASON]
    await send({"type": "websocket.accept"})
    await send(
        {
            "type": "websocket.close",
            "code": 1008,
            "reason": encoded.decode("utf-8", errors="ignore"),
        }
    )


def _default_specs(default: object) -> tuple[MeteredFeature, ...]:
    """``UsageMiddleware(default=...)`` as specs (see the class docstring)."""
    if default is None:
        return ()
    if is_metered_dependency(default):  # Metered(...): the same spec object
        specs: tuple[MeteredFeature, ...] = getattr(default, SPECS_ATTR)
        return specs
    if isinstance(default, str):
        return (make_spec(default, 1, where="UsageMiddleware(default=...)"),)
    if isinstance(default, tuple) and len(default) == 2:
        return (make_spec(default[0], default[1], where="UsageMiddleware(default=...)"),)
    raise ConfigurationError(
        "UsageMiddleware(default=...) must be a feature name such as 'feature:requests' "
        "(1 unit per request), a (feature, units) tuple such as ('feature:requests', 2), "
        "units an int or a callable of the request, or Metered('feature:requests', "
        f"units=...); got {default!r}"
    )


def _default_exclude(exclude: object) -> tuple[str, ...]:
    """``UsageMiddleware(default_exclude=...)`` checked (see the class docstring)."""
    if (
        isinstance(exclude, str | bytes)
        or not isinstance(exclude, Collection)
        or not all(
            isinstance(p, str) and p.startswith("/") and (p == "/" or not p.endswith("/"))
            for p in exclude
        )
    ):
        raise ConfigurationError(
            "UsageMiddleware(default_exclude=...) must be a collection of paths such as "
            "('/health', '/docs'), each starting with '/' and not ending with one (a path "
            f"excludes itself and everything below it); got {exclude!r}"
        )
    return tuple(exclude)
