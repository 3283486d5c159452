"""Product knowledge: good reference images (the normal memory) and calibration.

- ``POST /products/{name}/references``: multipart field ``image``, one or more good images. Analysed through the
  engine and batcher like /segment; all-or-nothing (one bad image: 4xx, nothing added, memory unchanged). The
  uploaded bytes and the features are kept; the memory is rebuilt. 201 ``ReferenceList`` of the added images.
- ``GET /products/{name}/references``: every reference and the memory built from them.
- ``DELETE /products/{name}/references/{id}``: 204; the memory is rebuilt (none left: no memory, zero-shot).
- ``POST /products/{name}/calibrate``: multipart ``good`` files, or ``use_references=true`` (each reference
  scored against a memory of the others), optional ``defect`` files; form fields ``target_frr`` (default 0.01,
  in (0, 0.5)), ``review_frr`` (optional, >= target_frr: the review zone), ``pixel_quantile`` (default 0.999),
  ``image_score`` (default: the product's). Sets the product's thresholds; 200 ``ProductOut`` with the
  calibration. A sample too small for ``target_frr`` is refused with 422 ``sample-too-small``.

Adding or deleting references and calibrating need an admin key (``DHR_ADMIN_KEYS``); listing an operator key.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response

from service.engine import IMAGE_SCORES
from service.engine.calibration import DEFAULT_PIXEL_QUANTILE, DEFAULT_TARGET_FRR, SampleTooSmall, calibrate
from service.engine.knowledge import features_to_bytes, model_key
from service.storage import ProductProfile
from service.storage.models import CalibrationRecord, ReferenceImage

from .knowledge import leave_one_out, product_memory, rebuild_memory
from .pipeline import STORAGE_ERRORS, Upload, admit, analyse_all, storage_problem
from .problems import Problem, problem_responses
from .routes_inspections import ProductName
from .routes_segment import read_uploads, refuse_unknown
from .schemas import ProductOut, ReferenceList, memory_out, product_out, reference_out
from .security import Caller, require_admin_key, require_api_key
from .state import ServiceContext

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["products"])

ReferenceId = Annotated[str, Path(min_length=1, max_length=64, description="reference id (28 hex digits)")]


def _lock(ctx: ServiceContext, product: str) -> asyncio.Lock:
    """One lock per product and app: reference changes and calibrations of a product run one at a time."""
    return ctx.product_locks.setdefault(product, asyncio.Lock())


async def _profile(ctx: ServiceContext, name: str) -> ProductProfile:
    profile = await asyncio.to_thread(ctx.require_store().get_product, name)
    if profile is None:
        raise Problem(404, "Product not found", f"no profile for product {name!r}; create it with PUT", "not-found")
    return profile


async def _reference_list(ctx: ServiceContext, name: str, only: set[str] | None = None) -> dict:
    store = ctx.require_store()
    profile = await _profile(ctx, name)
    refs = await asyncio.to_thread(store.list_references, name)
    memory = await asyncio.to_thread(store.get_memory, profile.memory_version) if profile.memory_version else None
    return {
        "items": [reference_out(r) for r in refs if only is None or r.id in only],
        "memory": None if memory is None else memory_out(memory),
    }


async def store_references(ctx: ServiceContext, name: str, uploads: list[Upload]) -> list[ReferenceImage]:
    """Analyse ``uploads`` (engine and batcher, as /segment) and store them as good references of ``name``, then
    rebuild its memory: all or nothing. 404 without a profile; the analysis' 4xx/503/504 leave nothing written.
    The one path of the API route below, the console's gallery and its "false reject, add as reference"."""
    engine, store = ctx.require_engine(), ctx.require_store()
    await _profile(ctx, name)
    analysed = await analyse_all(
        admit(engine, len(uploads)),
        uploads,
        ctx.settings.pixel_threshold,
        ctx.settings.request_timeout_s,
        keep_features=True,
    )
    key = model_key(engine.info)
    items = [
        (
            ReferenceImage(
                product=name,
                filename=a.upload.filename,
                sha256=hashlib.sha256(a.upload.data).hexdigest(),
                width=a.decoded.width,
                height=a.decoded.height,
                nbytes=len(a.upload.data),
                model_key=key,
            ),
            a.upload.data,
            features_to_bytes(*a.result.features),
        )
        for a in analysed
    ]
    async with _lock(ctx, name):
        try:
            stored = await asyncio.to_thread(store.add_references, items)  # all or nothing itself
        except STORAGE_ERRORS as exc:
            raise storage_problem(exc, "the references") from exc
        try:
            await asyncio.to_thread(rebuild_memory, engine, store, name)
        except BaseException as exc:  # the memory in use must hold every stored reference: take them back
            await asyncio.shield(asyncio.to_thread(_delete_references, store, name, [r.id for r in stored]))
            if isinstance(exc, STORAGE_ERRORS):
                raise storage_problem(exc, "the references") from exc
            raise
    return stored


