"""The Reporter's writer: every change to the outbox in one transaction (group commit).

Accepted events, delivered rows to delete, rows to hand back, dead letters and released
rows collect in memory; one :meth:`~usage_middleware.outbox.Outbox.apply` writes them all.
Prepares commit at the end of their event-loop turn (:meth:`GroupCommit._turn_commit`,
one transaction for the turn's prepares), or inline in the caller's step when one request
is in flight (``prepare_alone``); everything else (and a commit the file was too busy
for) in the writer task, inline on the loop when the file is free, else on the Reporter's
thread (:class:`~usage_middleware._sqlite.InlineRunner`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence

from ..models import UsageEvent
from ..outbox import Outbox
from ..provider import ProviderState
from ._state import (
    CANCELLED,
    CHECKPOINT_EVERY,
    HELD,
    LONELY_TURNS,
    READY,
    Entry,
    Shared,
    log,
    resolve,
)

__all__ = ["GroupCommit"]


class _Changes:
    """What one group commit writes, taken from the queues (put back if it fails)."""

    __slots__ = ("dead", "deletes", "frees", "inserts", "releases", "waiters", "written")

    def __init__(
        self,
        written: list[Entry],
        inserts: list[tuple[UsageEvent, bool, bool]],
        deletes: list[int],
        frees: list[int],
        dead: list[tuple[int, int | None, str | None, str | None]],
        releases: list[tuple[int, float, str]],
        waiters: list[asyncio.Future[None]],
    ) -> None:
        self.written = written
        self.inserts = inserts
        self.deletes = deletes
        self.frees = frees
        self.dead = dead
        self.releases = releases
        self.waiters = waiters


class GroupCommit(Shared):
    """The group commit: :meth:`_writer` (a task) and :meth:`_commit_inline`."""

    def _has_changes(self) -> bool:
        return bool(self._pending or self._deletes or self._frees or self._dead or self._releases)

    def _take_changes(self) -> _Changes:
        inserts, written = self._plan(self._pending)
        changes = _Changes(
            written,
            inserts,
            self._deletes,
            self._frees,
            self._dead,
            self._releases,
            self._waiters,
        )
        self._pending, self._deletes, self._frees = [], [], []
        self._dead, self._releases, self._waiters = [], [], []
        return changes

    def _put_back(self, c: _Changes) -> None:
        """The commit failed: keep its changes, ahead of newer ones, for the next one."""
        self._pending[:0] = c.written
        self._deletes[:0] = c.deletes
        self._frees[:0] = c.frees
        self._dead[:0] = c.dead
        self._releases[:0] = c.releases
        self._waiters[:0] = c.waiters

    def _apply(self, outbox: Outbox, c: _Changes) -> Callable[[], int]:
        """The one blocking call that writes ``c`` (returns the first inserted row id)."""
        return functools.partial(
            outbox.apply,
            self._owner,
            c.inserts,
            deletes=c.deletes,
            frees=c.frees,
            dead=c.dead,
            releases=c.releases,
        )

    def _committed(self, c: _Changes, first: int) -> None:
        self._route(c.written, first, freed=bool(c.frees or c.releases))
        resolve(c.waiters)

    async def _writer(self) -> None:
        outbox = self._outbox
        assert outbox is not None
        failures = 0
        while True:
            if not (self._has_changes() or self._waiters):
                if self._closing and not self._senders_alive():
                    return
                self._writer_wake.clear()
                await self._writer_wake.wait()
                continue
            if not self._has_changes():
                waiters, self._waiters = self._waiters, []
                resolve(waiters)  # nothing to write since they asked
                continue
            c = self._take_changes()
            self._writing = len(c.written)
            try:
                first = await self._sqlite.call(self._apply(outbox, c))
            except Exception:
                failures += 1
                self._writing = 0
                if failures == 1 or failures % 100 == 0:
                    log.exception(
                        "cannot write the outbox %s (attempt %d); %d events kept in memory",
                        self.path,
                        failures,
                        len(c.written),
                    )
                waiters, c.waiters = c.waiters, []
                self._put_back(c)
                resolve(waiters)  # a request never waits on a broken disk
                if self._closing and not self._senders_alive():
                    return
                await asyncio.sleep(min(0.05 * 2**failures, 2.0))
                continue
            failures = 0
            self._writing = 0
            self._committed(c, first)

    def _turn_commit(self) -> asyncio.Future[None]:
        """A future resolved once the prepares of this event-loop turn are committed.

        One group commit for them all, run by :meth:`_end_turn`, a callback the loop runs
        after every callback that was ready before it (the other requests read in this
        iteration included): a response waits for the batch its charge is in, one loop
        turn, and no task hop. Resolved at once when the writer does not run (closed).
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if not self._writer_running():
            fut.set_result(None)
            return fut
        self._waiters.append(fut)
        self._turn_members += 1
        if self._turn is None:
            self._turn = loop.call_soon(self._end_turn)
        return fut

    def _end_turn(self) -> None:
        """The end of a loop turn with prepares in it: commit them (inline, else through
        the writer), and note whether prepares share loop turns (then ``prepare_alone``
        joins the turn's commit) or come one per turn (then it commits inline again)."""
        self._turn = None
        members, self._turn_members = self._turn_members, 0
        if members > 1:
            self._grouping = True
            self._lonely = 0
        elif self._grouping:
            self._lonely += 1
            if self._lonely >= LONELY_TURNS:
                self._grouping = False
                self._lonely = 0
        if self._pending and not self._commit_inline():
            self._writer_wake.set()  # the writer commits (and resolves the waiters)

    def _commit_inline(self) -> bool:
        """Run the group commit now, in the caller's step, when nothing else is writing.

        Whether it committed. False (nothing changed) when the writer or the reporter's
        thread is busy, the reporter is not open, or the file is locked by another process
        or failing; the writer task then does it (waiting for the lock, logging errors).
        """
        outbox = self._outbox
        if (
            self._state is not ProviderState.OPEN
            or self._closing
            or self._writing
            or self._sqlite.threaded
            or outbox is None
        ):
            return False
        pending = self._pending
        if (
            len(pending) == 1
            and pending[0].state == HELD
            and not (self._deletes or self._frees or self._dead or self._releases or self._waiters)
        ):
            return self._insert_held(outbox, pending[0])
        c = self._take_changes()
        try:
            done, first = self._sqlite.try_inline(self._apply(outbox, c))
        except Exception:
            done, first = False, None
        if not done or first is None:
            self._put_back(c)
            self._writer_wake.set()
            return False
        self._committed(c, first)
        return True

    def _insert_held(self, outbox: Outbox, entry: Entry) -> bool:
        """:meth:`_commit_inline` of the common case at one request in flight: one prepared
        row and nothing else to write (one statement; none of the group's bookkeeping)."""
        try:
            done, rowid = self._sqlite.try_inline(
                outbox.apply, self._owner, ((entry.event, True, True),)
            )
        except Exception:
            done, rowid = False, None
        if not done or not rowid:
            self._writer_wake.set()  # the entry stays pending: the writer commits it
            return False
        self._pending = []
        entry.owned = True
        entry.rowid = rowid
        self._commits += 1
        if self._commits >= CHECKPOINT_EVERY:
            self._commits = 0
            self._checkpoint_wake.set()
        return True

    async def _commit_on_close(self) -> None:
        """Write what is waiting in memory from a loop other than the writer's (whose loop
        is gone); on failure write the events as free rows on a connection of their own."""
        outbox = self._outbox
        assert outbox is not None
        c = self._take_changes()
        try:
            first = await self._sqlite.call(self._apply(outbox, c))
            for i, entry in enumerate(c.written):
                entry.rowid = first + i
        except Exception:
            log.exception("outbox %s: writing on close failed", self.path)
            await asyncio.to_thread(self._write_direct, c.written)

    def _plan(
        self, entries: list[Entry]
    ) -> tuple[list[tuple[UsageEvent, bool, bool]], list[Entry]]:
        """The rows a group commit inserts for ``entries`` (cancelled ones skipped), and
        which entries they are. A ready row is owned (kept in memory) while there is room."""
        room = self._room()
        inserts: list[tuple[UsageEvent, bool, bool]] = []
        written: list[Entry] = []
        for e in entries:
            if e.state == CANCELLED:
                continue
            held = e.state == HELD
            owned = held or room > 0
            if not held and owned:
                room -= 1
            e.owned = owned
            inserts.append((e.event, owned, held))
            written.append(e)
        return inserts, written

    def _route(self, written: list[Entry], first: int, *, freed: bool) -> None:
        """After a group commit: give entries their row ids and send on the ready ones.

        ``freed``: the commit handed rows back to the outbox; a sender should claim them
        (a draining reporter stops once it thinks the outbox holds nothing for it).
        """
        spilled = freed
        for i, e in enumerate(written):
            e.rowid = first + i
            if e.state == READY:
                if not e.owned:
                    spilled = True
                elif self._room() > 0:
                    self._push_ready(e)
                else:  # prepared, then confirmed while being written; no room
                    self._frees.append(e.rowid)
            elif e.state == CANCELLED:  # cancelled while being written
                self._deletes.append(e.rowid)
        if spilled:
            self._mark_dirty()
        elif self._closing:  # a closing sender waits for held/pending to empty
            self._sender_wake.set()
        self._commits += 1
        if self._commits >= CHECKPOINT_EVERY:
            self._commits = 0
            self._checkpoint_wake.set()

    # -- writes from outside the running reporter (before open / after close) ----------------

    def _direct(self) -> tuple[Outbox, bool]:
        """A connection for a write outside the running reporter, and whether to close it."""
        if self.in_memory:
            return self._memory_outbox(), False
        return Outbox(self.path, synchronous=self._synchronous), True

    def _write_direct(self, entries: Sequence[Entry]) -> None:
        """Write entries as free rows from outside the running reporter (before open /
        after close); any worker, or the next process, delivers them."""
        todo = [e for e in entries if e.state != CANCELLED]
        if not todo:
            return
        outbox, close = self._direct()
        try:
            first = outbox.apply(0, [(e.event, False, False) for e in todo])
        finally:
            if close:
                outbox.close()
        for i, e in enumerate(todo):
            e.rowid = first + i  # a later cancel() deletes it directly

    def _delete_direct(self, rowid: int, key: str) -> None:
        outbox, close = self._direct()
        try:
            outbox.delete(rowid, key)
        finally:
            if close:
                outbox.close()

    def _late(self, event: UsageEvent) -> None:
        log.warning(
            "event %s for %s arrived after the reporter closed; writing it to the outbox",
            event.idempotency_key,
            event.feature,
        )
        try:
            self._write_direct([Entry(event, READY, 0.0)])
        except Exception:
            log.exception("could not write a late event to %s; it is lost", self.path)
