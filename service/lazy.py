"""Packages whose re-exported names are imported on first use (PEP 562), so that importing a package is cheap.

``dhrclip --help`` and the argument definitions of every sub-command import only the standard library and our
choice tables; torch, open_clip, OpenCV, scikit-learn and FastAPI load when a sub-command's handler first uses a
name that needs them. A package lists ``{".submodule": ("Name", ...)}`` and installs the hooks::

    __getattr__, __dir__ = lazy_exports(__name__, globals(), {".loader": ("load_model", "ModelInfo")})

``from package import load_model`` then imports ``package.loader`` at that moment (once; the name is cached in the
package's namespace).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(
    package: str, namespace: dict, exports: Mapping[str, tuple[str, ...]]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` that import ``exports`` (module -> names) on first access."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *where})

    return __getattr__, __dir__
