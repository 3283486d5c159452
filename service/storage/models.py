"""Inspection storage data model: public dataclasses, ORM tables, time-sortable ids and UTC datetimes.

Ids are 28 lowercase hex digits: a 12-digit millisecond Unix timestamp followed by 16 random digits. Within one
process they are strictly increasing (same millisecond: the random part is incremented), so sorting ids sorts by
creation time. Datetimes are stored in UTC and always come back tz-aware, also from SQLite, which drops tzinfo.
"""

from __future__ import annotations

import math
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import JSON, DateTime, Float, Index, Integer, String
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from service.inspection import VERDICTS, viewable_kinds

ID_RE = re.compile(r"^[0-9a-f]{28}$")
KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
# The one grammar of product names, line names and part ids: 1-200 characters; letters and digits of any script,
# and inside the name also space and _ . : + # @ ( ) -; it starts and ends with a letter or digit. So no control
# character (NUL), no leading or trailing space and nothing that needs escaping in a URL path segment but space.
NAME_MAX = 200
NAME_PATTERN = r"^[^\W_](?:[\w .:+#@()\-]{0,198}[^\W_])?$"  # 198 = NAME_MAX - 2
NAME_RE = re.compile(NAME_PATTERN)
NAME_RULE = (
    "1-200 letters or digits, and inside the name also space _ . : + # @ ( ) -; starting and ending with a letter "
    "or digit"
)

_id_lock = threading.Lock()
_last_id = [0, 0]  # [ms timestamp, 64-bit random part] of the last id handed out


def utcnow() -> datetime:
    """Current time, tz-aware UTC."""
    return datetime.now(UTC)


def new_inspection_id(now: datetime | None = None) -> str:
    """Time-sortable unique id: ``f"{ms:012x}{rand:016x}"`` (28 hex digits).

    Without ``now`` the wall clock is used and ids are strictly increasing within the process (same millisecond
    or a clock step back: the previous random part + 1). With an explicit ``now`` the id just encodes that time.
    """
    if now is not None:
        return f"{int(as_utc(now, 'now').timestamp() * 1000):012x}{secrets.randbits(64):016x}"
    ms = int(time.time() * 1000)
    with _id_lock:
        last_ms, last_rand = _last_id
        if ms <= last_ms:
            ms, rand = last_ms, last_rand + 1
            if rand >= 1 << 64:
                ms, rand = last_ms + 1, secrets.randbits(63)
        else:
            rand = secrets.randbits(63)  # 63 bits leave room to increment within the millisecond
        _last_id[0], _last_id[1] = ms, rand
    return f"{ms:012x}{rand:016x}"


def as_utc(value: datetime, name: str = "datetime") -> datetime:
    """Convert a tz-aware datetime to UTC; a naive one is an error (its zone would be a guess)."""
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {value.isoformat()}")
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+01:00 or 9999-12-31T23:59-01:00: no such UTC datetime
        raise ValueError(f"{name} {value.isoformat()} is out of range once converted to UTC") from None


