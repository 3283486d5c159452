"""``dhrclip``: one command, sub-commands serve, predict, export, train, evaluate, weights, data."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from service.errors import UserError
from service.runtime import apply_thread_policy

# name, help, module, its (add arguments, run) functions
COMMANDS = (
    ("serve", "start the HTTP service", "service.api.server", "add_serve_arguments", "run_serve"),
    ("predict", "score image files offline", "service.predict.command", "add_predict_arguments", "run_predict"),
    (
        "export",
        "export the vision path for ONNX Runtime / OpenVINO / TensorRT",
        "service.export.command",
        "add_export_arguments",
        "run_export",
    ),
    (
        "train",
        "train prompt weights on an auxiliary dataset",
        "service.train.command",
        "add_train_arguments",
        "run_train",
    ),
    (
        "evaluate",
        "measure a checkpoint with the paper's metrics",
        "service.evaluate.command",
        "add_evaluate_arguments",
        "run_evaluate",
    ),
)


def _cmd_weights_import(args) -> int:
    from service.model import import_reference

    out = import_reference(args.src, args.out)
    print(f"wrote {out}")
    return 0


def _cmd_data_index(args) -> int:
    from service.data.datasets import build_meta, empty_masks, write_meta_json

    root = Path(args.root).expanduser().absolute()
    meta = build_meta(root)
    print(f"wrote {write_meta_json(root, Path(args.out) if args.out else None, meta)}")
    empty = empty_masks(root, meta)
    if empty:
        names = ", ".join(p.relative_to(root).as_posix() for p in empty)
        print(f"dhrclip data index: warning: {len(empty)} defect image(s) with an empty mask: {names}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dhrclip", description="DHR-CLIP industrial inspection service")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, help_text, module, add_arguments, run in COMMANDS:
        command = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text)
        getattr(command, add_arguments)(p)
        p.set_defaults(func=getattr(command, run))

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
        apply_thread_policy()  # the same policy as the service; before any sub-command imports torch
        return int(args.func(args) or 0)
    except UserError as e:  # anything else is a bug: its traceback is shown
        print(f"dhrclip {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
