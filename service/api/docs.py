"""The API's documentation: offline Swagger UI, and an OpenAPI document that tells the truth.

Interactive docs that work offline: Swagger UI served from the installed ``swagger-ui-bundle`` package.

FastAPI's default /docs and /redoc pages load their JavaScript and CSS from a CDN, so a factory network without
internet access sees a blank page. Here /docs is the same Swagger UI page with every asset under /docs/assets/
(read from the package directory, nothing fetched at run time) and /redoc is off.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from .problems import problem_responses

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"


def install_docs(app: FastAPI) -> None:
    """Add /docs and /docs/assets to an app created with ``docs_url=None, redoc_url=None``."""
    app.mount(ASSETS_PATH, StaticFiles(directory=swagger_ui_path), name="swagger-ui-assets")

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API docs",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon-32x32.png",
        )


def install_truthful_openapi(app: FastAPI, auth_enabled: bool) -> None:
    """Make /openapi.json say what this server does.

    - Without API keys nothing checks ``X-API-Key``: the security scheme and the 401 answers are removed.
    - Every 422 is problem+json (the handlers in ``problems`` answer it so), not FastAPI's HTTPValidationError.
    """
    build = app.openapi
    problem_422 = problem_responses(422)[422]

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.get("responses", {})
                if "422" in responses:
                    responses["422"] = problem_422
                if not auth_enabled:
                    operation.pop("security", None)
                    responses.pop("401", None)
        components = schema.get("components", {})
        if not auth_enabled:
            components.pop("securitySchemes", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
