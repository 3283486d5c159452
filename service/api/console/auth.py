"""Console sign-in and CSRF protection.

- Key: when keys are configured, a console page without a valid key redirects (303) to ``/ui/login``, which
  asks for a key once and keeps it in the ``dhr_key`` cookie: HttpOnly (scripts cannot read it), SameSite=Strict
  (no other site's page sends it), Secure over HTTPS, path ``/``. The roles are those of the API
  (``security.caller_for``). With no keys configured the console is open, as the API is.
- CSRF: every page sets a random ``dhr_csrf`` cookie (HttpOnly, SameSite=Strict) and puts the same token into
  its forms; a form post whose ``csrf`` field does not equal the cookie is refused with 403 before anything is
  read or written (double-submit token; SameSite=Strict also keeps the cookie off cross-site posts).
"""

from __future__ import annotations

import hmac
import secrets
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.responses import RedirectResponse, Response

from ..deps import AppSettings
from ..problems import Problem
from ..security import Caller, caller_for
from ..settings import Settings

KEY_COOKIE = "dhr_key"
CSRF_COOKIE = "dhr_csrf"
CSRF_FIELD = "csrf"
MAX_KEY_CHARS = 500


class LoginRequired(Exception):
    """Raised by a console page when keys are configured and the request carries no valid key cookie."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


def safe_next(url: str | None) -> str:
    """A same-site path to go back to after sign-in (anything else becomes ``/ui``)."""
    if not url or not url.startswith("/ui") or url.startswith("//") or "\\" in url:
        return "/ui"
    return url


def console_caller(request: Request, settings: AppSettings) -> Caller:
    """Dependency of every console page: the caller of the key cookie, or LoginRequired."""
    caller = caller_for(request.cookies.get(KEY_COOKIE), settings)
    if caller is None:
        raise LoginRequired(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    return caller


ConsoleCaller = Annotated[Caller, Depends(console_caller)]


def login_redirect(request: Request, exc: LoginRequired) -> Response:
    """Handler of LoginRequired: pages go to the sign-in form; the live fragment answers 401 (the script reloads)."""
    if request.headers.get("x-console-fragment"):
        return Response(status_code=401)
    return RedirectResponse(f"/ui/login?next={quote(exc.next_url, safe='')}", status_code=303)


def csrf_token(request: Request) -> str:
    """The request's CSRF token (from its cookie), or a new one that ``set_cookies`` will store."""
    token = request.cookies.get(CSRF_COOKIE)
    if not token or len(token) != 32:
        token = request.state.__dict__.setdefault("new_csrf", secrets.token_hex(16))
    return token


def _cookie(response: Response, request: Request, name: str, value: str) -> None:
    response.set_cookie(
        name, value, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/", max_age=None
    )


def set_cookies(response: Response, request: Request) -> Response:
    """Store a CSRF token made during this request (pages call this on their answer)."""
    new = request.state.__dict__.get("new_csrf")
    if new:
        _cookie(response, request, CSRF_COOKIE, new)
    return response


def check_csrf(request: Request, form) -> None:
    """403 problem unless the form's ``csrf`` field equals the ``dhr_csrf`` cookie."""
    cookie = request.cookies.get(CSRF_COOKIE) or ""
    given = form.get(CSRF_FIELD)
    if not isinstance(given, str) or not cookie or not hmac.compare_digest(given.encode(), cookie.encode()):
        raise Problem(
            403,
            "CSRF check failed",
            "the form's csrf token is missing or does not match this browser's; reload the page and submit again",
            "csrf",
        )


def sign_in(request: Request, key: str, next_url: str) -> Response:
    """Answer of an accepted login post: set the key cookie and go on to ``next_url``."""
    response = RedirectResponse(safe_next(next_url), status_code=303)
    _cookie(response, request, KEY_COOKIE, key)
    return response


def sign_out(settings: Settings) -> Response:
    response = RedirectResponse("/ui/login" if settings.auth_enabled else "/ui", 303)
    response.delete_cookie(KEY_COOKIE, path="/", httponly=True, samesite="strict")
    return response


def key_accepted(key: str, settings: Settings) -> bool:
    """True when ``key`` is a configured key (operator or admin)."""
    return len(key) <= MAX_KEY_CHARS and caller_for(key, settings) is not None
