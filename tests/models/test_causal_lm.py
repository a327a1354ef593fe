"""CausalLM on a tiny random Llama: loss masking by hand, LoRA targets, the GGUF cache, export, a FedIT round."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lightfed import FederatedTrainer, FullParticipation
from lightfed.data.partition import Natural
from lightfed.data.text import ShakespeareCausalDataModule, prompt_completion
from lightfed.models import CausalLM, convert
from lightfed.models.causal_lm import GenerationSamples
from lightfed.models.lora import LoRALayout
from lightfed.params import ParamSpec
from lightfed.registry import STRATEGIES

LORA = {"r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def test_loss_is_the_completion_tokens_nll_computed_by_hand(tiny_llama: Path) -> None:
    model = CausalLM(model=str(tiny_llama), lora=LORA)
    tok = model.tokenizer
    prompt, completion = tok("Q: 2+2?", add_special_tokens=False)["input_ids"], tok(" 4", add_special_tokens=False)["input_ids"]
    ids, mask, labels = prompt_completion(prompt, completion, 12, pad_id=2)
    assert labels[: len(prompt)].eq(-100).all() and labels[len(prompt) + len(completion):].eq(-100).all()
    batch = {"input_ids": ids[None], "attention_mask": mask[None], "labels": labels[None]}
    loss = model.training_step(batch, 0)
    with torch.no_grad():
        logits = model.model(input_ids=ids[None], attention_mask=mask[None]).logits[0]
    by_hand = [-torch.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(len(prompt), len(prompt) + len(completion))]
    assert loss.item() == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-5)
    hf = model.model(input_ids=ids[None], attention_mask=mask[None], labels=labels[None]).loss  # HF's own masking
    assert loss.item() == pytest.approx(hf.item(), rel=1e-5)
    as_tuple = model.training_step((ids[None], mask[None], labels[None]), 0)
    assert as_tuple.item() == loss.item()


def test_evaluation_logs_perplexity_and_next_token_accuracy_over_the_split(tiny_llama: Path) -> None:
    model = CausalLM(model=str(tiny_llama))
    ids = torch.randint(3, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    logged: dict[str, float] = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, float(value))  # type: ignore[method-assign]
    model.on_test_epoch_start()
    model.test_step((ids[:2], mask[:2], ids[:2]), 0)
    model.test_step((ids[2:], mask[2:], ids[2:]), 1)
    model.on_test_epoch_end()
    with torch.no_grad():
        logp = torch.log_softmax(model.model(input_ids=ids).logits, -1)
    nll, hits, n = 0.0, 0, 0
    for b in range(3):
        for t in range(1, int(mask[b].sum())):
            nll -= logp[b, t - 1, ids[b, t]].item()
            hits += int(logp[b, t - 1].argmax() == ids[b, t])
            n += 1
    assert n == 8 + 8 + 4
    assert logged["test_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert logged["test_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert logged["test_acc"] == pytest.approx(hits / n)


def test_a_lora_target_that_matches_nothing_is_refused_by_name(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match=r"\['q_prj'\] match no layer.*'v_proj'"):
        CausalLM(model=str(tiny_llama), lora={**LORA, "target_modules": ["q_prj", "v_proj"]})


def test_lora_strategies_find_the_adapters(tiny_llama: Path) -> None:
    model = CausalLM(model=str(tiny_llama), lora=LORA, gradient_checkpointing=True)
    layout = LoRALayout.from_spec(ParamSpec.from_module(model))
    assert len(layout.layers) == 4 and {lay.rank for lay in layout.layers} == {2}
    assert all(lay.layer.startswith("model.model.layers.") for lay in layout.layers)
    batch = (torch.randint(3, 50, (2, 8)), torch.ones(2, 8, dtype=torch.long), torch.randint(3, 50, (2, 8)))
    model.train()
    model.training_step(batch, 0).backward()  # gradient checkpointing: the adapters still get gradients
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _fake_gguf_loader(tiny: Path, calls: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' GGUF reading replaced by the tiny model (counted), so the cache logic runs in CI."""
    import transformers

    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def model(folder: str, gguf_file: str | None = None, **kw):  # noqa: ANN202
        if gguf_file is not None:
            calls.append(gguf_file)
            return real_model(str(tiny), **kw)
        return real_model(folder, **kw)

    def tok(folder: str, gguf_file: str | None = None, **kw):  # noqa: ANN202
        return real_tok(str(tiny) if gguf_file is not None else folder, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tok)


