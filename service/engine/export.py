"""Export of the DHR vision path as one ONNX graph, and the sidecar that says what the graph is.

The graph is :class:`service.model.vision.ViewEncoder`: inputs ``whole`` (B, 3, S, S) and ``crops`` (B, 4, 3, P, P)
normalised float32 views, outputs ``whole_tokens`` (B, nl, Ls, D), ``whole_cls`` (B, D), ``crop_tokens``
(B, 4, nl, Lp, D), ``crop_cls`` (B, 4, D) float32; B is the one dynamic axis. Scoring stays in torch
(:meth:`DHRCLIP.score`), shared by every backend. The sidecar ``dhr_export.json`` holds the text features (2, D),
the preset and the numbers of the DHR config, the sha256 of the graph, the backbone and the prompts, and the
versions that made it; :func:`read_export` refuses a graph that does not match it (one line naming the file).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from service.errors import UserError
from service.model import DHRCLIP, PRESETS, DHRConfig, ModelInfo
from service.model.backbone import sha256_file

SIDECAR = "dhr_export.json"
ONNX_GRAPH = "dhr_vision.onnx"
FORMAT = "dhrclip-export/1"
OPSET = 21
INPUTS = ("whole", "crops")
OUTPUTS = ("whole_tokens", "whole_cls", "crop_tokens", "crop_cls")
BATCH_AXIS = "batch"  # the one dynamic axis's name in the graph
EXPORT_PRECISIONS = ("fp32", "fp16")
CONFIG_FIELDS = ("dpam", "features_list", "layer_features", "alpha", "temperature", "sigma", "topk_fraction")


class ExportError(UserError):
    """An exported model that cannot be used as asked; the message is one line naming the file and the fix."""


def _versions(*names: str) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def _made_by() -> dict:
    names = ("dhrclip-service", "torch", "open_clip_torch", "onnx", "onnxscript", "openvino", "nncf")
    return {"versions": _versions(*names), "created": datetime.now(UTC).isoformat(timespec="seconds")}


def example_views(cfg: DHRConfig, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normalised-looking views of the preset's sizes: whole (B, 3, S, S), crops (B, 4, 3, P, P)."""
    p = cfg.preset
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, 3, p.image_size, p.image_size, generator=g),
        torch.randn(batch, 4, 3, p.crop_size, p.crop_size, generator=g),
    )


