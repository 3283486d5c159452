"""``dhrclip export --format onnx|openvino-int8 --preset P --precision fp32|fp16 --out DIR``.

Loads the torch model by the shared weight rule, then writes the graph and its sidecar (``service.engine.export``).
``openvino-int8`` also calibrates NNCF's post-training quantisation on good images: the stored references of
``--product`` when it has any (read through the storage layer: ``--database-url`` / ``--data-dir`` /
``--artefact-url``, by default the service's ``DHR_DATABASE_URL`` / ``DHR_DATA_DIR`` / ``DHR_ARTEFACT_URL``), else
the folder ``--calibration``. INT8 quantises an fp32 ONNX export: ``--from DIR`` (one export, then an INT8 model per
product, no torch model loaded), else one made first.
Serve the result with ``DHR_BACKEND=onnxruntime|openvino|tensorrt DHR_EXPORT_DIR=DIR`` (or ``--backend`` /
``--export-dir`` on ``predict`` and ``evaluate``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from service.cli_options import add_model_arguments, load_model_from_args
from service.errors import UserError, check_out_folder

FORMATS = ("onnx", "openvino-int8")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="onnx graph, or INT8 OpenVINO IR")
    parser.add_argument("--out", required=True, help="output directory (graph + dhr_export.json)")
    cal = parser.add_argument_group("INT8 calibration (good images)")
    cal.add_argument(
        "--from",
        dest="from_export",
        default=None,
        help="quantise this fp32 ONNX export (no torch model loaded; default: export the model first)",
    )
    cal.add_argument("--product", default=None, help="calibrate on this product's stored reference images")
    cal.add_argument("--calibration", default=None, help="folder of good images (without --product, or its fallback)")
    cal.add_argument("--calibration-limit", type=int, default=64, help="at most this many calibration images")
    cal.add_argument(
        "--data-dir",
        default=os.environ.get("DHR_DATA_DIR", "./data"),
        help="the service's data directory, where references live (default: $DHR_DATA_DIR, else ./data)",
    )
    cal.add_argument(
        "--artefact-url",
        default=os.environ.get("DHR_ARTEFACT_URL"),
        help="the service's artefact store holding the references (default: $DHR_ARTEFACT_URL, else --data-dir)",
    )
    cal.add_argument(
        "--database-url",
        default=os.environ.get("DHR_DATABASE_URL"),
        help="the service's database (default: $DHR_DATABASE_URL, else SQLite in --data-dir)",
    )
    add_model_arguments(parser, precision_help="graph precision: fp32 or fp16 (default fp32)", precision_default="fp32")


def product_samples(args: argparse.Namespace) -> tuple[list[tuple[str, bytes]], dict]:
    """``(name, bytes)`` of up to ``--calibration-limit`` references of ``--product`` (oldest first), read through
    the store, and where they came from; no samples when the product has none. An unknown product is refused."""
    from service.storage import StorageUnavailableError, open_artefact_store, open_store
    from service.storage.artefacts import ArtefactMissingError, ArtefactStoreError
    from service.storage.store import default_database_url

    data_dir = Path(args.data_dir)
    if not args.database_url and not (data_dir / "inspections.db").is_file():
        raise UserError(f"{data_dir / 'inspections.db'}: no service database there (--data-dir / --database-url)")
    try:
        artefacts = open_artefact_store(args.artefact_url, data_dir)
        store = open_store(args.database_url or default_database_url(data_dir), artefacts)
    except (StorageUnavailableError, ArtefactStoreError, ValueError) as e:
        raise UserError(str(e)) from None
    try:
        if store.get_product(args.product) is None:
            raise UserError(f"--product {args.product}: no such product in the service's database")
        refs = store.list_references(args.product, limit=args.calibration_limit)
        samples = []
        for ref in refs:
            try:
                samples.append(
                    (f"reference {ref.id} ({ref.filename}) of {args.product}", store.read_reference_image(ref.id))
                )
            except (ArtefactMissingError, ArtefactStoreError) as e:
                raise UserError(
                    f"reference {ref.id} of {args.product}: image unreadable in {artefacts.location} ({e})"
                ) from None
    finally:
        store.close()
    return samples, {"kind": "product", "product": args.product, "references": [r.id for r in refs]}


def calibration_samples(args: argparse.Namespace) -> tuple[list[tuple[str, bytes]], dict]:
    """The product's references when it has some, else the ``--calibration`` folder (one line when neither)."""
    from service.engine.quantize import folder_samples

    if args.product is not None:
        samples, source = product_samples(args)
        if samples:
            return samples, source
        if not args.calibration:
            raise UserError(f"--product {args.product} has no reference images; add some or give --calibration FOLDER")
        print(f"product {args.product} has no reference images: calibrating on {args.calibration}")
    elif not args.calibration:
        raise UserError("--format openvino-int8 needs --product NAME (its references) or --calibration FOLDER")
    return folder_samples(args.calibration, args.calibration_limit), {"kind": "folder", "folder": args.calibration}


def run_export(args: argparse.Namespace) -> int:
    if args.calibration_limit < 1:
        raise UserError(f"--calibration-limit must be >= 1, got {args.calibration_limit}")
    check_out_folder("--out", args.out)
    if args.format == "onnx":
        if args.product or args.calibration or args.from_export:
            raise UserError("--product / --calibration / --from make --format openvino-int8; onnx takes none of them")
        from service.engine.export import export_model

        print(f"wrote {export_model(*load_model_from_args(args), Path(args.out))}")
        return 0
    samples, source = calibration_samples(args)  # before the model loads: a wrong name fails at once
    side = quantize_export(args, samples, source)
    print(f"calibrated on {len(samples)} image(s) of {source.get('product') or source.get('folder')}")
    print(f"wrote {side}")
    return 0


def quantize_export(args: argparse.Namespace, samples: list[tuple[str, bytes]], source: dict) -> Path:
    """INT8 of ``--from`` (checked against --backbone / --prompts when named), else of a fresh fp32 export."""
    from service.engine.backends import check_identity
    from service.engine.export import export_model, read_export
    from service.engine.quantize import export_int8

    if args.from_export:
        exp = read_export(args.from_export, args.preset)
        check_identity(exp, args.backbone, args.prompts)
        return export_int8(exp, Path(args.out), samples, source)
    if args.precision != "fp32":
        raise UserError(f"--precision {args.precision}: INT8 is calibrated from the fp32 graph; use fp32")
    with tempfile.TemporaryDirectory() as tmp:
        export_model(*load_model_from_args(args), Path(tmp))
        return export_int8(read_export(tmp, args.preset), Path(args.out), samples, source)
