"""Local accounting: what this process spent that a provider's last answer lacks.

The rule (docs/architecture.md, "Remote providers"): the balance a check uses is the
provider's last answer minus exactly the units the provider had not yet counted when it
answered. :class:`Account` keeps, per account key, the units in flight, pending and
delivered; :class:`Entry` is a fetched :class:`Entitlement` with its *mark* (the delivered
total the answer includes); :class:`Hold` is a reservation's token; :class:`Charge` is how
one delivered event is counted; :class:`Accounts` is one provider's table of accounts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection

from ...models import UNLIMITED, UsageEvent
from .entitlement import Entitlement

__all__ = ["Account", "Accounts", "Charge", "Entry", "Hold", "available"]

#: An account key: ``(customer, feature)``, or what ``RemoteProvider.account_key`` maps it to.
Key = tuple[str, str]


#: What one delivered usage event takes from the balance ``RemoteProvider.fetch`` reads:
#: ``((customer, feature), units)``, ``units`` > 0 in the provider's accounting units (ARES:
#: thousandths of a credit of its one credits feature). A plain tuple: one is made per
#: delivered event.
Charge = tuple[tuple[str, str], int]

#: Seconds within which charges of one account share a record of ``Account.queue``.
_BUCKET = 0.05


class Account:
    """Local accounting for one (customer, feature), in units.

    ``inflight``: held by reservations not yet settled. ``pending``: charged here and not
    yet delivered (each charge also kept with its time in ``queue``, so a charge whose
    delivery this process never sees stops counting after ``delivery_allowance``).
    ``delivered``: a running total of units delivered to the provider (by this process's
    delivery, or reported from elsewhere) that the provider counted as new; ``log`` keeps
    ``(when, total)`` for the last ``balance_lag`` seconds, so a fetch can tell which
    deliveries its answer may not include (see :meth:`mark`).
    """

    __slots__ = ("delivered", "inflight", "log", "log_base", "pending", "queue", "touched")

    def __init__(self, now: float) -> None:
        self.touched = now  # last time a fetch, delivery or failed-open check used it
        self.inflight = 0
        self.pending = 0
        # [last committed_at, units not yet delivered, first committed_at]
        self.queue: deque[list[float]] = deque()
        self.delivered = 0
        self.log: deque[tuple[float, int]] = deque()  # (delivered_at, total after it)
        self.log_base = 0  # ``delivered`` before the oldest ``log`` record

    def charge(self, now: float, units: int) -> None:
        """``units`` were committed here and queued for delivery.

        Charges within ``_BUCKET`` seconds of a record's first share that record, stamped
        with the latest of them (so each counts at least ``delivery_allowance`` seconds):
        not one record kept per request while deliveries are on their way.
        """
        if units <= 0:  # a clobber sets usage: nothing to subtract
            return
        self.pending += units
        queue = self.queue
        if queue and now - queue[-1][2] < _BUCKET:
            last = queue[-1]
            last[0] = now
            last[1] += units
        else:
            queue.append([now, units, now])

    def arrived(self, now: float, units: int, counted: bool, lag: float) -> None:
        """``units`` reached the provider; ``counted``: it took them as new usage."""
        left = units
        queue = self.queue
        while left and queue:
            head = queue[0]
            take = min(left, int(head[1]))
            head[1] -= take
            self.pending -= take
            left -= take
            if not head[1]:
                queue.popleft()
        if counted:
            self.delivered += units
            if lag > 0:
                self.log.append((now, self.delivered))
                self._trim(now, lag)

    def expire(self, now: float, allowance: float) -> None:
        """Stop counting charges whose delivery was not seen within ``allowance`` seconds."""
        queue = self.queue
        while queue and queue[0][0] + allowance <= now:
            self.pending -= int(queue.popleft()[1])

    def mark(self, now: float, lag: float) -> int:
        """The delivered total the provider's numbers include for a read starting ``now``.

        Deliveries completed at least ``lag`` seconds ago are in it; later ones (and
        those in flight) are not, and an answer subtracts them.
        """
        if lag <= 0:
            return self.delivered
        self._trim(now, lag)
        cutoff = now - lag
        total = self.log_base
        for at, after in self.log:
            if at > cutoff:
                break
            total = after
        return total

    def _trim(self, now: float, lag: float) -> None:
        log = self.log
        cutoff = now - lag
        while len(log) > 1 and log[1][0] <= cutoff:
            self.log_base = log.popleft()[1]

    def idle(self, now: float, lag: float) -> bool:
        log = self.log
        return self.inflight == 0 and self.pending == 0 and (not log or log[-1][0] <= now - lag)


class Entry:
    """A fetched entitlement plus the mark that tells which later charges it lacks."""

    __slots__ = ("account", "ambiguous", "ent", "fetched_at", "mark", "ttl")

    def __init__(
        self,
        ent: Entitlement,
        fetched_at: float,
        mark: int,
        account: Account,
        ttl: float,
        ambiguous: bool = False,
    ) -> None:
        self.ent = ent
        self.fetched_at = fetched_at  # when the answer arrived (for Answer.age and TTLs)
        self.mark = mark  # account.delivered total the provider's answer includes
        self.account = account
        self.ttl = ttl
        #: deliveries completed while the fetch was in flight: the provider may have
        #: counted them, but they are subtracted (conservative); a refusal asks again
        self.ambiguous = ambiguous

    def unseen(self) -> int:
        """Units charged here that the provider's answer does not include: pending, plus
        delivered after the answer's mark."""
        account = self.account
        return account.pending + account.delivered - self.mark