def export_onnx_graph(model: DHRCLIP, path: Path) -> None:
    """Write ``model.encoder`` as one ONNX graph (dynamic batch, opset :data:`OPSET`) and check it with onnx."""
    import onnx  # the [onnx] extra

    encoder = model.encoder.eval()
    whole, crops = example_views(model.cfg)
    with torch.no_grad():
        encoder(whole, crops)  # fills the positional cache with real tensors before tracing
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=1024)
    torch.onnx.export(
        encoder,
        (whole, crops),
        str(path),
        input_names=list(INPUTS),
        output_names=list(OUTPUTS),
        dynamic_shapes={"whole": {0: batch}, "crops": {0: batch}},
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    onnx.checker.check_model(str(path), full_check=True)


def export_model(model: DHRCLIP, info: ModelInfo, out_dir: Path) -> Path:
    """Graph + sidecar into ``out_dir`` (created); returns the sidecar path. The model runs the torch tower."""
    if model.precision not in EXPORT_PRECISIONS:
        raise ExportError(f"--precision {model.precision}: ONNX export supports {', '.join(EXPORT_PRECISIONS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    graph = out_dir / ONNX_GRAPH
    export_onnx_graph(model, graph)
    return write_sidecar(model, info, out_dir, graph)


def write_sidecar(model: DHRCLIP, info: ModelInfo, out_dir: Path, graph: Path) -> Path:
    """The JSON that travels with ``graph`` (a file inside ``out_dir``) exported from ``model``."""
    cfg = model.cfg
    p = cfg.preset
    meta = {
        "format": FORMAT,
        "graph": graph.name,
        "files": {graph.name: sha256_file(graph)},
        "opset": OPSET,
        "precision": model.precision,
        "quantization": None,
        "inputs": {
            "whole": ["batch", 3, p.image_size, p.image_size],
            "crops": ["batch", 4, 3, p.crop_size, p.crop_size],
        },
        "outputs": list(OUTPUTS),
        "preset": {
            "name": p.name,
            "image_size": p.image_size,
            "crop_size": p.crop_size,
            "target_size": p.target_size,
        },
        "config": {name: getattr(cfg, name) for name in CONFIG_FIELDS},
        "text_features": model.text_features.cpu().tolist(),
        "backbone": {"name": info.backbone, "sha256": info.backbone_sha256},
        "prompts": {"id": info.prompts, "sha256": info.prompts_sha256, "kind": info.prompts_kind},
        **_made_by(),
    }
    return _write_json(out_dir, meta)


def derived_sidecar(exp: Exported, out_dir: Path, graph: Path, quantization: dict, extra_files=()) -> Path:
    """The sidecar of a graph made from the export ``exp`` (INT8): its model, preset, config and text features,
    with the new graph's files, precision and quantization."""
    meta = {
        **exp.meta,
        "graph": graph.name,
        "files": {f.name: sha256_file(f) for f in (graph, *extra_files)},
        "quantization": quantization,
        **_made_by(),
    }
    return _write_json(out_dir, meta)


def _write_json(out_dir: Path, meta: dict) -> Path:
    path = out_dir / SIDECAR
    with tempfile.NamedTemporaryFile("w", dir=out_dir, delete=False, suffix=".tmp") as f:
        try:
            json.dump(meta, f, indent=1)
        except BaseException:
            f.close()
            Path(f.name).unlink(missing_ok=True)  # a failed write leaves no temporary file behind
            raise
    Path(f.name).replace(path)  # readers never see half a sidecar
    return path


@dataclass(frozen=True)
class Exported:
    """A checked export directory: the graph file, the DHR config and text features to score with."""

    graph: Path
    graph_format: str  # "onnx" | "openvino"
    precision: str
    quantization: dict | None
    cfg: DHRConfig
    text_features: torch.Tensor  # (2, D) unit rows
    meta: dict

    def identity(self) -> dict:
        return {"backbone": self.meta["backbone"], "prompts": self.meta["prompts"]}


def _field(meta: dict, key: str, where: Path):
    if key not in meta:
        raise ExportError(f"{where}: sidecar lacks {key!r}; re-export with `dhrclip export`")
    return meta[key]


def read_export(export_dir: str | Path, preset: str | None = None) -> Exported:
    """Read and check ``export_dir``: sidecar readable, graph present with the sidecar's sha256, preset as asked."""
    d = Path(export_dir)
    side = d / SIDECAR
    if not side.is_file():
        raise ExportError(f"{side}: no exported model there (run `dhrclip export --out {d}`)")
    try:
        meta = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{side}: unreadable sidecar ({type(e).__name__}); re-export") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportError(f"{side}: not a {FORMAT} sidecar; re-export with this version")
    graph = d / str(_field(meta, "graph", side))
    if not graph.is_file():
        raise ExportError(f"{graph}: graph file named by {SIDECAR} is missing")
    files = _field(meta, "files", side)
    if not isinstance(files, dict) or graph.name not in files:
        raise ExportError(f"{side}: 'files' must map the graph's files to their sha256; re-export")
    for name, digest in files.items():
        f = d / str(name)
        if not f.is_file():
            raise ExportError(f"{f}: file named by {SIDECAR} is missing")
        if sha256_file(f) != digest:
            raise ExportError(f"{f}: sha256 differs from {SIDECAR} (corrupt or replaced file); re-export")
    p = _field(meta, "preset", side)
    name = p.get("name")
    known = PRESETS.get(name)
    geometry = (p.get("image_size"), p.get("crop_size"), p.get("target_size"))
    if known is None or geometry != (known.image_size, known.crop_size, known.target_size):
        raise ExportError(f"{side}: preset {name!r} {geometry} is not one this version knows; re-export")
    if preset is not None and preset != name:
        raise ExportError(f"{side}: exported for preset {name}, asked for {preset}; re-export with --preset {preset}")
    conf = dict(_field(meta, "config", side))
    conf["features_list"] = tuple(conf.get("features_list", ()))
    text = torch.tensor(_field(meta, "text_features", side), dtype=torch.float32)
    if text.ndim != 2 or text.shape[0] != 2:
        raise ExportError(f"{side}: text_features must be (2, D), got {tuple(text.shape)}; re-export")
    return Exported(
        graph=graph,
        graph_format="openvino" if graph.suffix == ".xml" else "onnx",
        precision=str(_field(meta, "precision", side)),
        quantization=meta.get("quantization"),
        cfg=DHRConfig(preset=known, **conf),
        text_features=text,
        meta=meta,
    )
