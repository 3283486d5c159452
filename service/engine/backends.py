"""Backends of the vision path: torch, or an exported graph run by ONNX Runtime, OpenVINO or TensorRT.

Every backend is a :class:`~service.model.vision.ViewEncoder`-shaped callable, ``(whole (B, 3, S, S), crops
(B, 4, 3, P, P)) float32 -> (whole_tokens, whole_cls, crop_tokens, crop_cls)`` float32 torch tensors, plugged into
:class:`~service.model.DHRCLIP` in place of the torch tower; maps, stitching, Gaussian and image scores are the
same torch code for all of them, and the engine, batcher and API do not know which backend runs.

An exported model (``dhrclip export``) is self-contained: graph + sidecar (text features, DHR config). It is
refused at load with one line when its graph does not match its sidecar, when it was made for another preset, or
when the backbone / prompts the service is set to are available and their sha256 differ from the sidecar's.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from service.model import DHRCLIP, ModelInfo, load_checkpoint
from service.model.backbone import BackboneError, resolve_openai, sha256_file
from service.model.config import BACKENDS
from service.model.devices import resolve_device
from service.model.weights import WeightsChoice

from .export import BATCH_AXIS, OUTPUTS, Exported, ExportError, read_export


@dataclass(frozen=True)
class Backend:
    module: str  # the Python package it imports
    extra: str  # pip extra of dhrclip-service that installs it
    device: str  # the device type it runs on
    precisions: tuple[str, ...]  # run-time precisions it accepts (DHR_PRECISION / --precision)


SPECS: dict[str, Backend | None] = {
    "torch": None,
    "onnxruntime": Backend("onnxruntime", "onnx", "cpu", ("fp32", "fp16")),
    "openvino": Backend("openvino", "openvino", "cpu", ("fp32", "bf16")),
    "tensorrt": Backend("tensorrt", "tensorrt", "cuda", ("fp32", "fp16")),
}
assert tuple(SPECS) == BACKENDS, "one spec per backend name of service.model.config.BACKENDS"


def require(name: str, label: str = "--backend"):
    """Import the package of backend ``name``, or raise ExportError naming the extra to install."""
    spec = SPECS[name]
    try:
        return importlib.import_module(spec.module)
    except ImportError:
        raise ExportError(
            f"{label} {name}: the {spec.module} package is not installed (pip install dhrclip-service[{spec.extra}])"
        ) from None


def one_image_at_a_time(run, whole: torch.Tensor, crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``run`` (the graph compiled for batch 1: numpy whole (1, 3, S, S), crops (1, 4, 3, P, P) -> the outputs as
    numpy) over each image of the batch; the outputs concatenated (copies: runtimes reuse their buffers)."""
    w, c = whole.float().cpu().numpy(), crops.float().cpu().numpy()
    per_image = [run(w[i : i + 1], c[i : i + 1]) for i in range(w.shape[0])]
    return tuple(torch.from_numpy(np.concatenate(parts)).to(whole.device) for parts in zip(*per_image, strict=True))


