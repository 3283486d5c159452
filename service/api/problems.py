"""Every error answer is RFC 9457 ``application/problem+json``: ``{type, title, status, detail, instance}``.

Routes raise :class:`Problem`; the handlers installed by :func:`install_problem_handlers` also turn FastAPI's
request-validation errors (422), Starlette's HTTP errors (404 unknown route, 405 wrong method, 400 malformed body)
and image errors of the engine into problems. Extension members: ``request_id`` always, ``errors`` for 422.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine.decode import ImageError

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "urn:dhrclip:problem:"

logger = logging.getLogger("dhrclip.api")

# ImageError.kind -> (status, type slug, title)
IMAGE_ERRORS = {
    "empty": (400, "empty-upload", "Empty upload"),
    "unsupported": (415, "unsupported-media-type", "Unsupported image format"),
    "corrupt": (422, "corrupt-image", "Corrupt image data"),
    "too_large": (413, "image-too-large", "Image too large"),
    "bad_shape": (422, "image-shape", "Image shape refused"),
}
CLIENT_CLOSED_REQUEST = 499  # nginx's convention: the client left before the answer; no response is sent


class ClientDisconnected(Exception):  # noqa: N818 - named after what happened, like Starlette's ClientDisconnect
    """The client closed the connection while its request was read or worked on; counted as 499, not 500."""


class Problem(StarletteHTTPException):
    """An HTTP error with a problem+json body; ``slug`` becomes ``type = urn:dhrclip:problem:<slug>``.

    It subclasses Starlette's HTTPException so that FastAPI passes it through unchanged when it is raised while the
    request body is read (the upload size limit of the request middleware).
    """

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        slug: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict | None = None,
    ):
        super().__init__(status_code=int(status), detail=detail, headers=dict(headers or {}))
        self.status, self.title = int(status), title
        self.type = TYPE_BASE + slug if slug else "about:blank"
        self.extra = dict(extra or {})

    def __str__(self) -> str:
        return f"{self.status} {self.title}: {self.detail}"

    def body(self, instance: str | None = None, request_id: str | None = None) -> dict:
        out = {"type": self.type, "title": self.title, "status": self.status, "detail": self.detail}
        if instance:
            out["instance"] = instance
        if request_id:
            out["request_id"] = request_id
        out.update(self.extra)
        return out

    def response(self, instance: str | None = None, request_id: str | None = None) -> JSONResponse:
        return JSONResponse(
            self.body(instance, request_id),
            status_code=self.status,
            headers=self.headers,
            media_type=PROBLEM_MEDIA_TYPE,
        )


def image_problem(exc: ImageError) -> Problem:
    """Map the engine's ImageError (``kind``) to 400 / 413 / 415 / 422."""
    status, slug, title = IMAGE_ERRORS.get(exc.kind, (422, "invalid-image", "Invalid image"))
    return Problem(status, title, str(exc), slug)


def service_unavailable(
    detail: str, retry_after_s: int | None, slug: str = "not-ready", title: str = "Model not ready"
) -> Problem:
    """503, with ``Retry-After`` when waiting can help."""
    headers = {"Retry-After": str(int(retry_after_s))} if retry_after_s is not None else None
    return Problem(503, title, detail, slug, headers=headers)


def _request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def as_problem(request: Request, exc: Exception) -> Problem:
    """The problem an error raised by a route stands for: a Problem itself, a request-validation error (422, with
    ``errors``), Starlette's HTTP errors (404 unknown route, 405 wrong method, 400 malformed body) or an ImageError."""
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, RequestValidationError):
        errors = [
            {"loc": _loc(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        detail = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors) or "the request is not valid"
        return Problem(422, "Invalid request", detail, "validation-error", extra={"errors": errors})
    if isinstance(exc, ImageError):
        return image_problem(exc)
    if not isinstance(exc, StarletteHTTPException):
        raise TypeError(f"not an error answered as a problem: {exc!r}")
    status = exc.status_code
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "HTTP error"
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != title else None
    if detail is None:
        detail = {
            404: f"no resource at {request.url.path}",
            405: f"method {request.method} is not allowed on {request.url.path}",
        }.get(status, title)
    return Problem(status, title, detail, headers=getattr(exc, "headers", None) or None)


PROBLEM_ERRORS = (Problem, RequestValidationError, StarletteHTTPException, ImageError)  # what ``as_problem`` takes


def _loc(loc) -> str:
    return ".".join(str(p) for p in loc)


async def _problem_handler(request: Request, exc: Exception) -> JSONResponse:
    return as_problem(request, exc).response(request.url.path, _request_id(request))


def install_problem_handlers(app: FastAPI) -> None:
    """Register the handlers; unexpected exceptions are answered by the request middleware (500 problem)."""
    for exc_type in PROBLEM_ERRORS:
        app.add_exception_handler(exc_type, _problem_handler)


def internal_error_body(instance: str, request_id: str) -> dict:
    """Body of the 500 answered when a route raised something unexpected (details go to the log only)."""
    return Problem(
        500, "Internal server error", f"an unexpected error occurred; quote request id {request_id}", "internal-error"
    ).body(instance, request_id)


class ProblemOut(BaseModel):
    """Schema of a problem+json body, for the OpenAPI document."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None


def problem_responses(*statuses: int) -> dict[int | str, dict]:
    """``responses=`` entries documenting problem+json answers in the OpenAPI document."""
    schema = ProblemOut.model_json_schema()
    return {
        s: {"description": HTTPStatus(s).phrase, "content": {PROBLEM_MEDIA_TYPE: {"schema": schema}}} for s in statuses
    }
