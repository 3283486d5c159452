"""Read-side summaries for the operator console: verdict counts, filter choices, score samples.

(Thumbnails are rendered by the API from the stored original and map, ``service.api.rendering``, and cached beside
the record's artefacts, so retention removes them with the record.)
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select

from service.storage.models import VERDICTS, InspectionRow, as_utc
from service.storage.reviews import ReviewRow, reviewed_clause


class SummaryMethods:
    """Mixed into InspectionStore (``self._sessions`` is its sessionmaker)."""

    def verdict_counts(
        self, since: datetime | None = None, product: str | None = None, line: str | None = None
    ) -> dict[str, int]:
        """Inspections by verdict with ``created_at >= since``, optionally of one product and/or line."""
        row = InspectionRow
        query = select(func.count()).select_from(row)
        if since is not None:
            query = query.where(row.created_at >= as_utc(since, "since"))
        if product is not None:
            query = query.where(row.product == product)
        if line is not None:
            query = query.where(row.line == line)
        # one count per verdict: each is a range scan of the (verdict, created_at) index, where a GROUP BY would
        # read every row of the verdict index on SQLite
        with self._sessions() as session:
            return {v: int(session.scalar(query.where(row.verdict == v))) for v in VERDICTS}

    def facets(self) -> dict[str, list[str]]:
        """The distinct product and line names of stored inspections, sorted (for the console's filters)."""
        out = {}
        with self._sessions() as session:
            for name, column in (("products", InspectionRow.product), ("lines", InspectionRow.line)):
                found = session.scalars(select(column).distinct().where(column.is_not(None)))
                out[name] = sorted(found)
        return out

    def scores_by_truth(self, product: str, limit: int = 5000) -> dict[str, list[float]]:
        """Image scores of a product's newest ``limit`` inspections, by what is known of the part:

        ``good``: verdict ok and not reviewed as an escape, or reviewed as a false reject; ``defect``: current
        review confirm_defect or escape; ``unreviewed``: rejected (verdict not ok) and not reviewed yet.
        """
        row, rev = InspectionRow, ReviewRow
        latest = (
            select(rev.decision)
            .where(rev.inspection_id == row.id)
            .order_by(rev.id.desc())
            .limit(1)
            .correlate(row)
            .scalar_subquery()
        )
        query = (
            select(row.verdict, row.score, latest)
            .where(row.product == product)
            .order_by(row.created_at.desc(), row.id.desc())
            .limit(limit)
        )
        out: dict[str, list[float]] = {"good": [], "defect": [], "unreviewed": []}
        with self._sessions() as session:
            for verdict, score, decision in session.execute(query):
                if decision in ("confirm_defect", "escape"):
                    out["defect"].append(float(score))
                elif decision == "false_reject" or verdict == "ok":
                    out["good"].append(float(score))
                else:
                    out["unreviewed"].append(float(score))
        return out

    def unreviewed_count(self, verdicts: tuple[str, ...]) -> int:
        """Inspections with one of ``verdicts`` and no review (the length of the review queue)."""
        query = select(func.count()).select_from(InspectionRow).where(InspectionRow.verdict.in_(verdicts))
        with self._sessions() as session:
            return int(session.scalar(query.where(reviewed_clause(False))))
