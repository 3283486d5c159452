"""``dhrclip evaluate``: argument parsing and the run, for ``service/cli.py`` to mount as a sub-command.

Examples::

    dhrclip evaluate --data /data/mvtec --prompts runs/visa_prompts --report mvtec.json
    dhrclip evaluate --data /data/visa --preset visa --protocol service --classes pcb1,pcb2 --limit 20

The per-class table goes to stdout, progress and the summary to stderr. User errors (a bad dataset folder, an
unreadable image or mask, missing weights, a bad option) are raised as :class:`~service.errors.UserError`
(``DatasetError``, ``BackboneError``, ...); ``dhrclip`` prints them as ``dhrclip evaluate: <message>`` and exits with
status 2.

The table (values x 100 with one decimal, as in the paper; ``-`` marks an undefined value, e.g. the image AUROC of
a class without defect-free images; ``AUPRO`` is the standard area up to FPR 0.3 divided by 0.3, ``AUPRO*`` the
reference variant that rescales the kept FPRs to [0, 1], what the paper prints)::

                            |                       pixel |            reference |              map_max | ...
    class            n anom |  AUROC  AUPRO AUPRO*     F1 |  AUROC     AP     F1 |  AUROC     AP     F1 | ...
    ------------------------------------------------------------------------------------------------ ...
    magnetic_tile   55   25 |   63.7   27.0   34.1   11.7 |   81.3   91.3   60.7 |   72.9   54.4   93.5 | ...
    steel_sd900     15   15 |   53.4   23.0   17.6   16.3 |      -      -      - |      -      -      - | ...
    ------------------------------------------------------------------------------------------------ ...
    mean            70   40 |   58.6   25.0   25.9   14.0 |   81.3   91.3   60.7 |   72.9   54.4   93.5 | ...

The JSON report keeps the values in [0, 1] (``null`` when undefined)::

    {"protocol", "preset", "model": ModelInfo, "data": root, "limit", "seed", "classes": {cls: {metrics..., "n_images",
     "n_anomalous"}}, "mean": {metrics...}, "seconds", "timing": {"load", "model", "metrics"}}

with metrics ``pixel_auroc, pixel_aupro, pixel_aupro_ref, pixel_f1_max`` and per image-score variant
(``reference, map_max, map_topk``) ``{"image_auroc", "image_ap", "image_f1_max", "overkill_at_escape"}``; the
last (``OK@E`` in the table) is the false-reject rate of good images at the threshold that lets at most
``--escape-rate`` (default 2 %) of the defective images escape.

``--shots K`` (``--shot-seed S``) adds a second table and ``"few_shot": {"shots", "shot_seed", "classes", "mean",
...}``: the same test images judged with K good train images per class as references (``service.evaluate.shots``),
the usual few-shot protocol; the first table stays the zero-shot one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from service.cli_options import add_model_arguments, load_model_from_args
from service.errors import UserError
from service.model.config import IMAGE_SCORES

from .choices import DEFAULT_ESCAPE_RATE, IMAGE_KEYS, PIXEL_KEYS, PROTOCOLS

PIXEL_HEADERS = ("AUROC", "AUPRO", "AUPRO*", "F1")
IMAGE_HEADERS = ("AUROC", "AP", "F1", "OK@E")
COL = 7  # width of one value column, right-aligned
SEP = " |"


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dhrclip evaluate``."""
    io = parser.add_argument_group("data and output")
    io.add_argument("--data", required=True, help="dataset root (meta.json, VisA split_csv or MVTec tree); test split")
    io.add_argument("--classes", default=None, help="comma-separated class names (default: all, in index order)")
    io.add_argument(
        "--limit", type=int, default=None, help="N test images per class, defective and good in their proportions"
    )
    io.add_argument("--seed", type=int, default=0, help="seed of the --limit selection (default 0)")
    io.add_argument("--report", default=None, help="write the full report as JSON to this file")
    add_model_arguments(parser, backend=True)
    run = parser.add_argument_group("protocol and execution")
    run.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="paper",
        help="'paper': min-max normalised T x T maps against T x T masks (the paper's table); "
        "'service': the service's maps at each image's original size",
    )
    run.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    run.add_argument(
        "--shots",
        type=int,
        default=0,
        help="K > 0: also evaluate with K good train images per class as references (few-shot), side by side",
    )
    run.add_argument("--shot-seed", type=int, default=0, help="seed of the draw of the K reference images")
    run.add_argument(
        "--escape-rate",
        type=float,
        default=DEFAULT_ESCAPE_RATE,
        help="overkill_at_escape (OK@E): false-reject rate of good images when at most this share of defective "
        "images escapes (default 0.02)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``dhrclip evaluate``: print the table, write ``--report``; returns 0. User errors are raised."""
    from service.data import balance_warning, load_dataset, parse_classes

    from .runner import evaluate
    from .shots import few_shot_memories

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0.0 <= args.escape_rate < 1.0:
        raise UserError(f"--escape-rate must be in [0, 1), got {args.escape_rate}")
    if args.shots < 0:
        raise UserError(f"--shots must be >= 0, got {args.shots}")
    report_path = Path(args.report).expanduser() if args.report else None
    if report_path is not None and report_path.is_dir():
        raise UserError(f"--report {report_path}: is a directory, expected a file name")
    if report_path is not None:  # checked now: a run of hours must not end on a path it cannot write
        blocking = next((p for p in report_path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise UserError(f"--report {report_path}: {blocking} is not a folder")
    root = Path(args.data).expanduser().absolute()
    by_class = load_dataset(root, split="test", classes=parse_classes(args.classes), limit=args.limit, seed=args.seed)
    if not by_class:
        raise UserError(f"{root}: no test images")
    announced = {}  # class -> the undefined metrics its composition implies, warned about before the run
    for cls, items in by_class.items():
        if line := balance_warning(cls, items):
            pixel = "" if items[0].anomaly else f"pixel {', '.join(PIXEL_HEADERS)}; "
            announced[cls] = f"{pixel}image {', '.join(IMAGE_HEADERS)}"
            print(f"dhrclip evaluate: warning: {line}: {announced[cls]} undefined (shown as -)", file=sys.stderr)
    model, info = load_model_from_args(args)
    n = sum(len(s) for s in by_class.values())
    print(
        f"evaluating {n} images of {len(by_class)} class(es) ({', '.join(by_class)}); protocol {args.protocol}, "
        f"preset {args.preset}, backbone {info.backbone}, prompts {info.prompts}, {info.device} {info.precision}",
        file=sys.stderr,
    )
    run = {
        "protocol": args.protocol,
        "batch_size": args.batch_size,
        "progress": not args.no_progress,
        "escape_rate": args.escape_rate,
    }
    body = evaluate(model, by_class, **run)
    report = {
        "protocol": body["protocol"],
        "preset": body["preset"],
        "model": info.to_dict(),
        "data": str(root),
        "limit": args.limit,
        "seed": args.seed,
        "escape_rate": args.escape_rate,
        "classes": body["classes"],
        "mean": body["mean"],
        "seconds": body["seconds"],
        "timing": body["timing"],
    }
    print(format_table(report))
    for cls, names in undefined_metrics(report).items():
        if names != announced.get(cls):
            print(f"dhrclip evaluate: warning: class {cls}: {names} undefined (shown as -)", file=sys.stderr)
    if args.shots:
        train = load_dataset(root, split="train", classes=list(by_class))
        memories = few_shot_memories(model, train, list(by_class), args.shots, args.shot_seed)
        few = evaluate(model, by_class, memories=memories, **run)
        report["few_shot"] = {"shots": args.shots, "shot_seed": args.shot_seed, **few}
        print(f"\n{args.shots}-shot (seed {args.shot_seed}):")
        print(format_table(report["few_shot"]))
    t = body["timing"]
    print(
        f"{n} images in {body['seconds']:.1f} s ({body['seconds'] / n:.2f} s per image: model {t['model']:.1f} s, "
        f"loading {t['load']:.1f} s, metrics {t['metrics']:.1f} s)",
        file=sys.stderr,
    )
    if report_path is not None:
        print(f"wrote {write_report(report, report_path)}", file=sys.stderr)
    return 0


def undefined_metrics(report: dict) -> dict[str, str]:
    """``{class: "pixel AUPRO, AUPRO*; image AUROC"}`` for the classes of a report with undefined (None) metrics."""
    out = {}
    for cls, row in report["classes"].items():
        pixel = [h for k, h in zip(PIXEL_KEYS, PIXEL_HEADERS, strict=True) if row[k] is None]
        image = [
            h
            for k, h in zip(IMAGE_KEYS, IMAGE_HEADERS, strict=True)
            if any(sub[k] is None for sub in row.values() if isinstance(sub, dict))
        ]
        parts = [f"{kind} {', '.join(names)}" for kind, names in (("pixel", pixel), ("image", image)) if names]
        if parts:
            out[cls] = "; ".join(parts)
    return out


def fmt(value: float | None) -> str:
    """``100 * value`` with one decimal, ``-`` for ``None``."""
    return "-" if value is None else f"{100.0 * value:.1f}"


def format_table(report: dict) -> str:
    """The per-class table and the mean row of a report (module docstring), as one string without final newline."""
    classes = report["classes"]
    variants = [v for v in IMAGE_SCORES if v in report["mean"]]
    name_w = max([len("class"), *(len(c) for c in classes)])
    count_w = max([5, *(len(str(r["n_images"])) + 1 for r in classes.values())])

    def line(lead: tuple[str, str, str], groups: list[list[str]]) -> str:
        cells = [f"{lead[0]:<{name_w}}{lead[1]:>{count_w}}{lead[2]:>{count_w}}"]
        cells += ["".join(f"{x:>{COL}}" for x in group) for group in groups]
        return SEP.join(cells)

    def row(name: str, values: dict, n: int, anom: int) -> str:
        groups = [[fmt(values[k]) for k in PIXEL_KEYS], *([fmt(values[v][k]) for k in IMAGE_KEYS] for v in variants)]
        return line((name, str(n), str(anom)), groups)

    title = SEP.join(
        [
            " " * (name_w + 2 * count_w),
            f"{'pixel':>{COL * len(PIXEL_HEADERS)}}",
            *(f"{v:>{COL * len(IMAGE_HEADERS)}}" for v in variants),
        ]
    )
    heads = line(("class", "n", "anom"), [list(PIXEL_HEADERS), *(list(IMAGE_HEADERS) for _ in variants)])
    rule = "-" * len(heads)
    lines = [title, heads, rule]
    lines += [row(cls, r, r["n_images"], r["n_anomalous"]) for cls, r in classes.items()]
    n_total = sum(r["n_images"] for r in classes.values())
    a_total = sum(r["n_anomalous"] for r in classes.values())
    lines += [rule, row("mean", report["mean"], n_total, a_total)]
    return "\n".join(lines)


def check_report(report: dict) -> None:
    """Raise :class:`ValueError` unless every metric of every class and of the mean is ``None`` or in [0, 1]."""
    if "few_shot" in report:
        check_report(report["few_shot"])
    for where, values in [*((f"class {c}", r) for c, r in report["classes"].items()), ("mean", report["mean"])]:
        for key, value in _metric_items(values):
            if value is not None and not (isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{where}: metric {key} = {value!r} is not a number in [0, 1]")


def write_report(report: dict, path: str | Path) -> Path:
    """Write ``report`` as indented JSON (parent folders created); values are checked by :func:`check_report`."""
    check_report(report)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _metric_items(values: dict) -> list[tuple[str, float | None]]:
    """``[(key, value)]`` of the pixel metrics and of every ``variant.image_metric`` in one class row."""
    items = [(k, values[k]) for k in PIXEL_KEYS]
    for name, sub in values.items():
        if isinstance(sub, dict):
            items += [(f"{name}.{k}", sub[k]) for k in IMAGE_KEYS]
    return items
