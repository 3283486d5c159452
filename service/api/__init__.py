"""The HTTP service (the only FastAPI code): app factory, routes, problem+json errors, metrics, API keys.

``create_app(settings)`` builds an app; ``service.api.server`` runs it (``serve``, ``dhrclip serve``). Both names
load FastAPI on first use (``service/lazy.py``), so that ``dhrclip`` can define its ``serve`` options cheaply.
"""

from service.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, globals(), {".app": ("create_app",), ".settings": ("Settings",)})

__all__ = ["Settings", "create_app"]