def test_gguf_conversion_is_cached_by_the_files_hash(tiny_llama: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    _fake_gguf_loader(tiny_llama, calls, monkeypatch)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF version one")
    monkeypatch.setenv(convert.CACHE_ENV, str(tmp_path / "cache"))
    first = convert.resolve_model_dir(str(gguf))
    assert calls == ["m.gguf"] and first.parent == tmp_path / "cache"
    assert first.name == "gguf-" + convert.file_sha256(gguf)[:32]
    assert not (json.loads((first / "config.json").read_text()).keys() & {"quantization_config", "_name_or_path"})
    again = CausalLM(model=str(gguf), lora=LORA)  # reads the cache: no conversion
    assert calls == ["m.gguf"] and again.model_dir == first
    reference = CausalLM(model=str(tiny_llama), lora=LORA)
    ids = torch.randint(3, 50, (1, 7))
    assert torch.equal(again(ids), reference(ids))  # the cached weights are the model's, bit for bit
    gguf.write_bytes(b"GGUF version two")  # a changed file misses
    second = convert.resolve_model_dir(str(gguf))
    assert calls == ["m.gguf", "m.gguf"] and second != first
    assert convert.resolve_model_dir(str(gguf), cache_dir=str(tmp_path / "other")).parent == tmp_path / "other"


def test_export_gives_the_same_logits_and_no_absolute_path(tiny_llama: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = CausalLM(model=str(tiny_llama), lora=LORA)
    spec = ParamSpec.from_module(model)
    params = spec.flatten(spec.tensors(model)) + 0.05 * torch.randn(spec.numel, generator=torch.Generator().manual_seed(1))
    paths = model.export_peft(tmp_path / "peft", params, spec)
    spec.assign(spec.tensors(model), params)
    ids = torch.randint(3, 50, (2, 10))
    with torch.no_grad():
        ours = model(ids)
        merged = AutoModelForCausalLM.from_pretrained(str(paths["merged"])).eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
        adapted = PeftModel.from_pretrained(base, str(paths["adapter"])).eval()(input_ids=ids).logits
    assert torch.allclose(merged, ours, atol=1e-5) and torch.allclose(adapted, ours, atol=1e-5)
    assert not torch.allclose(ours, CausalLM(model=str(tiny_llama), lora=LORA)(ids), atol=1e-3)  # the update counts
    for f in paths["adapter"].glob("*.json"):
        text = f.read_text()
        assert str(tmp_path) not in text and str(tiny_llama) not in text and "/" not in json.loads(text).get(
            "base_model_name_or_path", "")


def test_one_fedit_round_through_the_trainer(tiny_llama: Path, tmp_path: Path) -> None:
    dm = ShakespeareCausalDataModule(
        Natural(min_size=4, max_clients=3), model=str(tiny_llama), block_size=32, plays=["macbeth"],
        held_out_speakers=2, held_out_min_lines=30, test_subset=16,
    )
    model = CausalLM(model=str(tiny_llama), lora=LORA, lr=1e-2)
    samples = GenerationSamples(["To be"], max_new_tokens=4)
    trainer = FederatedTrainer(
        rounds=1, sampler=FullParticipation(), strategy="FedITLoRA", local_steps=2, batch_size=4, logger=False,
        enable_progress_bar=False, default_root_dir=str(tmp_path), fed_eval_fraction=1.0, checkpoint_every=0,
        eval_batch_size=16, callbacks=[samples],
    )
    spec = ParamSpec.from_module(model)
    before = spec.flatten(spec.tensors(model)).clone()
    history = trainer.fit(model, dm)
    last = history[-1]
    assert last["round/updates"] == 3.0 and not torch.equal(trainer.global_params, before)
    assert last["central/test_ppl"] == pytest.approx(math.exp(last["central/test_loss"]), rel=1e-6)
    assert 0.0 <= last["federated/val_acc_worst10"] <= last["federated/val_acc_mean"] <= 1.0
    assert len(samples.last) == 1 and isinstance(samples.last[0], str)
    assert (trainer.log_dir / "peft" / "adapter" / "adapter_config.json").is_file()
    unseen = trainer.local.evaluate(dm.unseen_test_data(), trainer.global_params, "test", 16)
    assert unseen["test_ppl"] > 1.0


def _composition(kind: str) -> dict:
    from lightfed.privacy import DPFixedClipping
    from lightfed.secagg import SecAggPlus

    return {
        "FedIT+DP": dict(strategy=STRATEGIES.create("FedITLoRA", weighted=False), privacy=DPFixedClipping(clip_norm=0.1, noise_multiplier=0.5,
                                                                       clipping="client", verbose=False)),
        "FedIT+SecAgg": dict(strategy="FedITLoRA", secure_aggregation=SecAggPlus(clip=1.0, max_weight=64.0)),
        "FFALoRA": dict(strategy="FFALoRA", trainable=["*lora_B*"]),
        "FedSALoRA": dict(strategy="FedSALoRA"),
    }[kind]


@pytest.mark.parametrize("kind", ["FedIT+DP", "FedIT+SecAgg", "FFALoRA", "FedSALoRA"])
def test_dict_batches_travel_through_dp_secure_aggregation_and_the_lora_strategies(
    kind: str, tiny_llama: Path, tmp_path: Path
) -> None:
    dm = ShakespeareCausalDataModule(Natural(min_size=4, max_clients=3), model=str(tiny_llama), block_size=32,
                                     plays=["macbeth"], held_out_speakers=2, test_subset=8)
    model = CausalLM(model=str(tiny_llama), lora=LORA, lr=1e-2)
    rounds = 2 if kind == "FedSALoRA" else 1  # B starts at zero, so A has no gradient before B is trained
    trainer = FederatedTrainer(rounds=rounds, sampler=FullParticipation(), local_steps=1, batch_size=4, logger=False,
                               enable_progress_bar=False, default_root_dir=str(tmp_path), fed_eval_fraction=0.0,
                               checkpoint_every=0, eval_batch_size=8, **_composition(kind))
    spec = ParamSpec.from_module(model, trainer.trainable)
    before = spec.flatten(spec.tensors(model)).clone()
    last = trainer.fit(model, dm)[-1]
    assert last["round/updates"] == 3.0 and math.isfinite(last["central/test_ppl"])
    assert not torch.equal(trainer.global_params, before)


def test_federated_perplexity_worst_ten_percent_is_the_highest_clients(tiny_llama: Path, tmp_path: Path) -> None:
    dm = ShakespeareCausalDataModule(Natural(min_size=4, max_clients=3), model=str(tiny_llama), block_size=32,
                                     plays=["macbeth"], held_out_speakers=2, test_subset=8)
    model = CausalLM(model=str(tiny_llama), lora=LORA, lr=1e-2)
    trainer = FederatedTrainer(rounds=1, sampler=FullParticipation(), strategy="FedITLoRA", local_steps=1, batch_size=4,
                               logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
                               fed_eval_fraction=1.0, fed_eval_metric="ppl", checkpoint_every=0, eval_batch_size=8)
    last = trainer.fit(model, dm)[-1]
    ppl = [m["val_ppl"] for m in trainer.evaluation.client_metrics.values()]
    assert len(ppl) == 3 and len(set(ppl)) == 3  # 3 clients: the worst 10% is ceil(0.3) = 1 client, the highest
    assert last["federated/val_ppl_worst10"] == pytest.approx(max(ppl))
    assert last["federated/val_ppl_mean"] == pytest.approx(sum(ppl) / 3)
    assert last["federated/higher_is_better"] == 0.0
