"""Where a record's artefacts live in the artefact store, and reading them and the renderings cached beside them.

Key of an artefact: ``<yyyy>/<mm>/<dd>/<id>/<file>`` (UTC date of ``created_at``), so it follows from the record
alone. Files (:func:`artefact_file`): ``original.bin`` (the upload's bytes), ``map.f16.png`` (the coded float16
map, ``service.engine.map_codec``), ``<kind>.png`` for any other kind (inspections of the first layout keep their
three PNGs). Renderings cached later (:meth:`RecordFiles.put_derived`: PNGs rendered on first request,
``thumb.jpg``) sit beside them and are not listed in ``record.artefacts``: they can always be made again.

Mixed into :class:`~service.storage.store.InspectionStore`, whose ``_sessions``, ``artefacts`` and ``get`` it uses.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import select

from service.storage.artefacts import ArtefactMissingError, check_key
from service.storage.models import KIND_RE, InspectionRecord, InspectionRow, as_utc

logger = logging.getLogger("dhrclip.storage")

# file names of the stored kinds that are not PNGs: the upload as it came (any image format) and the coded map
ARTEFACT_FILES = {"original": "original.bin", "map": "map.f16.png"}


def artefact_file(kind: str) -> str:
    """File name of a stored artefact kind in its record's folder: :data:`ARTEFACT_FILES`, else ``<kind>.png``."""
    return ARTEFACT_FILES.get(kind, f"{kind}.png")


class RecordFiles:
    @staticmethod
    def record_prefix(record_id: str, created_at: datetime) -> str:
        """Key prefix of a record's artefacts: ``<yyyy>/<mm>/<dd>/<id>/`` (UTC date)."""
        day = as_utc(created_at, "created_at")
        return f"{day.year:04d}/{day.month:02d}/{day.day:02d}/{record_id}/"

    def _remove_quietly(self, keys: list[str]) -> None:
        """Clean-up after a failed ``add``: the original error is the one to report, this one is only logged."""
        for key in keys:
            try:
                self.artefacts.delete(key)
            except Exception as exc:  # noqa: BLE001 - an orphan is harmless, a masked error is not
                logger.warning("could not remove orphan artefact %s: %s", key, exc)

    def artefact_key(self, record_id: str, kind: str) -> str | None:
        """Key of a stored artefact, or None for an unknown id or a kind not stored with that record."""
        if not KIND_RE.match(kind or ""):
            return None
        with self._sessions() as session:
            found = session.execute(
                select(InspectionRow.created_at, InspectionRow.artefacts).where(InspectionRow.id == record_id)
            ).first()
        if found is None or kind not in found.artefacts:
            return None
        return self.record_prefix(record_id, found.created_at) + artefact_file(kind)

    def read_artefact(self, record: str | InspectionRecord, kind: str) -> bytes | None:
        """The bytes of a stored artefact of a record (or of the record with this id), or None (see
        :meth:`artefact_key`).

        Raises ArtefactMissingError when the record lists the kind but the store has lost it (damaged store).
        """
        if isinstance(record, InspectionRecord):
            key = self.record_prefix(record.id, record.created_at) + artefact_file(kind)
            key = key if kind in record.artefacts else None
        else:
            key = self.artefact_key(record, kind)
        if key is None:
            return None
        try:
            return self.artefacts.get(key)
        except ArtefactMissingError:
            record_id = getattr(record, "id", record)
            raise ArtefactMissingError(
                f"artefact {kind!r} of inspection {record_id} is missing from {self.artefacts.location}: {key}"
            ) from None

    def read_derived(self, record: InspectionRecord, name: str) -> bytes | None:
        """A rendering cached beside a record's artefacts (``<prefix><name>``, e.g. ``heatmap.png``), or None.

        Derived files are not listed in ``record.artefacts``: they can always be made again from the listed ones,
        and retention deletes them with the record (the whole prefix goes).
        """
        try:
            return self.artefacts.get(self.record_prefix(record.id, record.created_at) + check_key(name))
        except ArtefactMissingError:
            return None

    def put_derived(self, record: InspectionRecord, name: str, data: bytes) -> None:
        """Cache a rendering beside the record's artefacts (an atomic put: a concurrent twin writes the same bytes).

        If retention removed the record meanwhile, the rendering is deleted again, so no orphan stays behind.
        """
        stored = {*ARTEFACT_FILES.values(), *(artefact_file(k) for k in record.artefacts)}
        if name in stored or not isinstance(data, bytes | bytearray | memoryview):
            raise ValueError(f"{name!r} is a stored artefact of inspection {record.id}, or its data are not bytes")
        key = self.record_prefix(record.id, record.created_at) + check_key(name)
        self.artefacts.put(key, bytes(data))
        if self.get(record.id) is None:
            self._remove_quietly([key])
