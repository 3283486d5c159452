"""Dataset readers on the shipped real-defects subset and on small synthetic trees."""

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from service.data import DatasetError, Sample, build_meta, load_dataset, load_mask, write_meta_json

from .paths import REAL_DEFECTS

REAL = REAL_DEFECTS
DATASETS = ("magnetic_tile", "steel_sd900", "bsdata")


def manifest() -> dict[Path, dict]:
    with (REAL / "manifest.csv").open(newline="") as fh:
        return {REAL / row["dataset"] / row["img_path"]: row for row in csv.DictReader(fh)}


def copy_without_meta(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("meta.json"))
    return dst


def test_top_level_meta_counts():
    test = load_dataset(REAL)
    assert {c: len(s) for c, s in test.items()} == {"magnetic_tile": 40, "steel_sd900": 15, "bsdata": 8}
    assert Counter(s.anomaly for s in test["magnetic_tile"]) == {1: 25, 0: 15}
    assert Counter(s.specie_name for s in test["magnetic_tile"]) == {
        "good": 15,
        "blowhole": 5,
        "break": 5,
        "crack": 5,
        "fray": 5,
        "uneven": 5,
    }
    assert all(s.anomaly == 1 for c in ("steel_sd900", "bsdata") for s in test[c])
    train = load_dataset(REAL, split="train")
    assert {c: len(s) for c, s in train.items()} == {"magnetic_tile": 15}  # classes without train images left out
    assert all(s.anomaly == 0 and s.mask_path is None for s in train["magnetic_tile"])
    everything = load_dataset(REAL, split="all")
    assert sum(len(s) for s in everything.values()) == 78
    assert everything["magnetic_tile"][:15] == train["magnetic_tile"]  # train entries come first
    first = test["steel_sd900"][0]
    assert first == Sample(
        REAL / "steel_sd900/test/inclusion/In_13.bmp",
        REAL / "steel_sd900/ground_truth/inclusion/In_13_mask.png",
        "steel_sd900",
        "inclusion",
        1,
    )
    assert first.img_path.is_absolute()


def test_classes_and_limit():
    got = load_dataset(REAL, classes=["bsdata", "magnetic_tile"], limit=3)
    assert list(got) == ["bsdata", "magnetic_tile"] and [len(v) for v in got.values()] == [3, 3]
    # meta.json lists 15 good then 25 defective: --limit 3 keeps round(3 * 25 / 40) = 2 defective, 1 good
    assert sorted(s.anomaly for s in got["magnetic_tile"]) == [0, 1, 1]
    with pytest.raises(DatasetError, match="steel_sd900.*not in split 'train'"):
        load_dataset(REAL, split="train", classes=["steel_sd900"])
    with pytest.raises(DatasetError, match="unknown split"):
        load_dataset(REAL, split="val")


@pytest.mark.parametrize("name", DATASETS)
def test_single_class_tree_matches_shipped_meta(tmp_path, name):
    tree = copy_without_meta(REAL / name, tmp_path / name)  # a class folder with train/ or test/ directly
    for split in ("train", "test"):
        from_tree = load_dataset(tree, split=split)
        from_meta = load_dataset(REAL / name, split=split)
        assert list(from_tree) == list(from_meta)
        for cls in from_meta:
            rel = [
                (s.img_path.relative_to(tree), s.mask_path and s.mask_path.relative_to(tree), s.specie_name, s.anomaly)
                for s in from_tree[cls]
            ]
            ref = [
                (
                    s.img_path.relative_to(REAL / name),
                    s.mask_path and s.mask_path.relative_to(REAL / name),
                    s.specie_name,
                    s.anomaly,
                )
                for s in from_meta[cls]
            ]
            assert rel == ref


def test_multi_class_tree(tmp_path):
    tree = copy_without_meta(REAL, tmp_path / "real")
    got = load_dataset(tree, split="all")
    assert {c: len(s) for c, s in got.items()} == {"bsdata": 8, "magnetic_tile": 55, "steel_sd900": 15}
    assert list(got) == sorted(got)


