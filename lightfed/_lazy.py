"""Import a package's public names on first use (PEP 562), so importing the package costs nothing.

``lightfed``, ``lightfed.data`` and ``lightfed.models`` use it: ``lightfed --help`` and ``lightfed
strategies`` then never import Lightning, and ``from lightfed import FederatedTrainer`` works as before.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, where: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose public names live in the modules ``where`` maps them to.

    A name is imported on first access and then cached in the package, so later accesses are plain lookups.
    """
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *where})

    return __getattr__, __dir__