def _delete_references(store, name: str, ids: list[str]) -> None:
    for ref_id in ids:
        store.delete_reference(name, ref_id)


async def remove_reference(ctx: ServiceContext, name: str, ref_id: str) -> None:
    """Delete one reference of ``name``, its memory rebuilt without it first (a failure leaves both as they were,
    503; a failed delete after it leaves a memory without the reference, which a retry completes); 404 for an
    unknown product or reference."""
    engine, store = ctx.require_engine(), ctx.require_store()
    await _profile(ctx, name)
    async with _lock(ctx, name):
        if await asyncio.to_thread(store.get_reference, name, ref_id) is None:
            raise Problem(404, "Reference not found", f"product {name!r} has no reference {ref_id!r}", "not-found")
        try:
            await asyncio.to_thread(rebuild_memory, engine, store, name, ref_id)
            await asyncio.to_thread(store.delete_reference, name, ref_id)
        except STORAGE_ERRORS as exc:
            raise storage_problem(exc, "the removal") from exc


@router.post(
    "/products/{name}/references",
    status_code=201,
    response_model=ReferenceList,
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 503, 504),
)
async def add_references(request: Request, name: ProductName, _: Caller = Depends(require_admin_key)):
    ctx: ServiceContext = request.app.state.ctx
    await _profile(ctx, name)
    async with request.form(max_files=ctx.settings.queue_size + 1) as form:
        uploads = await read_uploads(form, ctx.settings)
    stored = await store_references(ctx, name, uploads)
    return await _reference_list(ctx, name, {r.id for r in stored})


@router.get("/products/{name}/references", response_model=ReferenceList, responses=problem_responses(401, 404))
async def list_references(request: Request, name: ProductName):
    return await _reference_list(request.app.state.ctx, name)


@router.delete(
    "/products/{name}/references/{ref_id}", status_code=204, responses=problem_responses(401, 403, 404, 409, 503)
)
async def delete_reference(
    request: Request, name: ProductName, ref_id: ReferenceId, _: Caller = Depends(require_admin_key)
):
    await remove_reference(request.app.state.ctx, name, ref_id)
    return Response(status_code=204)


# the multipart fields of POST /products/{name}/calibrate (files: good, defect)
CALIBRATE_FIELDS = ("good", "defect", "use_references", "target_frr", "review_frr", "pixel_quantile", "image_score")


def _form_float(form, field: str, default: float | None) -> float | None:
    raw = form.get(field)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return default
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise Problem(422, "Invalid request", f"{field} must be a number, got {raw!r}", "validation-error") from None


def _form_bool(form, field: str) -> bool:
    """A checkbox-like field: true/1/yes/on or false/0/no/off (any case), absent or empty false; else 422."""
    raw = form.get(field)
    word = raw.strip().lower() if isinstance(raw, str) else raw
    if word in (None, "", "false", "0", "no", "off"):
        return False
    if word in ("true", "1", "yes", "on"):
        return True
    raise Problem(422, "Invalid request", f"{field} must be true or false, got {raw!r}", "validation-error")


