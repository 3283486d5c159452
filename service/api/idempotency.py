"""``Idempotency-Key`` for POST /segment: a client that retries (after a timeout or a crash) gets one answer.

- The key: 1-200 printable ASCII characters, chosen by the client (a UUID is typical).
- The fingerprint of a request: SHA-256 over its text fields, the PNG it asks for, and each image's file name and
  SHA-256 (the multipart boundary and the order of form fields do not count).
- Same key, same fingerprint: the stored inspections, all of them, are answered again (same ids,
  ``Idempotent-Replayed: true``); nothing is analysed or stored. Same key, another fingerprint: 409. Same key while
  the first request still runs, on this replica or another one sharing the database: 409 with ``Retry-After: 1``
  (a live request mostly answers within a second; asking again costs one read of the key).
- The key is claimed in the database before any work (a pending row naming this process's instance,
  ``service.storage.idempotency``) and turned done in the one transaction that stores every inspection of the
  request, so after a crash or an error either the whole answer and its key are stored or nothing is. A request
  that fails frees its key at once. One whose process died holds it until that process is seen dead: silent for
  3 heartbeats (``DHR_HEARTBEAT_S``, 2 s: about 6 s after the crash; at once after a clean shutdown), then a
  retry claims it again. ``claim_stale_s`` (twice the request timeout plus a minute: longer than any live request)
  stays the backstop, for a key whose owner is unknown or still beats while its request hangs. Keys are deleted
  with the inspections they answer for (``DHR_RETENTION_DAYS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json

from service.storage import InspectionRecord, InspectionStore
from service.storage.idempotency import ClaimLostError, IdempotencyEntry

from .pipeline import Upload
from .problems import Problem
from .settings import Settings

HEADER = "Idempotency-Key"
KEY_PATTERN = r"^[\x21-\x7e]{1,200}$"
REPLAYED_HEADER = "Idempotent-Replayed"


def fingerprint(fields: dict, uploads: list[Upload], png_kind: str | None) -> str:
    """64 hex digits identifying what a request asks for (see the module docstring)."""
    digest = hashlib.sha256(json.dumps({"fields": fields, "png": png_kind}, sort_keys=True).encode())
    for upload in uploads:
        digest.update(upload.filename.encode("utf-8", "replace") + b"\0" + hashlib.sha256(upload.data).digest())
    return digest.hexdigest()


def claim_stale_s(settings: Settings) -> float:
    """Age at which a pending key counts as abandoned by a dead process."""
    return 2 * settings.request_timeout_s + 60.0


@contextlib.asynccontextmanager
async def claimed(store: InspectionStore, key: str | None, fp: str | None, stale_s: float, owner: str | None):
    """Hold ``key`` in the database in the name of the instance ``owner`` while the block runs; yields ``(claim,
    None)`` for a new request (the claim to store the inspections with; None without a key) or ``(None, records)``
    to answer again. Raises 409 for a key used with another request or still pending. A block that fails frees
    the key."""
    if key is None:
        yield None, None
        return
    entry, mine = await asyncio.to_thread(store.claim_idempotency, key, fp, stale_s, owner)
    if not mine:
        yield None, await _stored(store, entry, fp)
        return
    try:
        yield entry, None
    except BaseException as exc:  # freeing is a no-op when the inspections were stored before the failure
        await asyncio.shield(asyncio.to_thread(store.release_idempotency, entry))
        if isinstance(exc, ClaimLostError):
            raise Problem(409, "Request superseded", f"{exc}; nothing was stored", "idempotency-key-in-flight") from exc
        raise


async def _stored(store: InspectionStore, entry: IdempotencyEntry, fp: str) -> list[InspectionRecord]:
    """The records of a key used before; 409 when it was used for another request, still runs or expired."""
    key = entry.key
    if entry.fingerprint != fp:
        raise Problem(
            409,
            "Idempotency key reused",
            f"{HEADER} {key!r} was used for a request with other images or fields; use a new key",
            "idempotency-key-reused",
        )
    if entry.state != "done":
        raise Problem(
            409,
            "Request in progress",
            f"a request with {HEADER} {key!r} is still being processed; retry later",
            "idempotency-key-in-flight",
            headers={"Retry-After": "1"},
        )
    records = [await asyncio.to_thread(store.get, rid) for rid in entry.inspection_ids]
    if any(r is None for r in records):
        raise Problem(409, "Idempotency key expired", f"the inspections of {HEADER} {key!r} were deleted", "gone")
    return records
