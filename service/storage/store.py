"""InspectionStore: inspection records in SQL (SQLite WAL by default, PostgreSQL by URL) plus their artefacts.

Artefacts go through an :class:`~service.storage.artefacts.ArtefactStore` (a local folder by default, or an S3
bucket) under the key ``<yyyy>/<mm>/<dd>/<id>/<file>`` with the date of ``created_at`` in UTC, so the key of
every artefact follows from the record alone (with the local folder: today's layout ``data_dir/<yyyy>/...``); the
files and the renderings cached beside them: :mod:`service.storage.record_files`.

Write order in ``add_many`` (the records of one request, ``add`` for one): every artefact is put durably first
(see the artefact store's contract), then the rows and the request's idempotency key are committed in one
transaction. A failure at any step deletes the artefacts put so far, so a row never points at missing artefacts.
Deletion (``enforce_retention``) goes the other way: rows (with their reviews) are deleted and committed first,
then the record's artefacts (thumbnail included); a crash in between can only leave orphan artefacts, never
dangling rows. On PostgreSQL one retention pass runs at a time across every replica sharing the database (a
session advisory lock); a replica that finds the lock taken skips its pass.

Thread use: the API calls the store from a thread pool. Every method opens its own short session; SQLite runs with
``check_same_thread=False``, WAL (readers do not block the writer) and a 30 s busy timeout. With
``synchronous=FULL`` every commit is fsynced before ``add`` returns, so an acknowledged inspection survives a
process crash and a power loss alike. The cost, one fsync of the WAL per transaction, is shared: the rows of
inspections finishing together go in one transaction (group commit, :mod:`service.storage.group_commit`).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Self

from sqlalchemy import and_, create_engine, event, func, or_, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool

from service.storage.artefacts import ArtefactStore, ArtefactStoreError, LocalArtefactStore
from service.storage.group_commit import GroupCommit
from service.storage.idempotency import IdempotencyEntry, IdempotencyMethods
from service.storage.instances import InstanceMethods
from service.storage.knowledge import ProductKnowledge
from service.storage.models import (
    ID_RE,
    VERDICTS,
    InspectionRecord,
    InspectionRow,
    ProductProfile,
    ProductRow,
    as_utc,
    record_to_row,
    row_to_profile,
    row_to_record,
    utcnow,
    validate_artefacts,
    validate_profile,
    validate_record,
)
from service.storage.record_files import RecordFiles, artefact_file
from service.storage.retention import RetentionMethods
from service.storage.reviews import ReviewMethods, reviewed_clause
from service.storage.schema import upgrade_database
from service.storage.shared import ReadThroughCache
from service.storage.summary import SummaryMethods

logger = logging.getLogger("dhrclip.storage")

MAX_LIMIT = 500


def _sqlite_pragmas(dbapi_connection, _connection_record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


CURSOR_PATTERN = r"^[A-Za-z0-9_-]+$"  # urlsafe base64 without padding
CURSOR_MAX = 88  # base64 of "<32-character ISO time>|<28-digit id>" is 82 characters; a little room


def encode_cursor(created_at: datetime, record_id: str) -> str:
    """Opaque page cursor: urlsafe base64 (no padding) of ``"<created_at iso>|<id>"``."""
    raw = f"{as_utc(created_at).isoformat()}|{record_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Inverse of ``encode_cursor``; raises ValueError("invalid cursor ...") on anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, record_id = raw.split("|")
        created_at = as_utc(datetime.fromisoformat(stamp))
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"invalid cursor {cursor!r}") from exc
    if not ID_RE.match(record_id):
        raise ValueError(f"invalid cursor {cursor!r}")
    return created_at, record_id


class InspectionStore(
    RecordFiles, ReviewMethods, SummaryMethods, ProductKnowledge, RetentionMethods, IdempotencyMethods, InstanceMethods
):
    """Durable inspection records and their PNG artefacts.

    database_url: SQLAlchemy URL, e.g. ``sqlite:////var/lib/dhrclip/inspections.db`` or
    ``postgresql+psycopg://user@host/db``; artefacts: an artefact store, or a folder for a
    :class:`LocalArtefactStore` (created if absent); refresh_s: longest age of a shared-state copy before its
    version is checked (``DHR_STATE_REFRESH_S``). Opening the store migrates its database in place to the newest
    schema (``service.storage.schema``).
    """

    def __init__(
        self,
        database_url: str,
        artefacts: ArtefactStore | Path | str,
        refresh_s: float = 5.0,
    ) -> None:
        self.artefacts = artefacts if isinstance(artefacts, ArtefactStore) else LocalArtefactStore(artefacts)
        self._shared = ReadThroughCache(refresh_s)
        url = make_url(database_url)
        kwargs: dict = {}
        is_sqlite = url.get_backend_name() == "sqlite"
        if is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            if url.database in (None, "", ":memory:"):
                kwargs["poolclass"] = StaticPool  # one shared connection, else every connection sees an empty DB
            elif not url.database.startswith("file:"):
                Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs["pool_pre_ping"] = True  # a replica outlives database restarts and idle-connection reapers
            if url.get_backend_name() == "postgresql":
                kwargs["connect_args"] = {"connect_timeout": 10}
        self.is_postgres = url.get_backend_name() == "postgresql"
        self._engine = create_engine(url, **kwargs)
        if is_sqlite:
            event.listen(self._engine, "connect", _sqlite_pragmas)
        self.schema_revision = upgrade_database(self._engine)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._group = GroupCommit(self._commit_rows)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close every pooled database connection."""
        self._engine.dispose()

    # ----------------------------------------------------------------------------------------------- records

    def add(
        self, record: InspectionRecord, artefacts: Mapping[str, bytes], idempotency: IdempotencyEntry | None = None
    ) -> InspectionRecord:
        """Store the artefacts (``{kind: bytes}``) then the record; returns it as stored (see :meth:`add_many`)."""
        return self.add_many([(record, artefacts)], idempotency)[0]

    def add_many(
        self,
        items: Sequence[tuple[InspectionRecord, Mapping[str, bytes]]],
        idempotency: IdempotencyEntry | None = None,
    ) -> list[InspectionRecord]:
        """Store records with their artefacts as one unit: every artefact first, then every row in one transaction
        together with ``idempotency`` (a claimed key becomes done, see ``storage.idempotency``), so a crash or an
        error leaves all of them or none. The transaction also carries the rows of other threads finishing at the
        same time (group commit, :mod:`service.storage.group_commit`). Returns the records as stored.

        ``record.artefacts`` may be empty (it is filled with the kinds given) or must name the same kinds.
        Raises ValueError for an invalid record, kind or duplicate id (or idempotency key), TypeError for non-bytes
        data, ClaimLostError for a claim taken over; errors of the artefact store (OSError, ArtefactStoreError)
        propagate. In every failure the artefacts already put are deleted first.
        """
        stored = [self._prepared(record, artefacts) for record, artefacts in items]
        written: list[str] = []
        try:
            for record, (_, artefacts) in zip(stored, items, strict=True):
                prefix = self.record_prefix(record.id, record.created_at)
                for kind, data in artefacts.items():
                    written.append(prefix + artefact_file(kind))
                    self.artefacts.put(written[-1], bytes(data))
            self._group.commit([*stored, *([idempotency] if idempotency is not None else [])])
        except IntegrityError as exc:
            self._remove_quietly(written)
            raise ValueError(
                f"an inspection id of {[r.id for r in stored]} or the idempotency key already exists"
            ) from exc
        except BaseException:
            self._remove_quietly(written)
            raise
        return stored

    def _prepared(self, record: InspectionRecord, artefacts: Mapping[str, bytes]) -> InspectionRecord:
        """The record as it will be stored (UTC time, artefact kinds), after checking it and its artefacts."""
        validate_record(record)
        kinds = validate_artefacts(record, artefacts)
        if self.get(record.id) is not None:
            raise ValueError(f"inspection id {record.id} already exists")
        return replace(record, created_at=as_utc(record.created_at), artefacts=kinds)

    def _commit_rows(self, rows: Sequence[InspectionRecord | IdempotencyEntry]) -> None:
        """One transaction for the records and idempotency keys of every group waiting (the group committer's
        writer, :mod:`service.storage.group_commit`)."""
        with self._sessions() as session, session.begin():
            session.add_all([record_to_row(row) for row in rows if isinstance(row, InspectionRecord)])
            for row in rows:
                if isinstance(row, IdempotencyEntry):
                    self._commit_key(session, row)

    def get(self, record_id: str) -> InspectionRecord | None:
        """The record with this id, or None."""
        with self._sessions() as session:
            row = session.get(InspectionRow, record_id)
            return None if row is None else row_to_record(row)

    def list(
        self,
        product: str | None = None,
        line: str | None = None,
        verdict: str | Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
        reviewed: bool | None = None,
        oldest_first: bool = False,
    ) -> tuple[list[InspectionRecord], str | None]:
        """One page of records, newest first (or oldest first), and the cursor of the next page (None on the last).

        Filters combine with AND (``verdict``: one or several); ``since <= created_at < until`` (tz-aware
        datetimes); ``reviewed`` keeps records with (True) or without (False) a review. ``limit`` must be >= 1 and
        is capped at 500. Pages follow the keyset ``(created_at, id) < cursor`` (``>`` oldest first), so records
        added while paging do not shift later pages.
        """
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        verdicts = (verdict,) if isinstance(verdict, str) else verdict
        if verdicts is not None and not set(verdicts) <= set(VERDICTS):
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        limit = min(int(limit), MAX_LIMIT)
        row = InspectionRow
        query = select(row)
        if product is not None:
            query = query.where(row.product == product)
        if line is not None:
            query = query.where(row.line == line)
        if verdicts is not None:
            query = query.where(row.verdict.in_(verdicts))
        if since is not None:
            query = query.where(row.created_at >= as_utc(since, "since"))
        if until is not None:
            query = query.where(row.created_at < as_utc(until, "until"))
        if reviewed is not None:
            query = query.where(reviewed_clause(reviewed))
        if cursor is not None:
            c_at, c_id = decode_cursor(cursor)
            if oldest_first:
                query = query.where(or_(row.created_at > c_at, and_(row.created_at == c_at, row.id > c_id)))
            else:
                query = query.where(or_(row.created_at < c_at, and_(row.created_at == c_at, row.id < c_id)))
        order = (row.created_at, row.id) if oldest_first else (row.created_at.desc(), row.id.desc())
        query = query.order_by(*order).limit(limit + 1)
        with self._sessions() as session:
            rows = session.scalars(query).all()
        records = [row_to_record(r) for r in rows[:limit]]
        next_cursor = encode_cursor(records[-1].created_at, records[-1].id) if len(rows) > limit else None
        return records, next_cursor

    def count(self) -> int:
        """Number of stored inspection records."""
        with self._sessions() as session:
            return int(session.scalar(select(func.count()).select_from(InspectionRow)))

    # ---------------------------------------------------------------------------------------------- products

    def get_product(self, name: str) -> ProductProfile | None:
        """The stored profile, read now."""
        with self._sessions() as session:
            row = session.get(ProductRow, name)
            return None if row is None else row_to_profile(row)

    def current_product(self, name: str) -> ProductProfile | None:
        """The profile to judge an inspection with: a copy at most ``refresh_s`` old, then checked against the
        stored ``updated_at`` (see :mod:`service.storage.shared`); a change through another replica is used within
        ``refresh_s``, one through this store at once."""
        return self._shared.get(("product", name), lambda: self._product_version(name), lambda: self._product(name))

    def _product_version(self, name: str) -> ProductProfile | None:
        """The version token of a profile: the whole (small) row, so that every change counts, also those of
        memories and calibrations that keep ``updated_at``."""
        return self.get_product(name)

    def _product(self, name: str) -> tuple[ProductProfile | None, ProductProfile | None]:
        profile = self.get_product(name)
        return profile, profile

    def set_memory(self, product: str, *args, **kwargs) -> ProductProfile:
        try:
            return super().set_memory(product, *args, **kwargs)
        finally:
            self._shared.invalidate(("product", product))

    def put_calibration(self, record, profile: ProductProfile) -> ProductProfile:
        try:
            return super().put_calibration(record, profile)
        finally:
            self._shared.invalidate(("product", profile.name))

    def put_product(self, profile: ProductProfile) -> ProductProfile:
        """Insert or replace a product profile; ``updated_at`` is set to now. Returns the stored profile."""
        validate_profile(profile)
        stored = replace(profile, updated_at=utcnow())
        with self._sessions() as session, session.begin():
            session.merge(ProductRow(**{k: getattr(stored, k) for k in stored.__dataclass_fields__}))
        self._shared.invalidate(("product", profile.name))
        return stored

    def list_products(self) -> list[ProductProfile]:
        """All product profiles sorted by name."""
        with self._sessions() as session:
            return [row_to_profile(r) for r in session.scalars(select(ProductRow).order_by(ProductRow.name))]


