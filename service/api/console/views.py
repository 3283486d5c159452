"""What each console page shows, read from the store (synchronous: the pages call these in a worker thread).

Every function returns a plain dict of template variables. Queries per page (each bounded, none scans all rows
for sorting): line view = latest ``TILES`` records + verdict counts of the last hour + latest ``STRIP`` rejects;
queue = oldest ``QUEUE_PAGE`` unreviewed rejects + the queue length; inspection = the record + its reviews +
the product profile; product = profile, calibration, one page of ``GALLERY_PAGE`` references (newest first,
LIMIT/OFFSET) + their count.
"""

from __future__ import annotations

from datetime import timedelta
from typing import get_args

from service.engine import ImageScore
from service.inspection import DECISION_VERDICTS, REJECTED, VERDICTS
from service.storage import InspectionStore
from service.storage.models import utcnow

from ..schemas import product_out
from .charts import calibration_plot, stored_calibration_plot
from .previews import GALLERY_SIZE, GALLERY_THUMB, ORIGINAL_PREVIEW, ORIGINAL_SIZE, jpeg_preview

TILES = 24
STRIP = 10
QUEUE_PAGE = 50
GALLERY_PAGE = 24  # reference thumbnails per page of the product page's gallery


def by_verdicts(store: InspectionStore, verdicts: tuple[str, ...], limit: int, oldest_first: bool = False, **filters):
    """The first ``limit`` records of several verdicts: one index range per verdict, merged (an ``IN`` over the
    verdict column would make SQLite sort every matching row)."""
    found = []
    for v in verdicts:
        found += store.list(verdict=v, limit=limit, oldest_first=oldest_first, **filters)[0]
    found.sort(key=lambda r: (r.created_at, r.id), reverse=not oldest_first)
    return found[:limit]


def line_snapshot(store: InspectionStore, product: str | None, line: str | None) -> dict:
    """Latest parts (tiles), counts per verdict of the last hour, latest rejects (thumbnail strip)."""
    since = utcnow() - timedelta(hours=1)
    latest, _ = store.list(product=product, line=line, limit=TILES)
    rejects = by_verdicts(store, REJECTED, STRIP, product=product, line=line)
    counts = store.verdict_counts(since=since, product=product, line=line)
    return {
        "latest": latest,
        "rejects": rejects,
        "counts": {v: counts.get(v, 0) for v in VERDICTS},
        "hour_total": sum(counts.values()),
        "verdicts": VERDICTS,
    }


def inspection_detail(ctx, inspection_id: str) -> dict | None:
    """The record, its reviews, the decisions that fit its verdict, the product's current profile and the image
    layers: the stored original underneath (else the overlay), heatmap, mask and overlay to toggle over it."""
    store = ctx.require_store()
    record = store.get(inspection_id)
    if record is None:
        return None
    profile = store.get_product(record.product) if record.product else None
    decisions = [d for d, verdicts in DECISION_VERDICTS.items() if record.verdict in verdicts]
    layers = [k for k in ("heatmap", "mask", "overlay") if k in record.viewable]
    return {
        "record": record,
        "reviews": store.reviews_of([inspection_id]).get(inspection_id, []),
        "profile": profile,
        "decisions": decisions,
        "layers": layers,
        "original_stored": "original" in record.artefacts,
        "base_layer": "original" if "original" in record.artefacts else ("overlay" if "overlay" in layers else None),
    }


def review_queue(store: InspectionStore) -> dict:
    """The oldest unreviewed review/defect inspections and how many there are in all."""
    items = by_verdicts(store, REJECTED, QUEUE_PAGE, oldest_first=True, reviewed=False)
    return {"items": items, "total": store.unreviewed_count(REJECTED)}


