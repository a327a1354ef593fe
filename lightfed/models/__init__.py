"""Ready-made LightningModules for the example configs (any LightningModule works with lightfed)."""

from lightfed.models.vision import CNNClassifier, MLPClassifier

__all__ = ["CNNClassifier", "MLPClassifier"]
