"""Paths of the shared test assets (``../shared`` beside the repository), for the tests and the benchmarks.

The one definition: ``bench/`` scripts import it as ``tests.paths`` (with the repository root on ``sys.path``).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures" / "reference_parity"
TINY_CLIP = FIXTURES / "clip_tiny_openai_format.pt"
REF_PROMPTS = FIXTURES / "prompt_learner_checkpoint.pth"
REAL_DEFECTS = SHARED / "data" / "real_defects"

# The tiny fixture CLIP with its reference prompts at preset fast, as command-line options of predict/evaluate
TINY_MODEL_ARGS = ("--backbone", str(TINY_CLIP), "--prompts", str(REF_PROMPTS), "--preset", "fast")
