"""The base of remote providers (Tier, Spaire, ARES), one idea per module:

* :mod:`.entitlement`: :class:`Entitlement`, the numbers one remote check returns;
* :mod:`.cache`: the entitlement cache and the single-flight of concurrent misses;
* :mod:`.accounting`: local accounting (accounts, holds, the mark) that keeps a cached
  answer from letting one process overspend;
* :mod:`.breaker`: :class:`CircuitBreaker`, in front of the checks;
* :mod:`.base`: :class:`RemoteProvider`, the lifecycle and the reservation cycle
  (check, hold, prepare, commit or release, delivery) built on the subclass's two hooks,
  ``fetch`` and ``send``.

The design (the accounting rule, failure policy, hold lifetime): docs/architecture.md,
"Remote providers".
"""

from .accounting import Charge
from .base import RemoteProvider, ReporterLike
from .breaker import CircuitBreaker
from .entitlement import Entitlement

__all__ = ["Charge", "CircuitBreaker", "Entitlement", "RemoteProvider", "ReporterLike"]
