"""@metered at decoration time: validation, the signature FastAPI reads, stacking, markers."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from tests.support.metering_helpers import http_scope
from usage_middleware import ConfigurationError
from usage_middleware.decorator import REQUEST_PARAM, metered
from usage_middleware.routes import FEATURES_ATTR, MARK_ATTR, is_metered_wrapper, metered_features


@pytest.mark.parametrize("feature", ["convert", "feature:", "feature:a_b", "feature:a-b", 3, None])
def test_bad_feature_names_raise_at_decoration(feature: Any) -> None:
    """A feature name outside feature:[a-zA-Z0-9:]+ is refused when @metered is evaluated."""
    with pytest.raises(ConfigurationError, match="feature"):
        metered(feature)


@pytest.mark.parametrize("units", [0, -1, True, False, 1.5, "2", None])
def test_bad_units_raise_at_decoration(units: Any) -> None:
    """units must be an int > 0 or a callable; anything else fails at decoration."""
    with pytest.raises(ConfigurationError, match="units"):
        metered("feature:a", units=units)


def test_generators_and_classes_are_refused() -> None:
    """Generator endpoints and classes cannot be metered (the check would come too late)."""

    def gen() -> Iterator[bytes]:
        yield b""

    async def agen() -> AsyncIterator[bytes]:
        yield b""

    class Endpoint:
        pass

    for target in (gen, agen, Endpoint):
        with pytest.raises(ConfigurationError):
            metered("feature:a")(target)  # type: ignore[arg-type]


def test_wrapper_keeps_name_doc_and_adds_a_hidden_request_parameter() -> None:
    """The wrapper looks like the original plus one keyword-only Request parameter."""

    async def convert(q: str, n: int = 1, **extra: Any) -> dict[str, str]:
        """Convert things."""
        return {}

    wrapped = metered("feature:a")(convert)
    assert wrapped.__name__ == "convert" and wrapped.__doc__ == "Convert things."
    assert wrapped.__wrapped__ is convert  # type: ignore[attr-defined]
    assert inspect.iscoroutinefunction(wrapped)
    params = inspect.signature(wrapped).parameters
    assert list(params) == ["q", "n", REQUEST_PARAM, "extra"]
    hidden = params[REQUEST_PARAM]
    assert hidden.kind is inspect.Parameter.KEYWORD_ONLY and hidden.annotation is Request
    assert inspect.signature(wrapped).return_annotation == "dict[str, str]"


def test_own_request_parameter_is_reused() -> None:
    """An endpoint with a Request-annotated parameter gets no second, hidden one."""

    async def endpoint(request: Request, q: int = 0) -> Response:
        return PlainTextResponse("")

    params = inspect.signature(metered("feature:a")(endpoint)).parameters
    assert list(params) == ["request", "q"]


def test_sync_function_becomes_async_wrapper() -> None:
    """A plain def is wrapped by an async def (it will run in the threadpool)."""

    def sync(request: Request) -> Response:
        return PlainTextResponse("")

    assert inspect.iscoroutinefunction(metered("feature:a")(sync))


def test_stacked_decorators_merge_into_one_wrapper() -> None:
    """Two @metered give one wrapper around the original, features in top-down order."""

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("")

    inner = metered("feature:b")(endpoint)
    outer = metered("feature:a", units=3)(inner)
    assert outer.__wrapped__ is endpoint  # type: ignore[attr-defined]
    assert getattr(outer, FEATURES_ATTR) == ("feature:a", "feature:b")
    assert list(inspect.signature(outer).parameters) == ["request"]


def test_same_feature_twice_is_refused() -> None:
    """Metering one feature twice on a function is a decoration-time error."""

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("")

    with pytest.raises(ConfigurationError, match="twice"):
        metered("feature:a")(metered("feature:a")(endpoint))


def test_markers_identify_our_wrapper_only() -> None:
    """The original is marked; only the real wrapper passes the wrapper identity check."""

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("")

    wrapped = metered("feature:a")(endpoint)
    assert getattr(endpoint, MARK_ATTR) is True
    assert is_metered_wrapper(wrapped) and not is_metered_wrapper(endpoint)
    assert metered_features(wrapped) == ("feature:a",)
    assert metered_features(endpoint) is None

    import functools

    @functools.wraps(wrapped)
    async def foreign(*args: Any, **kwargs: Any) -> Any:
        return await wrapped(*args, **kwargs)

    assert not is_metered_wrapper(foreign)  # the copied __dict__ does not fool the check
    assert metered_features(foreign) == ("feature:a",)  # ...but it wraps a metered one


def test_two_functions_with_one_name_share_nothing() -> None:
    """Same-named endpoints in different places keep their own features."""

    def make(feature: str) -> Any:
        async def endpoint(request: Request) -> Response:
            return PlainTextResponse("")

        return metered(feature)(endpoint)

    a, b = make("feature:a"), make("feature:b")
    assert a.__name__ == b.__name__
    assert metered_features(a) == ("feature:a",) and metered_features(b) == ("feature:b",)


async def test_called_without_middleware_names_the_fix() -> None:
    """Calling a metered endpoint on a request without UsageMiddleware raises, naming the fix."""
    ran: list[bool] = []

    @metered("feature:a")
    async def endpoint(request: Request) -> Response:
        ran.append(True)
        return PlainTextResponse("")

    with pytest.raises(ConfigurationError, match=r"app\.add_middleware\(UsageMiddleware"):
        await endpoint(Request(http_scope("/")))
    assert ran == []


async def test_called_without_a_request_is_an_error() -> None:
    """A metered endpoint called by hand with no request is refused, not run unmetered."""

    @metered("feature:a")
    async def endpoint(q: int = 1) -> int:
        return q

    with pytest.raises(ConfigurationError, match="without a request"):
        await endpoint(q=2)


def test_metered_without_parentheses_names_the_fix() -> None:
    """@metered applied directly to a function says to call it with a feature name."""
    with pytest.raises(ConfigurationError, match=r"with parentheses"):

        @metered  # type: ignore[arg-type]
        async def endpoint(request: Request) -> Response:
            return PlainTextResponse("")


class _UnitsObject:
    def __call__(self, request: Request) -> int:
        return 1


@pytest.mark.parametrize(
    "units",
    [
        lambda request: 1,
        lambda request, extra=2: 1,
        lambda *args: 1,
        _UnitsObject(),
        functools.partial(lambda scale, request: scale, 3),
    ],
)
def test_units_callables_taking_the_request_are_accepted(units: Any) -> None:
    """A units callable accepting one positional argument (the request) is accepted."""
    metered("feature:a", units=units)


async def _async_no_args() -> int:
    return 1


@pytest.mark.parametrize(
    "units",
    [lambda: 3, lambda request, other: 3, lambda *, request: 3, _async_no_args],
)
def test_units_callable_with_the_wrong_arity_raises_at_decoration(units: Any) -> None:
    """A units callable that cannot be called with just the request fails at decoration."""
    with pytest.raises(ConfigurationError, match="one positional argument"):
        metered("feature:a", units=units)
