"""Dataset readers for evaluation and prompt training: meta.json index, VisA split csv, MVTec AD folder tree.

Three on-disk layouts are accepted by :func:`load_dataset` (checked in this order):

1. ``root/meta.json``: the AnomalyCLIP/DHR-CLIP index
   ``{"train"|"test": {cls: [{img_path, mask_path, cls_name, specie_name, anomaly}]}}``, paths relative to
   ``root``, ``mask_path == ""`` for defect-free images.
2. ``root/split_csv/1cls.csv`` (VisA): columns ``object,split,label,image,mask``, label ``normal``/``anomaly``,
   paths relative to ``root``. ``specie_name`` is ``""`` as in the reference index generator.
3. MVTec AD folder tree: ``root/<cls>/{train,test}/<specie>/<stem>.<ext>`` with masks at
   ``root/<cls>/ground_truth/<specie>/<stem>_mask.png``; ``good`` is the defect-free specie. A root that is itself
   one class folder (``root/train`` or ``root/test`` exists) is read as the single class ``root.name``.

Ground-truth masks follow the reference rule (spec B §1.5): read as 8-bit grey, ``> 0`` is anomalous; resized
masks are a PIL BILINEAR resize of the 0/255 image binarised at ``value / 255 > 0.5``.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import UserError

from .splits import SPLITS

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
MASK_SUFFIX = "_mask.png"
GOOD = "good"
ENTRY_FIELDS = ("img_path", "mask_path", "cls_name", "specie_name", "anomaly")
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
LAYOUTS = (
    "root/meta.json (AnomalyCLIP/DHR-CLIP index), root/split_csv/1cls.csv (VisA), "
    "root/<cls>/{train,test}/<specie>/ (MVTec AD), or a single class folder with train/ or test/"
)


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    ``img_path`` is absolute; ``mask_path`` is ``None`` for defect-free images; ``anomaly`` is 0 (good) or 1.
    """

    img_path: Path
    mask_path: Path | None
    cls_name: str
    specie_name: str
    anomaly: int


class DatasetError(UserError):
    """A dataset on disk is malformed; the message is one line naming the file and what is wrong."""


