"""lightfed's sequence classifier (an encoder, pooling, a linear head) as Hugging Face's Auto classes load it.

:func:`lightfed.models.hf.export_peft` copies this file beside the merged weights and names it in the config's
``auto_map``, so ``AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)`` builds
:class:`PooledEncoderForSequenceClassification` from the folder alone. It therefore imports only ``torch`` and
``transformers`` (Hugging Face copies it into its module cache and imports it there).

The model is the one :class:`lightfed.models.hf.HFSequenceClassifier` trains: any ``AutoModel`` encoder
without its ``[CLS]`` pooler, the sentence embedding

.. math::

    e = \\frac{\\sum_t m_t h_t}{\\max(1, \\sum_t m_t)} \\ (\\text{mean}), \\qquad e = h_0 \\ (\\text{cls}),

of the last hidden states ``h`` under the attention mask ``m`` (sentence-transformers' mean pooling, Reimers
and Gurevych, "Sentence-BERT", EMNLP 2019), dropout, and logits ``W e + b``. BERT's own
``BertForSequenceClassification`` computes ``W tanh(P h_0 + c) + b`` instead (a trained ``[CLS]`` pooler), a
different function, which is why the export ships this class rather than mapping onto BERT's.

The state-dict keys are lightfed's: ``encoder.*`` (the encoder's own keys below it) and ``head.weight``,
``head.bias``. The config, :class:`PooledEncoderConfig`, has its own ``model_type`` and holds the encoder's
config as ``encoder_config``: without ``trust_remote_code=True`` an Auto class refuses the folder, instead of
loading BERT's own classifier over it with every weight missing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

__all__ = ["PooledEncoderConfig", "PooledEncoderForSequenceClassification", "pool"]

POOLINGS = ("mean", "cls")


def pool(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """The sentence embedding ``(B, H)`` of hidden states ``(B, T, H)``: masked mean or first token."""
    if pooling == "cls":
        return hidden[:, 0]
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class PooledEncoderConfig(PretrainedConfig):
    """The encoder's config (any ``AutoConfig`` model type), the pooling and the head's dropout.

    Args:
        encoder_config: The encoder's config, or its dict (with its ``model_type``).
        pooling: ``"mean"`` (masked mean of the last hidden states) or ``"cls"`` (the first token's state).
        classifier_dropout: Dropout on the pooled embedding (inactive in ``eval()``).
        **kwargs: ``PretrainedConfig``'s (``num_labels``, ``id2label``, ...).
    """

    model_type = "lightfed_pooled_encoder"

    def __init__(
        self,
        encoder_config: PretrainedConfig | dict[str, Any] | None = None,
        pooling: str = "mean",
        classifier_dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
        if isinstance(encoder_config, dict):
            encoder_config = AutoConfig.for_model(**encoder_config)
        self.encoder_config = encoder_config
        self.pooling, self.classifier_dropout = pooling, classifier_dropout
        super().__init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if isinstance(self.encoder_config, PretrainedConfig):
            out["encoder_config"] = self.encoder_config.to_dict()
        return out


class PooledEncoderForSequenceClassification(PreTrainedModel):
    """An ``AutoModel`` encoder (no pooler), mean or ``[CLS]`` pooling, dropout and a linear head.

    Args:
        config: The encoder's config, the pooling, the dropout and ``num_labels``.
    """

    config_class = PooledEncoderConfig
    base_model_prefix = "encoder"
    # the attention runs inside the encoder, built by AutoModel.from_config, which checks its own support
    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = _supports_attention_backend = True

    def __init__(self, config: PooledEncoderConfig) -> None:
        super().__init__(config)
        self.pooling = config.pooling
        self.encoder = AutoModel.from_config(config.encoder_config)
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # the [CLS] pooler is not part of this model
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.head = nn.Linear(config.encoder_config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """The encoder's own initialisation of its modules (BERT's ``position_ids`` buffer included)."""
        encoder = getattr(self, "encoder", None)  # None while PreTrainedModel.__init__ runs
        if encoder is not None and hasattr(encoder, "_init_weights"):
            encoder._init_weights(module)
        else:
            super()._init_weights(module)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        """Logits ``(B, num_labels)`` and, with ``labels``, the mean cross-entropy."""
        if attention_mask is None:
            assert input_ids is not None, "give input_ids (or inputs_embeds with an attention_mask)"
            attention_mask = torch.ones_like(input_ids)
        kwargs.pop("return_dict", None)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        logits = self.head(self.dropout(pool(hidden, attention_mask, self.pooling)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
