"""Fair share between API keys: one FIFO per key, served round-robin.

A pure data structure (no threads, no clock): the executor holds it under
its lock. Each key (the hash of the API key a job was sent with; ``""``
for anonymous jobs) has its own FIFO. The next job comes from the key that
was served least recently (a key never served first; ties by arrival), so
while one key has jobs waiting no other key gets two in a row: a key's 100
queued jobs delay another key's next job by at most one job.

Quotas bound each key: at most ``queue`` jobs waiting (a push over it is
refused with :class:`~comfy_embed.errors.KeyQueueFull`) and at most
``running`` jobs running, where a job runs from the moment it leaves the
queue until it ends, its output files still being encoded included (a key at
its bound is skipped until one of its jobs ends). The anonymous key ``""``
has no quota: without API keys the queue is one FIFO, exactly as before.
With ``fair=False`` every job goes to that one FIFO whatever its key.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable, Generic, Iterable, Iterator, TypeVar

from comfy_embed.errors import KeyQueueFull

__all__ = ["ANONYMOUS", "FairQueue", "Quota", "Quotas", "late_reason", "latest_start"]

T = TypeVar("T")

#: The key of jobs sent without an API key (keys off): no quota, one FIFO.
ANONYMOUS = ""

#: How long a key id (the start of its hash) must be in per-key quotas.
MIN_ID = 8


@dataclass(frozen=True)
class Quota:
    """One key's bounds: jobs waiting, jobs running (queue left, not yet ended)."""

    queue: int
    running: int


class Quotas:
    """The default quota and per-key ones, a key named by the start of its
    hash (``sha256("comfy-embed-api-key:" + key)``, as stored with its tasks;
    at least :data:`MIN_ID` hex digits)."""

    def __init__(self, default: Quota, per_key: dict[str, Quota] | None = None) -> None:
        self.default = default
        self.per_key = dict(per_key or {})

    @classmethod
    def parse(cls, default: Quota, entries: Iterable[str]) -> Quotas:
        """``<key id>=<queue>/<running>`` entries (``COMFY_EMBED_KEY_QUOTAS``);
        ValueError naming the entry that is malformed."""
        per_key: dict[str, Quota] = {}
        for entry in entries:
            entry = entry.strip()
            if not entry:
                continue
            ident, _, bounds = entry.partition("=")
            queue, _, running = bounds.partition("/")
            ident = ident.strip().lower()
            try:
                quota = Quota(int(queue), int(running))
            except ValueError:
                quota = Quota(0, 0)
            if (len(ident) < MIN_ID or any(c not in "0123456789abcdef" for c in ident)
                    or quota.queue < 1 or quota.running < 1):
                raise ValueError(f"{entry!r}: expected <key id>=<queue>/<running>, the key "
                                 f"id at least {MIN_ID} hex digits of the key's hash, both "
                                 "bounds >= 1")
            per_key[ident] = quota
        return cls(default, per_key)

    def of(self, key: str) -> Quota | None:
        """``key``'s quota (None: the anonymous key, unbounded per key)."""
        if key == ANONYMOUS:
            return None
        for ident, quota in self.per_key.items():
            if key.startswith(ident):
                return quota
        return self.default