class UTCDateTime(TypeDecorator):
    """DateTime column that stores UTC and returns tz-aware UTC on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(kw_only=True)
class InspectionRecord:
    """One inspection result. ``regions`` are ``Region.to_dict()`` entries; ``artefacts`` the stored kinds
    (``original`` and ``map``; ``overlay`` too without originals; the three PNG kinds in the first layout)."""

    id: str = field(default_factory=new_inspection_id)
    created_at: datetime = field(default_factory=utcnow)
    product: str | None = None
    line: str | None = None
    part_id: str | None = None
    filename: str | None = None
    width: int
    height: int
    score: float
    threshold: float
    verdict: str
    image_score: str
    pixel_threshold: float
    defect_area_ratio: float
    regions: list[dict] = field(default_factory=list)
    model: dict = field(default_factory=dict)
    timing_ms: dict = field(default_factory=dict)
    artefacts: list[str] = field(default_factory=list)
    memory_version: str | None = None  # normal memory the image was judged with (None: zero-shot)
    calibration_version: str | None = None  # calibration the thresholds came from (None: set by hand)

    @property
    def viewable(self) -> tuple[str, ...]:
        """The PNG kinds this inspection can show (stored, or rendered on first request from what is stored)."""
        return viewable_kinds(self.artefacts)


@dataclass(kw_only=True)
class ProductProfile:
    """Per-product decision settings; ``image_score`` names the image-score variant the thresholds belong to.

    ``image_threshold`` is the reject threshold, ``review_threshold`` (None: equal to it) the lower bound of the
    review zone; ``fusion_weight`` w weighs the zero-shot map against the few-shot map of the product's normal
    memory (``memory_version``, None without references); ``calibration_version`` names the calibration the
    thresholds came from (None: set by hand).
    """

    name: str
    image_threshold: float
    pixel_threshold: float
    image_score: str
    updated_at: datetime = field(default_factory=utcnow)
    review_threshold: float | None = None
    fusion_weight: float = 0.5
    memory_version: str | None = None
    calibration_version: str | None = None
    pixel_good_level: float | None = None  # median good pixel of the calibration: anchors the heatmap colours


@dataclass(kw_only=True)
class ReferenceImage:
    """A good reference image of a product: its uploaded bytes and model features are kept on disk."""

    id: str = field(default_factory=new_inspection_id)
    product: str
    filename: str
    sha256: str
    width: int
    height: int
    nbytes: int
    model_key: str  # which model (backbone, preset, layer mode, precision) the stored features belong to
    created_at: datetime = field(default_factory=utcnow)


@dataclass(kw_only=True)
class MemoryInfo:
    """A built normal memory: ``tokens`` per layer over both view kinds, ``nbytes`` of its tensors."""

    version: str
    product: str
    model_key: str
    n_references: int
    tokens: int
    nbytes: int
    created_at: datetime = field(default_factory=utcnow)


@dataclass(kw_only=True)
class CalibrationRecord:
    """A stored calibration (``content``: ``service.engine.calibration.Calibration.to_dict()``)."""

    version: str
    product: str
    memory_version: str | None
    content: dict
    created_at: datetime = field(default_factory=utcnow)


class Base(DeclarativeBase):
    pass


class InspectionRow(Base):
    __tablename__ = "inspections"

    id: Mapped[str] = mapped_column(String(28), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    product: Mapped[str | None] = mapped_column(String(200), index=True)
    line: Mapped[str | None] = mapped_column(String(200), index=True)
    part_id: Mapped[str | None] = mapped_column(String(200))
    filename: Mapped[str | None] = mapped_column(String(1000))
    width: Mapped[int] = mapped_column(Integer, nullable=False)
    height: Mapped[int] = mapped_column(Integer, nullable=False)
    score: Mapped[float] = mapped_column(Float, nullable=False)
    threshold: Mapped[float] = mapped_column(Float, nullable=False)
    verdict: Mapped[str] = mapped_column(String(8), nullable=False, index=True)
    image_score: Mapped[str] = mapped_column(String(64), nullable=False)
    pixel_threshold: Mapped[float] = mapped_column(Float, nullable=False)
    defect_area_ratio: Mapped[float] = mapped_column(Float, nullable=False)
    regions: Mapped[list] = mapped_column(JSON, nullable=False)
    model: Mapped[dict] = mapped_column(JSON, nullable=False)
    timing_ms: Mapped[dict] = mapped_column(JSON, nullable=False)
    artefacts: Mapped[list] = mapped_column(JSON, nullable=False)
    memory_version: Mapped[str | None] = mapped_column(String(16))
    calibration_version: Mapped[str | None] = mapped_column(String(16))

    # newest-first pages overall, and per verdict, product and line (console tiles, reject strip, review queue)
    __table_args__ = (
        Index("ix_inspections_created_id", "created_at", "id"),
        Index("ix_inspections_verdict_created", "verdict", "created_at", "id"),
        Index("ix_inspections_product_created", "product", "created_at", "id"),
        Index("ix_inspections_line_created", "line", "created_at", "id"),
    )


class ProductRow(Base):
    __tablename__ = "products"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    image_threshold: Mapped[float] = mapped_column(Float, nullable=False)
    pixel_threshold: Mapped[float] = mapped_column(Float, nullable=False)
    image_score: Mapped[str] = mapped_column(String(64), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    review_threshold: Mapped[float | None] = mapped_column(Float)
    fusion_weight: Mapped[float] = mapped_column(Float, nullable=False, server_default="0.5")
    memory_version: Mapped[str | None] = mapped_column(String(16))
    calibration_version: Mapped[str | None] = mapped_column(String(16))
    pixel_good_level: Mapped[float | None] = mapped_column(Float)


class ReferenceRow(Base):
    __tablename__ = "reference_images"

    id: Mapped[str] = mapped_column(String(28), primary_key=True)
    product: Mapped[str] = mapped_column(String(200), nullable=False, index=True)
    filename: Mapped[str] = mapped_column(String(1000), nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    width: Mapped[int] = mapped_column(Integer, nullable=False)
    height: Mapped[int] = mapped_column(Integer, nullable=False)
    nbytes: Mapped[int] = mapped_column(Integer, nullable=False)
    model_key: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class MemoryRow(Base):
    __tablename__ = "memories"

    version: Mapped[str] = mapped_column(String(16), primary_key=True)
    product: Mapped[str] = mapped_column(String(200), nullable=False, index=True)
    model_key: Mapped[str] = mapped_column(String(64), nullable=False)
    n_references: Mapped[int] = mapped_column(Integer, nullable=False)
    tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    nbytes: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class CalibrationRow(Base):
    __tablename__ = "calibrations"

    version: Mapped[str] = mapped_column(String(16), primary_key=True)
    product: Mapped[str] = mapped_column(String(200), nullable=False, index=True)
    memory_version: Mapped[str | None] = mapped_column(String(16))
    content: Mapped[dict] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class IdempotencyRow(Base):
    """One ``Idempotency-Key`` of /segment: the SHA-256 of what was sent and the inspections it created.

    ``state`` pending: a request holds the key (``claim`` is its random token, ``created_at`` when it took it,
    ``owner`` the instance it runs in); done: ``inspection_ids`` were committed with it (``claim`` and ``owner``
    are null). See ``service.storage.idempotency``.
    """

    __tablename__ = "idempotency_keys"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64), nullable=False)
    inspection_ids: Mapped[list] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, index=True)
    state: Mapped[str] = mapped_column(String(8), nullable=False, server_default="done")
    claim: Mapped[str | None] = mapped_column(String(32))
    owner: Mapped[str | None] = mapped_column(String(32))  # the InstanceRow id of the process holding it pending


class InstanceRow(Base):
    """One running service process: it proves it is alive by pushing ``alive_until`` forward every heartbeat.

    ``alive_until`` = heartbeat time + ``DEAD_AFTER_BEATS`` heartbeat intervals, both on the database's clock
    (PostgreSQL ``now()``; SQLite, one host, the host's clock). A row past it, or gone, is a dead process. See
    ``service.storage.instances``.
    """

    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)  # the replica name (DHR_REPLICA_NAME, host-pid)
    host: Mapped[str] = mapped_column(String(255), nullable=False)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    alive_until: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


RECORD_FIELDS = tuple(InspectionRecord.__dataclass_fields__)
PROFILE_FIELDS = tuple(ProductProfile.__dataclass_fields__)


def record_to_row(record: InspectionRecord) -> InspectionRow:
    return InspectionRow(**{name: getattr(record, name) for name in RECORD_FIELDS})


def row_to_record(row: InspectionRow) -> InspectionRecord:
    return InspectionRecord(**{name: getattr(row, name) for name in RECORD_FIELDS})


def row_to_profile(row: ProductRow) -> ProductProfile:
    return ProductProfile(**{name: getattr(row, name) for name in PROFILE_FIELDS})


def check_name(value: str | None, what: str) -> None:
    """Raise ValueError unless ``value`` is None or follows the name grammar (``NAME_RULE``)."""
    if value is not None and not (isinstance(value, str) and NAME_RE.fullmatch(value)):
        raise ValueError(f"{what} {value!r} is not a valid name: {NAME_RULE}")


def to_row(row_type: type, item) -> Base:
    """A dataclass instance as the ORM row of the same field names."""
    return row_type(**{name: getattr(item, name) for name in type(item).__dataclass_fields__})


def from_row(item_type: type, row: Base):
    """An ORM row as the dataclass of the same field names."""
    return item_type(**{name: getattr(row, name) for name in item_type.__dataclass_fields__})


def validate_artefacts(record: InspectionRecord, artefacts) -> list[str]:
    """The kinds of ``{kind: PNG bytes}`` to store with ``record``; ValueError / TypeError for what cannot be."""
    kinds = list(artefacts)
    for kind, data in artefacts.items():
        if not isinstance(kind, str) or not KIND_RE.match(kind):
            raise ValueError(f"artefact kind must match {KIND_RE.pattern}, got {kind!r}")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"artefact {kind!r} must be bytes, got {type(data).__name__}")
    if record.artefacts and sorted(record.artefacts) != sorted(kinds):
        raise ValueError(f"record.artefacts {record.artefacts} differ from the kinds given {kinds}")
    return kinds


def validate_record(record: InspectionRecord) -> None:
    """Raise ValueError naming the first field that cannot be stored."""
    for name in ("product", "line", "part_id"):
        check_name(getattr(record, name), name)
    if record.filename is not None and any(ord(c) < 32 or ord(c) == 127 for c in record.filename):
        raise ValueError(f"filename {record.filename!r} holds control characters")
    if not ID_RE.match(record.id or ""):
        raise ValueError(f"record id must be 28 lowercase hex digits, got {record.id!r}")
    as_utc(record.created_at, "created_at")
    if record.verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {record.verdict!r}")
    if record.width < 1 or record.height < 1:
        raise ValueError(f"width and height must be >= 1, got {record.width}x{record.height}")
    if not record.image_score:
        raise ValueError("image_score must name the image-score variant")
    for name in ("score", "threshold", "pixel_threshold", "defect_area_ratio"):
        if not math.isfinite(getattr(record, name)):
            raise ValueError(f"{name} must be a finite number, got {getattr(record, name)!r}")


def validate_profile(profile: ProductProfile) -> None:
    """Raise ValueError naming the first field of a product profile that cannot be stored."""
    check_name(profile.name, "product name")
    if not profile.image_score:
        raise ValueError("image_score must name the image-score variant")
    if not math.isfinite(profile.image_threshold):
        raise ValueError(f"image_threshold must be finite, got {profile.image_threshold!r}")
    if not 0.0 <= profile.pixel_threshold <= 1.0:
        raise ValueError(f"pixel_threshold must be in [0, 1], got {profile.pixel_threshold!r}")
    if profile.review_threshold is not None and not profile.review_threshold <= profile.image_threshold:
        raise ValueError(
            f"review_threshold {profile.review_threshold} must not exceed image_threshold {profile.image_threshold}"
        )
    if not 0.0 <= profile.fusion_weight <= 1.0:
        raise ValueError(f"fusion_weight must be in [0, 1], got {profile.fusion_weight!r}")
