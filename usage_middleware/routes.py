"""Find ``@metered`` endpoints in an app's routes: misuse detection and OpenAPI docs.

:class:`~usage_middleware.UsageMiddleware` walks the app below it at lifespan start-up and
on the first request (and documents routes when it is built). The walk follows the
attributes ASGI apps conventionally expose: ``.routes`` (Starlette/FastAPI apps, routers,
``Mount``, ``Host``; FastAPI's ``include_router`` copies routes into the including
router), ``.app`` (middleware, mounted apps) and ``.router`` (Starlette/FastAPI apps). An
app hidden behind an object without those attributes is not walked.

What it detects (:func:`misplaced_endpoints`): a registered endpoint whose function was
given to ``@metered`` but is not itself (nor wraps) the metered wrapper, which is what
happens when ``@metered`` sits *above* the route decorator::

    @metered("feature:x")   # wraps the function after @app.get registered it: unmetered
    @app.get("/x")
    async def x(): ...

What it documents (:func:`document_routes`): each FastAPI ``APIRoute`` whose endpoint is
metered gets a ``402`` response (``application/problem+json``) in its ``responses`` unless
the route already declares one, and ``x-usage-features`` (the feature names) in its
``openapi_extra``. FastAPI reads both when it builds ``/openapi.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "MARK_ATTR",
    "WRAPPER_ATTR",
    "clobber_endpoints",
    "document_routes",
    "iter_endpoints",
    "metered_features",
    "misplaced_endpoints",
]

#: Set to ``True`` on every function handed to ``@metered``.
MARK_ATTR = "__usage_metered__"
#: Set on each ``@metered`` wrapper to the wrapper itself (a copied ``__dict__`` fails the
#: identity check, so a foreign wrapper is never mistaken for ours).
WRAPPER_ATTR = "__usage_wrapper__"
#: The features a wrapper meters, in decision order (tuple of str).
FEATURES_ATTR = "__usage_features__"

_MAX_WRAP_DEPTH = 32

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


def _is_marked(endpoint: object) -> bool:
    func: object = endpoint
    for _ in range(_MAX_WRAP_DEPTH):
        if getattr(func, MARK_ATTR, False) is True:
            return True
        func = getattr(func, "__wrapped__", None)
        if func is None:
            return False
    return False


def iter_endpoints(app: object) -> Iterator[tuple[object, Callable[..., Any]]]:
    """Yield ``(route, endpoint)`` for every route reachable from ``app`` (see module doc)."""
    stack: list[object] = [app]
    seen: set[int] = set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        routes = getattr(obj, "routes", None)
        if isinstance(routes, list):
            for route in routes:
                endpoint = getattr(route, "endpoint", None)
                if callable(endpoint):
                    yield route, endpoint
                stack.append(route)
        for attr in ("app", "router"):
            child = getattr(obj, attr, None)
            if child is not None and not isinstance(child, str | bytes | int | float):
                stack.append(child)


def misplaced_endpoints(app: object) -> list[str]:
    """Describe every endpoint marked ``@metered`` that is registered unwrapped."""
    problems: list[str] = []
    for route, endpoint in iter_endpoints(app):
        if metered_features(endpoint) is None and _is_marked(endpoint):
            name = getattr(endpoint, "__qualname__", repr(endpoint))
            path = getattr(route, "path", "?")
            problems.append(f"{name} (path {path!r})")
    return problems


def clobber_endpoints(app: object) -> list[str]:
    """Describe every endpoint with a ``@metered(..., clobber=True)`` feature."""
    found: list[str] = []
    for route, endpoint in iter_endpoints(app):
        specs = getattr(endpoint, "__usage_specs__", ())
        if any(getattr(spec, "clobber", False) for spec in specs):
            name = getattr(endpoint, "__qualname__", repr(endpoint))
            found.append(f"{name} (path {getattr(route, 'path', '?')!r})")
    return found


def _problem_response(features: tuple[str, ...]) -> dict[str, Any]:
    return {
        "description": "Payment Required: the customer's plan or credits do not cover "
        + ", ".join(features),
        "headers": {
            "RateLimit-Policy": {
                "description": 'The feature\'s limit this period, e.g. "feature:x";q=100',
                "schema": {"type": "string"},
            },
            "RateLimit": {
                "description": 'Units left, e.g. "feature:x";r=0',
                "schema": {"type": "string"},
            },
        },
        "content": {"application/problem+json": {"schema": _PROBLEM_SCHEMA}},
    }


def document_routes(app: object) -> int:
    """Add the 402 response and ``x-usage-features`` to metered FastAPI routes.

    Idempotent; returns the number of routes changed. Routes that already declare a 402
    keep theirs. Non-FastAPI routes (no ``responses`` dict) are left alone.
    """
    changed = 0
    for route, endpoint in iter_endpoints(app):
        responses = getattr(route, "responses", None)
        if not isinstance(responses, dict) or not hasattr(route, "openapi_extra"):
            continue
        features = metered_features(endpoint)
        if features is None:
            continue
        extra = route.openapi_extra or {}
        if extra.get("x-usage-features") == list(features) and (
            402 in responses or "402" in responses
        ):
            continue
        if 402 not in responses and "402" not in responses:
            route.responses = {**responses, 402: _problem_response(features)}  # type: ignore[attr-defined]
        route.openapi_extra = {**extra, "x-usage-features": list(features)}
        changed += 1
    return changed
