"""Model-alone throughput of DHR-CLIP: images/s, peak memory, FLOPs and achieved/peak matmul throughput.

Full-size random ViT-L/14@336 (QuickGELU), preset mvtec by default. For each precision and batch size, the
batched model (one tower pass of 5B views, Gaussian on the device) is timed beside a naive loop of the same code
(5 separate views at batch 1, per-image CPU scipy Gaussian) in the same process. Also measures the machine's own
matmul peak, counts the FLOPs of one image, and prints bf16's deviation from fp32 on the maps.

    .venv/bin/python bench/model_throughput.py [--device cuda] [--batch-sizes 1,4] [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import time

import service  # noqa: F401 - applies the thread policy before torch loads OpenMP (service/runtime.py)

# isort: split
import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from service.model import DHRCLIP, DHRConfig, get_preset, random_backbone
from service.model.dhrclip import dhr_maps, dtype_of
from service.model.preprocess import normalize
from service.model.scoring import reference_image_score
from service.model.vision import VisionFeatures


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (peak RSS) on Linux
            f.write("5")


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def matmul_peak(device: str, dtype: torch.dtype, n: int = 4096, seconds: float = 3.0) -> float:
    """Best achieved FLOP/s of an n x n x n matmul: the machine's practical peak for this dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def analytic_flops(width: int, layers: int, mlp: int, tokens: int, dual: int, views: int) -> float:
    """Matmul FLOPs of one image: per block 2L(3W^2 + W^2 + 2 W mlp) + attention 4 L^2 W; V-V adds 4L^2W + 2LW^2."""
    block = 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width
    vv = 4 * tokens * tokens * width + 2 * tokens * width * width
    return views * (layers * block + dual * vv)


def counted_flops(model: DHRCLIP, whole, crops) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        model(whole, crops)
    return float(fc.get_total_flops())


def naive(model: DHRCLIP, whole_u8: torch.Tensor, crops_u8: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The reference's structure with our code: per image, 5 tower calls at batch 1, scipy Gaussian on the CPU."""
    cfg, dev, dtype = model.cfg, model.device, dtype_of(model.precision)
    maps, scores = [], []
    with torch.inference_mode():
        for b in range(whole_u8.shape[0]):
            views = [whole_u8[b]] + [crops_u8[b, k] for k in range(4)]
            feats = [model.tower(normalize(v.to(dev), dtype)[None]) for v in views]
            fw = feats[0]
            fc = VisionFeatures(
                torch.stack([f.tokens[0] for f in feats[1:]])[None], torch.stack([f.cls[0] for f in feats[1:]])[None]
            )
            m = dhr_maps(fw.tokens, fc.tokens, model.text_features, cfg)[:, :, 0]
            raw = (m[:, 0] * len(cfg.features_list)).cpu().numpy()[0]
            maps.append(gaussian_filter(raw, cfg.sigma) / len(cfg.features_list))
            scores.append(reference_image_score(fw.cls, fc.cls, model.text_features, cfg.alpha, cfg.temperature))
    return np.stack(maps), torch.cat(scores).cpu().numpy()


def timed(fn, device: str, iters: int) -> tuple[float, object]:
    out = fn()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn()
    sync(device)
    return (time.perf_counter() - t0) / iters, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="mvtec")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--model", default="ViT-L-14-336-quickgelu")
    args = ap.parse_args()
    dev, preset = args.device, get_preset(args.preset)
    torch.manual_seed(0)
    clip = random_backbone(args.model)
    vis = clip.visual
    width, layers = vis.conv1.out_channels, len(vis.transformer.resblocks)
    mlp = vis.transformer.resblocks[0].mlp.c_fc.out_features
    g_s, g_p = preset.image_size // 14, preset.crop_size // 14
    flops = analytic_flops(width, layers, mlp, g_s * g_s + 1, 19, 1) + analytic_flops(
        width, layers, mlp, g_p * g_p + 1, 19, 4
    )
    print(
        f"device {dev} ({torch.cuda.get_device_name() if dev.startswith('cuda') else 'CPU'}), "
        f"threads {torch.get_num_threads()}, torch {torch.__version__}, model {args.model}, preset {preset}"
    )
    peaks = {p: matmul_peak(dev, dtype_of(p)) for p in args.precisions.split(",")}
    for p, v in peaks.items():
        print(f"matmul peak {p}: {v / 1e12:.3f} TFLOP/s (4096^3)")
    bmax = max(int(b) for b in args.batch_sizes.split(","))
    rng = np.random.default_rng(0)
    whole_all = torch.from_numpy(rng.integers(0, 256, (bmax, preset.image_size, preset.image_size, 3), np.uint8))
    crops_all = torch.from_numpy(rng.integers(0, 256, (bmax, 4, preset.crop_size, preset.crop_size, 3), np.uint8))
    text = torch.nn.functional.normalize(torch.randn(2, vis.proj.shape[1]), dim=-1)
    ref_maps = None
    for prec in args.precisions.split(","):
        model = DHRCLIP(vis, text, DHRConfig(preset=preset), prec)
        model = model.to(dev).eval()
        if prec == args.precisions.split(",")[0]:
            counted = counted_flops(model, whole_all[:1], crops_all[:1])
            print(
                f"FLOPs per image: analytic {flops / 1e12:.3f} T, counted (torch FlopCounterMode) "
                f"{counted / 1e12:.3f} T (the counter skips fused SDPA kernels on CPU: attention is the difference)"
            )
        for b in (int(x) for x in args.batch_sizes.split(",")):
            w, c = whole_all[:b], crops_all[:b]
            reset_peak(dev)
            dt, out = timed(lambda w=w, c=c, m=model: m(w, c), dev, args.iters)
            mem = peak_mb(dev)
            ach = flops * b / dt
            line = (
                f"{prec} batch {b}: {b / dt:.3f} img/s, {dt / b * 1000:.0f} ms/img, peak mem {mem:.0f} MB, "
                f"{ach / 1e12:.3f} TFLOP/s = {100 * ach / peaks[prec]:.1f}% of {prec} matmul peak"
            )
            if not args.no_naive:
                reset_peak(dev)
                dn, (nmaps, _) = timed(lambda w=w, c=c, m=model: naive(m, w, c), dev, args.iters)
                dmap = np.abs(nmaps - out.anomaly_map.float().cpu().numpy()).max()
                line += (
                    f" | naive loop: {b / dn:.3f} img/s, peak {peak_mb(dev):.0f} MB, speed-up {dn / dt:.2f}x, "
                    f"max map diff {dmap:.2e}"
                )
            print(line, flush=True)
            if b == 1:
                maps = out.anomaly_map.float().cpu()
                if ref_maps is None:
                    ref_maps = (prec, maps, out.reference.float().cpu())
                else:
                    print(
                        f"{prec} vs {ref_maps[0]} max deviation: anomaly map "
                        f"{(maps - ref_maps[1]).abs().max():.3e}, image score "
                        f"{(out.reference.float().cpu() - ref_maps[2]).abs().max():.3e}"
                    )


if __name__ == "__main__":
    main()
