"""Decoding uploaded bytes into an image the model can take, with limits against hostile input."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.model.config import Preset
from service.model.preprocess import Views, make_views, prepare_image


class ImageError(ValueError):
    """An upload that is not a usable image. ``kind``: 'unsupported' (not an image format we read), 'corrupt'
    (a known format that fails to decode), 'too_large' (over the pixel limit) or 'empty'."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class DecodedImage:
    name: str
    width: int
    height: int
    format: str  # e.g. "JPEG", "PNG", "BMP"
    mode: str  # the file's own Pillow mode
    image: Image.Image  # L or RGB after prepare_image (EXIF applied, 16-bit scaled, alpha composited)

    def rgb(self) -> np.ndarray:
        """(H, W, 3) uint8 for the overlay."""
        return np.asarray(self.image.convert("RGB"))


def decode_image(data: bytes, name: str = "image", max_pixels: int = 40_000_000) -> DecodedImage:
    """Bytes -> DecodedImage; the pixel count is checked from the header before any pixel is decoded."""
    if not data:
        raise ImageError("empty", f"{name}: empty upload")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(
            "unsupported", f"{name}: not an image format this service reads (JPEG, PNG, BMP, TIFF, WebP, ...)"
        ) from None
    except Exception as e:  # noqa: BLE001 - any header failure is a bad upload
        raise ImageError("corrupt", f"{name}: cannot read the image header ({e})") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError("corrupt", f"{name}: image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError("too_large", f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    fmt, mode = img.format or "unknown", img.mode
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            prepared = prepare_image(img)
            prepared.load()
    except Exception as e:  # noqa: BLE001 - truncated or malformed data
        raise ImageError("corrupt", f"{name}: {fmt} data could not be decoded ({type(e).__name__}: {e})") from None
    return DecodedImage(name, prepared.width, prepared.height, fmt, mode, prepared)


def views_for(decoded: DecodedImage, preset: Preset) -> Views:
    return make_views(decoded.image, preset)