def gallery_page(store: InspectionStore, name: str, page: int) -> dict:
    """Page ``page`` (1-based; past the last page: the last) of the product's references, newest first:
    ``references`` (at most GALLERY_PAGE), ``page``, ``pages`` (at least 1), ``total``, ``first``/``last`` (1-based
    positions of the page's references in the whole list; 0 when there are none)."""
    total = store.count_references(name)
    pages = max(1, -(-total // GALLERY_PAGE))
    page = min(page, pages)
    refs = store.list_references(name, newest_first=True, limit=GALLERY_PAGE, offset=(page - 1) * GALLERY_PAGE)
    first = (page - 1) * GALLERY_PAGE + 1 if refs else 0
    return {
        "references": refs,
        "page": page,
        "pages": pages,
        "total": total,
        "first": first,
        "last": first + len(refs) - 1 if refs else 0,
    }


def product_detail(ctx, name: str, page: int = 1) -> dict:
    """Profile (or the service defaults in force), one page of references (``gallery_page``), the calibration plot:
    the histograms of the product's calibration in force (or of its newest one when the thresholds were set by hand
    since) with the current thresholds, else the reviewed inspections' scores."""
    store, s = ctx.require_store(), ctx.settings
    profile = store.get_product(name)
    thresholds = {
        "image_threshold": profile.image_threshold if profile else s.image_threshold,
        "pixel_threshold": profile.pixel_threshold if profile else s.pixel_threshold,
        "image_score": profile.image_score if profile else s.image_score,
    }
    lines = {"reject": thresholds["image_threshold"]}
    if profile and profile.review_threshold is not None and profile.review_threshold != profile.image_threshold:
        lines["review"] = profile.review_threshold
    record = None
    if profile:  # the calibration in force, else the newest one (thresholds set by hand since)
        in_force = profile.calibration_version and store.get_calibration(profile.calibration_version)
        record = in_force or store.latest_calibration(name)
    calibration = product_out(profile, None, record)["calibration"] if record else None
    if calibration is not None:
        calibration["in_force"] = record.version == profile.calibration_version
        if calibration["reject_threshold"] != lines["reject"]:
            lines["calibrated reject"] = calibration["reject_threshold"]
        plot, scores = stored_calibration_plot(calibration, lines), None
    else:
        scores = store.scores_by_truth(name)
        plot = calibration_plot({k: v for k, v in scores.items() if k != "unreviewed"}, lines)
    return {
        "name": name,
        "profile": profile,
        "thresholds": thresholds,
        "calibration": calibration,
        "plot": plot,
        "scores": scores,
        "gallery": gallery_page(store, name, page) if profile else None,
        "image_scores": get_args(ImageScore),
    }


def reference_preview(ctx, name: str, ref_id: str) -> bytes | None:
    """The gallery thumbnail of one reference of ``name`` (None: no such reference): a JPEG of at most
    GALLERY_SIZE pixels rendered from its stored bytes on first request and cached beside them (``thumb.jpg``,
    removed with the reference)."""
    store = ctx.require_store()
    ref = store.get_reference(name, ref_id)
    if ref is None:
        return None
    cached = store.read_reference_derived(ref_id, GALLERY_THUMB)
    if cached is None:
        cached = jpeg_preview(store.read_reference_image(ref_id), ref.filename, ctx.settings, GALLERY_SIZE)
        store.put_reference_derived(ref, GALLERY_THUMB, cached)
    return cached


def original_preview(ctx, inspection_id: str) -> bytes | None:
    """The inspection's stored original as a JPEG of at most ORIGINAL_SIZE pixels (the inspection page's base
    layer), rendered on first request and cached beside the record (``original.jpg``, deleted with it); None
    when the inspection is unknown or was stored without its original."""
    store = ctx.require_store()
    record = store.get(inspection_id)
    if record is None or "original" not in record.artefacts:
        return None
    cached = store.read_derived(record, ORIGINAL_PREVIEW)
    if cached is None:
        name = record.filename or record.id
        cached = jpeg_preview(store.read_artefact(record, "original"), name, ctx.settings, ORIGINAL_SIZE)
        store.put_derived(record, ORIGINAL_PREVIEW, cached)
    return cached