def load_dataset(
    root: str | Path,
    split: str = "test",
    classes: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> dict[str, list[Sample]]:
    """Read a dataset into ``{cls_name: [Sample, ...]}`` in index order.

    ``split`` is ``"train"``, ``"test"`` or ``"all"`` (train entries, then test entries, per class). ``classes``
    selects and orders classes (unknown names raise); ``limit`` keeps N samples per class, defective and good in
    their proportions (:func:`stratified_indices`, deterministic for ``seed``). Classes with no sample in the split
    are left out. Every image file, and the mask file of every anomalous sample, must exist.
    """
    root = Path(root).expanduser().absolute()
    if split not in SPLITS:
        raise DatasetError(f"{root}: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if limit is not None and limit < 0:
        raise DatasetError(f"{root}: limit must be >= 0, got {limit}")
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root is not a directory")
    splits = ("train", "test") if split == "all" else (split,)
    if (root / "meta.json").is_file():
        entries = _meta_entries(root / "meta.json", splits)
    elif (root / "split_csv" / "1cls.csv").is_file():
        entries = _visa_entries(root / "split_csv" / "1cls.csv", splits)
    elif _tree_class_dirs(root):
        meta = build_meta(root)
        entries = {}
        for s in splits:
            for cls, items in meta[s].items():
                entries.setdefault(cls, []).extend(items)
    else:
        raise DatasetError(f"{root}: unknown dataset layout; accepted layouts: {LAYOUTS}")
    entries = {cls: items for cls, items in entries.items() if items}
    if classes is not None:
        missing = [c for c in classes if c not in entries]
        if missing:
            raise DatasetError(
                f"{root}: class(es) {', '.join(missing)} not in split {split!r}; available: {', '.join(entries)}"
            )
        entries = {c: entries[c] for c in classes}
    if limit is not None:
        entries = {
            cls: [items[i] for i in stratified_indices([e["anomaly"] for e in items], limit, f"{seed}/{cls}")]
            for cls, items in entries.items()
        }
    return {cls: [_to_sample(root, e) for e in items] for cls, items in entries.items()}


def stratified_indices(labels: Sequence[int], limit: int, seed: int | str = 0) -> list[int]:
    """Indices (ascending) of ``min(limit, n)`` of the ``n`` items with 0/1 ``labels``, both kinds in proportion.

    Defective count ``k = round(limit * n_defective / n)``, raised to 1 and lowered to ``limit - 1`` when both
    kinds exist and ``limit >= 2`` (a small limit still sees both), then clipped to what each kind holds. Within
    a kind the items are drawn uniformly at random by ``random.Random(seed)``, so a seed gives one selection.
    """
    if limit >= len(labels):
        return list(range(len(labels)))
    bad = [i for i, y in enumerate(labels) if y]
    good = [i for i, y in enumerate(labels) if not y]
    k = round(limit * len(bad) / len(labels))
    if bad and good and limit >= 2:
        k = min(max(k, 1), limit - 1)
    k = min(max(k, limit - len(good)), len(bad))
    rng = random.Random(seed)
    return sorted(rng.sample(bad, k) + rng.sample(good, limit - k))


def balance_warning(cls: str, samples: Sequence[Sample]) -> str | None:
    """``"class X: 20 images, none defective"`` (or ``none good``) when one kind is missing; else None."""
    n_bad = sum(s.anomaly for s in samples)
    if 0 < n_bad < len(samples) or not samples:
        return None
    return f"class {cls}: {len(samples)} images, none {'good' if n_bad else 'defective'}"


def build_meta(root: str | Path, classes: Sequence[str] | None = None) -> dict:
    """Scan an MVTec-style tree and return the meta.json index (paths relative to ``root``).

    Per class and split, entries are grouped by specie (``good`` first, then defects alphabetically) and sorted by
    path; a class without a ``train/`` folder gets an empty train list. ``classes`` selects and orders the classes
    (default: all class folders, sorted by name). Raises :class:`DatasetError` naming a missing mask file.
    """
    root = Path(root).expanduser().absolute()
    class_dirs = _tree_class_dirs(root)
    if not class_dirs:
        raise DatasetError(f"{root}: not an MVTec-style tree (no <cls>/train or <cls>/test folder, no train/ or test/)")
    by_name = {d.name: d for d in class_dirs}
    if classes is not None:
        missing = [c for c in classes if c not in by_name]
        if missing:
            raise DatasetError(f"{root}: class folder(s) {', '.join(missing)} not found; found: {', '.join(by_name)}")
        by_name = {c: by_name[c] for c in classes}
    meta: dict = {"train": {}, "test": {}}
    for cls, cls_dir in by_name.items():
        for split in ("train", "test"):
            meta[split][cls] = _scan_split(root, cls_dir, cls, split)
    return meta


def write_meta_json(root: str | Path, out: str | Path | None = None, meta: dict | None = None) -> Path:
    """Write ``meta`` (default :func:`build_meta` of ``root``) as JSON (4-space indent, trailing newline) to ``out``
    or root/meta.json."""
    root = Path(root).expanduser().absolute()
    out = root / "meta.json" if out is None else Path(out)
    meta = build_meta(root) if meta is None else meta
    tmp = out.with_name(out.name + ".tmp")
    try:  # through a temporary file: a failed write never leaves a half-written index in place
        tmp.write_text(json.dumps(meta, indent=4) + "\n", encoding="utf-8")
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"{out}: cannot write the index ({e.strerror or e})") from None
    return out


def empty_masks(root: str | Path, meta: dict) -> list[Path]:
    """Mask files of the defective entries of a meta.json index (paths relative to ``root``) with no pixel > 0.

    Such an image counts as defective while its mask marks no defect pixel, which bends pixel metrics and the
    segmentation loss; ``dhrclip data index`` names them.
    """
    root = Path(root).expanduser().absolute()
    found = []
    for split in ("train", "test"):
        for items in meta.get(split, {}).values():
            for e in items:
                if e["anomaly"] == 1 and e["mask_path"]:
                    path = root / e["mask_path"]
                    try:
                        with Image.open(path) as im:
                            if im.convert("L").getbbox() is None:
                                found.append(path)
                    except (OSError, UnidentifiedImageError) as exc:
                        raise DatasetError(f"{path}: cannot read mask ({exc})") from exc
    return found


def load_mask(sample: Sample, size: tuple[int, int] | None = None) -> np.ndarray:
    """Ground-truth mask of ``sample`` as bool ``(H, W)`` at the image's size, or bool ``size=(height, width)``.

    Reference rule: the mask is read as 8-bit grey and binarised ``m > 0``. Resizing is a PIL BILINEAR resize of
    the 0/255 image followed by ``value / 255 > 0.5``. Defect-free samples get all-False masks of the image's
    ``(H, W)`` (the reference builds a transposed ``(W, H)`` one; we do not). A mask whose size differs from the
    image's raises :class:`DatasetError` naming both files and sizes.
    """
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (height, width) with positive entries, got {size!r}")
    width, height = _image_size(sample.img_path)
    if sample.anomaly == 0:
        return np.zeros((height, width) if size is None else tuple(size), dtype=bool)
    if sample.mask_path is None:
        raise DatasetError(f"{sample.img_path}: anomalous sample has no mask file")
    try:
        with Image.open(sample.mask_path) as im:
            grey = np.asarray(im.convert("L"))  # (H, W) uint8
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"{sample.mask_path}: cannot read mask ({exc})") from exc
    if grey.shape != (height, width):
        raise DatasetError(
            f"{sample.mask_path}: mask size {grey.shape[1]}x{grey.shape[0]} (WxH) differs from image "
            f"{sample.img_path} size {width}x{height}"
        )
    binary = grey > 0
    if size is None:
        return binary
    target_h, target_w = size
    resized = Image.fromarray(binary.astype(np.uint8) * 255).resize((target_w, target_h), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0 > 0.5


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"{path}: cannot read image ({exc})") from exc