class StorageUnavailableError(RuntimeError):
    """The database or the artefact store cannot be used; the message is one line naming which and why."""


def default_database_url(data_dir: Path | str) -> str:
    """The database when none is named (``DHR_DATABASE_URL`` / ``--database-url`` unset): SQLite in ``data_dir``."""
    return f"sqlite:///{(Path(data_dir) / 'inspections.db').resolve()}"


def open_store(
    database_url: str, artefacts: ArtefactStore, refresh_s: float = 5.0, data_dir: Path | str | None = None
) -> InspectionStore:
    """An InspectionStore whose database answered and whose artefact store passed ``check()``; product-knowledge
    files an earlier version left under ``data_dir`` are then moved into the artefact store.

    Raises StorageUnavailableError (one line, password hidden) otherwise; nothing falls back to another store.
    """
    try:
        shown = make_url(database_url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError) as exc:  # not echoed: the string may hold a password
        raise StorageUnavailableError(f"the database URL cannot be parsed ({exc})") from None
    try:
        store = InspectionStore(database_url, artefacts, refresh_s)
    except (SQLAlchemyError, RuntimeError) as exc:  # RuntimeError: a schema the migrations refuse
        cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StorageUnavailableError(f"database {shown} unavailable: {cause}") from None
    try:
        artefacts.check()
        if data_dir is not None:
            store.adopt_local_knowledge(data_dir)
    except ArtefactStoreError as exc:
        store.close()
        raise StorageUnavailableError(f"artefact store unavailable: {exc}") from None
    except BaseException:
        store.close()
        raise
    return store
