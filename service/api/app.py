"""The app factory: ``create_app(settings, load=...) -> FastAPI``; nothing is read or loaded at import.

Start-up (lifespan): the store is opened, then the model loads in a background task, so /livez answers at once
and /health, /readyz and /segment answer 503 with the reason until the engine has warmed up (or for good, with the
loader's one-line message, when the weights are missing). Shutdown: retention and loading stop, the engine drains
its queue (every accepted image is answered), the store closes.

Routes: /segment (routes_segment), /inspections and /products (routes_inspections), reviews and the CSV export
(routes_reviews), product references and calibration (routes_knowledge), /health, /livez, /readyz, /metrics
(routes_ops), the operator console under /ui (console). Every error answer is problem+json (problems); every
response carries X-Request-ID and produces one JSON line on the ``dhrclip.access`` logger (access_log).
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI

import service
from service.runtime import apply_thread_policy

from . import routes_inspections, routes_knowledge, routes_ops, routes_reviews, routes_segment
from .access_log import RequestMiddleware
from .console import install_console
from .docs import install_docs, install_truthful_openapi
from .metrics import Metrics
from .problems import install_problem_handlers
from .settings import Settings, unknown_variables
from .state import Loader, ServiceContext
from .weights import load_weights

logger = logging.getLogger("dhrclip.api")

DESCRIPTION = """Zero-shot industrial anomaly segmentation with DHR-CLIP.

POST images to `/segment` (multipart field `image`, one or more files) and get, per image, an anomaly score, an
ok/review/defect verdict (review only for products calibrated with a review zone), defect regions and links to the
stored heatmap, mask and overlay PNGs. Errors are `application/problem+json`. When API keys are configured, send
one in the `X-API-Key` header.
"""


def create_app(settings: Settings | None = None, load: Loader = load_weights) -> FastAPI:
    """A new app with its own settings, metrics registry, store and engine (built at start-up).

    ``settings=None`` reads ``DHR_*`` environment variables and ``.env`` now, when the factory is called.
    ``load(settings) -> (model, info, WeightsChoice)`` loads the model in a thread at start-up (tests pass their
    own). The app holds one :class:`ServiceContext` (``app.state.ctx``, read only by ``service.api.deps``).
    """
    thread_policy = apply_thread_policy()  # the same policy as the CLI (service/runtime.py); applied once
    settings = settings if settings is not None else Settings()
    if unknown := unknown_variables(os.environ):
        logger.warning(
            "environment variables %s: not settings, ignored (dhrclip serve --help-settings)", ", ".join(unknown)
        )
    metrics = Metrics(replica=settings.resolved_replica_name())
    ctx = ServiceContext(settings, metrics=metrics, load=load)  # status "loading" until the lifespan loads

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await ctx.open()
        try:
            yield
        finally:
            await ctx.close()

    app = FastAPI(
        title="DHR-CLIP inspection service",
        version=service.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # replaced by install_docs: the same page, assets served from the package, not a CDN
        redoc_url=None,
    )
    app.state.ctx = ctx
    app.state.thread_policy = thread_policy
    install_problem_handlers(app)
    app.add_middleware(RequestMiddleware, max_body_bytes=settings.max_upload_bytes, metrics=ctx.metrics)
    app.include_router(routes_segment.router)
    app.include_router(routes_reviews.router)
    app.include_router(routes_inspections.router)
    app.include_router(routes_knowledge.router)
    app.include_router(routes_ops.router)
    install_docs(app)
    install_truthful_openapi(app, settings.auth_enabled)
    install_console(app)
    return app
