"""Product knowledge in the store: reference images, normal memories and calibrations (mixed into InspectionStore).

The bytes go through the artefact store (a local folder or an S3 bucket, like the inspections' PNGs) under::

    references/<id>/image.bin             the uploaded bytes, exactly as received
    references/<id>/features.safetensors  the model features of that image (bytes made by the engine)
    references/<id>/<name>                renderings cached beside them (e.g. the console's ``thumb.jpg``; see
                                          :meth:`ProductKnowledge.put_reference_derived`), removed with the reference
    memories/<version>.safetensors        a product's built normal memory (bytes made by the engine)

With the default local store (its root is ``DHR_DATA_DIR``) these keys are the files the first release of product
knowledge wrote under the data directory, so an existing data directory is read as it is. When the artefacts live
elsewhere (``DHR_ARTEFACT_URL``), files left under ``<data_dir>/references`` and ``<data_dir>/memories`` by an
earlier version are moved into the artefact store when the store opens (:meth:`ProductKnowledge.adopt_local_knowledge`).

Write order as for inspections: the objects first (each put durable), then the rows in one transaction; a failure
removes the objects written. ``add_references`` is all-or-nothing for the whole list. The product row holds the
versions in use (``memory_version``, ``calibration_version``) and is what replicas compare with their copy
(``current_product``); a memory's key is its content version, so its bytes never change under a cached copy.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from pathlib import Path

from sqlalchemy import delete, func, select

from service.storage.artefacts import ArtefactMissingError, ArtefactStore, LocalArtefactStore, check_key
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

logger = logging.getLogger("dhrclip.storage")

IMAGE_FILE = "image.bin"
FEATURES_FILE = "features.safetensors"
KNOWLEDGE_FOLDERS = ("references", "memories")


def reference_prefix(ref_id: str) -> str:
    """Key prefix of a reference's objects, ``references/<id>/``; ValueError for a malformed id."""
    if not ID_RE.match(ref_id or ""):
        raise ValueError(f"reference id must be 28 lowercase hex digits, got {ref_id!r}")
    return f"references/{ref_id}/"


def memory_key(version: str) -> str:
    return f"memories/{version}.safetensors"


