"""InspectionStore: inspection records in SQL (SQLite WAL by default, PostgreSQL by URL) plus PNG artefacts on disk.

Layout on disk: ``data_dir/<yyyy>/<mm>/<dd>/<id>/<kind>.png`` with the date of ``created_at`` in UTC, so the
path of every artefact follows from the record alone.

Write order in ``add``: every PNG is written atomically first (temp file in the same directory, flush, fsync,
``os.replace``, fsync of the directory), then the row is inserted and committed. A failure at any step removes
the files written so far, so a row never points at missing files. Deletion (``enforce_retention``) goes the other
way: rows (with their reviews) are deleted and committed first, then the directories removed; a crash in between can
only leave orphan files, never dangling rows.

Thread use: the API calls the store from a thread pool. Every method opens its own short session; SQLite runs with
``check_same_thread=False``, WAL (readers do not block the writer) and a 30 s busy timeout. With
``synchronous=FULL`` every commit is fsynced before ``add`` returns, so an acknowledged inspection survives a
process crash and a power loss alike (the cost is one fsync of the WAL per inspection).
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Self

from sqlalchemy import and_, create_engine, delete, event, func, or_, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool

from service.storage.files import fsync_dir, write_atomic
from service.storage.knowledge import ProductKnowledge
from service.storage.models import (
    ID_RE,
    KIND_RE,
    VERDICTS,
    IdempotencyEntry,
    IdempotencyRow,
    InspectionRecord,
    InspectionRow,
    ProductProfile,
    ProductRow,
    as_utc,
    record_to_row,
    row_to_profile,
    row_to_record,
    utcnow,
    validate_profile,
    validate_record,
)
from service.storage.reviews import ReviewMethods, delete_reviews_of, reviewed_clause
from service.storage.schema import upgrade_database
from service.storage.summary import THUMB_NAME, SummaryMethods, render_thumbnail

MAX_LIMIT = 500
IDEMPOTENCY_FIELDS = ("key", "fingerprint", "inspection_ids", "created_at")
_DELETE_CHUNK = 500


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


class InspectionStore(ReviewMethods, SummaryMethods, ProductKnowledge):
    """Durable inspection records and their PNG artefacts.

    database_url: SQLAlchemy URL, e.g. ``sqlite:////var/lib/dhrclip/inspections.db`` or
    ``postgresql+psycopg://user@host/db``; data_dir: root folder of the artefact files (created if absent).
    Opening the store migrates its database in place to the newest schema (``service.storage.schema``).
    """

    def __init__(self, database_url: str, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        url = make_url(database_url)
        kwargs: dict = {}
        is_sqlite = url.get_backend_name() == "sqlite"
        if is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            if url.database in (None, "", ":memory:"):
                kwargs["poolclass"] = StaticPool  # one shared connection, else every connection sees an empty DB
            elif not url.database.startswith("file:"):
                Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        self._engine = create_engine(url, **kwargs)
        if is_sqlite:
            event.listen(self._engine, "connect", _sqlite_pragmas)
        self.schema_revision = upgrade_database(self._engine)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close every pooled database connection."""
        self._engine.dispose()

    # ----------------------------------------------------------------------------------------------- records

    def record_dir(self, record_id: str, created_at: datetime) -> Path:
        """Folder of a record's artefacts: ``data_dir/<yyyy>/<mm>/<dd>/<id>`` (UTC date)."""
        day = as_utc(created_at, "created_at")
        return self.data_dir / f"{day.year:04d}" / f"{day.month:02d}" / f"{day.day:02d}" / record_id

    def add(
        self, record: InspectionRecord, artefacts: Mapping[str, bytes], idempotency: IdempotencyEntry | None = None
    ) -> InspectionRecord:
        """Store the PNGs (``{kind: bytes}``) then the record; returns the record as stored.

        ``idempotency`` (optional) is committed in the same transaction as the row, so a crash leaves either both
        or neither; a key that exists already raises ValueError and stores nothing.

        ``record.artefacts`` may be empty (it is filled with the kinds given) or must name the same kinds.
        Raises ValueError for an invalid record, kind or duplicate id, TypeError for non-bytes data; OSError
        from the file system propagates after the partial files are removed.
        Once ``add`` returns, row and files are committed to disk.
        """
        validate_record(record)
        kinds = list(artefacts)
        for kind, data in artefacts.items():
            if not isinstance(kind, str) or not KIND_RE.match(kind):
                raise ValueError(f"artefact kind must match {KIND_RE.pattern}, got {kind!r}")
            if not isinstance(data, bytes | bytearray | memoryview):
                raise TypeError(f"artefact {kind!r} must be bytes, got {type(data).__name__}")
        if record.artefacts and sorted(record.artefacts) != sorted(kinds):
            raise ValueError(f"record.artefacts {record.artefacts} differ from the kinds given {kinds}")
        stored = replace(record, created_at=as_utc(record.created_at), artefacts=kinds)
        directory = self.record_dir(stored.id, stored.created_at)
        if directory.exists():
            raise ValueError(f"inspection {stored.id} already exists: {directory} is present")

        created_dir = False
        try:
            if kinds:
                new_dirs = [d for d in (directory, *directory.parents) if not d.exists()]
                directory.mkdir(parents=True)
                created_dir = True
                for kind, data in artefacts.items():
                    write_atomic(directory / f"{kind}.png", bytes(data))
                for d in (directory, *(p.parent for p in new_dirs)):
                    fsync_dir(d)
            with self._sessions() as session, session.begin():
                session.add(record_to_row(stored))
                if idempotency is not None:
                    session.add(IdempotencyRow(**{k: getattr(idempotency, k) for k in IDEMPOTENCY_FIELDS}))
        except IntegrityError as exc:
            if created_dir:
                self._remove_dir(directory)
            raise ValueError(f"inspection id {stored.id} or its idempotency key already exists") from exc
        except BaseException:
            if created_dir:
                self._remove_dir(directory)
            raise
        return stored

    def get(self, record_id: str) -> InspectionRecord | None:
        """The record with this id, or None."""
        with self._sessions() as session:
            row = session.get(InspectionRow, record_id)
            return None if row is None else row_to_record(row)

    def artefact_path(self, record_id: str, kind: str) -> Path | None:
        """Path of a stored PNG, or None for an unknown id or a kind not stored with that record.

        Raises FileNotFoundError when the record lists the kind but its file is gone (damaged data_dir).
        """
        if not KIND_RE.match(kind or ""):
            return None
        with self._sessions() as session:
            found = session.execute(
                select(InspectionRow.created_at, InspectionRow.artefacts).where(InspectionRow.id == record_id)
            ).first()
        if found is None or kind not in found.artefacts:
            return None
        path = self.record_dir(record_id, found.created_at) / f"{kind}.png"
        if not path.is_file():
            raise FileNotFoundError(f"artefact {kind!r} of inspection {record_id} is missing: {path}")
        return path

    def thumbnail(self, record_id: str) -> bytes | None:
        """The JPEG thumbnail of a record's overlay, rendered on first use and cached beside it; None without one."""
        overlay = self.artefact_path(record_id, "overlay")
        if overlay is None:
            return None
        cached = overlay.parent / THUMB_NAME
        if cached.is_file():
            return cached.read_bytes()
        data = render_thumbnail(overlay.read_bytes())
        write_atomic(cached, data)
        return data

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

    def get_idempotency(self, key: str) -> IdempotencyEntry | None:
        """The stored ``Idempotency-Key`` entry, or None."""
        with self._sessions() as session:
            row = session.get(IdempotencyRow, key)
            return None if row is None else IdempotencyEntry(**{k: getattr(row, k) for k in IDEMPOTENCY_FIELDS})

    def count(self) -> int:
        """Number of stored inspection records."""
        with self._sessions() as session:
            return int(session.scalar(select(func.count()).select_from(InspectionRow)))

    # ---------------------------------------------------------------------------------------------- products

    def get_product(self, name: str) -> ProductProfile | None:
        with self._sessions() as session:
            row = session.get(ProductRow, name)
            return None if row is None else row_to_profile(row)

    def put_product(self, profile: ProductProfile) -> ProductProfile:
        """Insert or replace a product profile; ``updated_at`` is set to now. Returns the stored profile."""
        validate_profile(profile)
        stored = replace(profile, updated_at=utcnow())
        with self._sessions() as session, session.begin():
            session.merge(ProductRow(**{k: getattr(stored, k) for k in stored.__dataclass_fields__}))
        return stored

    def list_products(self) -> list[ProductProfile]:
        """All product profiles sorted by name."""
        with self._sessions() as session:
            return [row_to_profile(r) for r in session.scalars(select(ProductRow).order_by(ProductRow.name))]

    # --------------------------------------------------------------------------------------------- retention

    def enforce_retention(self, max_age_days: float | None, max_count: int | None, now: datetime | None = None) -> int:
        """Delete records with ``created_at < now - max_age_days`` and those beyond the newest ``max_count``.

        Either limit may be None (not applied). Rows go first (committed), then their artefact folders and any
        date folders left empty. Returns the number of records deleted.
        """
        if max_age_days is not None and not max_age_days >= 0:
            raise ValueError(f"max_age_days must be >= 0, got {max_age_days}")
        if max_count is not None and max_count < 0:
            raise ValueError(f"max_count must be >= 0, got {max_count}")
        now = utcnow() if now is None else as_utc(now, "now")
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
                self._remove_dir(self.record_dir(record_id, doomed[record_id]), strict=True)
            except OSError as exc:
                failed.append(f"{record_id}: {exc}")
        if failed:
            raise OSError(f"{len(ids)} records deleted but {len(failed)} artefact folders not removed: {failed[:3]}")
        return len(ids)

    def _remove_dir(self, directory: Path, strict: bool = False) -> None:
        """Remove a record folder and the date folders above it that became empty (never ``data_dir``).

        strict=False is for clean-up after a failed ``add``, where the original error is the one to report.
        """
        if not strict:
            shutil.rmtree(directory, ignore_errors=True)
        elif directory.exists():  # a record stored without artefacts has no folder
            shutil.rmtree(directory)
        root = self.data_dir.resolve()
        parent = directory.parent
        while parent.resolve() != root and root in parent.resolve().parents:
            try:
                parent.rmdir()
            except OSError:
                break  # not empty (or already gone)
            parent = parent.parent
