"""Request and response bodies (pydantic); stored records convert with ``model_validate`` (``from_attributes``).

A /segment result and a GET /inspections/{id} answer have the same fields; the /segment result adds ``images``
(base64 PNGs of the kinds asked for with ``include``). ``timing_ms.store`` and ``timing_ms.total`` are known
only once the record is written, so they appear in the /segment answer and are null when the record is read back.
``links`` are made from the record id and the app's root path, passed as validation context::

    InspectionOut.model_validate(record, context={"root_path": request.scope.get("root_path", "")})
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from service.engine import ImageScore
from service.inspection import ARTEFACT_KINDS, ReviewDecision, Verdict
from service.storage import ProductProfile
from service.storage.models import MemoryInfo, ReferenceImage
from service.storage.reviews import MAX_NOTE_CHARS, MAX_REVIEWER_CHARS


class RegionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    bbox: list[int] = Field(description="[x, y, w, h] in original image pixels")
    area: int = Field(description="pixels in the region")
    area_ratio: float = Field(description="area / (width * height)")
    max_score: float
    mean_score: float
    polygon: list[list[int]] = Field(description="simplified outer contour, [[x, y], ...]")


class ModelOut(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    backbone: str | None = None
    backbone_sha256: str | None = None
    prompts: str | None = Field(None, description="prompt checkpoint id, or 'ensemble'")
    prompts_sha256: str | None = None
    prompts_kind: str | None = Field(None, description="'learned' or 'ensemble'")
    preset: str | None = None
    precision: str | None = None
    device: str | None = None
    layer_features: str | None = None


class TimingOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    decode: float | None = Field(None, description="ms: image decode + DHR views")
    queue: float | None = Field(None, description="ms: wait for a batch")
    inference: float | None = Field(None, description="ms: the model call of the image's batch")
    batch_size: int | None = Field(None, description="images in that model call")
    postprocess: float | None = Field(None, description="ms: heatmap, mask, overlay, regions")
    store: float | None = Field(None, description="ms: writing PNGs and record (answer of /segment only)")
    total: float | None = Field(None, description="ms: request handler start to record stored (/segment only)")


class Links(BaseModel):
    self: str
    overlay: str
    heatmap: str
    mask: str


class ReviewIn(BaseModel):
    """Body of POST /inspections/{id}/review."""

    model_config = ConfigDict(extra="forbid")

    decision: ReviewDecision = Field(description="confirm_defect | false_reject (rejected parts) | escape (ok parts)")
    note: str = Field("", max_length=MAX_NOTE_CHARS)
    reviewer: str = Field("", max_length=MAX_REVIEWER_CHARS, description="who reviewed (name or initials)")
    add_reference: bool = Field(
        False,
        description="false_reject only, admin key: also add the inspection's stored original image as a good "
        "reference of its product (409 when the original was not stored)",
    )

    @model_validator(mode="after")
    def _reference_of_a_good_part(self) -> ReviewIn:
        if self.add_reference and self.decision != "false_reject":
            raise ValueError(f"add_reference applies to the decision false_reject only, not {self.decision}")
        return self


class ReviewOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    inspection_id: str
    created_at: datetime
    decision: ReviewDecision
    note: str
    reviewer: str
    role: str = Field(description="role of the key used: open | operator | admin")
    key_id: str | None = Field(description="fingerprint of the key used (SHA-256, 12 hex digits)")
    reference_id: str | None = Field(description="good reference made from the image (false_reject only)")


class InspectionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, protected_namespaces=())

    id: str
    created_at: datetime
    filename: str | None
    product: str | None
    line: str | None
    part_id: str | None
    width: int
    height: int
    score: float = Field(description="image score of the variant named by image_score")
    threshold: float = Field(description="reject threshold; score >= threshold -> verdict 'defect'")
    verdict: Verdict
    image_score: str
    pixel_threshold: float
    defect_area_ratio: float
    regions: list[RegionOut]
    model: ModelOut
    timing_ms: TimingOut
    links: Links = Field(None, validate_default=True, description="URLs of this record and its PNGs")
    reviews: list[ReviewOut] = Field(default_factory=list, description="oldest first; the last one is current")
    memory_version: str | None = Field(None, description="normal memory the image was judged with (null: zero-shot)")
    calibration_version: str | None = Field(None, description="calibration of the thresholds (null: set by hand)")

    @field_validator("links", mode="before")
    @classmethod
    def _links(cls, value, info: ValidationInfo):
        """Made from ``id`` and the ``root_path`` of the validation context unless given."""
        if value is not None:
            return value
        return links_for(info.data["id"], (info.context or {}).get("root_path", ""))


class SegmentResult(InspectionOut):
    images: dict[str, str] = Field(default_factory=dict, description="base64 PNGs of the kinds in `include`")


class SegmentResponse(BaseModel):
    results: list[SegmentResult]


class InspectionPage(BaseModel):
    items: list[InspectionOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last page")


class ProductIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_threshold: float = Field(ge=0.0, le=1.0, description="reject threshold: score >= it -> 'defect'")
    pixel_threshold: float = Field(ge=0.0, le=1.0)
    image_score: ImageScore = "reference"
    review_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="review zone [review_threshold, image_threshold); null: no review zone"
    )
    fusion_weight: float = Field(0.5, ge=0.0, le=1.0, description="w in w * zero-shot + (1 - w) * few-shot")

    @model_validator(mode="after")
    def _ordered(self) -> ProductIn:
        if self.review_threshold is not None and self.review_threshold > self.image_threshold:
            raise ValueError(
                f"thresholds out of order: review_threshold {self.review_threshold} > image_threshold "
                f"{self.image_threshold}"
            )
        return self


class MemoryOut(BaseModel):
    version: str
    n_references: int
    tokens: int = Field(description="tokens per layer over the whole view and the crops (after the coreset cap)")
    nbytes: int = Field(description="bytes of the memory tensors")
    created_at: datetime


class CalibrationOut(BaseModel):
    """``service.engine.calibration.Calibration`` as stored, with the memory it was made with."""

    model_config = ConfigDict(extra="allow")

    version: str
    memory_version: str | None
    current: bool = Field(description="false when the references changed since (the memory version differs)")
    image_score: str
    target_frr: float
    review_frr: float | None
    review_threshold: float
    reject_threshold: float
    pixel_threshold: float
    pixel_quantile: float
    pixel_good_level: float
    n_good: int
    n_defect: int
    good_frr: float
    escape_rate: float | None
    histogram_edges: list[float]
    good_histogram: list[int]
    defect_histogram: list[int]
    source: Literal["good_images", "references_leave_one_out"]
    created_at: datetime


class ProductOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    image_threshold: float
    pixel_threshold: float
    image_score: str
    updated_at: datetime
    review_threshold: float | None = None
    fusion_weight: float = 0.5
    memory_version: str | None = None
    calibration_version: str | None = None
    pixel_good_level: float | None = Field(None, description="calibrated good pixel level: anchors heatmap colours")
    memory: MemoryOut | None = Field(None, description="GET /products/{name} only")
    calibration: CalibrationOut | None = Field(None, description="GET /products/{name} only")


class ProductList(BaseModel):
    items: list[ProductOut]


class ReferenceOut(BaseModel):
    id: str
    product: str
    filename: str
    sha256: str
    width: int
    height: int
    nbytes: int
    created_at: datetime


class ReferenceList(BaseModel):
    items: list[ReferenceOut]
    memory: MemoryOut | None


class HealthOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    status: Literal["ok"]
    model: ModelOut
    device: str
    precision: str
    preset: str
    queue_depth: int
    queue_size: int
    max_batch_size: int
    uptime_s: float
    last_inference_at: str | None
    warmup_s: float | None
    counts: dict[str, int]
    replica: str = Field(description="which replica answered (DHR_REPLICA_NAME, the Ray replica id, host-pid)")
    pid: int = Field(description="process id of that replica")


class NotReadyOut(BaseModel):
    status: Literal["loading", "error"]
    reason: str


def links_for(record_id: str, root_path: str = "") -> dict[str, str]:
    base = f"{root_path.rstrip('/')}/inspections/{record_id}"
    return {"self": base, **{kind: f"{base}/{kind}.png" for kind in ARTEFACT_KINDS}}


def product_out(profile: ProductProfile, memory: MemoryInfo | None = None, calibration=None) -> dict:
    """A profile as JSON; ``memory`` / ``calibration`` (a CalibrationRecord) are given by GET /products/{name}."""
    out = {name: getattr(profile, name) for name in ProductOut.model_fields if name not in ("memory", "calibration")}
    out["memory"] = None if memory is None else memory_out(memory)
    if calibration is not None:
        out["calibration"] = {
            **calibration.content,
            "version": calibration.version,
            "memory_version": calibration.memory_version,
            "current": calibration.memory_version == profile.memory_version,
            "created_at": calibration.created_at,
        }
    return out


def memory_out(memory: MemoryInfo) -> dict:
    return {name: getattr(memory, name) for name in MemoryOut.model_fields}


def reference_out(ref: ReferenceImage) -> dict:
    return {name: getattr(ref, name) for name in ReferenceOut.model_fields}
