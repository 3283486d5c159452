"""POST /segment: multipart upload of one or more images -> stored inspections as JSON, or one PNG.

Form fields: ``image`` (one or more files, required), ``product``, ``line``, ``part_id`` (optional names in the
one name grammar of ``service.storage.models.NAME_PATTERN``; an empty field counts as absent), ``image_score``
(reference | map_max | map_topk), ``include`` (comma list of overlay, heatmap, mask: base64 PNGs in the JSON).
With one image and ``?output=overlay|heatmap|mask`` or an ``Accept`` header that prefers ``image/png``, the PNG
itself is answered with ``X-Inspection-Id``, ``X-Score``, ``X-Verdict``, ``X-Threshold`` and ``X-Image-Score``
headers. Errors: see ``problems`` and ``pipeline``.

Overload is refused before the body is parsed when the engine is already full (503 + Retry-After): the request
takes its place for one image at the door, and resizes it to its image count before anything is decoded.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator
from starlette.datastructures import UploadFile

from service.engine import ImageScore
from service.inspection import ARTEFACT_KINDS, ArtefactKind, Thresholds
from service.storage import InspectionStore
from service.storage.models import NAME_MAX, NAME_PATTERN

from .access_log import too_large
from .deps import Context, ServingEngine
from .idempotency import HEADER, KEY_PATTERN, REPLAYED_HEADER, claim_stale_s, claimed, fingerprint
from .knowledge import product_memory, profile_thresholds
from .pipeline import Decision, Upload, admit, analyse_all, build_record, rendered_kinds, resize, store_all
from .problems import Problem, problem_responses
from .rendering import colour_anchor, stored_png
from .schemas import SegmentResponse, SegmentResult, links_for
from .security import require_api_key
from .settings import Settings

router = APIRouter(tags=["inspection"], dependencies=[Depends(require_api_key)])

IMAGE_FIELD = {
    "type": "array",
    "minItems": 1,
    "items": {"type": "string", "format": "binary"},
    "description": "one or more image files (JPEG, PNG, BMP, TIFF, WebP, ...)",
}


class SegmentForm(BaseModel):
    """The text fields of the /segment form (the files come in ``image``); empty strings count as absent.

    The OpenAPI request body is generated from this model (:func:`segment_body`).
    """

    model_config = ConfigDict(extra="ignore")

    product: str | None = Field(
        None,
        max_length=NAME_MAX,
        pattern=NAME_PATTERN,
        description="product name; its profile (PUT /products/{name}) sets thresholds",
    )
    line: str | None = Field(None, max_length=NAME_MAX, pattern=NAME_PATTERN, description="production line")
    part_id: str | None = Field(None, max_length=NAME_MAX, pattern=NAME_PATTERN, description="part identifier")
    image_score: ImageScore | None = Field(
        None, description="image-score variant (default: the product's, else the setting)"
    )
    include: Annotated[
        list[ArtefactKind],
        WithJsonSchema({"type": "string", "description": f"comma list of {', '.join(ARTEFACT_KINDS)} (base64 PNGs)"}),
    ] = Field(default_factory=list)

    @field_validator("include", mode="before")
    @classmethod
    def _split_include(cls, value):
        kinds = [k.strip().lower() for k in (value or "").split(",") if k.strip()] if isinstance(value, str) else value
        unknown = [k for k in kinds if k not in ARTEFACT_KINDS]
        if unknown:
            raise ValueError(f"unknown kinds {unknown}; choose from {', '.join(ARTEFACT_KINDS)}")
        return list(dict.fromkeys(kinds))


def _form_field(prop: dict) -> dict:
    """A multipart text field's schema: the non-null branch of an optional field, with its description."""
    branch = next(b for b in prop.get("anyOf", [prop]) if b.get("type") != "null")
    return {**branch, **({"description": prop["description"]} if "description" in prop else {})}


