"""Shared state read through the database with a version check, so replicas agree within a bound.

Several replicas serve one plant. What decides a verdict (product profiles; later memories and calibrations) lives
in the database, never only in one process. A replica may keep a copy, but a copy older than ``max_age_s`` is
checked against the database's version token before use: same token -> the copy is used again, another token ->
the value is re-read. A change committed through any replica is therefore used by every replica at most
``max_age_s`` seconds later (``DHR_STATE_REFRESH_S``, 5 s by default); the replica that made it sees it at once
(``invalidate``). ``max_age_s = 0`` checks the version on every read.

The version check reads a small token (e.g. ``updated_at`` or a version number) instead of the value, which is
what makes the copy worth keeping for large values (reference features, calibrations).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

_MISSING = object()


@dataclass
class _Entry:
    version: Any
    value: Any
    checked_at: float


class ReadThroughCache:
    """Copies of shared values by key, each re-validated against its version token after ``max_age_s`` seconds.

    Thread-safe; the loaders run outside the lock (two threads may both load a changed value; both get it right).
    ``clock`` is a monotonic time source in seconds (tests pass a fake one).
    """

    def __init__(self, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not max_age_s >= 0:
            raise ValueError(f"max_age_s must be >= 0, got {max_age_s}")
        self.max_age_s = float(max_age_s)
        self._clock = clock
        self._entries: dict[Hashable, _Entry] = {}
        self._lock = threading.Lock()
        self.loads = 0  # values read in full, for tests and diagnostics
        self.checks = 0  # version tokens read

    def get(self, key: Hashable, version: Callable[[], Any], load: Callable[[], tuple[Any, Any]]) -> Any:
        """The value of ``key``: the copy while younger than ``max_age_s``, else after a version check.

        ``version()`` returns the stored token (None: no such value); ``load()`` returns ``(token, value)`` read
        together, so a copy is never labelled with a newer token than its value.
        """
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and now - entry.checked_at < self.max_age_s:
            return entry.value
        if entry is not None:
            self.checks += 1
            if version() == entry.version:
                entry.checked_at = now
                return entry.value
        self.loads += 1
        token, value = load()
        with self._lock:
            self._entries[key] = _Entry(token, value, now)
        return value

    def invalidate(self, key: Hashable | object = _MISSING) -> None:
        """Forget the copy of ``key`` (all copies without an argument): the next read loads it."""
        with self._lock:
            if key is _MISSING:
                self._entries.clear()
            else:
                self._entries.pop(key, None)