@pytest.mark.parametrize("name", DATASETS)
def test_write_meta_json_round_trips(tmp_path, name):
    out = write_meta_json(REAL / name, out=tmp_path / "meta.json")
    assert out.read_bytes() == (REAL / name / "meta.json").read_bytes()  # same text, byte for byte


def test_build_meta_top_level_matches_shipped():
    shipped = json.loads((REAL / "meta.json").read_text())
    assert build_meta(REAL) == shipped
    assert list(build_meta(REAL, classes=list(shipped["test"]))["test"]) == ["magnetic_tile", "steel_sd900", "bsdata"]


def test_load_mask_matches_manifest():
    rows = manifest()
    for samples in load_dataset(REAL, split="all").values():
        for s in samples:
            row = rows[s.img_path]
            mask = load_mask(s)
            assert mask.dtype == bool and mask.shape == (int(row["height"]), int(row["width"]))
            assert int(mask.sum()) == int(row["defect_pixels"]) and (mask.any() == bool(s.anomaly))


def test_load_mask_resize_matches_torchvision_reference():
    for s in load_dataset(REAL, classes=["magnetic_tile"])["magnetic_tile"][15:25]:
        grey = np.asarray(Image.open(s.mask_path).convert("L"))
        binary = Image.fromarray(np.where(grey > 0, 255, 0).astype(np.uint8))
        resize, crop = transforms.Resize((336, 336)), transforms.CenterCrop(336)
        pipeline = transforms.Compose([resize, crop, transforms.ToTensor()])
        expected = (pipeline(binary)[0] > 0.5).numpy()  # the reference's mask pipeline, (T, T)
        got = load_mask(s, size=(336, 336))
        assert got.shape == (336, 336) and got.dtype == bool
        np.testing.assert_array_equal(got, expected)
    good = load_dataset(REAL)["magnetic_tile"][0]
    assert load_mask(good, size=(336, 336)).shape == (336, 336) and not load_mask(good, size=(336, 336)).any()
    h, w = load_mask(good).shape
    assert h != w  # non-square image: zeros are (H, W), not the reference's transposed (W, H)
    assert (w, h) == Image.open(good.img_path).size


def _tiny_tree(root: Path, mask_size=(2, 2), with_mask=True) -> Path:
    """root/widget/{train/good, test/good, test/dent, ground_truth/dent} with 2x2 images."""
    img = Image.fromarray(np.full((2, 2), 128, np.uint8))
    for folder in ("train/good", "test/good", "test/dent", "ground_truth/dent"):
        (root / "widget" / folder).mkdir(parents=True)
    img.save(root / "widget/train/good/000.png")
    img.save(root / "widget/test/good/000.png")
    img.save(root / "widget/test/dent/000.png")
    if with_mask:
        mask = np.zeros(mask_size[::-1], np.uint8)
        mask[0, 0] = 255
        Image.fromarray(mask).save(root / "widget/ground_truth/dent/000_mask.png")
    return root


def test_hand_resized_mask(tmp_path):
    root = _tiny_tree(tmp_path)
    sample = load_dataset(root)["widget"][1]
    assert sample.specie_name == "dent" and load_mask(sample).tolist() == [[True, False], [False, False]]
    # PIL bilinear 2 -> 4 samples input coords -0.25, 0.25, 0.75, 1.25 (edges renormalised): weights of the set
    # pixel (1, 0.75, 0.25, 0) per axis -> 255 * products: 255, 191, 143 (0.5625) above 127.5; 64 (0.25) below
    expected = np.zeros((4, 4), bool)
    expected[:2, :2] = True
    np.testing.assert_array_equal(load_mask(sample, size=(4, 4)), expected)
    tensor = transforms.ToTensor()(transforms.Resize((4, 4))(Image.open(sample.mask_path)))
    np.testing.assert_array_equal(expected, (tensor[0] > 0.5).numpy())


def test_missing_mask_names_the_file(tmp_path):
    root = _tiny_tree(tmp_path, with_mask=False)
    with pytest.raises(DatasetError, match=r"000_mask\.png: mask file not found"):
        load_dataset(root)
    with pytest.raises(DatasetError, match=r"000_mask\.png"):
        write_meta_json(root / "widget", out=tmp_path / "meta.json")


