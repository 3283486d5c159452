"""FastAPI dependencies: the one way a route reaches the app's context, settings, serving engine and store.

Each is an ``Annotated`` type, so a route names what it needs as a parameter::

    async def route(engine: ServingEngine, store: Store): ...

``ServingEngine`` answers 503 (problem+json, ``Retry-After`` while loading) until the model is ready and
``Store`` 503 before the app's lifespan has started; see :meth:`ServiceContext.require_engine`.

They are coroutines although nothing in them awaits: FastAPI runs a plain function dependency in its thread pool,
and under load those thread hops (three per /segment request) made even a 503 at the door take ~150 ms at p99.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.engine.runner import Engine
from service.storage import InspectionStore

from .settings import Settings
from .state import ServiceContext


async def get_context(request: Request) -> ServiceContext:
    """The app's one :class:`ServiceContext` (made by ``create_app``, opened and closed by its lifespan)."""
    return request.app.state.ctx


Context = Annotated[ServiceContext, Depends(get_context)]


async def get_settings(ctx: Context) -> Settings:
    return ctx.settings


async def get_engine(ctx: Context) -> Engine:
    return ctx.require_engine()


async def get_store(ctx: Context) -> InspectionStore:
    return ctx.require_store()


AppSettings = Annotated[Settings, Depends(get_settings)]
ServingEngine = Annotated[Engine, Depends(get_engine)]
Store = Annotated[InspectionStore, Depends(get_store)]
