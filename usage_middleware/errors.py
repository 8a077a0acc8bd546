"""The exceptions usage_middleware raises.

::

    UsageMiddlewareError
    ├── ConfigurationError        a bad setting, raised at start-up or decoration time
    │   │                         (also a ValueError)
    │   └── PricingError          a pricing.json that does not validate
    ├── LedgerError               a ledger admin call refused (unknown plan, bad units)
    └── ProviderError             a billing provider refused or could not be reached
        ├── RetryableProviderError   network, timeout, 429, 5xx: try again later
        └── PermanentProviderError   4xx validation: retrying cannot help

``ProviderError`` carries what the provider said (``status``, ``code``, ``message``) and the
exception it was raised from in ``original_error``. Provider code raises it ``from exc`` at
the provider boundary, so nothing above that boundary sees an ``httpx`` exception.

Errors never carry access tokens or API keys in their messages.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "LedgerError",
    "PermanentProviderError",
    "PricingError",
    "ProviderError",
    "RetryableProviderError",
    "UsageMiddlewareError",
]


class UsageMiddlewareError(Exception):
    """Base class of every exception usage_middleware raises on purpose."""


class ConfigurationError(UsageMiddlewareError, ValueError):
    """The toolkit is set up wrongly; the message names the fix.

    Raised for every bad setting (constructor arguments of the middleware, ledgers and
    providers, ``@metered`` arguments, pricing), at start-up or decoration time (never on a
    request when avoidable). It is also a ``ValueError``, so code that caught the
    ``ValueError`` some constructors raised before keeps working.
    """


class PricingError(ConfigurationError):
    """A Tier pricing.json does not validate; the message names the plan or feature."""


class LedgerError(UsageMiddlewareError):
    """A ledger admin call was refused: unknown plan or customer, or bad units."""


class ProviderError(UsageMiddlewareError):
    """A billing provider refused a call or could not be reached.

    Attributes:
        status: the HTTP status the provider answered with, or ``None`` when no answer
            arrived (network error, timeout).
        code: the provider's machine-readable error code (Tier's ``code``, Spaire's
            ``error``), or ``None``.
        message: the provider's human-readable message (never a token or key).
        retry_after: seconds the provider asked us to wait (``Retry-After``, capped by the
            provider's ``max_retry_after``), or ``None``.
        ambiguous: the call may have reached the provider although it failed (a read
            timeout, a connection reset after sending) and the provider cannot
            deduplicate it: a resend may count it twice. The Reporter resends such a
            charge at most once more, then dead-letters it with code ``"ambiguous"``.
        original_error: the exception this error was raised from, or ``None``.
    """

    #: Whether trying the same call again later can succeed.
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        original_error: BaseException | None = None,
        ambiguous: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.original_error = original_error
        self.ambiguous = ambiguous

    def __str__(self) -> str:
        parts = [self.message]
        if self.status is not None:
            parts.append(f"status={self.status}")
        if self.code:
            parts.append(f"code={self.code}")
        return " ".join(parts) if len(parts) == 1 else f"{parts[0]} ({', '.join(parts[1:])})"


class RetryableProviderError(ProviderError):
    """The call may succeed later: network error, timeout, 429 or 5xx."""

    retryable = True


class PermanentProviderError(ProviderError):
    """The provider rejected the call itself (4xx validation); retrying cannot help."""

    retryable = False
