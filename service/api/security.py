"""API keys: ``X-API-Key`` must equal one of ``DHR_API_KEYS`` when that list is not empty.

The inspection, product and segmentation routes always require a key (when keys are configured); the operational
routes (/health, /livez, /readyz, /metrics) only with ``DHR_PROTECT_OPS=true``, so probes and scrapers keep working
without credentials by default. Keys are compared in constant time; a missing and a wrong key both give 401
with ``WWW-Authenticate: ApiKey header="X-API-Key"`` and neither the key nor its length is logged.
"""

from __future__ import annotations

import hmac

from fastapi import Security
from fastapi.security import APIKeyHeader

from .deps import AppSettings
from .problems import Problem

API_KEY_HEADER = "X-API-Key"
_CHALLENGE = {"WWW-Authenticate": f'ApiKey header="{API_KEY_HEADER}"'}

# Declared for the OpenAPI document ("Authorize" button); auto_error=False so the check below answers the 401.
api_key_scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="one of DHR_API_KEYS")


def key_is_valid(given: str | None, keys: list[str]) -> bool:
    """True when ``given`` equals one of ``keys``; every key is compared (constant time per key)."""
    if not given:
        return False
    given_b = given.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given_b, key.encode())
    return matched


def _check(keys: list[str], given: str | None) -> None:
    if not keys:
        return
    if given is None:
        raise Problem(
            401,
            "Missing API key",
            f"send one of the configured keys in the {API_KEY_HEADER} header",
            "unauthorized",
            headers=_CHALLENGE,
        )
    if not key_is_valid(given, keys):
        raise Problem(
            401,
            "Invalid API key",
            f"the {API_KEY_HEADER} header does not hold a configured key",
            "unauthorized",
            headers=_CHALLENGE,
        )


async def require_api_key(settings: AppSettings, key: str | None = Security(api_key_scheme)) -> None:
    """Dependency of the data routes: 401 problem unless the key is valid (no-op when auth is off)."""
    _check(settings.api_keys, key)


async def require_ops_key(settings: AppSettings, key: str | None = Security(api_key_scheme)) -> None:
    """Dependency of the operational routes: checks the key only with ``DHR_PROTECT_OPS=true``."""
    if settings.protect_ops:
        _check(settings.api_keys, key)
