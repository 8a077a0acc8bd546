"""usage_middleware: meter and charge for API features from one ASGI middleware."""

from .errors import (
    ConfigurationError,
    LedgerError,
    PermanentProviderError,
    PricingError,
    ProviderError,
    RetryableProviderError,
    UsageMiddlewareError,
)
from .models import UNLIMITED, Answer, Reservation, UsageEvent
from .providers.base import Provider

__all__ = [
    "UNLIMITED",
    "Answer",
    "ConfigurationError",
    "LedgerError",
    "PermanentProviderError",
    "PricingError",
    "Provider",
    "ProviderError",
    "Reservation",
    "RetryableProviderError",
    "UsageEvent",
    "UsageMiddlewareError",
]