def segment_body() -> dict:
    """The OpenAPI request body of /segment: ``image`` files plus the fields of :class:`SegmentForm`."""
    fields = {name: _form_field(prop) for name, prop in SegmentForm.model_json_schema()["properties"].items()}
    schema = {"type": "object", "required": ["image"], "properties": {"image": IMAGE_FIELD, **fields}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def refuse_unknown(names, taken: tuple[str, ...], where: str = "body", msg: str | None = None) -> None:
    """422 naming each of ``names`` (form fields, or query parameters with ``where="query"``) not in ``taken``: a
    misspelt or misplaced field is never ignored."""
    unknown = [name for name in dict.fromkeys(names) if name not in taken]
    if unknown:
        msg = msg or f"unknown field; the form takes {', '.join(taken)}"
        raise RequestValidationError([{"loc": (where, n), "msg": msg, "type": "extra_forbidden"} for n in unknown])


def parse_fields(form) -> SegmentForm:
    """The form's text fields as :class:`SegmentForm`; 422 for a field it does not take (a misspelt ``product``
    would otherwise inspect with the defaults)."""
    refuse_unknown(form.keys(), ("image", *SegmentForm.model_fields))
    raw = {}
    for name in SegmentForm.model_fields:
        value = form.get(name)
        if isinstance(value, UploadFile):
            raise RequestValidationError(
                [{"loc": ("body", name), "msg": "must be a text field, not a file", "type": "string_type"}]
            )
        if value:  # names are taken as sent: " a" is refused, not silently trimmed
            raw[name] = value
    try:
        return SegmentForm(**raw)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


async def read_uploads(form, settings: Settings, field: str = "image", required: bool = True) -> list[Upload]:
    """The files of ``field`` as bytes: 400 none (when required)/not a file, 413 too many or over the byte limit."""
    items = form.getlist(field)
    if not items and required:
        raise Problem(400, "No image", f"send one or more files in the multipart/form-data field {field!r}", "no-image")
    not_files = [i for i, item in enumerate(items) if not isinstance(item, UploadFile)]
    if not_files:
        raise Problem(
            400, "Image is not a file", f"{field!r} entry {not_files[0]} is a text field; send files", "no-image"
        )
    uploads, total = [], 0
    for i, item in enumerate(items):
        data = await item.read()
        total += len(data)
        if total > settings.max_upload_bytes:
            raise too_large(settings.max_upload_bytes, "the uploaded images")
        uploads.append(Upload(i, safe_filename(item.filename, i), data))
    return uploads


def safe_filename(given: str | None, index: int) -> str:
    """The client's file name for the record: control characters become ``?``, at most the last 255 characters."""
    name = "".join("?" if ord(c) < 32 or ord(c) == 127 else c for c in (given or "")).strip()
    return (name or f"image-{index}")[-255:]


def client_gone(request: Request):
    """A coroutine function that returns once the client has disconnected (the body is read by then)."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


def png_wanted(accept: str | None) -> bool:
    """True when ``Accept`` ranks image/png above JSON (``*/*`` and ``application/*`` count as JSON)."""
    if not accept:
        return False
    q: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = [p.strip() for p in part.split(";")]
        weight = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    weight = float(p[2:])
                except ValueError:
                    weight = 0.0
        q[media.lower()] = max(weight, q.get(media.lower(), 0.0))
    as_json = max(q.get("application/json", 0.0), q.get("application/*", 0.0), q.get("*/*", 0.0))
    return q.get("image/png", 0.0) > as_json


async def decide(ctx, fields: SegmentForm) -> Decision:
    """Thresholds, score variant and normal memory: the product's profile when it has one, else the settings; the
    form's variant wins. The profile is read through the store's shared-state copy (at most DHR_STATE_REFRESH_S old)."""
    settings, store = ctx.settings, ctx.require_store()
    profile = await asyncio.to_thread(store.current_product, fields.product) if fields.product else None
    image_score = fields.image_score or (profile or settings).image_score
    if profile is None:
        thresholds = Thresholds(image=settings.image_threshold, pixel=settings.pixel_threshold)
        return Decision(fields.product, fields.line, fields.part_id, image_score, thresholds)
    memory = await asyncio.to_thread(product_memory, ctx.require_engine(), store, profile)
    anchor = colour_anchor(profile.pixel_good_level, profile.pixel_threshold)
    return Decision(
        fields.product,
        fields.line,
        fields.part_id,
        image_score,
        profile_thresholds(profile),
        memory=memory,
        fusion_weight=profile.fusion_weight,
        memory_version=profile.memory_version,
        calibration_version=profile.calibration_version,
        colour_anchor=anchor,
    )


@router.post(
    "/segment",
    response_model=SegmentResponse,
    openapi_extra=segment_body(),
    summary="Inspect images: anomaly score, verdict, regions, heatmap/mask/overlay",
    responses={
        200: {"content": {"image/png": {}}, "description": "JSON results, or one PNG"},
        **problem_responses(400, 401, 406, 409, 413, 415, 422, 500, 503, 504),
    },
)
async def segment(
    request: Request,
    ctx: Context,
    engine: ServingEngine,
    response: Response,
    output: ArtefactKind | None = Query(
        None, description="answer the PNG of this kind instead of JSON (one image only)"
    ),
    key: str | None = Header(
        None,
        alias=HEADER,
        pattern=KEY_PATTERN,
        description="same key and same request: the stored answer again; same key, other request: 409",
    ),
):
    t_start = time.perf_counter()
    refuse_form_fields_in_query(request)
    job = admit(engine, 1)  # a place before the body is read: a busy service refuses at the door
    try:
        return await segment_admitted(request, ctx, engine, response, job, output, key, t_start)
    finally:
        job.close()


def refuse_form_fields_in_query(request: Request) -> None:
    """422 for a query parameter other than ``output``: ``?include=mask`` or ``?product=x`` would otherwise be
    ignored without a word (they are form fields)."""
    msg = "not a query parameter of /segment: send it as a multipart form field (the query takes only output)"
    refuse_unknown(request.query_params.keys(), ("output",), "query", msg)


async def segment_admitted(request, ctx, engine, response, job, output, key, t_start):
    """/segment once the request holds its place in the engine (``job``, closed by the caller)."""
    settings = ctx.settings
    async with request.form(max_files=settings.queue_size + 1) as form:
        # the files first: a file under another name is "no image", not "unknown field"
        uploads = await read_uploads(form, settings)
        fields = parse_fields(form)
    request.state.n_images = len(uploads)
    png_kind = output or ("overlay" if png_wanted(request.headers.get("accept")) else None)
    if png_kind and len(uploads) != 1:
        if output:
            raise Problem(
                422,
                "One image needed",
                f"output={output} answers one PNG; this request has {len(uploads)} images",
                "png-needs-one-image",
            )
        raise Problem(
            406,
            "Not Acceptable",
            f"Accept: image/png answers one PNG; this request has {len(uploads)} "
            "images (ask for JSON and use include=)",
            "png-needs-one-image",
        )

    store = ctx.require_store()
    fp = None if key is None else fingerprint(fields.model_dump(mode="json"), uploads, png_kind)
    async with claimed(store, key, fp, claim_stale_s(settings), ctx.instance_id) as (claim, previous):
        if previous is not None:
            pngs = await asyncio.to_thread(stored_pngs, store, previous, asked_kinds(png_kind, fields))
            replayed = answer(request, previous, pngs, png_kind, fields.include, [None] * len(previous))
            (replayed if isinstance(replayed, Response) else response).headers[REPLAYED_HEADER] = "true"
            return replayed
        return await analyse_and_store(request, ctx, engine, job, fields, uploads, png_kind, t_start, claim)


def asked_kinds(png_kind: str | None, fields: SegmentForm) -> tuple[str, ...]:
    """The PNG kinds the answer carries: the one PNG answered, else those of ``include``."""
    return (png_kind,) if png_kind else tuple(fields.include)


def stored_pngs(store: InspectionStore, records: list, kinds: tuple[str, ...]) -> list[dict[str, bytes]]:
    """Blocking: the PNGs of ``kinds`` of each stored record, ``{kind: bytes}`` (rendered and cached if need be)."""
    return [{k: stored_png(store, r.id, k) for k in kinds} for r in records]


async def analyse_and_store(request, ctx, engine, job, fields, uploads, png_kind, t_start, claim):
    """Admission, analysis and storage of a new request (with its claimed Idempotency-Key, if any); the answer."""
    store, settings = ctx.require_store(), ctx.settings
    decision = await decide(ctx, fields)
    resize(job, len(uploads))
    keep = settings.store_originals
    analysed = await analyse_all(
        job,
        uploads,
        decision.thresholds.pixel,
        settings.request_timeout_s,
        client_gone(request),
        anchor=decision.colour_anchor,
        kinds=rendered_kinds(asked_kinds(png_kind, fields), keep),
        memory=decision.memory,
        fusion_weight=decision.fusion_weight,
    )
    model = engine.info.to_dict()
    records = [build_record(item, decision, model) for item in analysed]
    entry = None if claim is None else replace(claim, inspection_ids=[r.id for r in records])
    stored = await asyncio.to_thread(store_all, store, records, analysed, entry, keep)
    for record, _, _ in stored:
        ctx.counts.add(record.verdict)
        ctx.metrics.observe_image(record.verdict)
    timings = [{"store": ms, "total": round((done - t_start) * 1000.0, 3)} for _, ms, done in stored]
    pngs = [item.png for item in analysed]
    return answer(request, [r for r, _, _ in stored], pngs, png_kind, fields.include, timings)


def answer(request, records, pngs, png_kind, include, timings) -> Response | SegmentResponse:
    """One PNG with the X-* headers, or the JSON results (``timings``: store/total ms per record, or None)."""
    root = request.scope.get("root_path", "")
    if png_kind:
        record = records[0]
        headers = {
            "X-Inspection-Id": record.id,
            "X-Score": repr(record.score),
            "X-Verdict": record.verdict,
            "X-Threshold": repr(record.threshold),
            "X-Image-Score": record.image_score,
            "Location": links_for(record.id, root)["self"],
        }
        return Response(pngs[0][png_kind], media_type="image/png", headers=headers)
    results = []
    for record, png, timing in zip(records, pngs, timings, strict=True):
        out = SegmentResult.model_validate(record, context={"root_path": root})
        if timing is not None:
            out.timing_ms.store, out.timing_ms.total = timing["store"], timing["total"]
        out.images = {k: base64.b64encode(png[k]).decode("ascii") for k in include}
        results.append(out)
    return SegmentResponse(results=results)
