"""Decoding uploaded bytes into an image the model can take, with limits against hostile input.

Order of checks (each refuses with an :class:`ImageError` before the next, more expensive, step)::

    empty -> format known (header) -> sides >= 1 -> each side <= max_side -> long/short side <= max_aspect_ratio
          -> width * height <= max_pixels -> container integrity (PNG chunk CRCs, JPEG entropy data complete)
          -> pixel decode -> finite pixel values (float images)

With ``defer_jpeg`` (the device decoder of ``service.engine.device_views``) a JPEG that passed every check up to
the pixel decode and needs no conversion (RGB or grey, no EXIF rotation, not cut) is not decoded here: its bytes go
to the device; Pillow decodes it only if ``DecodedImage.image`` is asked for. Every other upload decodes as above,
and so does every JPEG under ``accept_truncated`` (its lenient decode is Pillow's).

Every full-resolution buffer made later (decode, postprocess) is therefore bounded by ``max_pixels`` and its rows
by ``max_side``. No process-wide state is changed per call: Pillow's own decompression-bomb check is switched off
once, at import, because the limits above replace it (its warning would need a process-wide, thread-unsafe filter
and its error fired at 178 Mpx whatever ``max_pixels`` says).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from service.model.config import Preset
from service.model.preprocess import Views, make_views, prepare_image

Image.MAX_IMAGE_PIXELS = None  # replaced by DecodeLimits, checked from the header before any pixel is decoded

JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageError(ValueError):
    """An upload that is not a usable image. ``kind``: 'unsupported' (not an image format we read), 'corrupt'
    (a known format that fails to decode, is truncated or holds non-finite pixels), 'too_large' (a side or the
    pixel count over its limit), 'bad_shape' (aspect ratio over its limit) or 'empty'."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class DecodeLimits:
    """What an upload may be. ``max_pixels``: width * height; ``max_side``: either side in pixels;
    ``max_aspect_ratio``: long side / short side; ``accept_truncated``: decode JPEGs whose data ends early or
    lacks the end marker (some cameras cut it), the missing part grey, instead of refusing them."""

    max_pixels: int = 40_000_000
    max_side: int = 32_768
    max_aspect_ratio: float = 64.0
    accept_truncated: bool = False

    def check_size(self, width: int, height: int, name: str = "image") -> None:
        """Raise ImageError unless a ``width`` x ``height`` image is within every limit (names the setting)."""
        if width < 1 or height < 1:
            raise ImageError("corrupt", f"{name}: image has no pixels ({width}x{height})")
        if max(width, height) > self.max_side:
            raise ImageError(
                "too_large", f"{name}: {width}x{height} has a side over the limit of {self.max_side} px (DHR_MAX_SIDE)"
            )
        ratio = max(width, height) / min(width, height)
        if ratio > self.max_aspect_ratio:
            raise ImageError(
                "bad_shape",
                f"{name}: {width}x{height} has an aspect ratio of {ratio:.4g}, over the limit of "
                f"{self.max_aspect_ratio:g} (DHR_MAX_ASPECT_RATIO)",
            )
        if width * height > self.max_pixels:
            raise ImageError(
                "too_large",
                f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {self.max_pixels} "
                "(DHR_MAX_PIXELS)",
            )


_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class DecodedImage:
    name: str
    width: int
    height: int
    format: str  # e.g. "JPEG", "PNG", "BMP"
    mode: str  # the file's own Pillow mode
    prepared: Image.Image | None  # L or RGB after prepare_image; None: a checked JPEG whose pixels are ``data``
    data: bytes | None = None  # the JPEG bytes left for the device decoder (``decode_image(defer_jpeg=True)``)

    @cached_property
    def image(self) -> Image.Image:
        """L or RGB after prepare_image (EXIF applied, 16-bit scaled, alpha composited); a deferred JPEG is decoded
        by Pillow here, on first use."""
        if self.prepared is not None:
            return self.prepared
        try:
            img = Image.open(io.BytesIO(self.data))
            img.load()
        except Exception as e:  # noqa: BLE001 - checked already; a decoder that still fails means corrupt data
            raise ImageError(
                "corrupt", f"{self.name}: JPEG data could not be decoded ({type(e).__name__}: {e})"
            ) from None
        return prepare_image(img)

    def rgb(self) -> np.ndarray:
        """(H, W, 3) uint8 for the overlay."""
        return np.asarray(self.image.convert("RGB"))


