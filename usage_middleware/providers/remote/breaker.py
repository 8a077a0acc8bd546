"""The circuit breaker in front of a remote provider's entitlement checks."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["CircuitBreaker"]


class CircuitBreaker:
    """A consecutive-failure circuit breaker: closed -> open -> half-open (one probe).

    Args:
        failures: consecutive failures that open it (>= 1).
        cooldown: seconds it stays open before letting one probe through.
        clock: monotonic seconds.
    """

    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float]) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self._clock = clock
        self._count = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` (cooling down) or ``"half-open"`` (probe allowed/running)."""
        if self._opened_at is None:
            return "closed"
        if self._probing or self._clock() - self._opened_at >= self.cooldown:
            return "half-open"
        return "open"

    def allow(self) -> float | None:
        """``None`` if a call may go out now (the probe, when half-open), else seconds to wait."""
        if self._opened_at is None:
            return None
        wait = self._opened_at + self.cooldown - self._clock()
        if wait > 0:
            return wait
        if self._probing:  # the probe is out; its result decides
            return 0.0
        self._probing = True
        return None

    def success(self) -> None:
        """A call got an answer: close."""
        self._count = 0
        self._opened_at = None
        self._probing = False

    def failure(self) -> None:
        """A call failed: count it; open at the threshold; a failed probe re-opens."""
        self._count += 1
        if self._probing or self._count >= self.failures:
            self._opened_at = self._clock()
            self._probing = False
