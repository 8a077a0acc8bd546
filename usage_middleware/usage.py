"""``Usage``: the FastAPI parameter type of a request's :class:`~usage_middleware.UnitsMeter`.

::

    @app.post("/chat")
    @metered("feature:tokens", units=estimate)
    async def chat(body: Prompt, usage: Usage) -> StreamingResponse: ...

``Annotated[UnitsMeter, Depends(usage_of)]``; imported lazily by ``usage_middleware``
(FastAPI is the ``[fastapi]`` extra).
"""

from typing import Annotated

try:
    from fastapi import Depends
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "usage_middleware.Usage needs FastAPI: install usage-middleware[fastapi] "
        "(or use usage_of(request))"
    ) from exc

from .meter import usage_of
from .units import UnitsMeter

__all__ = ["Usage"]

#: A FastAPI parameter annotation: ``usage: Usage`` receives the request's UnitsMeter.
Usage = Annotated[UnitsMeter, Depends(usage_of)]
