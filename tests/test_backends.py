"""Export of the DHR vision path and the ONNX Runtime / OpenVINO backends against torch fp32 (fixture config A).

The export is made once per module through the real command (``dhrclip export``) from the tiny random CLIP and the
reference prompt checkpoint, preset mvtec (config A). Every backend is compared with the torch fp32 model on the
three fixture images: anomaly maps and reference image scores.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.cli import build_parser, main
from service.engine.backends import load_exported, load_for_backend, require
from service.engine.export import ONNX_GRAPH, SIDECAR, ExportError
from service.export.command import calibration_samples
from service.model import build_model, load_views, stack_views
from service.model.weights import find_weights

from .api_fixtures import make_settings, png_file, wait_ready
from .paths import FIXTURES, REAL_DEFECTS, REF_PROMPTS, TINY_CLIP

IMAGES = ("img0_rgb_700x700.png", "img1_rgb_640x480.png", "img2_gray_512x512.png")


def export(out: Path, *extra: str) -> Path:
    """``dhrclip export`` in this process (the command's own code; saves a second torch import)."""
    args = ["export", "--backbone", str(TINY_CLIP), "--prompts", str(REF_PROMPTS), "--out", str(out), *extra]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return export(tmp_path_factory.mktemp("export") / "fp32", "--preset", "mvtec", "--precision", "fp32")


@pytest.fixture(scope="module")
def torch_a(tiny_clip, ref_checkpoint):
    clip, info = tiny_clip
    return build_model(clip, ref_checkpoint, preset="mvtec", backbone_info=info)


@pytest.fixture(scope="module")
def batch(torch_a):
    model, _ = torch_a
    return stack_views([load_views(Image.open(FIXTURES / name), model.cfg.preset) for name in IMAGES])


@pytest.fixture(scope="module")
def reference(torch_a, batch):
    with torch.inference_mode():
        return torch_a[0](*batch)


def load(backend: str, export_dir: Path, precision="fp32", preset="mvtec", backbone=TINY_CLIP, prompts=REF_PROMPTS):
    """Through the service's entry: weights named as DHR_BACKBONE / DHR_PROMPTS would name them."""
    choice = find_weights(str(backbone), str(prompts), export_dir / "no-model-weights", "cpu")
    return load_for_backend(backend, choice, export_dir=export_dir, preset=preset, precision=precision)


def run(backend: str, export_dir: Path, batch, precision: str = "fp32"):
    model, info = load(backend, export_dir, precision)
    with torch.inference_mode():
        return model(*batch), info


def deviation(out, ref) -> tuple[float, float]:
    return (
        float((out.anomaly_map - ref.anomaly_map).abs().max()),
        float((out.reference - ref.reference).abs().max()),
    )


def test_export_is_one_checked_graph_with_a_dynamic_batch(exported, torch_a):
    import onnx

    graph = onnx.load(str(exported / ONNX_GRAPH))
    onnx.checker.check_model(graph, full_check=True)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 21
    assert [i.name for i in graph.graph.input] == ["whole", "crops"]
    assert [o.name for o in graph.graph.output] == ["whole_tokens", "whole_cls", "crop_tokens", "crop_cls"]
    for value in graph.graph.input:
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch
        assert [d.dim_value for d in dims[1:]] in ([3, 336, 336], [4, 3, 336, 336])
    meta = json.loads((exported / SIDECAR).read_text())
    model, info = torch_a
    assert meta["preset"]["name"] == "mvtec" and meta["config"]["layer_features"] == "final"
    assert meta["backbone"]["sha256"] == info.backbone_sha256 and meta["prompts"]["sha256"] == info.prompts_sha256
    assert torch.equal(torch.tensor(meta["text_features"]), model.text_features)
    assert meta["versions"]["torch"] == torch.__version__.split("+")[0]


@pytest.mark.parametrize(
    ("backend", "precision", "tol", "score_tol"),
    [("onnxruntime", "fp32", 1e-4, 1e-4), ("openvino", "fp32", 1e-3, 1e-3), ("openvino", "bf16", 1e-2, 3e-2)],
)
def test_backend_parity_with_torch_fp32(exported, batch, reference, backend, precision, tol, score_tol):
    """Maps within the issue's bounds; the reference score (softmax of CLS cosines / 0.07) moves ~1.4e-2 in bf16."""
    out, info = run(backend, exported, batch, precision)
    maps, scores = deviation(out, reference)
    assert maps <= tol and scores <= score_tol, (maps, scores)
    assert out.anomaly_map.shape == (3, 672, 672) and info.backend == backend and info.precision == precision


@pytest.mark.slow  # a second export (~20 s); bf16 is checked in CI through openvino
def test_fp16_export_on_onnxruntime(tmp_path, batch, reference):
    fp16 = export(tmp_path / "fp16", "--preset", "mvtec", "--precision", "fp16")
    out, _ = run("onnxruntime", fp16, batch, "fp16")
    maps, scores = deviation(out, reference)
    assert maps <= 1e-2 and scores <= 3e-2, (maps, scores)
    with pytest.raises(ExportError, match="exported as fp16, asked to run fp32"):
        run("onnxruntime", fp16, batch, "fp32")


GOOD = REAL_DEFECTS / "magnetic_tile" / "train" / "good"


def product_store(data_dir: Path, product: str, images: list[Path]) -> list[str]:
    """A service data directory whose database holds ``product`` with ``images`` as its references; their ids."""
    from service.storage import InspectionStore
    from service.storage.models import ProductProfile, ReferenceImage
    from service.storage.store import default_database_url

    with InspectionStore(default_database_url(data_dir), data_dir) as store:
        store.put_product(ProductProfile(name=product, image_threshold=0.5, pixel_threshold=0.5, image_score="max"))
        refs = [
            ReferenceImage(
                product=product, filename=p.name, sha256="0" * 64, width=1, height=1, nbytes=1, model_key="k"
            )
            for p in images
        ]
        store.add_references([(ref, p.read_bytes(), b"features") for ref, p in zip(refs, images, strict=True)])
    return [r.id for r in refs]


def test_int8_export_calibrated_on_the_product_references(exported, tmp_path, batch, reference):
    """INT8 of the module's fp32 export (--from), calibrated on the references of --product read through the store
    (the folder is unused); run with fp32 and with bf16 inference precision for what is not quantised."""
    ids = product_store(tmp_path / "data", "tile", sorted(GOOD.iterdir())[:3])
    int8 = tmp_path / "int8"
    args = ["export", "--format", "openvino-int8", "--from", str(exported), "--out", str(int8), "--product", "tile"]
    args += ["--data-dir", str(tmp_path / "data"), "--calibration", str(tmp_path / "nowhere")]
    assert main([*args, "--calibration-limit", "2", "--backbone", str(TINY_CLIP), "--prompts", str(REF_PROMPTS)]) == 0
    meta, fp32_meta = (json.loads((d / SIDECAR).read_text()) for d in (int8, exported))
    quant = meta["quantization"]
    assert quant["calibration_images"] == 2 and quant["smooth_quant_alpha"] == 0.95
    assert quant["calibration_source"] == {"kind": "product", "product": "tile", "references": ids[:2]}
    assert meta["text_features"] == fp32_meta["text_features"] and meta["backbone"] == fp32_meta["backbone"]
    for precision, tol in (("fp32", 0.1), ("bf16", 0.1)):
        out, info = run("openvino", int8, batch, precision)
        maps, scores = deviation(out, reference)
        assert info.quantization == "int8"
        assert maps <= tol and scores <= tol, (precision, maps, scores)  # measured ~0.02 / ~0.04 with 15 images
        assert float((out.anomaly_map - reference.anomaly_map).abs().mean()) <= 0.01
    with pytest.raises(ExportError, match="onnxruntime runs .onnx graphs"):
        run("onnxruntime", int8, batch)


@pytest.mark.slow  # the fast suite quantises the module's export (--from); this exports first, as without --from
def test_int8_export_without_from_exports_first(tmp_path, batch, reference):
    int8 = export(
        tmp_path / "int8", "--format", "openvino-int8", "--calibration", str(GOOD), "--calibration-limit", "2"
    )
    quant = json.loads((int8 / SIDECAR).read_text())["quantization"]
    assert quant["calibration_source"] == {"kind": "folder", "folder": str(GOOD)}
    maps, scores = deviation(run("openvino", int8, batch)[0], reference)
    assert maps <= 0.1 and scores <= 0.1, (maps, scores)


def test_calibration_source_product_else_folder_and_one_line_refusals(exported, tmp_path, capsys):
    """Which images calibrate, decided before the model loads: references, else the folder, else one line."""
    data = tmp_path / "data"
    product_store(data, "empty", [])
    base = ["export", "--format", "openvino-int8", "--out", str(tmp_path / "o"), "--data-dir", str(data)]
    args = build_parser().parse_args(
        [*base, "--product", "empty", "--calibration", str(GOOD), "--calibration-limit", "3"]
    )
    samples, source = calibration_samples(args)
    assert source == {"kind": "folder", "folder": str(GOOD)}
    assert [name for name, _ in samples] == [str(p) for p in sorted(GOOD.iterdir())[:3]]
    assert samples[0][1] == sorted(GOOD.iterdir())[0].read_bytes()
    from_fp32 = ["--from", str(exported), "--calibration", str(GOOD)]
    refusals = {
        "--product empty has no reference images; add some or give --calibration FOLDER": ["--product", "empty"],
        "--product nosuch: no such product in the service's database": ["--product", "nosuch"],
        "needs --product NAME (its references) or --calibration FOLDER": [],
        "onnx takes none of them": ["--format", "onnx", "--calibration", str(GOOD)],
        "exported from another backbone": [*from_fp32, "--backbone", str(REF_PROMPTS)],
        "exported for preset mvtec, asked for visa": [*from_fp32, "--preset", "visa"],
        f"{tmp_path / 'none' / 'inspections.db'}: no service database there": [
            "--product", "x", "--data-dir", str(tmp_path / "none"),
        ],
    }  # fmt: skip
    for message, extra in refusals.items():
        capsys.readouterr()
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "none").exists() and not (tmp_path / "o").exists()