class Hold:
    """Reservation.token of a RemoteProvider reservation that holds units.

    A reservation served from the cache (the warm path) also keeps what its answer needs
    (``entry``, ``unseen``, ``remaining``, ``at``): the ``Answer`` is built only if someone
    reads ``reservation.answer``. ``entry`` (also set on the cold path) is what an excess
    beyond the hold is checked against at settlement; ``units`` follows the actual units
    once sized (``RemoteProvider._sized``).
    """

    __slots__ = (
        "account",
        "at",
        "entry",
        "final",
        "prepared",
        "remaining",
        "sized",
        "units",
        "unseen",
    )

    def __init__(self, account: Account, units: int) -> None:
        self.account = account
        self.units = units
        self.prepared = False
        #: Whether the hold was sized to the request's actual units (``final`` set).
        self.sized = False
        #: The event the reservation charges (its actual units), or ``None`` for 0 units.
        self.final: UsageEvent | None = None
        self.entry: Entry | None = None
        self.unseen = 0
        self.remaining = 0
        self.at = 0.0


class Accounts(dict[Key, Account]):
    """One provider's accounts by account key; idle ones are forgotten (bounds memory).

    ``sweep_at``: the table size at which :meth:`add` sweeps first (twice what the last
    sweep kept, at least the initial value).
    """

    __slots__ = ("sweep_at",)

    def __init__(self, sweep_at: int) -> None:
        super().__init__()
        self.sweep_at = sweep_at

    def crowded(self) -> bool:
        """Whether a new account should wait for a :meth:`sweep` first."""
        return len(self) >= self.sweep_at

    def sweep(
        self, now: float, in_use: Collection[Key], *, allowance: float, lag: float, quiet: float
    ) -> None:
        """Forget idle accounts nothing refers to any more.

        An account is kept while units are in flight or charges may be unseen (pending
        within ``allowance``, delivered within ``lag``), while its key is ``in_use`` (a
        cache entry or fetch), and for ``quiet`` seconds after its last use (so a caller
        that just got a fetch's result still finds the same account).
        """
        for key, account in list(self.items()):
            account.expire(now, allowance)
            if account.idle(now, lag) and now - account.touched > quiet and key not in in_use:
                del self[key]
        self.sweep_at = max(self.sweep_at, 2 * len(self))


def available(entry: Entry) -> int:
    """Units a check may use now: the provider's ``remaining`` less what it has not seen
    (pending, delivered after its mark) and what is in flight; ``UNLIMITED`` stays."""
    ent = entry.ent
    if ent.remaining >= UNLIMITED:
        return UNLIMITED
    return ent.remaining - entry.unseen() - entry.account.inflight
