"""``Metered(feature, units=1)``: the FastAPI dependency form of ``@metered``.

::

    router = APIRouter(dependencies=[Depends(Metered("feature:api"))])   # every route of it
    app = FastAPI(dependencies=[Depends(Metered("feature:requests"))])   # every route

    @app.post("/search", dependencies=[Depends(Metered("feature:search", units=2)),
                                       Depends(expensive_lookup)])     # runs after the check
    async def search() -> dict[str, str]: ...

The same options as ``@metered`` (validated by the same code, ``meter.make_spec``) and the
same check (``Meter.authorize``): the route's first metered check, in FastAPI's dependency
order, decides every feature the route meters (all its ``Metered`` dependencies and the
endpoint's ``@metered``) at once, all or nothing. A refusal stops the request there,
before the dependencies declared after it and the endpoint run: the dependency raises
:class:`~usage_middleware.meter.Refused`, and ``UsageMiddleware`` sends the problem
response (401/402/409/400/503). Charging is the middleware's, as for ``@metered``.

Works on websocket routes too (``@app.websocket(..., dependencies=[...])`` or a router's
dependencies): a refusal denies the handshake (see ``UsageMiddleware``).
"""

# No ``from __future__ import annotations``: FastAPI reads ``__call__``'s annotation of an
# instance without the module's globals, so it must be the class itself.

from starlette.requests import HTTPConnection

from .errors import ConfigurationError
from .meter import SCOPE_KEY, Meter, MeteredFeature, UnitsFunction, make_spec
from .provider import Overage
from .routes import DEPENDENCY_ATTR, SPECS_ATTR, install_openapi_hook
from .units import ResponseUsage

__all__ = ["Metered"]


class Metered:
    """A FastAPI dependency that meters every route it is declared on (or under).

    ``Depends(Metered("feature:x", units=...))`` in ``dependencies=[...]`` of a route, an
    ``APIRouter``, ``include_router`` or ``FastAPI(...)``, or as a parameter's default.

    Args:
        feature: a Tier feature name, ``feature:[a-zA-Z0-9:]+``.
        units: an int from 1 to ``MAX_UNITS``, or a sync or async callable of the request
            (the connection, on a websocket route) returning one.
        clobber: the charge sets the period's usage (Tier only; see ``@metered``).
        overage, charge_partial, units_from: units settled after the response, as
            ``@metered``.

    Raises:
        ConfigurationError: at construction, for the arguments ``@metered`` refuses; at
            request time, when ``UsageMiddleware`` is not installed.
    """

    __slots__ = ("__usage_dependency__", "__usage_specs__", "spec")

    def __init__(
        self,
        feature: str,
        units: int | UnitsFunction = 1,
        *,
        clobber: bool = False,
        overage: Overage = "cap",
        charge_partial: bool = False,
        units_from: ResponseUsage | None = None,
    ) -> None:
        self.spec: MeteredFeature = make_spec(
            feature,
            units,
            clobber,
            where="Metered",
            overage=overage,
            charge_partial=charge_partial,
            units_from=units_from,
        )
        setattr(self, SPECS_ATTR, (self.spec,))
        setattr(self, DEPENDENCY_ATTR, self)
        install_openapi_hook()

    async def __call__(self, connection: HTTPConnection) -> None:
        meter: Meter | None = connection.scope.get(SCOPE_KEY)
        if meter is None:
            raise ConfigurationError(
                f"{self!r} ran without UsageMiddleware, so it cannot meter: add "
                "app.add_middleware(UsageMiddleware, customer=...) "
                "(from usage_middleware import UsageMiddleware)"
            )
        refusal = await meter.authorize(connection, (self.spec,))
        if refusal is not None:
            meter.refuse(refusal)

    @property
    def dependency(self) -> None:
        """Raises: a bare ``Metered`` where FastAPI expects ``Depends(...)`` (in
        ``dependencies=[...]``) fails at declaration naming the fix."""
        raise AttributeError(
            f"{self!r} must be wrapped in Depends: dependencies=[Depends({self!r})]"
        )

    def __repr__(self) -> str:
        spec = self.spec
        units = spec.units_fn if spec.units_fn is not None else spec.units
        clobber = ", clobber=True" if spec.clobber else ""
        return f"Metered({spec.feature!r}, units={units!r}{clobber})"
