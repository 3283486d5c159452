"""Reviews of inspections and the CSV export for quality reports.

- ``POST /inspections/{id}/review``: JSON ``{"decision", "note", "reviewer", "add_reference"}`` -> 201 with the
  stored review. Decisions: ``confirm_defect`` and ``false_reject`` for verdicts review/defect, ``escape`` for
  verdict ok (409 otherwise); unknown id 404; unknown decision, over-long note or reviewer, unknown field 422.
  ``add_reference: true`` (false_reject only, admin key) also adds the inspection's stored original as a good
  reference of its product (``reference_id`` of the review); 409 ``original-not-stored`` when it was not kept. A
  failed request writes nothing. Every review counts in ``dhr_reviews_total{decision}``.
- ``GET /inspections.csv``: every inspection matching the filters of ``GET /inspections`` (same query
  parameters, no paging), one row each with its current (newest) review; text cells that a spreadsheet would
  run as a formula (leading ``= + - @``, tab, CR) are prefixed with ``'``.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from service.inspection import DECISION_VERDICTS
from service.storage import InspectionStore
from service.storage.models import ReferenceImage
from service.storage.reviews import Review, ReviewNotAllowed

from .deps import Context, Store
from .pipeline import Upload
from .problems import Problem, problem_responses
from .routes_inspections import InspectionFilters, InspectionId, list_page, read_stored
from .routes_knowledge import remove_reference, store_references
from .schemas import ReviewIn, ReviewOut
from .security import Caller, forbid_unless_admin, require_api_key
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


async def reference_from_inspection(ctx: ServiceContext, inspection_id: str, caller: Caller) -> ReferenceImage:
    """Add the inspection's stored original as a good reference of its product (the references route's path).

    403 without an admin key, 404 unknown inspection, 409 when the part was not rejected, names no product, was
    stored without its original (``DHR_STORE_ORIGINALS=false``, or from before originals were kept) or is a
    reference already (same SHA-256); the analysis' own errors as for ``POST /products/{name}/references``."""
    forbid_unless_admin(caller, "add references")
    store = ctx.require_store()
    record = await asyncio.to_thread(store.get, inspection_id)
    if record is None:
        raise Problem(404, "Inspection not found", f"no inspection with id {inspection_id!r}", "not-found")
    allowed = DECISION_VERDICTS["false_reject"]
    if record.verdict not in allowed:
        raise Problem(
            409,
            "Decision does not fit the verdict",
            f"false_reject applies to verdicts {' or '.join(allowed)}; this inspection's verdict is {record.verdict}",
            "review-conflict",
        )
    if not record.product:
        raise Problem(409, "No product", f"inspection {inspection_id} names no product to add it to", "no-product")
    data = await read_stored(store.read_artefact, inspection_id, "original")  # None: never stored
    if data is None:
        raise Problem(
            409,
            "Original not stored",
            f"inspection {inspection_id} was stored without its uploaded image (DHR_STORE_ORIGINALS=false, or "
            f"stored before originals were kept); add the image with POST /products/{record.product}/references",
            "original-not-stored",
        )
    sha = hashlib.sha256(data).hexdigest()
    if any(r.sha256 == sha for r in await asyncio.to_thread(store.list_references, record.product)):
        raise Problem(
            409,
            "Already a reference",
            f"the image of inspection {inspection_id} is a reference of {record.product!r} already",
            "already-a-reference",
        )
    name = record.filename or f"inspection-{inspection_id}"
    return (await store_references(ctx, record.product, [Upload(0, name, data)]))[0]


async def submit_review(ctx: ServiceContext, inspection_id: str, body: ReviewIn, caller: Caller) -> Review:
    """Store one review for the caller; 404 unknown inspection, 409 decision does not fit the verdict.

    With ``add_reference`` the original becomes a reference first; if the review then cannot be stored, that
    reference is removed again: both are written or neither."""
    reference = await reference_from_inspection(ctx, inspection_id, caller) if body.add_reference else None
    review = Review(
        inspection_id=inspection_id,
        decision=body.decision,
        note=body.note,
        reviewer=body.reviewer.strip() or caller.role,
        role=caller.role,
        key_id=caller.key_id,
        reference_id=None if reference is None else reference.id,
    )
    try:
        stored = await asyncio.to_thread(ctx.require_store().add_review, review)
    except Exception as exc:
        if reference is not None:
            await remove_reference(ctx, reference.product, reference.id)
        if isinstance(exc, LookupError):
            raise Problem(404, "Inspection not found", str(exc), "not-found") from None
        if isinstance(exc, ReviewNotAllowed):
            raise Problem(409, "Decision does not fit the verdict", str(exc), "review-conflict") from None
        raise
    ctx.metrics.reviews.labels(decision=stored.decision).inc()
    return stored


@router.post(
    "/inspections/{inspection_id}/review",
    status_code=201,
    response_model=ReviewOut,
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 500, 503, 504),
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
