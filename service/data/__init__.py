"""Dataset readers (MVTec AD tree, VisA split csv, AnomalyCLIP/DHR-CLIP meta.json) and ground-truth masks.

The names load ``datasets`` (numpy, PIL) on first use (``service/lazy.py``); ``splits`` is standard library only.
"""

from service.lazy import lazy_exports

_LAZY = {
    ".datasets": (
        "DatasetError",
        "Sample",
        "balance_warning",
        "build_meta",
        "empty_masks",
        "load_dataset",
        "load_mask",
        "parse_classes",
        "read_image",
        "stratified_indices",
        "write_meta_json",
    ),
}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)

__all__ = [name for names in _LAZY.values() for name in names]
