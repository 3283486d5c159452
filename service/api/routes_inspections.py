"""Stored inspections and product profiles.

- ``GET /inspections``: newest first (``order=oldest``: oldest first), filters ``product``, ``line``,
  ``verdict``, ``reviewed`` (true | false), ``since`` <= created_at < ``until`` (ISO 8601 with a time zone),
  ``limit`` (1-500, default 50) and the opaque ``cursor`` of the previous page -> ``{"items": [...],
  "next_cursor": str | null}``.
- ``GET /inspections/{id}``: the record, same fields as a /segment result without ``images``, plus its reviews.
- ``GET /inspections/{id}/overlay.png | heatmap.png | mask.png``: the PNG at the original image size, rendered from
  the stored original and map on first request and cached (``rendering``); byte-identical to the PNG the /segment
  request could have asked for inline.
- ``GET /products``, ``GET /products/{name}``, ``PUT /products/{name}``: per-product image (reject) threshold,
  optional review threshold, pixel threshold, image-score variant and fusion weight (all in [0, 1]); /segment uses
  them for requests naming the product (PUT needs an admin key). A PUT keeps the product's references and memory
  and drops the link to its calibration (hand-set thresholds). GET /products/{name} adds the memory and the
  calibration.

The store is synchronous, so every call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from service.inspection import ARTEFACT_KINDS, Verdict
from service.storage import InspectionStore, ProductProfile
from service.storage.artefacts import ArtefactMissingError, ArtefactStoreError
from service.storage.models import NAME_MAX, NAME_PATTERN, NAME_RULE, as_utc
from service.storage.store import CURSOR_MAX, CURSOR_PATTERN

from .deps import Store
from .problems import Problem, problem_responses, service_unavailable
from .rendering import stored_png
from .schemas import InspectionOut, InspectionPage, ProductIn, ProductList, ProductOut, ReviewOut, product_out
from .security import Caller, require_admin_key, require_api_key

logger = logging.getLogger("dhrclip.api")

router = APIRouter(dependencies=[Depends(require_api_key)])

InspectionId = Annotated[str, Path(min_length=1, max_length=64, description="inspection id (28 hex digits)")]
ProductName = Annotated[
    str, Path(min_length=1, max_length=NAME_MAX, pattern=NAME_PATTERN, description=f"product name: {NAME_RULE}")
]


def _out(record, request: Request, reviews: list | None = None) -> InspectionOut:
    out = InspectionOut.model_validate(record, context={"root_path": request.scope.get("root_path", "")})
    out.reviews = [ReviewOut.model_validate(r) for r in reviews or ()]
    return out


def _aware(value: datetime | None, name: str) -> datetime | None:
    """The filter in UTC; 422 for a naive datetime or one that leaves the datetime range in UTC."""
    if value is not None and (value.tzinfo is None or value.utcoffset() is None):
        raise Problem(
            422, "Invalid request", f"{name} must carry a time zone, e.g. 2026-01-31T08:00:00Z", "validation-error"
        )
    try:
        return None if value is None else as_utc(value, name)
    except ValueError as exc:
        raise Problem(422, "Invalid request", str(exc), "validation-error") from None


class InspectionFilters(BaseModel):
    """Query filters shared by ``GET /inspections`` and ``GET /inspections.csv`` (keyword arguments of
    ``InspectionStore.list``). An unknown parameter is a 422: a misspelt filter would list everything."""

    model_config = ConfigDict(extra="forbid")

    product: str | None = Field(None, max_length=NAME_MAX, pattern=NAME_PATTERN)
    line: str | None = Field(None, max_length=NAME_MAX, pattern=NAME_PATTERN)
    verdict: Verdict | None = None
    reviewed: bool | None = Field(None, description="true: only reviewed inspections; false: only unreviewed")
    since: datetime | None = Field(None, description="created_at >= since (ISO 8601 with zone)")
    until: datetime | None = Field(None, description="created_at < until (ISO 8601 with zone)")
    order: Literal["newest", "oldest"] = Field("newest", description="newest first, or oldest first (review queue)")

    def store_kwargs(self) -> dict:
        """The filters as ``InspectionStore.list`` arguments; 422 problem for a datetime without a zone."""
        return {
            "product": self.product,
            "line": self.line,
            "verdict": self.verdict,
            "reviewed": self.reviewed,
            "since": _aware(self.since, "since"),
            "until": _aware(self.until, "until"),
            "oldest_first": self.order == "oldest",
        }


class PageQuery(InspectionFilters):
    """The query of ``GET /inspections``: the filters and the page (one model, so that extras are refused)."""

    limit: int = Field(50, ge=1, le=500)
    cursor: str | None = Field(
        None,
        max_length=CURSOR_MAX,
        pattern=CURSOR_PATTERN,
        description="next_cursor of the previous page (opaque; 422 when it is not one)",
    )


def list_page(store: InspectionStore, filters: dict, limit: int, cursor: str | None):
    """One page of records with their reviews: ``([(record, [reviews])], next_cursor)``; 422 for a bad cursor."""
    try:
        records, next_cursor = store.list(**filters, limit=limit, cursor=cursor)
    except ValueError as exc:  # invalid cursor
        raise Problem(422, "Invalid request", str(exc), "validation-error") from None
    reviews = store.reviews_of([r.id for r in records])
    return [(r, reviews.get(r.id, [])) for r in records], next_cursor


@router.get("/inspections", response_model=InspectionPage, tags=["inspection"], responses=problem_responses(401, 422))
async def list_inspections(
    request: Request,
    store: Store,
    query: Annotated[PageQuery, Query()],
):
    page, next_cursor = await asyncio.to_thread(list_page, store, query.store_kwargs(), query.limit, query.cursor)
    return InspectionPage(items=[_out(r, request, reviews) for r, reviews in page], next_cursor=next_cursor)


@router.get(
    "/inspections/{inspection_id}",
    response_model=InspectionOut,
    tags=["inspection"],
    responses=problem_responses(401, 404),
)
async def get_inspection(request: Request, store: Store, inspection_id: InspectionId):
    record = await asyncio.to_thread(store.get, inspection_id)
    if record is None:
        raise Problem(404, "Inspection not found", f"no inspection with id {inspection_id!r}", "not-found")
    reviews = await asyncio.to_thread(store.reviews_of, [inspection_id])
    return _out(record, request, reviews.get(inspection_id, []))


@router.get(
    "/inspections/{inspection_id}/{kind}.png",
    response_class=Response,
    tags=["inspection"],
    responses={200: {"content": {"image/png": {}}, "description": "the PNG"}, **problem_responses(401, 404, 500, 503)},
)
async def get_artefact(store: Store, kind: str, inspection_id: InspectionId):
    return await artefact_response(store, inspection_id, kind)


async def read_stored(read, *args):
    """``read(*args)`` in a thread: 500 (logged) when the artefact store lost what the record lists (a damaged
    store), 503 when it cannot be reached."""
    try:
        return await asyncio.to_thread(read, *args)
    except ArtefactMissingError as exc:
        logger.error("damaged artefact store: %s", exc)
        raise Problem(500, "Artefact missing", str(exc), "artefact-missing") from None
    except ArtefactStoreError as exc:
        raise service_unavailable(str(exc), 5, "artefact-store-unavailable", "Artefact store unavailable") from None


async def artefact_response(store: InspectionStore, inspection_id: str, kind: str) -> Response:
    """The PNG of one kind (rendered on first request): 404 unknown kind or id, 500 when the artefact store lost
    what it is rendered from, 503 when the store cannot be reached."""
    if kind not in ARTEFACT_KINDS:
        raise Problem(
            404, "Artefact not found", f"unknown artefact {kind!r}; choose {', '.join(ARTEFACT_KINDS)}", "not-found"
        )
    data = await read_stored(stored_png, store, inspection_id, kind)
    if data is None:
        raise Problem(404, "Artefact not found", f"no {kind}.png for inspection {inspection_id!r}", "not-found")
    disposition = f'inline; filename="{inspection_id}-{kind}.png"'
    return Response(data, media_type="image/png", headers={"Content-Disposition": disposition})


@router.get("/products", response_model=ProductList, tags=["products"], responses=problem_responses(401))
async def list_products(store: Store):
    profiles = await asyncio.to_thread(store.list_products)
    return ProductList(items=[ProductOut.model_validate(p) for p in profiles])


@router.get("/products/{name}", response_model=ProductOut, tags=["products"], responses=problem_responses(401, 404))
async def get_product(store: Store, name: ProductName):
    profile = await asyncio.to_thread(store.get_product, name)
    if profile is None:
        raise Problem(404, "Product not found", f"no profile for product {name!r}; create it with PUT", "not-found")
    memory = await asyncio.to_thread(store.get_memory, profile.memory_version) if profile.memory_version else None
    calibration = (
        await asyncio.to_thread(store.get_calibration, profile.calibration_version)
        if profile.calibration_version
        else None
    )
    return product_out(profile, memory, calibration)


@router.put(
    "/products/{name}", response_model=ProductOut, tags=["products"], responses=problem_responses(401, 403, 422)
)
async def put_product(body: ProductIn, store: Store, name: ProductName, _: Caller = Depends(require_admin_key)):
    return ProductOut.model_validate(await save_product(store, name, body))


async def save_product(store: InspectionStore, name: str, body: ProductIn) -> ProductProfile:
    """Store a product's thresholds (the caller has checked the admin role)."""
    existing = await asyncio.to_thread(store.get_product, name)
    profile = ProductProfile(
        name=name,
        image_threshold=body.image_threshold,
        pixel_threshold=body.pixel_threshold,
        image_score=body.image_score,
        review_threshold=body.review_threshold,
        fusion_weight=body.fusion_weight,
        memory_version=existing.memory_version if existing else None,  # references stay; hand-set thresholds
    )
    return await asyncio.to_thread(store.put_product, profile)
