"""The numbers a remote provider's entitlement check returns."""

from __future__ import annotations

from dataclasses import dataclass

from ...models import UNLIMITED

__all__ = ["Entitlement"]


@dataclass(frozen=True, slots=True)
class Entitlement:
    """What a remote provider said about one customer and feature, in units of usage.

    The numbers :meth:`RemoteProvider.fetch` returns and the entitlement cache keeps. It
    is not what a check answers: the check subtracts this process's unseen spending from
    it and answers an :class:`~usage_middleware.models.Answer`. (Its cousins:
    ``Answer`` = a check's answer to one request; ``ledger.FeatureUsage`` = one row of a
    ledger's usage report; ``tier.FeatureLimit`` = one line of Tier's ``/v1/limits``.)

    Attributes:
        limit: the plan's limit this period (``UNLIMITED`` for none), or ``None`` if unknown.
        used: units used this period, or ``None`` if unknown.
        remaining: units available now per the provider (``UNLIMITED`` = no limit); may be
            ``<= 0``. Includes credits where the provider has them.
        reason: why nothing is available (``"feature not in plan"``), or ``None``.

    Raises:
        ValueError: at creation, when ``remaining`` is not an ``int``.
    """

    limit: int | None
    used: int | None
    remaining: int
    reason: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.remaining, bool) or not isinstance(self.remaining, int):
            raise ValueError(
                f"Entitlement.remaining must be whole units (int), got {self.remaining!r}"
            )

    @property
    def unlimited(self) -> bool:
        """Whether the provider sets no limit (``remaining >= UNLIMITED``)."""
        return self.remaining >= UNLIMITED