def test_mask_size_mismatch_names_both_files(tmp_path):
    root = _tiny_tree(tmp_path, mask_size=(3, 2))
    sample = load_dataset(root)["widget"][1]
    with pytest.raises(
        DatasetError,
        match=r"000_mask\.png: mask size 3x2 \(WxH\) differs from image .*dent/000\.png "
        r"size 2x2",
    ):
        load_mask(sample)


def test_meta_json_errors(tmp_path):
    root = _tiny_tree(tmp_path)
    entry = {
        "img_path": "widget/test/dent/000.png",
        "mask_path": "",
        "cls_name": "widget",
        "specie_name": "dent",
        "anomaly": 1,
    }
    (root / "meta.json").write_text(json.dumps({"train": {}, "test": {"widget": [entry]}}))
    with pytest.raises(DatasetError, match=r"dent/000\.png: anomalous sample has no mask_path"):
        load_dataset(root)
    entry.update(img_path="widget/test/dent/001.png", mask_path="widget/ground_truth/dent/000_mask.png")
    (root / "meta.json").write_text(json.dumps({"train": {}, "test": {"widget": [entry]}}))
    with pytest.raises(DatasetError, match=r"001\.png: image file not found"):
        load_dataset(root)
    del entry["specie_name"]
    (root / "meta.json").write_text(json.dumps({"train": {}, "test": {"widget": [entry]}}))
    with pytest.raises(DatasetError, match=r"meta\.json: entry test/widget\[0\] must have exactly the fields"):
        load_dataset(root)


def test_unknown_layout(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match="unknown dataset layout; accepted layouts: .*meta.json.*1cls.csv"):
        load_dataset(tmp_path)


def test_visa_csv(tmp_path):
    img = Image.fromarray(np.zeros((3, 5), np.uint8))
    mask = np.zeros((3, 5), np.uint8)
    mask[1, 2:4] = 1  # VisA masks hold 0/1: binarised > 0
    rows = [("candle", "train", "normal", "candle/Data/Images/Normal/000.JPG", "")]
    rows += [("candle", "test", "normal", "candle/Data/Images/Normal/001.JPG", "")]
    rows += [("candle", "test", "anomaly", "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png")]
    rows += [("pcb1", "test", "anomaly", "pcb1/Data/Images/Anomaly/000.JPG", "pcb1/Data/Masks/Anomaly/000.png")]
    for _, _, _, image, mask_path in rows:
        (tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
        img.save(tmp_path / image, format="JPEG")
        if mask_path:
            (tmp_path / mask_path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(tmp_path / mask_path)
    (tmp_path / "split_csv").mkdir()
    with (tmp_path / "split_csv" / "1cls.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("object", "split", "label", "image", "mask"), *rows])
    test = load_dataset(tmp_path)
    assert {c: [s.anomaly for s in v] for c, v in test.items()} == {"candle": [0, 1], "pcb1": [1]}
    assert test["candle"][0].mask_path is None and test["candle"][1].specie_name == ""
    assert load_mask(test["pcb1"][0]).sum() == 2 and load_mask(test["candle"][0]).shape == (3, 5)
    assert [len(v) for v in load_dataset(tmp_path, split="all").values()] == [3, 1]
    assert list(load_dataset(tmp_path, split="train")) == ["candle"]
    (tmp_path / "pcb1/Data/Masks/Anomaly/000.png").unlink()
    with pytest.raises(DatasetError, match=r"pcb1/Data/Masks/Anomaly/000\.png: mask file not found"):
        load_dataset(tmp_path)


def test_data_index_to_an_unwritable_place_is_one_line_and_leaves_nothing(tmp_path, capsys):
    """--out in a missing folder or naming a folder was a FileNotFoundError / IsADirectoryError traceback."""
    from service.cli import main

    root = tmp_path / "widget"
    shutil.copytree(REAL / "steel_sd900", root, ignore=shutil.ignore_patterns("meta.json"))
    for out, why in ((tmp_path / "missing" / "meta.json", "No such file or directory"), (root, "Is a directory")):
        assert main(["data", "index", str(root), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"dhrclip data: {out}: cannot write the index ({why})"], err
    assert not (root / "meta.json").exists() and not list(tmp_path.rglob("*.tmp"))
