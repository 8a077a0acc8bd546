"""usage_middleware: meter and charge for API features from one ASGI middleware.

::

    app.add_middleware(UsageMiddleware, provider=LocalLedger("usage.db", pricing="pricing.json"),
                       customer=customer_from_user())

    @app.get("/convert")
    @metered("feature:convert", units=1)
    async def convert() -> dict[str, str]: ...
"""

from typing import TYPE_CHECKING, Any

from .customers import customer_from_header, customer_from_user
from .decorator import metered
from .dependency import Metered
from .errors import (
    ConfigurationError,
    LedgerError,
    PermanentProviderError,
    PricingError,
    ProviderError,
    RetryableProviderError,
    UsageMiddlewareError,
)
from .ledger import FeatureUsage, Ledger, LocalLedger
from .meter import usage_of
from .middleware import UsageMiddleware
from .models import MAX_UNITS, UNLIMITED, Answer, Reservation, UsageEvent
from .provider import FailurePolicy, Overage, Provider
from .providers.ares import AresProvider
from .providers.remote import Entitlement, RemoteProvider
from .providers.spaire import SpaireProvider
from .providers.tier import TierProvider
from .units import UnitsMeter, usage_from_json, usage_from_sse

if TYPE_CHECKING:
    from .ledger.redis import RedisLedger
    from .usage import Usage

__all__ = [
    "MAX_UNITS",
    "UNLIMITED",
    "Answer",
    "AresProvider",
    "ConfigurationError",
    "Entitlement",
    "FailurePolicy",
    "FeatureUsage",
    "Ledger",
    "LedgerError",
    "LocalLedger",
    "Metered",
    "Overage",
    "PermanentProviderError",
    "PricingError",
    "Provider",
    "ProviderError",
    "RedisLedger",
    "RemoteProvider",
    "Reservation",
    "RetryableProviderError",
    "SpaireProvider",
    "TierProvider",
    "UnitsMeter",
    "Usage",
    "UsageEvent",
    "UsageMiddleware",
    "UsageMiddlewareError",
    "customer_from_header",
    "customer_from_user",
    "metered",
    "usage_from_json",
    "usage_from_sse",
    "usage_of",
]


def __getattr__(name: str) -> Any:
    # RedisLedger needs redis-py (the [redis] extra); import it only when asked for.
    if name == "RedisLedger":
        from .ledger.redis import RedisLedger

        return RedisLedger
    if name == "Usage":  # needs FastAPI (the [fastapi] extra)
        from .usage import Usage

        return Usage
    raise AttributeError(f"module 'usage_middleware' has no attribute {name!r}")
