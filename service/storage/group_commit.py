"""Group commit: the rows of inspections finished together are committed in one transaction (one WAL fsync).

Each writer hands its rows (one request's records, with its Idempotency-Key row) to :meth:`GroupCommit.commit`,
which returns only once they are committed, so "answered" still means "on disk". No thread and no timer: the first
writer to take the commit lock commits every group waiting at that moment (its own and those that arrived while
the previous transaction ran); the others find their groups done. Under load a transaction therefore carries the
records of a whole model batch; alone, a writer commits at once with no added wait.

When a shared transaction fails (say one group's idempotency key exists already), each group of it is committed
again on its own, so one bad group fails alone and the others are unaffected.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

Row = TypeVar("Row")


class GroupCommit(Generic[Row]):
    """``commit_rows(rows)`` writes rows in one transaction; ``commit(group)`` runs it for every waiting group."""

    def __init__(self, commit_rows: Callable[[Sequence[Row]], None]) -> None:
        self._commit_rows = commit_rows
        self._waiting: list[tuple[Sequence[Row], Future]] = []
        self._queue_lock = threading.Lock()
        self._commit_lock = threading.Lock()  # one transaction at a time
        self.transactions = 0  # committed transactions (for tests and metrics)

    def commit(self, group: Sequence[Row]) -> None:
        """Block until ``group`` is committed (together with whatever waits beside it); re-raise its failure."""
        done: Future = Future()
        with self._queue_lock:
            self._waiting.append((group, done))
        with self._commit_lock:
            with self._queue_lock:
                groups, self._waiting = self._waiting, []
            if groups:
                self._flush(groups)
        done.result()

    def _flush(self, groups: list[tuple[Sequence[Row], Future]]) -> None:
        try:
            self._commit_rows([row for rows, _ in groups for row in rows])
            self.transactions += 1
            failed = None
        except BaseException as exc:  # noqa: BLE001 - handed to the waiters below
            failed = exc
        if failed is None or len(groups) == 1:
            for _, done in groups:
                if failed is None:
                    done.set_result(None)
                else:
                    done.set_exception(failed)
            return
        for rows, done in groups:  # the shared transaction failed: find the group(s) at fault
            try:
                self._commit_rows(rows)
                self.transactions += 1
                done.set_result(None)
            except BaseException as exc:  # noqa: BLE001 - this group's own failure
                done.set_exception(exc)
