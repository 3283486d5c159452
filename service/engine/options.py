"""Choice tables of the engine (standard library only): how views are made and whether the vision tower is compiled.

Each table names its choices once, with what each does; ``Literal`` types, the settings' validation and
descriptions, and ``--help-settings`` derive from them.
"""

from __future__ import annotations

from typing import Literal

# DHR_PREPROCESS: where uploads become views (service.engine.device_views)
PREPROCESS = {
    "auto": "device-decode when the model runs on CUDA, else cpu",
    "cpu": "Pillow decodes, resizes and cuts the views on the CPU (the reference-parity path)",
    "device": "Pillow decodes; the image is copied (pinned, non-blocking) to the model's device, where torch resizes "
    "and cuts the views",
    "device-decode": "as device, and JPEG uploads are decoded on the device by torchvision (nvJPEG on CUDA)",
}
PREPROCESS_MODES = tuple(PREPROCESS)
PreprocessMode = Literal[PREPROCESS_MODES]

# DHR_COMPILE: whether the torch vision tower runs under torch.compile (service.engine.buckets)
COMPILE = {
    "off": "the vision tower runs eagerly, batches at their own size",
    "default": "torch.compile (inductor) of the vision tower; batches are padded to the next bucket size (1, 2, 4, "
    "... up to max_batch_size) so that each bucket compiles once, at warm-up",
    "reduce-overhead": "as default, and replayed as CUDA graphs (least launch overhead, for small batches on CUDA)",
}
COMPILE_MODES = tuple(COMPILE)
CompileMode = Literal[COMPILE_MODES]
