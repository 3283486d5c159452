"""Inspection storage: records in SQL (SQLite WAL by default, PostgreSQL by URL) and PNG artefacts on disk."""

from service.storage.models import InspectionRecord, ProductProfile, new_inspection_id
from service.storage.store import InspectionStore

__all__ = ["InspectionRecord", "InspectionStore", "ProductProfile", "new_inspection_id"]
