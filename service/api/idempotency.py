"""``Idempotency-Key`` for POST /segment: a client that retries (after a timeout or a crash) gets one inspection.

- The key: 1-200 printable ASCII characters, chosen by the client (a UUID is typical).
- The fingerprint of a request: SHA-256 over its text fields, the PNG it asks for, and each image's file name and
  SHA-256 (the multipart boundary and the order of form fields do not count).
- Same key, same fingerprint: the stored inspections are answered again (same ids, ``Idempotent-Replayed: true``),
  nothing is analysed or stored. Same key, another fingerprint: 409. Same key while the first request still runs:
  409 with ``Retry-After: 1``.
- The key is committed in the same transaction as the request's last inspection (``InspectionStore.add``), so after
  a crash either the answer and its key are stored or neither; keys are deleted with the inspections they answer
  for (``DHR_RETENTION_DAYS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json

from service.storage import InspectionRecord, InspectionStore
from service.storage.models import IdempotencyEntry

from .pipeline import Upload
from .problems import Problem
from .state import ServiceContext

HEADER = "Idempotency-Key"
KEY_PATTERN = r"^[\x21-\x7e]{1,200}$"
REPLAYED_HEADER = "Idempotent-Replayed"


def fingerprint(fields: dict, uploads: list[Upload], png_kind: str | None) -> str:
    """64 hex digits identifying what a request asks for (see the module docstring)."""
    digest = hashlib.sha256(json.dumps({"fields": fields, "png": png_kind}, sort_keys=True).encode())
    for upload in uploads:
        digest.update(upload.filename.encode("utf-8", "replace") + b"\0" + hashlib.sha256(upload.data).digest())
    return digest.hexdigest()


async def stored_answer(store: InspectionStore, key: str, fp: str) -> list[InspectionRecord] | None:
    """The records stored under ``key``, None for a new key; 409 when the key was used for another request."""
    entry = await asyncio.to_thread(store.get_idempotency, key)
    if entry is None:
        return None
    if entry.fingerprint != fp:
        raise Problem(
            409,
            "Idempotency key reused",
            f"{HEADER} {key!r} was used for a request with other images or fields; use a new key",
            "idempotency-key-reused",
        )
    records = [await asyncio.to_thread(store.get, rid) for rid in entry.inspection_ids]
    if any(r is None for r in records):
        raise Problem(409, "Idempotency key expired", f"the inspections of {HEADER} {key!r} were deleted", "gone")
    return records


@contextlib.contextmanager
def claimed(ctx: ServiceContext, key: str | None):
    """Hold ``key`` for the duration of one request; a concurrent request with the same key gets 409."""
    if key is None:
        yield
        return
    if key in ctx.idempotency_in_flight:
        raise Problem(
            409,
            "Request in progress",
            f"a request with {HEADER} {key!r} is still being processed; retry later",
            "idempotency-key-in-flight",
            headers={"Retry-After": "1"},
        )
    ctx.idempotency_in_flight.add(key)
    try:
        yield
    finally:
        ctx.idempotency_in_flight.discard(key)


def entry_for(key: str, fp: str, records: list[InspectionRecord]) -> IdempotencyEntry:
    return IdempotencyEntry(key=key, fingerprint=fp, inspection_ids=[r.id for r in records])
