"""Human reviews of inspections: their own table (who, when, decision, note) and the store methods that use it.

An inspection may be reviewed more than once (a quality engineer correcting an operator); every review is kept
and the newest one is the inspection's current review. Decisions (``service.inspection.DECISION_VERDICTS``) and
the verdicts each one applies to::

    confirm_defect   the rejected part is defective            any verdict but ok
    false_reject     the rejected part is good                 any verdict but ok
    escape           a part passed as ok proved defective       verdict ok

Reviews are deleted together with their inspection (retention), in the same transaction as the inspection row.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, Text, delete, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from service.inspection import DECISION_VERDICTS, REVIEW_DECISIONS
from service.storage.models import Base, InspectionRow, UTCDateTime, as_utc, utcnow

MAX_NOTE_CHARS = 2000
MAX_REVIEWER_CHARS = 100


@dataclass(kw_only=True)
class Review:
    """One review. ``role`` is the key's role (operator | admin | open); ``key_id`` a fingerprint of that key."""

    inspection_id: str
    decision: str
    note: str = ""
    reviewer: str = ""
    role: str = "open"
    key_id: str | None = None
    reference_id: str | None = None
    created_at: datetime = field(default_factory=utcnow)
    id: int | None = None


class ReviewRow(Base):
    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    inspection_id: Mapped[str] = mapped_column(
        String(28), ForeignKey("inspections.id", ondelete="CASCADE"), nullable=False, index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    decision: Mapped[str] = mapped_column(String(32), nullable=False, index=True)
    note: Mapped[str] = mapped_column(Text, nullable=False)
    reviewer: Mapped[str] = mapped_column(String(MAX_REVIEWER_CHARS), nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    key_id: Mapped[str | None] = mapped_column(String(16))
    reference_id: Mapped[str | None] = mapped_column(String(64))


REVIEW_FIELDS = tuple(Review.__dataclass_fields__)


def validate_review(review: Review) -> None:
    """Raise ValueError naming the first field of a review that cannot be stored."""
    if review.decision not in REVIEW_DECISIONS:
        raise ValueError(f"decision must be one of {', '.join(REVIEW_DECISIONS)}, got {review.decision!r}")
    if len(review.note) > MAX_NOTE_CHARS:
        raise ValueError(f"note has {len(review.note)} characters; at most {MAX_NOTE_CHARS}")
    if len(review.reviewer) > MAX_REVIEWER_CHARS:
        raise ValueError(f"reviewer has {len(review.reviewer)} characters; at most {MAX_REVIEWER_CHARS}")
    as_utc(review.created_at, "created_at")


class ReviewNotAllowed(ValueError):
    """The decision does not apply to the inspection's verdict (e.g. an escape of a rejected part)."""


def reviewed_clause(reviewed: bool):
    """WHERE clause on InspectionRow: has (True) or has not (False) at least one review."""
    has = select(ReviewRow.id).where(ReviewRow.inspection_id == InspectionRow.id).exists()
    return has if reviewed else ~has


def delete_reviews_of(session: Session, inspection_ids: list[str]) -> None:
    """Delete the reviews of these inspections inside the caller's transaction (before their rows go)."""
    session.execute(delete(ReviewRow).where(ReviewRow.inspection_id.in_(inspection_ids)))


class ReviewMethods:
    """Mixed into InspectionStore (``self._sessions`` is its sessionmaker)."""

    def add_review(self, review: Review) -> Review:
        """Store a review; returns it with its id. Raises LookupError (unknown inspection), ReviewNotAllowed
        (decision does not fit the verdict) or ValueError (invalid field); nothing is written in those cases."""
        validate_review(review)
        stored = replace(review, created_at=as_utc(review.created_at), id=None)
        with self._sessions() as session, session.begin():
            verdict = session.scalar(select(InspectionRow.verdict).where(InspectionRow.id == review.inspection_id))
            if verdict is None:
                raise LookupError(f"no inspection with id {review.inspection_id!r}")
            allowed = DECISION_VERDICTS[review.decision]
            if verdict not in allowed:
                raise ReviewNotAllowed(
                    f"{review.decision} applies to verdicts {' or '.join(allowed)}; this inspection's verdict is"
                    f" {verdict}"
                )
            row = ReviewRow(**{k: getattr(stored, k) for k in REVIEW_FIELDS if k != "id"})
            session.add(row)
            session.flush()
            stored.id = row.id
        return stored

    def reviews_of(self, inspection_ids: list[str]) -> dict[str, list[Review]]:
        """``{inspection id: [reviews, oldest first]}`` for the ids that have reviews."""
        out: dict[str, list[Review]] = {}
        if not inspection_ids:
            return out
        query = select(ReviewRow).where(ReviewRow.inspection_id.in_(inspection_ids)).order_by(ReviewRow.id)
        with self._sessions() as session:
            for row in session.scalars(query):
                out.setdefault(row.inspection_id, []).append(Review(**{k: getattr(row, k) for k in REVIEW_FIELDS}))
        return out

    def review_counts(self) -> dict[str, int]:
        """Stored reviews by decision (every decision present, 0 when none)."""
        query = select(ReviewRow.decision, func.count()).group_by(ReviewRow.decision)
        with self._sessions() as session:
            found = dict(session.execute(query).all())
        return {d: int(found.get(d, 0)) for d in REVIEW_DECISIONS}
