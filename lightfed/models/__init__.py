"""Ready-made LightningModules for the example configs (any LightningModule works with lightfed).

The models are imported on first use (PEP 562), so a plugin that needs only :mod:`lightfed.models.lora`
(the LoRA payload layout, rank tiers) does not import Lightning; the Hugging Face models import
transformers/peft only when instantiated (:func:`lightfed.models.hf.export_peft` writes their adapters).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "CNNClassifier": "lightfed.models.vision",
    "CharLSTM": "lightfed.models.charlm",
    "HFSequenceClassifier": "lightfed.models.hf",
    "LoRACNNClassifier": "lightfed.models.hf",
    "MLPClassifier": "lightfed.models.vision",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lightfed.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
