"""Dataset readers (MVTec AD tree, VisA split csv, AnomalyCLIP/DHR-CLIP meta.json) and ground-truth masks."""

from service.data.datasets import (
    DatasetError,
    Sample,
    balance_warning,
    build_meta,
    empty_masks,
    load_dataset,
    load_mask,
    parse_classes,
    read_image,
    stratified_indices,
    write_meta_json,
)

__all__ = [
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
]
