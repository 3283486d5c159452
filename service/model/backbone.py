"""Loading the frozen CLIP backbone.

Accepted sources (the architecture is always read off the tensor shapes, QuickGELU, fp32 parameters):

- an OpenAI-format state dict saved with ``torch.save`` (the fixture's ``clip_tiny_openai_format.pt``);
- an OpenAI TorchScript archive, as OpenAI distributes ``ViT-L-14-336px.pt``;
- an open_clip checkpoint (``{"state_dict": ...}``, optionally ``module.``-prefixed) or ``.safetensors`` file;
- ``"openai"``: the ViT-L-14-336 OpenAI weights from open_clip's caches (``~/.cache/clip`` or the Hugging Face
  hub cache), downloaded through open_clip only when ``allow_download`` is set.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from service.errors import UserError

if TYPE_CHECKING:  # open_clip (and timm, torchvision: ~220 MB) loads only where a CLIP is built
    from open_clip.model import CLIP

OPENAI_NAME = "ViT-L-14-336"
OPENAI_FILENAME = "ViT-L-14-336px.pt"
OPENAI_HF_REPO = "timm/vit_large_patch14_clip_336.openai"
OPENAI_SHA256_PREFIX = "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"


class BackboneError(UserError, RuntimeError):
    """A backbone that cannot be found or read; the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class BackboneInfo:
    name: str  # e.g. "ViT-L-14-336" or the file name
    path: str
    sha256: str
    vision_width: int
    vision_layers: int
    embed_dim: int


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a CLIP checkpoint in OpenAI key names (``visual.conv1.weight``, ``transformer.resblocks...``)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: backbone file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        elif _is_torchscript(path):
            # OpenAI's own distribution format; TorchScript archives are not pickles, so torch.load cannot read them.
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except BackboneError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure becomes one clear line
        raise BackboneError(f"{path}: not a readable CLIP checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BackboneError(f"{path}: expected a dict of tensors (a CLIP state dict)")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _count(sd: dict, prefix: str) -> int:
    return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})


def build_clip(sd: dict[str, torch.Tensor], source: str = "<state dict>") -> CLIP:
    """An fp32 open_clip ``CLIP`` (QuickGELU) whose architecture is read off the tensor shapes."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    required = [
        "visual.conv1.weight",
        "visual.positional_embedding",
        "visual.proj",
        "text_projection",
        "positional_embedding",
        "token_embedding.weight",
        "ln_final.weight",
    ]
    missing = [k for k in required if k not in sd]
    if missing:
        raise BackboneError(f"{source}: not a ViT CLIP state dict, missing {', '.join(missing)}")
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["ln_final.weight"].shape[0]
    vision_cfg = CLIPVisionCfg(
        layers=_count(sd, "visual.transformer.resblocks."),
        width=width,
        head_width=64,
        patch_size=patch,
        image_size=patch * grid,
    )
    text_cfg = CLIPTextCfg(
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        width=text_width,
        heads=max(1, text_width // 64),
        layers=_count(sd, "transformer.resblocks."),
    )
    with torch.device("meta"):  # no random weights made and thrown away: the file's tensors become the parameters
        model = CLIP(sd["text_projection"].shape[1], vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=True)
    sd = {k: v for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    result = model.load_state_dict(sd, strict=False, assign=True)
    bad = [k for k in result.missing_keys if k != "attn_mask"] + list(result.unexpected_keys)
    if bad:
        raise BackboneError(f"{source}: state dict does not fit the inferred architecture: {', '.join(bad[:5])}")
    n = text_cfg.context_length  # the text tower's causal mask, the one tensor a CLIP file does not carry
    model.register_buffer("attn_mask", torch.full((n, n), float("-inf")).triu_(1), persistent=False)
    left = [k for k, v in [*model.named_parameters(), *model.named_buffers()] if v.is_meta]
    if left:
        raise BackboneError(f"{source}: state dict does not fill the architecture: {', '.join(left[:5])}")
    return model.float().eval().requires_grad_(False)


def openai_cache_candidates(cache_dir: str | None = None) -> list[Path]:
    """Where open_clip keeps the ViT-L-14-336 OpenAI weights once downloaded."""
    out = [Path(cache_dir or os.path.expanduser("~/.cache/clip")) / OPENAI_FILENAME]
    try:
        from huggingface_hub import try_to_load_from_cache

        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(OPENAI_HF_REPO, name, cache_dir=cache_dir)
            if isinstance(hit, str):
                out.append(Path(hit))
    except ImportError:
        pass
    return out


def resolve_openai(cache_dir: str | None = None, allow_download: bool = False) -> Path:
    """Path of the cached OpenAI ViT-L-14-336 weights; downloads through open_clip only if allowed."""
    for cand in openai_cache_candidates(cache_dir):
        if cand.is_file():
            return cand
    why = "download disabled"
    if allow_download:
        import open_clip

        try:
            cfg = open_clip.get_pretrained_cfg(OPENAI_NAME, "openai")
            return Path(open_clip.download_pretrained(cfg, cache_dir=cache_dir))
        except Exception as e:  # noqa: BLE001 - no network is the common case here
            why = f"download failed: {type(e).__name__}"
    raise BackboneError(
        f"OpenAI {OPENAI_NAME} weights ({OPENAI_FILENAME}) are not in the open_clip cache ({why}); "
        f"copy {OPENAI_FILENAME} (sha256 {OPENAI_SHA256_PREFIX[:8]}...) to model_weights/backbone/ or point "
        "DHR_BACKBONE / --backbone at it (see model_weights/README.md)"
    )


def load_backbone(
    source: str | Path, *, cache_dir: str | None = None, allow_download: bool = False
) -> tuple[CLIP, BackboneInfo]:
    """(fp32 CLIP on the CPU, identity) for a file path or ``"openai"``."""
    path = resolve_openai(cache_dir, allow_download) if str(source) == "openai" else Path(source)
    model = build_clip(read_state_dict(path), str(path))
    vis = model.visual
    name = OPENAI_NAME if str(source) == "openai" else path.name
    info = BackboneInfo(
        name=name,
        path=str(path),
        sha256=sha256_file(path),
        vision_width=vis.conv1.out_channels,
        vision_layers=len(vis.transformer.resblocks),
        embed_dim=vis.proj.shape[1],
    )
    return model, info


def random_backbone(model_name: str = "ViT-L-14-336-quickgelu", seed: int = 0) -> CLIP:
    """A randomly initialised open_clip model of a registered architecture (benchmarks, smoke tests)."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=True)
    return model.float().eval().requires_grad_(False)
