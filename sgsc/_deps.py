"""Optional dependencies: imported where they are used, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """``importlib.import_module(module)``, or an ``ImportError`` saying ``pip install 'sgsc[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is needed here and is not installed ({exc}); install it with: pip install 'sgsc[{extra}]'"
        ) from exc
