"""Product knowledge in the store: reference images, normal memories and calibrations (mixed into InspectionStore).

Layout under ``data_dir``::

    references/<id>/image.bin             the uploaded bytes, exactly as received
    references/<id>/features.safetensors  the model features of that image (bytes made by the engine)
    memories/<version>.safetensors        a product's built normal memory (bytes made by the engine)

Write order as for inspections: files first (atomic, fsynced), then the rows in one transaction; a failure removes
the files written. ``add_references`` is all-or-nothing for the whole list. The product row holds the versions in
use (``memory_version``, ``calibration_version``), so a replica can compare them with what it has cached.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from sqlalchemy import delete, select

from service.storage.files import fsync_dir, write_atomic
from service.storage.models import (
    ID_RE,
    CalibrationRecord,
    CalibrationRow,
    MemoryInfo,
    MemoryRow,
    ProductProfile,
    ProductRow,
    ReferenceImage,
    ReferenceRow,
    as_utc,
    from_row,
    row_to_profile,
    to_row,
    utcnow,
)

IMAGE_FILE = "image.bin"
FEATURES_FILE = "features.safetensors"


class ProductKnowledge:
    """Methods of :class:`~service.storage.InspectionStore` for references, memories and calibrations."""

    data_dir: Path

    # -------------------------------------------------------------------------------------------- references

    def reference_dir(self, ref_id: str) -> Path:
        if not ID_RE.match(ref_id or ""):
            raise ValueError(f"reference id must be 28 lowercase hex digits, got {ref_id!r}")
        return self.data_dir / "references" / ref_id

    def add_references(self, items: list[tuple[ReferenceImage, bytes, bytes]]) -> list[ReferenceImage]:
        """Store ``(reference, image bytes, feature bytes)`` for every item, or nothing (all-or-nothing).

        Raises ValueError for an unknown product or a reference id already present.
        """
        written: list[Path] = []
        stored = [replace(ref, created_at=as_utc(ref.created_at)) for ref, _, _ in items]
        try:
            for ref, (_, image, features) in zip(stored, items, strict=True):
                directory = self.reference_dir(ref.id)
                if directory.exists():
                    raise ValueError(f"reference {ref.id} already exists: {directory} is present")
                directory.mkdir(parents=True)
                written.append(directory)
                write_atomic(directory / IMAGE_FILE, bytes(image))
                write_atomic(directory / FEATURES_FILE, bytes(features))
                fsync_dir(directory)
            if written:
                fsync_dir(written[0].parent)
            with self._sessions() as session, session.begin():
                for product in {ref.product for ref in stored}:
                    if session.get(ProductRow, product) is None:
                        raise ValueError(f"no profile for product {product!r}")
                session.add_all([to_row(ReferenceRow, ref) for ref in stored])
        except BaseException:
            for directory in written:
                shutil.rmtree(directory, ignore_errors=True)
            raise
        return stored

    def list_references(self, product: str) -> list[ReferenceImage]:
        """References of a product, oldest first (ids sort by creation time)."""
        with self._sessions() as session:
            rows = session.scalars(
                select(ReferenceRow).where(ReferenceRow.product == product).order_by(ReferenceRow.id)
            )
            return [from_row(ReferenceImage, r) for r in rows]

    def read_reference_features(self, ref_id: str) -> bytes:
        """The feature bytes stored with a reference (FileNotFoundError when the data_dir lost them)."""
        return (self.reference_dir(ref_id) / FEATURES_FILE).read_bytes()

    def reference_image_path(self, ref_id: str) -> Path:
        return self.reference_dir(ref_id) / IMAGE_FILE

    def delete_reference(self, product: str, ref_id: str) -> bool:
        """Remove a reference of ``product`` (row first, then its files). False when there is no such reference."""
        if not ID_RE.match(ref_id or ""):
            return False
        with self._sessions() as session, session.begin():
            row = session.get(ReferenceRow, ref_id)
            if row is None or row.product != product:
                return False
            session.delete(row)
        shutil.rmtree(self.reference_dir(ref_id), ignore_errors=True)
        return True

    # ---------------------------------------------------------------------------------------------- memories

    def memory_path(self, version: str) -> Path:
        return self.data_dir / "memories" / f"{version}.safetensors"

    def set_memory(self, product: str, info: MemoryInfo | None, data: bytes | None = None) -> ProductProfile:
        """Make ``info`` (its tensors in ``data``) the product's memory, or clear it with None; returns the profile.

        Memories the product used before are removed (rows, then files).
        """
        if info is not None:
            directory = self.memory_path(info.version).parent
            directory.mkdir(parents=True, exist_ok=True)
            write_atomic(self.memory_path(info.version), bytes(data))
            fsync_dir(directory)
        with self._sessions() as session, session.begin():
            row = session.get(ProductRow, product)
            if row is None:
                raise ValueError(f"no profile for product {product!r}")
            keep = None if info is None else info.version
            old = session.scalars(
                select(MemoryRow.version).where(MemoryRow.product == product, MemoryRow.version != keep)
            ).all()
            session.execute(delete(MemoryRow).where(MemoryRow.version.in_(old)))
            if info is not None and session.get(MemoryRow, info.version) is None:
                session.add(to_row(MemoryRow, info))
            row.memory_version = keep
            row.updated_at = utcnow()
            profile = row_to_profile(row)
        for version in old:
            self.memory_path(version).unlink(missing_ok=True)
        return profile

    def get_memory(self, version: str) -> MemoryInfo | None:
        with self._sessions() as session:
            row = session.get(MemoryRow, version)
            return None if row is None else from_row(MemoryInfo, row)

    # ------------------------------------------------------------------------------------------ calibrations

    def put_calibration(self, record: CalibrationRecord, profile: ProductProfile) -> ProductProfile:
        """Store a calibration and the thresholds it set (``profile``) in one transaction; returns the profile."""
        stored = replace(profile, calibration_version=record.version, updated_at=utcnow())
        with self._sessions() as session, session.begin():
            if session.get(ProductRow, profile.name) is None:
                raise ValueError(f"no profile for product {profile.name!r}")
            if session.get(CalibrationRow, record.version) is None:
                session.add(to_row(CalibrationRow, replace(record, created_at=as_utc(record.created_at))))
            session.merge(to_row(ProductRow, stored))
        return stored

    def get_calibration(self, version: str) -> CalibrationRecord | None:
        with self._sessions() as session:
            row = session.get(CalibrationRow, version)
            return None if row is None else from_row(CalibrationRecord, row)
