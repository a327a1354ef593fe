"""Every shipped model refuses a bad argument at construction, naming ``model.init_args.<field>`` and the fix.

Before, ``lr: 0`` trained nothing without a word and a negative lr failed only at the first client visit with
torch's message. The checks run before anything is built or loaded (no pretrained encoder, no ``peft``).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest

import lightfed.models
from lightfed.models import (
    CausalLM,
    CharLSTM,
    CNNClassifier,
    HFSequenceClassifier,
    LoRACNNClassifier,
    MLPClassifier,
)

# The arguments each model needs to get as far as its checks; a model_dir that does not exist makes a missing
# check show as FileNotFoundError rather than passing by accident.
REQUIRED: dict[type, dict[str, Any]] = {
    MLPClassifier: {},
    CNNClassifier: {},
    CharLSTM: {},
    LoRACNNClassifier: {"lora": {"r": 2, "target_modules": ["head.1"]}},
    HFSequenceClassifier: {"num_classes": 3, "model_dir": "/nonexistent/model"},
    CausalLM: {"model": "/nonexistent/model"},
}

OPTIMIZER_CASES = [
    ("lr", 0.0),
    ("lr", -0.1),
    ("lr", math.nan),
    ("lr", math.inf),
    ("momentum", -0.1),
    ("momentum", 1.0),
    ("momentum", math.nan),
    ("weight_decay", -1e-4),
    ("weight_decay", math.nan),
]

STRUCTURE_CASES = [
    (MLPClassifier, "num_classes", 1),
    (MLPClassifier, "in_features", 0),
    (MLPClassifier, "hidden", [64, 0]),
    (CNNClassifier, "num_classes", 0),
    (CNNClassifier, "in_channels", 0),
    (CNNClassifier, "image_size", 3),
    (CNNClassifier, "width", 6),
    (CNNClassifier, "hidden", 0),
    (CharLSTM, "vocab_size", 1),
    (CharLSTM, "embed_dim", 0),
    (CharLSTM, "hidden", 0),
    (CharLSTM, "num_layers", 0),
    (HFSequenceClassifier, "dropout", 1.0),
    (HFSequenceClassifier, "dropout", -0.1),
]


def test_every_shipped_model_is_covered() -> None:
    shipped = {getattr(lightfed.models, name) for name in lightfed.models.__all__}
    assert shipped == set(REQUIRED)


@pytest.mark.parametrize(("field", "value"), OPTIMIZER_CASES)
@pytest.mark.parametrize("cls", list(REQUIRED), ids=lambda c: c.__name__)
def test_optimizer_arguments_are_checked_at_construction(cls: type, field: str, value: float) -> None:
    # Prepare
    assert field in inspect.signature(cls).parameters

    # Execute / Assert: the message names the config key, the value given and what is allowed
    with pytest.raises(ValueError, match=rf"model\.init_args\.{field} must be .*, got {value}"):
        cls(**REQUIRED[cls], **{field: value})


def test_lr_zero_says_it_trains_nothing() -> None:
    with pytest.raises(ValueError, match=r"model\.init_args\.lr must be > 0 and finite, got 0\.0.*trains nothing.*model\.init_args\.lr: 0\.1"):
        MLPClassifier(lr=0.0)


@pytest.mark.parametrize(("cls", "field", "value"), STRUCTURE_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_structural_arguments_are_checked(cls: type, field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"model\.init_args\.{field}"):
        cls(**REQUIRED[cls], **{field: value})


@pytest.mark.parametrize("cls", [MLPClassifier, CNNClassifier, CharLSTM], ids=lambda c: c.__name__)
def test_good_arguments_still_build(cls: type) -> None:
    model = cls(lr=1e-3, momentum=0.9, weight_decay=1e-4, optimizer="sgd")
    assert model.lr == 1e-3 and model.momentum == 0.9 and model.weight_decay == 1e-4
