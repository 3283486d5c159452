"""INT8 post-training quantisation of the exported vision path for the CPU (OpenVINO + NNCF).

Calibration runs good images (a product's stored references, or a folder) through the service's own decode -> views
path. NNCF's transformer mode applies
SmoothQuant to the MatMuls (alpha 0.95): CLIP ViT-L activations carry a few outlier channels whose int8 range
otherwise swallows every other channel (published collapse of CLIP ViT-L int8 activations); SmoothQuant moves that
range into the weights, ``x W = (x / s) (s W)`` with ``s_j = max|x_j|^a / max|W_j|^(1 - a)`` per input channel.
The result is an OpenVINO IR (``dhr_vision_int8.xml`` + ``.bin``) with the usual sidecar, run by the openvino
backend only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from service.model import Preset
from service.model.preprocess import normalize, stack_views

from .decode import ImageError, decode_image, views_for
from .export import Exported, ExportError, derived_sidecar

INT8_GRAPH = "dhr_vision_int8.xml"
Sample = tuple[str, bytes]  # (name for messages, encoded image bytes)
SMOOTH_QUANT_ALPHA = 0.95


def calibration_images(folder: str | Path, limit: int) -> list[Path]:
    """Up to ``limit`` image files under ``folder`` (recursively, sorted; hidden files skipped): the suffixes that
    Pillow opens."""
    root = Path(folder)
    if not root.is_dir():
        raise ExportError(f"{root}: calibration folder not found")
    suffixes = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")
    )
    if not files:
        raise ExportError(f"{root}: no image files to calibrate with")
    return files[:limit]


def folder_samples(folder: str | Path, limit: int) -> list[Sample]:
    """``(name, encoded bytes)`` of up to ``limit`` images of ``folder`` (:func:`calibration_images`)."""
    return [(str(p), p.read_bytes()) for p in calibration_images(folder, limit)]


def calibration_views(samples: list[Sample], preset: Preset) -> list[dict[str, np.ndarray]]:
    """Graph inputs of each ``(name, bytes)`` image: whole (1, 3, S, S) and crops (1, 4, 3, P, P) normalised
    float32, decoded and cut by the service's own path (default decode limits)."""
    out = []
    for name, data in samples:
        try:
            views = views_for(decode_image(data, name), preset)
        except ImageError as e:
            raise ExportError(f"{name}: cannot use it for calibration ({e})") from None
        whole, crops = stack_views([views])
        out.append({"whole": normalize(whole).numpy(), "crops": normalize(crops).numpy()})
    return out


def quantize_graph(onnx_path: Path, items: list[dict[str, np.ndarray]], out_xml: Path, smooth_quant: bool = True):
    """NNCF post-training INT8 (weights symmetric, activations asymmetric) of an ONNX graph into an OpenVINO IR."""
    import nncf
    import openvino as ov

    from .backends import require

    require("openvino")
    model = ov.Core().read_model(str(onnx_path))
    alpha = SMOOTH_QUANT_ALPHA if smooth_quant else -1.0
    quantized = nncf.quantize(
        model,
        nncf.Dataset(items),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(items),
        advanced_parameters=nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=alpha)
        ),
    )
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    return {"kind": "int8", "method": "nncf", "smooth_quant_alpha": alpha, "calibration_images": len(items)}


def export_int8(exp: Exported, out_dir: Path, samples: list[Sample], source: dict, smooth_quant: bool = True) -> Path:
    """The fp32 ONNX export ``exp`` -> NNCF INT8 calibrated on ``samples`` (good images) -> ``out_dir`` IR + sidecar
    (``exp``'s model, preset and text features); returns the sidecar path.

    ``source`` says where the samples came from (``{"kind": "folder", "folder": ...}`` or ``{"kind": "product",
    ...}``); it is recorded in the sidecar's ``quantization``."""
    if exp.graph_format != "onnx" or exp.precision != "fp32" or exp.quantization is not None:
        raise ExportError(f"{exp.graph}: INT8 is calibrated from an fp32 ONNX export (dhrclip export --format onnx)")
    if not samples:
        raise ExportError("no images to calibrate with")
    items = calibration_views(samples, exp.cfg.preset)
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / INT8_GRAPH
    quant = quantize_graph(exp.graph, items, xml, smooth_quant)
    quant["calibration_source"] = source
    return derived_sidecar(exp, out_dir, xml, quant, extra_files=(xml.with_suffix(".bin"),))
