"""``dhrclip``: one command, sub-commands serve, predict, train, evaluate, weights, data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.model import BackboneError, CheckpointError

USER_ERRORS: tuple[type[Exception], ...] = (BackboneError, CheckpointError, FileNotFoundError, ValueError)


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone",
        default="openai",
        help="CLIP weights: a file (OpenAI .pt, TorchScript, open_clip checkpoint) or 'openai' (cache)",
    )
    p.add_argument("--prompts", default="ensemble", help="prompt checkpoint file or directory, or 'ensemble'")
    p.add_argument("--preset", default="mvtec", choices=["mvtec", "visa", "fast"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--allow-download", action="store_true", help="let open_clip download 'openai' weights")


def _cmd_predict(args) -> int:
    from service.engine.predict import PredictOptions, predict_files
    from service.model import load_model

    model, info = load_model(
        args.backbone,
        args.prompts,
        preset=args.preset,
        device=args.device,
        precision=args.precision,
        allow_download=args.allow_download,
    )
    opts = PredictOptions(
        Path(args.out),
        save_maps=args.save_maps,
        batch_size=args.batch_size,
        image_threshold=args.threshold,
        pixel_threshold=args.pixel_threshold,
        image_score=args.image_score,
    )
    failures = predict_files([Path(p) for p in args.images], model, info, opts)
    return 1 if failures else 0


def _cmd_weights_import(args) -> int:
    from service.model import import_reference

    out = import_reference(args.src, args.out)
    print(f"wrote {out}")
    return 0


def _cmd_data_index(args) -> int:
    from service.data.datasets import write_meta_json

    print(f"wrote {write_meta_json(Path(args.root), Path(args.out) if args.out else None)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dhrclip", description="DHR-CLIP industrial inspection service")
    sub = parser.add_subparsers(dest="command", required=True)

    from service.api.server import add_serve_arguments, run_serve

    p = sub.add_parser("serve", help="start the HTTP service")
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)

    p = sub.add_parser("predict", help="score image files offline")
    p.add_argument("images", nargs="+", help="image files")
    _add_model_arguments(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--save-maps", action="store_true", help="also write <stem>.maps.npz (T x T float32 maps)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threshold", type=float, default=0.5, help="image threshold for the verdict")
    p.add_argument("--pixel-threshold", type=float, default=0.5, help="mask threshold on the anomaly map")
    p.add_argument("--image-score", default="reference", choices=["reference", "map_max", "map_topk"])
    p.set_defaults(func=_cmd_predict)

    from service.train.command import add_train_arguments, run_train

    p = sub.add_parser("train", help="train prompt weights on an auxiliary dataset")
    add_train_arguments(p)
    p.set_defaults(func=run_train)

    from service.evaluate.command import add_evaluate_arguments, run_evaluate

    p = sub.add_parser("evaluate", help="measure a checkpoint with the paper's metrics")
    add_evaluate_arguments(p)
    p.set_defaults(func=run_evaluate)

    weights = sub.add_parser("weights", help="weight files").add_subparsers(dest="weights_command", required=True)
    p = weights.add_parser("import", help="convert a reference {'prompt_learner': ...} .pth into our format")
    p.add_argument("src")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_cmd_weights_import)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("index", help="write meta.json for an MVTec-style folder tree")
    p.add_argument("root")
    p.add_argument("--out", default=None, help="where to write (default: ROOT/meta.json)")
    p.set_defaults(func=_cmd_data_index)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"dhrclip {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
