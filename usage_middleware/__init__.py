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
from .middleware import UsageMiddleware
from .models import MAX_UNITS, UNLIMITED, Answer, Reservation, UsageEvent
from .provider import FailurePolicy, Provider
from .providers.ares import AresProvider
from .providers.remote import Entitlement, RemoteProvider
from .providers.spaire import SpaireProvider
from .providers.tier import TierProvider

if TYPE_CHECKING:
    from .ledger.redis import RedisLedger

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
    "UsageEvent",
    "UsageMiddleware",
    "UsageMiddlewareError",
    "customer_from_header",
    "customer_from_user",
    "metered",
]


def __getattr__(name: str) -> Any:
    # RedisLedger needs redis-py (the [redis] extra); import it only when asked for.
    if name == "RedisLedger":
        from .ledger.redis import RedisLedger

        return RedisLedger
    raise AttributeError(f"module 'usage_middleware' has no attribute {name!r}")
