"""Ready-made LightningModules for the example configs (any LightningModule works with lightfed).

The models are imported on first use (PEP 562), so a plugin that needs only :mod:`lightfed.models.lora`
(the LoRA payload layout, rank tiers) does not import Lightning; the Hugging Face models import
transformers/peft only when instantiated (:func:`lightfed.models.hf.export_peft` writes their adapters).
"""

from __future__ import annotations

from lightfed._lazy import lazy_exports

_WHERE = {
    "CausalLM": "lightfed.models.causal_lm",
    "CNNClassifier": "lightfed.models.vision",
    "CharLSTM": "lightfed.models.charlm",
    "HFSequenceClassifier": "lightfed.models.hf",
    "LoRACNNClassifier": "lightfed.models.hf",
    "MLPClassifier": "lightfed.models.vision",
}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
