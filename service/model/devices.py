"""Device names: ``auto`` resolution and a clear one-line error for a device this machine does not have."""

from __future__ import annotations

import torch

from service.errors import UserError


def resolve_device(name: str | None, label: str = "--device") -> str:
    """``auto``/None -> ``cuda`` when available, else ``cpu``; cpu, cuda, cuda:N and mps are checked to exist.

    ``label`` names the setting in the message (``--device`` on the command line, ``DHR_DEVICE`` in the service).
    """
    if name is None or name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"{label} {name!r} is not a device name (auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{label} {name}: torch sees no CUDA device on this machine (use cpu or auto)")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise UserError(f"{label} {name}: only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UserError(f"{label} mps: the MPS backend is not available (use cpu or auto)")
    elif dev.type != "cpu":
        raise UserError(f"{label} {name}: only cpu, cuda and mps are supported")
    return name