class ProductKnowledge:
    """Methods of :class:`~service.storage.InspectionStore` for references, memories and calibrations."""

    artefacts: ArtefactStore

    # -------------------------------------------------------------------------------------------- references

    def add_references(self, items: list[tuple[ReferenceImage, bytes, bytes]]) -> list[ReferenceImage]:
        """Store ``(reference, image bytes, feature bytes)`` for every item, or nothing (all-or-nothing).

        Raises ValueError for an unknown product or a reference id already present.
        """
        written: list[str] = []
        stored = [replace(ref, created_at=as_utc(ref.created_at)) for ref, _, _ in items]
        try:
            for ref, (_, image, features) in zip(stored, items, strict=True):
                prefix = reference_prefix(ref.id)
                if self.artefacts.keys(prefix):
                    raise ValueError(f"reference {ref.id} already exists: {self.artefacts.location}/{prefix}")
                for name, data in ((IMAGE_FILE, image), (FEATURES_FILE, features)):
                    self.artefacts.put(prefix + name, bytes(data))
                    written.append(prefix + name)
            with self._sessions() as session, session.begin():
                for product in {ref.product for ref in stored}:
                    if session.get(ProductRow, product) is None:
                        raise ValueError(f"no profile for product {product!r}")
                session.add_all([to_row(ReferenceRow, ref) for ref in stored])
        except BaseException:
            for key in written:
                self.artefacts.delete(key)
            raise
        return stored

    def list_references(
        self, product: str, *, newest_first: bool = False, limit: int | None = None, offset: int = 0
    ) -> list[ReferenceImage]:
        """References of a product, oldest first (ids sort by creation time), or newest first; ``limit`` rows from
        ``offset`` on: a page of the console's gallery is one bounded query (LIMIT/OFFSET on the id order)."""
        order = ReferenceRow.id.desc() if newest_first else ReferenceRow.id
        query = select(ReferenceRow).where(ReferenceRow.product == product).order_by(order)
        with self._sessions() as session:
            rows = session.scalars(query.limit(limit).offset(offset or None))
            return [from_row(ReferenceImage, r) for r in rows]

    def count_references(self, product: str) -> int:
        """How many references ``product`` has (one COUNT over its index)."""
        query = select(func.count()).select_from(ReferenceRow).where(ReferenceRow.product == product)
        with self._sessions() as session:
            return session.scalar(query)

    def get_reference(self, product: str, ref_id: str) -> ReferenceImage | None:
        """One reference of ``product``; None for another product's, an unknown or a malformed id."""
        if not ID_RE.match(ref_id or ""):
            return None
        with self._sessions() as session:
            row = session.get(ReferenceRow, ref_id)
            return None if row is None or row.product != product else from_row(ReferenceImage, row)

    def read_reference_features(self, ref_id: str) -> bytes:
        """The feature bytes stored with a reference (ArtefactMissingError when the store lost them)."""
        return self.artefacts.get(reference_prefix(ref_id) + FEATURES_FILE)

    def read_reference_image(self, ref_id: str) -> bytes:
        """The image bytes of a reference, exactly as uploaded (ArtefactMissingError when the store lost them)."""
        return self.artefacts.get(reference_prefix(ref_id) + IMAGE_FILE)

    def read_reference_derived(self, ref_id: str, name: str) -> bytes | None:
        """A rendering cached beside a reference's bytes (``references/<id>/<name>``), or None when not cached."""
        try:
            return self.artefacts.get(reference_prefix(ref_id) + check_key(name))
        except ArtefactMissingError:
            return None

    def put_reference_derived(self, ref: ReferenceImage, name: str, data: bytes) -> None:
        """Cache a rendering of ``ref`` beside its bytes (an atomic put: a concurrent twin writes the same bytes).

        :meth:`delete_reference` removes the whole prefix, so the rendering goes with its reference; one put after
        a concurrent removal is deleted again here (the row is checked after the put), so no orphan stays behind.
        """
        if name in (IMAGE_FILE, FEATURES_FILE) or not isinstance(data, bytes | bytearray | memoryview):
            raise ValueError(f"{name!r} is a stored file of reference {ref.id}, or its data are not bytes")
        key = reference_prefix(ref.id) + check_key(name)
        self.artefacts.put(key, bytes(data))
        if self.get_reference(ref.product, ref.id) is None:
            self.artefacts.delete(key)

    def delete_reference(self, product: str, ref_id: str) -> bool:
        """Remove a reference of ``product`` (row first, then its files). False when there is no such reference."""
        if not ID_RE.match(ref_id or ""):
            return False
        with self._sessions() as session, session.begin():
            row = session.get(ReferenceRow, ref_id)
            if row is None or row.product != product:
                return False
            session.delete(row)
        self.artefacts.delete_prefix(reference_prefix(ref_id))
        return True

    def adopt_local_knowledge(self, data_dir: Path | str) -> int:
        """Move reference and memory files an earlier version kept under ``data_dir`` into the artefact store.

        Nothing to do when the store is the local folder ``data_dir`` itself (the keys are those files). Else each
        file is put under its key (the same relative path) unless the key is present, then removed locally; a
        crash in between leaves a local copy that the next open removes. Returns the number of files moved.
        """
        root = Path(data_dir)
        if isinstance(self.artefacts, LocalArtefactStore) and self.artefacts.root.resolve() == root.resolve():
            return 0
        files = sorted(
            p for folder in KNOWLEDGE_FOLDERS if (root / folder).is_dir() for p in (root / folder).rglob("*")
        )
        moved = 0
        for path in (p for p in files if p.is_file() and not p.name.startswith(".")):
            key = path.relative_to(root).as_posix()
            if not self.artefacts.exists(key):
                self.artefacts.put(key, path.read_bytes())
                moved += 1
            path.unlink()
        for folder in [*sorted((p for p in files if p.is_dir()), reverse=True), *(root / f for f in KNOWLEDGE_FOLDERS)]:
            with contextlib.suppress(OSError):  # not empty (a file it could not move), or absent
                folder.rmdir()
        if moved:
            logger.info("moved %d product-knowledge files from %s to %s", moved, root, self.artefacts.location)
        return moved

    # ---------------------------------------------------------------------------------------------- memories

    def read_memory(self, version: str) -> bytes:
        """The tensors of a stored memory (ArtefactMissingError when the store lost them)."""
        return self.artefacts.get(memory_key(version))

    def set_memory(self, product: str, info: MemoryInfo | None, data: bytes | None = None) -> ProductProfile:
        """Make ``info`` (its tensors in ``data``) the product's memory, or clear it with None; returns the profile.

        The memory's object is put before the rows commit (and deleted again when they fail, unless it was there
        already); memories the product used before are removed (rows, then objects).
        """
        new_key = None
        if info is not None and not self.artefacts.exists(memory_key(info.version)):
            new_key = memory_key(info.version)
            self.artefacts.put(new_key, bytes(data))
        try:
            profile, old = self._commit_memory(product, info)
        except BaseException:
            if new_key is not None:
                self.artefacts.delete(new_key)
            raise
        for version in old:
            self.artefacts.delete(memory_key(version))
        return profile

    def _commit_memory(self, product: str, info: MemoryInfo | None) -> tuple[ProductProfile, list[str]]:
        """The rows of :meth:`set_memory` in one transaction; returns the profile and the versions dropped."""
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
            return row_to_profile(row), list(old)

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

    def latest_calibration(self, product: str) -> CalibrationRecord | None:
        """The product's newest calibration, whether its thresholds are still in force or were set by hand since."""
        query = (
            select(CalibrationRow)
            .where(CalibrationRow.product == product)
            .order_by(CalibrationRow.created_at.desc(), CalibrationRow.version)
            .limit(1)
        )
        with self._sessions() as session:
            row = session.scalars(query).first()
            return None if row is None else from_row(CalibrationRecord, row)
