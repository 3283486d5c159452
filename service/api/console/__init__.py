"""The operator console: server-rendered pages under ``/ui`` with vendored CSS and JS (see ``pages``)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from .auth import LoginRequired, login_redirect
from .pages import HERE, root_router, router


def install_console(app: FastAPI) -> None:
    """Add the console's routes, its static files and the sign-in redirect to ``app``."""
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="console-static")
    app.include_router(router)
    app.include_router(root_router)
    app.add_exception_handler(LoginRequired, login_redirect)