def _check_png(data: bytes, name: str) -> None:
    """Every chunk's CRC-32 must match and the file must end with IEND (Pillow skips the CRC of pixel data)."""
    pos = len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 12 + length
        if end > len(data):
            break
        kind = data[pos + 4 : pos + 8]
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            raise ImageError("corrupt", f"{name}: PNG chunk {kind!r} at byte {pos} fails its CRC check")
        if kind == b"IEND":
            return
        pos = end
    raise ImageError("corrupt", f"{name}: PNG data is truncated (no IEND chunk)")


def _check_jpeg(data: bytes, name: str, accept_truncated: bool) -> bytes:
    """Decode the entropy data once at 1/8 scale (cheap) and refuse on any libjpeg warning (premature end,
    corrupt data segment). With ``accept_truncated`` a missing end marker is added and warnings are allowed.
    Returns the bytes to decode."""
    if accept_truncated:
        return data if data.endswith(JPEG_EOI) else data + JPEG_EOI
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", fastdct=True, min_factor=8, strict=True)
    except ValueError as e:
        if "colorspace" in str(e).lower() or "unsupported" in str(e).lower():
            return data  # CMYK/YCCK and the like: Pillow decodes them, its own truncation check applies
        raise ImageError(
            "corrupt", f"{name}: JPEG data is truncated or corrupt ({e}); DHR_ACCEPT_TRUNCATED accepts a cut end"
        ) from None
    return data


def _check_finite(img: Image.Image, name: str) -> None:
    if img.mode == "F" and not np.isfinite(np.asarray(img)).all():
        raise ImageError("corrupt", f"{name}: the image holds NaN or infinite pixel values")


def _deferrable(img: Image.Image) -> bool:
    """A JPEG the device decoder reads as Pillow + prepare_image would: RGB or grey, no EXIF rotation."""
    return img.mode in ("RGB", "L") and img.getexif().get(_EXIF_ORIENTATION, 1) == 1


def decode_image(
    data: bytes, name: str = "image", limits: DecodeLimits | None = None, defer_jpeg: bool = False
) -> DecodedImage:
    """Bytes -> DecodedImage; every size limit is checked from the header before any pixel is decoded.

    ``defer_jpeg``: a JPEG that passed every check and needs no conversion is returned undecoded (module doc).
    """
    limits = limits if limits is not None else DecodeLimits()
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
    limits.check_size(w, h, name)
    fmt, mode = img.format or "unknown", img.mode
    if fmt == "PNG":
        _check_png(data, name)
    elif fmt == "JPEG":
        fixed = _check_jpeg(data, name, limits.accept_truncated)
        if fixed is not data:
            img = Image.open(io.BytesIO(fixed))
        elif defer_jpeg and not limits.accept_truncated and _deferrable(img):  # lenient decodes stay Pillow's
            return DecodedImage(name, w, h, fmt, mode, None, data)
    try:
        img.load()
        _check_finite(img, name)
        prepared = prepare_image(img)
        prepared.load()
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or malformed data
        raise ImageError("corrupt", f"{name}: {fmt} data could not be decoded ({type(e).__name__}: {e})") from None
    limits.check_size(prepared.width, prepared.height, name)  # EXIF rotation swaps sides only; still checked
    return DecodedImage(name, prepared.width, prepared.height, fmt, mode, prepared)


def views_for(decoded: DecodedImage, preset: Preset) -> Views:
    return make_views(decoded.image, preset)
