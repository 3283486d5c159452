"""The HTTP service (the only FastAPI code): app factory, routes, problem+json errors, metrics, API keys.

``create_app(settings)`` builds an app; ``service.api.server`` runs it (``serve``, ``dhrclip serve``).
"""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
