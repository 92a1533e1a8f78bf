"""Fair shares per API key: the engine's queue of one model, with a FIFO per tenant.

Which request gets the next free row is decided by start-time fair queuing (SFQ) over tenants,
counted in characters of work (seed characters + max_new_chars, scaled by 1/weight):

- each tenant has a virtual finish tag, the end of the work it has been given so far;
- the request at the head of a tenant's queue starts at max(V, that tag), where V is the
  start tag of the request admitted last; the head with the smallest start tag (then the oldest)
  gets the row, and its tenant's tag moves on by its cost / weight;
- a request that ends early (a stop string, a cancel) gives its unused characters back.

So over a sustained run every tenant with work waiting gets characters in proportion to its
weight, and a tenant that was idle starts at V: it is next, never behind another's backlog.
Without keys every request belongs to one tenant and this is exactly the FIFO it replaces.

Rows are the other half. Admission order alone cannot help a newcomer once a flood holds every
row: it would wait for a flood request to finish (a whole request, however long). So while
more than one key is configured, a tenant holding at least its weighted share of the rows
(max_batch x weight / sum of weights) may not take the last free rows: one is kept for each
configured key that holds none and queues nothing, up to RESERVE_FRACTION of the rows. A key
that starts sending finds a row at once and reaches its first character in the next
iteration. The cost: a lone flood runs on up to 1/8 fewer rows; on a CPU an iteration's cost
grows with its rows, so its characters per second drop by much less (bench/fairness.py).

Budgets (`chars_per_min`) are token buckets here, in the engine, because it sees every request
for its model from every HTTP worker: the budget holds however many workers there are. A
request is charged its whole cost (seed + max_new_chars) when queued and given back what it did
not use when it ends. A bucket holds one minute's budget; a request costing more than that is
admitted when the bucket is full and leaves it in debt, so it is possible but rare.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from app.engine.batch import Sequence
from app.engine.messages import GenerationRequest
from app.tenants import ANONYMOUS, TenantSpec

# At most this fraction of the rows is kept free for configured keys that hold no row.
RESERVE_FRACTION = 1 / 8
UNKNOWN = "unknown"  # requests whose scope is no configured key's (none come over HTTP)


class KeyObserver(Protocol):
    def on_key(self, key: str, queued: int, rows: int) -> None: ...
    def on_key_finish(self, key: str, outcome: str, seed_chars: int, generated: int) -> None: ...


def cost(req: GenerationRequest) -> int:
    """Characters of work a request asks for: its seed's prefill and its new characters."""
    return len(req.seed_ids) + req.max_new


@dataclass(eq=False)
class Tenant:
    spec: TenantSpec
    queue: deque[tuple[int, Sequence]] = field(default_factory=deque)  # (arrival, sequence)
    finish: float = 0.0  # virtual finish tag of the work admitted so far
    rows: int = 0  # rows held: admitted, not yet finished
    tokens: float = 0.0  # budget bucket, characters
    refilled_at: float = 0.0
    published: tuple[int, int] | None = None

    @property
    def idle(self) -> bool:
        return self.rows == 0 and not self.queue


@dataclass
class _Held:
    tenant: Tenant
    admitted: bool = False


