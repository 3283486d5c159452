"""Liveness of the service processes sharing a database: a dead process's pending Idempotency-Keys are free at once.

Each service process (an *instance*, a new random id at every start) keeps one row in ``instances`` and beats
(:class:`service.storage.heartbeat.Heartbeat`): every ``interval_s`` it sets ``heartbeat_at`` to now and
``alive_until`` to ``now + DEAD_AFTER_BEATS * interval_s``. "Now" is the database's clock: PostgreSQL's ``now()``,
so replicas on hosts with skewed clocks agree; with SQLite, which only processes of one host share, the host's
UTC clock. An instance is alive while ``alive_until >= now``; a row past it, or gone (deleted at a clean shutdown,
pruned ``PRUNE_AFTER_S`` after it died), is a dead process. Each instance writes its own ``alive_until``, so
replicas running with different intervals judge each other right.

A pending key records its owner instance (``idempotency_keys.owner``); :meth:`InstanceMethods.owner_dead` is the
SQL test with which ``claim_idempotency`` frees the key of a dead owner. A beat late by more than
``DEAD_AFTER_BEATS - 1`` intervals makes a live instance look dead: a retry may then take over a key it holds and
its own request stores nothing (``ClaimLostError`` at commit), so exactly-once storage holds even then.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, delete, exists, func, insert, select, update

from service.storage.models import InstanceRow, utcnow

DEAD_AFTER_BEATS = 3  # an instance silent for this many heartbeat intervals is dead
PRUNE_AFTER_S = 3600.0  # rows of dead instances are kept this long after they died (who held what), then deleted


@dataclass(frozen=True)
class Instance:
    """This process as the ``instances`` table knows it."""

    id: str  # 32 random hex digits, new at every start
    name: str  # the replica name (DHR_REPLICA_NAME, else host-pid)
    host: str
    pid: int

    @classmethod
    def new(cls, name: str) -> Instance:
        return cls(secrets.token_hex(16), name[:200], socket.gethostname()[:255], os.getpid())


class InstanceMethods:
    """Mixed into InspectionStore (uses its ``_sessions`` and ``is_postgres``)."""

    def _db_now(self) -> datetime | ColumnElement:
        """Now on the database's clock: ``now()`` on PostgreSQL (an SQL expression), the host's UTC time on SQLite."""
        return func.now() if self.is_postgres else utcnow()

    def beat(self, instance: Instance, interval_s: float) -> None:
        """Record that ``instance`` is alive for ``DEAD_AFTER_BEATS * interval_s`` from now (its row is inserted on
        the first beat, or again if it was pruned); rows of instances dead for ``PRUNE_AFTER_S`` are deleted."""
        row, now = InstanceRow, self._db_now()
        values = {"heartbeat_at": now, "alive_until": now + timedelta(seconds=DEAD_AFTER_BEATS * interval_s)}
        with self._sessions() as session, session.begin():
            if session.execute(update(row).where(row.id == instance.id).values(**values)).rowcount == 0:
                fields = {"id": instance.id, "name": instance.name, "host": instance.host, "pid": instance.pid}
                session.execute(insert(row).values(**fields, started_at=now, **values))
            session.execute(delete(row).where(row.alive_until < now - timedelta(seconds=PRUNE_AFTER_S)))

    def forget_instance(self, instance_id: str) -> None:
        """Delete the row of an instance that shuts down cleanly: whatever it still holds is free at once."""
        with self._sessions() as session, session.begin():
            session.execute(delete(InstanceRow).where(InstanceRow.id == instance_id))

    def instance_alive(self, instance_id: str) -> bool:
        """Whether the instance beat within its last ``DEAD_AFTER_BEATS`` intervals."""
        with self._sessions() as session:
            return bool(session.scalar(select(self._alive(instance_id))))

    def owner_dead(self, owner: ColumnElement) -> ColumnElement[bool]:
        """SQL condition: the column ``owner`` names an instance that is not alive now. An unknown owner (NULL: a key
        claimed by a store without a heartbeat, or before migration 0006) is never dead by this test."""
        return and_(owner.isnot(None), ~self._alive(owner))

    def _alive(self, instance) -> ColumnElement[bool]:
        """SQL condition: ``instance`` (an id or a column) has a row not past its ``alive_until``."""
        row = InstanceRow
        return exists(select(row.id).where(row.id == instance, row.alive_until >= self._db_now()))