async def _scores_and_maps(ctx, engine, profile, form, use_references: bool, image_score: str):
    """(good scores, good maps, defect scores) of the calibration set, through the same path as /segment."""
    timeout = ctx.settings.request_timeout_s
    job = {"memory": None, "fusion_weight": profile.fusion_weight}
    good_uploads = await read_uploads(form, ctx.settings, "good", required=False)
    defect_uploads = await read_uploads(form, ctx.settings, "defect", required=False)
    if use_references and good_uploads:
        raise Problem(
            422,
            "Ambiguous calibration set",
            "send 'good' files or use_references=true, not both",
            "invalid-calibration",
        )
    if profile.memory_version:
        job["memory"] = await asyncio.to_thread(product_memory, engine, ctx.require_store(), profile)
    if use_references:
        loo = await asyncio.to_thread(leave_one_out, engine, ctx.require_store(), profile)
        good = [getattr(s, image_score) for s, _ in loo]
        maps = [m for _, m in loo]
    else:
        if not good_uploads:
            raise Problem(
                422,
                "Empty calibration set",
                "send good images in the multipart field 'good', or use_references=true",
                "empty-calibration-set",
            )
        analysed = await analyse_all(
            admit(engine, len(good_uploads)), good_uploads, profile.pixel_threshold, timeout, **job
        )
        good = [getattr(a.result.scores, image_score) for a in analysed]
        maps = [a.result.anomaly_map for a in analysed]
    defects = []
    if defect_uploads:
        analysed = await analyse_all(
            admit(engine, len(defect_uploads)), defect_uploads, profile.pixel_threshold, timeout, **job
        )
        defects = [getattr(a.result.scores, image_score) for a in analysed]
    return good, maps, defects


@router.post(
    "/products/{name}/calibrate",
    response_model=ProductOut,
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 503, 504),
)
async def calibrate_product(request: Request, name: ProductName, _: Caller = Depends(require_admin_key)):
    ctx: ServiceContext = request.app.state.ctx
    engine, store = ctx.require_engine(), ctx.require_store()
    async with _lock(ctx, name):
        profile = await _profile(ctx, name)
        async with request.form(max_files=ctx.settings.queue_size + 1) as form:
            refuse_unknown(form.keys(), CALIBRATE_FIELDS)
            target_frr = _form_float(form, "target_frr", DEFAULT_TARGET_FRR)
            review_frr = _form_float(form, "review_frr", None)
            pixel_quantile = _form_float(form, "pixel_quantile", DEFAULT_PIXEL_QUANTILE)
            image_score = str(form.get("image_score") or profile.image_score)
            if image_score not in IMAGE_SCORES:
                raise Problem(
                    422, "Invalid request", f"image_score must be one of {IMAGE_SCORES}, got {image_score!r}", "calib"
                )
            use_references = _form_bool(form, "use_references")
            good, maps, defects = await _scores_and_maps(ctx, engine, profile, form, use_references, image_score)
        try:
            cal = calibrate(
                np.array(good),
                maps,
                image_score,
                defect_scores=np.array(defects) if defects else None,
                target_frr=target_frr,
                review_frr=review_frr,
                pixel_quantile=pixel_quantile,
                source="references_leave_one_out" if use_references else "good_images",
            )
        except SampleTooSmall as exc:
            raise Problem(422, "Sample too small", str(exc), "sample-too-small") from None
        except ValueError as exc:
            raise Problem(422, "Invalid calibration", str(exc), "invalid-calibration") from None
        record = CalibrationRecord(
            version=cal.version, product=name, memory_version=profile.memory_version, content=cal.to_dict()
        )
        updated = ProductProfile(
            **{
                **profile.__dict__,
                "image_threshold": cal.reject_threshold,
                "review_threshold": cal.review_threshold,
                "pixel_threshold": cal.pixel_threshold,
                "pixel_good_level": cal.pixel_good_level,
                "image_score": image_score,
            }
        )
        stored = await asyncio.to_thread(store.put_calibration, record, updated)
    memory = await asyncio.to_thread(store.get_memory, stored.memory_version) if stored.memory_version else None
    return product_out(stored, memory, await asyncio.to_thread(store.get_calibration, cal.version))