class FairQueue(Generic[T]):
    """Per-key FIFOs served least-recently-served key first (see the module)."""

    def __init__(self, key: Callable[[T], str], quotas: Quotas | None = None,
                 fair: bool = True) -> None:
        self._key_of = key
        self.quotas = quotas
        self.fair = fair
        #: Each key's waiting items with their arrival numbers, oldest first.
        self._fifos: dict[str, collections.deque[tuple[int, T]]] = {}
        #: When each key was last served (a counter); a key never served: -1.
        self._served: dict[str, int] = {}
        #: Items of each key that left the queue and have not ended.
        self._running: collections.Counter[str] = collections.Counter()
        self._arrivals = 0
        self._serves = 0
        self._len = 0

    # ------------------------------------------------------------ reading
    def __len__(self) -> int:
        return self._len

    def key(self, item: T) -> str:
        """The FIFO ``item`` goes to (all in one when not fair)."""
        return self._key_of(item) if self.fair else ANONYMOUS

    def quota(self, key: str) -> Quota | None:
        return None if self.quotas is None or not self.fair else self.quotas.of(key)

    def waiting(self, key: str) -> int:
        fifo = self._fifos.get(key)
        return len(fifo) if fifo else 0

    def running(self, key: str) -> int:
        return self._running[key]

    def items(self) -> Iterator[T]:
        """Every waiting item, each key's in its order (keys in no set order)."""
        for fifo in self._fifos.values():
            for _, item in fifo:
                yield item

    def keys_waiting(self) -> int:
        """How many keys have items waiting."""
        return len(self._fifos)

    def ready(self) -> bool:
        """Whether :meth:`pop` would return an item now."""
        return any(self._may_start(k) for k in self._fifos)

    def _may_start(self, key: str) -> bool:
        quota = self.quota(key)
        return quota is None or self._running[key] < quota.running

    def order(self, joining: T | None = None) -> list[T]:
        """Every waiting item in the order it will be served, if no key's
        running bound holds one back meanwhile; with ``joining``, the order
        were it pushed now (it included, nothing changed)."""
        heads = {k: list(f) for k, f in self._fifos.items() if f}
        if joining is not None:
            heads.setdefault(self.key(joining), []).append((self._arrivals, joining))
        if len(heads) == 1:  # one key (or fair share off): its FIFO
            return [item for fifo in heads.values() for _, item in fifo]
        served = dict(self._served)
        out: list[T] = []
        at = {k: 0 for k in heads}
        tick = self._serves
        while len(out) < self._len + (joining is not None):
            k = min((k for k in heads if at[k] < len(heads[k])),
                    key=lambda k: (served.get(k, -1), heads[k][at[k]][0]))
            out.append(heads[k][at[k]][1])
            at[k] += 1
            served[k] = tick
            tick += 1
        return out

    # ------------------------------------------------------------ changing
    def push(self, item: T) -> None:
        """Queue ``item`` at the end of its key's FIFO; KeyQueueFull (nothing
        queued) when that key already has its quota of waiting items."""
        key = self.key(item)
        quota = self.quota(key)
        if quota is not None and self.waiting(key) >= quota.queue:
            raise KeyQueueFull(f"this API key already has {self.waiting(key)} jobs waiting, "
                               f"its limit (key_queue={quota.queue}); retry when one has started",
                               limit="key_queue", value=quota.queue)
        self._fifos.setdefault(key, collections.deque()).append((self._arrivals, item))
        self._arrivals += 1
        self._len += 1

    def pop(self) -> T | None:
        """The next item (it counts as running for its key until
        :meth:`release`), or None when nothing waiting may start now."""
        best: str | None = None
        best_rank = (0, 0)
        for k, fifo in self._fifos.items():
            if not fifo or not self._may_start(k):
                continue
            rank = (self._served.get(k, -1), fifo[0][0])
            if best is None or rank < best_rank:
                best, best_rank = k, rank
        if best is None:
            return None
        _, item = self._fifos[best].popleft()
        if not self._fifos[best]:
            del self._fifos[best]
        self._len -= 1
        self._served[best] = self._serves
        self._serves += 1
        self._running[best] += 1
        return item

    def release(self, item: T) -> None:
        """``item`` (returned by :meth:`pop`) ended: its key's running slot is free."""
        key = self.key(item)
        if self._running[key] > 0:
            self._running[key] -= 1
        if not self._running[key]:
            del self._running[key]

    def remove(self, item: T) -> bool:
        """Take a waiting ``item`` out (a cancel); False if it is not waiting."""
        key = self.key(item)
        fifo = self._fifos.get(key)
        if not fifo:
            return False
        for entry in fifo:
            if entry[1] is item:
                fifo.remove(entry)
                if not fifo:
                    del self._fifos[key]
                self._len -= 1
                return True
        return False

    def remove_where(self, test: Callable[[T], bool]) -> list[T]:
        """Take out every waiting item for which ``test`` is true, in arrival order."""
        gone = sorted(((n, item) for fifo in self._fifos.values() for n, item in fifo
                       if test(item)), key=lambda e: e[0])
        for _, item in gone:
            self.remove(item)
        return [item for _, item in gone]

    def clear(self) -> list[T]:
        """Take out every waiting item (in arrival order)."""
        return self.remove_where(lambda _: True)


# ------------------------------------------------------------- deadlines
def latest_start(deadline: float | None, estimate: float | None) -> float | None:
    """The last moment (monotonic) a job may start and still end by
    ``deadline``, given it takes ``estimate`` seconds (unknown: 0)."""
    if deadline is None:
        return None
    return deadline - max(estimate or 0.0, 0.0)


def late_reason(deadline: float, estimate: float | None, now: float) -> str:
    """Why a job still waiting at ``now`` is dropped (its final error's message)."""
    if now >= deadline:
        return (f"its deadline passed {now - deadline:.1f}s ago while it waited in the "
                "queue; it was not run")
    return (f"it could not finish by its deadline: it takes about {estimate or 0:.1f}s and "
            f"{deadline - now:.1f}s were left; it was not run")
