"""Admission: which waiting request gets the free sequence slots next, fairly across API keys.

Every request belongs to a tenant, the API key it came with (service/auth.py: `Tenants`; with no
keys configured every caller is one tenant). Each tenant has a queue of its own, oldest first, and
admission takes the tenants in turn, one request each (round robin), so that a key with hundreds
of requests waiting delays another key's request by at most one of its own, not by its whole
queue. A tenant joins the back of the turn when its first request arrives and leaves it when it
has none waiting.

A request of n choices needs n free slots at once (choices.py). When the request whose turn it is
does not fit, the turn holds: nothing behind it is admitted until enough slots are free. Letting
smaller requests go first would use the free slots now but could pass a large request for ever;
holding the turn means that between two requests of one tenant, each other tenant gets at most one.

Turns alone cannot help a request that arrives while one tenant holds every slot: it must wait for
one of that tenant's requests to finish, however long they run. So, when set, `max_slots_per_tenant`
caps the slots one tenant's running requests hold (the default leaves one slot of the engine for the
other keys when there are several: models.py). A tenant at its cap is passed over, keeping its place
in the turn, and a request of more choices than the cap is admitted when its tenant holds no slot.

Two limits, both checked when a request arrives and refused with RESOURCE_EXHAUSTED: `max_waiting`
requests waiting in all (`QueueFull`), and, when set, `max_inflight_per_tenant` requests of one
tenant waiting or running at once (`InFlightLimit`), so that one key cannot fill the whole queue
and lock the others out of it.

The scheduler calls every method under its lock; this class takes none of its own.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from service.errors import InFlightLimit, QueueFull

Request = TypeVar("Request")


@dataclass(eq=False)
class Ticket(Generic[Request]):
    """One request's place: whose it is, how many slots it needs, and where it stands."""

    tenant: Hashable
    request: Request
    slots: int
    waiting: bool = True  # in its tenant's queue, not admitted yet
    over: bool = False  # finished, failed or cancelled: no longer counted against its tenant


class FairQueue(Generic[Request]):
    """The waiting requests, a queue per tenant, admitted tenants in turn."""

    def __init__(self, *, max_waiting: int, max_inflight_per_tenant: int = 0, max_slots_per_tenant: int = 0) -> None:
        self._max_waiting = max_waiting
        self._max_inflight = max_inflight_per_tenant  # 0: no limit
        self._max_slots = max_slots_per_tenant  # 0: no limit
        self._queues: dict[Hashable, collections.deque[Ticket[Request]]] = {}
        self._turns: collections.deque[Hashable] = collections.deque()  # tenants with requests waiting, next first
        self._waiting = 0
        self._inflight: collections.Counter[Hashable] = collections.Counter()  # waiting + running, per tenant

    def __len__(self) -> int:
        """Requests waiting, all tenants together."""
        return self._waiting

    @property
    def running(self) -> int:
        """Requests admitted and not over yet, all tenants together."""
        return sum(self._inflight.values()) - self._waiting

    def inflight(self, tenant: Hashable) -> int:
        """The tenant's requests waiting or running."""
        return self._inflight[tenant]

    def check(self, tenant: Hashable) -> None:
        """Refuses as push() would now: lets the caller refuse a request before the work of preparing it."""
        if self._max_inflight and self._inflight[tenant] >= self._max_inflight:
            raise InFlightLimit(
                f"Too many requests for this API key: {self._inflight[tenant]} are waiting or running, the most "
                "one key may have at once. Retry when one of them finishes."
            )
        if self._waiting >= self._max_waiting:
            raise QueueFull(f"The server is busy: {self._waiting} requests are waiting. Retry later.")

    def push(self, tenant: Hashable, request: Request, slots: int) -> Ticket[Request]:
        """Queue a request that needs `slots` sequence slots; refuses it when a limit is reached."""
        self.check(tenant)
        ticket = Ticket(tenant, request, slots)
        queue = self._queues.get(tenant)
        if queue is None:
            queue = self._queues[tenant] = collections.deque()
            self._turns.append(tenant)
        queue.append(ticket)
        self._waiting += 1
        self._inflight[tenant] += 1
        return ticket

    def take(self, free: int, held: Mapping[Hashable, int] | None = None) -> list[Request]:
        """The requests to admit now into `free` slots: one per tenant in turn, while the next one fits.
        `held`: the slots each tenant's running requests hold, for the cap per tenant."""
        held = dict(held or {})
        admitted = []
        passed: list[Hashable] = []  # tenants at their cap: they keep their place in the turn
        while self._turns:
            tenant = self._turns[0]
            queue = self._queues[tenant]
            ticket = queue[0]
            holding = held.get(tenant, 0)
            if self._max_slots and holding and holding + ticket.slots > self._max_slots:
                passed.append(self._turns.popleft())
                continue
            if ticket.slots > free:
                break  # the turn holds (see the module's docstring)
            queue.popleft()
            ticket.waiting = False
            self._waiting -= 1
            free -= ticket.slots
            held[tenant] = holding + ticket.slots
            admitted.append(ticket.request)
            self._turns.popleft()
            if queue:
                self._turns.append(tenant)
            else:
                del self._queues[tenant]
        self._turns.extendleft(reversed(passed))
        return admitted

    def end(self, ticket: Ticket[Request]) -> bool:
        """The request is over (finished, failed or cancelled): it stops counting against its tenant and
        leaves the queue if it was still waiting. Returns whether it was waiting; ending it again does
        nothing."""
        if ticket.over:
            return False
        ticket.over = True
        self._inflight[ticket.tenant] -= 1
        if not self._inflight[ticket.tenant]:
            del self._inflight[ticket.tenant]
        if not ticket.waiting:
            return False
        ticket.waiting = False
        self._waiting -= 1
        queue = self._queues[ticket.tenant]
        queue.remove(ticket)
        if not queue:
            del self._queues[ticket.tenant]
            self._turns.remove(ticket.tenant)
        return True

    def drain(self) -> list[Request]:
        """Every waiting request, removed from the queue (the server is stopping)."""
        drained = [ticket.request for tenant in self._turns for ticket in self._queues[tenant]]
        for queue in self._queues.values():
            for ticket in queue:
                ticket.waiting = False
        self._queues.clear()
        self._turns.clear()
        self._waiting = 0
        return drained
