"""Operational routes: /health, /livez, /readyz, /metrics (open unless ``DHR_PROTECT_OPS=true``).

- ``/livez``: 200 ``{"status": "alive"}`` while the process runs (the event loop answers), also while loading.
- ``/readyz``: 200 ``{"status": "ready"}`` when /segment can be served, else 503 ``{"status", "reason"}``.
- ``/health``: 200 with the model identity (prompts kind "learned" or "ensemble"), device, precision, preset,
  queue depth and size, batch size, uptime, last inference time, warm-up seconds and inspection counts; 503
  ``{"status": "loading" | "error", "reason": ...}`` otherwise (``Retry-After`` while loading). The reason of a
  load error is the loader's one line, e.g. which weights file is missing and how to provide it.
- ``/metrics``: Prometheus text format (see ``service.api.metrics``).
"""

from __future__ import annotations

import asyncio
import os
import time

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from .deps import Context
from .schemas import HealthOut, NotReadyOut
from .security import require_ops_key
from .state import NotReady

router = APIRouter(tags=["operations"], dependencies=[Depends(require_ops_key)])

_NOT_READY = {503: {"model": NotReadyOut, "description": "model loading or failed to load"}}


def _not_ready(why: NotReady) -> JSONResponse:
    headers = {"Retry-After": str(why.retry_after_s)} if why.retry_after_s is not None else None
    return JSONResponse({"status": why.status, "reason": why.reason}, status_code=503, headers=headers)


@router.get("/livez", summary="Liveness: the process answers")
async def livez():
    return {"status": "alive"}


@router.get("/readyz", summary="Readiness: /segment can be served", responses=_NOT_READY)
async def readyz(ctx: Context):
    why = ctx.not_ready()
    return {"status": "ready"} if why is None else _not_ready(why)


@router.get("/health", response_model=HealthOut, summary="Model identity, queue and counts", responses=_NOT_READY)
async def health(ctx: Context):
    why = ctx.not_ready()
    if why is not None:
        return _not_ready(why)
    engine, s = ctx.engine, ctx.settings
    info = engine.info.to_dict()
    stored = await asyncio.to_thread(ctx.require_store().count)  # after the readiness answer
    return {
        "status": "ok",
        "model": info,
        "device": info["device"],
        "precision": info["precision"],
        "preset": info["preset"],
        "queue_depth": engine.queue_depth,
        "queue_size": s.queue_size,
        "max_batch_size": s.max_batch_size,
        "uptime_s": round(time.time() - ctx.started_at, 3),
        "last_inference_at": ctx.last_inference_iso(),
        "warmup_s": engine.warmup_s,
        "counts": {**ctx.counts.to_dict(), "stored": stored},
        "replica": ctx.metrics.replica,
        "pid": os.getpid(),
    }


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(ctx: Context):
    m = ctx.metrics
    return Response(m.render(), media_type=m.content_type)
