"""Dataset readers (MVTec AD tree, VisA split csv, AnomalyCLIP/DHR-CLIP meta.json) and ground-truth masks."""

from service.data.datasets import (
    DatasetError,
    Sample,
    build_meta,
    load_dataset,
    load_mask,
    parse_classes,
    read_image,
    write_meta_json,
)

__all__ = [
    "DatasetError",
    "Sample",
    "build_meta",
    "load_dataset",
    "load_mask",
    "parse_classes",
    "read_image",
    "write_meta_json",
]
