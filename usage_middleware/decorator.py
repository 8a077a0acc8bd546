"""``@metered(feature, units=1)``: reserve units before a route runs; refuse with 402.

::

    @app.get("/convert")                 # the route decorator on top
    @metered("feature:convert")          # @metered right above the function
    async def convert(q: str) -> dict[str, str]: ...

On each request the wrapper asks the :class:`~usage_middleware.meter.Meter` that
:class:`~usage_middleware.UsageMiddleware` put in the scope to resolve the customer, size
and reserve every feature (all or nothing), then calls the endpoint or returns the refusal
(401/402/503 ``application/problem+json``) instead. Charging happens in the middleware,
after the response.

Endpoints: Starlette endpoints, ``HTTPEndpoint`` methods and FastAPI path operations,
``async def`` and plain ``def`` (run in Starlette's threadpool), and websocket endpoints
(Starlette's and FastAPI's; the units are held when the connection arrives, before the
endpoint accepts it; see :class:`~usage_middleware.UsageMiddleware` for when a
connection is charged). FastAPI needs no
``request`` parameter, and sees the original's parameters, dependencies and return
annotation. Dicts, models and ``Response`` objects are returned unchanged. Generator
endpoints are refused (return a ``StreamingResponse``).

``units``: an int from 1 to :data:`~usage_middleware.models.MAX_UNITS`, or a sync or async
callable of the request returning one (a :class:`~usage_middleware.meter.UnitsFunction`).
It raising ``ValueError``/``KeyError`` or returning an int out of range answers 400
(:data:`~usage_middleware.problems.INVALID_UNITS`); returning a non-int answers 500
(:data:`~usage_middleware.problems.UNITS_FUNCTION_ERROR`, logged); any other exception
propagates like the endpoint's own. Nothing is reserved in those cases.

Several ``@metered`` on one function make one all-or-nothing decision, in top-down order.

Misuse is loud: bad arguments raise ``ConfigurationError`` at decoration; a metered
endpoint called without ``UsageMiddleware`` raises ``ConfigurationError``; ``@metered``
above the route decorator fails start-up where the route walk reaches, and otherwise
answers 500 (:data:`~usage_middleware.problems.MISPLACED_DECORATOR`): the function given to
``@metered`` is consumed, its code swapped for a stub (``docs/architecture.md``, "Edge").
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import types
from collections.abc import Callable, Coroutine
from typing import (
    Annotated,
    Any,
    Final,
    ParamSpec,
    Protocol,
    TypeVar,
    get_args,
    get_origin,
    overload,
)

from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from . import problems
from ._utils import is_async_callable
from .errors import ConfigurationError
from .meter import SCOPE_KEY, Meter, MeteredFeature, UnitsFunction, make_spec
from .provider import Overage
from .routes import (
    FEATURES_ATTR,
    MARK_ATTR,
    SPECS_ATTR,
    SUPERSEDED_ATTR,
    WRAPPER_ATTR,
    install_openapi_hook,
    is_metered_wrapper,
)
from .units import ResponseUsage

__all__ = ["REQUEST_PARAM", "UnitsFunction", "metered"]

P = ParamSpec("P")
T = TypeVar("T")

#: Name of the hidden keyword-only parameter added to the wrapper's ``__signature__``.
REQUEST_PARAM: Final = "_usage_middleware_request"
_SPECS_ATTR = SPECS_ATTR
#: On each wrapper: the callable it runs (a copy of the trapped original, or the original).
_CALL_ATTR = "__usage_call__"
#: On a function turned into a trap: its own code object (a later @metered copies it).
_CODE_ATTR = "__usage_code__"

logger = logging.getLogger("usage_middleware")


class _MeteredDecorator(Protocol):
    @overload
    def __call__(
        self, func: Callable[P, Coroutine[Any, Any, T]], /
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def __call__(self, func: Callable[P, T], /) -> Callable[P, Coroutine[Any, Any, T]]: ...


def metered(
    feature: str,
    units: int | UnitsFunction = 1,
    *,
    clobber: bool = False,
    overage: Overage = "cap",
    charge_partial: bool = False,
    units_from: ResponseUsage | None = None,
) -> _MeteredDecorator:
    """Meter an endpoint: reserve ``units`` of ``feature`` before it runs, charge after.

    The request is charged the units it actually used when the app reports them
    (:func:`~usage_middleware.usage_of`, or ``units_from``), else ``units``: then
    ``units`` is the estimate reserved before the endpoint runs.

    Args:
        feature: a Tier feature name, ``feature:[a-zA-Z0-9:]+`` (e.g. ``"feature:convert"``).
        units: units of usage one request uses: an int from 1 to
            :data:`~usage_middleware.models.MAX_UNITS`, or a sync or async callable of the
            request returning one.
        clobber: the charge *sets* the period's usage of the feature to ``units`` instead
            of adding to it (Tier's ``clobber``: seats, storage, other gauges); allowed
            when ``units`` is within the limit. Only providers that support it (Tier);
            start-up fails with ``ConfigurationError`` on any other. Fixed units only:
            not with ``overage``, ``charge_partial`` or ``units_from``.
        overage: units used beyond the estimate that the rest of the budget (limit, then
            credits) cannot cover: ``"cap"`` (default) charges only what the budget
            covered, ``"charge"`` charges them all (the provider records the overage).
        charge_partial: a request cut off by a disconnect or an error (not charged by
            default) is charged the units reported for the feature until then.
        units_from: read the actual units in the response: ``usage_from_json(path)`` (a
            JSON body's field) or ``usage_from_sse(path)`` (the last SSE event carrying
            it), OpenAI's ``usage.total_tokens`` by default.

    Returns a decorator turning the endpoint into an ``async def`` wrapper (see the module
    docstring for what it keeps and how it behaves).

    Raises:
        ConfigurationError: at decoration time, for a bad feature name (or bare
            ``@metered`` without parentheses), bad units (a units callable must take the
            request as its one positional argument), a feature already metered on the
            same function, a generator or non-function.
    """
    spec = make_spec(
        feature,
        units,
        clobber,
        overage=overage,
        charge_partial=charge_partial,
        units_from=units_from,
    )

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        if "fastapi.applications" in sys.modules:
            install_openapi_hook()
        if is_metered_wrapper(func):
            inner: tuple[MeteredFeature, ...] = getattr(func, _SPECS_ATTR)
            if any(s.feature == feature for s in inner):
                raise ConfigurationError(
                    f"@metered({feature!r}) is applied twice to {func.__qualname__}; "
                    "use one @metered per feature (units may be a callable)"
                )
            merged = _wrap(func.__wrapped__, (spec, *inner), getattr(func, _CALL_ATTR))  # type: ignore[attr-defined]
            setattr(func, SUPERSEDED_ATTR, True)  # registered already? it refuses
            return merged
        return _wrap(func, (spec,), None)

    return decorate


def _request_param(func: Callable[..., Any], sig: inspect.Signature) -> str | None:
    """The name of ``func``'s own parameter annotated with ``Request``, ``WebSocket`` or
    ``HTTPConnection`` (FastAPI fills it)."""
    globalns = getattr(func, "__globals__", {})
    for param in sig.parameters.values():
        annotation = param.annotation
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, globalns)  # FastAPI does the same later
            except Exception:
                text = annotation.replace(" ", "")
                for name in ("Request", "WebSocket", "HTTPConnection"):
                    if text == name or text.endswith((f".{name}", f"[{name}", f"[{name}]")):
                        return param.name
                continue
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        if isinstance(annotation, type) and issubclass(annotation, HTTPConnection):
            return param.name
    return None


def _wrap(
    original: Callable[..., Any], specs: tuple[MeteredFeature, ...], call: Callable[..., Any] | None
) -> Callable[..., Any]:
    """The wrapper metering ``specs`` around ``original``; it runs ``call``.

    ``call`` is ``None`` for a function not wrapped before: it is checked, and trapped
    when it is a plain function (``call`` becomes its untrapped copy).
    """
    if inspect.isclass(original) or not callable(original):
        raise ConfigurationError(
            f"@metered decorates endpoint functions or methods, got {original!r}"
        )
    if inspect.isgeneratorfunction(original) or inspect.isasyncgenfunction(original):
        raise ConfigurationError(
            f"@metered cannot meter the generator endpoint {original.__qualname__}: its "
            "response starts before the check; return a StreamingResponse instead"
        )
    try:
        sig = inspect.signature(original if call is None else call)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"@metered cannot read the signature of {original!r}") from exc
    if call is None:
        call = _trap(original)

    request_name = _request_param(call, sig)
    hidden = request_name is None
    if hidden:
        params = list(sig.parameters.values())
        where = len(params)
        if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD:
            where -= 1
        params.insert(
            where,
            inspect.Parameter(REQUEST_PARAM, inspect.Parameter.KEYWORD_ONLY, annotation=Request),
        )
        sig = sig.replace(parameters=params)

    is_async = is_async_callable(call)
    features = tuple(s.feature for s in specs)
    run = call

    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if wrapper.__dict__.get(SUPERSEDED_ATTR):
            return _misplaced_call(original.__qualname__, original.__module__)
        request: Any = kwargs.pop(REQUEST_PARAM, None) if hidden else kwargs.get(request_name)  # type: ignore[arg-type]
        if request is None:
            for arg in args:
                if isinstance(arg, HTTPConnection):
                    request = arg
                    break
            else:
                raise ConfigurationError(
                    f"@metered endpoint {original.__qualname__} was called without a request; "
                    "it must be called by Starlette or FastAPI routing"
                )
        meter: Meter | None = request.scope.get(SCOPE_KEY)
        if meter is None:
            raise ConfigurationError(_no_middleware_message(original, request))
        refusal = await meter.authorize(request, specs)
        if refusal is not None:
            if request.scope["type"] == "websocket":
                meter.refuse(refusal)  # the middleware denies the handshake
            return refusal
        if is_async:
            return await run(*args, **kwargs)
        return await run_in_threadpool(run, *args, **kwargs)

    wrapper.__signature__ = sig  # type: ignore[attr-defined]
    setattr(wrapper, WRAPPER_ATTR, wrapper)
    setattr(wrapper, _CALL_ATTR, call)
    setattr(wrapper, FEATURES_ATTR, features)
    setattr(wrapper, _SPECS_ATTR, specs)
    try:
        setattr(original, MARK_ATTR, True)
    except (AttributeError, TypeError):  # a builtin or slotted callable: nothing to mark
        pass
    return wrapper


def _trap(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ``func`` into a trap (see the module docstring); return what runs its body.

    A plain function gets a code object with the same parameters (so its signature, as
    any framework reads it, is unchanged) whose body returns :func:`_misplaced_call`; the
    returned copy keeps the original code, globals, closure, defaults and attributes.
    Anything else is returned as is, untrapped.
    """
    if type(func) is not types.FunctionType:
        return func
    trapped: types.CodeType | None = func.__dict__.get(_CODE_ATTR)
    code = func.__code__ if trapped is None else trapped  # given to @metered before
    copy = types.FunctionType(
        code, func.__globals__, func.__name__, func.__defaults__, func.__closure__
    )
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__dict__.update(func.__dict__)
    copy.__dict__.pop(_CODE_ATTR, None)
    for attr in ("__qualname__", "__module__", "__doc__", "__annotations__", "__type_params__"):
        if hasattr(func, attr):
            setattr(copy, attr, getattr(func, attr))
    if trapped is not None:
        return copy
    try:
        cells = [f"__usage_cell_{i}" for i in range(len(code.co_freevars))]
        # the trap's body names every cell, so it has as many free variables as the original
        # (``__code__`` can only be swapped for code with the same number)
        uses_cells = f"({', '.join(cells)},)" if cells else "None"
        source = (
            f"def __usage_outer({', '.join(cells)}):\n"
            f"    {'async ' if code.co_flags & inspect.CO_COROUTINE else ''}"
            f"def __usage_trap({_parameters_of(code)}):\n"
            f"        if False:\n"
            f"            {uses_cells}\n"
            f"        return __import__('sys').modules[{__name__!r}]._misplaced_call(\n"
            f"            {func.__qualname__!r}, {func.__module__!r})\n"
            f"    return __usage_trap\n"
        )
        namespace: dict[str, Any] = {}
        exec(compile(source, f"<@metered trap of {func.__qualname__}>", "exec"), namespace)
        trap = namespace["__usage_outer"](*cells).__code__
        func.__code__ = trap.replace(
            co_name=code.co_name,
            co_qualname=code.co_qualname,
            co_filename=code.co_filename,
            co_firstlineno=code.co_firstlineno,
        )
        func.__dict__[_CODE_ATTR] = code
    except Exception:  # unusual parameters or code: leave it untrapped (the walk remains)
        logger.warning(
            "usage_middleware: cannot guard %s.%s against a misplaced @metered; if a route "
            "decorator registered it before @metered ran, only the start-up route check "
            "can catch that",
            func.__module__,
            func.__qualname__,
            exc_info=True,
        )
        return func
    return copy


def _parameters_of(code: types.CodeType) -> str:
    """``code``'s parameter list as source: same names and kinds, no defaults/annotations.

    Defaults stay on the function object (``__defaults__``/``__kwdefaults__``), so the
    trapped function's signature is unchanged.
    """
    names = code.co_varnames
    positional = code.co_argcount
    kw_only = code.co_kwonlyargcount
    parts = list(names[:positional])
    if code.co_posonlyargcount:
        parts.insert(code.co_posonlyargcount, "/")
    at = positional + kw_only
    if code.co_flags & inspect.CO_VARARGS:
        parts.append("*" + names[at])
        at += 1
    elif kw_only:
        parts.append("*")
    parts.extend(names[positional : positional + kw_only])
    if code.co_flags & inspect.CO_VARKEYWORDS:
        parts.append("**" + names[at])
    return ", ".join(parts)


def _misplaced_call(qualname: str, module: str | None) -> Response:
    """What a function given to ``@metered`` answers when called directly (logged)."""
    name = f"{module}.{qualname}" if module else qualname
    logger.error(
        "usage_middleware: %s was called without its @metered wrapper, so it cannot be "
        "metered; answering 500. Put @metered(...) directly above the function, below "
        "@app.get(...)/@router.post(...)",
        name,
    )
    return problems.misplaced_decorator(name)


def _no_middleware_message(original: Callable[..., Any], request: HTTPConnection) -> str:
    if request.scope.get("type") not in ("http", "websocket"):
        return (
            f"@metered endpoint {original.__qualname__} got a {request.scope.get('type')!r} "
            "connection; @metered meters HTTP and websocket routes only"
        )
    return (
        f"@metered endpoint {original.__qualname__} ran without UsageMiddleware, so it "
        "cannot be metered: add app.add_middleware(UsageMiddleware, customer=...) "
        "(from usage_middleware import UsageMiddleware)"
    )
