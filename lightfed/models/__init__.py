"""Ready-made LightningModules for the example configs (any LightningModule works with lightfed).

The Hugging Face models import transformers/peft only when instantiated.
"""

from lightfed.models.charlm import CharLSTM
from lightfed.models.hf import HFSequenceClassifier, LoRACNNClassifier
from lightfed.models.vision import CNNClassifier, MLPClassifier

__all__ = ["CNNClassifier", "CharLSTM", "HFSequenceClassifier", "LoRACNNClassifier", "MLPClassifier"]