class OnnxRuntimeEncoder:
    """The ONNX graph in an ONNX Runtime CPU session; the graph's precision is the export's.

    The session fixes the batch axis to 1 and runs a batch image by image: with static shapes ONNX Runtime plans
    one activation buffer that every call reuses, where a dynamic batch grows its memory arena call after call
    (+1.2 GiB per ViT-L image measured); one image is already 5 views x 577 tokens, a full matmul load for a CPU.
    """

    def __init__(self, exp: Exported, precision: str, label: str = "--backend"):
        ort = require("onnxruntime", label)
        if exp.graph_format != "onnx":
            raise ExportError(f"{exp.graph}: onnxruntime runs .onnx graphs; this one needs {label} openvino")
        if precision != exp.precision:
            raise ExportError(
                f"{exp.graph}: exported as {exp.precision}, asked to run {precision}; "
                f"set the precision to {exp.precision} or re-export with --precision {precision}"
            )
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_free_dimension_override_by_name(BATCH_AXIS, 1)
        opts.enable_cpu_mem_arena = False  # activations go back to the allocator after each call
        try:
            self.session = ort.InferenceSession(str(exp.graph), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - any runtime refusal becomes one line
            raise ExportError(f"{exp.graph}: onnxruntime cannot load it ({type(e).__name__}); re-export") from None

    def _run(self, whole: np.ndarray, crops: np.ndarray) -> list[np.ndarray]:
        return self.session.run(list(OUTPUTS), {"whole": whole, "crops": crops})

    def __call__(self, whole: torch.Tensor, crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return one_image_at_a_time(self._run, whole, crops)


OPENVINO_HINTS = {"fp32": "f32", "bf16": "bf16"}


class OpenVinoEncoder:
    """An ONNX graph or an OpenVINO IR (the INT8 export) compiled for the CPU; precision is the inference hint.

    Compiled for batch 1 (static shapes) and run image by image, as :class:`OnnxRuntimeEncoder`: the CPU plugin
    then plans one activation arena (~0.2 GiB for ViT-L) instead of ~0.9 GiB of per-shape pools.
    """

    def __init__(self, exp: Exported, precision: str, label: str = "--backend"):
        ov = require("openvino", label)
        core = ov.Core()
        p = exp.cfg.preset
        try:
            model = core.read_model(str(exp.graph))
            model.reshape({"whole": [1, 3, p.image_size, p.image_size], "crops": [1, 4, 3, p.crop_size, p.crop_size]})
            self.compiled = core.compile_model(
                model, "CPU", {"INFERENCE_PRECISION_HINT": OPENVINO_HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
            )
        except Exception as e:  # noqa: BLE001 - any runtime refusal becomes one line
            raise ExportError(f"{exp.graph}: openvino cannot load it ({type(e).__name__}); re-export") from None
        del model  # the compiled model keeps what it needs
        self.outputs = [self.compiled.output(name) for name in OUTPUTS]
        self.request = self.compiled.create_infer_request()  # the batcher calls from one thread

    def _run(self, whole: np.ndarray, crops: np.ndarray) -> list[np.ndarray]:
        res = self.request.infer({"whole": whole, "crops": crops})
        return [res[o] for o in self.outputs]

    def __call__(self, whole: torch.Tensor, crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return one_image_at_a_time(self._run, whole, crops)


class TensorRTEncoder:
    """A TensorRT engine built from the ONNX graph at load, one optimisation profile over batch 1..max_batch.

    fp16 runs an fp16-exported graph as a strongly typed network (the precision is the graph's).
    """

    def __init__(self, exp: Exported, precision: str, label: str = "--backend", max_batch: int = 8):
        trt = require("tensorrt", label)
        if exp.graph_format != "onnx" or precision != exp.precision:
            raise ExportError(f"{exp.graph}: tensorrt needs an .onnx graph exported as {precision}; re-export")
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(exp.graph)):
            raise ExportError(f"{exp.graph}: TensorRT cannot parse it ({parser.get_error(0)})")
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        p = exp.cfg.preset
        shapes = {"whole": (3, p.image_size, p.image_size), "crops": (4, 3, p.crop_size, p.crop_size)}
        for name, rest in shapes.items():
            profile.set_shape(name, (1, *rest), (max(1, max_batch // 2), *rest), (max_batch, *rest))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ExportError(f"{exp.graph}: TensorRT could not build an engine")
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        self.context = self.engine.create_execution_context()

    def __call__(self, whole: torch.Tensor, crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx = self.context
        inputs = {"whole": whole.float().contiguous(), "crops": crops.float().contiguous()}
        for name, t in inputs.items():
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in OUTPUTS:
            t = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=torch.float32, device=whole.device)
            ctx.set_tensor_address(name, t.data_ptr())
            outs.append(t)
        ctx.execute_async_v3(torch.cuda.current_stream(whole.device).cuda_stream)
        return tuple(outs)


ENCODERS = {"onnxruntime": OnnxRuntimeEncoder, "openvino": OpenVinoEncoder, "tensorrt": TensorRTEncoder}


def check_identity(exp: Exported, backbone: str | None, prompts: str | None) -> None:
    """Refuse an export made from other weights than the backbone / prompts asked for, where those are at hand.

    ``backbone``: a file is hashed; ``"openai"`` is hashed when open_clip's cache has it; None skips. ``prompts``:
    ``"ensemble"`` must match an ensemble export; a checkpoint file/dir is hashed; None skips.
    """
    side = exp.graph.parent / "dhr_export.json"
    want = exp.meta.get("backbone", {}).get("sha256")
    path = None
    if backbone == "openai":
        try:
            path = resolve_openai(allow_download=False)
        except BackboneError:
            path = None
    elif backbone is not None:
        path = Path(backbone)
        if not path.is_file():
            raise BackboneError(f"{path}: backbone file not found")
    if path is not None and sha256_file(path) != want:
        raise ExportError(f"{side}: exported from another backbone than {path} (sha256 differs); re-export")
    made = exp.meta.get("prompts", {})
    if prompts == "ensemble":
        if made.get("kind") != "ensemble":
            raise ExportError(f"{side}: exported with prompts {made.get('id')!r}, asked for the ensemble")
    elif prompts is not None:
        ck = load_checkpoint(prompts)
        if ck.sha256 != made.get("sha256"):
            raise ExportError(f"{side}: exported with prompts {made.get('id')!r}, not {ck.path} (sha256 differs)")


def load_exported(
    backend: str,
    export_dir: str | Path,
    *,
    preset: str,
    precision: str = "auto",
    device: str = "auto",
    backbone: str | None = None,
    prompts: str | None = None,
    label: str = "--backend",
) -> tuple[DHRCLIP, ModelInfo]:
    """A DHRCLIP whose vision path runs in ``backend`` from a checked export directory; ``precision`` "auto" is the
    precision the graph was exported with."""
    spec = SPECS[backend]
    if precision != "auto" and precision not in spec.precisions:
        raise ExportError(f"{label} {backend} runs precision {' or '.join(spec.precisions)}, not {precision}")
    if device not in (None, "auto") and device.split(":")[0] != spec.device:
        raise ExportError(f"{label} {backend} runs on {spec.device}, not on device {device}")
    dev = resolve_device(spec.device if device in (None, "auto") else device)
    exp = read_export(export_dir, preset)
    precision = exp.precision if precision == "auto" else precision
    check_identity(exp, backbone, prompts)
    encoder = ENCODERS[backend](exp, precision, label)
    model = DHRCLIP(None, exp.text_features, exp.cfg, precision, encoder=encoder).to(dev).eval()
    meta = exp.meta
    info = ModelInfo(
        backbone=meta["backbone"]["name"],
        backbone_sha256=meta["backbone"]["sha256"],
        prompts=meta["prompts"]["id"],
        prompts_sha256=meta["prompts"]["sha256"],
        prompts_kind=meta["prompts"]["kind"],
        preset=exp.cfg.preset.name,
        precision=precision,
        device=dev,
        layer_features=exp.cfg.layer_features,
        backend=backend,
        quantization=None if exp.quantization is None else exp.quantization.get("kind", "int8"),
    )
    return model, info


def load_for_backend(
    backend: str,
    choice: WeightsChoice,
    *,
    device: str | None = "auto",
    export_dir: str | Path | None = None,
    preset: str = "mvtec",
    precision: str = "auto",
    allow_download: bool = False,
    label: str = "--backend",
) -> tuple[DHRCLIP, ModelInfo]:
    """The one entry for the service and the CLI: torch loads ``choice``'s weights, any other backend an export.

    An export is checked against the backbone / prompts of ``choice`` that were named or found in model_weights/
    (defaults name nothing). ``device`` is the setting as given: ``auto`` means the backend's own device.
    """
    if backend not in BACKENDS:
        raise ExportError(f"{label} {backend!r}: choose one of {', '.join(BACKENDS)}")
    if SPECS[backend] is None:
        return choice.load(preset=preset, precision=precision, allow_download=allow_download)
    if export_dir is None:
        raise ExportError(f"{label} {backend} runs an exported model: give its directory (dhrclip export --out DIR)")
    return load_exported(
        backend,
        export_dir,
        preset=preset,
        precision=precision,
        device=device,
        backbone=None if choice.backbone_source == "default" else choice.backbone,
        prompts=None if choice.prompts_source == "default" else choice.prompts,
        label=label,
    )
