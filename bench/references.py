"""Cost and effect of good reference images (normal memory), measured in one run.

Part 1, full-size random ViT-L/14@336 (QuickGELU), preset mvtec, fp32 on the CPU (or ``--device``):

* extra time per image with 1, 4 and 16 references against none. The vision pass does not depend on the memory,
  so it is timed once (``encode``) and the scoring is timed per memory size (best of ``--repeats``):
  ``extra_k = (score_k - score_0) / (encode + score_0)``. Targets: <= 5 % at 4 references, <= 15 % at 16.
  The memory of k references is the encoded reference's tokens plus k - 1 copies with small noise (re-normalised):
  same sizes as k real references, so the same nearest-neighbour cost.
* memory bytes per reference and the time to add one (vision pass + memory + serialisation), uncapped memory.

Part 2, tiny random CLIP of the parity fixtures, preset fast: ``../shared/data/real_defects`` class
``magnetic_tile``, 0-shot against K-shot (K good train images as references) image and pixel AUROC, service
protocol, through ``service.evaluate`` (the same path as ``dhrclip evaluate --shots``).

    nice -n 10 .venv/bin/python bench/references.py [--images 2] [--repeats 3] [--shots 4] [--skip-fullsize]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.data import load_dataset  # noqa: E402
from service.engine.knowledge import features_to_bytes  # noqa: E402
from service.evaluate.runner import evaluate  # noqa: E402
from service.evaluate.shots import few_shot_memories  # noqa: E402
from service.model import DHRCLIP, DHRConfig, get_preset, load_model, random_backbone  # noqa: E402
from service.model.memory import NormalMemory, concat_memories, memory_from_features  # noqa: E402

SHARED = ROOT.parent / "shared"
REFERENCE_SIZES = (1, 4, 16)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def noisy_copies(memory: NormalMemory, k: int, seed: int = 0) -> NormalMemory:
    """``memory`` and k - 1 perturbed, re-normalised copies of it (k references' worth of tokens)."""
    gen = torch.Generator().manual_seed(seed)
    parts = [memory]
    for _ in range(k - 1):
        parts.append(
            NormalMemory(
                *(torch.nn.functional.normalize(t + 0.05 * torch.randn(t.shape, generator=gen), dim=-1) for t in memory)
            )
        )
    return concat_memories(parts)


@torch.inference_mode()
def fullsize(args) -> None:
    preset = get_preset("mvtec")
    clip = random_backbone()
    text = torch.nn.functional.normalize(torch.randn(2, clip.visual.proj.shape[1]), dim=-1)
    model = DHRCLIP(clip.visual, text, DHRConfig(preset=preset)).to(args.device).eval()
    rng = np.random.default_rng(0)
    s, p, n = preset.image_size, preset.crop_size, args.images
    whole = torch.from_numpy(rng.integers(0, 256, (n + 1, s, s, 3), np.uint8))
    crops = torch.from_numpy(rng.integers(0, 256, (n + 1, 4, p, p, 3), np.uint8))
    print(f"part 1: random ViT-L/14@336, preset mvtec, {args.device}, threads {torch.get_num_threads()}, {n} images")

    t0 = time.perf_counter()
    rw, rc = model.encode_views(whole[n:], crops[n:])  # the reference image
    ref_memory = memory_from_features(rw, rc)
    blob = features_to_bytes(rw, rc)
    add_s = time.perf_counter() - t0
    print(
        f"add one reference: {add_s:.1f} s (vision pass + memory + {len(blob) / 2**20:.1f} MiB of stored features); "
        f"memory {ref_memory.nbytes / 2**20:.2f} MiB per reference ({ref_memory.size} tokens x "
        f"{ref_memory.whole.shape[-1]} dims x {ref_memory.whole.shape[0]} layer(s), float32)"
    )

    t0 = time.perf_counter()
    fw, fc = model.encode_views(whole[:n], crops[:n])
    encode_s = (time.perf_counter() - t0) / n
    memories = {k: noisy_copies(ref_memory, k).to(model.device) for k in REFERENCE_SIZES}
    score = {0: best_of(lambda: model.score(fw, fc), args.repeats) / n}
    for k, memory in memories.items():
        score[k] = best_of(lambda m=memory: model.score(fw, fc, (), m), args.repeats) / n
    base = encode_s + score[0]
    print(f"per image: vision pass {encode_s:.2f} s, zero-shot scoring {score[0] * 1000:.0f} ms -> {base:.2f} s")
    for k in REFERENCE_SIZES:
        extra = (score[k] - score[0]) / base
        target = {4: " (target <= 5 %)", 16: " (target <= 15 %)"}.get(k, "")
        print(
            f"{k:2d} reference(s): scoring {score[k] * 1000:.0f} ms, extra {1000 * (score[k] - score[0]):.0f} ms "
            f"= {100 * extra:.2f} % per image{target}"
        )


def tiny_auroc(args) -> None:
    fixtures = SHARED / "fixtures" / "reference_parity"
    model, _ = load_model(
        fixtures / "clip_tiny_openai_format.pt", fixtures / "prompt_learner_checkpoint.pth", preset="fast"
    )
    data = SHARED / "data" / "real_defects"
    test = load_dataset(data, split="test", classes=["magnetic_tile"], limit=args.limit)
    train = load_dataset(data, split="train", classes=["magnetic_tile"])
    n = len(test["magnetic_tile"])
    print(f"part 2: tiny random CLIP, preset fast, magnetic_tile: {n} test images, {args.shots} shots (seed 0)")
    run = {"protocol": "service", "batch_size": 4, "progress": False}
    zero = evaluate(model, test, **run)["classes"]["magnetic_tile"]
    memories = few_shot_memories(model, train, ["magnetic_tile"], args.shots, 0)
    few = evaluate(model, test, memories=memories, **run)["classes"]["magnetic_tile"]
    for name, row in (("0-shot", zero), (f"{args.shots}-shot", few)):
        images = ", ".join(f"{v} {row[v]['image_auroc']:.3f}" for v in ("reference", "map_max", "map_topk"))
        print(f"{name:>7}: pixel AUROC {row['pixel_auroc']:.3f}; image AUROC {images}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=2, help="query images of part 1")
    ap.add_argument("--repeats", type=int, default=3, help="scoring timings per memory size (best kept)")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--limit", type=int, default=None, help="first N test images of magnetic_tile (part 2)")
    ap.add_argument("--skip-fullsize", action="store_true")
    ap.add_argument("--skip-auroc", action="store_true")
    args = ap.parse_args()
    if not args.skip_fullsize:
        fullsize(args)
    if not args.skip_auroc:
        tiny_auroc(args)


if __name__ == "__main__":
    main()
