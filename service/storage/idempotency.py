"""Idempotency keys of /segment in the database, so that every replica sharing it sees the same keys.

One row per key in ``idempotency_keys`` (the key is the primary key), in one of two states:

1. ``claim_idempotency(key, fingerprint, stale_s, owner)`` inserts a *pending* row with a random claim token and
   the claiming process's instance id (``owner``). The primary key makes the insert the lock: of two requests
   with one key (on any replicas) one inserts, the other gets the row that won. A pending row whose request died
   with its process is deleted in the same transaction, so the key can be claimed again: at once when its owner
   is dead (stopped beating, ``service.storage.instances``), else once it is older than ``stale_s`` (the backstop,
   and the only test for a row without an owner).
2. ``add_many(..., idempotency=claim)`` (the store) commits the request's inspections and turns the row *done*
   (with their ids) in one transaction, and only while the row is still pending under the same token; otherwise
   (the claim was found abandoned and another request took the key) nothing is stored and
   :class:`ClaimLostError` raised.
3. ``release_idempotency(claim)`` deletes the row if it is still pending under that token: a failed request leaves
   its key free for the retry. A request that crashed leaves a pending row until its owner is seen dead.

Done rows are deleted with the inspections they answer for (retention).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.storage.models import IdempotencyRow, utcnow

FIELDS = ("key", "fingerprint", "inspection_ids", "created_at", "state", "claim", "owner")
PENDING, DONE = "pending", "done"


@dataclass(frozen=True)
class IdempotencyEntry:
    """One key as its row holds it (``FIELDS``)."""

    key: str
    fingerprint: str  # 64 hex digits
    inspection_ids: list[str]
    created_at: datetime = field(default_factory=utcnow)
    state: str = DONE  # PENDING or DONE
    claim: str | None = None  # the token of the request holding a pending key
    owner: str | None = None  # the instance (process) holding a pending key; None: unknown, only its age counts


logger = logging.getLogger("dhrclip.storage")


class ClaimLostError(RuntimeError):
    """The pending key of a request was taken over (its owner seemed dead, or the claim outlived ``stale_s``)
    before its inspections were stored."""


def _entry(row: IdempotencyRow) -> IdempotencyEntry:
    return IdempotencyEntry(**{k: getattr(row, k) for k in FIELDS})


class IdempotencyMethods:
    """Mixed into InspectionStore (uses its ``_sessions``)."""

    def get_idempotency(self, key: str) -> IdempotencyEntry | None:
        """The stored ``Idempotency-Key`` entry (pending or done), or None."""
        with self._sessions() as session:
            row = session.get(IdempotencyRow, key)
            return None if row is None else _entry(row)

    def claim_idempotency(
        self, key: str, fingerprint: str, stale_s: float, owner: str | None = None
    ) -> tuple[IdempotencyEntry, bool]:
        """``(entry, True)``: this call now holds ``key`` (a pending entry with a new claim token, owned by the
        instance ``owner``); ``(entry, False)``: the key exists, pending under a live request or done (see the module
        docstring)."""
        for _ in range(3):  # the row that won may be released (deleted) before it is read: claim again
            now = utcnow()
            mine = IdempotencyEntry(key, fingerprint, [], now, PENDING, secrets.token_hex(16), owner)
            try:
                with self._sessions() as session, session.begin():
                    row = IdempotencyRow
                    abandoned = or_(row.created_at < now - timedelta(seconds=stale_s), self.owner_dead(row.owner))
                    freed = session.execute(delete(row).where(row.key == key, row.state == PENDING, abandoned))
                    session.add(IdempotencyRow(**{k: getattr(mine, k) for k in FIELDS}))
                if freed.rowcount:
                    logger.info(
                        "Idempotency-Key %r: took over an abandoned claim (its process died or it was stale)", key
                    )
                return mine, True
            except IntegrityError:
                found = self.get_idempotency(key)
                if found is not None:
                    return found, False
        raise RuntimeError(f"Idempotency-Key {key!r} could not be claimed (claimed and released repeatedly)")

    def release_idempotency(self, claim: IdempotencyEntry) -> None:
        """Free a key still pending under ``claim`` (a no-op once its inspections are stored)."""
        row = IdempotencyRow
        with self._sessions() as session, session.begin():
            session.execute(delete(row).where(row.key == claim.key, row.state == PENDING, row.claim == claim.claim))

    @staticmethod
    def _commit_key(session: Session, entry: IdempotencyEntry) -> None:
        """Inside the transaction of the inspections: a claimed key becomes done (else ClaimLostError); an entry
        without a claim is inserted done (IntegrityError when the key exists)."""
        done = replace(entry, state=DONE, claim=None, owner=None, created_at=utcnow())
        if entry.claim is None:
            session.add(IdempotencyRow(**{k: getattr(done, k) for k in FIELDS}))
            return
        row = IdempotencyRow
        result = session.execute(
            update(row)
            .where(row.key == entry.key, row.state == PENDING, row.claim == entry.claim)
            .values(
                state=DONE, claim=None, owner=None, inspection_ids=list(done.inspection_ids), created_at=done.created_at
            )
        )
        if result.rowcount != 1:
            raise ClaimLostError(
                f"Idempotency-Key {entry.key!r} was taken over by another request (its claim was found abandoned)"
            )