class FairQueue:
    """The waiting requests of one engine, with the deque operations the core uses (append,
    iteration in service order, remove, clear, len) and `pop(free_rows)` for admission."""

    def __init__(self, tenants: dict[bytes, TenantSpec] | None = None, max_batch: int = 256,
                 observer: KeyObserver | None = None) -> None:
        table = tenants or {}
        self.max_batch = max_batch
        self.observer = observer
        now = time.perf_counter()
        self.by_scope: dict[bytes, Tenant] = {
            scope: Tenant(spec, tokens=float(spec.chars_per_min or 0), refilled_at=now)
            for scope, spec in table.items()}
        self.configured = list(self.by_scope.values())
        self.total_weight = sum(t.spec.weight for t in self.configured)
        # Everything not configured (no keys at all: every request) is this one tenant.
        self.default = Tenant(TenantSpec(UNKNOWN if table else ANONYMOUS))
        self.tenants = [*self.configured, self.default]
        self.reserve_cap = (max(1, int(max_batch * RESERVE_FRACTION))
                            if len(self.configured) > 1 else 0)
        self.virtual = 0.0  # V: the start tag of the request admitted last
        self._arrivals = itertools.count()
        self._count = 0
        self._held: dict[Sequence, _Held] = {}  # queued or holding a row, until it finishes

    # --- lookups --------------------------------------------------------------------------
    def tenant(self, req: GenerationRequest) -> Tenant:
        return self.by_scope.get(req.cache_scope, self.default)

    def name(self, req: GenerationRequest) -> str:
        return self.tenant(req).spec.name

    def share(self, t: Tenant) -> float:
        """The tenant's weighted share of the rows (all of them without keys)."""
        if t is self.default or not self.total_weight:
            return float(self.max_batch)
        return self.max_batch * t.spec.weight / self.total_weight

    def reserve(self, t: Tenant, idle: int | None = None) -> int:
        """Free rows `t` may not take while it holds its share: one per other configured key
        that is idle (`idle`: how many configured keys are, if known)."""
        if not self.reserve_cap or t.rows < self.share(t):
            return 0
        if idle is None:
            idle = sum(1 for u in self.configured if u.idle)
        return min(idle - t.idle, self.reserve_cap)

    def rows_for(self, req: GenerationRequest | None, free: int) -> int:
        """Free rows a request of this tenant could take now."""
        if req is None:
            return free
        return max(free - self.reserve(self.tenant(req)), 0)

    # --- the deque the core reads -----------------------------------------------------------
    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[Sequence]:
        """In service order, as far as it is known now (start tags, then arrival)."""
        busy = [t for t in self.tenants if t.queue]
        if len(busy) == 1:
            return (s for _, s in busy[0].queue)
        return (s for _, _, s in sorted(self._chains(busy)))

    def append(self, seq: Sequence) -> None:
        t = self.tenant(seq.req)
        t.queue.append((next(self._arrivals), seq))
        self._count += 1
        self._held[seq] = _Held(t)
        if t.spec.chars_per_min:
            self._refill(t, time.perf_counter())
            t.tokens -= cost(seq.req)
        self._publish(t)

    def remove(self, seq: Sequence) -> None:
        t = self.tenant(seq.req)
        for i, (_, s) in enumerate(t.queue):
            if s is seq:
                del t.queue[i]
                self._count -= 1
                self._publish(t)
                return
        raise ValueError("not queued")

    def clear(self) -> None:
        for t in self.tenants:
            t.queue.clear()
            self._publish(t)
        self._count = 0

    def pop(self, free: int) -> Sequence | None:
        """The next request to get its rows among `free` (n for n choices), or None (nothing
        queued, no tenant's next request fits, or every tenant with work waits for rows kept
        for others)."""
        best: tuple[float, int, Tenant] | None = None
        idle = sum(1 for u in self.configured if u.idle) if self.reserve_cap else 0
        for t in self.tenants:
            # Its next request must fit whole (n choices take n rows) in the rows it may take.
            if not t.queue or free - self.reserve(t, idle) < t.queue[0][1].rows:
                continue
            key = (max(self.virtual, t.finish), t.queue[0][0], t)
            if best is None or key[:2] < best[:2]:
                best = key
        if best is None:
            return None
        start, _, t = best
        _, seq = t.queue.popleft()
        self._count -= 1
        self.virtual = start
        t.finish = start + cost(seq.req) / t.spec.weight
        t.rows += seq.rows
        held = self._held.get(seq)
        if held is not None:
            held.admitted = True
        self._publish(t)
        return seq

    # --- admission --------------------------------------------------------------------------
    def ahead(self, req: GenerationRequest | None) -> list[Sequence]:
        """The queued requests a newcomer would be served after, in service order: all of
        them without keys; with keys, its own tenant's and the others' whose start tags come
        before its own (so another key's flood counts only as far as its share)."""
        if req is None:
            return list(self)
        t = self.tenant(req)
        mine = max(self.virtual, t.finish) + sum(cost(s.req) for _, s in t.queue) / t.spec.weight
        busy = [u for u in self.tenants if u.queue]
        return [s for _, _, s in sorted(self._chains(busy, until=mine, whole=t))]

    def over_capacity(self, req: GenerationRequest, max_queue: int, free: int) -> bool:
        """The queue is full (max_queue beyond the free rows) and the request's key already
        queues at least its weighted share of it. A key under its share may still queue, so
        a flood filling the queue never turns another key away: the queue holds at most
        2 x max_queue (beyond the free rows) in all."""
        if self._count - max(free, 0) < max_queue:
            return False
        t = self.tenant(req)
        if t is self.default:
            return True
        weights = sum(u.spec.weight for u in self.configured if u.queue or u is t)
        return len(t.queue) >= max_queue * t.spec.weight / weights

    def budget_wait(self, req: GenerationRequest) -> tuple[float, int] | None:
        """Seconds until the key's budget covers this request, and the budget; None when it
        does now (or the key has none)."""
        t = self.tenant(req)
        budget = t.spec.chars_per_min
        if not budget:
            return None
        self._refill(t, time.perf_counter())
        need = min(cost(req), budget)  # more than a minute's worth: when the bucket is full
        if t.tokens >= need:
            return None
        return (need - t.tokens) / (budget / 60.0), budget

    # --- the end of a request -----------------------------------------------------------------
    def finished(self, seq: Sequence) -> None:
        """A request ended (from the queue or a row): free its row, give back what it did not
        use (virtual time and budget), count it."""
        held = self._held.pop(seq, None)
        if held is None:
            return
        t = held.tenant
        req = seq.req
        generated = max(min(seq.sampled - req.counter_start, req.max_new), 0)
        unused = req.max_new - generated
        if held.admitted:
            t.rows -= seq.rows
            t.finish = max(t.finish - unused / t.spec.weight, self.virtual)
        else:
            unused += len(req.seed_ids)
        if t.spec.chars_per_min:
            t.tokens += unused
        self._publish(t)
        if self.observer is not None:
            self.observer.on_key_finish(t.spec.name, seq.finish_reason or "error",
                                        len(req.seed_ids) if held.admitted else 0, generated)

    # --- internals ------------------------------------------------------------------------
    def _chains(self, busy: list[Tenant], until: float = math.inf,
                whole: Tenant | None = None) -> list[tuple[float, int, Sequence]]:
        """(start tag, arrival, sequence) of the queued requests of `busy`, each tenant's
        tags chained from its head; a tenant's are cut at the first past `until` (except
        `whole`'s)."""
        out: list[tuple[float, int, Sequence]] = []
        for t in busy:
            start = max(self.virtual, t.finish)
            for arrival, s in t.queue:
                if t is not whole and start > until:
                    break
                out.append((start, arrival, s))
                start += cost(s.req) / t.spec.weight
        return out

    def _refill(self, t: Tenant, now: float) -> None:
        budget = t.spec.chars_per_min or 0
        t.tokens = min(t.tokens + (now - t.refilled_at) * budget / 60.0, float(budget))
        t.refilled_at = now

    def _publish(self, t: Tenant) -> None:
        now = (len(t.queue), t.rows)
        if self.observer is not None and now != t.published:
            t.published = now
            self.observer.on_key(t.spec.name, *now)
