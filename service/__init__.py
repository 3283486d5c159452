"""DHR-CLIP industrial inspection service."""

__version__ = "0.1.0"
