"""Views made on the model's device: the decoded image (or a JPEG's bytes) goes to the device, torch cuts the views.

The checks of ``decode_image`` (size limits, container integrity, every refusal of a hostile upload) have run on the
CPU before anything here touches the device. Then, per image (``DHR_PREPROCESS``, :data:`~.options.PREPROCESS`)::

    device-decode, deferred JPEG:  bytes -> torchvision.io.decode_jpeg on the device (nvJPEG on CUDA) -> (3, H, W)
    otherwise:                     Pillow image -> page-locked host buffer -> non-blocking copy -> (C, H, W)
    then                           make_views_torch: bicubic squash to T, whole view S, four P crops (uint8, on device)

Normalisation stays where it is for every path, on the device in ``DHRCLIP.encode_views``. On a CPU "device" the
same code runs on CPU tensors (how the tests check it against the Pillow path); pinning needs CUDA and is skipped.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from service.model.config import Preset
from service.model.preprocess import Views, make_views_torch

from .decode import DecodedImage, ImageError


def resolve_preprocess(mode: str, device: torch.device | str) -> str:
    """``auto`` -> ``device-decode`` for a CUDA model, else ``cpu``; other modes as given."""
    if mode != "auto":
        return mode
    return "device-decode" if torch.device(device).type == "cuda" else "cpu"


class DeviceViews:
    """``views(decoded) -> Views`` of uint8 tensors on ``device``; ``decode_jpegs``: deferred JPEGs are decoded there.

    Called from the engine's thread pool. JPEG decodes on one device are serialised (one decoder state per device).
    """

    def __init__(self, device: torch.device | str, preset: Preset, decode_jpegs: bool):
        self.device = torch.device(device)
        self.preset = preset
        self.decode_jpegs = decode_jpegs
        self.pin = self.device.type == "cuda"
        self._jpeg_lock = threading.Lock()

    def __call__(self, decoded: DecodedImage) -> Views:
        if decoded.prepared is None and self.decode_jpegs:
            pixels = self._decode_jpeg(decoded)
        else:
            pixels = self.upload(decoded.image)
        return make_views_torch(pixels, self.preset)

    def upload(self, image) -> torch.Tensor:
        """A Pillow L/RGB image -> (C, H, W) uint8 on the device, through a page-locked buffer on CUDA."""
        if not self.pin:
            host = torch.from_numpy(np.array(image))  # a writable copy
            hwc = host.to(self.device)
        else:
            arr = np.asarray(image)
            host = torch.empty(arr.shape, dtype=torch.uint8, pin_memory=True)
            host.numpy()[...] = arr
            hwc = host.to(self.device, non_blocking=True)
        return hwc.unsqueeze(0) if hwc.ndim == 2 else hwc.permute(2, 0, 1)

    def _decode_jpeg(self, decoded: DecodedImage) -> torch.Tensor:
        """The checked JPEG's bytes -> (3, H, W) uint8 on the device (grey replicated, as Pillow's convert("RGB"))."""
        from torchvision.io import ImageReadMode, decode_jpeg

        data = torch.frombuffer(bytearray(decoded.data), dtype=torch.uint8)
        try:
            with self._jpeg_lock:
                pixels = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as e:
            raise ImageError(
                "corrupt", f"{decoded.name}: JPEG data could not be decoded on {self.device} ({e})"
            ) from None
        if tuple(pixels.shape) != (3, decoded.height, decoded.width):
            raise ImageError(
                "corrupt",
                f"{decoded.name}: JPEG decoded to {pixels.shape[2]}x{pixels.shape[1]}, its header says "
                f"{decoded.width}x{decoded.height}",
            )
        return pixels
