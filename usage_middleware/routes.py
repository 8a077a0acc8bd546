"""Find ``@metered`` endpoints in an app's routes: misuse detection and OpenAPI docs.

:func:`iter_endpoints` walks an app through the attributes ASGI apps conventionally
expose (``.routes``, ``.app``, ``.router``, ``.original_router``); an app hidden behind an
object without them is not walked. :func:`misplaced_endpoints` names registered endpoints
that ``@metered`` wrapped *after* the route decorator registered them (``@metered`` above
``@app.get``); :func:`clobber_endpoints` those metered with ``clobber=True``.
:func:`route_specs` gathers, at a request's first metered check, every feature its route
meters: ``Metered`` dependencies (from FastAPI's dependency tree of the route, app and
router dependencies included) and the endpoint's ``@metered`` features.
:func:`document_routes` and :func:`install_openapi_hook` give each metered FastAPI
operation its ``400``/``401``/``402``/``503`` problem responses and ``x-usage-features``.
``UsageMiddleware`` runs them at start-up; see ``docs/architecture.md`` ("Edge").
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "DEPENDENCY_ATTR",
    "MARK_ATTR",
    "SPECS_ATTR",
    "SUPERSEDED_ATTR",
    "WRAPPER_ATTR",
    "clobber_endpoints",
    "covered_paths",
    "document_routes",
    "document_schema",
    "install_openapi_hook",
    "iter_endpoints",
    "iter_metered",
    "metered_features",
    "metered_responses",
    "meters_websockets",
    "misplaced_endpoints",
    "route_specs",
]

logger = logging.getLogger("usage_middleware")

#: Set to ``True`` on every function handed to ``@metered``.
MARK_ATTR = "__usage_metered__"
#: Set on each ``@metered`` wrapper to the wrapper itself (a copied ``__dict__`` fails the
#: identity check, so a foreign wrapper is never mistaken for ours).
WRAPPER_ATTR = "__usage_wrapper__"
#: The features a wrapper meters, in decision order (tuple of str).
FEATURES_ATTR = "__usage_features__"
#: Set to ``True`` on a wrapper that a later ``@metered`` merged into a new one: the old
#: wrapper refuses every call (it meters only some of the features), so registering it is
#: the same mistake as registering the bare function.
SUPERSEDED_ATTR = "__usage_superseded__"

#: On each ``@metered`` wrapper and ``Metered`` dependency: its specs (``MeteredFeature``s).
SPECS_ATTR = "__usage_specs__"
#: Set on each ``Metered`` dependency to itself (as :data:`WRAPPER_ATTR` on wrappers).
DEPENDENCY_ATTR = "__usage_dependency__"

_MAX_WRAP_DEPTH = 32
_MAX_DEPTH = 64  # nested FastAPI dependencies followed

_PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "feature": {"type": "string"},
        "units": {"type": "integer"},
        "limit": {"type": ["integer", "null"]},
        "used": {"type": ["integer", "null"]},
        "remaining": {"type": ["integer", "null"]},
        "reason": {"type": "string"},
    },
    "required": ["type", "title", "status", "detail", "feature", "units"],
}


def is_metered_wrapper(func: object) -> bool:
    """Whether ``func`` is a wrapper made by ``@metered`` (not a copy of its attributes)."""
    return getattr(func, WRAPPER_ATTR, None) is func


def metered_features(endpoint: object) -> tuple[str, ...] | None:
    """The features metered by ``endpoint`` (following ``__wrapped__``), or ``None``."""
    func: object = endpoint
    for _ in range(_MAX_WRAP_DEPTH):
        if is_metered_wrapper(func):
            features: tuple[str, ...] = getattr(func, FEATURES_ATTR)
            return features
        func = getattr(func, "__wrapped__", None)
        if func is None:
            return None
    return None


def is_metered_dependency(call: object) -> bool:
    """Whether ``call`` is a ``Metered`` dependency (``Depends(Metered(...))``)."""
    return call is not None and getattr(call, DEPENDENCY_ATTR, None) is call


def endpoint_specs(endpoint: object) -> tuple[Any, ...]:
    """The ``@metered`` specs of ``endpoint`` (following ``__wrapped__``), or ``()``."""
    func: object = endpoint
    for _ in range(_MAX_WRAP_DEPTH):
        if is_metered_wrapper(func):
            specs: tuple[Any, ...] = getattr(func, SPECS_ATTR, ())
            return specs
        func = getattr(func, "__wrapped__", None)
        if func is None:
            return ()
    return ()


def dependant_specs(dependant: object) -> tuple[Any, ...]:
    """The specs of every ``Metered`` in a FastAPI ``Dependant`` tree, in declared order."""
    found: list[Any] = []

    def visit(node: object, depth: int) -> None:
        if depth > _MAX_DEPTH:
            return
        for sub in getattr(node, "dependencies", None) or ():
            visit(sub, depth + 1)  # FastAPI solves a dependency's own dependencies first
            call = getattr(sub, "call", None)
            if is_metered_dependency(call):
                found.extend(getattr(call, SPECS_ATTR, ()))

    visit(dependant, 0)
    return tuple(found)


def depends_specs(depends: object) -> tuple[Any, ...]:
    """The specs of the ``Metered`` dependencies in a list of FastAPI ``Depends``."""
    found: list[Any] = []
    for item in depends if isinstance(depends, list | tuple) else ():
        call = getattr(item, "dependency", None)
        if is_metered_dependency(call):
            found.extend(getattr(call, SPECS_ATTR, ()))
    return tuple(found)


_DEPENDANTS: dict[int, tuple[object, tuple[Any, ...]]] = {}


def _request_dependant(scope: Any) -> object:
    """The FastAPI ``Dependant`` of the route serving ``scope`` (``None`` elsewhere).

    FastAPI 0.165 serves an included route through an effective route context that
    carries the including routers' dependencies; older versions copy the included route,
    dependencies merged, and name it in ``scope["route"]``.
    """
    fastapi_scope = scope.get("fastapi")
    if isinstance(fastapi_scope, dict):
        dependant = getattr(fastapi_scope.get("effective_route_context"), "dependant", None)
        if dependant is not None:
            return dependant
    return getattr(scope.get("route"), "dependant", None)


def route_specs(scope: Any, own: Any) -> list[Any]:
    """Every spec the route serving ``scope`` meters, ``own`` included, each once.

    ``Metered`` dependencies first (the route's FastAPI dependency tree: app, routers,
    route, parameters), then the endpoint's ``@metered`` specs (``scope["endpoint"]``),
    then any of ``own`` not found there (a route the walk could not read).
    """
    specs: list[Any] = []
    dependant = _request_dependant(scope)
    if dependant is not None:
        cached = _DEPENDANTS.get(id(dependant))
        if cached is None or cached[0] is not dependant:
            if len(_DEPENDANTS) >= 4096:
                _DEPENDANTS.clear()
            cached = _DEPENDANTS[id(dependant)] = (dependant, dependant_specs(dependant))
        specs.extend(cached[1])
    for spec in (*endpoint_specs(scope.get("endpoint")), *own):
        if not any(spec is seen for seen in specs):
            specs.append(spec)
    return specs


def route_features(
    route: object, endpoint: object, inherited: tuple[Any, ...] = ()
) -> tuple[str, ...] | None:
    """The features a walked route meters (``Metered`` dependencies, then ``@metered``).

    ``inherited``: the specs of ``Metered`` dependencies of the routers including it
    (FastAPI 0.165 keeps included routers lazily). ``None`` for an unmetered route.
    """
    specs = (
        *inherited,
        *dependant_specs(getattr(route, "dependant", None)),
        *endpoint_specs(endpoint),
    )
    if not specs:
        return None
    features: list[str] = []
    for spec in specs:
        if spec.feature not in features:
            features.append(spec.feature)
    return tuple(features)


def iter_endpoints(app: object) -> Iterator[tuple[object, Callable[..., Any]]]:
    """Yield ``(route, endpoint)`` for every route reachable from ``app`` (see module doc)."""
    for route, endpoint, _, _ in _walk(app):
        yield route, endpoint


def iter_metered(app: object) -> Iterator[tuple[object, Callable[..., Any], str, tuple[str, ...]]]:
    """Yield ``(route, endpoint, full path, features)`` for every metered route of ``app``."""
    for route, endpoint, path, inherited in _walk(app):
        features = route_features(route, endpoint, inherited)
        if features is not None:
            yield route, endpoint, path, features


def _walk(app: object) -> Iterator[tuple[object, Callable[..., Any], str, tuple[Any, ...]]]:
    """``(route, endpoint, full path, inherited specs)``; the path includes mount and
    include prefixes, the specs those of ``Metered`` dependencies of including routers."""
    stack: list[tuple[object, str, tuple[Any, ...]]] = [(app, "", ())]
    seen: set[int] = set()
    while stack:
        obj, prefix, inherited = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        routes = getattr(obj, "routes", None)
        if isinstance(routes, list):
            for route in reversed(routes):
                path = getattr(route, "path", None)
                endpoint = getattr(route, "endpoint", None)
                if callable(endpoint):
                    full = prefix + (path if isinstance(path, str) else "?")
                    yield route, endpoint, full, inherited
                child_prefix = prefix
                child_inherited = inherited
                context = getattr(route, "include_context", None)  # FastAPI's lazy include
                included = getattr(context, "prefix", None)
                if isinstance(included, str):
                    child_prefix += included
                    more = depends_specs(getattr(context, "dependencies", None))
                    if more:
                        child_inherited = (*inherited, *more)
                elif isinstance(path, str) and not callable(endpoint):  # a Mount
                    child_prefix += path
                stack.append((route, child_prefix, child_inherited))
        for attr in ("app", "router", "original_router"):
            child = getattr(obj, attr, None)
            if child is not None and not isinstance(child, str | bytes | int | float):
                stack.append((child, prefix, inherited))


def meters_websockets(app: object) -> bool:
    """Whether a websocket route reachable from ``app`` is metered (``@metered`` on its
    endpoint or a ``Metered`` dependency): only then does the middleware meter websockets."""
    from starlette.routing import WebSocketRoute

    return any(isinstance(route, WebSocketRoute) for route, _, _, _ in iter_metered(app))


def covered_paths(app: object) -> list[tuple[re.Pattern[str], frozenset[str] | None]]:
    """``(path regex, methods or None)`` of every metered HTTP route reachable from ``app``.

    Full paths (mount and include prefixes), compiled as Starlette compiles a route's
    path; ``UsageMiddleware(default=...)`` reads them to tell, before routing, whether a
    request may be on a route that meters itself.
    """
    from starlette.routing import WebSocketRoute, compile_path

    found: list[tuple[re.Pattern[str], frozenset[str] | None]] = []
    for route, _, path, _ in iter_metered(app):
        if isinstance(route, WebSocketRoute):
            continue
        try:
            regex = compile_path(path)[0]
        except Exception:  # an unusual path: treated as not covered (the stricter choice)
            continue
        methods = getattr(route, "methods", None)
        found.append((regex, frozenset(methods) if methods else None))
    return found


def _misplaced(endpoint: object) -> bool:
    """Whether ``endpoint`` is a function given to ``@metered`` but served unmetered."""
    func: object = endpoint
    for _ in range(_MAX_WRAP_DEPTH):
        if is_metered_wrapper(func):
            return getattr(func, SUPERSEDED_ATTR, False) is True
        if getattr(func, MARK_ATTR, False) is True:
            return True
        func = getattr(func, "__wrapped__", None)
        if func is None:
            return False
    return False


def misplaced_endpoints(app: object) -> list[str]:
    """Describe every endpoint marked ``@metered`` that is registered unwrapped."""
    problems: list[str] = []
    for _, endpoint, path, _ in _walk(app):
        if _misplaced(endpoint):
            name = getattr(endpoint, "__qualname__", repr(endpoint))
            problem = f"{name} (path {path!r})"
            if problem not in problems:  # a mount is reached through .app and .router
                problems.append(problem)
    return problems


def clobber_endpoints(app: object) -> list[str]:
    """Describe every endpoint with a ``@metered(..., clobber=True)`` feature."""
    found: list[str] = []
    for route, endpoint, path, inherited in _walk(app):
        specs = (
            *inherited,
            *dependant_specs(getattr(route, "dependant", None)),
            *endpoint_specs(endpoint),
        )
        if any(getattr(spec, "clobber", False) for spec in specs):
            name = getattr(endpoint, "__qualname__", repr(endpoint))
            entry = f"{name} (path {path!r})"
            if entry not in found:
                found.append(entry)
    return found


def _problem(description: str, **extra: Any) -> dict[str, Any]:
    return {
        "description": description,
        **extra,
        "content": {"application/problem+json": {"schema": _PROBLEM_SCHEMA}},
    }


def metered_responses(features: tuple[str, ...]) -> dict[int, dict[str, Any]]:
    """The OpenAPI responses ``UsageMiddleware`` may answer for a route metering ``features``.

    ``{400: ..., 401: ..., 402: ..., 503: ...}``, each ``application/problem+json``.
    """
    names = ", ".join(features)
    return {
        400: _problem(
            f"Bad Request: the units this request uses ({names}) could not be "
            "determined from its input"
        ),
        401: _problem(
            "Unauthorized: no customer could be identified for this metered request",
            headers={"WWW-Authenticate": {"schema": {"type": "string"}}},
        ),
        402: _problem(
            f"Payment Required: the customer's plan or credits do not cover {names}",
            headers={
                "RateLimit-Policy": {
                    "description": 'The feature\'s limit this period, e.g. "feature:x";q=100',
                    "schema": {"type": "string"},
                },
                "RateLimit": {
                    "description": 'Units left, e.g. "feature:x";r=0',
                    "schema": {"type": "string"},
                },
            },
        ),
        503: _problem(
            f"Service Unavailable: the usage check for {names} failed; retry later",
            headers={"Retry-After": {"schema": {"type": "integer"}}},
        ),
    }


def document_routes(app: object) -> int:
    """Add the library's responses and ``x-usage-features`` to metered FastAPI routes.

    Idempotent; returns the number of routes changed. A status a route already declares
    keeps its own response. Non-FastAPI routes (no ``responses`` dict) are left alone.
    """
    changed = 0
    for route, _, _, features in iter_metered(app):
        responses = getattr(route, "responses", None)
        if not isinstance(responses, dict) or not hasattr(route, "openapi_extra"):
            continue
        extra = route.openapi_extra or {}
        missing = {
            status: response
            for status, response in metered_responses(features).items()
            if status not in responses and str(status) not in responses
        }
        if not missing and extra.get("x-usage-features") == list(features):
            continue
        if missing:
            route.responses = {**responses, **missing}  # type: ignore[attr-defined]
        route.openapi_extra = {**extra, "x-usage-features": list(features)}
        changed += 1
    return changed


def _operations(app: object) -> Iterator[tuple[str, set[str], tuple[str, ...] | None]]:
    """``(path_format, methods, features)`` of each route FastAPI puts in ``app``'s schema.

    Newer FastAPI (0.165) enumerates included routers through ``fastapi.routing.
    iter_route_contexts`` (what its own ``get_openapi`` uses); older versions copy every
    included route into ``app.routes``.
    """
    routes = getattr(app, "routes", None)
    if not isinstance(routes, list):
        return
    iter_contexts = getattr(sys.modules.get("fastapi.routing"), "iter_route_contexts", None)
    items: Any = iter_contexts(routes) if callable(iter_contexts) else routes
    for item in items:
        endpoint = getattr(item, "endpoint", None)
        path = getattr(item, "path_format", None)
        methods = getattr(item, "methods", None)
        if callable(endpoint) and isinstance(path, str) and methods:
            # a route context (0.165) carries every including router's dependencies
            yield path, set(methods), route_features(item, endpoint)


def document_schema(app: object, schema: dict[str, Any]) -> int:
    """Add the library's responses and ``x-usage-features`` to metered operations of ``schema``.

    ``schema`` is the OpenAPI document FastAPI built for ``app`` (changed in place). A
    status an operation already documents keeps its own. Returns the operations changed.
    """
    paths = schema.get("paths")
    if not isinstance(paths, dict):
        return 0
    changed = 0
    for path, methods, features in _operations(app):
        item = paths.get(path)
        if features is None or not isinstance(item, dict):
            continue
        for method in methods:
            operation = item.get(method.lower())
            if not isinstance(operation, dict):
                continue
            responses = operation.setdefault("responses", {})
            for status, response in metered_responses(features).items():
                responses.setdefault(str(status), response)
            operation["x-usage-features"] = list(features)
            changed += 1
    return changed


_HOOK_ATTR = "__usage_middleware_openapi_hook__"
_SCHEMA_ATTR = "_usage_middleware_documented_schema"


def install_openapi_hook() -> bool:
    """Wrap ``FastAPI.openapi`` so each schema it builds documents metered operations.

    Only if FastAPI is already imported (nothing is imported here); idempotent. Returns
    whether the hook is in place. A schema is documented once, when FastAPI builds (or
    rebuilds) it; an app whose ``openapi`` is replaced by a function that does not call
    ``FastAPI.openapi`` is not covered (call :func:`document_schema` there).
    """
    module = sys.modules.get("fastapi.applications")
    fastapi_class: Any = getattr(module, "FastAPI", None)
    if not callable(getattr(fastapi_class, "openapi", None)):
        return False
    current = fastapi_class.openapi
    if getattr(current, _HOOK_ATTR, False):
        return True

    @functools.wraps(current)
    def openapi(self: Any) -> dict[str, Any]:
        schema: dict[str, Any] = current(self)
        if isinstance(schema, dict) and self.__dict__.get(_SCHEMA_ATTR) is not schema:
            try:
                document_schema(self, schema)
            except Exception:  # documentation is best effort; never break the schema
                logger.exception("usage_middleware: could not document metered routes")
            self.__dict__[_SCHEMA_ATTR] = schema
        return schema

    setattr(openapi, _HOOK_ATTR, True)
    fastapi_class.openapi = openapi
    return True