def test_corrupt_graph_is_refused(exported, tmp_path, batch):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / SIDECAR).write_bytes((exported / SIDECAR).read_bytes())
    data = bytearray((exported / ONNX_GRAPH).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / ONNX_GRAPH).write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"dhr_vision.onnx: sha256 differs from dhr_export.json"):
        run("onnxruntime", bad, batch)
    (bad / SIDECAR).write_text("{not json")
    with pytest.raises(ExportError, match="unreadable sidecar"):
        run("onnxruntime", bad, batch)


def test_mismatched_export_is_refused(exported, batch):
    with pytest.raises(ExportError, match="exported for preset mvtec, asked for visa"):
        load("onnxruntime", exported, preset="visa")
    with pytest.raises(ExportError, match="exported from another backbone"):
        load("onnxruntime", exported, backbone=REF_PROMPTS)
    with pytest.raises(ExportError, match="asked for the ensemble"):
        load("openvino", exported, prompts="ensemble")
    with pytest.raises(ExportError, match="onnxruntime runs on cpu, not on device cuda"):
        load_exported("onnxruntime", exported, preset="mvtec", device="cuda")


def test_cli_predict_on_a_backend_and_its_one_line_refusal(exported, tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.open(FIXTURES / IMAGES[0]).save(img)
    args = ["predict", str(img), "--out", str(tmp_path / "o"), "--backbone", str(TINY_CLIP), "--preset", "mvtec"]
    assert main([*args, "--prompts", str(REF_PROMPTS), "--backend", "onnxruntime", "--export-dir", str(exported)]) == 0
    record = json.loads((tmp_path / "o" / "a.json").read_text())
    assert record["model"]["backend"] == "onnxruntime" and record["model"]["preset"] == "mvtec"
    capsys.readouterr()
    assert main([*args[:-1], "visa", "--backend", "openvino", "--export-dir", str(exported)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exported for preset mvtec, asked for visa" in err


def test_missing_backend_package_names_the_extra(monkeypatch):
    real_import = __import__("importlib").import_module

    def fake(name, *a):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real_import(name, *a)

    monkeypatch.setattr("service.engine.backends.importlib.import_module", fake)
    with pytest.raises(ExportError) as e:
        require("openvino", "DHR_BACKEND")
    assert str(e.value) == (
        "DHR_BACKEND openvino: the openvino package is not installed (pip install dhrclip-service[openvino])"
    )


def test_service_serves_an_exported_model(exported, tmp_path):
    from service.api import create_app

    settings = make_settings(tmp_path / "data", preset="mvtec", backend="onnxruntime", export_dir=exported)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        health = client.get("/health").json()
        assert health["model"]["backend"] == "onnxruntime" and health["preset"] == "mvtec"
        r = client.post("/segment", files=[png_file("x.png", 3)])
        assert r.status_code == 200, r.text
        (res,) = r.json()["results"]
        assert 0.0 <= res["score"] <= 1.0
    bad = make_settings(tmp_path / "d2", preset="visa", backend="openvino", export_dir=exported)
    with TestClient(create_app(bad)) as client:
        deadline = time.monotonic() + 60
        while (h := client.get("/health")).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert h.status_code == 503 and "exported for preset mvtec, asked for visa" in h.json()["reason"]


@pytest.mark.slow
def test_vit_l_336_random_export_runs_on_onnxruntime(tmp_path):
    """Full size: random ViT-L/14@336 exported on the CPU and run by ONNX Runtime, against torch fp32."""
    from service.engine.export import export_model
    from service.model import random_backbone

    model, info = build_model(random_backbone("ViT-L-14-336-quickgelu"), "ensemble", preset="mvtec")
    t0 = time.perf_counter()
    export_model(model, info, tmp_path / "vit_l")
    export_s = time.perf_counter() - t0
    size_mib = (tmp_path / "vit_l" / ONNX_GRAPH).stat().st_size / 2**20
    batch = stack_views([load_views(Image.open(FIXTURES / IMAGES[0]), model.cfg.preset)])
    with torch.inference_mode():
        ref = model(*batch)
    model_b, _ = load_exported("onnxruntime", tmp_path / "vit_l", preset="mvtec")
    with torch.inference_mode():
        out = model_b(*batch)
    maps, scores = deviation(out, ref)
    print(
        f"\nViT-L/14@336 export {export_s:.0f} s, graph {size_mib:.0f} MiB; ORT vs torch: maps {maps:.2e}, "
        f"score {scores:.2e}"
    )
    assert size_mib > 1000 and maps <= 1e-4 and scores <= 1e-4


@pytest.mark.parametrize("fmt", ["onnx", "openvino-int8"])
def test_an_out_that_is_a_file_is_one_line_before_the_model_loads(tmp_path, capsys, fmt):
    """Was a FileExistsError traceback once the model had loaded and the graph had been traced."""
    (tmp_path / "a_file").write_text("x")
    args = ["export", "--format", fmt, "--out", str(tmp_path / "a_file"), "--backbone", str(tmp_path / "never.pt")]
    assert main([*args, *(["--calibration", str(GOOD)] if fmt != "onnx" else [])]) == 2
    err = capsys.readouterr().err
    assert err == f"dhrclip export: --out {tmp_path / 'a_file'}: exists and is not a folder\n"


def test_a_sidecar_that_cannot_be_written_leaves_no_temporary_file(tmp_path):
    """json.dump failing half-way (here: a value JSON cannot hold) left a tmpXXXX.tmp in the export folder."""
    from service.engine.export import _write_json

    with pytest.raises(TypeError):
        _write_json(tmp_path, {"format": "x", "bad": object()})
    assert list(tmp_path.iterdir()) == []
