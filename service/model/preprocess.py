"""Image normalisation and the DHR views, as uint8 arrays (PIL resizes, for bit parity with the reference).

Pipeline (spec B §1, Part A item 10): mode fix-up -> squash-resize to T x T (PIL default filter, bicubic) ->
whole view = T x T resized to S x S -> four P x P crops at offsets (0, T - P) -> RGB. Normalisation to the
OpenAI mean/std happens on the device (:func:`normalize`).

:func:`make_views_torch` is the same pipeline as torch ops on a uint8 tensor on any device (the GPU path of the
service): bicubic with a = -0.5, antialiased when shrinking, as Pillow's filter, in float32 with rounding after each
resize where Pillow uses fixed-point arithmetic. Measured against :func:`make_views` (tests/test_device_views.py):
at most a few grey levels apart, mean under 0.1 level; the CPU path stays Pillow's.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .config import Preset

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class Views(NamedTuple):
    """uint8 numpy arrays (:func:`make_views`) or tensors on the model's device (:func:`make_views_torch`)."""

    whole: np.ndarray | torch.Tensor  # (S, S, 3) uint8
    crops: np.ndarray | torch.Tensor  # (4, P, P, 3) uint8, row-major: top-left, top-right, bottom-left, bottom-right


def prepare_image(img: Image.Image) -> Image.Image:
    """An ``L`` or ``RGB`` image from any Pillow mode (Part A item 10); 8-bit L and RGB pass through unchanged.

    EXIF orientation is applied; 16-bit grey is scaled by 1/257 (never clipped); alpha is composited on black;
    palette, CMYK, YCbCr, 1-bit images become RGB or L.
    """
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F" or (mode == "I" and arr.max() > 65535):
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        else:
            arr = arr / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        out = Image.alpha_composite(black, rgba).convert("RGB")
        return out.convert("L") if mode in ("LA", "La") else out
    if mode == "1":
        return img.convert("L")
    return img.convert("RGB")


def make_views(img: Image.Image, preset: Preset) -> Views:
    """Whole view and four crops of an image prepared by :func:`prepare_image`."""
    s, p, t = preset.image_size, preset.crop_size, preset.target_size
    squashed = img.resize((t, t))  # PIL default filter: bicubic for L/RGB, antialiased
    whole = squashed if s == t else squashed.resize((s, s), Image.Resampling.BICUBIC)
    offs = preset.crop_offsets
    crops = [squashed.crop((x0, y0, x0 + p, y0 + p)) for y0 in offs for x0 in offs]
    return Views(np.asarray(whole.convert("RGB")), np.stack([np.asarray(c.convert("RGB")) for c in crops]))


def resize_u8(img: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) uint8 -> (C, size, size) uint8: Pillow's bicubic (a = -0.5, support scaled by the shrink factor)
    computed in float32, rounded and clamped."""
    x = F.interpolate(img.unsqueeze(0).float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


def make_views_torch(img: torch.Tensor, preset: Preset) -> Views:
    """(C, H, W) uint8 tensor, C = 1 (grey) or 3 (RGB), on any device -> :class:`Views` of tensors on that device:
    whole (S, S, 3) and crops (4, P, P, 3) uint8, as :func:`make_views` cuts them."""
    s, p, t = preset.image_size, preset.crop_size, preset.target_size
    squashed = resize_u8(img, t)
    whole = squashed if s == t else resize_u8(squashed, s)
    offs = preset.crop_offsets
    crops = torch.stack([squashed[:, y0 : y0 + p, x0 : x0 + p] for y0 in offs for x0 in offs])  # (4, C, P, P)
    c = img.shape[0]
    return Views(
        whole.expand(3, s, s).permute(1, 2, 0) if c == 1 else whole.permute(1, 2, 0),
        crops.expand(4, 3, p, p).permute(0, 2, 3, 1) if c == 1 else crops.permute(0, 2, 3, 1),
    )


def load_views(img: Image.Image, preset: Preset) -> Views:
    return make_views(prepare_image(img), preset)


def stack_views(views: list[Views], pin: bool = False, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch for :class:`~service.model.DHRCLIP`: whole (B, S, S, 3) and crops (B, 4, P, P, 3) uint8 tensors.

    Numpy views are stacked on the host, into page-locked memory with ``pin`` (a CUDA model then copies them
    without blocking); tensor views are stacked where they are (every view of a batch on one device). ``rows``
    (>= B): the batch padded to that many rows by repeating the last image (bucketed sizes of a compiled tower).
    """
    n = len(views)
    rows = n if rows is None else max(rows, n)
    out = []
    for k in Views._fields:
        parts = [getattr(v, k) for v in views]
        if any(isinstance(x, torch.Tensor) for x in parts):
            dev = next(x.device for x in parts if isinstance(x, torch.Tensor))
            host = [torch.from_numpy(x.copy()) if isinstance(x, np.ndarray) else x for x in parts]
            batch = torch.stack([x.to(dev) for x in host])
            buf = torch.cat([batch, batch[-1:].expand(rows - n, *batch.shape[1:])]) if rows > n else batch
        else:
            buf = torch.empty((rows, *parts[0].shape), dtype=torch.uint8, pin_memory=pin)
            np.stack(parts, out=buf.numpy()[:n])
            buf[n:] = buf[n - 1]
        out.append(buf)
    return tuple(out)


def normalize(u8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) normalised float: (x / 255 - mean) / std, as ToTensor + Normalize."""
    x = u8.movedim(-1, -3).to(torch.float32).div(255.0)
    mean = torch.tensor(OPENAI_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=x.device).view(3, 1, 1)
    return x.sub(mean).div(std).to(dtype)
