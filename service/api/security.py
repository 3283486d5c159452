"""API keys and roles: ``X-API-Key`` must hold a configured key when any key is configured.

Roles (``ROLES``): ``operator`` keys (``DHR_API_KEYS``) inspect, read and review; ``admin`` keys
(``DHR_ADMIN_KEYS``) may also change thresholds, references, calibration and delete. With no admin keys
configured every operator key is an admin key (one role, as before roles existed). With no keys at all the
service is ``open``: every caller has every right.

The inspection, product and segmentation routes always require a key (when keys are configured); the operational
routes (/health, /livez, /readyz, /metrics) only with ``DHR_PROTECT_OPS=true``, so probes and scrapers keep working
without credentials by default. Keys are compared in constant time; a missing and a wrong key both give 401
with ``WWW-Authenticate: ApiKey header="X-API-Key"``, an operator key on an admin route 403. Neither a key nor its
length is logged; a review records the key's fingerprint (``key_id``: 12 hex digits of its SHA-256).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Depends, Security
from fastapi.security import APIKeyHeader

from .deps import AppSettings
from .problems import Problem
from .settings import Settings

API_KEY_HEADER = "X-API-Key"
ROLES = ("open", "operator", "admin")
_CHALLENGE = {"WWW-Authenticate": f'ApiKey header="{API_KEY_HEADER}"'}

# Declared for the OpenAPI document ("Authorize" button); auto_error=False so the check below answers the 401.
api_key_scheme = APIKeyHeader(
    name=API_KEY_HEADER, auto_error=False, description="one of DHR_API_KEYS (operator) or DHR_ADMIN_KEYS (admin)"
)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: ``role`` in ROLES and the fingerprint of the key used (None when open)."""

    role: str
    key_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role in ("open", "admin")


def key_is_valid(given: str | None, keys: list[str]) -> bool:
    """True when ``given`` equals one of ``keys``; every key is compared (constant time per key)."""
    if not given:
        return False
    given_b = given.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given_b, key.encode())
    return matched


def key_id(key: str) -> str:
    """Fingerprint of a key that can be stored and shown: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def caller_for(given: str | None, settings: Settings) -> Caller | None:
    """The caller a key identifies, ``Caller("open")`` when no keys are configured, None for a wrong/missing key."""
    if not settings.auth_enabled:
        return Caller("open")
    if key_is_valid(given, settings.admin_keys):
        return Caller("admin", key_id(given))
    if key_is_valid(given, settings.api_keys):
        return Caller("operator" if settings.admin_keys else "admin", key_id(given))
    return None


def _check(settings: Settings, given: str | None) -> Caller:
    caller = caller_for(given, settings)
    if caller is not None:
        return caller
    if given is None:
        raise Problem(
            401,
            "Missing API key",
            f"send one of the configured keys in the {API_KEY_HEADER} header",
            "unauthorized",
            headers=_CHALLENGE,
        )
    raise Problem(
        401,
        "Invalid API key",
        f"the {API_KEY_HEADER} header does not hold a configured key",
        "unauthorized",
        headers=_CHALLENGE,
    )


def forbid_unless_admin(caller: Caller, action: str) -> None:
    """403 problem when ``caller`` may not do an admin ``action`` (e.g. "change thresholds")."""
    if not caller.is_admin:
        raise Problem(
            403, "Admin key required", f"an operator key cannot {action}; use a DHR_ADMIN_KEYS key", "forbidden"
        )


async def require_api_key(settings: AppSettings, key: str | None = Security(api_key_scheme)) -> Caller:
    """Dependency of the data routes: 401 problem unless the key is valid; the caller (role "open" without keys)."""
    return _check(settings, key)


async def require_admin_key(caller: Caller = Depends(require_api_key)) -> Caller:
    """Dependency of the admin routes (thresholds, references, calibration, deletion): 401, or 403 for an
    operator key."""
    forbid_unless_admin(caller, "change thresholds, references or calibration, or delete")
    return caller


async def require_ops_key(settings: AppSettings, key: str | None = Security(api_key_scheme)) -> None:
    """Dependency of the operational routes: checks the key only with ``DHR_PROTECT_OPS=true``."""
    if settings.protect_ops:
        _check(settings, key)
