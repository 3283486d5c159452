"""Request middleware: request id, upload size limit, metrics, one JSON access-log line per request, last-resort 500.

One pure ASGI middleware (no response buffering) wraps the whole app:

1. ``X-Request-ID``: the client's value is echoed when it is 1-128 characters of ``[A-Za-z0-9._:-]``, otherwise a
   new 32-hex-digit id is made; it is stored in ``scope["state"]["request_id"]`` and set on every response.
2. Upload limit (``DHR_MAX_UPLOAD_MB``): a ``Content-Length`` above the limit is answered 413 before the body is
   read; the bytes actually received are counted as well (chunked uploads, lying headers) and the request is
   stopped with 413 as soon as they pass the limit.
3. After the response: ``dhr_http_requests_total`` / ``dhr_http_request_duration_seconds`` by route template and
   status, and one line on the ``dhrclip.access`` logger whose message is a JSON object with ``method``, ``path``,
   ``route``, ``status``, ``duration_ms``, ``request_id``, ``n_images`` (set by /segment) and ``replica``.
   While a request other than an operations route (``OPS_PATHS``) runs, ``dhr_inflight_requests`` counts it.
   Every response carries ``X-DHR-Replica``: which replica answered (one name per process).
4. An exception no handler answered becomes a 500 problem+json (the traceback goes to the ``dhrclip.api`` log).
   A client that disconnects (while its body is read, or while its images are analysed) is not a server error:
   nothing is sent, the request is counted and logged with status 499.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import UNMATCHED_ROUTE, Metrics
from .problems import CLIENT_CLOSED_REQUEST, PROBLEM_MEDIA_TYPE, ClientDisconnected, Problem, internal_error_body

ACCESS_LOGGER = "dhrclip.access"
REQUEST_ID_HEADER = "X-Request-ID"
REPLICA_HEADER = "X-DHR-Replica"
OPS_PATHS = frozenset({"/health", "/livez", "/readyz", "/metrics"})
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

access_logger = logging.getLogger(ACCESS_LOGGER)
logger = logging.getLogger("dhrclip.api")


def too_large(limit_bytes: int, what: str) -> Problem:
    return Problem(
        413,
        "Upload too large",
        f"{what} exceeds the limit of {limit_bytes} bytes ({limit_bytes / 2**20:g} MiB, DHR_MAX_UPLOAD_MB)",
        "upload-too-large",
    )


def route_template(scope: Scope) -> str:
    """The matched route's path template (``/inspections/{inspection_id}``), else ``<unmatched>``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return path
    app = scope.get("app")
    for candidate in getattr(getattr(app, "router", None), "routes", ()):
        try:
            match, _ = candidate.matches(scope)
        except Exception:  # noqa: BLE001 - a route that cannot match this scope
            continue
        if match is Match.FULL:
            return getattr(candidate, "path", UNMATCHED_ROUTE)
    return UNMATCHED_ROUTE


class RequestMiddleware:
    """See the module docstring. ``max_body_bytes``: the upload limit; ``metrics``: the app's Metrics."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = Headers(scope=scope)
        given = headers.get(REQUEST_ID_HEADER)
        request_id = given if given and _REQUEST_ID_RE.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        sent = {"status": 500, "started": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"], sent["started"] = message["status"], True
                out = MutableHeaders(scope=message)
                out[REQUEST_ID_HEADER] = request_id
                out[REPLICA_HEADER] = self.metrics.replica
            await send(message)

        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise too_large(self.max_body_bytes, "the request body")
            return message

        counted = scope.get("path") not in OPS_PATHS
        if counted:
            self.metrics.inflight.inc()
        try:
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                problem = too_large(self.max_body_bytes, f"the request body ({int(declared)} bytes)")
                await problem.response(scope.get("path"), request_id)(scope, receive, send_with_id)
            else:
                await self.app(scope, counting_receive, send_with_id)
        except (ClientDisconnect, ClientDisconnected):
            if not sent["started"]:
                sent["status"] = CLIENT_CLOSED_REQUEST
        except Exception:
            logger.exception(
                "unhandled error in %s %s (request %s)", scope.get("method"), scope.get("path"), request_id
            )
            if sent["started"]:
                raise  # the response is half sent; only the server can close the connection
            body = internal_error_body(scope.get("path", ""), request_id)
            await JSONResponse(body, status_code=500, media_type=PROBLEM_MEDIA_TYPE)(scope, receive, send_with_id)
        finally:
            if counted:
                self.metrics.inflight.dec()
            self._record(scope, state, request_id, sent["status"], time.perf_counter() - start)

    def _record(self, scope: Scope, state: dict, request_id: str, status: int, seconds: float) -> None:
        route = route_template(scope)
        method = scope.get("method", "")
        self.metrics.observe_request(method, route, status, seconds)
        fields = {
            "method": method,
            "path": scope.get("path", ""),
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000.0, 3),
            "request_id": request_id,
            "n_images": int(state.get("n_images", 0)),
            "replica": self.metrics.replica,
        }
        access_logger.info(json.dumps(fields, separators=(",", ":")), extra={"access": fields})
