"""``dhrclip train``: argument parsing and the run, for ``service/cli.py`` to mount as a sub-command.

Example (the paper's cross-dataset protocol trains on the auxiliary dataset's *test* split, which has masks)::

    dhrclip train --data /data/visa --preset visa --out runs/visa_prompts
    dhrclip train --data /data/visa --preset visa --out runs/visa_prompts --epochs 20 --resume

User errors (a bad dataset folder or image, an unreadable backbone, a run that cannot resume) are printed as one
line ``dhrclip train: error: <file>: <what is wrong>`` on stderr and :func:`run_train` returns 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.cli_options import add_model_arguments
from service.data.splits import SPLITS
from service.errors import check_out_folder
from service.model.config import LAYER_FEATURES, DHRConfig, get_preset

from .settings import FEATURE_DTYPE_NAMES, TrainError, TrainSettings


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dhrclip train`` (defaults = the reference's training recipe, spec B §5.4)."""
    d = TrainSettings()
    io = parser.add_argument_group("data and output")
    io.add_argument("--data", required=True, help="dataset root (meta.json, VisA split_csv or MVTec tree)")
    io.add_argument("--out", required=True, help="folder for epoch_NNN.safetensors checkpoints")
    io.add_argument(
        "--split",
        choices=SPLITS,
        default="test",
        help="split to train on (default test: the auxiliary dataset's test images carry masks)",
    )
    io.add_argument("--classes", default=None, help="comma-separated class names (default: all)")
    io.add_argument(
        "--limit", type=int, default=None, help="N images per class, defective and good in their proportions (--seed)"
    )
    io.add_argument("--resume", action="store_true", help="continue from the newest epoch checkpoint in --out")
    add_model_arguments(
        parser,
        prompts=False,
        precision_help="frozen vision tower precision for feature extraction (text: fp32; default fp32)",
        precision_default="fp32",
    )
    model = parser.add_argument_group("prompts")
    model.add_argument(
        "--layer-features",
        choices=LAYER_FEATURES,
        default="final",
        help="'final': every layer reads y^24 (reference); 'per_layer': true y^6/12/18/24",
    )
    model.add_argument("--n-ctx", type=int, default=d.n_ctx, help="learned context tokens per prompt")
    model.add_argument("--depth", type=int, default=d.depth, help="text blocks 1..depth-1 get deep prompts")
    model.add_argument("--t-n-ctx", type=int, default=d.t_n_ctx, help="tokens per deep prompt")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=d.epochs)
    opt.add_argument("--batch-size", type=int, default=d.batch_size)
    opt.add_argument("--lr", type=float, default=d.lr)
    opt.add_argument("--seed", type=int, default=d.seed)
    run = parser.add_argument_group("execution")
    cache = run.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache-dir", default=None, help="keep view features on disk here (reused across runs) instead of in memory"
    )
    cache.add_argument("--no-cache", action="store_true", help="recompute view features every epoch (reference)")
    run.add_argument(
        "--cache-dtype",
        choices=tuple(FEATURE_DTYPE_NAMES),
        default=d.feature_dtype,
        help="storage dtype of view features, applied in every cache mode (default fp16)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_train(args: argparse.Namespace) -> int:
    """Run ``dhrclip train``; returns 0. User errors (UserError: DatasetError, BackboneError, TrainError) are
    raised for the CLI."""
    from service.data import balance_warning, load_dataset, parse_classes
    from service.model import load_backbone
    from service.model.devices import resolve_device
    from service.model.weights import find_backbone

    from .trainer import train_prompts

    if args.limit is not None and args.limit < 1:
        raise TrainError(f"--limit must be >= 1, got {args.limit}")
    check_out_folder("--out", args.out, TrainError)
    device = resolve_device(args.device)
    cfg = DHRConfig(preset=get_preset(args.preset), layer_features=args.layer_features)
    cache = "none" if args.no_cache else "disk" if args.cache_dir else "memory"
    settings = TrainSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        n_ctx=args.n_ctx,
        depth=args.depth,
        t_n_ctx=args.t_n_ctx,
        device=device,
        precision=args.precision,
        feature_dtype=args.cache_dtype,
        cache=cache,
        cache_dir=args.cache_dir,
    )
    root = Path(args.data).expanduser().absolute()
    by_class = load_dataset(
        root, split=args.split, classes=parse_classes(args.classes), limit=args.limit, seed=args.seed
    )
    for cls, items in by_class.items():
        if line := balance_warning(cls, items):
            print(f"dhrclip train: warning: {line}", file=sys.stderr)
    samples = [s for items in by_class.values() for s in items]
    backbone, _ = find_backbone(args.backbone, Path(args.model_weights_dir))
    clip, info = load_backbone(backbone, allow_download=args.allow_download)
    data = {"root": str(root), "split": args.split, "classes": list(by_class), "limit": args.limit}
    n_anom = sum(s.anomaly for s in samples)
    print(
        f"training prompts on {len(samples)} images ({n_anom} with defects) of {', '.join(by_class)}; "
        f"backbone {info.name}, preset {cfg.preset.name}, layer_features {cfg.layer_features}, {device}",
        file=sys.stderr,
    )
    result = train_prompts(
        clip,
        samples,
        cfg,
        args.out,
        settings,
        backbone=info,
        data=data,
        resume=args.resume,
        progress=not args.no_progress,
    )
    if result.start_epoch >= settings.epochs:
        print(
            f"{args.out}: already trained for {result.start_epoch} epochs (>= --epochs {settings.epochs}); "
            "nothing to do",
            file=sys.stderr,
        )
        return 0
    if cache != "none":
        print(f"view features: {result.extracted} extracted in {result.prepare_seconds:.1f} s", file=sys.stderr)
    for i, sec in enumerate(result.epoch_seconds):
        e = result.start_epoch + i + 1
        print(f"epoch {e}/{settings.epochs}: mean loss {result.losses[e - 1]:.5f} ({sec:.1f} s)")
    print(f"checkpoint: {result.checkpoints[-1]}")
    return 0
