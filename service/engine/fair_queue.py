"""The batcher's waiting line: one FIFO per owner key, served round-robin (see :mod:`service.engine.batcher`)."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Any


@dataclass(eq=False)  # identity comparison: items may be arrays whose ``==`` is element-wise
class Pending:
    item: Any
    future: asyncio.Future
    enqueued: float  # time.perf_counter() at submit
    timings: dict | None
    key: object = None


class FairQueue:
    """One FIFO per key, popped round-robin over the keys (oldest waiting key first)."""

    def __init__(self) -> None:
        self._by_key: dict[object, collections.deque[Pending]] = {}  # insertion order = round-robin order
        self._n = 0  # items over all keys: len() is asked on every submit, so it is kept, not summed

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return bool(self._by_key)

    def append(self, pending: Pending) -> None:
        self._by_key.setdefault(pending.key, collections.deque()).append(pending)
        self._n += 1

    def popleft(self) -> Pending:
        key = next(iter(self._by_key))
        queue = self._by_key.pop(key)
        pending = queue.popleft()
        self._n -= 1
        if queue:
            self._by_key[key] = queue  # re-inserted last: the next pop serves the next key
        return pending

    def remove(self, pending: Pending) -> None:
        queue = self._by_key.get(pending.key)
        if queue is None:
            raise ValueError("not queued")
        queue.remove(pending)
        self._n -= 1
        if not queue:
            del self._by_key[pending.key]

    def push_front(self, items: list[Pending]) -> None:
        """Put items back ahead of everything (their keys first in the rotation, each key's order kept)."""
        front: dict[object, collections.deque[Pending]] = {}
        for pending in items:
            front.setdefault(pending.key, collections.deque()).append(pending)
        for key, queue in self._by_key.items():
            front.setdefault(key, collections.deque()).extend(queue)
        self._by_key = front
        self._n += len(items)

    def drain(self) -> list[Pending]:
        items = [p for q in self._by_key.values() for p in q]
        self._by_key.clear()
        self._n = 0
        return items
