"""Small image classifiers: ordinary LightningModules, nothing federated about them."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_accuracy

from lightfed.models._args import check_optimizer, check_positive_int


class _Classifier(L.LightningModule):
    """Shared steps: cross-entropy loss, accuracy logged as ``{stage}_acc``, SGD or Adam."""

    net: nn.Module

    def __init__(
        self, num_classes: int, lr: float, momentum: float, optimizer: str, weight_decay: float, example_lr: float
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"model.optimizer must be 'sgd' or 'adam', got {optimizer!r}.")
        check_optimizer(lr, momentum, weight_decay, example_lr)
        check_positive_int(num_classes, "num_classes", 2, " (one class gives a loss of 0: nothing to learn)")
        self.num_classes = num_classes
        self.lr, self.momentum, self.optimizer_name, self.weight_decay = lr, momentum, optimizer, weight_decay

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def _eval(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}_loss", F.cross_entropy(logits, y), batch_size=len(y))
        acc = multiclass_accuracy(logits.argmax(-1), y, num_classes=self.num_classes, average="micro")
        self.log(f"{stage}_acc", acc, batch_size=len(y), prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


class MLPClassifier(_Classifier):
    """A multi-layer perceptron on flat inputs (digits: 64 -> 64 -> 10).

    Args:
        in_features: Input size.
        hidden: Hidden layer sizes.
        num_classes: Output classes.
        lr, momentum, optimizer, weight_decay: The local optimizer.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: list[int] | None = None,
        num_classes: int = 10,
        lr: float = 0.1,
        momentum: float = 0.0,
        optimizer: str = "sgd",
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(num_classes, lr, momentum, optimizer, weight_decay, example_lr=0.1)
        check_positive_int(in_features, "in_features")
        if hidden is not None:
            check_positive_int(hidden, "hidden")
        self.save_hyperparameters()
        sizes = [in_features, *(hidden if hidden is not None else [64])]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.net = nn.Sequential(*layers)


class CNNClassifier(_Classifier):
    """A small CNN (conv32-conv64-fc128) with GroupNorm (no BatchNorm: DP- and vmap-friendly).

    Args:
        in_channels: Image channels.
        image_size: Side of the (square) input image.
        num_classes: Output classes.
        width: Channels of the first conv layer (the second has twice as many).
        hidden: Units of the fully connected layer.
        lr, momentum, optimizer, weight_decay: The local optimizer.
        channels_last: Store the convolution weights channels-last (NHWC). On CPU oneDNN then runs the
            convolutions in NHWC: 7-33% faster per training step of the W2 CNN here, 8-15% per W2 round
            (benchmarks/README.md); values are unchanged, results equal up to float rounding.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        width: int = 32,
        hidden: int = 128,
        lr: float = 0.05,
        momentum: float = 0.0,
        optimizer: str = "sgd",
        weight_decay: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__(num_classes, lr, momentum, optimizer, weight_decay, example_lr=0.05)
        check_positive_int(in_channels, "in_channels")
        check_positive_int(image_size, "image_size", 4, " (two 2x2 poolings)")
        check_positive_int(hidden, "hidden")
        if not (isinstance(width, int) and width >= 4 and width % 4 == 0):
            raise ValueError(f"model.init_args.width must be a multiple of 4 (GroupNorm's 4 groups), got {width!r}; e.g. 32.")
        self.save_hyperparameters()
        side = image_size // 4
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(4, width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GroupNorm(4, 2 * width), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * side * side, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        self.net = nn.Sequential(self.features, self.head)
        if channels_last:
            self.to(memory_format=torch.channels_last)
