"""Browser-viewable pictures of stored uploads (reference images, inspection originals): JPEG through the engine's
decoder.

An upload is kept exactly as sent (16-bit TIFF, CMYK JPEG, PNG with alpha, ...), which a browser may not show.
The console shows it as the model saw it: ``decode_image`` (the service's limits; EXIF orientation applied, 16-bit
scaled, alpha composited) then RGB, optionally scaled so that the long side is at most ``size`` pixels, as JPEG.
"""

from __future__ import annotations

import io

from service.engine.decode import DecodeLimits, decode_image

from ..settings import Settings

PREVIEW_QUALITY = 85
GALLERY_SIZE = 128  # reference thumbnails: the gallery shows them 64 CSS pixels high, at twice the pixel density
GALLERY_THUMB = "thumb.jpg"  # their cached name beside the reference's bytes
ORIGINAL_SIZE = 1280  # the inspection page's base layer: 640 CSS pixels wide at twice the pixel density
ORIGINAL_PREVIEW = "original.jpg"  # its cached name beside the record's artefacts


def limits_of(settings: Settings) -> DecodeLimits:
    return DecodeLimits(settings.max_pixels, settings.max_side, settings.max_aspect_ratio, settings.accept_truncated)


def jpeg_preview(data: bytes, name: str, settings: Settings, size: int | None = None) -> bytes:
    """JPEG bytes of the uploaded ``data`` (long side <= ``size`` when given); raises the decoder's ImageError."""
    img = decode_image(data, name, limits_of(settings)).image.convert("RGB")
    if size is not None:
        img.thumbnail((size, size))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=PREVIEW_QUALITY)
    return out.getvalue()
