"""Pictures of stored inspections: rendered on first request, then cached beside them in the artefact store.

An inspection stores its upload (``original``) and its float16 map (``map``); see ``service.engine.stored``. The
first GET of a PNG kind renders it from those and puts it under ``<record prefix><kind>.png``; later GETs read that.
The console thumbnail (``thumb.jpg``) is made the same way, from the original and the map in memory (no overlay PNG
is encoded for it). Inspections of the first layout (three PNGs stored) and those stored without originals
(``DHR_STORE_ORIGINALS=false``: the overlay PNG is stored) serve what they stored. Cached renderings are not listed
in ``record.artefacts``; retention deletes the record's whole prefix, so they go with it.

The heatmap colours of a calibrated product are anchored at the calibration's good pixel level
(``service.engine.postprocess.anchored``): the record names its calibration, whose level is read again here.

Blocking functions: call them in a worker thread.
"""

from __future__ import annotations

from service.engine.stored import render_stored, stored_thumbnail
from service.storage import InspectionRecord, InspectionStore

THUMB_NAME = "thumb.jpg"


def colour_anchor(good_level: float | None, pixel_threshold: float) -> tuple[float, float] | None:
    """The heatmap colour anchor of a calibrated product, ``(good pixel level, pixel threshold)``; None without."""
    return None if good_level is None else (good_level, pixel_threshold)


def record_anchor(store: InspectionStore, record: InspectionRecord) -> tuple[float, float] | None:
    """The colour anchor the inspection was answered with: its calibration's good level and its pixel threshold
    (a profile carries a good level exactly while it carries the calibration that set it)."""
    if record.calibration_version is None:
        return None
    calibration = store.get_calibration(record.calibration_version)
    if calibration is None:
        raise LookupError(f"inspection {record.id}: calibration {record.calibration_version} is not stored")
    return colour_anchor(calibration.content["pixel_good_level"], record.pixel_threshold)


def stored_png(store: InspectionStore, record_id: str, kind: str) -> bytes | None:
    """The PNG of one kind of a stored inspection (rendered and cached on first request); None for an unknown id
    or a kind it cannot show. Raises ArtefactMissingError / ArtefactStoreError from the artefact store."""
    record = store.get(record_id)
    if record is None or kind not in record.viewable:
        return None
    if kind in record.artefacts:
        return store.read_artefact(record, kind)
    name = f"{kind}.png"
    cached = store.read_derived(record, name)
    if cached is not None:
        return cached
    original = store.read_artefact(record, "original") if kind == "overlay" else None
    png = render_stored(
        store.read_artefact(record, "map"),
        original,
        record.width,
        record.height,
        record.pixel_threshold,
        [kind],
        record_anchor(store, record),
        record.filename or record.id,
    )[kind]
    store.put_derived(record, name, png)
    return png


def thumbnail(store: InspectionStore, record_id: str) -> bytes | None:
    """The console thumbnail of an inspection (JPEG, rendered once and cached); None without an overlay."""
    record = store.get(record_id)
    if record is None or "overlay" not in record.viewable:
        return None
    cached = store.read_derived(record, THUMB_NAME)
    if cached is not None:
        return cached
    if "overlay" in record.artefacts:
        data = stored_thumbnail(None, store.read_artefact(record, "overlay"), record.width, record.height, 0.0)
    else:
        data = stored_thumbnail(
            store.read_artefact(record, "map"),
            store.read_artefact(record, "original"),
            record.width,
            record.height,
            record.pixel_threshold,
            record_anchor(store, record),
            record.filename or record.id,
        )
    store.put_derived(record, THUMB_NAME, data)
    return data