def _to_sample(root: Path, entry: dict) -> Sample:
    """Validate one index entry (relative paths) and turn it into a :class:`Sample` with absolute paths."""
    img = root / entry["img_path"]
    if not img.is_file():
        raise DatasetError(f"{img}: image file not found (class {entry['cls_name']})")
    mask = root / entry["mask_path"] if entry["mask_path"] else None
    if entry["anomaly"] == 1:
        if mask is None:
            raise DatasetError(f"{img}: anomalous sample has no mask_path")
        if not mask.is_file():
            raise DatasetError(f"{mask}: mask file not found (image {img})")
    return Sample(img, mask, entry["cls_name"], entry["specie_name"], int(entry["anomaly"]))


def _meta_entries(path: Path, splits: tuple[str, ...]) -> dict[str, list[dict]]:
    """Entries of a meta.json per class, for the given splits, validated field by field."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read meta.json ({exc})") from exc
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: top level must be an object with keys 'train' and 'test'")
    out: dict[str, list[dict]] = {}
    for split in splits:
        groups = meta.get(split, {})
        if not isinstance(groups, dict):
            raise DatasetError(f"{path}: '{split}' must map class names to lists of entries")
        for cls, items in groups.items():
            if not isinstance(items, list):
                raise DatasetError(f"{path}: {split}/{cls} must be a list of entries")
            for i, item in enumerate(items):
                _check_entry(path, f"{split}/{cls}[{i}]", cls, item)
            out.setdefault(cls, []).extend(items)
    return out


def _check_entry(path: Path, where: str, cls: str, item: object) -> None:
    if not isinstance(item, dict) or set(item) != set(ENTRY_FIELDS):
        raise DatasetError(f"{path}: entry {where} must have exactly the fields {', '.join(ENTRY_FIELDS)}")
    if item["anomaly"] not in (0, 1) or isinstance(item["anomaly"], bool):
        raise DatasetError(f"{path}: entry {where} has anomaly={item['anomaly']!r}, expected 0 or 1")
    if item["cls_name"] != cls:
        raise DatasetError(f"{path}: entry {where} has cls_name {item['cls_name']!r} under class {cls!r}")
    if not isinstance(item["img_path"], str) or not isinstance(item["mask_path"], str) or not item["img_path"]:
        raise DatasetError(f"{path}: entry {where} needs string img_path (non-empty) and mask_path")


def _visa_entries(path: Path, splits: tuple[str, ...]) -> dict[str, list[dict]]:
    """Entries of a VisA ``split_csv/1cls.csv`` per class (file order), for the given splits."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(VISA_COLUMNS)}")
        rows = list(reader)
    out: dict[str, list[dict]] = {}
    for line, row in enumerate(rows, start=2):
        if row["label"] not in ("normal", "anomaly"):
            raise DatasetError(f"{path}: line {line} has label {row['label']!r}, expected 'normal' or 'anomaly'")
        if row["split"] not in ("train", "test"):
            raise DatasetError(f"{path}: line {line} has split {row['split']!r}, expected 'train' or 'test'")
        if row["split"] not in splits:
            continue
        anomaly = int(row["label"] == "anomaly")
        entry = {
            "img_path": row["image"],
            "mask_path": (row["mask"] or "") if anomaly else "",
            "cls_name": row["object"],
            "specie_name": "",
            "anomaly": anomaly,
        }
        out.setdefault(row["object"], []).append(entry)
    return out


