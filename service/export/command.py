"""``dhrclip export --format onnx|openvino-int8 --preset P --precision fp32|fp16 --out DIR``.

Loads the torch model by the shared weight rule, then writes the graph and its sidecar (``service.engine.export``);
``openvino-int8`` also calibrates NNCF's post-training quantisation on ``--calibration``, a folder of good images.
Serve the result with ``DHR_BACKEND=onnxruntime|openvino|tensorrt DHR_EXPORT_DIR=DIR`` (or ``--backend`` /
``--export-dir`` on ``predict`` and ``evaluate``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from service.cli_options import add_model_arguments, load_model_from_args
from service.errors import UserError

FORMATS = ("onnx", "openvino-int8")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="onnx graph, or INT8 OpenVINO IR")
    parser.add_argument("--out", required=True, help="output directory (graph + dhr_export.json)")
    parser.add_argument("--calibration", default=None, help="folder of good images (openvino-int8 calibration)")
    parser.add_argument("--calibration-limit", type=int, default=64, help="at most this many calibration images")
    add_model_arguments(parser, precision_help="graph precision: fp32 or fp16 (default fp32)", precision_default="fp32")


def run_export(args: argparse.Namespace) -> int:
    from service.engine.export import export_model
    from service.engine.quantize import export_int8

    if args.format == "openvino-int8" and not args.calibration:
        raise UserError("--format openvino-int8 needs --calibration FOLDER of good images")
    if args.calibration_limit < 1:
        raise UserError(f"--calibration-limit must be >= 1, got {args.calibration_limit}")
    model, info = load_model_from_args(args)
    out = Path(args.out)
    if args.format == "onnx":
        side = export_model(model, info, out)
    else:
        side = export_int8(model, info, out, args.calibration, args.calibration_limit)
    print(f"wrote {side}")
    return 0
