"""Retention of inspections: delete old records (and their reviews and artefacts), one replica at a time.

Rows (with their reviews) are deleted and committed first, then the record's artefacts (thumbnail included); a crash
in between can only leave orphan artefacts, never dangling rows. On PostgreSQL one pass runs at a time across every
replica sharing the database (a session advisory lock); a replica that finds the lock taken skips its pass.
Mixed into :class:`~service.storage.store.InspectionStore`, whose ``_engine``, ``_sessions``, ``artefacts``,
``is_postgres`` and ``record_prefix`` it uses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import delete, select, text

from service.storage.models import IdempotencyRow, InspectionRow, as_utc, utcnow
from service.storage.reviews import delete_reviews_of

logger = logging.getLogger("dhrclip.storage")

_DELETE_CHUNK = 500
RETENTION_LOCK_ID = 0x44_48_52_52  # "DHRR": the PostgreSQL advisory lock held by one retention pass at a time


class RetentionMethods:
    def enforce_retention(self, max_age_days: float | None, max_count: int | None, now: datetime | None = None) -> int:
        """Delete records with ``created_at < now - max_age_days`` and those beyond the newest ``max_count``.

        Either limit may be None (not applied). Rows go first (committed), then their artefacts. Returns the
        number of records deleted; 0 without doing anything when another replica holds the retention lock.
        """
        if max_age_days is not None and not max_age_days >= 0:
            raise ValueError(f"max_age_days must be >= 0, got {max_age_days}")
        if max_count is not None and max_count < 0:
            raise ValueError(f"max_count must be >= 0, got {max_count}")
        now = utcnow() if now is None else as_utc(now, "now")
        with self.retention_lock() as acquired:
            if not acquired:
                logger.info("retention: another replica is running a pass; skipped")
                return 0
            return self._delete_expired(max_age_days, max_count, now)

    @contextmanager
    def retention_lock(self) -> Iterator[bool]:
        """Yields whether this process may run retention now: on PostgreSQL a session advisory lock shared by every
        replica (``pg_try_advisory_lock``, released on exit or when the connection dies); elsewhere always True."""
        if not self.is_postgres:
            yield True
            return
        with self._engine.connect() as conn:
            acquired = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": RETENTION_LOCK_ID}).scalar())
            conn.commit()
            try:
                yield acquired
            finally:
                if acquired:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": RETENTION_LOCK_ID})
                    conn.commit()

    def _delete_expired(self, max_age_days: float | None, max_count: int | None, now: datetime) -> int:
        row = InspectionRow
        doomed: dict[str, datetime] = {}
        with self._sessions() as session:
            if max_age_days is not None:
                cutoff = now - timedelta(days=max_age_days)
                doomed.update(session.execute(select(row.id, row.created_at).where(row.created_at < cutoff)).all())
            if max_count is not None:
                newest_first = select(row.id, row.created_at).order_by(row.created_at.desc(), row.id.desc())
                doomed.update(session.execute(newest_first.offset(max_count)).all())
        if max_age_days is not None:  # keys live as long as the inspections they answer for
            with self._sessions() as session, session.begin():
                session.execute(delete(IdempotencyRow).where(IdempotencyRow.created_at < cutoff))
        ids = sorted(doomed)
        for start in range(0, len(ids), _DELETE_CHUNK):
            with self._sessions() as session, session.begin():
                delete_reviews_of(session, ids[start : start + _DELETE_CHUNK])
                session.execute(delete(row).where(row.id.in_(ids[start : start + _DELETE_CHUNK])))
        failed = []
        for record_id in ids:
            try:
                self.artefacts.delete_prefix(self.record_prefix(record_id, doomed[record_id]))
            except Exception as exc:  # noqa: BLE001 - collected; one error names them all
                failed.append(f"{record_id}: {exc}")
        if failed:
            raise OSError(f"{len(ids)} records deleted but the artefacts of {len(failed)} not removed: {failed[:3]}")
        return len(ids)