def _tree_class_dirs(root: Path) -> list[Path]:
    """``[root]`` if root is one class folder, else its sub-folders that hold train/ or test/ (sorted)."""
    if not root.is_dir():
        return []
    if _is_class_dir(root):
        return [root]
    return sorted((d for d in root.iterdir() if d.is_dir() and _is_class_dir(d)), key=lambda d: d.name)


def _is_class_dir(path: Path) -> bool:
    return (path / "train").is_dir() or (path / "test").is_dir()


def _scan_split(root: Path, cls_dir: Path, cls: str, split: str) -> list[dict]:
    """Entries of ``cls_dir/split/<specie>/*``: good first, then species alphabetically; files sorted by name."""
    split_dir = cls_dir / split
    if not split_dir.is_dir():
        return []
    species = sorted((d.name for d in split_dir.iterdir() if d.is_dir()), key=lambda s: (s != GOOD, s))
    entries = []
    for specie in species:
        images = sorted(
            p
            for p in (split_dir / specie).iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )
        for img in images:
            mask_rel = ""
            if specie != GOOD:
                mask = cls_dir / "ground_truth" / specie / f"{img.stem}{MASK_SUFFIX}"
                if not mask.is_file():
                    raise DatasetError(f"{mask}: mask file not found for image {img}")
                mask_rel = mask.relative_to(root).as_posix()
            entries.append(
                {
                    "img_path": img.relative_to(root).as_posix(),
                    "mask_path": mask_rel,
                    "cls_name": cls,
                    "specie_name": specie,
                    "anomaly": int(specie != GOOD),
                }
            )
    return entries


def parse_classes(text: str | None) -> list[str] | None:
    """``"a,b"`` -> ``["a", "b"]`` (a ``--classes`` option); None means every class."""
    if text is None:
        return None
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise DatasetError(f"--classes {text!r} names no class")
    return names


EXIF_ORIENTATION = 0x0112


def read_image(path: str | Path) -> Image.Image:
    """The fully decoded image at ``path`` (PIL, any mode); :class:`DatasetError` naming the file when unreadable.

    EXIF-rotated images are refused: masks are drawn in stored pixel order, while the model sees the image after
    ``exif_transpose``, so map and mask would not line up (in training as in evaluation).
    """
    try:
        with Image.open(path) as im:
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
            im.load()
            img = im.copy()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    if orientation not in (0, 1):
        raise DatasetError(
            f"{path}: EXIF orientation {orientation} would rotate the image away from its mask; "
            "strip the orientation tag first"
        )
    return img
