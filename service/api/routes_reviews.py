"""Reviews of inspections and the CSV export for quality reports.

- ``POST /inspections/{id}/review``: JSON ``{"decision", "note", "reviewer"}`` -> 201 with the stored review.
  Decisions: ``confirm_defect`` and ``false_reject`` for verdicts review/defect, ``escape`` for verdict ok (409
  otherwise); unknown id 404; unknown decision, over-long note or reviewer, unknown field 422. A failed request
  writes nothing. Every review counts in ``dhr_reviews_total{decision}``.
- ``GET /inspections.csv``: every inspection matching the filters of ``GET /inspections`` (same query
  parameters, no paging), one row each with its current (newest) review; text cells that a spreadsheet would
  run as a formula (leading ``= + - @``, tab, CR) are prefixed with ``'``.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from service.storage import InspectionStore
from service.storage.reviews import Review, ReviewNotAllowed

from .deps import Context, Store
from .problems import Problem, problem_responses
from .routes_inspections import InspectionFilters, InspectionId, list_page
from .schemas import ReviewIn, ReviewOut
from .security import Caller, require_api_key
from .state import ServiceContext

router = APIRouter(tags=["review"])

CSV_PAGE = 500
CSV_COLUMNS = (
    "id",
    "created_at",
    "product",
    "line",
    "part_id",
    "filename",
    "width",
    "height",
    "score",
    "threshold",
    "verdict",
    "image_score",
    "defect_area_ratio",
    "regions",
    "review_decision",
    "reviewed_at",
    "reviewer",
    "review_note",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


async def submit_review(ctx: ServiceContext, inspection_id: str, body: ReviewIn, caller: Caller) -> Review:
    """Store one review for the caller; 404 unknown inspection, 409 decision does not fit the verdict."""
    review = Review(
        inspection_id=inspection_id,
        decision=body.decision,
        note=body.note,
        reviewer=body.reviewer.strip() or caller.role,
        role=caller.role,
        key_id=caller.key_id,
    )
    try:
        stored = await asyncio.to_thread(ctx.require_store().add_review, review)
    except LookupError as exc:
        raise Problem(404, "Inspection not found", str(exc), "not-found") from None
    except ReviewNotAllowed as exc:
        raise Problem(409, "Decision does not fit the verdict", str(exc), "review-conflict") from None
    ctx.metrics.reviews.labels(decision=stored.decision).inc()
    return stored


@router.post(
    "/inspections/{inspection_id}/review",
    status_code=201,
    response_model=ReviewOut,
    responses=problem_responses(401, 404, 409, 422),
)
async def post_review(
    body: ReviewIn, ctx: Context, inspection_id: InspectionId, caller: Caller = Depends(require_api_key)
):
    return ReviewOut.model_validate(await submit_review(ctx, inspection_id, body, caller))


def _text(value) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def csv_rows(store: InspectionStore, filters: dict) -> Iterator[str]:
    """The header line, then one CSV line per matching inspection, read from the store a page at a time."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")

    def flush() -> str:
        out = buf.getvalue()
        buf.seek(0)
        buf.truncate()
        return out

    writer.writerow(CSV_COLUMNS)
    yield flush()
    cursor = None
    while True:
        page, cursor = list_page(store, filters, CSV_PAGE, cursor)
        for r, reviews in page:
            last = reviews[-1] if reviews else None
            writer.writerow(
                [
                    r.id,
                    r.created_at.isoformat(),
                    *(_text(v) for v in (r.product, r.line, r.part_id, r.filename)),
                    r.width,
                    r.height,
                    repr(r.score),
                    repr(r.threshold),
                    r.verdict,
                    r.image_score,
                    repr(r.defect_area_ratio),
                    len(r.regions),
                    last.decision if last else "",
                    last.created_at.isoformat() if last else "",
                    _text(last.reviewer) if last else "",
                    _text(last.note) if last else "",
                ]
            )
        yield flush()
        if cursor is None:
            return


@router.get(
    "/inspections.csv",
    tags=["inspection"],
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}, "description": "CSV, header row first"}, **problem_responses(401)},
    dependencies=[Depends(require_api_key)],
)
async def export_csv(store: Store, filters: Annotated[InspectionFilters, Query()]):
    return StreamingResponse(
        csv_rows(store, filters.store_kwargs()),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="inspections.csv"'},
    )
